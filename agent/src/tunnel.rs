//! The mutual-TLS tunnel between nodes (HBONE-style), on each node's
//! `:15008`.
//!
//! A meshed pod's connection to a meshed pod on another node travels as an
//! HTTP/2 `CONNECT <pod-ip>:<port>` stream over one TLS 1.3 connection per
//! (source identity, destination node, destination identity), reused
//! across streams. The client presents the source pod's certificate and
//! sends the destination identity's DNS name as SNI; the server presents
//! that identity's certificate, which the client checks (chain to the trust
//! anchors, DNS SAN and SPIFFE URI SAN). The server checks the client's
//! chain, reads its SPIFFE ID, applies the policy (meshed identities of the
//! same trust domain), connects to the local pod and relays.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, client::conn::http2::SendRequest,
    service::service_fn, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::{
    ClientConfig, ServerConfig,
    client::ResolvesClientCert,
    pki_types::{CertificateDer, ServerName},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    discovery::Pod,
    identity::{Identity, pki, store::CertStore},
    metrics::{ConnectError, Direction, PodTcpMetrics, label_values},
    proxy::relay::relay,
};

/// What a node's tunnel endpoint needs to know of a local meshed pod.
#[derive(Debug)]
pub struct LocalPod {
    pub pod: Arc<Pod>,
    /// Its inbound series.
    pub inbound: PodTcpMetrics,
}

/// The node's captured pods by address (kept by the capture loop).
pub type LocalPods = Arc<RwLock<HashMap<IpAddr, Arc<LocalPod>>>>;

/// Tunnel settings.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// Where the tunnel server listens (the node's `:15008`).
    pub listen: SocketAddr,
    /// The port peers' tunnel servers listen on.
    pub port: u16,
    pub connect_timeout: Duration,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A pooled connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    pub buffer_size: usize,
}

label_values! {
    /// Why the tunnel refused or failed a connection or stream.
    pub enum TunnelError {
        /// Not TLS at all: plaintext or garbage.
        NotTls => "not_tls",
        /// The peer's certificate has expired.
        ExpiredCertificate => "expired_certificate",
        /// The peer's certificate does not chain to the trust anchors.
        UntrustedCertificate => "untrusted_certificate",
        /// The client presented no certificate.
        NoClientCertificate => "no_client_certificate",
        /// The certificate names no usable identity, or not the expected one.
        WrongIdentity => "wrong_identity",
        /// The client asked for an identity this node holds no certificate for.
        UnknownServerName => "unknown_server_name",
        /// Any other handshake failure, or a handshake timeout.
        Handshake => "handshake",
        /// The policy refused the client's identity.
        PolicyDenied => "policy_denied",
        /// Not an HTTP/2 CONNECT to an address.
        BadRequest => "bad_request",
        /// The destination is not a meshed pod on this node.
        UnknownDestination => "unknown_destination",
        /// The destination pod (server side) or the peer node (client side)
        /// could not be reached.
        Connect => "connect",
        /// The source identity has no certificate (yet).
        NoCertificate => "no_certificate",
        /// HTTP/2 failed.
        Protocol => "protocol",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    direction: Direction,
    reason: TunnelError,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    direction: Direction,
}

/// The tunnel's own families.
#[derive(Clone, Debug)]
pub struct TunnelMetrics {
    connections: Family<DirLabels, Counter>,
    streams: Family<DirLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

impl TunnelMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            connections: Family::default(),
            streams: Family::default(),
            errors: Family::default(),
        };
        registry.register(
            "tunnel_connections",
            "Mutual-TLS connections between nodes established, by direction (outbound: this node dialled)",
            m.connections.clone(),
        );
        registry.register(
            "tunnel_streams",
            "CONNECT streams carried by the tunnel, by direction",
            m.streams.clone(),
        );
        registry.register(
            "tunnel_errors",
            "Tunnel connections or streams refused or failed, by direction and reason",
            m.errors.clone(),
        );
        m
    }

    fn error(&self, direction: Direction, reason: TunnelError) {
        self.errors
            .get_or_create(&ErrorLabels { direction, reason })
            .inc();
    }
}

/// Streams at once on one tunnel connection (a client opening more waits,
/// up to its open timeout). Memory stays bounded by the connection window.
const MAX_STREAMS: u32 = 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The SPIFFE ID in a peer's leaf certificate.
fn peer_spiffe(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    pki::cert_info(certs?.first()?).ok()?.spiffe_id
}

