//! Capture: making the node's meshed pods go through the proxy, and letting
//! go of the others. Follows this node's pods in the state store and
//! reconciles them with what is in place, live: no agent restart, no pod
//! restart.
//!
//! Capturing a pod, in this order (each step undone if a later one fails,
//! so nothing stays half-attached):
//! 1. open its cgroup (under the agent's cgroup root) and its netns;
//! 2. open the outbound listener `127.0.0.1:<port>` inside its netns;
//! 3. attach `connect4` to its cgroup (pinned);
//! 4. start accepting.
//!
//! Releasing detaches first (new connections go direct again), then closes
//! the listener; connections already proxied finish on their own.
//! A pod that cannot be captured is retried with backoff; each distinct
//! problem is logged and counted once.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use socket2::{Domain, Socket, Type};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use nodemesh_core::{admin::Ready, label_values, labels::PodLabels, names::PodUid};

use crate::{
    cgroup::{CgroupDir, CgroupError, kubelet_pod_cgroups},
    netns::{Netns, NetnsError},
    proxy::{PodHandle, Proxy, ServedPods},
    redirect::{Redirect, RedirectError},
    state::{CgroupRef, Pod, StateStore},
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
        /// The pod has no IP address yet (its sandbox is not up).
        NoIp => "no_ip",
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
    #[error("{0}")]
    Redirect(#[from] RedirectError),
    #[error("the pod has no IP address yet; it is captured once it has one")]
    NoIp,
}

impl CaptureError {
    fn reason(&self) -> CaptureErrorReason {
        match self {
            Self::Cgroup(CgroupError::Empty { .. }) | Self::Netns(_) => {
                CaptureErrorReason::NetnsNotFound
            }
            Self::Cgroup(_) => CaptureErrorReason::CgroupNotFound,
            Self::Listen { .. } => CaptureErrorReason::ListenFailed,
            Self::Redirect(_) => CaptureErrorReason::AttachFailed,
            Self::NoIp => CaptureErrorReason::NoIp,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaptureErrorLabels {
    reason: CaptureErrorReason,
}

/// Capture metrics, including the fast-path byte counts read from eBPF at
/// scrape time.
#[derive(Clone, Debug)]
pub struct CaptureMetrics {
    meshed: Gauge,
    errors: Family<CaptureErrorLabels, Counter>,
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

/// Capture settings.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The outbound listener's port inside each pod's netns.
    pub outbound_port: u16,
    /// First and longest wait before retrying a pod that failed.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// A pod whose connections go through the proxy.
struct Captured {
    pod: Arc<Pod>,
    netns: Arc<Netns>,
    /// Keeps it served; dropped on release.
    served: PodHandle,
}

/// A meshed pod that could not be captured yet.
struct Failing {
    pod: Arc<Pod>,
    problem: String,
    backoff: Duration,
    next: Instant,
}

/// Reconciles this node's meshed pods with what is captured.
pub struct Captures {
    cfg: CaptureConfig,
    cgroup_root: CgroupDir,
    redirect: Arc<Redirect>,
    proxy: Arc<Proxy>,
    metrics: CaptureMetrics,
    captured: BTreeMap<PodUid, Captured>,
    failing: BTreeMap<PodUid, Failing>,
}

impl Captures {
    pub fn new(
        cfg: CaptureConfig,
        cgroup_root: CgroupDir,
        redirect: Arc<Redirect>,
        proxy: Arc<Proxy>,
        metrics: CaptureMetrics,
    ) -> Self {
        Self {
            cfg,
            cgroup_root,
            redirect,
            proxy,
            metrics,
            captured: BTreeMap::new(),
            failing: BTreeMap::new(),
        }
    }

    /// Follows the state's pods until `shutdown`; `ready` is set once the
    /// first complete picture is applied. Captured pods stay captured in
    /// eBPF when this returns (a restarted agent adopts them); their
    /// listeners close, and their handles are returned so the pods stay
    /// served (tunnel streams, series) while open connections drain.
    pub async fn run(
        mut self,
        state: StateStore,
        ready: Ready,
        shutdown: CancellationToken,
    ) -> Vec<PodHandle> {
        let mut changes = state.local_changes();
        let mut first = true;
        loop {
            changes.mark_unchanged();
            if let Some(pods) = state.local_pods() {
                self.reconcile(&pods);
                if first {
                    first = false;
                    self.release_orphans();
                    ready.set();
                }
            }
            let retry = self.failing.values().map(|f| f.next).min();
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = sleep_until(retry) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        std::mem::take(&mut self.captured)
            .into_values()
            .map(|c| {
                c.served.stop_accepting();
                c.served
            })
            .collect()
    }

    /// Makes what is captured match `pods` (this node's, as the state has
    /// them): the meshed ones captured, the others released.
    pub fn reconcile(&mut self, pods: &[Arc<Pod>]) {
        let wanted: BTreeMap<&PodUid, &Arc<Pod>> = pods
            .iter()
            .filter(|p| p.meshed())
            .map(|p| (&p.uid, p))
            .collect();

        let gone: Vec<PodUid> = self
            .captured
            .iter()
            .filter(|(uid, c)| wanted.get(uid).is_none_or(|p| !p.same_placement(&c.pod)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.release(&uid);
        }
        self.failing.retain(|uid, _| wanted.contains_key(uid));

        let now = Instant::now();
        for pod in wanted.into_values() {
            if self.captured.contains_key(&pod.uid) {
                continue;
            }
            if let Some(f) = self.failing.get(&pod.uid) {
                // Retry early when the pod's description changed.
                if f.next > now && *f.pod == **pod {
                    continue;
                }
            }
            self.try_capture(pod.clone());
        }
        self.metrics.meshed.set(self.captured.len() as i64);
    }

    fn try_capture(&mut self, pod: Arc<Pod>) {
        match self.capture(&pod) {
            Ok(captured) => {
                info!(pod = %pod.key(), uid = %pod.uid, netns = %captured.netns.path().display(), "pod captured");
                self.failing.remove(&pod.uid);
                self.captured.insert(pod.uid.clone(), captured);
            }
            Err(e) => {
                // Whatever an earlier agent left for this pod must not stay
                // attached without a listener behind it.
                let _ = self.redirect.release(&pod.uid);
                let problem = e.to_string();
                let (backoff, repeated) = match self.failing.get(&pod.uid) {
                    Some(f) => (
                        (f.backoff * 2).min(self.cfg.retry_max),
                        f.problem == problem,
                    ),
                    None => (self.cfg.retry_min, false),
                };
                if !repeated {
                    warn!(pod = %pod.key(), uid = %pod.uid, reason = %e.reason(), error = %problem, "cannot capture pod; will retry");
                    self.metrics
                        .errors
                        .get_or_create(&CaptureErrorLabels { reason: e.reason() })
                        .inc();
                }
                self.failing.insert(
                    pod.uid.clone(),
                    Failing {
                        pod,
                        problem,
                        backoff,
                        next: Instant::now() + backoff,
                    },
                );
            }
        }
    }

    fn capture(&self, pod: &Arc<Pod>) -> Result<Captured, CaptureError> {
        if pod.ip.is_none() {
            return Err(CaptureError::NoIp);
        }
        let cgroup = self.pod_cgroup(pod)?;
        let netns_path = match &pod.netns {
            Some(path) => path.clone(),
            None => PathBuf::from(format!("/proc/{}/ns/net", cgroup.first_process()?)),
        };
        let netns = Arc::new(Netns::open(&netns_path)?);
        let port = self.cfg.outbound_port;
        let listen_err = |source| CaptureError::Listen {
            port,
            netns: netns_path.clone(),
            source,
        };
        let listener = netns
            .enter(|| bind_listener(port))
            .map_err(|e| listen_err(e.into()))?
            .map_err(listen_err)?;
        let listener = TcpListener::from_std(listener).map_err(listen_err)?;
        self.redirect.capture(&pod.uid, &cgroup)?;
        let served = self
            .proxy
            .serve_pod(pod.clone(), Some(netns.clone()), listener);
        Ok(Captured {
            pod: pod.clone(),
            netns,
            served,
        })
    }

    /// The pod's cgroup under the root: its path, or where kubelet puts it.
    fn pod_cgroup(&self, pod: &Pod) -> Result<CgroupDir, CgroupError> {
        match &pod.cgroup {
            CgroupRef::Path(path) => self.cgroup_root.open_child(path),
            CgroupRef::Kubelet { qos } => {
                let candidates = kubelet_pod_cgroups(pod.uid.as_str(), *qos);
                for candidate in &candidates {
                    match self.cgroup_root.open_child(candidate) {
                        Err(CgroupError::NotFound { .. }) => continue,
                        found => return found,
                    }
                }
                Err(CgroupError::NoPodCgroup {
                    uid: pod.uid.to_string(),
                    root: self.cgroup_root.path().to_owned(),
                    tried: candidates.len(),
                })
            }
        }
    }

    fn release(&mut self, uid: &PodUid) {
        let Some(c) = self.captured.remove(uid) else {
            return;
        };
        if let Err(e) = self.redirect.release(uid) {
            warn!(pod = %c.pod.key(), error = %e, "cannot detach from pod");
        }
        info!(pod = %c.pod.key(), uid = %uid, "pod released");
        let cookie = c.netns.cookie();
        // Dropping it stops the listener and forgets the pod's series.
        drop(c);
        self.redirect.forget_fastpath(cookie);
    }

    /// Detaches pods an earlier agent captured that are no longer meshed.
    fn release_orphans(&mut self) {
        for uid in self.redirect.captured() {
            if !self.captured.contains_key(&uid) {
                match self.redirect.release(&uid) {
                    Ok(()) => {
                        info!(%uid, "released a pod captured by an earlier agent that is no longer meshed")
                    }
                    Err(e) => warn!(%uid, error = %e, "cannot release pod"),
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The outbound listener. `SO_REUSEPORT` lets a new agent listen before
/// the old one has closed, so an upgrade refuses no connection.
fn bind_listener(port: u16) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
