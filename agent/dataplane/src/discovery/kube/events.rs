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

impl PodEvents for KubeEvents {
    fn capture_failed(&self, pod: &Pod, reason: &str, message: &str) {
        let now = Time(Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(pod.namespace.clone()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.to_string()),
                ..ObjectReference::default()
            },
            reason: Some(CAPTURE_FAILED.into()),
            message: Some(format!(
                "nodemesh cannot capture this pod ({reason}): {message}; its connections are refused until it can"
            )),
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
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        let key = pod.key();
        // Capture never waits for the API server.
        tokio::spawn(async move {
            match tokio::time::timeout(
                Duration::from_secs(10),
                api.create(&PostParams::default(), &event),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!(pod = %key, error = %e, "cannot post the capture event"),
                Err(_) => debug!(pod = %key, "posting the capture event timed out"),
            }
        });
    }
}
