//! What both sides' HTTP paths share: hop-by-hop headers, gRPC status,
//! upgrades, responses the proxy makes, and the response body that records
//! a request's outcome when it ends.
use nodemesh_core::labels::Direction;
use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Response, StatusCode,
    body::{Frame, Incoming, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use crate::{
    proxy::{
        admission::{Door, RequestTicket},
        balance::InFlight,
        pods::ServedPod,
    },
    telemetry::{
        http::{Protocol, Request as RequestMetric},
        tap::Tapped,
    },
};

/// Request and response bodies on the proxy's HTTP paths.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The header on every response the proxy made itself.
pub const PROXY_ERROR_HEADER: &str = "nodemesh-proxy-error";

/// Carries an upgraded connection (WebSocket after 101, a CONNECT tunnel)
/// as bytes.
pub async fn splice(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(server)) = (client.await, server.await) else {
        debug!("an upgrade did not complete");
        return;
    };
    let mut client = TokioIo::new(client);
    let mut server = TokioIo::new(server);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// The largest request head (request line and headers) a client may send;
/// beyond, `431`. A request's headers, and HTTP/2's header list, alike.
pub const MAX_HEADERS_BYTES: usize = 64 * 1024;

/// How long a client on the inbound side (anyone who can reach a meshed
/// pod) has to send a request's head, from the moment one is awaited: a
/// slow-loris client is closed then, and so is a keep-alive connection
/// idle that long (its client opens another, as it would with most
/// servers). Longer than a client proxy keeps a pooled connection idle
/// (`outbound::http::pool`'s 60 s, checked every 10 s): the server's edge
/// never closes one under a request being sent.
pub const INBOUND_HEADER_TIMEOUT: Duration = Duration::from_secs(120);

/// The same on the outbound side (the pod's own app, whose connections
/// count against its own share): long, not to trip idle pools.
pub const OUTBOUND_HEADER_TIMEOUT: Duration = Duration::from_secs(3600);

/// Streams a client may have open at once on one HTTP/2 connection.
pub const MAX_CLIENT_STREAMS: u32 = 256;

/// The HTTP/1 server side of every client connection the proxy serves.
///
/// A client may shut its write side once its request is sent (`nc -N`,
/// `Connection: close` clients, a pipeline ended by a half-close): that
/// end of the request stream is not the end of the connection, and every
/// response still goes out (hyper's default closes at once on that EOF).
/// A head must come whole within `header_timeout` and
/// [`MAX_HEADERS_BYTES`].
pub fn http1_server(header_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADERS_BYTES);
    b
}

