//! nodemesh-dataplane: the node agent. A connection's route through it,
//! in module order:
//!
//! `discovery` (the API server or a pod file) writes the one `state` store;
//! `capture` follows this node's meshed pods in it: `cgroup` and `netns`
//! find a pod, `redirect` attaches the eBPF programs, and the pod's
//! outbound listener is handed to the `proxy` (`outbound` → `route` →
//! `tcp`; `inbound`; the `tunnel` between nodes). `identity` keeps the
//! workload certificates the tunnel presents; `telemetry` counts; `admin`
//! serves `:4191`; `app` wires it all from `config`.
//!
//! Layers, top to bottom (a module imports only from below it; checked by
//! `cargo xtask layers`):
//! `app` → `admin`, `capture` → `proxy` → `discovery`, `identity` →
//! `state` → `telemetry`, `redirect`, `netns`, `cgroup`, `config`.
pub mod admin;
pub mod app;
pub mod capture;
pub mod cgroup;
pub mod config;
pub mod discovery;
pub mod identity;
pub mod memory;
pub mod netns;
pub mod proxy;
pub mod redirect;
pub mod sockdiag;
pub mod state;
pub mod tapport;
pub mod telemetry;

pub use app::{AgentError, App, Bound, main};
