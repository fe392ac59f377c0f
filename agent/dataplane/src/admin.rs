//! The agent's admin server on `:4191` (the server itself is
//! `nodemesh_core::admin`): `/metrics`, `/live`, `/ready` (eBPF attached
//! and the first complete picture of the node's pods applied), and
//! `/v1/services`, the Services and endpoints the agent knows, as JSON.
use nodemesh_core::admin::{AdminResponse, Routes, json, text};

use crate::state::StateStore;

/// What `/ready` says before the agent is ready.
pub const NOT_READY: &str = "not ready: pods not read yet\n";

/// The agent's own paths.
#[derive(Clone, Debug)]
pub struct AgentRoutes {
    /// The state, when it comes from Kubernetes (a pod file has no
    /// Services).
    pub services: Option<StateStore>,
}

impl Routes for AgentRoutes {
    fn get(&self, path: &str) -> Option<AdminResponse> {
        match path {
            "/v1/services" => Some(match &self.services {
                Some(state) => json(&state.services()),
                None => text(
                    hyper::StatusCode::NOT_FOUND,
                    "no service index: the agent reads a pod file\n",
                ),
            }),
            _ => None,
        }
    }
}
