//! The HTTP path: a detected HTTP/1 or HTTP/2 client connection served by
//! hyper, every request (every HTTP/2 stream) forwarded on its own: to the
//! endpoint the [`Balancer`](crate::proxy::balance::Balancer) picks for it
//! (a Service), or the one destination (a pod), over a pooled upstream
//! connection ([`pool`]) reached the way [`super::route`] says.
//!
//! Semantics kept end to end: bodies stream (nothing is buffered whole),
//! trailers pass (gRPC status), `Host`/`:authority` are untouched,
//! hop-by-hop headers stop here (RFC 9110 §7.6.1), `Upgrade` (WebSocket)
//! and `CONNECT` become an opaque relay after the server agrees, and there
//! is no request timeout. A request that never reached an endpoint (the
//! connection could not be made, or the pooled one closed before it was
//! written) goes to another. A response the proxy makes says so in
//! `nodemesh-proxy-error`.
pub mod pool;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_core::wire::TapPeer;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use self::pool::{Conn, Key};
use super::{
    Outbound,
    route::{Route, route},
    tcp::Opened,
};
pub use crate::proxy::http::PROXY_ERROR_HEADER;
use crate::{
    proxy::{
        balance::InFlight,
        http::{
            Body, Done, Observed, Prepared, grpc_status, prepare, proxy_error, splice,
            strip_hop_by_hop,
        },
        inbound::is_policy_refusal,
        pods::{ServedPod, tap_peer},
        relay::{CountedIo, Reset},
    },
    state::{ServiceTarget, Target},
    telemetry::http::{Destination, Workload},
};

/// Endpoints tried for one request at most.
const ATTEMPTS: usize = 3;

/// Where a connection's requests go.
#[derive(Clone, Debug)]
pub enum Dest {
    /// A Service's cluster IP and port: each request to an endpoint of its
    /// own, among the ready ones at that moment.
    Service(SocketAddr),
    /// One address (a pod, or outside the cluster).
    Single(SocketAddr),
}

/// A connection opened before the protocol was known: the first pooled
/// connection to its endpoint.
pub struct Early {
    pub endpoint: SocketAddr,
    pub opened: Opened,
    pub work: Option<InFlight>,
}

/// One client connection's requests.
struct Forwarder {
    outbound: Arc<Outbound>,
    pod: Arc<ServedPod>,
    dest: Dest,
    h2: bool,
    source: Workload,
    /// The endpoint dialled while detecting: the first request goes there
    /// (its connection is waiting in the pool).
    early: std::sync::Mutex<Option<SocketAddr>>,
}

/// What a connection to an endpoint must be now (its route): over TLS,
/// and to which identity. A pooled one that no longer matches (the
/// destination became meshed, say) is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expected {
    tls: bool,
    peer: Option<String>,
}

impl Outbound {
    /// Serves an HTTP client connection (`h2`: HTTP/2 with prior
    /// knowledge) of `pod` to `dest` until it closes.
    pub(super) async fn http(
        self: Arc<Self>,
        client: TcpStream,
        pod: Arc<ServedPod>,
        dest: Dest,
        h2: bool,
        early: Option<Early>,
    ) {
        let forwarder = Arc::new(Forwarder {
            source: pod.source.clone(),
            outbound: self.clone(),
            pod: pod.clone(),
            dest,
            h2,
            early: std::sync::Mutex::new(early.as_ref().map(|e| e.endpoint)),
        });
        if let Some(early) = early {
            forwarder.pool_early(early).await;
        }
        // HTTP frames its messages: a close is a close (a reset on drop
        // would cut a `Connection: close` response short).
        client.close_gracefully();
        let io = TokioIo::new(CountedIo::new(
            client,
            vec![pod.outbound.sent.clone()],
            vec![pod.outbound.received.clone()],
        ));
        let service = service_fn(move |req| forwarder.clone().forward(req));
        let result = if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .with_upgrades()
                .await
        };
        if let Err(e) = result {
            debug!(error = %e, "HTTP client connection ended with an error");
        }
    }
}

/// Why no upstream connection could be had.
enum Unreachable {
    /// No endpoint to try (a Service with none ready, or all tried).
    NoEndpoint,
    /// The last one tried failed so.
    Failed(String),
    /// The last one tried refused the client by its inbound policy.
    Forbidden(String),
}

