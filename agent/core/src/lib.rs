//! nodemesh-core: the small core every part of nodemesh shares, and the
//! only thing the identity service and the operator CLI share with the
//! data plane.
//!
//! - [`names`]: names that are API (the opt-in label, default ports) and
//!   the validation of names (pod UIDs, DNS labels and subdomains);
//! - [`identity`]: a workload's identity and its SPIFFE and DNS forms;
//! - [`pki`]: trust anchors, issuers and workload certificates;
//! - [`labels`]: the metric prefix, closed label sets, per-pod labels;
//! - [`policy`]: `AuthorizationPolicy`, its validation and matching;
//! - [`wire`]: JSON bodies exchanged between nodemesh processes;
//! - [`config`]: flag parsing that reports every problem at once;
//! - [`admin`]: the admin HTTP server (`/metrics`, `/live`, `/ready`);
//! - [`kube`]: making a Kubernetes client.
//!
//! Nothing here knows about eBPF, pods on a node, or the proxy.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod identity;
pub mod kube;
pub mod labels;
pub mod listen;
pub mod names;
pub mod pki;
pub mod policy;
pub mod throttle;
pub mod wire;

#[doc(hidden)]
pub use prometheus_client as __prometheus_client;
