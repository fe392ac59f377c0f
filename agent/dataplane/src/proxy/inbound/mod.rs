//! Inbound: where connections to this node's meshed pods arrive through
//! the proxy — streams of the tunnel from other nodes, and connections
//! from meshed pods on this node — with the inbound policy and the
//! server-side accounting.
//!
//! Every connection delivered to the app is detected like an outbound one
//! (the app is dialled at once, so a server-first protocol never waits):
//! HTTP is served at the server's edge ([`http`]: inbound request
//! metrics), the rest relayed as bytes. Tunnel clients must be identities
//! of this trust domain, and a stream may only reach a meshed pod on this
//! node of the identity the client asked for (and whose certificate it
//! verified); then the pod's policy decides ([`policy`]).
mod detect;
pub mod http;
mod live;
pub mod node;
pub mod policy;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use nodemesh_core::labels::Direction;
use nodemesh_core::{identity::Identity, names::InboundPolicy, policy::PolicyClient};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

pub use self::live::Recheck;
use self::{
    detect::{detect, first_bytes},
    http::{Peer, Rewind},
    live::{OpenConnection, Registered},
    policy::{Client, Facts},
};
use super::{
    connect::Connector,
    detect::Detected,
    orig_dst::ClientAddrs,
    pods::{ServedPod, ServedPods},
    relay::{Reset, TunnelStream, relay, reset_if_we_die},
    tunnel::{Destinations, TunnelError, server::Delivery, server::StreamRequest},
};
use crate::{
    state::{ConfiguredProtocol, Pod, StateStore, Target},
    telemetry::{ConnectError, InboundDenial, OpenGuard, PodTcpMetrics},
};

/// The inbound side of the node's proxy.
pub struct Inbound {
    state: StateStore,
    pods: ServedPods,
    connector: Arc<dyn Connector>,
    buffer_size: usize,
    trust_domain: String,
    cfg: InboundConfig,
    clients: Option<Arc<dyn ClientAddrs>>,
    /// When each (client, reason) refusal was last logged.
    denials_logged: Mutex<HashMap<(IpAddr, InboundDenial), Instant>>,
    /// Connections relayed as bytes now.
    open: Mutex<HashMap<u64, OpenConnection>>,
    next_open: std::sync::atomic::AtomicU64,
    /// Who the node is, for its probes.
    node: node::NodeOrigin,
}

/// Inbound settings.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// Who may connect to a pod whose annotations (and namespace's) say
    /// nothing.
    pub default_policy: InboundPolicy,
    /// What every connection must pass too, whatever the annotations and
    /// `AuthorizationPolicy` objects say (`--min-inbound-policy`).
    pub floor: InboundPolicy,
    pub connect_timeout: Duration,
    /// How long a connection may stay silent both ways before it is taken
    /// as opaque (set by the proxy: the outbound side's).
    pub detect_timeout: Duration,
    /// The cgroup root kubelet's pod cgroups are below: a process in a
    /// host-network pod's is that pod, never the node its probes come from.
    pub cgroup_root: Option<std::path::PathBuf>,
}

/// A connection the destination's inbound policy refused (inside an
/// `io::Error`, so callers can tell it from a failure to connect).
#[derive(Debug, thiserror::Error)]
#[error("refused by the destination's inbound policy ({0})")]
pub struct PolicyRefused(pub InboundDenial);

/// Whether `e` is a [`PolicyRefused`].
pub fn is_policy_refusal(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<PolicyRefused>())
}

/// How long a tunnel stream waits for its client pod's address to be
/// known here (see `claimed_client`).
const CLAIM_WAIT: Duration = Duration::from_secs(2);

/// A refusal is logged once per client and reason in this window.
const DENIAL_LOG_WINDOW: Duration = Duration::from_secs(60);
/// At most this many (client, reason) pairs are remembered for that.
const DENIAL_LOG_ENTRIES: usize = 4096;

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

/// A connection to a served pod, opened, with its accounting running.
pub struct Accepted {
    pub stream: TcpStream,
    pub accounting: Accounting,
    /// The client's address as delivered to the app.
    pub client: SocketAddr,
}

/// The destination's side of a connection's accounting: counted open until
/// dropped.
pub struct Accounting {
    pod: Option<Arc<ServedPod>>,
    _open: Option<OpenGuard>,
}

