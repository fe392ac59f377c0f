//! Decisions taken again: each HTTP request of a connection
//! ([`Recheck`]), and every connection relayed as bytes whenever the state
//! changes ([`Inbound::recheck_open`]) — policies, annotations and labels
//! change live, and connections live long.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nodemesh_core::wire::TapPeer;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Inbound, policy::Client};
use crate::sockdiag::{self, TcpSocket};

/// Whether `s` is a connection an app in the pod accepted without the
/// agent: on a port something listens on, from a client that is not the
/// pod itself (the app's side of the agent's deliveries comes from the
/// pod's own address), and not one of the agent's own sockets (those it
/// accepted through capture).
fn precaptured(s: &TcpSocket, listening: &HashSet<u16>, agents: &HashSet<u64>) -> bool {
    s.state != sockdiag::LISTEN
        && s.inode != 0
        && !agents.contains(&s.inode)
        && !s.local.ip().is_loopback()
        && !s.remote.ip().is_loopback()
        && s.remote.ip() != s.local.ip()
        && listening.contains(&s.local.port())
}
use crate::{proxy::pods::ServedPod, state::Target, telemetry::InboundDenial};

/// An open connection relayed as bytes to a served pod: decided when it
/// came, and decided again when anything changes (a policy, an annotation,
/// a label), cut with a reset once refused.
#[derive(Clone)]
pub(super) struct OpenConnection {
    pub(super) served: Arc<ServedPod>,
    pub(super) identity: Option<String>,
    pub(super) ip: IpAddr,
    pub(super) port: u16,
    /// The node made it (its probe).
    pub(super) from_node: bool,
    pub(super) cut: CancellationToken,
}

/// A connection in the register, for as long as this lives: decided
/// again whenever the state changes.
pub struct Registration {
    inbound: Arc<Inbound>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inbound
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Inbound {
    /// Puts a connection of `served`'s from `ip:port` (`identity`: its
    /// client's, if authenticated) in the register; the token is cancelled
    /// once the policy refuses it.
    pub(super) fn register(
        inbound: Arc<Inbound>,
        served: Arc<ServedPod>,
        identity: Option<String>,
        ip: IpAddr,
        port: u16,
        from_node: bool,
    ) -> (Registration, CancellationToken) {
        let cut = CancellationToken::new();
        let id = inbound.next_open.fetch_add(1, Ordering::Relaxed);
        inbound
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                OpenConnection {
                    served,
                    identity,
                    ip,
                    port,
                    from_node,
                    cut: cut.clone(),
                },
            );
        (Registration { inbound, id }, cut)
    }
}

/// Decides again, for each HTTP request of a connection, whether its client
/// may still in (policies change live; an HTTP connection may be reused
/// long after it was let in).
pub struct Recheck {
    pub(super) inbound: Arc<Inbound>,
    pub(super) served: Arc<ServedPod>,
    /// The client's SPIFFE ID, when authenticated.
    pub(super) identity: Option<String>,
    pub(super) ip: IpAddr,
    pub(super) port: u16,
    pub(super) from_node: bool,
}

impl Recheck {
    /// Puts the connection this decides for in the register, so a policy
    /// change decides on it again too (not only at its next request): an
    /// HTTP/2 connection's long streams, an upgraded connection (WebSocket,
    /// CONNECT). The token is cancelled once the policy refuses it.
    pub fn register(&self) -> (Registration, CancellationToken) {
        Inbound::register(
            self.inbound.clone(),
            self.served.clone(),
            self.identity.clone(),
            self.ip,
            self.port,
            self.from_node,
        )
    }

    /// The client as a tap names it: its pod, when the address is one's.
    pub fn client(&self) -> TapPeer {
        let mut peer = match self
            .inbound
            .state
            .upstream(SocketAddr::new(self.ip, 0))
            .target
        {
            Target::Pod(p) => crate::proxy::pods::tap_peer(&p),
            _ => TapPeer::default(),
        };
        peer.identity = self.identity.clone().unwrap_or_default();
        if peer.pod.is_empty() {
            peer.pod = self.ip.to_string();
        }
        peer.addr = self.ip.to_string();
        peer
    }

    /// The served pod as a tap shows it, at the port the client reached.
    pub fn server(&self) -> TapPeer {
        let pod = &self.served.pod;
        let mut peer = crate::proxy::pods::tap_peer(pod);
        let ip = pod
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == self.ip.to_canonical().is_ipv4())
            .or(pod.ips.first());
        if let Some(ip) = ip {
            peer.addr = SocketAddr::new(*ip, self.port).to_string();
        }
        peer
    }

    pub fn check(&self) -> Result<(), InboundDenial> {
        let client = match &self.identity {
            Some(id) => Client::Meshed(id),
            None => Client::Plain(self.ip),
        };
        self.inbound
            .authorize(&self.served, client, self.ip, self.port, self.from_node)
    }
}

