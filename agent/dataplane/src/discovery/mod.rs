//! Discovery: what the agent learns about the cluster, written into the
//! state store (its only writer). Two sources, one at a time:
//! - [`kube`]: the Kubernetes API (pods, namespaces, Services,
//!   EndpointSlices), each a list+watch;
//! - [`file`]: a watched YAML file of this node's pods (tests, and nodes
//!   without an API server).
//!
//! Each source reduces objects to the fields used as soon as they arrive,
//! and reports a problem with one object once, without stopping the others.
pub mod file;
pub mod kube;

use crate::state::Pod;

use nodemesh_core::label_values;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

label_values! {
    /// Why a source could not use (part of) its input.
    pub enum SourceErrorReason {
        /// The input could not be read.
        Read => "read",
        /// The input as a whole is malformed; the last good pods stay.
        Parse => "parse",
        /// One pod entry is invalid and was skipped.
        InvalidPod => "invalid_pod",
        /// A label value is malformed and was ignored.
        InvalidLabel => "invalid_label",
        /// An annotation value (`config.nodemesh.io/opaque-ports`) is
        /// malformed and was ignored.
        InvalidAnnotation => "invalid_annotation",
        /// A pod's owner is of a kind the agent does not know; its kind
        /// and name are used as they are.
        UnknownOwner => "unknown_owner",
        /// The API server could not be reached or refused a watch; it is
        /// retried with backoff.
        Watch => "watch",
        /// An `AuthorizationPolicy` is invalid: not enforced (its status
        /// says why).
        InvalidPolicy => "invalid_policy",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceErrorLabels {
    reason: SourceErrorReason,
}

/// Metrics shared by pod sources.
#[derive(Clone, Debug)]
pub struct SourceMetrics {
    errors: Family<SourceErrorLabels, Counter>,
}

impl SourceMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let errors = Family::default();
        registry.register(
            "pod_source_errors",
            "Problems reading the node's pods, by reason (each counted once, when first seen)",
            errors.clone(),
        );
        Self { errors }
    }

    pub fn error(&self, reason: SourceErrorReason) {
        self.errors
            .get_or_create(&SourceErrorLabels { reason })
            .inc();
    }
}

/// Where capture reports a pod it cannot capture, besides its own log and
/// metrics: a Kubernetes Event on the pod, with the Kubernetes source.
pub trait PodEvents: Send + Sync + 'static {
    /// `reason` is a capture error reason (`netns_not_found`, …).
    fn capture_failed(&self, pod: &Pod, reason: &str, message: &str);
}

/// No events (the pod file has no API server to tell).
#[derive(Debug, Default)]
pub struct NoEvents;

impl PodEvents for NoEvents {
    fn capture_failed(&self, _pod: &Pod, _reason: &str, _message: &str) {}
}
