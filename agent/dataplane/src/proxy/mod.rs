//! The node's proxy, named by its stages:
//!
//! ```text
//! accept ─► outbound ─► route ─► tcp ─┬─► direct (from the pod's netns)
//!  (per pod   (orig dst,   (pure)      ├─► inbound ─► a pod on this node
//!   listener)  state)                  └─► tunnel::pool ══ mTLS ══► other node
//! tunnel::server ─► inbound ─► the pod (streams from other nodes)
//! ```
//!
//! - [`accept`]: the one accept loop and the one drain;
//! - [`outbound`]: a meshed pod's connections (then `route`, `tcp`);
//! - [`inbound`]: connections arriving for this node's pods, its policy
//!   and accounting;
//! - [`tunnel`]: the mutual-TLS HTTP/2 transport between nodes (server,
//!   pool, tls, h2);
//! - leaves shared by all: [`relay`] (the opaque relay), [`connect`]
//!   (dialling, injected), [`orig_dst`] (where a redirected connection was
//!   going, injected), [`pods`] (what is served), [`http`] (what both
//!   sides' HTTP paths share).
//!
//! Everything it needs comes in one [`ProxyInputs`]; the agent and the
//! tests build it the same way (the tests inject a connector and original
//! destinations on 127.0.0.1). Protocol detection ([`detect`]),
//! balancing ([`balance`]) and the HTTP pieces both sides share
//! ([`http`]) are leaves too.
pub mod accept;
pub mod admission;
pub mod balance;
pub mod connect;
pub mod detect;
pub mod http;
pub mod inbound;
pub mod orig_dst;
pub mod outbound;
pub mod pods;
pub mod relay;
pub mod tunnel;

use std::{collections::HashMap, sync::Arc, time::Duration};

use nodemesh_core::{
    labels::Direction,
    listen::{CapsConfig, Guard, ListenerMetrics},
    names::PodUid,
    wire::WorkloadRef,
};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

pub use self::admission::{Admission, AdmissionConfig};
pub use self::{
    accept::Drain,
    connect::{Connector, NetnsConnector},
    orig_dst::{ClientAddrs, OrigDsts},
    pods::{PodHandle, ServedPod, ServedPods},
};
use self::{
    admission::Door,
    balance::Balancer,
    inbound::{Inbound, InboundConfig},
    outbound::{Outbound, OutboundConfig},
    relay::{Buffers, Reset},
    tunnel::{TunnelConfig, TunnelMetrics, TunnelPool, TunnelServer},
};
use crate::{
    identity::CertStore,
    netns::Netns,
    state::Pod,
    state::StateStore,
    telemetry::{
        TcpMetrics,
        http::HttpMetrics,
        stats::{Stats, TcpSample},
    },
};

/// The tunnel port's caps: a peer node holds a pooled connection per
/// (its pod, identity here) pair in use (idle ones close after the
/// tunnel's idle timeout); a handshake not done is evicted by newer ones.
const TUNNEL_CAPS: CapsConfig = CapsConfig {
    connections: 32_768,
    per_source: 4096,
    // A restarted peer's pods all reconnect at once: room for them.
    handshakes: 1024,
    handshakes_per_source: 256,
};

/// Connections closed (from the peak) after which the allocator's free
/// memory is given back to the kernel.
const GIVE_BACK_AFTER: usize = 256;

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Relay buffer per direction per connection (the large size).
    pub buffer_size: usize,
    /// Bytes of large relay buffers out at once (beyond: small ones).
    pub buffer_budget: u64,
    /// Opaque relays silent both ways this long are closed (a pod's
    /// annotation sets its own).
    pub idle_timeout: Duration,
    /// The tunnel between nodes (used with workload identity).
    pub tunnel: TunnelConfig,
    /// How long an outbound connection may stay silent both ways before
    /// it is taken as opaque.
    pub detect_timeout: Duration,
    /// Inbound: the default policy, the delivery timeout.
    pub inbound: InboundConfig,
}

