//! Outbound: connections a meshed pod makes, redirected by `connect4` to
//! the pod's own `127.0.0.1:15001`. For each one, in this order:
//! 1. its original destination ([`super::orig_dst`]);
//! 2. what is there ([`crate::state::StateStore::upstream`]);
//! 3. a Service's cluster IP and port: an endpoint, chosen by the
//!    [`Balancer`] among the ready ones (power of two choices over
//!    peak-EWMA × load), another one tried if it cannot be reached;
//! 4. how to get there ([`route`]: direct, a pod on this node, the tunnel
//!    to another node, or refused — a refused endpoint is skipped);
//! 5. what it speaks ([`detect`]): unless configured (opaque ports,
//!    `appProtocol`), the destination is dialled at once while the client's
//!    first bytes are awaited, so a server-first protocol never waits;
//!    whichever side speaks first decides, within the detect timeout;
//! 6. HTTP ([`http`]): every request balanced on its own over pooled
//!    upstream connections, golden request metrics; anything else: the TCP
//!    path ([`tcp`]), bytes relayed over the connection already made.
//!
//! A destination that cannot be reached (or a Service with no endpoint
//! that can) gives the client a reset (a 502/503 for HTTP), a log line and
//! a metric.
pub mod http;
pub mod route;
mod tcp;

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use nodemesh_core::labels::Direction;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Sleep,
};
use tracing::{debug, warn};

use self::{
    http::{Dest, Early, pool::Pool},
    route::{RouteCtx, route},
    tcp::Failure,
};
use super::{
    balance::Balancer,
    connect::Connector,
    detect::{DETECT_BYTES, Detected, classify, is_h2_settings},
    inbound::Inbound,
    orig_dst,
    pods::ServedPod,
    relay::{Buffers, Reset, reset_if_we_die},
    tunnel::TunnelPool,
};
use crate::{
    state::{ConfiguredProtocol, StateStore, Target, Upstream},
    telemetry::{ConnectError, http::HttpMetrics},
};

/// Outbound settings.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// The relays' buffers.
    pub buffers: Buffers,
    /// Opaque relays silent both ways this long are closed (unless the
    /// pod says otherwise).
    pub idle_timeout: Duration,
    /// How long a connection may stay silent both ways before it is taken
    /// as opaque.
    pub detect_timeout: Duration,
}

/// The outbound side of the node's proxy, shared by every pod's listener.
pub struct Outbound {
    state: StateStore,
    node: String,
    orig_dst: Arc<dyn orig_dst::OrigDsts>,
    connector: Arc<dyn Connector>,
    inbound: Arc<Inbound>,
    /// The tunnel to other nodes; meshed pods are routed as such only when
    /// it is there.
    tunnel: Option<Arc<TunnelPool>>,
    balancer: Arc<Balancer>,
    pool: Arc<Pool>,
    http_metrics: HttpMetrics,
    cfg: OutboundConfig,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("node", &self.node)
            .field("mesh", &self.tunnel.is_some())
            .finish_non_exhaustive()
    }
}

/// What detection found, and what it dialled meanwhile.
struct Detection {
    detected: Detected,
    /// The connection dialled meanwhile (the one dial, awaited either
    /// way: it is what the connection goes over), or why there is none
    /// (and which endpoint failed, not to be tried again); `None`: not
    /// dialled (the pool held a connection for an HTTP client).
    early: Option<Result<Early, (Option<SocketAddr>, Failure)>>,
    /// What the server said first, to be passed on.
    server_first: Vec<u8>,
}

