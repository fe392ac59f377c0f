//! The agent's admin server on `:4191` (the server itself is
//! `nodemesh_core::admin`): `/metrics`, `/live`, `/ready` (eBPF attached
//! and the first complete picture of the node's pods applied),
//! `/v1/services`, the Services and endpoints the agent knows, as JSON, and
//! `/v1/stat?window=10s|1m|10m`, the golden metrics of the window, and
//! `/v1/tap?…`, live requests as NDJSON, and `/v1/node`, what `nodemesh
//! check` asks of each node (all three to the node itself only:
//! `nodemesh stat|tap --agent` on the node; everyone else reads them
//! through the API server, which reaches agents on their tap port — see
//! [`crate::tapport`]).
use bytes::Bytes;
use hyper::StatusCode;
use nodemesh_core::{
    admin::{AdminResponse, Get, Routes, json, ndjson, text},
    wire::{CertView, NodeReport, TapEvent, TapFilter},
};
use tokio::sync::mpsc;

use crate::{
    identity::CertStore,
    proxy::ServedPods,
    state::StateStore,
    telemetry::{stats::Stats, tap::Tap},
};

/// What `/ready` says before the agent is ready.
pub const NOT_READY: &str = "not ready: pods not read yet\n";

/// The agent's own paths.
#[derive(Clone, Debug)]
pub struct AgentRoutes {
    /// The state, when it comes from Kubernetes (a pod file has no
    /// Services).
    pub services: Option<StateStore>,
    /// The windowed stats, and the node's name for them.
    pub stats: Option<(Stats, String)>,
    /// Live requests.
    pub tap: Option<Tap>,
    /// What `/v1/node` reports.
    pub node: Option<NodeFacts>,
}

/// Where `/v1/node` looks.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    pub node: String,
    pub cgroup_root: std::path::PathBuf,
    pub bpffs: std::path::PathBuf,
    pub ready: nodemesh_core::admin::Ready,
    pub pods: ServedPods,
    pub certs: Option<std::sync::Arc<CertStore>>,
    /// The memory limit the budgets came from, and the admission.
    pub memory_limit: Option<u64>,
    pub admission: crate::proxy::Admission,
}

impl NodeFacts {
    fn report(&self) -> NodeReport {
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default()
        };
        NodeReport {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            cgroup_root: self.cgroup_root.display().to_string(),
            bpffs: self.bpffs.display().to_string(),
            ready: self.ready.is_ready(),
            meshed_pods: self.pods.all().len() as u64,
            certificates: self
                .certs
                .as_ref()
                .map(|c| {
                    c.report()
                        .into_iter()
                        .map(|(id, held)| CertView {
                            identity: id.spiffe_id(c.trust_domain()),
                            not_after: held.map(unix),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            memory_limit: self.memory_limit,
            max_connections: self.admission.config().max_connections as u64,
            max_requests: self.admission.config().max_requests as u64,
            connections_in_use: self.admission.connections() as u64,
        }
    }
}

impl Routes for AgentRoutes {
    fn get(&self, get: Get<'_>) -> Option<AdminResponse> {
        match get.path {
            // The cluster's map of services, endpoints, nodes and
            // identities, and the node's workloads' paths and identities:
            // not for any pod that can reach the node's address.
            "/v1/services" | "/v1/stat" | "/v1/tap" | "/v1/node" if !get.from_this_host() => {
                Some(text(StatusCode::FORBIDDEN, NODE_ONLY))
            }
            "/v1/services" => Some(match &self.services {
                Some(state) => json(&state.services()),
                None => text(
                    hyper::StatusCode::NOT_FOUND,
                    "no service index: the agent reads a pod file\n",
                ),
            }),
            path => self.answer(path, get.query),
        }
    }
}

/// What `/v1/services`, `/v1/stat`, `/v1/tap` and `/v1/node` on the admin
/// port tell anyone else.
const NODE_ONLY: &str = "this answers the node itself only: use nodemesh stat|tap (through the API server, as RBAC allows), or --agent 127.0.0.1:4191 on the node\n";

impl AgentRoutes {
    /// `/v1/stat` and `/v1/tap` for a caller already known to be allowed
    /// (the tap port's one client); `None` for other paths.
    pub fn answer(&self, path: &str, query: Option<&str>) -> Option<AdminResponse> {
        match path {
            "/v1/stat" => Some(self.stat(query)),
            "/v1/tap" => Some(self.tap(query)),
            "/v1/node" => Some(match &self.node {
                Some(n) => json(&n.report()),
                None => text(StatusCode::NOT_FOUND, "no node report here\n"),
            }),
            _ => None,
        }
    }

    fn tap(&self, query: Option<&str>) -> AdminResponse {
        let Some(tap) = &self.tap else {
            return text(StatusCode::NOT_FOUND, "no tap here\n");
        };
        let filter = match TapFilter::parse(query.unwrap_or_default()) {
            Ok(f) => f,
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "filters: namespace, workload, pod, to, direction, method, path, authority, max_rps\n",
                );
            }
        };
        let mut reader = tap.subscribe(filter);
        let node = self.node_name();
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = reader.next() => e,
                    // The reader went away.
                    _ = tx.closed() => return,
                };
                let Some(event) = event else { return };
                // Which agent saw it: ids are per agent, and read the same
                // here as through the API server (which sets it too).
                let line = match (&node, event.node.is_empty()) {
                    (Some(node), true) => serde_json::to_vec(&TapEvent {
                        node: node.clone(),
                        ..(*event).clone()
                    }),
                    _ => serde_json::to_vec(&*event),
                };
                let Ok(mut line) = line else {
                    continue;
                };
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
        });
        ndjson(rx)
    }

    /// This node's name, when known.
    fn node_name(&self) -> Option<String> {
        self.stats
            .as_ref()
            .map(|(_, n)| n.clone())
            .or_else(|| self.node.as_ref().map(|n| n.node.clone()))
    }

    fn stat(&self, query: Option<&str>) -> AdminResponse {
        let Some((stats, node)) = &self.stats else {
            return text(StatusCode::NOT_FOUND, "no stats here\n");
        };
        let window = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("window="))
            .unwrap_or("1m");
        match stats.report(node, window) {
            Some(report) => json(&report),
            None => text(StatusCode::BAD_REQUEST, "window: one of 10s, 1m, 10m\n"),
        }
    }
}
