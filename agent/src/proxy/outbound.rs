//! Outbound: connections a meshed pod makes, redirected by `connect4` to the
//! pod's own `127.0.0.1:15001`.
//!
//! For each accepted connection: read the original destination by socket
//! cookie, then route it:
//! - a meshed pod on another node (with identity on): a stream of the
//!   mutual-TLS tunnel to that node's agent, as the source pod's identity;
//! - anything else: connect from inside the pod's netns (so the
//!   destination sees the pod's own address, as without the mesh). A meshed
//!   pod on this node is reached that way too, and both identities are
//!   still recorded.
//!
//! A destination that cannot be reached gives the client a reset, a log
//! line and a metric.
use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info_span, warn};

use super::relay::{Reset, relay};
use crate::{
    discovery::{Pod, services::SharedIndex},
    identity::Identity,
    metrics::{ConnectError, PodTcpMetrics},
    netns::{Netns, socket_cookie},
    redirect::Redirect,
    tunnel::{LocalPods, TunnelClient},
};

/// What routing between meshed pods needs (Kubernetes discovery with
/// identity on).
pub struct Mesh {
    pub node_name: String,
    pub index: SharedIndex,
    pub local: LocalPods,
    pub tunnel: Arc<TunnelClient>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// Where a connection goes.
enum Route {
    /// Plain TCP from the pod's netns; `peer` is the destination's
    /// identity when it is a meshed pod on this node.
    Direct { peer: Option<(String, IpAddr)> },
    /// Meshed on both ends but not routable through the tunnel now: reset
    /// rather than send it in the clear.
    Refuse(String),
    /// Through the tunnel to another node.
    Tunnel {
        node_ip: IpAddr,
        dst_id: Identity,
        /// `dst_id`'s SPIFFE ID.
        dst_spiffe: String,
        src_id: Identity,
    },
}

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// How long connecting to a destination may take.
    pub connect_timeout: Duration,
    /// Relay buffer per direction per connection.
    pub buffer_size: usize,
    /// Connections proxied at once, all pods together; beyond it new ones
    /// wait in the listeners' backlogs.
    pub max_connections: usize,
}

/// What the outbound proxy knows about one captured pod.
#[derive(Debug)]
pub struct PodProxy {
    pub pod: Arc<Pod>,
    pub netns: Arc<Netns>,
    pub tcp: PodTcpMetrics,
}

/// Shared by every pod's accept loop.
#[derive(Debug)]
pub struct Outbound {
    cfg: OutboundConfig,
    redirect: Arc<Redirect>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    mesh: Option<Mesh>,
}

/// How long to wait for sock_ops to re-key the original destination: it
/// runs as the handshake completes, so it is normally there before accept.
const ORIG_DST_WAIT: Duration = Duration::from_millis(50);

impl Outbound {
    pub fn new(cfg: OutboundConfig, redirect: Arc<Redirect>, mesh: Option<Mesh>) -> Self {
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        Self {
            cfg,
            redirect,
            limit,
            tracker: TaskTracker::new(),
            mesh,
        }
    }

    /// Decides how to reach `dst` from `pod`.
    fn route(&self, pod: &Pod, dst: SocketAddrV4) -> Route {
        let direct = Route::Direct { peer: None };
        let Some(mesh) = &self.mesh else {
            return direct;
        };
        let ip = IpAddr::V4(*dst.ip());
        let index = mesh.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(peer) = index.pod_by_ip(ip).filter(|p| index.is_meshed(p)) else {
            return direct;
        };
        let Ok(dst_id) = Identity::new(&peer.namespace, &peer.service_account) else {
            return direct;
        };
        let spiffe = dst_id.spiffe_id(mesh.tunnel.trust_domain());
        // A host-network pod's address is its node's: not a meshed endpoint.
        if peer.host_ip == Some(ip) {
            return direct;
        }
        match (&peer.node, peer.host_ip) {
            (Some(node), _) if *node == mesh.node_name => Route::Direct {
                peer: Some((spiffe, ip)),
            },
            (Some(_), Some(node_ip)) => match Identity::new(&pod.namespace, &pod.service_account) {
                Ok(src_id) => Route::Tunnel {
                    node_ip,
                    dst_id,
                    dst_spiffe: spiffe,
                    src_id,
                },
                Err(e) => Route::Refuse(format!("the source has no valid identity: {e}")),
            },
            // A meshed pod elsewhere whose node is not known yet: never
            // downgrade to plaintext.
            _ => Route::Refuse(format!(
                "{spiffe} is meshed but its node's address is not known yet"
            )),
        }
    }

