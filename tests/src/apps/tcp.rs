//! The TCP role: serve TCP echo on a port (remembering who connected), exchange a
//! deterministic byte pattern with a server both ways at once and check it,
//! and measure request/response latency and bulk throughput.
//!
//! Transfers use non-blocking sockets and `poll`, the way event-loop servers
//! do; see the README's limits for what blocking full-duplex clients meet
//! on the sk_msg fast path.
use std::{
    collections::BTreeMap,
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};

use super::{Container, Role, serve_lines};

/// What the test asks the pod app to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Serve echo on `port` (all addresses).
    Listen { port: u16 },
    /// Connect to `to`, send `bytes` of the pattern for `seed` while
    /// reading the echo, half-close, read to the end, compare.
    Exchange {
        to: SocketAddr,
        bytes: u64,
        seed: u64,
        timeout_ms: u64,
    },
    /// Peers that connected to our echo server on `port`.
    Peers { port: u16 },
    /// `count` round trips of `size` bytes on one connection; latencies.
    RoundTrips {
        to: SocketAddr,
        count: u32,
        size: u32,
    },
    /// Send `bytes` one way as fast as possible (the echo comes back and is
    /// read concurrently); elapsed time.
    Bulk { to: SocketAddr, bytes: u64 },
    /// Send `text` `repeat` times, half-close, read the echo to the end and
    /// compare.
    Text {
        to: SocketAddr,
        text: String,
        repeat: u32,
    },
    /// One connection held for `seconds`, with a small round trip every
    /// `interval_ms`; latencies.
    Paced {
        to: SocketAddr,
        seconds: u32,
        interval_ms: u32,
    },
    /// `count` new connections, `pause_ms` apart: for each, the time to
    /// connect and complete a first 1-byte round trip.
    Setup {
        to: SocketAddr,
        count: u32,
        pause_ms: u32,
    },
}

/// What the pod app answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Listening { port: u16 },
    Exchanged(Exchange),
    Failed(Failure),
    Peers { peers: Vec<SocketAddr> },
    RoundTrips { micros: Vec<u32> },
    Bulk { bytes: u64, micros: u64 },
}

/// The outcome of a successful [`Request::Exchange`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exchange {
    pub sent: u64,
    pub received: u64,
    /// Every byte came back, in order, unchanged.
    pub intact: bool,
    /// The client socket's local address, as the app saw it.
    pub local: SocketAddr,
}

/// Why a request failed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// "refused", "reset", "timeout" or "other".
    pub kind: String,
    pub message: String,
    /// Bytes moved before the failure.
    pub sent: u64,
    pub received: u64,
}

impl Failure {
    fn from_io(e: &io::Error, sent: u64, received: u64) -> Self {
        let kind = match e.kind() {
            ErrorKind::ConnectionRefused => "refused",
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                "reset"
            }
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
            _ => "other",
        };
        Self {
            kind: kind.into(),
            message: e.to_string(),
            sent,
            received,
        }
    }
}

/// A running TCP app, seen from the test.
#[derive(Debug)]
pub struct TcpApp(Container);

