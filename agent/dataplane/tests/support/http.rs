//! The test cluster's HTTP: a server app with knobs that names itself,
//! and a client speaking HTTP/1 or HTTP/2 through the proxy.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// How an [`HttpServer`] answers.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub status: u16,
    /// Waited before each answer.
    pub latency: Duration,
    /// Body bytes of each answer.
    pub size: usize,
    /// A gRPC request's `grpc-status` (in the trailers).
    pub grpc_status: u32,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            status: 200,
            latency: Duration::ZERO,
            size: 2,
            grpc_status: 0,
        }
    }
}

/// A test app: HTTP/1 (with upgrades: a `101` then an echo) and HTTP/2;
/// every answer says who served it in `x-served-by`.
pub struct HttpServer {
    pub at: SocketAddr,
    pub knobs: Mutex<Knobs>,
    served: AtomicUsize,
}

impl HttpServer {
    pub(super) fn new(at: SocketAddr) -> Self {
        Self {
            at,
            knobs: Mutex::new(Knobs::default()),
            served: AtomicUsize::new(0),
        }
    }

    /// Requests it answered.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    pub fn set(&self, f: impl FnOnce(&mut Knobs)) {
        f(&mut self.knobs.lock().unwrap());
    }

    pub(super) async fn serve(self: Arc<Self>, conn: TcpStream) {
        let mut first = [0u8; 24];
        let h2 = matches!(conn.peek(&mut first).await, Ok(24) if first == *b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let me = self.clone();
        let service = hyper::service::service_fn(move |req| me.clone().answer(req));
        let io = hyper_util::rt::TokioIo::new(conn);
        if h2 {
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        } else {
            let _ = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(io, service)
                .with_upgrades()
                .await;
        }
    }

    async fn answer(
        self: Arc<Self>,
        mut req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<TestBody>, std::convert::Infallible> {
        use http_body_util::BodyExt;
        let knobs = self.knobs.lock().unwrap().clone();
        tokio::time::sleep(knobs.latency).await;
        self.served.fetch_add(1, Ordering::SeqCst);
        let served_by = hyper::header::HeaderValue::from_str(&self.at.to_string()).unwrap();
        if req.headers().contains_key(hyper::header::UPGRADE) {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = upgrade.await {
                    let mut io = hyper_util::rt::TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let resp = hyper::Response::builder()
                .status(101)
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, "echo")
                .header("x-served-by", served_by)
                .body(full(Vec::new()))
                .unwrap();
            return Ok(resp);
        }
        let grpc = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        // The request's body is read whole first (a test sends little).
        let _ = req.into_body().collect().await;
        let body = vec![b'x'; knobs.size];
        let resp = hyper::Response::builder()
            .status(knobs.status)
            .header("x-served-by", served_by);
        Ok(if grpc {
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", knobs.grpc_status.into());
            let frames = vec![
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(
                    body,
                ))),
                Ok(hyper::body::Frame::trailers(trailers)),
            ];
            resp.header(hyper::header::CONTENT_TYPE, "application/grpc")
                .body(http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed())
                .unwrap()
        } else {
            resp.body(full(body)).unwrap()
        })
    }
}

pub type TestBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

pub fn full(body: Vec<u8>) -> TestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes::Bytes::from(body)).boxed()
}

/// A client's HTTP connection through the proxy.
pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

/// What a request through the proxy got.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Which server answered (`x-served-by`), if one did.
    pub served_by: Option<SocketAddr>,
    /// The proxy's own error, if it made the answer.
    pub proxy_error: Option<String>,
    pub body: Vec<u8>,
    pub grpc_status: Option<String>,
}

impl Client {
    /// An HTTP connection over `conn` (HTTP/2 with prior knowledge when
    /// `h2`).
    pub async fn over(conn: TcpStream, h2: bool) -> Self {
        let io = hyper_util::rt::TokioIo::new(conn);
        if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Client::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn.with_upgrades());
            Client::H1(send)
        }
    }

    pub async fn send(
        &mut self,
        req: hyper::Request<TestBody>,
    ) -> hyper::Response<hyper::body::Incoming> {
        match self {
            Client::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Client::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        }
    }

    /// `GET path` (with `content-type` when given), read whole.
    pub async fn get(&mut self, authority: &str, path: &str, content_type: Option<&str>) -> Answer {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::builder()
            .uri(path)
            .header(hyper::header::HOST, authority);
        if matches!(self, Client::H2(_)) {
            req = hyper::Request::builder().uri(format!("http://{authority}{path}"));
        }
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let resp = self.send(req.body(full(Vec::new())).unwrap()).await;
        let status = resp.status().as_u16();
        let header = |r: &hyper::Response<_>, n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let served_by = header(&resp, "x-served-by").and_then(|v| v.parse().ok());
        let proxy_error = header(&resp, "nodemesh-proxy-error");
        let collected = resp.into_body().collect().await.unwrap();
        let grpc_status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Answer {
            status,
            served_by,
            proxy_error,
            body: collected.to_bytes().to_vec(),
            grpc_status,
        }
    }
}
