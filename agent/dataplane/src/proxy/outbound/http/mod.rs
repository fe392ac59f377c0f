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
mod stages;

use nodemesh_core::labels::Direction;
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use nodemesh_core::wire::TapPeer;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use self::{
    pool::{Conn, Key},
    stages::{Answered, AttemptError, Expected, Observer, RequestTarget},
};
use super::{
    Outbound,
    route::{Route, route},
    tcp::Opened,
};
pub use crate::proxy::http::PROXY_ERROR_HEADER;
use crate::{
    proxy::{
        admission::RequestTicket,
        balance::InFlight,
        http::{
            Body, Done, Observed, Prepared, admit_request, grpc_status, prepare, proxy_error,
            spawn_splice, strip_hop_by_hop, switched,
        },
        inbound::LocalError,
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
    /// The client's address (a tap shows it).
    client: Option<SocketAddr>,
    /// The endpoint dialled while detecting: the first request goes there
    /// (its connection is waiting in the pool).
    early: std::sync::Mutex<Option<SocketAddr>>,
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
            client: client.peer_addr().ok(),
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
            crate::proxy::http::h2_server()
                .serve_connection(io, service)
                .await
        } else {
            crate::proxy::http::http1_server(crate::proxy::http::OUTBOUND_HEADER_TIMEOUT)
                .serve_connection(io, service)
                .with_upgrades()
                .await
        };
        if let Err(e) = result {
            debug!(error = %e, "HTTP client connection ended with an error");
        }
    }
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
    fn pick(
        &self,
        target: &RequestTarget,
        tried: &[SocketAddr],
    ) -> Option<(SocketAddr, Option<InFlight>)> {
        match target {
            RequestTarget::Gone => None,
            RequestTarget::Service(svc) => {
                let early = self
                    .early
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .filter(|e| svc.endpoints.contains(e) && !tried.contains(e));
                if let Some(work) = early.and_then(|e| self.outbound.balancer.choose(e)) {
                    return Some((work.endpoint().addr, Some(work)));
                }
                let work = self.outbound.balancer.pick(&svc.tiers(), tried)?;
                Some((work.endpoint().addr, Some(work)))
            }
            RequestTarget::Single(addr) => (!tried.contains(addr)).then_some((*addr, None)),
        }
    }

    /// Where `endpoint` is, for a tap.
    fn tap_dst(&self, endpoint: SocketAddr) -> TapPeer {
        let mut peer = match self.outbound.state.upstream(endpoint).target {
            Target::Pod(p) => tap_peer(&p),
            _ => TapPeer {
                pod: endpoint.to_string(),
                ..TapPeer::default()
            },
        };
        peer.addr = endpoint.to_string();
        peer
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

    /// A new upstream connection to `endpoint`, counted against it when it
    /// cannot be had (not when its policy says no).
    async fn connect(
        &self,
        endpoint: SocketAddr,
        route: Route<'_>,
        work: Option<&InFlight>,
    ) -> Result<Conn, AttemptError> {
        let failed = |e: AttemptError| {
            if let Some(w) = work {
                w.failure();
            }
            e
        };
        let opened = match self.outbound.open(route, &self.pod, endpoint).await {
            Ok(opened) => opened,
            Err(f) if f.forbidden() => {
                debug!(%endpoint, "refused by the destination's inbound policy");
                return Err(AttemptError::Refused { endpoint });
            }
            Err(f) => {
                let reason = f.log(endpoint);
                self.pod.outbound.connect_error(reason);
                return Err(failed(AttemptError::Unreachable(format!(
                    "cannot reach {endpoint}: {reason}"
                ))));
            }
        };
        self.conn_from(endpoint, opened)
            .await
            .map_err(|e| failed(AttemptError::Unreachable(e)))
    }

    /// An upstream connection for `endpoint` as its route is now: a
    /// pooled one made for that route (unless `fresh`, or the request
    /// upgrades: that connection is the client's alone), else a new one.
    /// A pooled one to a pod here is authorized again (its policy
    /// changes live). Whether it was pooled.
    async fn conn_for(
        &self,
        endpoint: SocketAddr,
        work: Option<&InFlight>,
        fresh: bool,
        upgrade: bool,
    ) -> Result<(Conn, bool), AttemptError> {
        // Routed once for the attempt: what a pooled connection must have
        // been made for, or how a new one is made.
        let upstream = self.outbound.state.upstream(endpoint);
        let route = route(self.outbound.ctx(), &self.pod.pod, &upstream);
        let Some(expected) = Expected::of(&route) else {
            debug!(%endpoint, ?route, "endpoint skipped");
            return Err(AttemptError::Unreachable(format!(
                "{endpoint}: refused by routing"
            )));
        };
        let key = self.key(endpoint);
        let pooled = (!upgrade && !fresh)
            .then(|| self.outbound.pool.take(&key))
            .flatten()
            .filter(|c| expected.made(c));
        let Some(conn) = pooled else {
            return Ok((self.connect(endpoint, route, work).await?, false));
        };
        if let Some(dst) = conn.local()
            && let Err(e) = self
                .outbound
                .inbound
                .authorize_local(&self.pod, dst, endpoint)
        {
            self.outbound.pool.put(key, conn);
            return Err(match e {
                LocalError::Refused(_) => AttemptError::Refused { endpoint },
                e => AttemptError::Unreachable(format!("{endpoint}: {e}")),
            });
        }
        Ok((conn, true))
    }

    /// One attempt: `req` to `endpoint`. A request not written comes back
    /// with the error.
    async fn attempt(
        &self,
        endpoint: SocketAddr,
        work: Option<InFlight>,
        fresh: bool,
        upgrade: bool,
        req: Request<Body>,
        observer: &mut Observer,
    ) -> Result<Answered, (AttemptError, Option<Request<Body>>, Option<InFlight>)> {
        let (mut conn, pooled) = match self.conn_for(endpoint, work.as_ref(), fresh, upgrade).await
        {
            Ok(c) => c,
            Err(e) => return Err((e, Some(req), work)),
        };
        observer.sending(|| self.tap_dst(endpoint), conn.tls);
        let sent = Instant::now();
        match conn.send(req).await {
            Ok(resp) => {
                // A new connection's first answer carries its warm-up
                // (HTTP/2 settings, an app's Nagle meeting a delayed ACK:
                // tens of ms once) and would make a new endpoint look slow
                // for the decay's seconds: not sampled.
                match &work {
                    Some(w) if pooled => w.answered(sent),
                    Some(w) => w.reached(),
                    None => {}
                }
                Ok(Answered {
                    resp,
                    conn,
                    key: self.key(endpoint),
                    endpoint,
                    work,
                })
            }
            Err(mut e) => match e.take_message() {
                Some(back) => {
                    if !pooled && let Some(w) = &work {
                        w.failure();
                    }
                    let reason = e.error().to_string();
                    let e = AttemptError::NotSent {
                        endpoint,
                        reason,
                        pooled,
                    };
                    Err((e, Some(back), work))
                }
                None => {
                    let (tls, source) = (conn.tls, e.into_error());
                    let e = AttemptError::Upstream {
                        endpoint,
                        tls,
                        source,
                    };
                    Err((e, None, work))
                }
            },
        }
    }

    /// Attempts until an endpoint answers: a request never written goes
    /// again (to the same endpoint on a new connection after a pooled one
    /// closed, else to another), at most [`ATTEMPTS`] endpoints in all.
    /// `None`: no endpoint to try at all.
    async fn attempts(
        &self,
        mut req: Request<Body>,
        upgrade: bool,
        observer: &mut Observer,
    ) -> Result<Answered, Option<AttemptError>> {
        let target =
            RequestTarget::resolve(&self.dest, |vip| self.outbound.state.upstream(vip).target);
        let mut tried = Vec::new();
        let mut again: Option<(SocketAddr, Option<InFlight>)> = None;
        let mut last = None;
        loop {
            let (endpoint, work, fresh) = match again.take() {
                Some((endpoint, work)) => (endpoint, work, true),
                None => {
                    let next = (tried.len() < ATTEMPTS)
                        .then(|| self.pick(&target, &tried))
                        .flatten();
                    let Some((endpoint, work)) = next else {
                        return Err(last);
                    };
                    tried.push(endpoint);
                    (endpoint, work, false)
                }
            };
            match self
                .attempt(endpoint, work, fresh, upgrade, req, observer)
                .await
            {
                Ok(answered) => return Ok(answered),
                Err((e, back, work)) => {
                    debug!(%endpoint, error = %e, "attempt failed");
                    if let AttemptError::NotSent { pooled: true, .. } = e {
                        again = Some((endpoint, work));
                    }
                    match back {
                        Some(back) => req = back,
                        None => return Err(Some(e)),
                    }
                    last = Some(e);
                }
            }
        }
    }

    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let admitted = match admit_request(&self.pod, Direction::Outbound) {
            Ok(t) => t,
            Err(refused) => return Ok(refused),
        };
        let Prepared {
            protocol,
            upgrade,
            client_upgrade,
        } = prepare(&mut req, self.h2);
        // What a tap sees of it (when someone listens): out once, to the
        // endpoint it first went to.
        let tapped = self.outbound.http_metrics.tap().start(
            "outbound",
            || {
                let mut src = tap_peer(&self.pod.pod);
                src.addr = self.client.map(|a| a.to_string()).unwrap_or_default();
                (src, TapPeer::default())
            },
            false,
            &req,
        );
        let mut observer = Observer {
            started: Instant::now(),
            protocol,
            tapped,
            announced: false,
        };
        match self
            .attempts(req.map(|b| b.boxed()), upgrade, &mut observer)
            .await
        {
            Ok(answered) => Ok(self.respond(answered, observer, upgrade, client_upgrade, admitted)),
            Err(why) => Ok(self.proxy_answer(why, observer)),
        }
    }

    /// The endpoint's answer, passed on: counted on the client's side and,
    /// for a pod here, on its own (the inbound stage's count); an upgrade
    /// becomes a byte stream; the connection goes back to the pool.
    fn respond(
        &self,
        answered: Answered,
        mut observer: Observer,
        upgrade: bool,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        admitted: RequestTicket,
    ) -> Response<Body> {
        let Answered {
            mut resp,
            conn,
            key,
            endpoint,
            work,
        } = answered;
        let metric = self.outbound.http_metrics.request(
            &self.source,
            &conn.dst,
            conn.tls,
            observer.protocol,
        );
        if let Some(m) = &metric {
            m.latency(observer.started.elapsed());
        }
        let status = resp.status();
        let grpc = grpc_status(resp.headers());
        // A pod served here, reached through the proxy once: its side.
        let server = conn.local().map(|dst| {
            self.outbound.inbound.local_request(
                &self.pod,
                dst,
                observer.protocol,
                observer.started,
                observer.tapped.as_ref(),
                (status.as_u16(), grpc),
            )
        });
        if let Some(t) = &mut observer.tapped {
            t.response(status.as_u16(), grpc);
        }
        let switched = switched(upgrade, status, &client_upgrade);
        if switched {
            if let Some(client) = client_upgrade {
                // To a pod here: its policy decides again on every change,
                // as for any relay into it.
                let registered = conn.local().and_then(|dst| {
                    self.outbound
                        .inbound
                        .recheck_local(&self.pod, dst, endpoint)
                        .map(|r| r.register())
                });
                spawn_splice(client, hyper::upgrade::on(&mut resp), registered);
            }
        } else if !upgrade {
            self.outbound.pool.put(key, conn);
        }
        if !self.h2 {
            strip_hop_by_hop(resp.headers_mut(), switched);
        }
        resp.map(|body| {
            Observed {
                inner: body,
                done: Some(Done {
                    metric,
                    server,
                    status: status.as_u16(),
                    grpc_status: grpc,
                    work,
                    tap: observer.tapped,
                    admitted: Some(admitted),
                }),
                bytes: 0,
            }
            .boxed()
        })
    }

    /// The proxy's own answer when no endpoint answered: 503 with none to
    /// try, 403 when the last one's policy refused, else 502.
    fn proxy_answer(&self, why: Option<AttemptError>, observer: Observer) -> Response<Body> {
        let (status, message) = match &why {
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no endpoint available".to_owned(),
            ),
            Some(e) => (e.status(), e.to_string()),
        };
        warn!(%status, %message, "answering the request with a proxy error");
        let tls = matches!(why, Some(AttemptError::Upstream { tls: true, .. }));
        let dst = match (&why, &self.dest) {
            (Some(AttemptError::Upstream { endpoint, .. }), _) => self.destination(*endpoint),
            (_, Dest::Service(vip)) => Destination {
                service: self.destination(*vip).service,
                ..Destination::default()
            },
            (_, Dest::Single(addr)) => self.destination(*addr),
        };
        let metric = self
            .outbound
            .http_metrics
            .request(&self.source, &dst, tls, observer.protocol);
        observer.refused(status, metric);
        proxy_error(status, &message)
    }
}
