//! The server's edge of HTTP: a detected HTTP/1 or HTTP/2 connection to a
//! served pod, served by hyper on the client side and forwarded over one
//! connection to the app (its own, as without the mesh: one client
//! connection, one app connection), every request counted in the inbound
//! request metrics with the client's identity and the latency the app
//! took. The same semantics as the outbound side: bodies stream, trailers
//! pass, hop-by-hop headers stop, upgrades become a relay.
//!
//! A client the policy refuses gets a `403` for every request instead, and
//! the app never sees a byte.
use nodemesh_core::labels::Direction;
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::{
    proxy::{
        admission::RequestTicket,
        http::{
            Body, Done, Observed, Prepared, admit_request, grpc_status, prepare, proxy_error,
            spawn_splice, strip_hop_by_hop, switched, wants_close,
        },
        inbound::Recheck,
        pods::ServedPod,
        relay::{CountedIo, Reset},
    },
    telemetry::{InboundDenial, http::Request as RequestMetric, tap::Tapped},
};

/// Who is on the other end, as the server-side metrics record it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Over mutual TLS (the tunnel).
    pub tls: bool,
    /// Its SPIFFE ID, when authenticated (mTLS, or a meshed pod on this
    /// node).
    pub identity: Option<String>,
}

/// A stream with bytes already read from it put back in front (what
/// detection consumed).
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: Reset> Reset for Rewind<T> {
    fn reset(&self) {
        self.inner.reset();
    }

    fn close_gracefully(&self) {
        self.inner.close_gracefully();
    }
}

