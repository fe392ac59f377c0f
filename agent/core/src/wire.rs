//! What nodemesh's processes say to each other over HTTP, as JSON: the
//! identity service's certify API, and the agent's admin views. Types only:
//! whoever serves or reads them does so with its own client and server.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

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
