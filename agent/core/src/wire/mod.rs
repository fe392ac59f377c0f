//! What nodemesh's processes say to each other over HTTP, as JSON: the
//! identity service's certify API, and the agent's admin views. Types only:
//! whoever serves or reads them does so with its own client and server.
//! The stat windows are in `stat`, the tap's events and filter in `tap`.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[cfg(any(test, fuzzing))]
pub mod fuzzing;
mod stat;
mod tap;

pub use stat::*;
pub use tap::*;

/// `POST /v1/certify` on the identity service: the body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyRequest {
    pub namespace: String,
    pub service_account: String,
    /// PEM.
    pub csr: String,
}

/// The body of a successful certify answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyResponse {
    /// PEM: the workload certificate.
    pub certificate: String,
    /// PEM: the issuer (and intermediates) to present after it.
    pub chain: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// The body of a refused certify request (or of any identity service
/// error).
#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyError {
    /// The reason, as in `nodemesh_identity_certify_total{result}`.
    pub error: String,
    pub message: String,
}

/// `GET /v1/services` on an agent's admin server: one Service VIP:port and
/// its endpoints as the agent sees them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub addr: SocketAddr,
    pub port_name: Option<String>,
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint of a [`ServiceView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>` of the pod behind it.
    pub identity: Option<String>,
    /// The pod is meshed (its own label, or its namespace's).
    pub meshed: bool,
}

/// One agent's part of `GET /apis/tap.nodemesh.io/v1alpha1/stat`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStat {
    pub node: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<StatReport>,
    /// Why there is no report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /apis/tap.nodemesh.io/v1alpha1/stat?window=…`: every agent's
/// report as it answered (merging is the reader's: it knows whether a
/// partial picture will do).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatList {
    pub kind: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub agents: Vec<AgentStat>,
}

/// A certificate an agent should hold: a meshed service account's on its
/// node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    pub identity: String,
    /// When the one held expires (Unix seconds); `None`: none held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// `GET /v1/node` on an agent: what `nodemesh check` asks of each node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub version: String,
    /// `uname -r`.
    pub kernel: String,
    /// The kernel's BTF (`/sys/kernel/btf/vmlinux`) is there.
    pub btf: bool,
    /// The cgroup v2 hierarchy the agent attaches to.
    pub cgroup_root: String,
    /// Where its eBPF state is pinned.
    pub bpffs: String,
    /// eBPF programs attached and the node's pods read (`/ready`).
    pub ready: bool,
    /// Pods whose connections it captures now.
    pub meshed_pods: u64,
    pub certificates: Vec<CertView>,
    /// The memory limit its budgets were derived from (bytes), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// Its admission budgets, and what is held of the connections' now
    /// (0 from an agent that predates them).
    #[serde(default)]
    pub max_connections: u64,
    #[serde(default)]
    pub max_requests: u64,
    #[serde(default)]
    pub connections_in_use: u64,
}

/// One agent's part of `GET /apis/tap.nodemesh.io/v1alpha1/agents`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentNode {
    pub node: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<NodeReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /apis/tap.nodemesh.io/v1alpha1/agents`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentList {
    pub kind: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub agents: Vec<AgentNode>,
}