impl Accounting {
    fn new(pod: Option<Arc<ServedPod>>) -> Self {
        let open = pod
            .as_ref()
            .and_then(|p| p.inbound.as_ref())
            .map(|i| i.open());
        Self { pod, _open: open }
    }

    /// The destination pod, when it is served here.
    pub fn served(&self) -> Option<&Arc<ServedPod>> {
        self.pod.as_ref()
    }

    /// The destination pod's inbound series, when it has them.
    pub fn inbound(&self) -> Option<&PodTcpMetrics> {
        self.pod.as_ref()?.inbound.as_ref()
    }
}

impl Inbound {
    pub fn new(
        state: StateStore,
        pods: ServedPods,
        connector: Arc<dyn Connector>,
        buffer_size: usize,
        cfg: InboundConfig,
        clients: Option<Arc<dyn ClientAddrs>>,
    ) -> Self {
        let trust_domain = state.trust_domain();
        let node = node::NodeOrigin::new(cfg.cgroup_root.clone());
        Self {
            state,
            pods,
            connector,
            buffer_size,
            trust_domain,
            cfg,
            clients,
            denials_logged: Mutex::default(),
            open: Mutex::default(),
            next_open: std::sync::atomic::AtomicU64::new(0),
            node,
        }
    }

    /// The policy that applies to `pod`.
    fn policy_for(&self, pod: &Pod) -> InboundPolicy {
        pod.inbound_policy
            .or_else(|| self.state.namespace_policy(&pod.namespace))
            .unwrap_or(self.cfg.default_policy)
    }

    /// Whether `client` may reach `served` on `port`; a refusal is counted
    /// on the pod and logged (once per client and reason in a window).
    /// `from_node`: the node itself made the connection (its probes pass
    /// on probe ports).
    fn authorize(
        &self,
        served: &ServedPod,
        client: Client<'_>,
        client_ip: IpAddr,
        port: u16,
        from_node: bool,
    ) -> Result<(), InboundDenial> {
        // As known now: annotations change live.
        let pod = self
            .state
            .pod(&served.pod.uid)
            .unwrap_or_else(|| served.pod.clone());
        let policy = self.policy_for(&pod);
        // An identity of another trust domain is no one a policy names.
        let identity = match client {
            Client::Meshed(uri) => Identity::parse_spiffe(uri)
                .ok()
                .filter(|(td, _)| *td == self.trust_domain)
                .map(|(_, id)| id),
            Client::Plain(_) => None,
        };
        let policy_client = identity
            .as_ref()
            .map_or(PolicyClient::Unauthenticated, PolicyClient::Meshed);
        let facts = Facts {
            probe: from_node && pod.probe_ports.contains(&port),
            in_cluster: matches!(policy, InboundPolicy::ClusterUnauthenticated)
                && self.state.in_cluster(client_ip),
            authorized: self.state.authorized(&pod, port, policy_client),
        };
        // The install's floor first: no annotation or policy object of a
        // namespace opens what it closes (only the kubelet's probes pass).
        let decided = policy::decide(
            self.cfg.floor,
            client,
            Facts {
                authorized: None,
                ..facts
            },
        )
        .and_then(|()| policy::decide(policy, client, facts));
        if let Err(reason) = decided {
            if let Some(inbound) = &served.inbound {
                inbound.denied(reason);
            }
            self.log_denial(&pod, client_ip, port, policy.as_str(), reason);
        }
        decided
    }

    /// Logs a refusal, once per client and reason in a window.
    fn log_denial(
        &self,
        pod: &Pod,
        client_ip: IpAddr,
        port: u16,
        policy: &str,
        reason: InboundDenial,
    ) {
        let now = Instant::now();
        let mut logged = self
            .denials_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if logged.len() >= DENIAL_LOG_ENTRIES {
            logged.retain(|_, at| now.duration_since(*at) < DENIAL_LOG_WINDOW);
        }
        let due = logged
            .get(&(client_ip, reason))
            .is_none_or(|at| now.duration_since(*at) >= DENIAL_LOG_WINDOW);
        if due && logged.len() < DENIAL_LOG_ENTRIES {
            logged.insert((client_ip, reason), now);
            warn!(pod = %pod.key(), client = %client_ip, port, policy, %reason, "inbound connection refused by policy");
        }
    }

