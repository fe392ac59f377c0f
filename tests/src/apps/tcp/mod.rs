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
    net::{Shutdown, SocketAddr, TcpListener},
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use serde::{Deserialize, Serialize};

mod client;

pub use self::client::{Download, Reads};
use self::client::{
    download, duplex_blocking, exchange, hold, paced, pattern_at, round_trips, setup, text,
};
use super::{Container, Role, serve_lines};

/// What the test asks the pod app to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Serve echo on `port`: on `ip` only if given, else all addresses.
    Listen {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<std::net::IpAddr>,
    },
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
        #[serde(default)]
        reads: Reads,
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
        #[serde(default)]
        reads: Reads,
        /// Silence after connecting, before the text (milliseconds).
        #[serde(default)]
        pause_ms: u64,
    },
    /// One connection held for `seconds`, with a small round trip every
    /// `interval_ms`; latencies.
    Paced {
        to: SocketAddr,
        seconds: u32,
        interval_ms: u32,
        #[serde(default)]
        reads: Reads,
    },
    /// `count` new connections, `pause_ms` apart: for each, the time to
    /// connect and complete a first 1-byte round trip.
    Setup {
        to: SocketAddr,
        count: u32,
        pause_ms: u32,
        #[serde(default)]
        reads: Reads,
    },
    /// An ordinary blocking client: a writer and a reader thread on one
    /// socket, plain blocking reads (no retries); checks the echo.
    Duplex {
        to: SocketAddr,
        bytes: u64,
        seed: u64,
        timeout_ms: u64,
    },
    /// `count` connections, each checked with a 1-byte round trip, held
    /// open until [`Request::Release`].
    Hold { to: SocketAddr, count: u32 },
    /// Closes the held connections.
    Release,
    /// Serve an endless stream on `port` (a download source).
    Source { port: u16 },
    /// Read from `to` until the stream ends or `seconds` pass.
    Download { to: SocketAddr, seconds: u32 },
    /// Serve on `port` a server-first protocol: `banner` is written as
    /// soon as a client connects, then whatever it sends is echoed.
    Banner { port: u16, banner: String },
    /// Connect to `to` and read `bytes` bytes the server says first,
    /// sending nothing.
    Greeting {
        to: SocketAddr,
        bytes: u32,
        timeout_ms: u64,
    },
    /// An HTTP/1.1 `Upgrade: websocket` request to `to` on a raw socket;
    /// after `101`, `bytes` of the pattern echoed both ways.
    Upgrade { to: SocketAddr, bytes: u64 },
}

/// What the pod app answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Listening {
        port: u16,
    },
    Exchanged(Exchange),
    Failed(Failure),
    Peers {
        peers: Vec<SocketAddr>,
    },
    RoundTrips {
        micros: Vec<u32>,
    },
    Bulk {
        bytes: u64,
        micros: u64,
    },
    Held {
        held: u32,
        failures: Vec<Failure>,
    },
    Released {
        closed: u32,
    },
    /// What the server said first, and when (from the connect).
    Greeted {
        text: String,
        micros: u64,
    },
    /// The upgrade's response head, and how the bytes after it fared.
    Upgraded {
        status_line: String,
        echoed: u64,
        intact: bool,
    },
    Downloaded(Download),
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
    /// Its peer's address, as the app saw it (`getpeername`).
    pub peer: SocketAddr,
    /// The socket's real local address, as the kernel's socket table has
    /// it (no hook answers that): loopback when the mesh redirected it.
    pub kernel_local: Option<SocketAddr>,
}

impl Exchange {
    /// Whether the connection was redirected to the agent's listener in the
    /// pod (the kernel's view; the app sees what it would without the mesh).
    pub fn redirected(&self) -> bool {
        self.kernel_local
            .is_some_and(|a| a.ip().to_canonical().is_loopback())
    }
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
            // Not connected: what a socket a reset ended says to shutdown.
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => "reset",
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
            ErrorKind::PermissionDenied => "denied",
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
pub struct TcpApp(Container, Reads);

impl TcpApp {
    pub fn start(netns: &Path, cgroup: &Path, pod: &str) -> Self {
        Self(
            Container::start(netns, cgroup, pod, Role::Tcp),
            Reads::Plain,
        )
    }

    /// Serves a server-first protocol on `port`: `banner` on connect, then
    /// echo.
    pub fn banner(&mut self, port: u16, banner: &str) {
        match self.call(&Request::Banner {
            port,
            banner: banner.into(),
        }) {
            Response::Listening { .. } => {}
            other => panic!("{}: banner {port}: {other:?}", self.0.pod()),
        }
    }

    /// Connects to `to` and reads the `bytes` the server says first: the
    /// text and the time from the connect.
    pub fn greeting(&mut self, to: SocketAddr, bytes: u32) -> Result<(String, Duration), Failure> {
        match self.call(&Request::Greeting {
            to,
            bytes,
            timeout_ms: 20_000,
        }) {
            Response::Greeted { text, micros } => Ok((text, Duration::from_micros(micros))),
            Response::Failed(f) => Err(f),
            other => panic!("{}: greeting: {other:?}", self.0.pod()),
        }
    }