/// The proxy's metric families.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub tcp: TcpMetrics,
    pub tunnel: TunnelMetrics,
    pub http: HttpMetrics,
    /// The guarded listeners' refusals (the tunnel's, the admin and tap
    /// ports').
    pub listeners: ListenerMetrics,
}

impl ProxyMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        Self {
            tcp: TcpMetrics::new(registry),
            tunnel: TunnelMetrics::new(registry),
            http: HttpMetrics::new(registry),
            listeners: ListenerMetrics::new(registry),
        }
    }
}

/// Everything the proxy is built from.
pub struct ProxyInputs {
    pub cfg: ProxyConfig,
    pub state: StateStore,
    /// Workload certificates: with them, meshed pods are routed as such
    /// (mutual TLS between nodes); without, everything goes direct.
    pub certs: Option<Arc<CertStore>>,
    pub metrics: ProxyMetrics,
    pub connector: Arc<dyn Connector>,
    pub orig_dst: Arc<dyn OrigDsts>,
    /// Tells eBPF whom the agent's deliveries to apps carry (none in
    /// tests without eBPF).
    pub clients: Option<Arc<dyn ClientAddrs>>,
    pub drain: Drain,
    /// The node's budgets, which every door takes a ticket from.
    pub admission: Admission,
}

/// The node's proxy.
pub struct Proxy {
    outbound: Arc<Outbound>,
    inbound: Arc<Inbound>,
    tunnel: Option<(Arc<TunnelServer>, Arc<TunnelPool>)>,
    pods: ServedPods,
    tcp: TcpMetrics,
    http: HttpMetrics,
    admission: Admission,
    state: StateStore,
    buffers: Buffers,
    drain: Drain,
    /// What each served pod's TCP counters said last, and each workload's
    /// totals since (pods come and go; totals only grow).
    tcp_seen: std::sync::Mutex<TcpSeen>,
}

#[derive(Debug, Default)]
struct TcpSeen {
    /// (pod, direction) → (opened, sent, received) at the last sample.
    pods: HashMap<(PodUid, Direction), (u64, u64, u64)>,
    /// (direction, workload) → the same, summed over every pod it had.
    totals: HashMap<(String, WorkloadRef), (u64, u64, u64)>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("outbound", &self.outbound)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(inputs: ProxyInputs) -> Result<Self, rustls::Error> {
        let ProxyInputs {
            cfg,
            state,
            certs,
            metrics,
            connector,
            orig_dst,
            clients,
            drain,
            admission,
        } = inputs;
        let pods = ServedPods::default();
        let buffers = Buffers::new(cfg.buffer_size, cfg.buffer_budget);
        let inbound_side = Arc::new(Inbound::new(
            state.clone(),
            pods.clone(),
            connector.clone(),
            (buffers.clone(), cfg.idle_timeout),
            InboundConfig {
                detect_timeout: cfg.detect_timeout,
                ..cfg.inbound.clone()
            },
            clients,
        ));
        let tunnel = match certs {
            Some(store) => {
                let server = TunnelServer::new(
                    cfg.tunnel.clone(),
                    store.clone(),
                    metrics.tunnel.clone(),
                    inbound_side.clone(),
                    drain.clone(),
                    Guard::new("tunnel", TUNNEL_CAPS, metrics.listeners.clone()),
                )?;
                let pool = TunnelPool::new(
                    cfg.tunnel.clone(),
                    store,
                    metrics.tunnel.clone(),
                    connector.clone(),
                );
                Some((Arc::new(server), Arc::new(pool)))
            }
            None => None,
        };
        let outbound = Arc::new(Outbound::new(
            state.clone(),
            orig_dst,
            connector,
            inbound_side.clone(),
            tunnel.as_ref().map(|(_, pool)| pool.clone()),
            Arc::new(Balancer::default()),
            metrics.http.clone(),
            OutboundConfig {
                buffers: buffers.clone(),
                idle_timeout: cfg.idle_timeout,
                detect_timeout: cfg.detect_timeout,
            },
        ));
        Ok(Self {
            outbound,
            inbound: inbound_side,
            tunnel,
            pods,
            http: metrics.http,
            tcp: metrics.tcp,
            admission,
            state,
            buffers,
            drain,
            tcp_seen: std::sync::Mutex::default(),
        })
    }

