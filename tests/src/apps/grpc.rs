//! The gRPC role (tonic, no code generation: messages are raw bytes): a
//! server with a unary and a server-streaming method, with knobs for the
//! gRPC status, added latency, message size and stream length (server-wide
//! defaults, overridden per call by metadata), and a client running call
//! loops that reports every call with its `grpc-status`.
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

use bytes::{Buf, BufMut, Bytes};
use futures_util::{Stream, future::BoxFuture};
use http::uri::PathAndQuery;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::{
    Code, Request, Response, Status,
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::NamedService,
    transport::{Channel, Server},
};

use super::{Protocol, RequestApp, Role, count};

/// The service's name, and its methods.
pub const SERVICE: &str = "nodemesh.test.Echo";
pub const UNARY: &str = "/nodemesh.test.Echo/Unary";
pub const STREAM: &str = "/nodemesh.test.Echo/Stream";

/// What a server answers when the call does not say otherwise.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Knobs {
    /// The gRPC status code (0 is OK).
    pub code: i32,
    pub delay_ms: u64,
    /// Size of each response message.
    pub bytes: u64,
    /// Messages a streaming call returns.
    pub messages: u32,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            code: 0,
            delay_ms: 0,
            bytes: 16,
            messages: 3,
        }
    }
}

/// Which method a client calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Unary,
    Stream,
}

/// A call loop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub to: SocketAddr,
    pub calls: u32,
    pub concurrency: u32,
    pub method: Method,
    /// Request message size.
    pub bytes: u64,
    /// Sent as metadata: the server's knobs for these calls.
    pub ask: Option<Knobs>,
    pub timeout_ms: u64,
}

impl Run {
    /// `calls` unary calls, one at a time.
    pub fn unary(to: SocketAddr, calls: u32) -> Self {
        Self {
            to,
            calls,
            concurrency: 1,
            method: Method::Unary,
            bytes: 16,
            ask: None,
            timeout_ms: 10_000,
        }
    }
}

/// What happened to one call.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The `grpc-status` (0 is OK).
    pub code: i32,
    /// Response messages received.
    pub messages: u32,
    pub micros: u64,
    pub message: String,
}

/// What a server saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seen {
    pub calls: u64,
    /// (value, count) pairs, sorted (a list: JSON keys are strings).
    pub by_code: Vec<(i32, u64)>,
    /// The distinct client addresses, as the server saw them.
    pub peers: BTreeSet<IpAddr>,
}

/// The Grpc protocol of the test bed's request apps.
#[derive(Debug)]
pub struct Grpc;

/// A running gRPC app, seen from the test.
pub type GrpcApp = RequestApp<Grpc>;

impl Protocol for Grpc {
    const ROLE: Role = Role::Grpc;
    type Knobs = Knobs;
    type Run = Run;
    type Outcome = Outcome;
    type Seen = Seen;

    fn serve(
        listener: TcpListener,
        knobs: Knobs,
        seen: Arc<Mutex<Seen>>,
    ) -> BoxFuture<'static, ()> {
        let svc = Echo {
            knobs: Arc::new(knobs),
            seen,
        };
        Box::pin(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = Server::builder().serve_with_incoming(svc, incoming).await;
        })
    }

    fn run(run: Run) -> BoxFuture<'static, Vec<Outcome>> {
        Box::pin(run_calls(run))
    }
}

// ---- inside the pod ---------------------------------------------------------

/// Messages as they are: bytes in, bytes out.
#[derive(Clone, Copy, Debug, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The echo service.
#[derive(Clone)]
struct Echo {
    knobs: Arc<Knobs>,
    seen: Arc<Mutex<Seen>>,
}

impl NamedService for Echo {
    const NAME: &'static str = SERVICE;
}

/// Knob metadata keys (a call's `ask`).
const KNOBS: &str = "x-nodemesh-knobs";

impl Echo {
    /// The knobs of one call: the server's, or the call's own.
    fn knobs<T>(&self, req: &Request<T>) -> Knobs {
        req.metadata()
            .get(KNOBS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_else(|| (*self.knobs).clone())
    }

    fn count<T>(&self, req: &Request<T>, code: i32) {
        let mut seen = self.seen.lock().unwrap();
        seen.calls += 1;
        count(&mut seen.by_code, code);
        if let Some(peer) = req.remote_addr() {
            seen.peers.insert(peer.ip());
        }
    }
}

fn status(k: &Knobs) -> Result<(), Status> {
    if k.code == 0 {
        Ok(())
    } else {
        Err(Status::new(Code::from(k.code), "as asked"))
    }
}

fn message(bytes: u64) -> Bytes {
    Bytes::from(vec![b'g'; bytes as usize])
}

impl tower_service::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Raw);
            Ok(match req.uri().path() {
                UNARY => grpc.unary(Unary(this), req).await,
                STREAM => grpc.server_streaming(Streaming(this), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

struct Unary(Echo);

impl tower_service::Service<Request<Bytes>> for Unary {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let k = echo.knobs(&req);
            echo.count(&req, k.code);
            tokio::time::sleep(Duration::from_millis(k.delay_ms)).await;
            status(&k)?;
            Ok(Response::new(message(k.bytes)))
        })
    }
}