impl Outbound {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        state: StateStore,
        orig_dst: Arc<dyn orig_dst::OrigDsts>,
        connector: Arc<dyn Connector>,
        inbound: Arc<Inbound>,
        tunnel: Option<Arc<TunnelPool>>,
        balancer: Arc<Balancer>,
        http_metrics: HttpMetrics,
        cfg: OutboundConfig,
    ) -> Self {
        Self {
            node: state.node(),
            state,
            orig_dst,
            connector,
            inbound,
            tunnel,
            balancer,
            pool: Arc::default(),
            http_metrics,
            cfg,
        }
    }

    fn ctx(&self) -> RouteCtx<'_> {
        RouteCtx {
            node: &self.node,
            mesh: self.tunnel.is_some(),
        }
    }

    /// Closes idle pooled connections and forgets idle endpoints.
    pub(super) fn tidy(&self) {
        self.pool.tidy();
        self.balancer.tidy();
    }

    /// Serves one connection accepted on `pod`'s listener.
    pub(super) async fn handle(self: Arc<Self>, client: TcpStream, pod: Arc<ServedPod>) {
        let _open = pod.outbound.open();
        let _ = client.set_nodelay(true);
        reset_if_we_die(&client);
        let Some(dst) = orig_dst::wait_for(self.orig_dst.as_ref(), &client).await else {
            warn!("no original destination recorded for this connection; resetting it");
            pod.outbound
                .connect_error(ConnectError::NoOriginalDestination);
            client.reset();
            return;
        };
        let upstream = self.state.upstream(dst);
        let dest = match &upstream.target {
            // Resolved again for every request: endpoints change.
            Target::Service(_) => Dest::Service(dst),
            _ => Dest::Single(dst),
        };
        match self.configured(&upstream) {
            ConfiguredProtocol::Opaque => {
                self.http_metrics
                    .detected(Direction::Outbound, Detected::Configured);
                return self.opaque(client, &pod, &upstream, dst).await;
            }
            ConfiguredProtocol::H2 => {
                self.http_metrics
                    .detected(Direction::Outbound, Detected::H2);
                // Boxed: an HTTP connection's state (hyper's) is large,
                // and an opaque one's task should not reserve room for it.
                return Box::pin(self.clone().http(client, pod, dest, true, None)).await;
            }
            ConfiguredProtocol::Detect => {}
        }
        let detection = self.detect(&client, &pod, &upstream, dst).await;
        self.http_metrics
            .detected(Direction::Outbound, detection.detected);
        let early = detection.early;
        match detection.detected {
            Detected::Http1 | Detected::H2 => {
                let h2 = detection.detected == Detected::H2;
                // A connection whose server already spoke (read while
                // detecting) cannot start an HTTP client: a new one will.
                let early = early
                    .and_then(Result::ok)
                    .filter(|_| detection.server_first.is_empty());
                Box::pin(self.clone().http(client, pod, dest, h2, early)).await;
            }
            _ => match early {
                // Not dialled while detecting: now.
                None => self.opaque(client, &pod, &upstream, dst).await,
                Some(Ok(early)) => {
                    self.relay_early(client, &pod, early, &detection.server_first)
                        .await
                }
                // The endpoint first dialled failed: others (a Service),
                // or a reset.
                Some(Err((failed, failure))) => match &upstream.target {
                    Target::Service(svc) if !matches!(failure, Failure::NoEndpoints) => {
                        let exclude: Vec<SocketAddr> = failed.into_iter().collect();
                        self.service_tcp(client, &pod, svc, dst, &exclude).await
                    }
                    _ => {
                        let reason = failure.log(dst);
                        pod.outbound.connect_error(reason);
                        client.reset();
                    }
                },
            },
        }
    }

    /// What the destination carries by configuration: `appProtocol`, the
    /// opaque-ports annotations (Service, destination pod, namespace), the
    /// server-first ports.
    fn configured(&self, upstream: &Upstream) -> ConfiguredProtocol {
        let port = upstream.dst.port();
        match &upstream.target {
            Target::Service(svc) => {
                if svc.protocol == ConfiguredProtocol::Detect
                    && self.state.namespace_opaque(&svc.service.namespace, port)
                {
                    ConfiguredProtocol::Opaque
                } else {
                    svc.protocol
                }
            }
            Target::Pod(pod) => ConfiguredProtocol::of(
                None,
                pod.opaque_ports.contains(port)
                    || self.state.namespace_opaque(&pod.namespace, port),
                &[port],
            ),
            _ => ConfiguredProtocol::of(None, false, &[port]),
        }
    }

    /// Opaque by configuration: the TCP path.
    async fn opaque(
        &self,
        client: TcpStream,
        pod: &ServedPod,
        upstream: &Upstream,
        dst: SocketAddr,
    ) {
        if let Target::Service(service) = &upstream.target {
            return self.service_tcp(client, pod, service, dst, &[]).await;
        }
        let route = route(self.ctx(), &pod.pod, upstream);
        self.tcp(client, pod, route, dst).await;
    }

    /// Dials the destination (a Service's: the balancer's choice) before
    /// knowing what will be said on it.
    async fn open_early(
        &self,
        pod: &ServedPod,
        upstream: &Upstream,
        dst: SocketAddr,
    ) -> Result<Early, (Option<SocketAddr>, Failure)> {
        match &upstream.target {
            Target::Service(svc) => {
                let work = self
                    .balancer
                    .pick(&svc.tiers(), &[])
                    .ok_or((None, Failure::NoEndpoints))?;
                let endpoint = work.endpoint().addr;
                let opened = self
                    .open_endpoint(pod, &work)
                    .await
                    .map_err(|f| (Some(endpoint), f))?;
                Ok(Early {
                    endpoint,
                    opened,
                    work: Some(work),
                })
            }
            _ => {
                let route = route(self.ctx(), &pod.pod, upstream);
                let opened = self
                    .open(route, pod, dst)
                    .await
                    .map_err(|f| (Some(dst), f))?;
                Ok(Early {
                    endpoint: dst,
                    opened,
                    work: None,
                })
            }
        }
    }

    /// Waits for whichever speaks first, the client or (once dialled) the
    /// server, within the detect timeout.
    async fn detect(
        &self,
        client: &TcpStream,
        pod: &ServedPod,
        upstream: &Upstream,
        dst: SocketAddr,
    ) -> Detection {
        let deadline = tokio::time::sleep(self.cfg.detect_timeout);
        tokio::pin!(deadline);
        // This pod already holds an idle HTTP connection to the
        // destination: a client that speaks HTTP takes it (or another from
        // the pool), so the dial waits for the client's first bytes and
        // happens only if they are not HTTP. Dialling each time would open
        // an upstream connection per client connection, only to close it
        // again when the pool is full: with a new connection per request,
        // that churn costs a tunnel stream, a connection to the app and
        // the TIME_WAIT it leaves in the server's pod, per request.
        let pooled: &[SocketAddr] = match &upstream.target {
            Target::Service(svc) => &svc.endpoints,
            _ => std::slice::from_ref(&dst),
        };
        if self.pool.holds(&pod.pod.uid, pooled) {
            let detected = client_within(client, deadline.as_mut()).await;
            let early = match detected {
                Detected::Http1 | Detected::H2 => None,
                _ => Some(self.open_early(pod, upstream, dst).await),
            };
            return Detection::of(detected, early);
        }
        let open = self.open_early(pod, upstream, dst);
        tokio::pin!(open);
        // 1. The client speaks, the dial finishes, or time runs out.
        let early = tokio::select! {
            biased;
            d = client_bytes(client) => return Detection::of(d, Some(open.await)),
            early = &mut open => early,
            _ = &mut deadline => return Detection::of(Detected::Timeout, Some(open.await)),
        };
        match early {
            Ok(early) => dialled(client, early, deadline).await,
            // Nothing to listen to on that side: the client decides.
            Err(failure) => {
                Detection::of(client_within(client, deadline).await, Some(Err(failure)))
            }
        }
    }

    /// Relays bytes over the connection dialled while detecting; what the
    /// server already said goes first.
    async fn relay_early(&self, mut client: TcpStream, pod: &ServedPod, early: Early, said: &[u8]) {
        let Early {
            endpoint,
            opened,
            work,
        } = early;
        if !said.is_empty() {
            if let Err(e) = client.write_all(said).await {
                debug!(error = %e, "the client left before the server's first bytes");
                return;
            }
            pod.outbound.received.inc_by(said.len() as u64);
            if let Some(i) = opened.local.as_ref().and_then(|a| a.inbound()) {
                i.sent.inc_by(said.len() as u64);
            }
        }
        self.carry(client, pod, opened, endpoint).await;
        drop(work);
    }
}