/// Classifies a failed handshake.
fn classify(e: &std::io::Error) -> TunnelError {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => TunnelError::ExpiredCertificate,
        Some(Error::InvalidCertificate(_)) => TunnelError::UntrustedCertificate,
        Some(Error::NoCertificatesPresented) => TunnelError::NoClientCertificate,
        Some(Error::InvalidMessage(_)) => TunnelError::NotTls,
        Some(Error::AlertReceived(rustls::AlertDescription::BadCertificate))
        | Some(Error::AlertReceived(rustls::AlertDescription::UnknownCA)) => {
            TunnelError::UntrustedCertificate
        }
        Some(Error::AlertReceived(rustls::AlertDescription::CertificateExpired)) => {
            TunnelError::ExpiredCertificate
        }
        _ => TunnelError::Handshake,
    }
}

// ---------------------------------------------------------------- server

/// Picks the certificate of the identity named in SNI.
#[derive(Debug)]
struct SniResolver {
    store: Arc<CertStore>,
    metrics: TunnelMetrics,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name();
        let key = name
            .and_then(|n| Identity::parse_dns_name(n, self.store.trust_domain()))
            .and_then(|id| self.store.current(&id))
            .map(|c| c.key);
        if key.is_none() {
            warn!(sni = ?name, reason = %TunnelError::UnknownServerName, "refused a tunnel connection: no certificate here for the identity the client asked for");
            self.metrics
                .error(Direction::Inbound, TunnelError::UnknownServerName);
        }
        key
    }
}

/// The node's tunnel endpoint.
pub struct TunnelServer {
    cfg: TunnelConfig,
    store: Arc<CertStore>,
    local: LocalPods,
    metrics: TunnelMetrics,
    acceptor: TlsAcceptor,
    tracker: TaskTracker,
}

