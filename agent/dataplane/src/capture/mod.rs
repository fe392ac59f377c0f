//! Capture: making the node's meshed pods go through the proxy, and letting
//! go of the others. Follows this node's pods in the state store and
//! reconciles them with what is in place, live: no agent restart, no pod
//! restart.
//!
//! Capturing a pod happens in two stages, so its first connection is never
//! made around the proxy:
//! 1. **attached**: as soon as its cgroup exists, the pod programs go on it
//!    (pinned). From then on its connections are refused (`EPERM`) until
//!    stage 2: fail closed, never in the clear;
//! 2. **served**: once a process holds its netns, the outbound listeners
//!    (`127.0.0.1:<port>`, and `[::1]:<port>` where IPv6 is up) open inside
//!    it, the proxy serves them, and eBPF is told the pod is ready: its
//!    connections are redirected.
//!
//! A new pod is looked for often while it starts (its cgroup, then a
//! process in it), so stage 1 lands before its containers run. A pod stuck
//! before stage 2 past that start-up grace stays attached (refused), is
//! retried with a quick then slower backoff, and each distinct problem is
//! logged, counted and reported as a Kubernetes Event once. Releasing marks the pod not
//! ready, detaches it (new connections go direct again), then closes the
//! listeners; connections already proxied finish on their own.
mod listen;
pub mod metrics;
mod netns;

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use nodemesh_core::{
    admin::Ready,
    names::{INBOUND_PORT, PodUid},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::metrics::CaptureErrorLabels;
pub use self::metrics::{CaptureError, CaptureErrorReason, CaptureMetrics};
use crate::{
    cgroup::CgroupDir,
    discovery::PodEvents,
    netns::Netns,
    proxy::{PodHandle, Proxy},
    redirect::{PodInbound, Redirect, pod_net},
    state::{Pod, StateStore},
};

/// Capture settings.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The outbound listener's port inside each pod's netns.
    pub outbound_port: u16,
    /// First and longest wait before retrying a pod that is not served.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// A new pod's cgroup or first process not being there yet is its
    /// start-up, not a failure, for this long: it is looked for every
    /// `startup_poll` meanwhile (so it is caught before its containers
    /// run), and only reported after.
    pub startup_grace: Duration,
    pub startup_poll: Duration,
    /// How often a served pod's netns is read again for addresses it
    /// gained (inbound capture takes every one; a new one is closed until
    /// it is read).
    pub address_poll: Duration,
    /// Whether pods' `skip-inbound-ports` annotations are honoured (not
    /// under a `--min-inbound-policy` above all-unauthenticated).
    pub skip_ports_allowed: bool,
    /// Pods' netns are found among these (the runtime's), by address,
    /// rather than through /proc (`--netns-dir`).
    pub netns_dir: Option<PathBuf>,
}

/// A meshed pod this agent works on.
struct Tracked {
    pod: Arc<Pod>,
    /// When this agent first wanted it captured.
    since: Instant,
    /// Its programs are on its cgroup.
    attached: bool,
    served: Option<Served>,
    failing: Option<Failing>,
}

/// A pod whose connections go through the proxy.
struct Served {
    netns: Arc<Netns>,
    /// Its inbound capture, when the mesh is on.
    inbound: Option<InboundCapture>,
    /// Keeps it served; dropped on release.
    handle: PodHandle,
}

/// What a pod's inbound capture needs again when its addresses change.
struct InboundCapture {
    /// Handles on its inbound listeners (the proxy owns them).
    v4: std::os::fd::OwnedFd,
    v6: Option<std::os::fd::OwnedFd>,
    /// The addresses captured now.
    addrs: Vec<std::net::IpAddr>,
    skip: Vec<u16>,
}

impl InboundCapture {
    /// Each address with its family's listener.
    fn listeners(&self, addrs: &[std::net::IpAddr]) -> Vec<(std::net::IpAddr, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        addrs
            .iter()
            .filter_map(|ip| match ip.to_canonical() {
                std::net::IpAddr::V4(_) => Some((*ip, self.v4.as_raw_fd())),
                std::net::IpAddr::V6(_) => self.v6.as_ref().map(|fd| (*ip, fd.as_raw_fd())),
            })
            .collect()
    }
}

/// Why a pod is not served yet, and when to try again.
struct Failing {
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
    events: Arc<dyn PodEvents>,
    tracked: BTreeMap<PodUid, Tracked>,
}