    /// Whether meshed pods are routed as such (the tunnel is on).
    pub fn meshes(&self) -> bool {
        self.tunnel.is_some()
    }

    /// Serves the tunnel on `listeners` until `stop` (with workload
    /// identity only; without, the listeners are dropped).
    pub fn serve_tunnel(&self, listeners: Vec<TcpListener>, stop: CancellationToken) {
        if let Some((server, pool)) = &self.tunnel {
            for listener in listeners {
                tokio::spawn(server.clone().serve(listener, stop.clone()));
            }
            tokio::spawn(pool.clone().evict_idle(stop));
        }
    }

    /// Decides on the connections `uid`'s app accepted before it was
    /// captured (see [`Inbound::sweep_precapture`]).
    pub fn sweep_precapture(&self, uid: &PodUid) {
        if let Some(served) = self.pods.get(uid) {
            self.inbound.sweep_precapture([served]);
        }
    }

    /// Serves `pod`: its connections accepted on `listeners` (inside its
    /// netns) go through the proxy, and those inbound capture hands to
    /// `inbound` (listeners in its netns too), until the handle is dropped.
    pub fn serve_pod(
        &self,
        pod: Arc<Pod>,
        netns: Option<Arc<Netns>>,
        listeners: Vec<TcpListener>,
        inbound: Vec<TcpListener>,
    ) -> PodHandle {
        let source = pods::workload(&pod);
        self.http.hold(&source);
        let served = Arc::new(ServedPod {
            http: self.http.clone(),
            share: self.admission.pod(pod.limits),
            source,
            outbound: self.tcp.pod(pods::labels(&pod, Direction::Outbound)),
            inbound: self
                .meshes()
                .then(|| self.tcp.pod(pods::labels(&pod, Direction::Inbound))),
            precapture: std::sync::atomic::AtomicBool::new(netns.is_some()),
            netns,
            pod,
        });
        let stop = CancellationToken::new();
        let handle = PodHandle::new(served.clone(), self.pods.clone(), stop.clone());
        for listener in listeners {
            let outbound = self.outbound.clone();
            self.spawn_accept(
                listener,
                &served,
                &stop,
                Direction::Outbound,
                move |c, s| outbound.clone().handle(c, s),
            );
        }
        for listener in inbound {
            let side = self.inbound.clone();
            self.spawn_accept(listener, &served, &stop, Direction::Inbound, move |c, s| {
                let side = side.clone();
                async move { side.captured(c, s).await }
            });
        }
        handle
    }

