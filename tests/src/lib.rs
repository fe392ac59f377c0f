//! The nodemesh test bed: a Kubernetes node and its pods built from Linux
//! primitives, running the real agent.
//!
//! - a **node** is a network namespace with a bridge, a cgroup v2 directory
//!   (its cgroup root) and its own bpffs pin directory;
//! - a **pod** is a network namespace with a veth to the node's bridge and an
//!   address, and a cgroup named the way kubelet names pod cgroups; its
//!   *containers* are processes started inside both ([`apps`]: a TCP, an
//!   HTTP or a gRPC app);
//! - the **agent** is the nodemesh agent, run as a process in the node's
//!   netns and in its own cgroup under the node's;
//! - several nodes are joined by a **link** ([`mesh::Link`]): a netns with
//!   a bridge, where traffic between nodes can be captured.
//!
//! Everything a test creates is removed when its guard drops, also when the
//! test panics; what a crashed earlier run left is removed when the first
//! node of a run is made. All traffic stays inside the test's namespaces.
//!
//! Test binaries use [`harness::main`] as their `main`: the same binary
//! runs as pod application and as agent when the test bed starts it so.
pub mod agent;
pub mod apps;
pub mod harness;
pub mod kube;
pub mod mesh;
pub mod node;
pub mod prom;
pub mod realnode;
pub mod soak;
pub mod sys;
pub mod wrk;

pub use agent::{Agent, AgentOptions};
pub use apps::{
    grpc::GrpcApp,
    http::HttpApp,
    tcp::{Exchange, Failure, TcpApp},
};
pub use kube::Cluster;
pub use node::{CgroupDriver, Node, Pod, PodSpec, Qos};
pub use prom::Metrics;
pub use sys::eventually;
