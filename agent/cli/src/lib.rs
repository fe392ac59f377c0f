//! nodemesh-cli: the operator's commands: `install` and `uninstall` (print
//! the manifests for `kubectl apply -f -` / `kubectl delete -f -`), `stat`
//! (golden metrics from the agents), `tap` (live requests), `edges`,
//! `check` (before and after installing) and `dashboard` (a web UI). It depends on
//! `nodemesh-core` only: what it learns from agents it will learn over
//! their APIs, never from their internals.
#![forbid(unsafe_code)]

pub mod agents;
pub mod check;
pub mod dashboard;
pub mod edges;
pub mod install;
pub mod stat;
pub mod tap;
pub mod term;
pub mod top;
