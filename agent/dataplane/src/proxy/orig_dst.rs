//! Where a redirected connection was going: recorded by eBPF (`connect4`,
//! re-keyed by `sock_ops` to the accepted socket's cookie) and read once
//! by the proxy. Injected ([`OrigDsts`]) so tests can say it themselves.
use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::{netns::socket_cookie, redirect::Redirect};

/// Gives the original destination of an accepted connection.
pub trait OrigDsts: Send + Sync + 'static {
    /// What the destination of `conn` is recorded under (read once).
    fn key(&self, conn: &TcpStream) -> Option<u64>;

    /// The destination recorded under `key`, consumed; `None` if there is
    /// none (yet).
    fn take(&self, key: u64) -> Option<SocketAddr>;
}

/// eBPF records it by the accepted socket's cookie.
impl OrigDsts for Redirect {
    fn key(&self, conn: &TcpStream) -> Option<u64> {
        socket_cookie(conn).ok()
    }

    fn take(&self, cookie: u64) -> Option<SocketAddr> {
        self.take_orig_dst(cookie)
    }
}

/// Tells eBPF which real client a connection the agent makes to an app
/// (from inside its pod) carries, so the app's `accept`/`getpeername` see
/// that client. Injected: tests without eBPF have none.
pub trait ClientAddrs: Send + Sync + 'static {
    /// The agent's socket `cookie` (not yet connected) carries `client`'s
    /// connection (port 0: the agent socket's own port).
    fn record(&self, cookie: u64, client: SocketAddr) -> io::Result<()>;

    /// Forgets a record whose connection never reached the app.
    fn forget(&self, cookie: u64);
}

impl ClientAddrs for Redirect {
    fn record(&self, cookie: u64, client: SocketAddr) -> io::Result<()> {
        self.inbound_peer(cookie, client)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn forget(&self, cookie: u64) {
        self.forget_inbound_peer(cookie);
    }
}

/// How long to wait for `sock_ops` to re-key the original destination: it
/// runs as the handshake completes, so it is normally there before accept.
const WAIT: Duration = Duration::from_millis(50);

/// The original destination of `conn`, waiting briefly for it.
pub async fn wait_for(source: &dyn OrigDsts, conn: &TcpStream) -> Option<SocketAddr> {
    let key = source.key(conn)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(dst) = source.take(key) {
            return Some(dst);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