impl Forwarder {
    fn key(&self, endpoint: SocketAddr) -> Key {
        Key {
            pod: self.pod.pod.uid.clone(),
            endpoint,
            h2: self.h2,
        }
    }

    /// The Service behind the cluster IP now (its endpoints change).
    fn service(&self) -> Option<Arc<ServiceTarget>> {
        match &self.dest {
            Dest::Service(vip) => match self.outbound.state.upstream(*vip).target {
                Target::Service(svc) => Some(svc),
                _ => None,
            },
            Dest::Single(_) => None,
        }
    }

    /// The next endpoint to try, with its load accounting (Services): the
    /// early connection's endpoint first, then the balancer's choice.
    fn pick(&self, tried: &[SocketAddr]) -> Option<(SocketAddr, Option<InFlight>)> {
        match &self.dest {
            Dest::Service(_) => {
                let svc = self.service()?;
                let early = self
                    .early
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .filter(|e| svc.endpoints.contains(e) && !tried.contains(e));
                if let Some(work) = early.and_then(|e| self.outbound.balancer.choose(e)) {
                    return Some((work.endpoint().addr, Some(work)));
                }
                let work = self.outbound.balancer.pick(&svc.endpoints, tried)?;
                Some((work.endpoint().addr, Some(work)))
            }
            Dest::Single(addr) => (!tried.contains(addr)).then_some((*addr, None)),
        }
    }

    /// What a connection to `endpoint` must be, by its route now; `None`
    /// when routing refuses it (a meshed pod whose node is unknown, …).
    fn expected(&self, endpoint: SocketAddr) -> Option<Expected> {
        let upstream = self.outbound.state.upstream(endpoint);
        match route(self.outbound.ctx(), &self.pod.pod, &upstream) {
            Route::Direct => Some(Expected {
                tls: false,
                peer: None,
            }),
            Route::Local { id, .. } => Some(Expected {
                tls: false,
                peer: Some(id.uri().to_owned()),
            }),
            Route::Tunnel { dst, .. } => Some(Expected {
                tls: true,
                peer: Some(dst.uri().to_owned()),
            }),
            Route::Refuse(why) => {
                debug!(%endpoint, %why, "endpoint skipped");
                None
            }
        }
    }

    /// Where `endpoint` is, for a tap.
    fn tap_dst(&self, endpoint: SocketAddr) -> TapPeer {
        match self.outbound.state.upstream(endpoint).target {
            Target::Pod(p) => tap_peer(&p),
            _ => TapPeer {
                pod: endpoint.to_string(),
                ..TapPeer::default()
            },
        }
    }

    /// Where `endpoint` is, for the request metrics.
    fn destination(&self, endpoint: SocketAddr) -> Destination {
        let workload = match self.outbound.state.upstream(endpoint).target {
            Target::Pod(p) => Workload {
                namespace: p.namespace.clone(),
                kind: p.workload.kind.clone(),
                name: p.workload.name.clone(),
                serviceaccount: p.service_account.clone(),
            },
            _ => Workload::default(),
        };
        let service = match &self.dest {
            Dest::Service(vip) => self
                .service()
                .map(|svc| {
                    format!(
                        "{}/{}:{}",
                        svc.service.namespace, svc.service.name, svc.port.port
                    )
                })
                .unwrap_or_else(|| vip.to_string()),
            Dest::Single(_) => String::new(),
        };
        Destination { workload, service }
    }

    async fn conn_from(&self, endpoint: SocketAddr, opened: Opened) -> Result<Conn, String> {
        self.pod
            .outbound
            .peer_open(opened.tls, opened.peer.as_ref().map(|p| p.uri()));
        Conn::handshake(
            opened.io,
            self.h2,
            opened.tls,
            opened.peer,
            Arc::new(self.destination(endpoint)),
            opened.local,
        )
        .await
        .map_err(|e| format!("HTTP handshake with {endpoint}: {e}"))
    }

    /// The connection dialled while detecting becomes a pooled one.
    async fn pool_early(&self, early: Early) {
        let Early {
            endpoint,
            opened,
            work,
        } = early;
        match self.conn_from(endpoint, opened).await {
            Ok(conn) => {
                if let Some(work) = &work {
                    work.reached();
                }
                self.outbound.pool.put(self.key(endpoint), conn);
            }
            Err(e) => {
                if let Some(work) = &work {
                    work.failure();
                }
                debug!(%endpoint, error = %e, "the connection opened while detecting is unusable");
            }
        }
    }

