//! The userspace proxy: one task per connection, relaying bytes between a
//! meshed pod and where it wanted to go. `outbound` handles what eBPF
//! redirected out of a pod.
pub mod outbound;
pub mod relay;

pub use outbound::{Outbound, OutboundConfig, PodProxy};
