//! The agent's admin server on `:4191` (the server itself is
//! `nodemesh_core::admin`): `/metrics`, `/live`, `/ready` (eBPF attached
//! and the first complete picture of the node's pods applied),
//! `/v1/services`, the Services and endpoints the agent knows, as JSON, and
//! `/v1/stat?window=10s|1m|10m`, the golden metrics of the window (to the
//! node itself only: `nodemesh stat --agent` on the node).
use hyper::StatusCode;
use nodemesh_core::admin::{AdminResponse, Get, Routes, json, text};

use crate::{state::StateStore, telemetry::stats::Stats};

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
}

impl Routes for AgentRoutes {
    fn get(&self, get: Get<'_>) -> Option<AdminResponse> {
        match get.path {
            "/v1/services" => Some(match &self.services {
                Some(state) => json(&state.services()),
                None => text(
                    hyper::StatusCode::NOT_FOUND,
                    "no service index: the agent reads a pod file\n",
                ),
            }),
            "/v1/stat" => Some(self.stat(get)),
            _ => None,
        }
    }
}

impl AgentRoutes {
    fn stat(&self, get: Get<'_>) -> AdminResponse {
        // Paths and identities of the node's workloads: not for any pod
        // that can reach the node's address.
        if !get.from_this_host() {
            return text(
                StatusCode::FORBIDDEN,
                "/v1/stat answers the node itself only (run nodemesh stat --agent 127.0.0.1:4191 on the node)\n",
            );
        }
        let Some((stats, node)) = &self.stats else {
            return text(StatusCode::NOT_FOUND, "no stats here\n");
        };
        let window = get
            .query
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