    /// A new upstream connection to `endpoint`; the error says whether
    /// the destination's policy refused it.
    async fn connect(&self, endpoint: SocketAddr) -> Result<Conn, (String, bool)> {
        let upstream = self.outbound.state.upstream(endpoint);
        let route = route(self.outbound.ctx(), &self.pod.pod, &upstream);
        let opened = self
            .outbound
            .open(route, &self.pod, endpoint)
            .await
            .map_err(|f| {
                if f.forbidden() {
                    debug!(%endpoint, "refused by the destination's inbound policy");
                    return (format!("{endpoint}: refused by its inbound policy"), true);
                }
                let reason = f.log(endpoint);
                self.pod.outbound.connect_error(reason);
                (format!("cannot reach {endpoint}: {reason}"), false)
            })?;
        self.conn_from(endpoint, opened)
            .await
            .map_err(|e| (e, false))
    }

    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let Prepared {
            protocol,
            upgrade,
            client_upgrade,
        } = prepare(&mut req, self.h2);
        // What a tap sees of it (when someone listens): out once, to the
        // endpoint it first went to.
        let mut tapped = self.outbound.http_metrics.tap().start(
            "outbound",
            || (tap_peer(&self.pod.pod), TapPeer::default()),
            false,
            &req,
        );
        let mut req = Some(req.map(|b| b.boxed()));
        let mut tried = Vec::new();
        // A pooled connection closed before the request was written: the
        // same endpoint again, on a new connection.
        let mut again: Option<(SocketAddr, Option<InFlight>)> = None;
        let mut why = Unreachable::NoEndpoint;
        let mut tap_sent = false;
        loop {
            let (endpoint, work, fresh) = match again.take() {
                Some((endpoint, work)) => (endpoint, work, true),
                None => {
                    if tried.len() >= ATTEMPTS {
                        break;
                    }
                    let Some((endpoint, work)) = self.pick(&tried) else {
                        break;
                    };
                    tried.push(endpoint);
                    (endpoint, work, false)
                }
            };
            let Some(expected) = self.expected(endpoint) else {
                why = Unreachable::Failed(format!("{endpoint}: refused by routing"));
                continue;
            };
            let key = self.key(endpoint);
            // An upgraded connection is the client's alone: never pooled.
            let pooled = if upgrade || fresh {
                None
            } else {
                self.outbound
                    .pool
                    .take(&key)
                    .filter(|c| c.tls == expected.tls && c.peer_uri() == expected.peer.as_deref())
            };
            let was_pooled = pooled.is_some();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => match self.connect(endpoint).await {
                    Ok(conn) => conn,
                    // Not the endpoint's fault: it is up, and says no.
                    Err((e, true)) => {
                        why = Unreachable::Forbidden(e);
                        continue;
                    }
                    Err((e, false)) => {
                        // Only connection failures count against it.
                        if let Some(w) = &work {
                            w.failure();
                        }
                        debug!(%endpoint, error = %e, "trying another endpoint");
                        why = Unreachable::Failed(e);
                        continue;
                    }
                },
            };
            // A pod here, through the proxy once, over a connection it let
            // in earlier: its policy decides again (it changes live).
            if was_pooled
                && let Some(dst) = conn.local()
                && let Err(e) = self
                    .outbound
                    .inbound
                    .authorize_local(&self.pod, dst, endpoint)
            {
                self.outbound.pool.put(key, conn);
                why = if is_policy_refusal(&e) {
                    Unreachable::Forbidden(format!("{endpoint}: refused by its inbound policy"))
                } else {
                    Unreachable::Failed(format!("{endpoint}: {e}"))
                };
                continue;
            }
            let Some(request) = req.take() else {
                break;
            };
            if let Some(t) = &mut tapped
                && !tap_sent
            {
                t.to(self.tap_dst(endpoint), conn.tls);
                t.sent();
                tap_sent = true;
            }
            let sent = Instant::now();
            match conn.send(request).await {
                Ok(mut resp) => {
                    // A new connection's first answer carries its warm-up
                    // (HTTP/2 settings, an app's Nagle meeting a delayed
                    // ACK: tens of ms once) and would make a new endpoint
                    // look slow for the decay's seconds: not sampled.
                    match &work {
                        Some(w) if was_pooled => w.answered(sent),
                        Some(w) => w.reached(),
                        None => {}
                    }
                    let metric = self.outbound.http_metrics.request(
                        &self.source,
                        &conn.dst,
                        conn.tls,
                        protocol,
                    );
                    // A pod served here, reached through the proxy once: its
                    // side of the request too.
                    let inbound = conn.local().and_then(|dst| {
                        dst.http.inbound_request(
                            &dst.source,
                            self.pod.pod.identity().map(|id| id.uri()),
                            false,
                            protocol,
                        )
                    });
                    for m in [&metric, &inbound].into_iter().flatten() {
                        m.latency(started.elapsed());
                    }
                    let status = resp.status();
                    let mut server_side = tapped
                        .as_ref()
                        .filter(|_| conn.local().is_some())
                        .map(|t| t.server_side());
                    for t in [&mut tapped, &mut server_side].into_iter().flatten() {
                        if t.is_server_side() {
                            t.sent();
                        }
                        t.response(status.as_u16(), grpc_status(resp.headers()));
                    }
                    let switched = upgrade
                        && (status == StatusCode::SWITCHING_PROTOCOLS
                            || (status.is_success() && client_upgrade.is_some()));
                    if switched {
                        let server = hyper::upgrade::on(&mut resp);
                        if let Some(client) = client_upgrade {
                            // To a pod here: its policy decides again on
                            // every change, as for any relay into it.
                            let registered = conn.local().and_then(|dst| {
                                self.outbound
                                    .inbound
                                    .recheck_local(&self.pod, dst, endpoint)
                                    .map(|r| r.register())
                            });
                            tokio::spawn(async move {
                                match registered {
                                    Some((_registered, cut)) => tokio::select! {
                                        () = splice(client, server) => {}
                                        _ = cut.cancelled() => {
                                            debug!("an upgraded connection is refused now: cut");
                                        }
                                    },
                                    None => splice(client, server).await,
                                }
                            });
                        }
                    } else if !upgrade {
                        self.outbound.pool.put(key, conn);
                    }
                    if !self.h2 {
                        strip_hop_by_hop(resp.headers_mut(), switched);
                    }
                    let grpc_status = grpc_status(resp.headers());
                    return Ok(resp.map(|body| {
                        Observed {
                            inner: body,
                            done: Some(Done {
                                metrics: [metric, inbound],
                                status: status.as_u16(),
                                grpc_status,
                                work,
                                tap: [tapped, server_side],
                            }),
                            bytes: 0,
                        }
                        .boxed()
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: it may go again.
                    Some(back) => {
                        req = Some(back);
                        if was_pooled {
                            // A keep-alive race, not the endpoint's fault.
                            again = Some((endpoint, work));
                        } else {
                            if let Some(w) = &work {
                                w.failure();
                            }
                            why = Unreachable::Failed(e.error().to_string());
                        }
                        debug!(%endpoint, error = %e.error(), "request not sent; trying again");
                    }
                    None => {
                        warn!(%endpoint, error = %e.error(), "the request failed upstream");
                        if let Some(m) = self.outbound.http_metrics.request(
                            &self.source,
                            &conn.dst,
                            conn.tls,
                            protocol,
                        ) {
                            m.response(502, None, true);
                        }
                        if let Some(mut t) = tapped {
                            t.response(502, None);
                            t.end(0, None);
                        }
                        return Ok(proxy_error(
                            StatusCode::BAD_GATEWAY,
                            &format!("upstream {endpoint}: {}", e.error()),
                        ));
                    }
                },
            }
        }
        let (status, message) = match why {
            Unreachable::NoEndpoint => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no endpoint available".to_owned(),
            ),
            Unreachable::Failed(e) => (StatusCode::BAD_GATEWAY, e),
            Unreachable::Forbidden(e) => (StatusCode::FORBIDDEN, e),
        };
        warn!(%status, %message, "answering the request with a proxy error");
        if let Some(mut t) = tapped {
            if !tap_sent {
                t.sent();
            }
            t.response(status.as_u16(), None);
            t.end(0, None);
        }
        let dst = match &self.dest {
            Dest::Service(vip) => Destination {
                service: self.destination(*vip).service,
                ..Destination::default()
            },
            Dest::Single(addr) => self.destination(*addr),
        };
        if let Some(m) = self
            .outbound
            .http_metrics
            .request(&self.source, &dst, false, protocol)
        {
            m.response(status.as_u16(), None, true);
        }
        Ok(proxy_error(status, &message))
    }
}