impl TunnelServer {
    pub fn new(
        cfg: TunnelConfig,
        store: Arc<CertStore>,
        local: LocalPods,
        metrics: TunnelMetrics,
    ) -> Result<Self, rustls::Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(store.roots(), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut tls = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SniResolver {
                store: store.clone(),
                metrics: metrics.clone(),
            }));
        tls.alpn_protocols = vec![b"h2".to_vec()];
        // Every connection is a full handshake: a resumed session would
        // skip checking the client's certificate (expiry, renewal).
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        Ok(Self {
            cfg,
            store,
            local,
            metrics,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            tracker: TaskTracker::new(),
        })
    }

    /// Binds the listener (so a taken port fails the agent's start).
    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        TcpListener::bind(self.cfg.listen).await
    }

    /// Serves until `stop`; streams in flight carry on.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        info!(addr = %self.cfg.listen, "tunnel listening");
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "tunnel accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let this = self.clone();
            let stop = stop.clone();
            self.tracker.spawn(
                async move { this.connection(tcp, stop).await }
                    .instrument(info_span!("tunnel_inbound", %peer)),
            );
        }
    }

    /// Waits for open tunnel streams, up to `grace`.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            return self.tracker.len();
        }
        0
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, stop: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        // A TLS connection starts with a handshake record (0x16).
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.cfg.handshake_timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 0x16 => {}
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {
                warn!(reason = %TunnelError::NotTls, "refused a connection to the tunnel port: not TLS (plaintext or garbage)");
                self.metrics.error(Direction::Inbound, TunnelError::NotTls);
                return;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "tunnel connection failed before the handshake");
                return;
            }
            Err(_) => {
                warn!(reason = %TunnelError::Handshake, "refused a connection to the tunnel port: no handshake within the timeout");
                self.metrics
                    .error(Direction::Inbound, TunnelError::Handshake);
                return;
            }
        }
        let tls = match tokio::time::timeout(self.cfg.handshake_timeout, self.acceptor.accept(tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = classify(&e);
                if matches!(
                    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
                    Some(rustls::Error::General(_))
                ) {
                    // No certificate for the SNI: counted by the resolver.
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                warn!(%reason, error = %e, "refused a tunnel connection: TLS handshake failed");
                self.metrics.error(Direction::Inbound, reason);
                return;
            }
            Err(_) => {
                warn!(reason = %TunnelError::Handshake, "refused a tunnel connection: TLS handshake timed out");
                self.metrics
                    .error(Direction::Inbound, TunnelError::Handshake);
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let sni = session.server_name().map(str::to_owned);
        let Some(client_id) = peer_spiffe(session.peer_certificates()) else {
            warn!(reason = %TunnelError::WrongIdentity, "refused a tunnel connection: the client certificate holds no SPIFFE ID");
            self.metrics
                .error(Direction::Inbound, TunnelError::WrongIdentity);
            return;
        };
        // Policy: meshed identities from this trust domain.
        match Identity::parse_spiffe(&client_id) {
            Ok((td, _)) if td == self.store.trust_domain() => {}
            _ => {
                warn!(client = %client_id, reason = %TunnelError::PolicyDenied, "refused a tunnel connection: the client is not an identity of this trust domain");
                self.metrics
                    .error(Direction::Inbound, TunnelError::PolicyDenied);
                return;
            }
        }
        let served = sni
            .as_deref()
            .and_then(|n| Identity::parse_dns_name(n, self.store.trust_domain()));
        self.metrics
            .connections
            .get_or_create(&DirLabels {
                direction: Direction::Inbound,
            })
            .inc();
        debug!(client = %client_id, "tunnel connection accepted");
        let this = self.clone();
        let client_id: Arc<str> = client_id.into();
        let service = service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let client_id = client_id.clone();
            let served = served.clone();
            async move { Ok::<_, Infallible>(this.stream(req, client_id, served).await) }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(256 * 1024)
            .max_concurrent_streams(MAX_STREAMS)
            .keep_alive_interval(Duration::from_secs(30));
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
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

    /// Answers one CONNECT; the relay runs in its own task.
    async fn stream(
        self: Arc<Self>,
        req: Request<Incoming>,
        client_id: Arc<str>,
        served: Option<Identity>,
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
            warn!(client = %client_id, method = %req.method(), uri = %req.uri(), reason = %TunnelError::BadRequest, "refused a tunnel stream: not a CONNECT to an address");
            self.metrics
                .error(Direction::Inbound, TunnelError::BadRequest);
            return status(StatusCode::BAD_REQUEST);
        };
        let local = self
            .local
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dst.ip())
            .cloned();
        // The destination must be a meshed pod here, and the one whose
        // identity the client authenticated.
        let Some(local) = local.filter(|l| {
            served.as_ref().is_some_and(|id| {
                id.namespace == l.pod.namespace && id.service_account == l.pod.service_account
            })
        }) else {
            warn!(client = %client_id, %dst, reason = %TunnelError::UnknownDestination, "refused a tunnel stream: the destination is not a meshed pod of the authenticated identity on this node");
            self.metrics
                .error(Direction::Inbound, TunnelError::UnknownDestination);
            return status(StatusCode::NOT_FOUND);
        };
        self.metrics
            .streams
            .get_or_create(&DirLabels {
                direction: Direction::Inbound,
            })
            .inc();
        // Connect first, then answer: a refused destination becomes an
        // error status, which the client turns into a reset.
        let server = match connect(dst, self.cfg.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                let reason = ConnectError::classify(&e);
                warn!(client = %client_id, %dst, %reason, error = %e, "cannot connect to the destination pod; the client gets a reset");
                local.inbound.connect_error(reason);
                self.metrics.error(Direction::Inbound, TunnelError::Connect);
                return status(StatusCode::BAD_GATEWAY);
            }
        };
        let open = local.inbound.open();
        local.inbound.peer_open(true, Some(&client_id));
        let upgrade = hyper::upgrade::on(req);
        let buffer_size = self.cfg.buffer_size;
        let span = info_span!("tunnel_stream", client = %client_id, %dst, pod = %local.pod.key());
        self.tracker.spawn(
            async move {
                let _open = open;
                let mut server = server;
                match upgrade.await {
                    Ok(upgraded) => {
                        let mut client = TokioIo::new(upgraded);
                        match relay(
                            &mut client,
                            &mut server,
                            buffer_size,
                            &[&local.inbound.received],
                            &[&local.inbound.sent],
                        )
                        .await
                        {
                            Ok(n) => debug!(received = n.client_to_server, sent = n.server_to_client, "closed"),
                            Err(e) => debug!(error = %e, "tunnel relay ended with an error; both sides reset"),
                        }
                    }
                    Err(e) => debug!(error = %e, "tunnel stream upgrade failed"),
                }
            }
            .instrument(span),
        );
        status(StatusCode::OK)
    }
}

