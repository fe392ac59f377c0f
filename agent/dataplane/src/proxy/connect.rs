//! Making upstream connections: the one place the proxy dials, with a
//! timeout. Injected ([`Connector`]) so tests run the whole proxy on
//! 127.0.0.1 without network namespaces or root.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::Netns;

/// Dials TCP connections for the proxy.
pub trait Connector: Send + Sync + 'static {
    /// Connects to `dst` from inside `from` (a pod's network namespace, so
    /// the destination sees the pod's address), or from the agent's own
    /// when `None`. Gives up after the connect timeout.
    fn connect(
        &self,
        from: Option<&Arc<Netns>>,
        dst: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// The real one: sockets made in the right namespace, then connected.
#[derive(Clone, Debug)]
pub struct NetnsConnector {
    pub timeout: Duration,
}

impl Connector for NetnsConnector {
    fn connect(
        &self,
        from: Option<&Arc<Netns>>,
        dst: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        let socket = match from {
            Some(netns) => netns.tcp_socket(dst).and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(TcpSocket::from_std_stream(s.into()))
            }),
            None => match dst {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            },
        };
        connect_with_timeout(socket, dst, self.timeout)
    }
}

/// Connects `socket` to `dst` within `timeout`; `TimedOut` if it does not.
pub fn connect_with_timeout(
    socket: io::Result<TcpSocket>,
    dst: SocketAddr,
    timeout: Duration,
) -> BoxFuture<'static, io::Result<TcpStream>> {
    Box::pin(async move {
        let stream = tokio::time::timeout(timeout, socket?.connect(dst))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    })
}
