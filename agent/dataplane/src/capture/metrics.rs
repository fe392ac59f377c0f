//! What capture says about itself: why a pod could not be captured, how
//! many are, and the fast-path byte counts read from eBPF at scrape time.
use std::{path::PathBuf, sync::Arc};

use nodemesh_core::{label_values, labels::PodLabels};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    cgroup::CgroupError,
    netns::NetnsError,
    proxy::ServedPods,
    redirect::{Redirect, RedirectError},
};

label_values! {
    /// Why a meshed pod could not be captured.
    pub enum CaptureErrorReason {
        /// Its cgroup does not exist (yet) or is not cgroup v2.
        CgroupNotFound => "cgroup_not_found",
        /// Its netns cannot be opened, or no process runs in it yet.
        NetnsNotFound => "netns_not_found",
        /// The outbound listener cannot be opened in its netns.
        ListenFailed => "listen_failed",
        /// eBPF could not be attached to its cgroup.
        AttachFailed => "attach_failed",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error("cannot listen on 127.0.0.1:{port} in network namespace {netns}: {source}")]
    Listen {
        port: u16,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the addresses of network namespace {netns}: {source}")]
    Addresses {
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "network namespace {netns} does not hold the pod's addresses {missing}: not the pod's sandbox (a container's own network namespace?)"
    )]
    NotThePods { netns: PathBuf, missing: String },
    #[error("{0}")]
    Redirect(#[from] RedirectError),
}

impl CaptureError {
    /// What a starting pod looks like: its cgroup, or a process in it, is
    /// not there yet.
    pub fn is_startup(&self) -> bool {
        matches!(
            self,
            Self::Cgroup(
                CgroupError::NotFound { .. }
                    | CgroupError::NoPodCgroup { .. }
                    | CgroupError::Empty { .. }
            ) | Self::Netns(_)
        )
    }

    pub fn reason(&self) -> CaptureErrorReason {
        match self {
            Self::Cgroup(CgroupError::Empty { .. }) | Self::Netns(_) => {
                CaptureErrorReason::NetnsNotFound
            }
            Self::Cgroup(_) => CaptureErrorReason::CgroupNotFound,
            Self::Listen { .. } | Self::Addresses { .. } => CaptureErrorReason::ListenFailed,
            Self::NotThePods { .. } => CaptureErrorReason::NetnsNotFound,
            Self::Redirect(_) => CaptureErrorReason::AttachFailed,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CaptureErrorLabels {
    pub(super) reason: CaptureErrorReason,
}

/// Capture metrics, including the fast-path byte counts read from eBPF at
/// scrape time.
#[derive(Clone, Debug)]
pub struct CaptureMetrics {
    pub(super) meshed: Gauge,
    pub(super) errors: Family<CaptureErrorLabels, Counter>,
    fastpath: Arc<FastPathCollector>,
}

impl CaptureMetrics {
    /// The fast-path counters are read from `redirect` at scrape time, for
    /// the pods `pods` lists.
    pub fn new(registry: &mut Registry, redirect: Arc<Redirect>, pods: ServedPods) -> Self {
        let m = Self {
            meshed: Gauge::default(),
            errors: Family::default(),
            fastpath: Arc::new(FastPathCollector { redirect, pods }),
        };
        registry.register(
            "meshed_pods",
            "Pods on this node whose connections the proxy captures now",
            m.meshed.clone(),
        );
        registry.register(
            "pod_capture_errors",
            "Problems capturing a meshed pod, by reason (each distinct problem counted once)",
            m.errors.clone(),
        );
        registry.register_collector(Box::new(m.fastpath.clone()));
        m
    }
}

/// Reads `NM_FASTPATH` for every captured pod on each scrape.
#[derive(Debug)]
struct FastPathCollector {
    redirect: Arc<Redirect>,
    pods: ServedPods,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FastPathLabels {
    #[prometheus(flatten)]
    pod: PodLabels,
    /// Who received the bytes: "proxy" (the pod sent them) or "app".
    to: &'static str,
}

impl Collector for FastPathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "fastpath_bytes",
            "Bytes sk_msg moved socket-to-socket between a meshed pod and the proxy, skipping the loopback TCP/IP stack",
            None,
            MetricType::Counter,
        )?;
        for served in self.pods.all() {
            let Some(netns) = &served.netns else { continue };
            let bytes = self.redirect.fastpath_bytes(netns.cookie());
            for (to, n) in [("proxy", bytes.to_proxy), ("app", bytes.to_app)] {
                let labels = FastPathLabels {
                    pod: served.outbound.labels().clone(),
                    to,
                };
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
