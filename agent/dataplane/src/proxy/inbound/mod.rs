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
mod local;
pub mod node;
pub mod policy;
mod tunnel;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nodemesh_core::labels::Direction;
use nodemesh_core::{identity::Identity, names::InboundPolicy, policy::PolicyClient};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};

use self::{
    detect::{detect, first_bytes},
    http::{Peer, Rewind},
    live::OpenConnection,
    policy::{Client, Facts},
};
pub use self::{live::Recheck, local::LocalError};
use super::{
    admission::{ConnectionTicket, Door, Refusal},
    connect::Connector,
    detect::Detected,
    orig_dst::ClientAddrs,
    pods::{ServedPod, ServedPods},
    relay::{Buffers, Reset, relay, reset_if_we_die},
};
use crate::{
    state::{ConfiguredProtocol, Pod, StateStore},
    telemetry::{ConnectError, InboundDenial, OpenGuard, PodTcpMetrics},
};

/// A delivery's client record, forgotten when dropped (the connection was
/// not made).
struct Recorded<'a> {
    clients: &'a dyn ClientAddrs,
    cookie: u64,
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        self.clients.forget(self.cookie);
    }
}

/// The inbound side of the node's proxy.
pub struct Inbound {
    state: StateStore,
    pods: ServedPods,
    connector: Arc<dyn Connector>,
    buffers: Buffers,
    /// Opaque relays silent both ways this long are closed (unless the
    /// pod says otherwise).
    idle_timeout: Duration,
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
    /// Its slot in the pod's admission share.
    _ticket: Option<ConnectionTicket>,
}

impl Accounting {
    fn new(pod: Option<Arc<ServedPod>>, ticket: Option<ConnectionTicket>) -> Self {
        let open = pod
            .as_ref()
            .and_then(|p| p.inbound.as_ref())
            .map(|i| i.open());
        Self {
            pod,
            _open: open,
            _ticket: ticket,
        }
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
        (buffers, idle_timeout): (Buffers, Duration),
        cfg: InboundConfig,
        clients: Option<Arc<dyn ClientAddrs>>,
    ) -> Self {
        let trust_domain = state.trust_domain();
        let node = node::NodeOrigin::new(cfg.cgroup_root.clone());
        Self {
            state,
            pods,
            connector,
            buffers,
            idle_timeout,
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
            in_cluster: policy::asks_in_cluster(self.cfg.floor, policy)
                && self.state.in_cluster(client_ip),
            authorized: self.state.authorized(&pod, port, policy_client),
        };
        let decided = policy::decide_under(self.cfg.floor, policy, client, facts);
        if let Err(reason) = decided {
            if let Some(inbound) = &served.inbound {
                inbound.denied(reason);
            }
            self.log_denial(&pod, client_ip, port, policy.as_str(), reason);
        }
        decided
    }

    /// Counts (on `served`, inbound) and logs an admission refusal.
    fn refused(&self, served: &ServedPod, door: Door, why: Refusal, client: IpAddr) {
        served.share.admission().refused(
            served.inbound.as_ref(),
            &served.pod.key(),
            door,
            why,
            Some(client),
        );
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
        // From the pod's own address; a link-local one needs its scope
        // (the interface) to be bound at all.
        let local = match dst {
            SocketAddr::V6(v6) => {
                SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), 0, 0, v6.scope_id()))
            }
            v4 => SocketAddr::new(v4.ip(), 0),
        };
        socket.bind(&local.into())?;
        let cookie = crate::netns::socket_cookie(&socket)?;
        // Forgotten unless the connection is made: however this ends (an
        // error, a timeout, the caller giving up), no record is left.
        let mut recorded = None;
        if let Some(clients) = &self.clients {
            clients.record(cookie, client)?;
            recorded = Some(Recorded {
                clients: clients.as_ref(),
                cookie,
            });
        }
        socket.set_nonblocking(true)?;
        let stream = crate::proxy::connect::connect_with_timeout(
            Ok(tokio::net::TcpSocket::from_std_stream(socket.into())),
            dst,
            self.cfg.connect_timeout,
        )
        .await?;
        // Made: sock_ops took the record at its SYN.
        std::mem::forget(recorded);
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
        // Its admission slot was taken at the door (the accept loop).
        let accounting = Accounting::new(Some(served.clone()), None);
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
            // Boxed: an opaque connection's task should not reserve room
            // for hyper's state.
            return Box::pin(http::serve(
                client,
                server,
                h2,
                served.clone(),
                peer,
                recheck,
            ))
            .await;
        }
        let (mut client, mut server) = (client, server);
        let inbound = served.inbound.as_ref();
        let received = inbound.map(|i| &i.received);
        let sent = inbound.map(|i| &i.sent);
        let (_registered, cut) = Inbound::register(
            self.clone(),
            served.clone(),
            peer.identity.clone(),
            from.ip(),
            port,
            from_node,
        );
        let relayed = tokio::select! {
            r = relay(
                &mut client,
                &mut server,
                &self.buffers,
                served.share.idle_timeout().unwrap_or(self.idle_timeout),
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
}