struct Streaming(Echo);

type Messages = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

impl tower_service::Service<Request<Bytes>> for Streaming {
    type Response = Response<Messages>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Response<Messages>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let k = echo.knobs(&req);
            echo.count(&req, k.code);
            // The messages come first, then the status (in the trailers).
            let code = k.code;
            let stream = futures_util::stream::unfold(0u32, move |sent| {
                let k = k.clone();
                async move {
                    if sent < k.messages {
                        tokio::time::sleep(Duration::from_millis(k.delay_ms)).await;
                        Some((Ok(message(k.bytes)), sent + 1))
                    } else if sent == k.messages && code != 0 {
                        Some((status(&k).map(|_| Bytes::new()), sent + 1))
                    } else {
                        None
                    }
                }
            });
            Ok(Response::new(Box::pin(stream) as Messages))
        })
    }
}

async fn run_calls(run: Run) -> Vec<Outcome> {
    let started = Instant::now();
    let channel = match Channel::from_shared(format!("http://{}", run.to)) {
        Ok(endpoint) => {
            tokio::time::timeout(
                Duration::from_millis(run.timeout_ms),
                endpoint.tcp_nodelay(true).connect(),
            )
            .await
        }
        Err(e) => {
            return vec![failed(started, Code::InvalidArgument, e.to_string()); run.calls as usize];
        }
    };
    let channel = match channel {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return vec![failed(started, Code::Unavailable, e.to_string()); run.calls as usize];
        }
        Err(_) => {
            return vec![
                failed(started, Code::DeadlineExceeded, "connect timed out".into());
                run.calls as usize
            ];
        }
    };
    let run = Arc::new(run);
    let next = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..run.concurrency.max(1) {
        let (run, next) = (run.clone(), next.clone());
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= run.calls {
                    return done;
                }
                done.push((i, one(&run, &mut grpc).await));
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

fn failed(started: Instant, code: Code, message: String) -> Outcome {
    Outcome {
        code: code as i32,
        messages: 0,
        micros: started.elapsed().as_micros() as u64,
        message,
    }
}

async fn one(run: &Run, grpc: &mut tonic::client::Grpc<Channel>) -> Outcome {
    let started = Instant::now();
    let mut req = Request::new(message(run.bytes));
    req.set_timeout(Duration::from_millis(run.timeout_ms));
    if let Some(ask) = &run.ask
        && let Ok(v) = serde_json::to_string(ask).unwrap_or_default().parse()
    {
        req.metadata_mut().insert(KNOBS, v);
    }
    if let Err(e) = grpc.ready().await {
        return failed(started, Code::Unavailable, e.to_string());
    }
    let result = match run.method {
        Method::Unary => grpc
            .unary(req, PathAndQuery::from_static(UNARY), Raw)
            .await
            .map(|_| 1),
        Method::Stream => match grpc
            .server_streaming(req, PathAndQuery::from_static(STREAM), Raw)
            .await
        {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                let mut n = 0;
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => n += 1,
                        Ok(None) => break Ok(n),
                        Err(s) => break Err((s, n)),
                    }
                }
                .map_err(|(s, n)| {
                    // Keep the count of what arrived before the status.
                    Status::new(s.code(), format!("{n} {}", s.message()))
                })
            }
            Err(s) => Err(s),
        },
    };
    match result {
        Ok(messages) => Outcome {
            code: 0,
            messages,
            micros: started.elapsed().as_micros() as u64,
            message: String::new(),
        },
        Err(s) => {
            let (messages, text) = match s.message().split_once(' ') {
                Some((n, rest)) if run.method == Method::Stream => {
                    (n.parse().unwrap_or(0), rest.to_owned())
                }
                _ => (0, s.message().to_owned()),
            };
            Outcome {
                code: s.code() as i32,
                messages,
                micros: started.elapsed().as_micros() as u64,
                message: text,
            }
        }
    }
}
