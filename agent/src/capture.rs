//! Capture: making the node's meshed pods go through the proxy, and letting
//! go of the others. Reconciles the newest pod snapshot with what is in
//! place, live: no agent restart, no pod restart.
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
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
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

use crate::{
    cgroup::{CgroupDir, CgroupError, kubelet_pod_cgroups},
    discovery::{CgroupRef, NodePods, Pod, PodUid, PodsRx},
    metrics::{Direction, PodLabels, TcpMetrics, label_values},
    netns::{Netns, NetnsError},
    proxy::{Outbound, PodProxy},
    redirect::{Redirect, RedirectError},
    tunnel::{LocalPod, LocalPods},
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
    pub fn new(registry: &mut Registry, redirect: Arc<Redirect>) -> Self {
        let m = Self {
            meshed: Gauge::default(),
            errors: Family::default(),
            fastpath: Arc::new(FastPathCollector {
                redirect,
                pods: Mutex::default(),
            }),
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
    /// netns cookie → labels of the captured pod living there.
    pods: Mutex<BTreeMap<u64, PodLabels>>,
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
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut family = encoder.encode_descriptor(
            "fastpath_bytes",
            "Bytes sk_msg moved socket-to-socket between a meshed pod and the proxy, skipping the loopback TCP/IP stack",
            None,
            MetricType::Counter,
        )?;
        for (cookie, labels) in pods {
            let bytes = self.redirect.fastpath_bytes(cookie);
            for (to, n) in [("proxy", bytes.to_proxy), ("app", bytes.to_app)] {
                let labels = FastPathLabels {
                    pod: labels.clone(),
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
    labels: PodLabels,
    /// Its inbound series, when the mesh routes between pods.
    inbound_labels: Option<PodLabels>,
    stop: CancellationToken,
}

/// A meshed pod that could not be captured yet.
struct Failing {
    pod: Arc<Pod>,
    problem: String,
    backoff: Duration,
    next: Instant,
}

/// Reconciles the pod snapshots with what is captured.
pub struct Captures {
    cfg: CaptureConfig,
    cgroup_root: CgroupDir,
    redirect: Arc<Redirect>,
    outbound: Arc<Outbound>,
    tcp: TcpMetrics,
    metrics: CaptureMetrics,
    captured: BTreeMap<PodUid, Captured>,
    failing: BTreeMap<PodUid, Failing>,
    ready: Arc<AtomicBool>,
    /// Captured pods by address, for the tunnel endpoint (identity on).
    local: Option<LocalPods>,
}

impl Captures {
    pub fn new(
        cfg: CaptureConfig,
        cgroup_root: CgroupDir,
        redirect: Arc<Redirect>,
        outbound: Arc<Outbound>,
        tcp: TcpMetrics,
        metrics: CaptureMetrics,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self {
            cfg,
            cgroup_root,
            redirect,
            outbound,
            tcp,
            metrics,
            captured: BTreeMap::new(),
            failing: BTreeMap::new(),
            ready,
            local: None,
        }
    }

    /// Keeps `local` (captured pods by address) for the tunnel endpoint.
    pub fn with_local_pods(mut self, local: Option<LocalPods>) -> Self {
        self.local = local;
        self
    }

    /// Runs until `shutdown`. Captured pods stay captured in eBPF when this
    /// returns (a restarted agent adopts them); their listeners close.
    pub async fn run(mut self, mut pods: PodsRx, shutdown: CancellationToken) {
        let mut first = true;
        loop {
            let snapshot = pods.borrow_and_update().clone();
            if let Some(snapshot) = snapshot {
                self.reconcile(&snapshot);
                if first {
                    first = false;
                    self.release_orphans();
                    self.ready.store(true, Ordering::Release);
                }
            }
            let retry = self.failing.values().map(|f| f.next).min();
            tokio::select! {
                changed = pods.changed() => if changed.is_err() { break },
                _ = sleep_until(retry) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        for (_, c) in std::mem::take(&mut self.captured) {
            c.stop.cancel();
        }
    }

    /// Makes what is captured match `snapshot`.
    pub fn reconcile(&mut self, snapshot: &NodePods) {
        let wanted = |uid: &PodUid| snapshot.pods.get(uid).filter(|p| p.meshed);

        let gone: Vec<PodUid> = self
            .captured
            .iter()
            .filter(|(uid, c)| wanted(uid).is_none_or(|p| !p.same_placement(&c.pod)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.release(&uid);
        }
        self.failing.retain(|uid, _| wanted(uid).is_some());

        let now = Instant::now();
        for pod in snapshot.meshed() {
            if let Some(c) = self.captured.get_mut(&pod.uid) {
                c.pod = pod.clone();
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

        let labels = PodLabels::of(pod, Direction::Outbound);
        let proxy = Arc::new(PodProxy {
            pod: pod.clone(),
            netns: netns.clone(),
            tcp: self.tcp.pod(labels.clone()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(self.outbound.clone().serve(listener, proxy, stop.clone()));
        self.metrics
            .fastpath
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(netns.cookie(), labels.clone());
        let mut inbound_labels = None;
        if let (Some(local), Some(ip)) = (&self.local, pod.ip) {
            let labels = PodLabels::of(pod, Direction::Inbound);
            let entry = Arc::new(LocalPod {
                pod: pod.clone(),
                inbound: self.tcp.pod(labels.clone()),
            });
            local
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ip, entry);
            inbound_labels = Some(labels);
        }
        Ok(Captured {
            pod: pod.clone(),
            netns,
            labels,
            inbound_labels,
            stop,
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
        c.stop.cancel();
        self.tcp.remove(&c.labels);
        if let Some(labels) = &c.inbound_labels {
            self.tcp.remove(labels);
        }
        if let (Some(local), Some(ip)) = (&self.local, c.pod.ip) {
            let mut local = local.write().unwrap_or_else(|p| p.into_inner());
            if local.get(&ip).is_some_and(|l| l.pod.uid == c.pod.uid) {
                local.remove(&ip);
            }
        }
        self.metrics
            .fastpath
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&c.netns.cookie());
        self.redirect.forget_fastpath(c.netns.cookie());
        info!(pod = %c.pod.key(), uid = %uid, "pod released");
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
