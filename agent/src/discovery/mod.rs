//! Discovery: which pods run on this node, and which of them are meshed.
//!
//! A pod source publishes complete snapshots of the node's pods on a `watch`
//! channel; the capture loop reconciles against the newest one. Snapshots
//! are small (a node runs a few hundred pods at most) and make "nothing lost,
//! nothing duplicated" easy to reason about. The file source here is the
//! first implementation; Kubernetes comes behind the same channel.
pub mod file;
pub mod kube;
pub mod services;

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf, sync::Arc};

use crate::cgroup::QosClass;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::watch;

/// The opt-in label, on a pod (or, with Kubernetes, its namespace).
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

/// A pod's UID: also a file name under the pin directory, so only
/// `[A-Za-z0-9._-]` is accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    pub fn new(uid: &str) -> Result<Self, String> {
        let ok = !uid.is_empty()
            && uid.len() <= 128
            && uid != "."
            && uid != ".."
            && uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if ok {
            Ok(Self(uid.to_owned()))
        } else {
            Err(format!(
                "uid {uid:?} must be 1-128 characters of letters, digits, '-', '_' or '.'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The value of [`MESH_LABEL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshLabel {
    Enabled,
    Disabled,
}

impl MeshLabel {
    /// `None` when the label is absent; an error for any other value.
    pub fn parse(labels: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        match labels.get(MESH_LABEL).map(String::as_str) {
            None => Ok(None),
            Some("enabled") => Ok(Some(Self::Enabled)),
            Some("disabled") => Ok(Some(Self::Disabled)),
            Some(other) => Err(format!(
                "label {MESH_LABEL}={other:?} is neither \"enabled\" nor \"disabled\"; ignored"
            )),
        }
    }
}

/// Where a pod's cgroup is, below the agent's cgroup root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupRef {
    /// This path, relative to the root.
    Path(PathBuf),
    /// Wherever kubelet put it: found from the pod's UID and QoS class
    /// (either cgroup driver).
    Kubelet { qos: Option<QosClass> },
}

/// What runs the pod: the owner kind (lowercase: `deployment`,
/// `statefulset`, `daemonset`, `job`, …, or `pod` for a bare pod) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// One pod on this node, with what the agent needs to capture it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    /// The pod's address; a pod is captured only once it has one.
    pub ip: Option<IpAddr>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub workload: Workload,
    pub cgroup: CgroupRef,
    /// The pod's netns; when absent, that of a process in its cgroup.
    pub netns: Option<PathBuf>,
    /// Whether the mesh captures this pod's connections.
    pub meshed: bool,
}

impl Pod {
    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Where the capture of this pod must be redone if it changes.
    pub fn same_placement(&self, other: &Pod) -> bool {
        self.cgroup == other.cgroup && self.netns == other.netns && self.ip == other.ip
    }
}

/// A complete view of the node's pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePods {
    pub pods: BTreeMap<PodUid, Arc<Pod>>,
}

impl NodePods {
    pub fn meshed(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods.values().filter(|p| p.meshed)
    }
}

/// Where snapshots arrive: `None` until the source has read anything.
pub type PodsRx = watch::Receiver<Option<Arc<NodePods>>>;
pub type PodsTx = watch::Sender<Option<Arc<NodePods>>>;

crate::metrics::label_values! {
    /// Why a source could not use (part of) its input.
    pub enum SourceErrorReason {
        /// The input could not be read.
        Read => "read",
        /// The input as a whole is malformed; the last good snapshot stays.
        Parse => "parse",
        /// One pod entry is invalid and was skipped.
        InvalidPod => "invalid_pod",
        /// A label value is malformed and was ignored.
        InvalidLabel => "invalid_label",
        /// A pod's owner is of a kind the agent does not know; its kind
        /// and name are used as they are.
        UnknownOwner => "unknown_owner",
        /// The API server could not be reached or refused a watch; it is
        /// retried with backoff.
        Watch => "watch",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_that_could_be_paths_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(PodUid::new(bad).is_err(), "{bad:?}");
        }
        assert!(PodUid::new("0f1e2d3c-aaaa-bbbb-cccc-000000000001").is_ok());
    }

    #[test]
    fn mesh_label_values() {
        let labels = |v: &str| BTreeMap::from([(MESH_LABEL.to_owned(), v.to_owned())]);
        assert_eq!(MeshLabel::parse(&BTreeMap::new()), Ok(None));
        assert_eq!(
            MeshLabel::parse(&labels("enabled")),
            Ok(Some(MeshLabel::Enabled))
        );
        assert_eq!(
            MeshLabel::parse(&labels("disabled")),
            Ok(Some(MeshLabel::Disabled))
        );
        assert!(MeshLabel::parse(&labels("yes")).is_err());
    }
}
