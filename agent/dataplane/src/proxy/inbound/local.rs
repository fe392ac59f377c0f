//! Same-node connections through the proxy once: a served pod to a meshed
//! pod on this node, authorized and delivered as the client pod.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use super::{Accepted, Accounting, Door, Inbound, Recheck, policy::Client};
use crate::{
    proxy::{admission::Refusal, http::ServerSide, pods::ServedPod, relay::reset_if_we_die},
    state::Pod,
    telemetry::{InboundDenial, http::Protocol, tap::Tapped},
};

/// Why a same-node connection (or a request over one) to a served pod did
/// not go: the destination's policy says no (an HTTP client gets a 403),
/// or it could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("refused by the destination's inbound policy ({0})")]
    Refused(InboundDenial),
    #[error("the destination pod is over its admission share ({0})")]
    Overloaded(Refusal),
    #[error("the client pod has no address in the destination's family")]
    NoAddress,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Inbound {
    /// Whether `src`, a served pod on this node, may reach `dst` in
    /// `dst_served` (through the proxy once): per connection, and again per
    /// HTTP request over a pooled one. Its address, when it may.
    pub fn authorize_local(
        &self,
        src: &ServedPod,
        dst_served: &ServedPod,
        dst: SocketAddr,
    ) -> Result<IpAddr, LocalError> {
        // The client pod's address as known now (it may have been served
        // before its addresses were).
        let Some(src_ip) = src.address_for(&self.state, dst) else {
            return Err(LocalError::NoAddress);
        };
        let client = match src.pod.identity() {
            Some(id) => Client::Meshed(id.uri()),
            None => Client::Plain(src_ip),
        };
        self.authorize(dst_served, client, src_ip, dst.port(), false)
            .map(|()| src_ip)
            .map_err(LocalError::Refused)
    }

    /// The server side of a request from `src` to `dst`, both served here
    /// (through the proxy once), answered with `(status, grpc status)`
    /// since `started`: counted as this pod's inbound request, and shown
    /// to a tap as such when the client's side is (`client_tap`).
    pub fn local_request(
        &self,
        src: &ServedPod,
        dst: &ServedPod,
        protocol: Protocol,
        started: Instant,
        client_tap: Option<&Tapped>,
        (status, grpc_status): (u16, Option<u32>),
    ) -> ServerSide {
        let metric = dst.http.inbound_request(
            &dst.source,
            src.pod.identity().map(|id| id.uri()),
            false,
            protocol,
        );
        if let Some(m) = &metric {
            m.latency(started.elapsed());
        }
        let tap = client_tap.map(|t| {
            let mut t = t.server_side();
            t.sent();
            t.response(status, grpc_status);
            t
        });
        ServerSide { metric, tap }
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
    ) -> Result<Accepted, LocalError> {
        let served = self.pods.get(&dst_pod.uid).filter(|s| s.inbound.is_some());
        let mut ticket = None;
        let (stream, client) = match &served {
            // Once through the proxy: delivered inside the destination pod
            // (its inbound capture lets the agent by), as the client pod.
            Some(dst_served) => {
                let ip = self.authorize_local(src, dst_served, dst)?;
                match dst_served.share.connection(Some(ip)) {
                    Ok(t) => ticket = Some(t),
                    Err(why) => {
                        self.refused(dst_served, Door::Local, why, ip);
                        return Err(LocalError::Overloaded(why));
                    }
                }
                let client = SocketAddr::new(ip, 0);
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
            accounting: Accounting::new(served, ticket),
            client,
        })
    }
}