    /// Accepts on one of `served`'s listeners until `stop`: each connection
    /// takes a ticket of the pod's share (inbound: of its client's too) and
    /// is served by `serve` in the drain, in a span named by its side; one
    /// refused is counted and reset at once.
    fn spawn_accept<F, Fut>(
        &self,
        listener: TcpListener,
        served: &Arc<ServedPod>,
        stop: &CancellationToken,
        side: Direction,
        serve: F,
    ) where
        F: Fn(TcpStream, Arc<ServedPod>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let drain = self.drain.clone();
        let (served, stop) = (served.clone(), stop.clone());
        tokio::spawn(async move {
            accept::accept_loop(&listener, None, &stop, side.as_str(), |client, peer, _| {
                let (door, metrics, key) = match side {
                    Direction::Outbound => (Door::Outbound, Some(&served.outbound), None),
                    Direction::Inbound => (Door::Inbound, served.inbound.as_ref(), Some(peer.ip())),
                };
                let permit = match served.share.connection(key) {
                    Ok(ticket) => ticket,
                    Err(why) => {
                        served.share.admission().refused(
                            metrics,
                            &served.pod.key(),
                            door,
                            why,
                            Some(peer.ip()),
                        );
                        client.reset();
                        return;
                    }
                };
                let pod = &served.pod;
                let name = format_args!("{}/{}", pod.namespace, pod.name);
                let span = match side {
                    Direction::Outbound => info_span!("outbound", pod = %name, client = %peer),
                    Direction::Inbound => info_span!("inbound", pod = %name, client = %peer),
                };
                let work = serve(client, served.clone());
                drain.spawn(
                    async move {
                        work.await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            })
            .await;
        });
    }

    /// Closes idle pooled upstream connections and forgets idle endpoint
    /// statistics every few seconds, samples the stats' TCP counters every
    /// second, and decides open inbound connections again when the state
    /// changes — until `stop`.
    pub async fn tidy(self: Arc<Self>, stop: CancellationToken) {
        // Open connections are decided again when policies change.
        tokio::spawn(self.inbound.clone().recheck_open(stop.clone()));
        let mut every = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        // The most connections open since memory was last given back.
        let mut peak = 0usize;
        loop {
            tokio::select! {
                _ = every.tick() => {
                    ticks += 1;
                    let open = self.admission.connections();
                    peak = peak.max(open);
                    if ticks.is_multiple_of(10) {
                        self.outbound.tidy();
                        // Many connections gone: their memory goes back.
                        if peak >= open + GIVE_BACK_AFTER {
                            self.buffers.trim();
                            crate::memory::give_back();
                            peak = open;
                        }
                    }
                    self.sample_tcp();
                }
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Each served pod's TCP counters, by workload and direction, into the
    /// windowed stats (once a second).
    fn sample_tcp(&self) {
        let mut samples: HashMap<(String, WorkloadRef), TcpSample> = HashMap::new();
        let mut seen = self.tcp_seen.lock().unwrap_or_else(|p| p.into_inner());
        let TcpSeen { pods, totals } = &mut *seen;
        let mut now_pods = HashMap::new();
        for served in self.pods.all() {
            // Its annotations may have changed since it was captured.
            if let Some(now) = self.state.pod(&served.pod.uid) {
                served.share.set_limits(now.limits);
            }
            let workload = WorkloadRef {
                namespace: served.source.namespace.clone(),
                kind: served.source.kind.clone(),
                name: served.source.name.clone(),
                serviceaccount: served.source.serviceaccount.clone(),
            };
            let sides = [
                (Direction::Outbound, Some(&served.outbound)),
                (Direction::Inbound, served.inbound.as_ref()),
            ];
            for (direction, m) in sides {
                let Some(m) = m else { continue };
                let (opened, open) = m.counts();
                let counts = (opened, m.sent.get(), m.received.get());
                // What the pod added since the last sample (a pod new to
                // the sample: all of it).
                let before = pods
                    .get(&(served.pod.uid.clone(), direction))
                    .copied()
                    .filter(|b| b.0 <= counts.0 && b.1 <= counts.1 && b.2 <= counts.2)
                    .unwrap_or_default();
                now_pods.insert((served.pod.uid.clone(), direction), counts);
                let key = (direction.as_str().to_owned(), workload.clone());
                let total = totals.entry(key.clone()).or_default();
                total.0 += counts.0 - before.0;
                total.1 += counts.1 - before.1;
                total.2 += counts.2 - before.2;
                let s = samples.entry(key).or_default();
                s.pods += 1;
                s.open += open;
            }
        }
        *pods = now_pods;
        // Workloads with no pod here keep their totals (their last window
        // still counts); their rows go with the stats' own horizon.
        for (key, total) in totals.iter() {
            let s = samples.entry(key.clone()).or_default();
            s.opened = total.0;
            s.sent = total.1;
            s.received = total.2;
        }
        drop(seen);
        self.http.stats().sample_tcp(samples);
    }

    /// Live requests (`/v1/tap`).
    pub fn tap(&self) -> &crate::telemetry::tap::Tap {
        self.http.tap()
    }

    /// The windowed request and TCP stats (`/v1/stat`).
    pub fn stats(&self) -> &Stats {
        self.http.stats()
    }

    /// The pods served now.
    pub fn pods(&self) -> &ServedPods {
        &self.pods
    }

    /// Connections in flight now.
    pub fn in_flight(&self) -> usize {
        self.drain.len()
    }

    /// Stops counting new connections for shutdown and waits for those in
    /// flight, up to `grace`. Returns how many were still open.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.drain.drain(grace).await
    }
}
