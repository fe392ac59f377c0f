//! Same-node connections through the proxy once: a served pod to a meshed
//! pod on this node, authorized and delivered as the client pod.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{Accepted, Accounting, Inbound, PolicyRefused, Recheck, policy::Client};
use crate::{
    proxy::{pods::ServedPod, relay::reset_if_we_die},
    state::Pod,
};

impl Inbound {
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
