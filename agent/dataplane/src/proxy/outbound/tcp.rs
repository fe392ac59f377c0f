//! The TCP path: opening the upstream side a route names, then one relay
//! for every route.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use nodemesh_core::identity::SpiffeId;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    Outbound,
    route::{Refusal, Route, route},
};
use crate::{
    proxy::{
        balance::InFlight,
        inbound::{Accepted, Accounting, LocalError},
        pods::ServedPod,
        relay::{Reset, UpstreamIo, relay, reset_if_we_die},
        tunnel::OpenError,
    },
    state::ServiceTarget,
    telemetry::ConnectError,
};

/// Why a route could not be followed.
pub(super) enum Failure {
    Refused(Refusal),
    Connect(std::io::Error),
    /// To a pod on this node (through the inbound side).
    Local(LocalError),
    Tunnel(IpAddr, OpenError),
    /// A Service with no endpoint to dial.
    NoEndpoints,
}

impl Failure {
    /// The destination's inbound policy refused the client (an HTTP
    /// client gets a 403).
    pub(super) fn forbidden(&self) -> bool {
        match self {
            Failure::Local(LocalError::Refused(_)) => true,
            Failure::Tunnel(_, OpenError::Refused { status, .. }) => {
                *status == hyper::StatusCode::FORBIDDEN
            }
            _ => false,
        }
    }

    /// Logs it (for a connection to `dst`) and says which metric reason
    /// it is.
    pub(super) fn log(&self, dst: SocketAddr) -> ConnectError {
        match self {
            Failure::Refused(why @ Refusal::UnknownService) => {
                warn!(%dst, %why, "refusing a connection to a Service not known yet");
                ConnectError::NoEndpoints
            }
            Failure::Refused(why) => {
                warn!(%dst, %why, "refusing to send a meshed connection in the clear");
                ConnectError::Tunnel
            }
            Failure::Connect(e) | Failure::Local(LocalError::Io(e)) => {
                let reason = ConnectError::classify(e);
                warn!(%dst, %reason, error = %e, "cannot connect to destination");
                reason
            }
            Failure::Local(e) => {
                debug!(%dst, error = %e, "not delivered to the pod on this node");
                ConnectError::Other
            }
            Failure::Tunnel(node, e) => {
                warn!(%dst, %node, error = %e, "cannot open a tunnel stream");
                ConnectError::Tunnel
            }
            Failure::NoEndpoints => {
                warn!(%dst, "the Service has no ready endpoints");
                ConnectError::NoEndpoints
            }
        }
    }
}

/// An upstream connection made for a route.
pub struct Opened {
    pub io: UpstreamIo,
    /// Carried over mutual TLS.
    pub tls: bool,
    /// The other end's identity, when it is a meshed pod.
    pub peer: Option<SpiffeId>,
    /// A pod on this node reached through the inbound side: its
    /// accounting.
    pub local: Option<Accounting>,
    /// A new tunnel connection was dialled for it: the time it took says
    /// little about the endpoint.
    pub dialled: bool,
}

/// At most this many endpoints are tried for one connection to a Service.
const SERVICE_ATTEMPTS: usize = 3;

impl Outbound {
    /// Carries `client` to `dst` the way `route` says.
    pub(super) async fn tcp(
        &self,
        client: TcpStream,
        pod: &ServedPod,
        route: Route<'_>,
        dst: SocketAddr,
    ) {
        match self.open(route, pod, dst).await {
            Ok(opened) => self.carry(client, pod, opened, dst).await,
            Err(failure) => {
                let reason = failure.log(dst);
                pod.outbound.connect_error(reason);
                client.reset();
            }
        }
    }

