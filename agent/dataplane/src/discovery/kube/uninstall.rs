//! Whether nodemesh is being uninstalled, so a stopping agent detaches
//! its eBPF programs: from watches of its DaemonSet and namespace while it
//! runs, else a last ask at stop. Only evidence counts, never an error.
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Namespace as K8sNamespace;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Evidence that nodemesh is being uninstalled, gathered while the agent
/// runs: its DaemonSet (seen, then gone or being deleted) and its namespace
/// (being deleted), from watches. `kubectl delete -f` removes the agent's
/// service account and RBAC within a second of its DaemonSet, so by the
/// time the agent is told to stop it may not be allowed to ask any more:
/// what it saw while it could is what counts. Only evidence counts: a 401
/// or 403 (revoked credentials, an RBAC slip, a bad token) or no answer
/// keeps the node's eBPF state (a restart), never an unmeshed node.
#[derive(Clone, Debug, Default)]
pub struct UninstallWatch(std::sync::Arc<std::sync::Mutex<Evidence>>);

#[derive(Debug, Default)]
struct Evidence {
    daemonset_seen: bool,
    /// A relist of the DaemonSet is under way: whether it was in it.
    relisting: Option<bool>,
    daemonset: Option<&'static str>,
    namespace: Option<&'static str>,
}

impl UninstallWatch {
    /// Follows the DaemonSet `namespace/name` and the namespace until
    /// `shutdown`.
    pub fn spawn(&self, client: &Client, namespace: &str, name: &str, shutdown: CancellationToken) {
        use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Namespace as K8sNamespace};
        let by_name = |n: &str| watcher::Config::default().fields(&format!("metadata.name={n}"));
        let ds = watcher(
            Api::<DaemonSet>::namespaced(client.clone(), namespace),
            by_name(name),
        )
        .default_backoff();
        let ns =
            watcher(Api::<K8sNamespace>::all(client.clone()), by_name(namespace)).default_backoff();
        let me = self.clone();
        tokio::spawn(async move {
            tokio::pin!(ds);
            tokio::pin!(ns);
            loop {
                tokio::select! {
                    Some(event) = ds.next() => me.daemonset(event),
                    Some(event) = ns.next() => me.namespace(event),
                    _ = shutdown.cancelled() => return,
                    else => return,
                }
            }
        });
    }

    fn daemonset(
        &self,
        event: Result<watcher::Event<k8s_openapi::api::apps::v1::DaemonSet>, watcher::Error>,
    ) {
        use watcher::Event::*;
        let mut e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = e.daemonset;
        match event {
            Ok(Apply(ds) | InitApply(ds)) => {
                e.daemonset_seen = true;
                if e.relisting.is_some() {
                    e.relisting = Some(true);
                }
                e.daemonset = ds
                    .metadata
                    .deletion_timestamp
                    .is_some()
                    .then_some("its DaemonSet is being deleted");
            }
            Ok(Delete(_)) if e.daemonset_seen => e.daemonset = Some("its DaemonSet is gone"),
            Ok(Init) => e.relisting = Some(false),
            // A relist without it: gone (if it was ever there).
            Ok(InitDone) => {
                let listed = e.relisting.take();
                if listed == Some(false) && e.daemonset_seen {
                    e.daemonset = Some("its DaemonSet is gone");
                }
            }
            _ => {}
        }
        if let (None, Some(why)) = (before, e.daemonset) {
            info!(
                why,
                "evidence of an uninstall: the node's eBPF state goes when this agent stops"
            );
        }
    }

    fn namespace(&self, event: Result<watcher::Event<K8sNamespace>, watcher::Error>) {
        use watcher::Event::*;
        let mut e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Ok(Apply(ns) | InitApply(ns)) => {
                e.namespace = ns
                    .metadata
                    .deletion_timestamp
                    .is_some()
                    .then_some("its namespace is being deleted");
            }
            Ok(Delete(_)) => e.namespace = Some("its namespace is gone"),
            _ => {}
        }
    }

    /// Why nodemesh is being uninstalled, if the agent has evidence: what
    /// the watches saw, else what the API server answers now (a DaemonSet
    /// it says is gone or terminating).
    pub async fn uninstalling(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Option<&'static str> {
        let seen = {
            let e = self.0.lock().unwrap_or_else(|p| p.into_inner());
            e.daemonset.or(e.namespace)
        };
        if seen.is_some() {
            return seen;
        }
        uninstalling(client, namespace, name).await
    }
}

/// What the API server says now: the DaemonSet or its namespace gone or
/// being deleted. An error (401, 403, no answer) is no evidence.
pub async fn uninstalling(client: &Client, namespace: &str, name: &str) -> Option<&'static str> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let within = Duration::from_secs(5);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    match tokio::time::timeout(within, daemonsets.get_opt(name)).await {
        Ok(Ok(None)) => return Some("its DaemonSet is gone"),
        Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => {
            return Some("its DaemonSet is being deleted");
        }
        Ok(Err(kube::Error::Api(status))) if matches!(status.code, 401 | 403) => {
            warn!(
                code = status.code,
                "cannot read the agent's DaemonSet at stop; keeping the node's eBPF state (only a deleted DaemonSet or namespace uninstalls)"
            );
        }
        _ => {}
    }
    let namespaces: Api<K8sNamespace> = Api::all(client.clone());
    match tokio::time::timeout(within, namespaces.get_opt(namespace)).await {
        Ok(Ok(None)) => Some("its namespace is gone"),
        Ok(Ok(Some(ns))) if ns.metadata.deletion_timestamp.is_some() => {
            Some("its namespace is being deleted")
        }
        _ => None,
    }
}