impl Captures {
    pub fn new(
        cfg: CaptureConfig,
        cgroup_root: CgroupDir,
        redirect: Arc<Redirect>,
        proxy: Arc<Proxy>,
        metrics: CaptureMetrics,
        events: Arc<dyn PodEvents>,
    ) -> Self {
        Self {
            cfg,
            cgroup_root,
            redirect,
            proxy,
            metrics,
            events,
            tracked: BTreeMap::new(),
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
        // The netns side (addresses a pod adds itself) is polled on a
        // clock of its own: pod changes and retries never push it back.
        let mut poll = tokio::time::interval(self.cfg.address_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = true;
        loop {
            if dirty {
                changes.mark_unchanged();
                if let Some(pods) = state.local_pods() {
                    self.reconcile(&pods);
                    if first {
                        first = false;
                        self.release_orphans();
                        ready.set();
                    }
                }
            }
            let retry = self
                .tracked
                .values()
                .filter_map(|t| t.failing.as_ref())
                .map(|f| f.next)
                .min();
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() { break }
                    dirty = true;
                }
                _ = sleep_until(retry) => dirty = true,
                _ = poll.tick() => {
                    self.refresh_addresses();
                    dirty = false;
                }
                _ = shutdown.cancelled() => break,
            }
        }
        std::mem::take(&mut self.tracked)
            .into_values()
            .filter_map(|t| t.served)
            .map(|s| {
                s.handle.stop_accepting();
                s.handle
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
            .tracked
            .iter()
            .filter(|(uid, t)| wanted.get(uid).is_none_or(|p| !p.same_placement(&t.pod)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.release(&uid);
        }
        let now = Instant::now();
        let mut recapture = Vec::new();
        for pod in wanted.values().copied() {
            let tracked = self
                .tracked
                .entry(pod.uid.clone())
                .or_insert_with(|| Tracked {
                    pod: pod.clone(),
                    since: now,
                    attached: false,
                    served: None,
                    failing: None,
                });
            // Retry early when the pod's description changed.
            let changed = *tracked.pod != **pod;
            let new_ips = tracked.pod.ips != pod.ips;
            tracked.pod = pod.clone();
            // Its addresses arrive once it runs: a netns taken before then
            // that does not hold them was not the pod's (a container's own):
            // let it go, and capture the pod again.
            if new_ips
                && tracked.pod.netns.is_none()
                && let Some(served) = &tracked.served
                && let Ok(found) = served.netns.addresses()
                && pod.ips.iter().any(|ip| !found.contains(ip))
            {
                warn!(pod = %pod.key(), netns = %served.netns.path().display(), "the pod's addresses are not in the network namespace it was captured in; capturing it again");
                recapture.push(pod.uid.clone());
                continue;
            }
            if let Some(served) = &mut tracked.served {
                // Its addresses arrive once it runs (or change): what
                // getsockname answers and inbound capture follow, nothing
                // is recaptured.
                if new_ips
                    && let Err(e) = self
                        .redirect
                        .ready(served.netns.cookie(), pod_net(&pod.ips))
                {
                    warn!(pod = %pod.key(), error = %e, "cannot record the pod's new addresses");
                }
                // Inbound capture follows the addresses and the exempt
                // ports (the annotation may change live); what the pod's
                // netns holds besides is the address poll's.
                if changed {
                    let skip = skip_ports(self.cfg.skip_ports_allowed, pod);
                    refresh_inbound(&self.redirect, pod, served, &skip);
                }
                continue;
            }
            if let Some(f) = &tracked.failing
                && f.next > now
                && !changed
            {
                continue;
            }
            self.advance(&pod.uid);
        }
        for uid in recapture {
            self.unserve(&uid);
            self.advance(&uid);
        }
        let served = self.tracked.values().filter(|t| t.served.is_some()).count();
        self.metrics.meshed.set(served as i64);
    }

    /// Takes a pod as far as it goes now; records why it stops.
    fn advance(&mut self, uid: &PodUid) {
        let Some(tracked) = self.tracked.get(uid) else {
            return;
        };
        let pod = tracked.pod.clone();
        let mut attached = tracked.attached;
        let result = self.capture(&pod, &mut attached);
        let Some(tracked) = self.tracked.get_mut(uid) else {
            return;
        };
        tracked.attached = attached;
        match result {
            Ok(served) => {
                info!(pod = %pod.key(), uid = %pod.uid, netns = %served.netns.path().display(), "pod captured");
                tracked.served = Some(served);
                tracked.failing = None;
            }
            Err(e) if e.is_startup() && tracked.since.elapsed() < self.cfg.startup_grace => {
                debug!(pod = %pod.key(), uid = %pod.uid, error = %e, attached, "pod not started yet");
                tracked.failing = Some(Failing {
                    problem: String::new(),
                    backoff: Duration::ZERO,
                    next: Instant::now() + self.cfg.startup_poll,
                });
            }
            Err(e) => {
                let problem = e.to_string();
                let (backoff, repeated) = match &tracked.failing {
                    Some(f) => (
                        (f.backoff * 2).clamp(self.cfg.retry_min, self.cfg.retry_max),
                        f.problem == problem,
                    ),
                    None => (self.cfg.retry_min, false),
                };
                if !repeated {
                    let reason = e.reason();
                    warn!(pod = %pod.key(), uid = %pod.uid, %reason, error = %problem, attached, "cannot capture pod; its connections are refused until it is; will retry");
                    self.metrics
                        .errors
                        .get_or_create(&CaptureErrorLabels { reason })
                        .inc();
                    self.events.capture_failed(&pod, reason.as_str(), &problem);
                }
                tracked.failing = Some(Failing {
                    problem,
                    backoff,
                    next: Instant::now() + backoff,
                });
            }
        }
    }

    /// Attaches (unless `attached`, which it sets once done), then serves;
    /// on an error, why the pod is not served.
    fn capture(&self, pod: &Arc<Pod>, attached: &mut bool) -> Result<Served, CaptureError> {
        let cgroup = self.pod_cgroup(pod)?;
        if !*attached {
            self.redirect.capture(&pod.uid, &cgroup)?;
            *attached = true;
        }
        let (netns, found) = self.pod_netns(pod, &cgroup)?;
        let listeners = listen::open(&netns, self.cfg.outbound_port)?;
        // Inbound, with the mesh on: connections to the pod's addresses go
        // to these listeners in its netns.
        let (inbound_listeners, inbound) = if self.proxy.meshes() {
            let (v4, v6) = listen::open_inbound(&netns, INBOUND_PORT)?;
            let dup = |l: &tokio::net::TcpListener| {
                use std::os::fd::AsFd;
                l.as_fd().try_clone_to_owned()
            };
            let listen_err = |source| CaptureError::Listen {
                port: INBOUND_PORT,
                netns: netns.path().to_owned(),
                source,
            };
            let capture = InboundCapture {
                v4: dup(&v4).map_err(listen_err)?,
                v6: v6.as_ref().map(dup).transpose().map_err(listen_err)?,
                addrs: Vec::new(),
                skip: skip_ports(self.cfg.skip_ports_allowed, pod),
            };
            (v6.into_iter().chain([v4]).collect(), Some(capture))
        } else {
            (Vec::new(), None)
        };
        let handle = self.proxy.serve_pod(
            pod.clone(),
            Some(netns.clone()),
            listeners,
            inbound_listeners,
        );
        let mut inbound = inbound;
        if let Some(capture) = &mut inbound {
            let addrs = inbound_addrs(&pod.ips, &found);
            self.redirect.capture_inbound(&PodInbound {
                uid: &pod.uid,
                netns: &netns,
                listeners: capture.listeners(&addrs),
                skip_ports: &capture.skip,
            })?;
            capture.addrs = addrs;
        }
        // Only now are its connections redirected rather than refused. Its
        // own address (what getsockname answers): the API's, else the
        // netns's.
        let own = if pod.ips.is_empty() {
            found
                .iter()
                .copied()
                .filter(|ip| !is_link_local(ip))
                .collect()
        } else {
            pod.ips.clone()
        };
        self.redirect.ready(netns.cookie(), pod_net(&own))?;
        // Connections its app accepted before now never passed the agent:
        // the policy decides on them too (new ones are all captured now).
        if inbound.is_some() {
            self.proxy.sweep_precapture(&pod.uid);
        }
        Ok(Served {
            netns,
            inbound,
            handle,
        })
    }

    /// Reads every served pod's netns again for addresses it gained or
    /// lost, and captures them.
    fn refresh_addresses(&mut self) {
        let allowed = self.cfg.skip_ports_allowed;
        for tracked in self.tracked.values_mut() {
            let pod = tracked.pod.clone();
            if let Some(served) = &mut tracked.served {
                let skip = skip_ports(allowed, &pod);
                refresh_inbound(&self.redirect, &pod, served, &skip);
            }
        }
    }

    /// Stops serving a pod (its listeners, its inbound capture, its ready
    /// mark) but keeps it attached: its connections are refused, never
    /// sent around the proxy, until it is served again.
    fn unserve(&mut self, uid: &PodUid) {
        let Some(t) = self.tracked.get_mut(uid) else {
            return;
        };
        t.failing = None;
        if let Some(served) = t.served.take() {
            self.stop_serving(uid, served);
        }
    }

    fn release(&mut self, uid: &PodUid) {
        let Some(t) = self.tracked.remove(uid) else {
            return;
        };
        if t.attached
            && let Err(e) = self.redirect.release(uid)
        {
            warn!(pod = %t.pod.key(), error = %e, "cannot detach from pod");
        }
        if let Some(served) = t.served {
            info!(pod = %t.pod.key(), uid = %uid, "pod released");
            self.stop_serving(uid, served);
        }
    }

    /// Its ready mark, its inbound capture, then its listeners and series
    /// (dropped with it), then its fast-path counts.
    fn stop_serving(&self, uid: &PodUid, served: Served) {
        let cookie = served.netns.cookie();
        self.redirect.unready(cookie);
        if let Some(inbound) = &served.inbound {
            self.redirect
                .release_inbound(uid, &inbound.addrs, &inbound.skip);
        }
        drop(served);
        self.redirect.forget_fastpath(cookie);
    }

    /// Detaches pods an earlier agent captured that are no longer meshed,
    /// forgets ready marks of namespaces no longer served, and removes
    /// what older layout versions pinned.
    fn release_orphans(&mut self) {
        for uid in self.redirect.captured() {
            if !self.tracked.get(&uid).is_some_and(|t| t.attached) {
                match self.redirect.release(&uid) {
                    Ok(()) => {
                        info!(%uid, "released a pod captured by an earlier agent that is no longer meshed")
                    }
                    Err(e) => warn!(%uid, error = %e, "cannot release pod"),
                }
            }
        }
        let inbound: Vec<std::net::IpAddr> = self
            .tracked
            .values()
            .filter_map(|t| t.served.as_ref()?.inbound.as_ref())
            .flat_map(|i| i.addrs.iter().copied())
            .collect();
        self.redirect.prune_inbound(&inbound);
        let served: Vec<u64> = self
            .tracked
            .values()
            .filter_map(|t| Some(t.served.as_ref()?.netns.cookie()))
            .collect();
        for cookie in self.redirect.ready_netns() {
            if !served.contains(&cookie) {
                self.redirect.unready(cookie);
            }
        }
        self.redirect.forget_other_layouts();
    }
}

/// The pod's exempt ports, as the install lets it have them.
fn skip_ports(allowed: bool, pod: &Pod) -> Vec<u16> {
    if allowed {
        return pod.skip_inbound_ports.clone();
    }
    if !pod.skip_inbound_ports.is_empty() {
        debug!(pod = %pod.key(), ports = ?pod.skip_inbound_ports, "skip-inbound-ports not honoured under --min-inbound-policy");
    }
    Vec::new()
}

/// What inbound capture takes for a pod: the addresses the API lists and
/// every one its netns has.
fn inbound_addrs(api: &[IpAddr], netns: &[IpAddr]) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = api
        .iter()
        .chain(netns)
        .map(|ip| ip.to_canonical())
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// Makes a served pod's inbound capture match its addresses (the API's and
/// its netns's, read now) and exempt ports.
fn refresh_inbound(redirect: &Redirect, pod: &Pod, served: &mut Served, skip: &[u16]) {
    let Some(inbound) = &mut served.inbound else {
        return;
    };
    let found = match served.netns.addresses() {
        Ok(found) => found,
        Err(e) => {
            debug!(pod = %pod.key(), error = %e, "cannot read the pod's addresses; keeping those captured");
            inbound.addrs.clone()
        }
    };
    let addrs = inbound_addrs(&pod.ips, &found);
    if inbound.addrs == addrs && inbound.skip == skip {
        return;
    }
    let gone: Vec<_> = inbound
        .addrs
        .iter()
        .filter(|ip| !addrs.contains(ip))
        .copied()
        .collect();
    redirect.release_inbound_addrs(&gone, &[]);
    redirect.forget_skip_ports(&inbound.addrs, &inbound.skip);
    inbound.skip = skip.to_vec();
    let captured = redirect.capture_inbound(&PodInbound {
        uid: &pod.uid,
        netns: &served.netns,
        listeners: inbound.listeners(&addrs),
        skip_ports: &inbound.skip,
    });
    match captured {
        Ok(()) => {
            if addrs.iter().any(|ip| !inbound.addrs.contains(ip)) {
                info!(pod = %pod.key(), addrs = ?addrs, "pod addresses captured inbound");
            }
            inbound.addrs = addrs;
        }
        Err(e) => {
            warn!(pod = %pod.key(), error = %e, "cannot capture the pod's new addresses inbound")
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
