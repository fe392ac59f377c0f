//! Tunnel streams from other nodes: who may open one, which served pod it
//! may reach, who its client is (as the peer's agent says, if it may say
//! so), and the delivery.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use nodemesh_core::identity::Identity;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

use super::{Accepted, Accounting, Door, Inbound, http::Peer, policy::Client};
use crate::{
    proxy::{
        pods::ServedPod,
        relay::{Buffers, TunnelStream, relay},
        tunnel::{Destinations, TunnelError, server::Delivery, server::StreamRequest},
    },
    state::Target,
    telemetry::ConnectError,
};

/// How long a tunnel stream waits for its client pod's address to be
/// known here (see `claimed_client`).
const CLAIM_WAIT: Duration = Duration::from_secs(2);

impl Inbound {
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
        // Its slot: in the pod's share and its client's.
        let ticket = match served.share.connection(Some(client_addr.ip())) {
            Ok(t) => t,
            Err(why) => {
                self.refused(&served, Door::Tunnel, why, client_addr.ip());
                return Err(TunnelError::Overloaded);
            }
        };
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
            accounting: Accounting::new(Some(served), Some(ticket)),
            client: client_addr,
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
                            None => {
                                relay_tunnel(client, stream, &self.buffers, self.idle_timeout).await
                            }
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
async fn relay_tunnel(
    mut client: TunnelStream,
    mut server: TcpStream,
    buffers: &Buffers,
    idle: Duration,
) {
    match relay(&mut client, &mut server, buffers, idle, &[], &[]).await {
        Ok(n) => debug!(
            received = n.client_to_server,
            sent = n.server_to_client,
            "closed"
        ),
        Err(e) => debug!(error = %e, "tunnel relay ended with an error; both sides reset"),
    }
}