    /// An HTTP/1.1 upgrade to `to` and `bytes` echoed after it: the status
    /// line, bytes echoed, intact.
    pub fn upgrade(&mut self, to: SocketAddr, bytes: u64) -> Result<(String, u64, bool), Failure> {
        match self.call(&Request::Upgrade { to, bytes }) {
            Response::Upgraded {
                status_line,
                echoed,
                intact,
            } => Ok((status_line, echoed, intact)),
            Response::Failed(f) => Err(f),
            other => panic!("{}: upgrade: {other:?}", self.0.pod()),
        }
    }

    /// Drives a `nodemesh-testapp tcp --control PORT` container on a real
    /// node, at `control`, connecting from `netns` (the node's).
    pub fn connect(netns: &Path, control: SocketAddr, pod: &str) -> io::Result<Self> {
        Ok(Self(Container::connect(netns, control, pod)?, Reads::Plain))
    }

    /// Blocking reads retry a spurious `EAGAIN` from now on: for measuring
    /// the sk_msg fast path, whose kernel receive path returns one to
    /// blocking sockets (docs/datapath.md). Tests never do this.
    pub fn tolerating_fast_path_eagain(mut self) -> Self {
        self.1 = Reads::TolerateEagain;
        self
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    fn call(&mut self, req: &Request) -> Response {
        self.0.call(req)
    }

    /// Serves echo on `port`.
    pub fn listen(&mut self, port: u16) {
        match self.call(&Request::Listen { port, ip: None }) {
            Response::Listening { .. } => {}
            other => panic!("{}: listen {port}: {other:?}", self.0.pod()),
        }
    }

    /// Serves echo on `addr` only (e.g. the pod's own address, leaving the
    /// port free on loopback).
    pub fn listen_on(&mut self, addr: SocketAddr) {
        match self.call(&Request::Listen {
            port: addr.port(),
            ip: Some(addr.ip()),
        }) {
            Response::Listening { .. } => {}
            other => panic!("{}: listen {addr}: {other:?}", self.0.pod()),
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
        match self.call(&Request::RoundTrips {
            to,
            count,
            size,
            reads: self.1,
        }) {
            Response::RoundTrips { micros } => Ok(micros),
            Response::Failed(f) => Err(f),
            other => panic!("{}: round trips: {other:?}", self.0.pod()),
        }
    }

    /// Sends `text` × `repeat` through an echo server and checks the echo.
    pub fn text(&mut self, to: SocketAddr, text: &str, repeat: u32) -> Result<Exchange, Failure> {
        self.text_after(to, text, repeat, Duration::ZERO)
    }

    /// The same, staying silent for `pause` after connecting.
    pub fn text_after(
        &mut self,
        to: SocketAddr,
        text: &str,
        repeat: u32,
        pause: Duration,
    ) -> Result<Exchange, Failure> {
        match self.call(&Request::Text {
            to,
            text: text.into(),
            repeat,
            reads: self.1,
            pause_ms: pause.as_millis() as u64,
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
            reads: self.1,
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
            reads: self.1,
        }) {
            Response::RoundTrips { micros } => Ok(micros),
            Response::Failed(f) => Err(f),
            other => panic!("{}: setup: {other:?}", self.0.pod()),
        }
    }

    /// Exchanges `bytes` with an echo server the way an ordinary blocking
    /// client does (a reader and a writer thread, no retries).
    pub fn duplex_blocking(&mut self, to: SocketAddr, bytes: u64) -> Result<Exchange, Failure> {
        match self.call(&Request::Duplex {
            to,
            bytes,
            seed: bytes ^ 0x5eed,
            timeout_ms: 20_000,
        }) {
            Response::Exchanged(x) => Ok(x),
            Response::Failed(f) => Err(f),
            other => panic!("{}: duplex: {other:?}", self.0.pod()),
        }
    }

    /// Opens and holds `count` checked connections; how many worked, and
    /// the first failures.
    pub fn hold(&mut self, to: SocketAddr, count: u32) -> (u32, Vec<Failure>) {
        match self.call(&Request::Hold { to, count }) {
            Response::Held { held, failures } => (held, failures),
            other => panic!("{}: hold: {other:?}", self.0.pod()),
        }
    }

    /// Closes the held connections; how many.
    pub fn release(&mut self) -> u32 {
        match self.call(&Request::Release) {
            Response::Released { closed } => closed,
            other => panic!("{}: release: {other:?}", self.0.pod()),
        }
    }

    /// Serves an endless stream on `port`.
    pub fn source(&mut self, port: u16) {
        match self.call(&Request::Source { port }) {
            Response::Listening { .. } => {}
            other => panic!("{}: source {port}: {other:?}", self.0.pod()),
        }
    }

    /// Downloads from `to` for up to `seconds`; how it ended.
    pub fn download(&mut self, to: SocketAddr, seconds: u32) -> Download {
        match self.call(&Request::Download { to, seconds }) {
            Response::Downloaded(d) => d,
            other => panic!("{}: download: {other:?}", self.0.pod()),
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
    // Like a server tuned for many connections: the soft open-file limit
    // up to the hard one.
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let peers: PeerLog = Arc::default();
    let mut held = Vec::new();
    serve_lines(
        |req| match req {
            Request::Hold { to, count } => {
                let (mut streams, failures) = hold(to, count);
                let n = streams.len() as u32;
                held.append(&mut streams);
                Response::Held { held: n, failures }
            }
            Request::Release => {
                let closed = held.len() as u32;
                held.clear();
                Response::Released { closed }
            }
            req => handle(req, &peers),
        },
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
        Request::Listen { port, ip } => {
            match ip.map_or_else(|| bind_any(port), |ip| TcpListener::bind((ip, port))) {
                Ok(listener) => {
                    peers.lock().unwrap().entry(port).or_default();
                    let peers = peers.clone();
                    thread::spawn(move || serve_echo(listener, port, peers));
                    Response::Listening { port }
                }
                Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
            }
        }
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
        Request::RoundTrips {
            to,
            count,
            size,
            reads,
        } => match round_trips(to, count, size, reads) {
            Ok(micros) => Response::RoundTrips { micros },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Text {
            to,
            text: t,
            repeat,
            reads,
            pause_ms,
        } => match text(to, &t, repeat, reads, Duration::from_millis(pause_ms)) {
            Ok(x) => Response::Exchanged(x),
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Paced {
            to,
            seconds,
            interval_ms,
            reads,
        } => match paced(to, seconds, interval_ms, reads) {
            Ok(micros) => Response::RoundTrips { micros },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Setup {
            to,
            count,
            pause_ms,
            reads,
        } => match setup(to, count, pause_ms, reads) {
            Ok(micros) => Response::RoundTrips { micros },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Duplex {
            to,
            bytes,
            seed,
            timeout_ms,
        } => match duplex_blocking(to, bytes, seed, Duration::from_millis(timeout_ms)) {
            Ok(x) => Response::Exchanged(x),
            Err(f) => Response::Failed(f),
        },
        Request::Source { port } => match bind_any(port) {
            Ok(listener) => {
                thread::spawn(move || serve_source(listener));
                Response::Listening { port }
            }
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Download { to, seconds } => Response::Downloaded(download(to, seconds)),
        Request::Banner { port, banner } => match bind_any(port) {
            Ok(listener) => {
                peers.lock().unwrap().entry(port).or_default();
                let peers = peers.clone();
                thread::spawn(move || serve_banner(listener, port, banner, peers));
                Response::Listening { port }
            }
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Greeting {
            to,
            bytes,
            timeout_ms,
        } => match client::greeting(to, bytes, Duration::from_millis(timeout_ms)) {
            Ok((text, micros)) => Response::Greeted { text, micros },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        Request::Upgrade { to, bytes } => match client::upgrade(to, bytes) {
            Ok((status_line, echoed, intact)) => Response::Upgraded {
                status_line,
                echoed,
                intact,
            },
            Err(e) => Response::Failed(Failure::from_io(&e, 0, 0)),
        },
        // Handled by `main`, which holds the connections.
        Request::Hold { .. } | Request::Release => Response::Failed(Failure {
            kind: "other".into(),
            message: "hold/release are handled by the main loop".into(),
            sent: 0,
            received: 0,
        }),
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

/// Listens on every address of the pod, both families where it has IPv6
/// (as most servers do), else IPv4's.
fn bind_any(port: u16) -> io::Result<TcpListener> {
    TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))
}

fn serve_echo(listener: TcpListener, port: u16, peers: PeerLog) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if let Ok(peer) = conn.peer_addr() {
            // An IPv4 client on the dual-stack socket is `::ffff:a.b.c.d`.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            peers.lock().unwrap().entry(port).or_default().push(peer);
        }
        let _ = conn.set_nodelay(true);
        connection_thread(move || {
            // Small while the client sends little (thousands held idle),
            // 64 KiB once a read fills it (bulk).
            let mut buf = vec![0u8; 4 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        if n == buf.len() && buf.len() < 64 * 1024 {
                            buf = vec![0u8; 64 * 1024];
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

/// A server-first server: the banner on connect, then echo.
fn serve_banner(listener: TcpListener, port: u16, banner: String, peers: PeerLog) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if let Ok(peer) = conn.peer_addr() {
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            peers.lock().unwrap().entry(port).or_default().push(peer);
        }
        let banner = banner.clone();
        connection_thread(move || {
            if conn.write_all(banner.as_bytes()).is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

/// Runs one connection's loop on a thread of its own, with a small stack
/// (a soak holds thousands at once); one that cannot be made drops its
/// connection rather than the server.
fn connection_thread(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().stack_size(128 * 1024).spawn(f) {
        eprintln!("tcp app: no thread for a connection ({e}); dropped");
    }
}

/// Streams the pattern to every client until it goes away.
fn serve_source(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        connection_thread(move || {
            let mut chunk = vec![0u8; 64 * 1024];
            let mut offset = 0u64;
            loop {
                pattern_at(7, offset, &mut chunk);
                if conn.write_all(&chunk).is_err() {
                    return;
                }
                offset += chunk.len() as u64;
            }
        });
    }
}
