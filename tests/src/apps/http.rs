//! The HTTP role: a server speaking HTTP/1.1 and HTTP/2 with prior
//! knowledge on one port (hyper), with knobs for the status code, added
//! latency and response body size (server-wide defaults, overridden per
//! request by the query string: `?status=500&delay_ms=50&bytes=1024`), and
//! a client running request loops (keep-alive connections, or one HTTP/2
//! connection with concurrent streams) that reports every request.
//!
//! Bodies are streamed both ways in 16 KiB chunks, never built whole.
use std::{
    collections::BTreeSet,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming},
    header,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use futures_util::future::BoxFuture;

use super::{Protocol, RequestApp, Role, count};

/// The header a server names itself in (its `name` knob).
pub const SERVER_HEADER: &str = "x-nodemesh-test-server";

/// What a server answers when the request does not say otherwise.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Knobs {
    pub status: u16,
    pub delay_ms: u64,
    /// Response body size.
    pub bytes: u64,
    /// Put in [`SERVER_HEADER`] of every response, when set.
    pub name: Option<String>,
    /// HTTP/1 keep-alive (`false`: every response says `Connection:
    /// close` and the server closes).
    #[serde(default = "keep_alive")]
    pub keep_alive: bool,
}

fn keep_alive() -> bool {
    true
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            status: 200,
            delay_ms: 0,
            bytes: 16,
            name: None,
            keep_alive: true,
        }
    }
}

/// The HTTP version a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Version {
    /// HTTP/1.1, keep-alive: one connection per concurrent request.
    Http1,
    /// HTTP/2 with prior knowledge: one connection, concurrent streams.
    H2,
}

/// A request loop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub to: SocketAddr,
    pub requests: u32,
    pub concurrency: u32,
    pub version: Version,
    pub method: String,
    /// Path and query (the query carries per-request knobs).
    pub path: String,
    /// Request body size (0: none).
    pub body_bytes: u64,
    pub timeout_ms: u64,
}

impl Run {
    /// `requests` GETs of `path` on one HTTP/1.1 connection.
    pub fn get(to: SocketAddr, path: &str, requests: u32) -> Self {
        Self {
            to,
            requests,
            concurrency: 1,
            version: Version::Http1,
            method: "GET".into(),
            path: path.into(),
            body_bytes: 0,
            timeout_ms: 10_000,
        }
    }
}

/// What happened to one request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The response status; `None` when no response came.
    pub status: Option<u16>,
    pub micros: u64,
    /// Response body bytes read.
    pub received: u64,
    /// The server's name, from [`SERVER_HEADER`].
    pub server: Option<String>,
    pub error: Option<String>,
}

/// What a server saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seen {
    pub requests: u64,
    /// (value, count) pairs, sorted (a list: JSON keys are strings).
    pub by_status: Vec<(u16, u64)>,
    /// Request body bytes received.
    pub received: u64,
    /// The distinct client addresses, as the server saw them.
    pub peers: BTreeSet<IpAddr>,
}

/// The Http protocol of the test bed's request apps.
#[derive(Debug)]
pub struct Http;

/// A running HTTP app, seen from the test.
pub type HttpApp = RequestApp<Http>;

impl Protocol for Http {
    const ROLE: Role = Role::Http;
    type Knobs = Knobs;
    type Run = Run;
    type Outcome = Outcome;
    type Seen = Seen;

    fn serve(
        listener: TcpListener,
        knobs: Knobs,
        seen: Arc<Mutex<Seen>>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(serve(listener, Arc::new(knobs), seen))
    }

    fn run(run: Run) -> BoxFuture<'static, Vec<Outcome>> {
        Box::pin(run_requests(run))
    }
}

// ---- inside the pod ---------------------------------------------------------

async fn serve(listener: TcpListener, knobs: Arc<Knobs>, seen: Arc<Mutex<Seen>>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let knobs = knobs.clone();
        let seen = seen.clone();
        let knobs_keep_alive = knobs.keep_alive;
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let knobs = knobs.clone();
                let seen = seen.clone();
                async move { Ok::<_, Infallible>(answer(req, &knobs, &seen, peer).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().keep_alive(knobs_keep_alive);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The knobs of one request: the server's, overridden by the query.
fn knobs_for(uri: &hyper::Uri, defaults: &Knobs) -> Knobs {
    let mut k = defaults.clone();
    for pair in uri.query().unwrap_or_default().split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        match key {
            "status" => k.status = value.parse().unwrap_or(k.status),
            "delay_ms" => k.delay_ms = value.parse().unwrap_or(k.delay_ms),
            "bytes" => k.bytes = value.parse().unwrap_or(k.bytes),
            _ => {}
        }
    }
    k
}

async fn answer(
    mut req: Request<Incoming>,
    defaults: &Knobs,
    seen: &Mutex<Seen>,
    peer: SocketAddr,
) -> Response<Pattern> {
    let knobs = knobs_for(req.uri(), defaults);
    // An upgrade (WebSocket, say): 101, then the bytes echoed.
    if req.headers().contains_key(header::UPGRADE) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        {
            let mut s = seen.lock().unwrap();
            s.requests += 1;
            count(&mut s.by_status, 101);
            s.peers.insert(peer.ip());
        }
        let mut resp = Response::new(Pattern::new(0));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        return resp;
    }
    // Read the request body as it comes (Expect: 100-continue is answered
    // by hyper when we start reading).
    let mut body = req.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => received += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    if knobs.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.delay_ms)).await;
    }
    {
        let mut s = seen.lock().unwrap();
        s.requests += 1;
        count(&mut s.by_status, knobs.status);
        s.received += received;
        s.peers.insert(peer.ip());
    }
    let mut resp = Response::new(Pattern::new(knobs.bytes));
    *resp.status_mut() = StatusCode::from_u16(knobs.status).unwrap_or(StatusCode::OK);
    if let Some(name) = &defaults.name
        && let Ok(v) = header::HeaderValue::from_str(name)
    {
        resp.headers_mut().insert(SERVER_HEADER, v);
    }
    resp
}