    /// Connects to the app at `dst` in `served`'s pod as `client`: from
    /// inside the pod (its own address, so inbound capture lets it by), with
    /// eBPF told which client it carries (the app sees that address). A port
    /// of 0 in `client` takes the agent's own. Without a netns (tests): from
    /// the agent, as it is.
    async fn deliver(
        &self,
        served: &ServedPod,
        dst: SocketAddr,
        client: SocketAddr,
    ) -> io::Result<TcpStream> {
        let Some(netns) = &served.netns else {
            return self.connector.connect(None, dst).await;
        };
        let socket = netns.tcp_socket(dst)?;
        // The port is chosen at connect, by the whole 4-tuple (as any
        // client's): the agent's connections do not use up the pod's
        // ports, and SO_REUSEADDR lets the app bind a port one of them
        // holds, as it could without the mesh.
        socket.set_reuse_address(true)?;
        crate::netns::set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(dst.ip(), 0).into())?;
        let cookie = crate::netns::socket_cookie(&socket)?;
        if let Some(clients) = &self.clients {
            clients.record(cookie, client)?;
        }
        socket.set_nonblocking(true)?;
        let connected = crate::proxy::connect::connect_with_timeout(
            Ok(tokio::net::TcpSocket::from_std_stream(socket.into())),
            dst,
            self.cfg.connect_timeout,
        )
        .await;
        if connected.is_err()
            && let Some(clients) = &self.clients
        {
            clients.forget(cookie);
        }
        let stream = connected?;
        reset_if_we_die(&stream);
        Ok(stream)
    }

    /// A connection inbound capture handed over: someone dialled a served
    /// pod's address directly (plaintext: an unmeshed client, the node, or
    /// outside). The policy decides; then it goes to the app, which sees the
    /// client's address.
    pub async fn captured(self: &Arc<Self>, client: TcpStream, served: Arc<ServedPod>) {
        let _ = client.set_nodelay(true);
        reset_if_we_die(&client);
        let (Ok(dst), Ok(peer)) = (client.local_addr(), client.peer_addr()) else {
            client.reset();
            return;
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // The listener is on loopback and `sk_lookup` hands it only
        // connections to the pod's addresses: one for a loopback address is
        // someone in the pod dialling the agent's own listener, which
        // delivered "to the app" would come straight back, and again.
        if dst.ip().to_canonical().is_loopback() {
            if let Some(inbound) = &served.inbound {
                inbound.denied(InboundDenial::AgentPort);
            }
            self.log_denial(
                &served.pod,
                peer.ip(),
                dst.port(),
                "-",
                InboundDenial::AgentPort,
            );
            client.reset();
            return;
        }
        // From the pod's own address to itself (a port the outbound side
        // does not redirect): the pod is its own client, as it would be
        // through the mesh. Only a socket in the pod's netns can complete a
        // handshake from one of its addresses.
        let own = (peer.ip() == dst.ip().to_canonical())
            .then(|| served.pod.identity())
            .flatten();
        let who = match own {
            Some(id) => Client::Meshed(id.uri()),
            None => Client::Plain(peer.ip()),
        };
        // The kubelet probing: made in the node's own netns, not by a pod
        // (only asked for a probe port, where it matters).
        let from_node = served.pod.probe_ports.contains(&dst.port())
            && self.node.made_it(peer, dst, &self.state);
        if let Err(reason) = self.authorize(&served, who, peer.ip(), dst.port(), from_node) {
            return self.refuse(client, &served, dst.port(), reason).await;
        }
        let accounting = Accounting::new(Some(served.clone()));
        let server = match self.deliver(&served, dst, peer).await {
            Ok(s) => s,
            Err(e) => {
                let reason = ConnectError::classify(&e);
                warn!(pod = %served.pod.key(), %dst, client = %peer, %reason, error = %e, "cannot deliver an inbound connection; the client gets a reset");
                if let Some(inbound) = &served.inbound {
                    inbound.connect_error(reason);
                }
                client.reset();
                return;
            }
        };
        if let Some(inbound) = &served.inbound {
            inbound.peer_open(false, own.map(|id| id.uri()));
        }
        let _ = server.set_nodelay(true);
        let from = Peer {
            tls: false,
            identity: own.map(|id| id.uri().to_string()),
        };
        self.carry(client, server, &served, from, peer, dst.port(), from_node)
            .await;
        drop(accounting);
    }

    /// A refused client: a `403` for each request if it speaks HTTP (within
    /// the detect timeout), else a reset. The app sees nothing.
    async fn refuse(
        &self,
        mut client: TcpStream,
        served: &ServedPod,
        port: u16,
        why: InboundDenial,
    ) {
        if self.opaque_port(served, port) {
            client.reset();
            return;
        }
        let mut said = Vec::new();
        let detected =
            tokio::time::timeout(self.cfg.detect_timeout, first_bytes(&mut client, &mut said))
                .await
                .unwrap_or(Detected::Timeout);
        match detected {
            Detected::Http1 | Detected::H2 => {
                client.close_gracefully();
                http::refuse(Rewind::new(said, client), detected == Detected::H2, why).await;
            }
            _ => client.reset(),
        }
    }

    /// Whether connections to `port` of the pod are opaque by
    /// configuration (its or its namespace's annotation, the server-first
    /// ports).
    fn opaque_port(&self, served: &ServedPod, port: u16) -> bool {
        let pod = self
            .state
            .pod(&served.pod.uid)
            .unwrap_or_else(|| served.pod.clone());
        ConfiguredProtocol::of(
            None,
            pod.opaque_ports.contains(port) || self.state.namespace_opaque(&pod.namespace, port),
            &[port],
        ) == ConfiguredProtocol::Opaque
    }

    /// Carries a connection to the app, delivered as `server`: detected
    /// first (whoever speaks first decides, within the detect timeout),
    /// then HTTP at the server's edge, or bytes.
    #[allow(clippy::too_many_arguments)]
    async fn carry<C>(
        self: &Arc<Self>,
        client: C,
        server: TcpStream,
        served: &Arc<ServedPod>,
        peer: Peer,
        from: SocketAddr,
        port: u16,
        from_node: bool,
    ) where
        C: AsyncRead + AsyncWrite + Unpin + Send + Reset + 'static,
    {
        let (mut client, mut server) = (client, server);
        let (detected, said, server_said) = if self.opaque_port(served, port) {
            (Detected::Configured, Vec::new(), Vec::new())
        } else {
            detect(&mut client, &mut server, self.cfg.detect_timeout).await
        };
        served.http.detected(Direction::Inbound, detected);
        let client = Rewind::new(said, client);
        let server = Rewind::new(server_said, server);
        if matches!(detected, Detected::Http1 | Detected::H2) {
            let h2 = detected == Detected::H2;
            // HTTP frames its messages: a close is a close (a reset on
            // drop would cut a `Connection: close` response short).
            client.close_gracefully();
            server.close_gracefully();
            let recheck = Recheck {
                inbound: self.clone(),
                served: served.clone(),
                identity: peer.identity.clone(),
                ip: from.ip(),
                port,
                from_node,
            };
            return http::serve(client, server, h2, served.clone(), peer, recheck).await;
        }
        let (mut client, mut server) = (client, server);
        let inbound = served.inbound.as_ref();
        let received = inbound.map(|i| &i.received);
        let sent = inbound.map(|i| &i.sent);
        let cut = CancellationToken::new();
        let id = self
            .next_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            OpenConnection {
                served: served.clone(),
                identity: peer.identity.clone(),
                ip: from.ip(),
                port,
                from_node,
                cut: cut.clone(),
            },
        );
        let _registered = Registered { inbound: self, id };
        let relayed = tokio::select! {
            r = relay(
                &mut client,
                &mut server,
                self.buffer_size,
                received.as_slice(),
                sent.as_slice(),
            ) => r,
            _ = cut.cancelled() => {
                client.reset();
                server.reset();
                return;
            }
        };
        match relayed {
            Ok(n) => debug!(
                received = n.client_to_server,
                sent = n.server_to_client,
                "inbound closed"
            ),
            Err(e) => debug!(error = %e, "inbound relay ended with an error; both sides reset"),
        }
    }

    /// The policy for tunnel clients: meshed identities of this trust
    /// domain.
    fn admit_client(&self, client: &str) -> Result<(), String> {
        match Identity::parse_spiffe(client) {
            Ok((td, _)) if td == self.trust_domain => Ok(()),
            _ => Err(format!(
                "{client} is not an identity of trust domain {}",
                self.trust_domain
            )),
        }
    }

    /// The served pod a tunnel stream may reach: a meshed pod on this node
    /// with `dst`'s address, of the identity the client asked for.
    fn tunnel_destination(
        &self,
        dst: SocketAddr,
        served: Option<&Identity>,
    ) -> Option<Arc<ServedPod>> {
        let Target::Pod(pod) = self.state.upstream(dst).target else {
            return None;
        };
        let identity = pod.identity().filter(|_| pod.meshed())?;
        if served != Some(identity.identity()) {
            return None;
        }
        self.pods.get(&pod.uid).filter(|s| s.inbound.is_some())
    }

    /// The client pod's address as its agent says, if it is a pod of the
    /// authenticated identity on the tunnel peer's node (the peer's
    /// address is one of that node's, as its Node object or its pods say: a
    /// node vouches only for its own pods). The
    /// claimed port is ignored (the app sees the agent's delivering
    /// socket's). A pod started a moment ago can be known to its own agent
    /// before this one (both learn it from the API server): an address not
    /// known yet as any pod's is waited for, up to [`CLAIM_WAIT`]; one
    /// known as another's is refused at once.
    async fn claimed_client(&self, req: &StreamRequest) -> Option<SocketAddr> {
        let addr = SocketAddr::new(req.client_addr?.ip().to_canonical(), 0);
        let peer = req.peer.ip().to_canonical();
        let mut changes = self.state.changes();
        let settled = tokio::time::timeout(CLAIM_WAIT, async {
            loop {
                changes.borrow_and_update();
                match self.state.upstream(addr).target {
                    Target::Pod(p) => {
                        return p.identity().is_some_and(|id| id.uri() == &*req.client)
                            && (p.host_ips.contains(&peer)
                                || p.node
                                    .as_deref()
                                    .is_some_and(|n| self.state.is_node_address(n, peer)));
                    }
                    _ => {
                        if changes.changed().await.is_err() {
                            return false;
                        }
                    }
                }
            }
        })
        .await;
        settled.unwrap_or(false).then_some(addr)
    }

    /// Opens a tunnel stream's destination.
    async fn open_tunnel(&self, req: &StreamRequest) -> Result<Accepted, TunnelError> {
        let Some(served) = self.tunnel_destination(req.dst, req.served.as_ref()) else {
            warn!(client = %req.client, dst = %req.dst, reason = %TunnelError::UnknownDestination, "refused a tunnel stream: the destination is not a meshed pod of the authenticated identity on this node");
            return Err(TunnelError::UnknownDestination);
        };
        // Else the tunnel's other end, the client's node: all that is known.
        let client_addr = self
            .claimed_client(req)
            .await
            .unwrap_or(SocketAddr::new(req.peer.ip(), 0));
        if self
            .authorize(
                &served,
                Client::Meshed(&req.client),
                client_addr.ip(),
                req.dst.port(),
                false,
            )
            .is_err()
        {
            return Err(TunnelError::PolicyDenied);
        }
        let stream = match self.deliver(&served, req.dst, client_addr).await {
            Ok(s) => s,
            Err(e) => {
                let reason = ConnectError::classify(&e);
                warn!(client = %req.client, dst = %req.dst, %reason, error = %e, "cannot connect to the destination pod; the client gets a reset");
                if let Some(inbound) = &served.inbound {
                    inbound.connect_error(reason);
                }
                return Err(TunnelError::Connect);
            }
        };
        if let Some(inbound) = &served.inbound {
            inbound.peer_open(true, Some(&req.client));
        }
        Ok(Accepted {
            stream,
            accounting: Accounting::new(Some(served)),
            client: client_addr,
        })
    }

    /// Whether `src`, a served pod on this node, may reach `dst` in
    /// `dst_served` (through the proxy once): per connection, and again per
    /// HTTP request over a pooled one. Its address, when it may.
    pub fn authorize_local(
        &self,
        src: &ServedPod,
        dst_served: &ServedPod,
        dst: SocketAddr,
    ) -> io::Result<IpAddr> {
        // The client pod's address as known now (it may have been served
        // before its addresses were).
        let Some(src_ip) = src.address_for(&self.state, dst) else {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "the client pod has no address in the destination's family",
            ));
        };
        let client = match src.pod.identity() {
            Some(id) => Client::Meshed(id.uri()),
            None => Client::Plain(src_ip),
        };
        match self.authorize(dst_served, client, src_ip, dst.port(), false) {
            Ok(()) => Ok(src_ip),
            Err(reason) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                PolicyRefused(reason),
            )),
        }
    }

    /// What decides again for `src`'s connection to `dst` in `dst_served`
    /// (both served here: through the proxy once), for the register.
    pub fn recheck_local(
        self: &Arc<Self>,
        src: &ServedPod,
        dst_served: &Arc<ServedPod>,
        dst: SocketAddr,
    ) -> Option<Recheck> {
        let ip = src.address_for(&self.state, dst)?;
        Some(Recheck {
            inbound: self.clone(),
            served: dst_served.clone(),
            identity: src.pod.identity().map(|id| id.uri().to_owned()),
            ip,
            port: dst.port(),
            from_node: false,
        })
    }

    /// A connection from `src`, a served pod on this node, to `dst`, a
    /// meshed pod on this node: made from `src`'s netns (the app sees its
    /// client's address), counted on both pods (no TLS inside the node).
    pub async fn open_local(
        &self,
        src: &ServedPod,
        dst_pod: &Pod,
        dst: SocketAddr,
    ) -> io::Result<Accepted> {
        let served = self.pods.get(&dst_pod.uid).filter(|s| s.inbound.is_some());
        let (stream, client) = match &served {
            // Once through the proxy: delivered inside the destination pod
            // (its inbound capture lets the agent by), as the client pod.
            Some(dst_served) => {
                let client = SocketAddr::new(self.authorize_local(src, dst_served, dst)?, 0);
                (self.deliver(dst_served, dst, client).await?, client)
            }
            // Not served (yet): from the client's netns, as without the mesh.
            None => {
                let stream = self.connector.connect(src.netns.as_ref(), dst).await?;
                reset_if_we_die(&stream);
                let client = stream.local_addr()?;
                (stream, client)
            }
        };
        if let Some(inbound) = served.as_ref().and_then(|s| s.inbound.as_ref()) {
            inbound.peer_open(false, src.pod.identity().map(|id| id.uri()));
        }
        Ok(Accepted {
            stream,
            accounting: Accounting::new(served),
            client,
        })
    }
}

