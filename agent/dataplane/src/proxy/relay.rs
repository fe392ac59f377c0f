//! The opaque relay, shared by every path: bytes both ways between two
//! streams (TCP sockets, or a TCP socket and a tunnel stream), buffers
//! held only while data moves ([`Buffers`]), byte counts as they pass,
//! half-close carried across, resets carried across, silence both ways
//! for the idle timeout closed.
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
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

/// A relay buffer's size at first: a connection moving little never
/// holds more.
pub const SMALL_BUFFER: usize = 16 * 1024;

/// Large buffers kept for reuse when given back (the rest are freed).
const KEPT_LARGE: usize = 64;

/// The relays' buffers. A direction takes one only while data moves — when
/// a read would wait, it is given back, so an idle connection holds none
/// — small first, large (`--buffer-size`) once a read filled a small one,
/// and only while the large ones in use stay within the memory budget
/// (else small). Large ones are kept for reuse, a few.
#[derive(Clone, Debug)]
pub struct Buffers(Arc<Pool>);

#[derive(Debug)]
struct Pool {
    large: usize,
    /// Bytes of large buffers allowed out at once.
    budget: u64,
    out: AtomicU64,
    kept: Mutex<Vec<Box<[u8]>>>,
}

impl Buffers {
    /// Large buffers of `large` bytes, at most `budget` bytes of them out.
    pub fn new(large: usize, budget: u64) -> Self {
        Self(Arc::new(Pool {
            large: large.max(SMALL_BUFFER),
            budget,
            out: AtomicU64::new(0),
            kept: Mutex::default(),
        }))
    }

    fn take(&self, large: bool) -> Buf {
        let p = &self.0;
        let size = p.large as u64;
        if large && p.large > SMALL_BUFFER {
            let before = p.out.fetch_add(size, Ordering::Relaxed);
            if before + size <= p.budget {
                let kept = p.kept.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let buf = kept.unwrap_or_else(|| vec![0; p.large].into_boxed_slice());
                return Buf { buf, large: true };
            }
            p.out.fetch_sub(size, Ordering::Relaxed);
        }
        Buf {
            buf: vec![0; SMALL_BUFFER].into_boxed_slice(),
            large: false,
        }
    }

    fn give(&self, buf: Buf) {
        if !buf.large {
            return;
        }
        let p = &self.0;
        p.out.fetch_sub(p.large as u64, Ordering::Relaxed);
        let mut kept = p.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_LARGE {
            kept.push(buf.buf);
        }
    }

    /// Frees the large buffers kept for reuse (many connections closed:
    /// their memory goes back).
    pub fn trim(&self) {
        self.0
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether a large buffer may be taken now.
    fn has_room(&self) -> bool {
        let p = &self.0;
        p.out.load(Ordering::Relaxed) + p.large as u64 <= p.budget
    }

    /// Bytes of large buffers out now.
    pub fn large_out(&self) -> u64 {
        self.0.out.load(Ordering::Relaxed)
    }
}

struct Buf {
    buf: Box<[u8]>,
    large: bool,
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
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// client ⇄ [relay] ⇄ server: the ends the test holds, and the relay.
    async fn relayed(
        buffers: &Buffers,
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Result<Relayed, RelayError>>,
    ) {
        let (client, mut near) = pair().await;
        let (mut far, server) = pair().await;
        let b = buffers.clone();
        let task =
            tokio::spawn(async move { relay(&mut near, &mut far, &b, idle, &[], &[]).await });
        (client, server, task)
    }

    #[tokio::test]
    async fn bytes_half_closes_and_buffers_held_only_while_data_moves() {
        let buffers = Buffers::new(256 << 10, 1 << 30);
        let (mut client, mut server, task) = relayed(&buffers, Duration::from_secs(60)).await;
        // Idle: no buffer is out (small ones are not counted; large are).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(buffers.large_out(), 0);
        // Bulk one way: reads fill the small buffer, then a large one.
        let body = vec![7u8; 8 << 20];
        let writer = tokio::spawn(async move {
            client.write_all(&body).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0u8; 8 << 20];
        server.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        // The client's half-close reached the server.
        assert_eq!(server.read(&mut [0u8; 1]).await.unwrap(), 0);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        let n = task.await.unwrap().unwrap();
        assert_eq!(n.client_to_server, 8 << 20);
        assert_eq!(n.server_to_client, 4);
        assert_eq!(buffers.large_out(), 0, "every buffer given back");
    }

    #[tokio::test]
    async fn a_relay_dropped_mid_transfer_gives_its_buffers_back() {
        let buffers = Buffers::new(256 << 10, 1 << 30);
        let (mut client, server, task) = relayed(&buffers, Duration::from_secs(60)).await;
        // The server never reads: the relay holds a full large buffer.
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&vec![1u8; 32 << 20]).await;
            client
        });
        for _ in 0..100 {
            if buffers.large_out() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(buffers.large_out() > 0, "a large buffer is out");
        // Cut, as a policy change cuts a connection.
        task.abort();
        let _ = task.await;
        assert_eq!(buffers.large_out(), 0, "given back when dropped");
        writer.abort();
        drop(server);
    }

    #[tokio::test]
    async fn large_buffers_stay_within_their_budget() {
        // Room for one large buffer: the second relay moves data with
        // small ones.
        let buffers = Buffers::new(64 << 10, 64 << 10);
        let mut ends = Vec::new();
        for _ in 0..2 {
            ends.push(relayed(&buffers, Duration::from_secs(60)).await);
        }
        for (client, server, _) in &mut ends {
            let body = vec![1u8; 1 << 20];
            let (r, w) = (server, client);
            let (sent, got) = tokio::join!(w.write_all(&body), async {
                let mut got = vec![0u8; 1 << 20];
                r.read_exact(&mut got).await.map(|_| got)
            });
            sent.unwrap();
            assert_eq!(got.unwrap(), body);
            assert!(buffers.large_out() <= 64 << 10);
        }
    }

    #[tokio::test]
    async fn silence_both_ways_for_the_idle_timeout_resets_both_sides() {
        let buffers = Buffers::new(64 << 10, 1 << 20);
        let idle = Duration::from_millis(300);
        // Talking every 100 ms: never idle.
        let (mut client, mut server, task) = relayed(&buffers, idle).await;
        for _ in 0..8 {
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!task.is_finished(), "a relay that talks stays open");
        // Then silent: both sides are reset.
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, RelayError::Idle(_)), "{err}");
        let mut buf = [0u8; 1];
        assert!(
            client
                .read(&mut buf)
                .await
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
        );
        assert!(
            server
                .read(&mut buf)
                .await
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
        );
        // A half-closed relay whose other side never speaks goes too.
        let (mut client, _server, task) = relayed(&buffers, idle).await;
        client.shutdown().await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a half-open relay is closed")
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, RelayError::Idle(_)));
    }
}