/// The app's side: one connection, one request at a time (HTTP/1) or
/// multiplexed (HTTP/2).
enum Sender {
    H1(tokio::sync::Mutex<http1::SendRequest<Body>>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    async fn send(&self, req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => {
                let mut s = s.lock().await;
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                let mut s = s.clone();
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// How long the agent waits for the app to close a connection it said it
/// would close, before closing it itself.
const APP_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The agent's side of an app connection. When the app closes after a
/// response (it said `Connection: close`, or was told the client did),
/// shutting down waits for the app's own close first, up to
/// [`APP_CLOSE_WAIT`] (anything the app still sends is dropped: its last
/// response was read). Whoever closes first keeps the connection's
/// `TIME_WAIT` for a minute, and the agent's delivering sockets all share
/// one address and the app's port: had the agent closed first, a server
/// with a new connection per request would run out of ports for its
/// clients after some 28 000 of them a minute (measured: `connect` spent
/// the agent's time searching for a free one, then failed). The app's
/// side holds them instead, as without the mesh.
struct AppIo<S> {
    inner: S,
    closes: Arc<AtomicBool>,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> AppIo<S> {
    fn new(inner: S, closes: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            closes,
            waiting: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AppIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AppIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.closes.load(Ordering::Relaxed) {
            let waiting = this
                .waiting
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(APP_CLOSE_WAIT)));
            let mut scratch = [0u8; 1024];
            loop {
                if waiting.as_mut().poll(cx).is_ready() {
                    break;
                }
                let mut buf = ReadBuf::new(&mut scratch);
                match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                    // The app's close (or an error: nothing to wait for).
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
                    Poll::Ready(Err(_)) => break,
                    Poll::Ready(Ok(())) => continue,
                    Poll::Pending => return Poll::Pending,
                }
            }
            this.closes.store(false, Ordering::Relaxed);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// What one connection's requests share.
struct Edge {
    sender: Sender,
    served: Arc<ServedPod>,
    peer: Peer,
    h2: bool,
    recheck: Recheck,
    /// The app said (or was told) it closes the connection after this
    /// response.
    app_closes: Arc<AtomicBool>,
}

/// Serves a client connection until it ends; closes it gracefully once the
/// app's connection is gone (the client reconnects rather than getting
/// 502s on a connection that leads nowhere); drops it, its streams with it,
/// once the policy refuses it. The two connection types share no trait
/// for `graceful_shutdown`: a macro.
macro_rules! until_gone_or_cut {
    ($conn:ident, $app_gone:ident, $cut:ident, $what:literal) => {{
        let mut app_gone = $app_gone;
        tokio::pin!($conn);
        tokio::select! {
            r = $conn.as_mut() => r,
            _ = &mut app_gone => {
                $conn.as_mut().graceful_shutdown();
                $conn.await
            }
            _ = $cut.cancelled() => {
                debug!(concat!("an open ", $what, " connection is refused now: cut"));
                return;
            }
        }
    }};
}

/// Serves `client` (HTTP/2 when `h2`) to the app over `server` until the
/// client closes.
pub async fn serve<C, S>(
    client: C,
    server: S,
    h2: bool,
    served: Arc<ServedPod>,
    peer: Peer,
    recheck: Recheck,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app_closes = Arc::new(AtomicBool::new(false));
    let Some((sender, app_gone)) = app_connection(server, h2, &served, app_closes.clone()).await
    else {
        return;
    };
    // Decided again on every policy change, not only at each request: a
    // connection refused now is cut, its long streams with it.
    let (_registered, cut) = recheck.register();
    let edge = Arc::new(Edge {
        sender,
        served,
        peer,
        h2,
        recheck,
        app_closes,
    });
    let service = service_fn(move |req| edge.clone().forward(req));
    let io = TokioIo::new(client);
    let result = if h2 {
        let conn = crate::proxy::http::h2_server().serve_connection(io, service);
        until_gone_or_cut!(conn, app_gone, cut, "HTTP/2")
    } else {
        let conn = crate::proxy::http::http1_server(crate::proxy::http::INBOUND_HEADER_TIMEOUT)
            .serve_connection(io, service)
            .with_upgrades();
        until_gone_or_cut!(conn, app_gone, cut, "HTTP/1")
    };
    if let Err(e) = result {
        debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

/// The connection to the app, counted as the pod's bytes: its sender, and
/// what says when it is gone (its keep-alive timeout, a GOAWAY). `None`
/// when the handshake failed.
async fn app_connection<S>(
    server: S,
    h2: bool,
    served: &ServedPod,
    app_closes: Arc<AtomicBool>,
) -> Option<(Sender, tokio::sync::oneshot::Receiver<()>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sent, received) = match &served.inbound {
        Some(i) => (vec![i.sent.clone()], vec![i.received.clone()]),
        None => (Vec::new(), Vec::new()),
    };
    let app = TokioIo::new(AppIo::new(
        CountedIo::new(server, sent, received),
        app_closes,
    ));
    let (app_closed, app_gone) = tokio::sync::oneshot::channel::<()>();
    let sender = if h2 {
        let handshake = http2::Builder::new(TokioExecutor::new())
            .handshake(app)
            .await;
        match handshake {
            Ok((sender, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "HTTP/2 connection to the app ended");
                    }
                    let _ = app_closed.send(());
                });
                Sender::H2(sender)
            }
            Err(e) => {
                debug!(error = %e, "HTTP/2 handshake with the app failed");
                return None;
            }
        }
    } else {
        match http1::Builder::new().handshake(app).await {
            Ok((sender, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "HTTP/1 connection to the app ended");
                    }
                    let _ = app_closed.send(());
                });
                Sender::H1(tokio::sync::Mutex::new(sender))
            }
            Err(e) => {
                debug!(error = %e, "HTTP/1 handshake with the app failed");
                return None;
            }
        }
    };
    Some((sender, app_gone))
}