impl Destinations for Inbound {
    fn admit(&self, client: &str) -> Result<(), String> {
        self.admit_client(client)
    }

    fn open(
        self: Arc<Self>,
        req: StreamRequest,
    ) -> BoxFuture<'static, Result<Delivery, TunnelError>> {
        Box::pin(async move {
            let accepted = self.open_tunnel(&req).await?;
            let peer = Peer {
                tls: true,
                identity: Some(req.client.to_string()),
            };
            let port = req.dst.port();
            let from = accepted.client;
            let deliver: Delivery = Box::new(move |client: TunnelStream| {
                let span = match accepted.accounting.pod.as_ref() {
                    Some(p) => {
                        info_span!("inbound", pod = %format_args!("{}/{}", p.pod.namespace, p.pod.name))
                    }
                    None => info_span!("inbound"),
                };
                Box::pin(
                    async move {
                        let Accepted {
                            stream, accounting, ..
                        } = accepted;
                        match accounting.served().cloned() {
                            Some(served) => {
                                self.carry(client, stream, &served, peer, from, port, false)
                                    .await
                            }
                            None => relay_tunnel(client, stream, self.buffer_size).await,
                        }
                        drop(accounting);
                    }
                    .instrument(span),
                )
            });
            Ok(deliver)
        })
    }
}

/// Carries a tunnel stream to a destination that is not a served pod
/// (nothing to count it on).
async fn relay_tunnel(mut client: TunnelStream, mut server: TcpStream, buffer_size: usize) {
    match relay(&mut client, &mut server, buffer_size, &[], &[]).await {
        Ok(n) => debug!(
            received = n.client_to_server,
            sent = n.server_to_client,
            "closed"
        ),
        Err(e) => debug!(error = %e, "tunnel relay ended with an error; both sides reset"),
    }
}
