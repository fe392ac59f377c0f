//! Inbound: where connections to this node's meshed pods arrive through
//! the proxy — streams of the tunnel from other nodes, and connections
//! from meshed pods on this node — with the inbound policy and the
//! server-side accounting.
//!
//! Policy today: tunnel clients must be identities of this trust domain,
//! and a stream may only reach a meshed pod on this node of the identity
//! the client asked for (and whose certificate it verified).
use std::{io, net::SocketAddr, sync::Arc};

use futures_util::future::BoxFuture;
use nodemesh_core::identity::Identity;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    connect::Connector,
    pods::{ServedPod, ServedPods},
    relay::{TunnelStream, relay, reset_if_we_die},
    tunnel::{Destinations, TunnelError, server::Delivery, server::StreamRequest},
};
use crate::{
    state::{Pod, StateStore, Target},
    telemetry::{ConnectError, OpenGuard, PodTcpMetrics},
};

/// The inbound side of the node's proxy.
pub struct Inbound {
    state: StateStore,
    pods: ServedPods,
    connector: Arc<dyn Connector>,
    buffer_size: usize,
    trust_domain: String,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

/// A connection to a served pod, opened, with its accounting running.
pub struct Accepted {
    pub stream: TcpStream,
    pub accounting: Accounting,
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
    ) -> Self {
        let trust_domain = state.trust_domain();
        Self {
            state,
            pods,
            connector,
            buffer_size,
            trust_domain,
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

    /// Opens a tunnel stream's destination.
    async fn open_tunnel(&self, req: &StreamRequest) -> Result<Accepted, TunnelError> {
        let Some(served) = self.tunnel_destination(req.dst, req.served.as_ref()) else {
            warn!(client = %req.client, dst = %req.dst, reason = %TunnelError::UnknownDestination, "refused a tunnel stream: the destination is not a meshed pod of the authenticated identity on this node");
            return Err(TunnelError::UnknownDestination);
        };
        // The node's netns: the app sees the connection come from its node.
        let stream = match self.connector.connect(None, req.dst).await {
            Ok(s) => {
                reset_if_we_die(&s);
                s
            }
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
        let stream = self.connector.connect(src.netns.as_ref(), dst).await?;
        reset_if_we_die(&stream);
        let served = self.pods.get(&dst_pod.uid).filter(|s| s.inbound.is_some());
        if let Some(inbound) = served.as_ref().and_then(|s| s.inbound.as_ref()) {
            inbound.peer_open(false, src.pod.identity().map(|id| id.uri()));
        }
        Ok(Accepted {
            stream,
            accounting: Accounting::new(served),
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
            let buffer_size = self.buffer_size;
            let deliver: Delivery = Box::new(move |client: TunnelStream| {
                let span = match accepted.accounting.pod.as_ref() {
                    Some(p) => {
                        info_span!("inbound", pod = %format_args!("{}/{}", p.pod.namespace, p.pod.name))
                    }
                    None => info_span!("inbound"),
                };
                Box::pin(relay_tunnel(client, accepted, buffer_size).instrument(span))
            });
            Ok(deliver)
        })
    }
}

/// Carries a tunnel stream to its pod, counting on the pod's inbound side.
async fn relay_tunnel(mut client: TunnelStream, accepted: Accepted, buffer_size: usize) {
    let Accepted {
        stream: mut server,
        accounting,
    } = accepted;
    let inbound = accounting.inbound();
    let received = inbound.map(|i| &i.received);
    let sent = inbound.map(|i| &i.sent);
    match relay(
        &mut client,
        &mut server,
        buffer_size,
        received.as_slice(),
        sent.as_slice(),
    )
    .await
    {
        Ok(n) => debug!(
            received = n.client_to_server,
            sent = n.server_to_client,
            "closed"
        ),
        Err(e) => debug!(error = %e, "tunnel relay ended with an error; both sides reset"),
    }
}