impl TcpApp {
    pub(crate) fn start(netns: &Path, cgroup: &Path, pod: &str) -> Self {
        Self(Container::start(netns, cgroup, pod, Role::Tcp))
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    fn call(&mut self, req: &Request) -> Response {
        self.0.call(req)
    }

    /// Serves echo on `port`.
    pub fn listen(&mut self, port: u16) {
        match self.call(&Request::Listen { port }) {
            Response::Listening { .. } => {}
            other => panic!("{}: listen {port}: {other:?}", self.0.pod()),
        }
    }

    /// Exchanges `bytes` with an echo server both ways at once.
    pub fn exchange(&mut self, to: SocketAddr, bytes: u64) -> Result<Exchange, Failure> {
        self.exchange_with_timeout(to, bytes, Duration::from_secs(20))
    }

    pub fn exchange_with_timeout(
        &mut self,
        to: SocketAddr,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Exchange, Failure> {
        let seed = bytes ^ u64::from(to.port()) ^ 0x9e37_79b9_7f4a_7c15;
        match self.call(&Request::Exchange {
            to,
            bytes,
            seed,
            timeout_ms: timeout.as_millis() as u64,
        }) {
            Response::Exchanged(x) => Ok(x),
            Response::Failed(f) => Err(f),
            other => panic!("{}: exchange: {other:?}", self.0.pod()),
        }
    }

    /// Like [`TcpApp::exchange`], but panics unless every byte came back.
    pub fn exchange_ok(&mut self, to: SocketAddr, bytes: u64) -> Exchange {
        let x = self
            .exchange(to, bytes)
            .unwrap_or_else(|f| panic!("{}: exchange with {to} failed: {f:?}", self.0.pod()));
        assert!(
            x.intact && x.sent == bytes && x.received == bytes,
            "{}: exchange with {to} not intact: {x:?}",
            self.0.pod()
        );
        x
    }

    /// Who connected to our echo server on `port`.
    pub fn peers(&mut self, port: u16) -> Vec<SocketAddr> {
        match self.call(&Request::Peers { port }) {
            Response::Peers { peers } => peers,
            other => panic!("{}: peers: {other:?}", self.0.pod()),
        }
    }

    /// Round-trip latencies in microseconds.
    pub fn round_trips(
        &mut self,
        to: SocketAddr,
        count: u32,
        size: u32,
    ) -> Result<Vec<u32>, Failure> {
        match self.call(&Request::RoundTrips { to, count, size }) {
            Response::RoundTrips { micros } => Ok(micros),
            Response::Failed(f) => Err(f),
            other => panic!("{}: round trips: {other:?}", self.0.pod()),
        }
    }

    /// Sends `text` × `repeat` through an echo server and checks the echo.
    pub fn text(&mut self, to: SocketAddr, text: &str, repeat: u32) -> Result<Exchange, Failure> {
        match self.call(&Request::Text {
            to,
            text: text.into(),
            repeat,
        }) {
            Response::Exchanged(x) => Ok(x),
            Response::Failed(f) => Err(f),
            other => panic!("{}: text: {other:?}", self.0.pod()),
        }
    }

    /// Holds one connection for `seconds` with a round trip every
    /// `interval`; the latencies, or how it broke.
    pub fn paced(
        &mut self,
        to: SocketAddr,
        seconds: u32,
        interval: Duration,
    ) -> Result<Vec<u32>, Failure> {
        match self.call(&Request::Paced {
            to,
            seconds,
            interval_ms: interval.as_millis() as u32,
        }) {
            Response::RoundTrips { micros } => Ok(micros),
            Response::Failed(f) => Err(f),
            other => panic!("{}: paced: {other:?}", self.0.pod()),
        }
    }

    /// Connection setup times (connect + first round trip), microseconds.
    pub fn setup(
        &mut self,
        to: SocketAddr,
        count: u32,
        pause: Duration,
    ) -> Result<Vec<u32>, Failure> {
        match self.call(&Request::Setup {
            to,
            count,
            pause_ms: pause.as_millis() as u32,
        }) {
            Response::RoundTrips { micros } => Ok(micros),
            Response::Failed(f) => Err(f),
            other => panic!("{}: setup: {other:?}", self.0.pod()),
        }
    }

    /// Sends `bytes` through an echo server; (bytes, elapsed).
    pub fn bulk(&mut self, to: SocketAddr, bytes: u64) -> Result<Duration, Failure> {
        match self.call(&Request::Bulk { to, bytes }) {
            Response::Bulk { micros, .. } => Ok(Duration::from_micros(micros)),
            Response::Failed(f) => Err(f),
            other => panic!("{}: bulk: {other:?}", self.0.pod()),
        }
    }
}

// ---- inside the pod ---------------------------------------------------------

type PeerLog = Arc<Mutex<BTreeMap<u16, Vec<SocketAddr>>>>;

/// The TCP app's main loop.
pub fn main() -> ! {
    let peers: PeerLog = Arc::default();
    serve_lines(
        |req| handle(req, &peers),
        |message| {
            Response::Failed(Failure {
                kind: "other".into(),
                message,
                sent: 0,
                received: 0,
            })
        },
    )
}

fn handle(req: Request, peers: &PeerLog) -> Response {
    match req {
        Request::Listen { port } => match TcpListener::bind(("0.0.0.0", port)) {
            Ok(listener) => {
                peers.lock().unwrap().entry(port).or_default();
                let peers = peers.clone();
                thread::spawn(move || serve_echo(listener, port, peers));
                Response::Listening { port }
            }
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Peers { port } => Response::Peers {
            peers: peers
                .lock()
                .unwrap()
                .get(&port)
                .cloned()
                .unwrap_or_default(),
        },
        Request::Exchange {
            to,
            bytes,
            seed,
            timeout_ms,
        } => match exchange(to, bytes, Some(seed), Duration::from_millis(timeout_ms)) {
            Ok(x) => Response::Exchanged(x),
            Err(f) => Response::Failed(f),
        },
        Request::RoundTrips { to, count, size } => match round_trips(to, count, size) {
            Ok(micros) => Response::RoundTrips { micros },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Text {
            to,
            text: t,
            repeat,
        } => match text(to, &t, repeat) {
            Ok(x) => Response::Exchanged(x),
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Paced {
            to,
            seconds,
            interval_ms,
        } => match paced(to, seconds, interval_ms) {
            Ok(micros) => Response::RoundTrips { micros },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Setup {
            to,
            count,
            pause_ms,
        } => match setup(to, count, pause_ms) {
            Ok(micros) => Response::RoundTrips { micros },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Bulk { to, bytes } => {
            let start = Instant::now();
            match exchange(to, bytes, None, Duration::from_secs(120)) {
                Ok(x) if x.intact => Response::Bulk {
                    bytes,
                    micros: start.elapsed().as_micros() as u64,
                },
                Ok(x) => Response::Failed(Failure {
                    kind: "other".into(),
                    message: format!("bulk transfer not intact: {x:?}"),
                    sent: x.sent,
                    received: x.received,
                }),
                Err(f) => Response::Failed(f),
            }
        }
    }
}

/// Blocking reads on a socket redirected by sk_msg can fail with a
/// spurious EAGAIN (see the README's limits); these retry until their own
/// deadline, as a careful blocking client does.
fn read_retrying(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
                    && Instant::now() < deadline =>
            {
                continue;
            }
            other => return other,
        }
    }
}

fn read_exact_retrying(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    while !buf.is_empty() {
        match read_retrying(stream, buf, deadline)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

fn text(to: SocketAddr, text: &str, repeat: u32) -> io::Result<Exchange> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let local = stream.local_addr()?;
    let payload = text.repeat(repeat as usize).into_bytes();
    // Small enough for the echo to fit in the socket buffers meanwhile.
    stream.write_all(&payload)?;
    stream.shutdown(Shutdown::Write)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read_retrying(&mut stream, &mut buf, deadline)? {
            0 => break,
            n => back.extend_from_slice(&buf[..n]),
        }
    }
    Ok(Exchange {
        sent: payload.len() as u64,
        received: back.len() as u64,
        intact: back == payload,
        local,
    })
}

fn paced(to: SocketAddr, seconds: u32, interval_ms: u32) -> io::Result<Vec<u32>> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let end = Instant::now() + Duration::from_secs(u64::from(seconds));
    let msg = [0x42u8; 64];
    let mut buf = [0u8; 64];
    let mut micros = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        stream.write_all(&msg)?;
        read_exact_retrying(&mut stream, &mut buf, t + Duration::from_secs(10))?;
        if buf != msg {
            return Err(io::Error::other("echo differs"));
        }
        micros.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        thread::sleep(Duration::from_millis(u64::from(interval_ms)));
    }
    Ok(micros)
}

fn setup(to: SocketAddr, count: u32, pause_ms: u32) -> io::Result<Vec<u32>> {
    let mut micros = Vec::new();
    for i in 0..count {
        if i > 0 {
            thread::sleep(Duration::from_millis(u64::from(pause_ms)));
        }
        let t = Instant::now();
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"x")?;
        let mut b = [0u8; 1];
        read_exact_retrying(&mut stream, &mut b, t + Duration::from_secs(10))?;
        micros.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    Ok(micros)
}

fn serve_echo(listener: TcpListener, port: u16, peers: PeerLog) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if let Ok(peer) = conn.peer_addr() {
            peers.lock().unwrap().entry(port).or_default().push(peer);
        }
        let _ = conn.set_nodelay(true);
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
            }
            let _ = conn.shutdown(Shutdown::Write);
        });
    }
}