/// A TCP connection from the agent's own netns.
async fn connect(dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

// ---------------------------------------------------------------- client

/// Presents one identity's current certificate.
#[derive(Debug)]
struct SourceCert {
    store: Arc<CertStore>,
    id: Identity,
}

impl ResolvesClientCert for SourceCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.current(&self.id).map(|c| c.key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    node: SocketAddr,
    dst: Identity,
}

struct Pooled {
    send: SendRequest<Empty<Bytes>>,
    /// The source certificate generation it was made with: a renewed
    /// certificate gets a new connection for new streams.
    generation: u64,
    last_used: Instant,
}

/// Why an outbound tunnel stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no certificate for {0} yet")]
    NoCertificate(Identity),
    #[error("cannot reach the peer node's tunnel at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the peer at {addr} is {got:?}, not {expected}")]
    WrongIdentity {
        addr: SocketAddr,
        expected: String,
        got: Option<String>,
    },
    #[error("HTTP/2 with {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the peer node answered {status} for {dst}")]
    Refused { dst: SocketAddr, status: StatusCode },
    #[error("no tunnel stream within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Name(String),
}

impl OpenError {
    fn reason(&self) -> TunnelError {
        match self {
            Self::NoCertificate(_) => TunnelError::NoCertificate,
            Self::Connect { .. } | Self::Refused { .. } | Self::Timeout(_) => TunnelError::Connect,
            Self::Tls { source, .. } => classify(source),
            Self::WrongIdentity { .. } => TunnelError::WrongIdentity,
            Self::Http { .. } | Self::Name(_) => TunnelError::Protocol,
        }
    }
}

/// Opens tunnel streams, pooling connections.
pub struct TunnelClient {
    cfg: TunnelConfig,
    store: Arc<CertStore>,
    metrics: TunnelMetrics,
    pool: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<Option<Pooled>>>>>,
    configs: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

impl TunnelClient {
    pub fn new(cfg: TunnelConfig, store: Arc<CertStore>, metrics: TunnelMetrics) -> Self {
        Self {
            cfg,
            store,
            metrics,
            pool: Mutex::default(),
            configs: Mutex::default(),
        }
    }

    pub fn port(&self) -> u16 {
        self.cfg.port
    }

    pub fn trust_domain(&self) -> &str {
        self.store.trust_domain()
    }

    /// Opens a stream to `dst` (a pod of `dst_id` on the node at
    /// `node_ip`) as `src`.
    pub async fn open(
        &self,
        src: &Identity,
        node_ip: IpAddr,
        dst_id: &Identity,
        dst: SocketAddr,
    ) -> Result<TokioIo<Upgraded>, OpenError> {
        let limit = self.cfg.connect_timeout + self.cfg.handshake_timeout;
        let result =
            match tokio::time::timeout(limit, self.open_inner(src, node_ip, dst_id, dst)).await {
                Ok(r) => r,
                Err(_) => Err(OpenError::Timeout(limit)),
            };
        match &result {
            Ok(_) => {
                self.metrics
                    .streams
                    .get_or_create(&DirLabels {
                        direction: Direction::Outbound,
                    })
                    .inc();
            }
            Err(e) => self.metrics.error(Direction::Outbound, e.reason()),
        }
        result
    }