    /// Carries `client` to an endpoint of `service` (dialled at `vip`):
    /// the balancer's choice, another if that one cannot be reached (a
    /// meshed endpoint whose node is unknown is skipped, never reached in
    /// the clear); a reset if none can.
    pub(super) async fn service_tcp(
        &self,
        client: TcpStream,
        pod: &ServedPod,
        service: &Arc<ServiceTarget>,
        vip: SocketAddr,
        exclude: &[SocketAddr],
    ) {
        let svc = format!("{}/{}", service.service.namespace, service.service.name);
        let mut tried: Vec<SocketAddr> = exclude.to_vec();
        let mut last = None;
        while tried.len() < SERVICE_ATTEMPTS + exclude.len() {
            let Some(work) = self.balancer.pick(&service.tiers(), &tried) else {
                break;
            };
            let endpoint = work.endpoint().addr;
            tried.push(endpoint);
            match self.open_endpoint(pod, &work).await {
                Ok(opened) => {
                    debug!(service = %svc, %vip, %endpoint, "connected to a Service endpoint");
                    // The connection is the endpoint's load while it lasts.
                    self.carry(client, pod, opened, endpoint).await;
                    drop(work);
                    return;
                }
                Err(failure) => {
                    let reason = failure.log(endpoint);
                    pod.outbound.connect_error(reason);
                    debug!(service = %svc, %endpoint, %reason, "trying another endpoint");
                    last = Some(reason);
                }
            }
        }
        match last {
            Some(reason) => {
                warn!(service = %svc, %vip, tried = tried.len(), %reason, "no endpoint of the Service could be reached; resetting the client");
            }
            None => {
                warn!(service = %svc, %vip, "the Service has no ready endpoints; resetting the client")
            }
        }
        pod.outbound.connect_error(ConnectError::NoEndpoints);
        client.reset();
    }

    /// Opens the endpoint the balancer picked for `work` (routed as any
    /// destination), telling the balancer how it went: reached (its time
    /// sampled unless a new tunnel connection was in it), or failed (unless
    /// refused by routing, which is not the endpoint's doing).
    pub(super) async fn open_endpoint(
        &self,
        pod: &ServedPod,
        work: &InFlight,
    ) -> Result<Opened, Failure> {
        let endpoint = work.endpoint().addr;
        let upstream = self.state.upstream(endpoint);
        let route = route(self.ctx(), &pod.pod, &upstream);
        match self.open(route, pod, endpoint).await {
            Ok(opened) => {
                if opened.dialled {
                    work.reached();
                } else {
                    work.success();
                }
                Ok(opened)
            }
            Err(failure) => {
                if !matches!(failure, Failure::Refused(_)) {
                    work.failure();
                }
                Err(failure)
            }
        }
    }

    /// Relays between `client` and what was opened for it.
    pub(super) async fn carry(
        &self,
        mut client: TcpStream,
        pod: &ServedPod,
        opened: Opened,
        dst: SocketAddr,
    ) {
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
        match relay(
            &mut client,
            &mut io,
            &self.cfg.buffers,
            pod.share.idle_timeout().unwrap_or(self.cfg.idle_timeout),
            &up[..n],
            &down[..n],
        )
        .await
        {
            Ok(n) => {
                debug!(%dst, sent = n.client_to_server, received = n.server_to_client, "closed")
            }
            Err(e) => debug!(%dst, error = %e, "relay ended with an error; both sides reset"),
        }
    }

    pub(super) async fn open(
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
                    dialled: false,
                })
            }
            Route::Local { dst: dst_pod, id } => {
                let Accepted {
                    stream, accounting, ..
                } = self
                    .inbound
                    .open_local(pod, dst_pod, dst)
                    .await
                    .map_err(Failure::Local)?;
                Ok(Opened {
                    io: UpstreamIo::Tcp(stream),
                    tls: false,
                    peer: Some(id.clone()),
                    local: Some(accounting),
                    dialled: false,
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
                // The app at the other end sees the client pod's address
                // (as known now: the pod may have been served before its
                // addresses were).
                let client = pod
                    .address_for(&self.state, dst)
                    .map(|ip| SocketAddr::new(ip, 0));
                let (stream, slot, dialled) = pool
                    .open(&pod.pod.uid, src, node_ip, dst_id, dst, client)
                    .await
                    .map_err(|e| Failure::Tunnel(node_ip, e))?;
                Ok(Opened {
                    io: UpstreamIo::Tunnel(stream, slot),
                    tls: true,
                    peer: Some(dst_id.clone()),
                    local: None,
                    dialled,
                })
            }
        }
    }
}