/// The HTTP/2 server side of every client connection the proxy serves:
/// at most [`MAX_CLIENT_STREAMS`] streams at once, header lists within
/// [`MAX_HEADERS_BYTES`], pings to find a dead client.
pub fn h2_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CLIENT_STREAMS)
        .max_header_list_size(MAX_HEADERS_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Whether a response ends the HTTP part of an upgrade request (a `101`,
/// or a `2xx` to `CONNECT`): its connection becomes a byte stream.
pub fn switched(
    upgrade: bool,
    status: StatusCode,
    client_upgrade: &Option<hyper::upgrade::OnUpgrade>,
) -> bool {
    upgrade
        && (status == StatusCode::SWITCHING_PROTOCOLS
            || (status.is_success() && client_upgrade.is_some()))
}

/// Carries an upgraded connection as bytes (in a task of its own); when
/// it reaches a pod here, `registered` (kept for as long) cuts it once the
/// pod's policy refuses it.
pub fn spawn_splice<R: Send + 'static>(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    registered: Option<(R, tokio_util::sync::CancellationToken)>,
) {
    tokio::spawn(async move {
        match registered {
            Some((_registered, cut)) => tokio::select! {
                () = splice(client, server) => {}
                _ = cut.cancelled() => {
                    debug!("an upgraded connection is refused now: cut");
                }
            },
            None => splice(client, server).await,
        }
    });
}

/// A response the proxy made.
pub fn proxy_error(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("nodemesh: {message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let value =
        HeaderValue::from_str(message).unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
    resp.headers_mut()
        .insert(HeaderName::from_static(PROXY_ERROR_HEADER), value);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A request's slot in `served`'s share (the pod whose request it is on
/// this side), or the `503` that refuses it (counted on its series for
/// `side`).
#[allow(clippy::result_large_err)]
pub fn admit_request(served: &ServedPod, side: Direction) -> Result<RequestTicket, Response<Body>> {
    served.share.request().map_err(|why| {
        let metrics = match side {
            Direction::Outbound => Some(&served.outbound),
            Direction::Inbound => served.inbound.as_ref(),
        };
        served
            .share
            .admission()
            .refused(metrics, &served.pod.key(), Door::Request, why, None);
        proxy_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("over its share of in-flight requests ({why})"),
        )
    })
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether `Connection` names `token`.
fn connection_says(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_says(headers, "upgrade")
}

/// `Connection: close`: the sender closes the connection after this
/// message.
pub fn wants_close(headers: &HeaderMap) -> bool {
    connection_says(headers, "close")
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those `Connection`
/// names, and the fixed list (`TE: trailers` stays); for an upgrade (a
/// request asking for one, a `101` granting it), `Upgrade` and
/// `Connection: upgrade` go on.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    // `TE: trailers` says the client takes trailers: that goes on.
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        if upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A request as both sides' HTTP paths take it in.
pub struct Prepared {
    pub protocol: Protocol,
    /// It asks to become a byte stream (WebSocket, `CONNECT`; HTTP/1).
    pub upgrade: bool,
    /// The client's side of that stream, once the server agrees.
    pub client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// What `req` carries (HTTP/2 when `h2`; gRPC by its content type), with
/// its hop-by-hop headers gone.
pub fn prepare(req: &mut hyper::Request<Incoming>, h2: bool) -> Prepared {
    let protocol = match (h2, is_grpc(req.headers())) {
        (false, _) => Protocol::Http1,
        (true, true) => Protocol::Grpc,
        (true, false) => Protocol::H2,
    };
    let upgrade = !h2 && (wants_upgrade(req.headers()) || req.method() == hyper::Method::CONNECT);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *req));
    if !h2 {
        strip_hop_by_hop(req.headers_mut(), upgrade);
    }
    Prepared {
        protocol,
        upgrade,
        client_upgrade,
    }
}

/// What is recorded when a response ends.
pub struct Done {
    /// The request as this side counted it.
    pub metric: Option<RequestMetric>,
    /// A same-node request through the proxy once: the server's side, as
    /// the inbound stage counts it.
    pub server: Option<ServerSide>,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// The endpoint's load lasts as long as the response.
    pub work: Option<InFlight>,
    /// The request as a tap sees it, when someone listens.
    pub tap: Option<Tapped>,
    /// Its slot in the pod's request share, held to the response's end.
    pub admitted: Option<RequestTicket>,
}

impl Done {
    fn finish(self, error: bool, bytes: u64) {
        if let Some(m) = &self.metric {
            m.response(self.status, self.grpc_status, error);
        }
        if let Some(server) = self.server {
            server.finish(self.status, self.grpc_status, error, bytes);
        }
        if let Some(t) = self.tap {
            t.end(bytes, self.grpc_status);
        }
    }
}

/// The server's side of a request between two pods of this node: what the
/// inbound stage counts of it (its request metric, its tap event), made by
/// [`crate::proxy::inbound::Inbound::local_request`] and held by the
/// outbound path, which does not know what it counts, to the response's
/// end.
pub struct ServerSide {
    pub(crate) metric: Option<RequestMetric>,
    pub(crate) tap: Option<Tapped>,
}

impl ServerSide {
    fn finish(self, status: u16, grpc_status: Option<u32>, error: bool, bytes: u64) {
        if let Some(m) = &self.metric {
            m.response(status, grpc_status, error);
        }
        if let Some(t) = self.tap {
            t.end(bytes, grpc_status);
        }
    }
}

/// A response body passed through as it streams; its end (or error)
/// records the response, its trailers the gRPC status.
pub struct Observed {
    pub inner: Incoming,
    pub done: Option<Done>,
    /// Body bytes passed so far.
    pub bytes: u64,
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if let (Some(trailers), Some(done)) = (frame.trailers_ref(), self.done.as_mut())
                    && let Some(s) = grpc_status(trailers)
                {
                    done.grpc_status = Some(s);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(done) = self.done.take() {
                    done.finish(true, self.bytes);
                }
            }
            Poll::Ready(None) => {
                if let Some(done) = self.done.take() {
                    done.finish(false, self.bytes);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // The client went away before the end (or the body was never
        // polled to it): counted as it stood.
        if let Some(done) = self.done.take() {
            done.finish(false, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stop_at_the_proxy() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("web.shop:80"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::HOST], "web.shop:80", "Host untouched");
        assert_eq!(h[header::TE], "trailers", "TE: trailers stays");

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn grpc_is_told_by_content_type_and_status_by_header() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(is_grpc(&h));
        assert_eq!(grpc_status(&h), Some(14));
    }
}