/// The deterministic byte at every offset of the stream for `seed`, so a
/// chunk can be made or checked wherever it falls.
fn pattern_at(seed: u64, offset: u64, out: &mut [u8]) {
    let word = |i: u64| {
        // splitmix64 of (seed, word index)
        let mut z = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).to_le_bytes()
    };
    let mut current = (u64::MAX, [0u8; 8]);
    for (k, b) in out.iter_mut().enumerate() {
        let i = offset + k as u64;
        if current.0 != i / 8 {
            current = (i / 8, word(i / 8));
        }
        *b = current.1[(i % 8) as usize];
    }
}

/// Full-duplex exchange on a non-blocking socket driven by poll(2). With a
/// `seed` the bytes follow its pattern and are checked on the way back;
/// without, they are zeros and only counted (for throughput).
fn exchange(
    to: SocketAddr,
    bytes: u64,
    seed: Option<u64>,
    timeout: Duration,
) -> Result<Exchange, Failure> {
    let fail = |e: &io::Error, s, r| Failure::from_io(e, s, r);
    let stream = TcpStream::connect_timeout(&to, timeout).map_err(|e| fail(&e, 0, 0))?;
    let local = stream.local_addr().map_err(|e| fail(&e, 0, 0))?;
    stream.set_nonblocking(true).map_err(|e| fail(&e, 0, 0))?;
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    let mut out = vec![0u8; 0];
    let mut out_pos = 0;
    let mut inbuf = vec![0u8; 64 * 1024];
    let mut expect = vec![0u8; 64 * 1024];
    let (mut sent, mut received) = (0u64, 0u64);
    let mut intact = true;
    let mut write_closed = bytes == 0;
    if write_closed {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| fail(&e, 0, 0))?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(&io::Error::from(ErrorKind::TimedOut), sent, received));
        }
        let mut events = PollFlags::POLLIN;
        if !write_closed {
            events |= PollFlags::POLLOUT;
        }
        let mut fds = [PollFd::new(stream.as_fd(), events)];
        let wait =
            PollTimeout::try_from(left.min(Duration::from_secs(1))).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, wait) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(fail(&e.into(), sent, received)),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if !write_closed
            && revents.intersects(PollFlags::POLLOUT | PollFlags::POLLERR | PollFlags::POLLHUP)
        {
            if out_pos == out.len() {
                let n = (bytes - sent).min(64 * 1024) as usize;
                out.resize(n, 0);
                if let Some(seed) = seed {
                    pattern_at(seed, sent, &mut out);
                }
                out_pos = 0;
            }
            match stream.write(&out[out_pos..]) {
                Ok(n) => {
                    out_pos += n;
                    sent += n as u64;
                    if sent == bytes {
                        stream
                            .shutdown(Shutdown::Write)
                            .map_err(|e| fail(&e, sent, received))?;
                        write_closed = true;
                    }
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(&e, sent, received)),
            }
        }
        if revents.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP) {
            match stream.read(&mut inbuf) {
                Ok(0) => break,
                Ok(n) => {
                    if received + n as u64 > bytes {
                        intact = false;
                    } else if let (true, Some(seed)) = (intact, seed) {
                        pattern_at(seed, received, &mut expect[..n]);
                        intact = inbuf[..n] == expect[..n];
                    }
                    received += n as u64;
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(&e, sent, received)),
            }
        }
    }
    Ok(Exchange {
        sent,
        received,
        intact: intact && received == bytes,
        local,
    })
}

fn round_trips(to: SocketAddr, count: u32, size: u32) -> io::Result<Vec<u32>> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = vec![0x5au8; size as usize];
    let mut buf = vec![0u8; size as usize];
    let mut micros = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        stream.write_all(&msg)?;
        read_exact_retrying(&mut stream, &mut buf, t + Duration::from_secs(10))?;
        micros.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    Ok(micros)
}
