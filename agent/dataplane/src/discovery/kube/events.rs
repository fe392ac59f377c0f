//! Kubernetes Events about this node's pods: a pod the agent cannot
//! capture gets a Warning saying why (`kubectl describe pod` shows it), so
//! its owner learns that its connections are refused, not just the node's
//! operator.
use std::time::Duration;

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tracing::debug;

use crate::{discovery::PodEvents, state::Pod};

/// The `reason` of nodemesh's Events (its value says what happened).
pub const CAPTURE_FAILED: &str = "NodemeshCaptureFailed";

/// Posts Events with the agent's client.
#[derive(Clone)]
pub struct KubeEvents {
    pub client: Client,
    /// This node's name (the Event's source host).
    pub node: String,
}

impl std::fmt::Debug for KubeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEvents")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The `reason` of the Event on a pod or namespace whose inbound-policy
/// annotation cannot be read (`deny` applies until it is fixed).
pub const INVALID_POLICY: &str = "NodemeshInvalidInboundPolicy";

/// What a Warning is about.
pub struct About<'a> {
    pub kind: &'static str,
    /// The object's namespace (`None` for a Namespace: its Events go to
    /// `default`, as the API server wants for cluster-scoped objects).
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub uid: Option<&'a str>,
}

impl PodEvents for KubeEvents {
    fn capture_failed(&self, pod: &Pod, reason: &str, message: &str) {
        let uid = pod.uid.to_string();
        self.warn(
            About {
                kind: "Pod",
                namespace: Some(&pod.namespace),
                name: &pod.name,
                uid: Some(&uid),
            },
            CAPTURE_FAILED,
            format!(
                "nodemesh cannot capture this pod ({reason}): {message}; its connections are refused until it can"
            ),
        );
    }
}

impl KubeEvents {
    /// Posts a Warning Event about an object, in the background (nothing
    /// waits for the API server).
    pub fn warn(&self, about: About<'_>, reason: &str, message: String) {
        let now = Time(Timestamp::now());
        let namespace = about.namespace.unwrap_or("default");
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", about.name)),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some(about.kind.into()),
                namespace: about.namespace.map(str::to_owned),
                name: Some(about.name.to_owned()),
                uid: about.uid.map(str::to_owned),
                ..ObjectReference::default()
            },
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("nodemesh-agent".into()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let key = format!("{}/{}", namespace, about.name);
        // Capture never waits for the API server.
        tokio::spawn(async move {
            match tokio::time::timeout(
                Duration::from_secs(10),
                api.create(&PostParams::default(), &event),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!(object = %key, error = %e, "cannot post an event"),
                Err(_) => debug!(object = %key, "posting an event timed out"),
            }
        });
    }
}