impl Edge {
    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        // Policies change live, and a connection is reused: each request
        // is let in again (a refusal is counted and logged there).
        if let Err(reason) = self.recheck.check() {
            return Ok(forbidden(reason));
        }
        let admitted = match admit_request(&self.served, Direction::Inbound) {
            Ok(t) => t,
            Err(refused) => return Ok(refused),
        };
        // A client that closes after this request: the app is told too
        // (one client connection, one app connection), so that the app
        // closes first, as it would without the mesh (see `AppIo`).
        let client_closes = !self.h2 && wants_close(req.headers());
        let prepared = prepare(&mut req, self.h2);
        if client_closes && !prepared.upgrade {
            req.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            self.app_closes.store(true, Ordering::Relaxed);
        }
        let metric = self.served.http.inbound_request(
            &self.served.source,
            self.peer.identity.as_deref(),
            self.peer.tls,
            prepared.protocol,
        );
        let tapped = self.served.http.tap().start(
            "inbound",
            || (self.recheck.client(), self.recheck.server()),
            self.peer.tls,
            &req,
        );
        if let Some(t) = &tapped {
            t.sent();
        }
        match self.sender.send(req.map(|b| b.boxed())).await {
            Ok(resp) => {
                if let Some(m) = &metric {
                    m.latency(started.elapsed());
                }
                Ok(self.respond(resp, prepared, metric, tapped, admitted))
            }
            Err(e) => {
                debug!(error = %e, "the app did not answer");
                if let Some(m) = &metric {
                    m.response(502, None, true);
                }
                if let Some(mut t) = tapped {
                    t.response(502, None);
                    t.end(0, None);
                }
                Ok(proxy_error(
                    StatusCode::BAD_GATEWAY,
                    &format!("the app did not answer: {e}"),
                ))
            }
        }
    }

    /// The app's answer, passed on and counted; an upgrade lives on as
    /// bytes, decided again like any relay.
    fn respond(
        &self,
        mut resp: Response<Incoming>,
        prepared: Prepared,
        metric: Option<RequestMetric>,
        mut tapped: Option<Tapped>,
        admitted: RequestTicket,
    ) -> Response<Body> {
        let status = resp.status();
        let grpc = grpc_status(resp.headers());
        if let Some(t) = &mut tapped {
            t.response(status.as_u16(), grpc);
        }
        let switched = switched(prepared.upgrade, status, &prepared.client_upgrade);
        if switched && let Some(client) = prepared.client_upgrade {
            let server = hyper::upgrade::on(&mut resp);
            spawn_splice(client, server, Some(self.recheck.register()));
        }
        if !self.h2 {
            // The app closes after this response: so does the client's
            // connection (its one way to the app), and the client is told,
            // not left to find out with a 502.
            let closing = wants_close(resp.headers());
            strip_hop_by_hop(resp.headers_mut(), switched);
            if closing {
                self.app_closes.store(true, Ordering::Relaxed);
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
        }
        resp.map(|body| {
            Observed {
                inner: body,
                done: Some(Done {
                    metric,
                    server: None,
                    status: status.as_u16(),
                    grpc_status: grpc,
                    work: None,
                    tap: tapped,
                    admitted: Some(admitted),
                }),
                bytes: 0,
            }
            .boxed()
        })
    }
}

/// The answer to a request the policy refuses.
pub fn forbidden(reason: InboundDenial) -> Response<Body> {
    proxy_error(
        StatusCode::FORBIDDEN,
        &format!("refused by the inbound policy ({reason})"),
    )
}

/// Answers every request of a refused client with a `403` (the app never
/// sees the connection).
pub async fn refuse<C>(client: C, h2: bool, reason: InboundDenial)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // One answer, then the connection goes (HTTP/1: `Connection: close`;
    // HTTP/2: at most REFUSED_FOR): a refused client holds no connection
    // slot of the node.
    let service = service_fn(move |_req: Request<Incoming>| {
        let mut resp = forbidden(reason);
        if !h2 {
            resp.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        async move { Ok::<_, Infallible>(resp) }
    });
    let io = TokioIo::new(client);
    let serve = async {
        if h2 {
            crate::proxy::http::h2_server()
                .serve_connection(io, service)
                .await
        } else {
            crate::proxy::http::http1_server(crate::proxy::http::INBOUND_HEADER_TIMEOUT)
                .serve_connection(io, service)
                .await
        }
    };
    match tokio::time::timeout(REFUSED_FOR, serve).await {
        Ok(Err(e)) => debug!(error = %e, "refused HTTP connection ended with an error"),
        Ok(Ok(())) => {}
        Err(_) => debug!("refused HTTP connection closed: its time is up"),
    }
}

/// How long a refused HTTP client's connection may stay.
const REFUSED_FOR: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn what_detection_read_is_read_again_first() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut r = Rewind::new(b"hello".to_vec(), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
