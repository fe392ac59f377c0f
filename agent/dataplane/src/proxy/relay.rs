//! The opaque relay, shared by every path: bytes both ways between two
//! streams (TCP sockets, or a TCP socket and a tunnel stream), bounded
//! buffers, byte counts as they pass, half-close carried across, resets
//! carried across.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A stream that can be made to end with a reset rather than a clean close.
pub trait Reset {
    /// The coming close sends RST instead of FIN.
    fn reset(&self);

    /// The coming close is a normal one (FIN, after every byte is out).
    fn close_gracefully(&self) {}
}

impl Reset for TcpStream {
    fn reset(&self) {
        let _ = self.set_zero_linger();
    }

    fn close_gracefully(&self) {
        let _ = socket2::SockRef::from(self).set_linger(None);
    }
}

/// Makes `stream` end with a reset if the agent dies: the kernel closes a
/// dead process's sockets, and without this a client reading a download
/// would see a clean end of stream and take a truncated answer for a
/// whole one. [`relay`] undoes it once both directions ended normally.
pub fn reset_if_we_die(stream: &TcpStream) {
    stream.reset();
}

impl Reset for TunnelStream {
    /// A tunnel stream dropped before its end is reset (RST_STREAM) by
    /// HTTP/2 itself.
    fn reset(&self) {}
}

/// A stream on the upstream side: a TCP connection, or a stream of the
/// tunnel to another node.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

/// One CONNECT stream of the tunnel, as bytes.
pub type TunnelStream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

impl Reset for UpstreamIo {
    fn reset(&self) {
        match self {
            Self::Tcp(s) => s.reset(),
            Self::Tunnel(s) => s.reset(),
        }
    }

    fn close_gracefully(&self) {
        if let Self::Tcp(s) = self {
            s.close_gracefully();
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Counts the bytes read through it (into every counter given).
struct Counted<'a, T> {
    inner: &'a mut T,
    counters: &'a [&'a Counter],
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            for c in self.counters {
                c.inc_by(n as u64);
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Bytes moved each way by [`relay`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Copies `client` ⇄ `server` until both directions have finished. When one
/// side closes its write half, the other side's write half is shut down too
/// (half-close). On an error (typically a reset) both sockets are closed
/// with a reset, so the peers see what they would have seen without the
/// proxy.
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    buffer_size: usize,
    client_sent: &[&Counter],
    server_sent: &[&Counter],
) -> io::Result<Relayed>
where
    C: AsyncRead + AsyncWrite + Unpin + Reset,
    S: AsyncRead + AsyncWrite + Unpin + Reset,
{
    let result = {
        let mut c = Counted {
            inner: &mut *client,
            counters: client_sent,
        };
        let mut s = Counted {
            inner: &mut *server,
            counters: server_sent,
        };
        tokio::io::copy_bidirectional_with_sizes(&mut c, &mut s, buffer_size, buffer_size).await
    };
    match result {
        Ok((up, down)) => {
            client.close_gracefully();
            server.close_gracefully();
            Ok(Relayed {
                client_to_server: up,
                server_to_client: down,
            })
        }
        Err(e) => {
            client.reset();
            server.reset();
            Err(e)
        }
    }
}

/// A stream that counts the bytes read from it and written to it, as they
/// pass (for the HTTP path, where hyper owns the stream).
pub struct CountedIo<T> {
    inner: T,
    /// Bytes read from `inner` go to each of these.
    read: Vec<Counter>,
    /// Bytes written to `inner` go to each of these.
    written: Vec<Counter>,
}

impl<T> CountedIo<T> {
    pub fn new(inner: T, read: Vec<Counter>, written: Vec<Counter>) -> Self {
        Self {
            inner,
            read,
            written,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            for c in &self.read {
                c.inc_by(n);
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            for c in &self.written {
                c.inc_by(*n as u64);
            }
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