/// A body of `left` bytes, made 16 KiB at a time as it is sent.
pub struct Pattern {
    left: u64,
}

impl Pattern {
    pub fn new(bytes: u64) -> Self {
        Self { left: bytes }
    }
}

const CHUNK: usize = 16 * 1024;
static FILL: [u8; CHUNK] = [b'n'; CHUNK];

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&FILL[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// How a client sends requests.
#[derive(Clone)]
enum Sender {
    H1,
    H2(hyper::client::conn::http2::SendRequest<Pattern>),
}

async fn run_requests(run: Run) -> Vec<Outcome> {
    let run = Arc::new(run);
    let next = Arc::new(AtomicU32::new(0));
    let sender = match run.version {
        Version::Http1 => Ok(Sender::H1),
        Version::H2 => h2_connect(&run).await.map(Sender::H2),
    };
    let sender = match sender {
        Ok(s) => s,
        Err(e) => {
            return (0..run.requests)
                .map(|_| failed(Instant::now(), e.clone()))
                .collect();
        }
    };
    let mut workers = Vec::new();
    for _ in 0..run.concurrency.max(1) {
        let (run, next, sender) = (run.clone(), next.clone(), sender.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut h1: Option<hyper::client::conn::http1::SendRequest<Pattern>> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= run.requests {
                    return done;
                }
                let outcome = match &sender {
                    Sender::H2(send) => one(&run, send.clone()).await,
                    Sender::H1 => {
                        // Keep-alive: reuse the connection while it works.
                        if h1.as_ref().is_none_or(|s| s.is_closed()) {
                            h1 = h1_connect(&run).await.ok();
                        }
                        match &mut h1 {
                            Some(send) => one_h1(&run, send).await,
                            None => failed(Instant::now(), "cannot connect".into()),
                        }
                    }
                };
                if outcome.error.is_some() {
                    h1 = None;
                }
                done.push((i, outcome));
            }
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, o)| o).collect()
}

fn failed(started: Instant, error: String) -> Outcome {
    Outcome {
        status: None,
        micros: started.elapsed().as_micros() as u64,
        received: 0,
        server: None,
        error: Some(error),
    }
}

async fn tcp(run: &Run) -> Result<TcpStream, String> {
    let stream = tokio::time::timeout(
        Duration::from_millis(run.timeout_ms),
        TcpStream::connect(run.to),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn h1_connect(run: &Run) -> Result<hyper::client::conn::http1::SendRequest<Pattern>, String> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp(run).await?))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

async fn h2_connect(run: &Run) -> Result<hyper::client::conn::http2::SendRequest<Pattern>, String> {
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp(run).await?))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

fn request(run: &Run) -> Result<Request<Pattern>, String> {
    let uri = match run.version {
        Version::Http1 => run.path.clone(),
        Version::H2 => format!("http://{}{}", run.to, run.path),
    };
    let mut b = Request::builder().method(run.method.as_str()).uri(uri);
    if run.version == Version::Http1 {
        b = b.header(header::HOST, run.to.to_string());
    }
    b.body(Pattern::new(run.body_bytes))
        .map_err(|e| e.to_string())
}

async fn one_h1(run: &Run, send: &mut hyper::client::conn::http1::SendRequest<Pattern>) -> Outcome {
    let started = Instant::now();
    let req = match request(run) {
        Ok(r) => r,
        Err(e) => return failed(started, e),
    };
    if send.ready().await.is_err() {
        return failed(started, "connection closed".into());
    }
    finish(run, started, send.send_request(req)).await
}

async fn one(run: &Run, mut send: hyper::client::conn::http2::SendRequest<Pattern>) -> Outcome {
    let started = Instant::now();
    let req = match request(run) {
        Ok(r) => r,
        Err(e) => return failed(started, e),
    };
    if send.ready().await.is_err() {
        return failed(started, "connection closed".into());
    }
    finish(run, started, send.send_request(req)).await
}

/// Waits for the response and reads its body to the end.
async fn finish(
    run: &Run,
    started: Instant,
    sent: impl std::future::Future<Output = Result<Response<Incoming>, hyper::Error>>,
) -> Outcome {
    let timeout = Duration::from_millis(run.timeout_ms);
    let work = async {
        let resp = sent.await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let server = resp
            .headers()
            .get(SERVER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = resp.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            received += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        Ok::<_, String>((status, server, received))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok((status, server, received))) => Outcome {
            status: Some(status),
            micros: started.elapsed().as_micros() as u64,
            received,
            server,
            error: None,
        },
        Ok(Err(e)) => failed(started, e),
        Err(_) => failed(started, "timed out".into()),
    }
}
