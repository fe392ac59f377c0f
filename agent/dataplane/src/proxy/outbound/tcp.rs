//! The TCP path: opening the upstream side a route names, then one relay
//! for every route.
use std::net::{IpAddr, SocketAddr};

use nodemesh_core::identity::SpiffeId;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    Outbound,
    route::{Refusal, Route},
};
use crate::{
    proxy::{
        inbound::{Accepted, Accounting},
        pods::ServedPod,
        relay::{Reset, UpstreamIo, relay, reset_if_we_die},
        tunnel::OpenError,
    },
    telemetry::ConnectError,
};

/// Why a route could not be followed.
enum Failure {
    Refused(Refusal),
    Connect(std::io::Error),
    Tunnel(IpAddr, OpenError),
}

/// An upstream connection made for a route.
struct Opened {
    io: UpstreamIo,
    /// Carried over mutual TLS.
    tls: bool,
    /// The other end's identity, when it is a meshed pod.
    peer: Option<SpiffeId>,
    /// A pod on this node reached through the inbound side: its
    /// accounting.
    local: Option<Accounting>,
}

impl Outbound {
    /// Carries `client` to `dst` the way `route` says.
    pub(super) async fn tcp(
        &self,
        mut client: TcpStream,
        pod: &ServedPod,
        route: Route<'_>,
        dst: SocketAddr,
    ) {
        let opened = match self.open(route, pod, dst).await {
            Ok(opened) => opened,
            Err(failure) => {
                let reason = match &failure {
                    Failure::Refused(why) => {
                        warn!(%dst, %why, "refusing to send a meshed connection in the clear; resetting the client");
                        ConnectError::Tunnel
                    }
                    Failure::Connect(e) => {
                        let reason = ConnectError::classify(e);
                        warn!(%dst, %reason, error = %e, "cannot connect to destination; resetting the client");
                        reason
                    }
                    Failure::Tunnel(node, e) => {
                        warn!(%dst, %node, error = %e, "cannot open a tunnel stream; resetting the client");
                        ConnectError::Tunnel
                    }
                };
                pod.outbound.connect_error(reason);
                client.reset();
                return;
            }
        };
        pod.outbound
            .peer_open(opened.tls, opened.peer.as_ref().map(SpiffeId::uri));
        let Opened { mut io, local, .. } = opened;
        // Bytes count for the client pod, and for the destination pod too
        // when it is served here.
        let (up, down, n): ([&Counter; 2], [&Counter; 2], usize) =
            match local.as_ref().and_then(Accounting::inbound) {
                Some(i) => (
                    [&pod.outbound.sent, &i.received],
                    [&pod.outbound.received, &i.sent],
                    2,
                ),
                None => ([&pod.outbound.sent; 2], [&pod.outbound.received; 2], 1),
            };
        match relay(&mut client, &mut io, self.buffer_size, &up[..n], &down[..n]).await {
            Ok(n) => {
                debug!(%dst, sent = n.client_to_server, received = n.server_to_client, "closed")
            }
            Err(e) => debug!(%dst, error = %e, "relay ended with an error; both sides reset"),
        }
    }

    async fn open(
        &self,
        route: Route<'_>,
        pod: &ServedPod,
        dst: SocketAddr,
    ) -> Result<Opened, Failure> {
        let io_err = Failure::Connect;
        match route {
            Route::Refuse(why) => Err(Failure::Refused(why)),
            Route::Direct => {
                let stream = self
                    .connector
                    .connect(pod.netns.as_ref(), dst)
                    .await
                    .map_err(io_err)?;
                reset_if_we_die(&stream);
                Ok(Opened {
                    io: UpstreamIo::Tcp(stream),
                    tls: false,
                    peer: None,
                    local: None,
                })
            }
            Route::Local { dst: dst_pod, id } => {
                let Accepted { stream, accounting } = self
                    .inbound
                    .open_local(pod, dst_pod, dst)
                    .await
                    .map_err(io_err)?;
                Ok(Opened {
                    io: UpstreamIo::Tcp(stream),
                    tls: false,
                    peer: Some(id.clone()),
                    local: Some(accounting),
                })
            }
            Route::Tunnel {
                node_ip,
                src,
                dst: dst_id,
            } => {
                let Some(pool) = &self.tunnel else {
                    return Err(Failure::Refused(Refusal::NoTunnel));
                };
                let stream = pool
                    .open(src, node_ip, dst_id, dst)
                    .await
                    .map_err(|e| Failure::Tunnel(node_ip, e))?;
                Ok(Opened {
                    io: UpstreamIo::Tunnel(stream),
                    tls: true,
                    peer: Some(dst_id.clone()),
                    local: None,
                })
            }
        }
    }
}
