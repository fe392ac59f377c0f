//! Outbound: connections a meshed pod makes, redirected by `connect4` to
//! the pod's own `127.0.0.1:15001`. For each one, in this order:
//! 1. its original destination ([`super::orig_dst`]);
//! 2. what is there ([`crate::state::StateStore::upstream`]);
//! 3. a Service's cluster IP and port: an endpoint, chosen by the
//!    [`Balancer`] among the ready ones (power of two choices over
//!    peak-EWMA × load), another one tried if it cannot be reached;
//! 4. how to get there ([`route`]: direct, a pod on this node, the tunnel
//!    to another node, or refused — a refused endpoint is skipped);
//! 5. the TCP path ([`tcp`]): open that, relay.
//!
//! Protocol detection and per-request balancing will sit between 4 and 5
//! (`detect`, `http`).
//!
//! A destination that cannot be reached (or a Service with no endpoint
//! that can) gives the client a reset, a log line and a metric.
pub mod route;
mod tcp;

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::warn;

use self::route::{RouteCtx, route};
use super::{
    balance::Balancer,
    connect::Connector,
    inbound::Inbound,
    orig_dst,
    pods::ServedPod,
    relay::{Reset, reset_if_we_die},
    tunnel::TunnelPool,
};
use crate::{
    state::{StateStore, Target},
    telemetry::ConnectError,
};

/// The outbound side of the node's proxy, shared by every pod's listener.
pub struct Outbound {
    state: StateStore,
    node: String,
    orig_dst: Arc<dyn orig_dst::OrigDsts>,
    connector: Arc<dyn Connector>,
    inbound: Arc<Inbound>,
    /// The tunnel to other nodes; meshed pods are routed as such only when
    /// it is there.
    tunnel: Option<Arc<TunnelPool>>,
    balancer: Arc<Balancer>,
    buffer_size: usize,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("node", &self.node)
            .field("mesh", &self.tunnel.is_some())
            .finish_non_exhaustive()
    }
}

impl Outbound {
    pub(super) fn new(
        state: StateStore,
        orig_dst: Arc<dyn orig_dst::OrigDsts>,
        connector: Arc<dyn Connector>,
        inbound: Arc<Inbound>,
        tunnel: Option<Arc<TunnelPool>>,
        balancer: Arc<Balancer>,
        buffer_size: usize,
    ) -> Self {
        Self {
            node: state.node(),
            state,
            orig_dst,
            connector,
            inbound,
            tunnel,
            balancer,
            buffer_size,
        }
    }

    fn ctx(&self) -> RouteCtx<'_> {
        RouteCtx {
            node: &self.node,
            mesh: self.tunnel.is_some(),
        }
    }

    /// Serves one connection accepted on `pod`'s listener.
    pub(super) async fn handle(&self, client: TcpStream, pod: Arc<ServedPod>) {
        let _open = pod.outbound.open();
        let _ = client.set_nodelay(true);
        reset_if_we_die(&client);
        let Some(dst) = orig_dst::wait_for(self.orig_dst.as_ref(), &client).await else {
            warn!("no original destination recorded for this connection; resetting it");
            pod.outbound
                .connect_error(ConnectError::NoOriginalDestination);
            client.reset();
            return;
        };
        let upstream = self.state.upstream(dst);
        if let Target::Service(service) = &upstream.target {
            return self.service_tcp(client, &pod, service, dst).await;
        }
        let route = route(self.ctx(), &pod.pod, &upstream);
        self.tcp(client, &pod, route, dst).await;
    }
}
