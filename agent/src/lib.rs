//! nodemesh: a service mesh for Kubernetes with one proxy per node.
//!
//! A connection's route through the agent, in module order:
//! `discovery` (which pods are meshed) → `capture` (attach eBPF, open the
//! pod's listener) → `redirect` (the eBPF programs and maps) → `netns`
//! (sockets inside a pod's network namespace) → `proxy` (relay) →
//! `metrics` → `admin` (`:4191`). Between nodes: `identity` (certificates
//! per service account, and the signing service) and `tunnel` (mutual TLS,
//! HTTP/2 CONNECT on `:15008`). `agent` wires them; `cli` is the command
//! line.
pub mod admin;
pub mod agent;
pub mod capture;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod redirect;
pub mod tunnel;