impl Detection {
    fn of(detected: Detected, early: Option<Result<Early, (Option<SocketAddr>, Failure)>>) -> Self {
        Detection {
            detected,
            early,
            server_first: Vec::new(),
        }
    }
}

/// What the client says within the deadline.
async fn client_within(client: &TcpStream, deadline: Pin<&mut Sleep>) -> Detected {
    tokio::select! {
        d = client_bytes(client) => d,
        _ = deadline => Detected::Timeout,
    }
}

/// 2. Dialled: the client speaks, or the server, or time runs out.
async fn dialled(client: &TcpStream, mut early: Early, mut deadline: Pin<&mut Sleep>) -> Detection {
    let mut buf = vec![0u8; 16 * 1024];
    let said = tokio::select! {
        biased;
        d = client_bytes(client) => return Detection::of(d, Some(Ok(early))),
        r = early.opened.io.read(&mut buf) => r,
        _ = &mut deadline => return Detection::of(Detected::Timeout, Some(Ok(early))),
    };
    match said {
        // An HTTP/2 server greets with its SETTINGS at once, without
        // waiting for the client's preface: still the client's turn.
        Ok(n) if n > 0 && is_h2_settings(&buf[..n]) => {
            buf.truncate(n);
            Detection {
                server_first: buf,
                ..Detection::of(client_within(client, deadline).await, Some(Ok(early)))
            }
        }
        Ok(n) if n > 0 => {
            buf.truncate(n);
            Detection {
                server_first: buf,
                ..Detection::of(Detected::ServerFirst, Some(Ok(early)))
            }
        }
        // Closed or failed before a word: as if the dial had failed (a
        // Service tries another endpoint); the client decides.
        other => {
            let e = other
                .err()
                .unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::ConnectionReset));
            if let Some(work) = &early.work {
                work.failure();
            }
            let failed = (Some(early.endpoint), Failure::Connect(e));
            Detection::of(client_within(client, deadline).await, Some(Err(failed)))
        }
    }
}

/// What the client's first bytes are, once they say (peeked, not taken).
async fn client_bytes(client: &TcpStream) -> Detected {
    let mut buf = vec![0u8; DETECT_BYTES];
    loop {
        match client.peek(&mut buf).await {
            // Closed (or half-closed) before saying anything.
            Ok(0) | Err(_) => return Detected::Opaque,
            Ok(n) => match classify(&buf[..n]) {
                Some(d) => return d,
                None if n == buf.len() => return Detected::Opaque,
                // The start of something: wait for more of it.
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            },
        }
    }
}