    /// Accepts on one pod's listener until `stop`; then the listener closes.
    /// Connections already accepted carry on.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        pod: Arc<PodProxy>,
        stop: CancellationToken,
    ) {
        loop {
            let permit = tokio::select! {
                permit = self.limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            match accepted {
                Ok((client, peer)) => {
                    let span = info_span!(
                        "outbound",
                        pod = %pod.pod.key(),
                        client = %peer,
                    );
                    let this = self.clone();
                    let pod = pod.clone();
                    self.tracker.spawn(
                        async move {
                            this.proxy(client, &pod).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little
                    // rather than spin.
                    warn!(pod = %pod.pod.key(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn proxy(&self, client: TcpStream, pod: &PodProxy) {
        let _open = pod.tcp.open();
        let mut client = client;
        let _ = client.set_nodelay(true);
        let Some(orig) = self.orig_dst(&client).await else {
            warn!("no original destination recorded for this connection; resetting it");
            pod.tcp.connect_error(ConnectError::NoOriginalDestination);
            client.reset();
            return;
        };
        match self.route(&pod.pod, orig) {
            Route::Refuse(why) => {
                warn!(dst = %orig, %why, "refusing to send a meshed connection in the clear; resetting the client");
                pod.tcp.connect_error(ConnectError::Tunnel);
                client.reset();
            }
            Route::Tunnel {
                node_ip,
                dst_id,
                dst_spiffe,
                src_id,
            } => {
                let Some(mesh) = &self.mesh else { return };
                let dst = SocketAddr::V4(orig);
                let mut server = match mesh.tunnel.open(&src_id, node_ip, &dst_id, dst).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%dst, node = %node_ip, error = %e, "cannot open a tunnel stream; resetting the client");
                        pod.tcp.connect_error(ConnectError::Tunnel);
                        client.reset();
                        return;
                    }
                };
                pod.tcp.peer_open(true, Some(&dst_spiffe));
                match relay(
                    &mut client,
                    &mut server,
                    self.cfg.buffer_size,
                    &[&pod.tcp.sent],
                    &[&pod.tcp.received],
                )
                .await
                {
                    Ok(n) => {
                        debug!(%dst, tunnel = %node_ip, sent = n.client_to_server, received = n.server_to_client, "closed")
                    }
                    Err(e) => {
                        debug!(%dst, error = %e, "relay ended with an error; both sides reset")
                    }
                }
            }
            Route::Direct { peer } => {
                let mut server = match self.connect(&pod.netns, orig).await {
                    Ok(server) => server,
                    Err(e) => {
                        let reason = ConnectError::classify(&e);
                        warn!(dst = %orig, %reason, error = %e, "cannot connect to destination; resetting the client");
                        pod.tcp.connect_error(reason);
                        client.reset();
                        return;
                    }
                };
                // A meshed pod on this node: its inbound side is counted
                // here too, with the client's identity (no TLS inside the
                // node).
                let local = peer.as_ref().and_then(|(_, ip)| {
                    self.mesh
                        .as_ref()?
                        .local
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(ip)
                        .cloned()
                });
                pod.tcp
                    .peer_open(false, peer.as_ref().map(|(id, _)| id.as_str()));
                let _inbound_open = local.as_ref().map(|l| {
                    let src_spiffe = self.mesh.as_ref().and_then(|m| {
                        Identity::new(&pod.pod.namespace, &pod.pod.service_account)
                            .ok()
                            .map(|id| id.spiffe_id(m.tunnel.trust_domain()))
                    });
                    l.inbound.peer_open(false, src_spiffe.as_deref());
                    l.inbound.open()
                });
                let (mut up, mut down): (
                    Vec<&prometheus_client::metrics::counter::Counter>,
                    Vec<_>,
                ) = (vec![&pod.tcp.sent], vec![&pod.tcp.received]);
                if let Some(l) = &local {
                    up.push(&l.inbound.received);
                    down.push(&l.inbound.sent);
                }
                match relay(&mut client, &mut server, self.cfg.buffer_size, &up, &down).await {
                    Ok(n) => {
                        debug!(dst = %orig, sent = n.client_to_server, received = n.server_to_client, "closed")
                    }
                    Err(e) => {
                        debug!(dst = %orig, error = %e, "relay ended with an error; both sides reset")
                    }
                }
            }
        }
    }

    async fn orig_dst(&self, client: &TcpStream) -> Option<SocketAddrV4> {
        let cookie = socket_cookie(client).ok()?;
        let deadline = tokio::time::Instant::now() + ORIG_DST_WAIT;
        loop {
            if let Some(orig) = self.redirect.take_orig_dst(cookie) {
                return Some(orig);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Connects to `dst` with a socket made in the pod's netns.
    async fn connect(&self, netns: &Netns, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
        let socket = netns.tcp_socket()?;
        socket.set_nonblocking(true)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        let stream = tokio::time::timeout(
            self.cfg.connect_timeout,
            socket.connect(SocketAddr::V4(dst)),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Stops taking new connections into account for shutdown and waits for
    /// those in flight, up to `grace`. Returns how many were still open.
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

    /// Connections in flight now.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}
