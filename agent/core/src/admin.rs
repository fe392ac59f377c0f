//! The admin HTTP server every nodemesh process runs (the agent on
//! `:4191`, the identity service on `:9990`):
//!
//! - `/metrics` — Prometheus text format;
//! - `/live` — 200 while the process serves;
//! - `/ready` — 200 once the process says so, 503 before;
//! - whatever else the process adds with [`Routes`].
//!
//! It runs on its own thread and single-threaded runtime, so scrapes never
//! compete with a data path's workers, and a busy data path never makes a
//! scrape time out.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::{net::TcpListener, sync::oneshot};
use tracing::{debug, info, warn};

use crate::listen::Guard;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot listen on {addr} for the admin server: {source}; is another process using it, or is the address on this host?"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the admin thread: {0}")]
    Thread(std::io::Error),
}

/// A response body of the admin server: whole, or streamed (a tap).
pub type AdminBody = BoxBody<Bytes, Infallible>;

/// A response of the admin server.
pub type AdminResponse = Response<AdminBody>;

fn whole(body: impl Into<Bytes>) -> AdminBody {
    Full::new(body.into()).boxed()
}

/// A `GET` the standard paths do not answer.
#[derive(Clone, Copy, Debug)]
pub struct Get<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Who asks (a route may answer only some: the node itself, say).
    pub peer: SocketAddr,
    /// The address it asked on.
    pub local: SocketAddr,
}

impl Get<'_> {
    /// The request comes from this host itself: over loopback, or from the
    /// very address it reached (a pod's connection to the node's address
    /// comes from the pod's).
    pub fn from_this_host(&self) -> bool {
        let peer = self.peer.ip().to_canonical();
        peer.is_loopback() || peer == self.local.ip().to_canonical()
    }
}

/// More `GET` paths a process serves beside the standard ones.
pub trait Routes: Send + Sync + 'static {
    /// The answer, or `None` when the path is not one of these.
    fn get(&self, get: Get<'_>) -> Option<AdminResponse>;
}

/// A readiness flag: the process sets it once it can serve.
#[derive(Clone, Debug, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub ready: Ready,
    /// What `/ready` says before the process is ready.
    pub not_ready: &'static str,
    pub routes: Option<Arc<dyn Routes>>,
    /// Its caps (anyone who can reach the port can open connections).
    pub guard: Guard,
}

/// How long a client has to send a request's head (also: how long an
/// idle keep-alive connection stays).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head the admin port reads.
const MAX_HEAD: usize = 16 * 1024;

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// The running admin server; dropping it does not stop it, `stop` does.
#[derive(Debug)]
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds now (so a bad address fails start-up with a clear error) and
    /// serves from a dedicated thread.
    pub fn start(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        let bind_err = |source| AdminError::Bind { addr, source };
        let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let local = std_listener.local_addr().map_err(bind_err)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("nodemesh-admin".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!(error = %e, "cannot build the admin runtime");
                        return;
                    }
                };
                rt.block_on(serve(std_listener, state, stop_rx));
            })
            .map_err(AdminError::Thread)?;
        info!(addr = %local, "admin server listening");
        Ok(Self {
            addr: local,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: AdminState,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin listener unusable");
            return;
        }
    };
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather
                    // than spin (and flood the log).
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let Some(slot) = state.guard.connection(peer.ip()) else {
            debug!(%peer, "admin: over its connection caps; closed");
            continue;
        };
        let state = state.clone();
        // Unknown: never taken for "this host".
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state, peer, local)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
            drop(slot);
        });
    }
}

fn route(
    req: &Request<Incoming>,
    state: &AdminState,
    peer: SocketAddr,
    local: SocketAddr,
) -> AdminResponse {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => match encode(&state.registry) {
            Ok(body) => with_type(
                Response::new(whole(body)),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n"),
        },
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if state.ready.is_ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, state.not_ready),
        path => state
            .routes
            .as_ref()
            .and_then(|r| {
                r.get(Get {
                    path,
                    query: req.uri().query(),
                    peer,
                    local,
                })
            })
            .unwrap_or_else(|| {
                text(
                    StatusCode::NOT_FOUND,
                    "not found: try /metrics, /live or /ready\n",
                )
            }),
    }
}

/// Encodes a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut resp = Response::new(whole(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    with_type(resp, "text/plain; charset=utf-8")
}

/// A JSON answer (pretty, for people with curl).
pub fn json(value: &impl Serialize) -> AdminResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => with_type(Response::new(whole(body)), "application/json"),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode JSON\n"),
    }
}

/// A streamed NDJSON answer: each line as it comes from `rx`, until every
/// sender is gone (a tap).
pub fn ndjson(rx: tokio::sync::mpsc::Receiver<Bytes>) -> AdminResponse {
    with_type(Response::new(Lines(rx).boxed()), "application/x-ndjson")
}

/// A streamed body of lines, as they come.
struct Lines(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(hyper::body::Frame::data(l))))
    }
}

fn with_type(mut resp: AdminResponse, content_type: &'static str) -> AdminResponse {
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
