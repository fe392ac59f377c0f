//! The tunnel's server end: accept, check the first bytes are TLS, the
//! mutual-TLS handshake, the client's SPIFFE ID, then HTTP/2; each
//! `CONNECT <addr>` stream goes to the [`Destinations`] (the inbound
//! proxy), which decides, connects and relays. On shutdown: GOAWAY, and
//! open streams finish within the grace period.
use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use nodemesh_core::listen::Guard;
use nodemesh_core::{identity::Identity, labels::Direction, throttle::Throttle};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{TunnelConfig, TunnelError, TunnelMetrics, h2, tls};
use crate::{
    identity::CertStore,
    proxy::{
        accept::{Drain, accept_loop},
        relay::TunnelStream,
    },
};

/// Opens the tunnel's listeners (and the tap port's: the same rules). An
/// unspecified IPv6 address (`[::]`) takes IPv4 too; on a node without IPv6
/// it falls back to `0.0.0.0`.
pub fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let listener = match bind_one(addr) {
            Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && no_ipv6(&e) => {
                let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
                info!(%addr, error = %e, fallback = %v4, "no IPv6 on this node; listening on IPv4 only");
                bind_one(v4).map_err(|e| (v4, e))?
            }
            other => other.map_err(|e| (addr, e))?,
        };
        listeners.push(listener);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    if addr.is_ipv6() {
        // `[::]` is both families; a given IPv6 address is only itself.
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// The error of an IPv6 socket on a node with IPv6 off.
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

/// The header a tunnel client names its app's address in (RFC 7239).
pub const FORWARDED: &str = "forwarded";

/// `forwarded: for="10.1.0.2:41000"` (or `for="[fd00::2]:41000"`).
fn forwarded_for(headers: &hyper::HeaderMap) -> Option<SocketAddr> {
    let value = headers.get(FORWARDED)?.to_str().ok()?;
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}

/// What the `connect_request` fuzz target (`tests/fuzz`) feeds any bytes
/// to: a CONNECT's authority, and the `forwarded` header, read as
/// [`TunnelServer`] reads them.
#[cfg(any(test, fuzzing))]
pub mod fuzzing {
    pub fn request(authority: &[u8], forwarded: &[u8]) {
        if let Ok(uri) = hyper::Uri::try_from(authority) {
            let _ = uri
                .authority()
                .and_then(|a| a.as_str().parse::<std::net::SocketAddr>().ok());
        }
        if let Ok(v) = hyper::header::HeaderValue::from_bytes(forwarded) {
            let mut headers = hyper::HeaderMap::new();
            headers.insert(super::FORWARDED, v);
            let _ = super::forwarded_for(&headers);
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn requests_seen_by_the_fuzzer_parse_without_panic() {
            for (a, f) in [
                (&b"10.0.0.1:80"[..], &b"for=\"[::1]:1\""[..]),
                (b"[fe80::1%eth0]:80", b"for=;for=\"\";"),
                (b"", b"\xff"),
                (b":", b"for=1.2.3.4:99999"),
            ] {
                super::request(a, f);
            }
        }
    }
}

/// One CONNECT stream, as the server authenticated it.
#[derive(Clone, Debug)]
pub struct StreamRequest {
    /// The client's SPIFFE ID (from its certificate).
    pub client: Arc<str>,
    /// The identity the client asked for (SNI), whose certificate this
    /// server presented.
    pub served: Option<Identity>,
    /// Where the stream goes.
    pub dst: SocketAddr,
    /// The client pod's address, as its agent says (`forwarded: for=`);
    /// inbound checks it belongs to the authenticated identity.
    pub client_addr: Option<SocketAddr>,
    /// The tunnel connection's other end (the client's node).
    pub peer: SocketAddr,
}

/// What carries an accepted stream's bytes once the client has its answer.
pub type Delivery = Box<dyn FnOnce(TunnelStream) -> BoxFuture<'static, ()> + Send>;

/// Where the tunnel's streams go (the inbound proxy).
pub trait Destinations: Send + Sync + 'static {
    /// Whether `client` may use the tunnel at all; `Err` says why not.
    fn admit(&self, client: &str) -> Result<(), String>;

    /// Opens a stream's destination. `Err` is why it cannot be served:
    /// `UnknownDestination` (404) or `Connect` (502); the client resets
    /// its app's connection either way.
    fn open(
        self: Arc<Self>,
        req: StreamRequest,
    ) -> BoxFuture<'static, Result<Delivery, TunnelError>>;
}

/// The node's tunnel endpoint.
pub struct TunnelServer {
    cfg: TunnelConfig,
    store: Arc<CertStore>,
    metrics: TunnelMetrics,
    tls: Arc<rustls::ServerConfig>,
    destinations: Arc<dyn Destinations>,
    drain: Drain,
    /// Refusals anyone can cause are logged once per reason a minute.
    logs: Throttle,
    /// Connections per source, and handshake slots.
    guard: Guard,
}

/// How often a refusal of each reason is logged (the rest counted).
const REFUSAL_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl TunnelServer {
    pub fn new(
        cfg: TunnelConfig,
        store: Arc<CertStore>,
        metrics: TunnelMetrics,
        destinations: Arc<dyn Destinations>,
        drain: Drain,
        guard: Guard,
    ) -> Result<Self, rustls::Error> {
        let tls = tls::server_config(&store)?;
        Ok(Self {
            cfg,
            store,
            metrics,
            tls: Arc::new(tls),
            destinations,
            drain,
            logs: Throttle::new(REFUSAL_LOG_WINDOW),
            guard,
        })
    }

    /// Serves `listener` until `stop`; connections and streams in flight
    /// carry on (they are on the drain).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "tunnel listening");
        }
        accept_loop(&listener, None, &stop, "tunnel", |tcp, peer, _| {
            let Some(slot) = self.guard.connection(peer.ip()) else {
                debug!(%peer, "tunnel: over its connection caps; closed");
                return;
            };
            let this = self.clone();
            let stop = stop.clone();
            self.drain.spawn(
                async move {
                    this.connection(tcp, stop).await;
                    drop(slot);
                }
                .instrument(info_span!("tunnel_inbound", %peer)),
            );
        })
        .await;
    }

    fn refuse(&self, reason: TunnelError) {
        self.metrics.error(Direction::Inbound, reason);
    }

    /// Counts a refusal and logs it, at most once per reason in a window
    /// (with how many were not logged since).
    fn refuse_logged(
        &self,
        reason: TunnelError,
        what: &str,
        error: Option<&dyn std::fmt::Display>,
    ) {
        self.refuse(reason);
        if let Some(held) = self.logs.allow(reason.as_str()) {
            match error {
                Some(e) => {
                    warn!(%reason, error = %e, not_logged = held, "refused a tunnel connection: {what}")
                }
                None => warn!(%reason, not_logged = held, "refused a tunnel connection: {what}"),
            }
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, stop: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        let Ok(peer) = tcp.peer_addr() else {
            return;
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // A handshake slot, until the handshake is done: a newer one
        // evicts the oldest (of this source first).
        let slot = self.guard.handshake(peer.ip());
        let handshaken = tokio::select! {
            h = async {
                if !self.starts_with_tls(&tcp).await {
                    return None;
                }
                self.handshake(tcp).await
            } => h,
            () = slot.evicted() => {
                debug!(%peer, "tunnel handshake evicted by a newer one");
                None
            }
        };
        drop(slot);
        let Some((tls, client)) = handshaken else {
            return;
        };
        let (_, session) = tls.get_ref();
        let served = session
            .server_name()
            .and_then(|n| Identity::parse_dns_name(n, self.store.trust_domain()));
        self.metrics.connection(Direction::Inbound);
        debug!(%client, "tunnel connection accepted");
        let this = self.clone();
        let client: Arc<str> = client.into();
        let service = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let client = client.clone();
            let served = served.clone();
            async move { Ok::<_, Infallible>(this.stream(req, client, served, peer).await) }
        });
        // No new streams past the client certificate's expiry, nor past
        // the connection's age cap: it must come back with a fresh one.
        let retire_at = tls::retire_at(session.peer_certificates(), self.cfg.max_connection_age);
        let builder = h2::server();
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = tokio::time::sleep_until(retire_at.into()) => {
                debug!("tunnel connection retired (its client certificate expires, or it is old): GOAWAY");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = stop.cancelled() => {
                // GOAWAY: no new streams; the open ones finish.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "tunnel connection ended with an error");
        }
    }

    /// Whether the connection starts with a TLS handshake record (0x16)
    /// within the handshake timeout; anything else is refused (and logged).
    async fn starts_with_tls(&self, tcp: &TcpStream) -> bool {
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.cfg.handshake_timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 0x16 => true,
            Ok(Ok(0)) => false,
            Ok(Ok(_)) => {
                self.refuse_logged(TunnelError::NotTls, "not TLS (plaintext or garbage)", None);
                false
            }
            Ok(Err(e)) => {
                debug!(error = %e, "tunnel connection failed before the handshake");
                false
            }
            Err(_) => {
                self.refuse_logged(
                    TunnelError::Handshake,
                    "no handshake within the timeout",
                    None,
                );
                false
            }
        }
    }

    /// The TLS handshake, within the handshake timeout, and the client it
    /// proved: one of this node's identities asked for, a SPIFFE ID its
    /// destinations admit. `None` (refused and logged) otherwise.
    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, String)> {
        // The name asked for is read first, and the handshake goes on the
        // same way whether this node holds it or not (see `SniResolver`):
        // an unknown one is refused after it, never answered differently.
        let deadline = tokio::time::Instant::now() + self.cfg.handshake_timeout;
        let hello = tokio::time::timeout_at(
            deadline,
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp),
        )
        .await;
        let start = match hello {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => {
                let reason = tls::classify(&e);
                return self.refused(reason, "TLS handshake failed", Some(&e));
            }
            Err(_) => return self.refused(TunnelError::Handshake, "TLS handshake timed out", None),
        };
        let known = tls::serves_name(&self.store, start.client_hello().server_name());
        let unknown = "no certificate here for the identity the client asked for";
        let tls = match tokio::time::timeout_at(deadline, start.into_stream(self.tls.clone())).await
        {
            Ok(Ok(tls)) => tls,
            // A name this node does not hold: that first, whatever failed
            // after it (a client checking our certificate against it does).
            Ok(Err(e)) if !known => {
                return self.refused(TunnelError::UnknownServerName, unknown, Some(&e));
            }
            Ok(Err(e)) => {
                let reason = tls::classify(&e);
                return self.refused(reason, "TLS handshake failed", Some(&e));
            }
            Err(_) => return self.refused(TunnelError::Handshake, "TLS handshake timed out", None),
        };
        let (_, session) = tls.get_ref();
        self.metrics
            .tls
            .handshake(crate::telemetry::TlsEndpoint::TunnelInbound, session);
        if !known {
            return self.refused(TunnelError::UnknownServerName, unknown, None);
        }
        let Some(client) = tls::peer_spiffe(session.peer_certificates()) else {
            let why = "the client certificate holds no SPIFFE ID";
            return self.refused(TunnelError::WrongIdentity, why, None);
        };
        if let Err(why) = self.destinations.admit(&client) {
            let why = format!("{client}: {why}");
            return self.refused(TunnelError::PolicyDenied, &why, None);
        }
        Some((tls, client))
    }

    /// [`Self::refuse_logged`], as a handshake's outcome.
    fn refused<T>(&self, reason: TunnelError, why: &str, e: Option<&std::io::Error>) -> Option<T> {
        self.refuse_logged(reason, why, e.map(|e| e as &dyn std::fmt::Display));
        None
    }

    /// Answers one CONNECT; the relay runs in its own task.
    async fn stream(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: Arc<str>,
        served: Option<Identity>,
        peer: SocketAddr,
    ) -> Response<Empty<Bytes>> {
        let status = |code| {
            let mut r = Response::new(Empty::new());
            *r.status_mut() = code;
            r
        };
        let dst: Option<SocketAddr> = (req.method() == Method::CONNECT)
            .then(|| req.uri().authority()?.as_str().parse().ok())
            .flatten();
        let Some(dst) = dst else {
            warn!(%client, method = %req.method(), uri = %req.uri(), reason = %TunnelError::BadRequest, "refused a tunnel stream: not a CONNECT to an address");
            self.refuse(TunnelError::BadRequest);
            return status(StatusCode::BAD_REQUEST);
        };
        let client_addr = forwarded_for(req.headers());
        let open = self.destinations.clone().open(StreamRequest {
            client: client.clone(),
            served,
            dst,
            client_addr,
            peer,
        });
        // The destination is connected before the answer: a refused one
        // becomes an error status, which the client turns into a reset.
        let opened = open.await;
        if !matches!(opened, Err(TunnelError::UnknownDestination)) {
            // A stream for a pod here, whether or not the pod answered.
            self.metrics.stream(Direction::Inbound);
        }
        let deliver = match opened {
            Ok(deliver) => deliver,
            Err(reason) => {
                self.refuse(reason);
                return status(match reason {
                    TunnelError::UnknownDestination => StatusCode::NOT_FOUND,
                    // The client's proxy answers an HTTP client with a 403.
                    TunnelError::PolicyDenied => StatusCode::FORBIDDEN,
                    TunnelError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_GATEWAY,
                });
            }
        };
        let upgrade = hyper::upgrade::on(req);
        let span = info_span!("tunnel_stream", %client, %dst);
        self.drain.spawn(
            async move {
                match upgrade.await {
                    Ok(upgraded) => deliver(TokioIo::new(upgraded)).await,
                    Err(e) => debug!(error = %e, "tunnel stream upgrade failed"),
                }
            }
            .instrument(span),
        );
        status(StatusCode::OK)
    }
}