    async fn open_inner(
        &self,
        src: &Identity,
        node_ip: IpAddr,
        dst_id: &Identity,
        dst: SocketAddr,
    ) -> Result<TokioIo<Upgraded>, OpenError> {
        let current = self
            .store
            .wait(src, self.cfg.connect_timeout)
            .await
            .ok_or_else(|| OpenError::NoCertificate(src.clone()))?;
        let key = PoolKey {
            src: src.clone(),
            node: SocketAddr::new(node_ip, self.cfg.port),
            dst: dst_id.clone(),
        };
        let entry = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // One connect per key at a time; the others wait and reuse it.
        let mut send = {
            let mut pooled = entry.lock().await;
            let reusable = pooled
                .as_ref()
                .is_some_and(|p| !p.send.is_closed() && p.generation == current.generation);
            if !reusable {
                *pooled = Some(Pooled {
                    send: self.dial(&key, &current).await?,
                    generation: current.generation,
                    last_used: Instant::now(),
                });
            }
            let Some(p) = pooled.as_mut() else {
                return Err(OpenError::Name("pool entry vanished".into()));
            };
            p.last_used = Instant::now();
            p.send.clone()
        };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| OpenError::Name(e.to_string()))?;
        if let Err(e) = send.ready().await {
            return Err(OpenError::Http {
                addr: key.node,
                source: e,
            });
        }
        let resp = send
            .send_request(req)
            .await
            .map_err(|source| OpenError::Http {
                addr: key.node,
                source,
            })?;
        if resp.status() != StatusCode::OK {
            return Err(OpenError::Refused {
                dst,
                status: resp.status(),
            });
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|source| OpenError::Http {
                addr: key.node,
                source,
            })?;
        Ok(TokioIo::new(upgraded))
    }

    fn client_config(&self, src: &Identity) -> Result<Arc<ClientConfig>, OpenError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(src) {
            return Ok(c.clone());
        }
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| OpenError::Name(e.to_string()))?
            .with_root_certificates(self.store.roots())
            .with_client_cert_resolver(Arc::new(SourceCert {
                store: self.store.clone(),
                id: src.clone(),
            }));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // Full handshakes only: a renewed certificate must really be used.
        cfg.resumption = rustls::client::Resumption::disabled();
        let cfg = Arc::new(cfg);
        configs.insert(src.clone(), cfg.clone());
        Ok(cfg)
    }

    /// A new mutual-TLS HTTP/2 connection for `key`.
    async fn dial(
        &self,
        key: &PoolKey,
        current: &crate::identity::store::Current,
    ) -> Result<SendRequest<Empty<Bytes>>, OpenError> {
        let td = self.store.trust_domain();
        let name = key
            .dst
            .dns_name(td)
            .map_err(|e| OpenError::Name(e.to_string()))?;
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| OpenError::Name(e.to_string()))?;
        let tcp = connect(key.node, self.cfg.connect_timeout)
            .await
            .map_err(|source| OpenError::Connect {
                addr: key.node,
                source,
            })?;
        let connector = TlsConnector::from(self.client_config(&key.src)?);
        let tls = tokio::time::timeout(
            self.cfg.handshake_timeout,
            connector.connect(server_name, tcp),
        )
        .await
        .map_err(|_| OpenError::Tls {
            addr: key.node,
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| OpenError::Tls {
            addr: key.node,
            source,
        })?;
        let expected = key.dst.spiffe_id(td);
        let got = peer_spiffe(tls.get_ref().1.peer_certificates());
        if got.as_deref() != Some(expected.as_str()) {
            return Err(OpenError::WrongIdentity {
                addr: key.node,
                expected,
                got,
            });
        }
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(256 * 1024)
            .keep_alive_interval(Duration::from_secs(30));
        let (send, conn) = builder
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| OpenError::Http {
                addr: key.node,
                source,
            })?;
        let node = key.node;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%node, error = %e, "tunnel connection ended with an error");
            }
        });
        self.metrics
            .connections
            .get_or_create(&DirLabels {
                direction: Direction::Outbound,
            })
            .inc();
        info!(src = %key.src.spiffe_id(td), dst = %expected, %node, generation = current.generation, "tunnel connection established");
        Ok(send)
    }

    /// Closes pooled connections idle for longer than the idle timeout
    /// (streams still open on them carry on), every few seconds until
    /// `stop`.
    pub async fn evict_idle(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.cfg.idle_timeout / 4).max(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
            // TLS settings of identities the node no longer holds.
            self.configs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|id, _| self.store.current(id).is_some());
            let entries: Vec<(PoolKey, Arc<tokio::sync::Mutex<Option<Pooled>>>)> = self
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (key, entry) in entries {
                let Ok(mut pooled) = entry.try_lock() else {
                    continue;
                };
                let idle = pooled.as_ref().is_none_or(|p| {
                    p.send.is_closed() || p.last_used.elapsed() >= self.cfg.idle_timeout
                });
                if idle {
                    *pooled = None;
                    drop(pooled);
                    self.pool
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                    debug!(node = %key.node, "idle tunnel connection closed");
                }
            }
        }
    }
}
