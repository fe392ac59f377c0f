//! The opaque relay, shared by every path: bytes both ways between two
//! streams (TCP sockets, or a TCP socket and a tunnel stream), buffers
//! held only while data moves ([`Buffers`]), byte counts as they pass,
//! half-close carried across, resets carried across, silence both ways
//! for the idle timeout closed.
mod buffers;

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use self::buffers::Buf;
pub use self::buffers::{Buffers, SMALL_BUFFER};
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
/// tunnel to another node (counted on its pooled connection while open).
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(TunnelStream, StreamSlot),
}

/// One open stream of a pooled tunnel connection, given back when dropped
/// (the pool opens another connection when one is full).
#[derive(Debug)]
pub struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    /// Takes one of `count`.
    pub fn take(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One CONNECT stream of the tunnel, as bytes.
pub type TunnelStream = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

impl Reset for UpstreamIo {
    fn reset(&self) {
        match self {
            Self::Tcp(s) => s.reset(),
            Self::Tunnel(s, _) => s.reset(),
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
            Self::Tunnel(s, _) => Pin::new(s).poll_read(cx, buf),
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
            Self::Tunnel(s, _) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(s, _) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(s, _) => Pin::new(s).poll_shutdown(cx),
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

/// One direction of a relay: read into a buffer, write it all out, again;
/// the reader's end shuts the writer's write side.
struct Half {
    /// Where its buffer goes back to, however the relay ends (also when
    /// its future is dropped: a cut connection).
    buffers: Buffers,
    buf: Option<Buf>,
    pos: usize,
    cap: usize,
    /// A read filled a small buffer: the next one is large.
    wants_large: bool,
    read_done: bool,
    need_flush: bool,
    shut: bool,
    amt: u64,
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.buffers.give(b);
        }
    }
}

impl Half {
    fn new(buffers: &Buffers) -> Self {
        Self {
            buffers: buffers.clone(),
            buf: None,
            pos: 0,
            cap: 0,
            wants_large: false,
            read_done: false,
            need_flush: false,
            shut: false,
            amt: 0,
        }
    }

    /// Copies until the reader ends and the writer is shut down.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        buffers: &Buffers,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                let held = self
                    .buf
                    .get_or_insert_with(|| buffers.take(self.wants_large));
                let mut rb = ReadBuf::new(&mut held.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing to read now: the buffer goes back.
                        if let Some(b) = self.buf.take() {
                            buffers.give(b);
                        }
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                            if let Some(b) = self.buf.take() {
                                buffers.give(b);
                            }
                        } else {
                            if n == held.buf.len() && !held.large {
                                self.wants_large = true;
                            }
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let Some(held) = &self.buf else {
                    return Poll::Ready(Err(io::ErrorKind::Other.into()));
                };
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &held.buf[self.pos..self.cap])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.amt += n as u64;
                self.need_flush = true;
            }
            // All written: a small buffer that filled makes way for a
            // large one, if one may be had now.
            if self.wants_large && self.buf.as_ref().is_some_and(|b| !b.large) && buffers.has_room()
            {
                self.buf = None;
            }
            if self.read_done {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                if !self.shut {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
}

/// Why a relay ended other than both sides finishing.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("silent both ways for {0:?}: closed")]
    Idle(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Copies `client` ⇄ `server` until both directions have finished. When one
/// side closes its write half, the other side's write half is shut down too
/// (half-close). On an error (typically a reset), or when nothing moved
/// either way for `idle`, both sockets are closed with a reset, so the
/// peers see what they would have seen without the proxy. Buffers are
/// `buffers`' (held only while data moves).
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    buffers: &Buffers,
    idle: Duration,
    client_sent: &[&Counter],
    server_sent: &[&Counter],
) -> Result<Relayed, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + Reset,
    S: AsyncRead + AsyncWrite + Unpin + Reset,
{
    let (mut up, mut down) = (Half::new(buffers), Half::new(buffers));
    let result = {
        let mut c = Counted {
            inner: &mut *client,
            counters: client_sent,
        };
        let mut s = Counted {
            inner: &mut *server,
            counters: server_sent,
        };
        let silence = tokio::time::sleep(idle);
        tokio::pin!(silence);
        let mut last = (0u64, 0u64);
        let mut active = tokio::time::Instant::now();
        let mut done: (Option<u64>, Option<u64>) = (None, None);
        std::future::poll_fn(|cx| {
            if done.0.is_none()
                && let Poll::Ready(r) =
                    up.poll_copy(cx, buffers, Pin::new(&mut c), Pin::new(&mut s))
            {
                done.0 = Some(r?);
            }
            if done.1.is_none()
                && let Poll::Ready(r) =
                    down.poll_copy(cx, buffers, Pin::new(&mut s), Pin::new(&mut c))
            {
                done.1 = Some(r?);
            }
            if let (Some(a), Some(b)) = done {
                return Poll::Ready(Ok((a, b)));
            }
            // Bytes moved: the silence starts again (the timer is moved
            // when it fires, not on every read).
            let moved = (up.amt, down.amt);
            if moved != last {
                last = moved;
                active = tokio::time::Instant::now();
            }
            while silence.as_mut().poll(cx).is_ready() {
                let due = active + idle;
                if due <= tokio::time::Instant::now() {
                    return Poll::Ready(Err(RelayError::Idle(idle)));
                }
                silence.as_mut().reset(due);
            }
            Poll::Pending
        })
        .await
    };
    drop((up, down));
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

#[cfg(test)]
mod tests;
