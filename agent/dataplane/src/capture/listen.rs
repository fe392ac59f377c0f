//! The outbound listeners inside a pod's netns: `127.0.0.1:<port>` always,
//! `[::1]:<port>` where the pod has IPv6 loopback (IPv6 connects are
//! redirected there; IPv4-mapped ones go to the IPv4 listener).
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tracing::debug;

use super::CaptureError;
use crate::netns::Netns;

/// Opens the pod's listeners (made inside its netns).
pub(super) fn open(netns: &Netns, port: u16) -> Result<Vec<TcpListener>, CaptureError> {
    let listen_err = |source| CaptureError::Listen {
        port,
        netns: netns.path().to_owned(),
        source,
    };
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let (v4, v6) = netns
        .enter(|| (bind(v4), bind(v6)))
        .map_err(|e| listen_err(e.into()))?;
    let mut listeners = vec![TcpListener::from_std(v4.map_err(listen_err)?).map_err(listen_err)?];
    match v6.and_then(TcpListener::from_std) {
        Ok(l) => listeners.push(l),
        // No IPv6 in the pod: its IPv6 connects fail (closed), as they
        // would without the mesh.
        Err(e) => debug!(netns = %netns.path().display(), error = %e, "no IPv6 listener"),
    }
    Ok(listeners)
}

/// The inbound listeners inside a pod's netns (`127.0.0.1:<port>`, and
/// `[::1]:<port>` where the pod has IPv6): inbound capture hands them the
/// connections to the pod's addresses. Bound to loopback, so nothing but
/// `sk_lookup` brings them a connection for the pod's addresses — not the
/// agent's own deliveries (which would loop), not a client dialling
/// `<pod>:15006`. The IPv6 one is `None` without IPv6.
pub(super) fn open_inbound(
    netns: &Netns,
    port: u16,
) -> Result<(TcpListener, Option<TcpListener>), CaptureError> {
    let listen_err = |source| CaptureError::Listen {
        port,
        netns: netns.path().to_owned(),
        source,
    };
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let (v4, v6) = netns
        .enter(|| (bind(v4), bind(v6)))
        .map_err(|e| listen_err(e.into()))?;
    let v4 = TcpListener::from_std(v4.map_err(listen_err)?).map_err(listen_err)?;
    Ok((v4, v6.and_then(TcpListener::from_std).ok()))
}

/// One listener. `SO_REUSEPORT` lets a new agent listen before the old one
/// has closed, so an upgrade refuses no connection.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