impl Inbound {
    /// Decides on the connections the apps of `pods` accepted before they
    /// were captured, which never passed the agent: each as plaintext from
    /// its client, as the policy says now; the refused are destroyed
    /// (`SOCK_DESTROY`: the app sees `ECONNABORTED`, the client a reset),
    /// counted like any refusal. Once none is left a pod is not looked at
    /// again (every later connection came through the agent); nor is one
    /// without inbound capture (no policy is enforced for it).
    pub fn sweep_precapture(&self, pods: impl IntoIterator<Item = Arc<ServedPod>>) {
        // Every pending pod's sockets first, the agent's own after: a
        // socket the agent accepts meanwhile is then known as its own.
        let mut dumped = Vec::new();
        for served in pods {
            if !served.precapture.load(Ordering::Relaxed) {
                continue;
            }
            let (Some(netns), Some(_)) = (&served.netns, &served.inbound) else {
                served.precapture.store(false, Ordering::Relaxed);
                continue;
            };
            let dump = netns
                .enter(sockdiag::open)
                .map_err(std::io::Error::from)
                .and_then(|diag| {
                    let diag = diag?;
                    let sockets = diag.tcp()?;
                    Ok((diag, sockets))
                });
            match dump {
                Ok((diag, sockets)) => dumped.push((served, diag, sockets)),
                Err(e) => {
                    warn!(pod = %served.pod.key(), error = %e, "cannot read the pod's sockets; connections from before its capture are decided on at the next change")
                }
            }
        }
        if dumped.is_empty() {
            return;
        }
        let ours = match sockdiag::own_socket_inodes() {
            Ok(ours) => ours,
            Err(e) => {
                warn!(error = %e, "cannot read the agent's own sockets; connections from before capture are decided on at the next change");
                return;
            }
        };
        for (served, diag, sockets) in dumped {
            self.decide_precaptured(&served, &diag, &sockets, &ours);
        }
    }

    fn decide_precaptured(
        &self,
        served: &ServedPod,
        diag: &sockdiag::SockDiag,
        sockets: &[TcpSocket],
        ours: &HashSet<u64>,
    ) {
        let listening: HashSet<u16> = sockets
            .iter()
            .filter(|s| s.state == sockdiag::LISTEN)
            .map(|s| s.local.port())
            .collect();
        let mut left = 0;
        for s in sockets.iter().filter(|s| precaptured(s, &listening, ours)) {
            let client = s.remote.ip();
            if self
                .authorize(served, Client::Plain(client), client, s.local.port(), false)
                .is_ok()
            {
                left += 1;
                continue;
            }
            match diag.destroy(s) {
                Ok(()) => {
                    info!(pod = %served.pod.key(), %client, port = s.local.port(), "a connection from before the pod's capture is refused now: destroyed")
                }
                // This kernel or this agent cannot destroy sockets: asking
                // again would only fail again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EPERM)) => {
                    warn!(pod = %served.pod.key(), error = %e, "cannot destroy sockets here (CONFIG_INET_DIAG_DESTROY, CAP_NET_ADMIN): connections from before the pod's capture are left open");
                    served.precapture.store(false, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    left += 1;
                    warn!(pod = %served.pod.key(), %client, port = s.local.port(), error = %e, "cannot destroy a refused connection from before the pod's capture")
                }
            }
        }
        if left == 0 {
            served.precapture.store(false, Ordering::Relaxed);
        }
    }

    /// Decides again for every connection relayed as bytes whenever the
    /// state changes (at most once a second), until `stop`: those the
    /// policy now refuses are reset (an HTTP connection is decided again
    /// at each request instead).
    pub async fn recheck_open(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = self.state.changes();
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
            let open: Vec<OpenConnection> = self
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            for c in open {
                let client = match &c.identity {
                    Some(id) => Client::Meshed(id),
                    None => Client::Plain(c.ip),
                };
                if self
                    .authorize(&c.served, client, c.ip, c.port, c.from_node)
                    .is_err()
                {
                    debug!(pod = %c.served.pod.key(), client = %c.ip, port = c.port, "an open connection is refused now: reset");
                    c.cut.cancel();
                }
            }
            self.sweep_precapture(self.pods.all());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}
