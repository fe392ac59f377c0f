//! Upstream HTTP connections, pooled per (client pod, endpoint, protocol):
//! HTTP/1 keep-alive connections reused one request at a time, one HTTP/2
//! connection multiplexed. Through the tunnel a pooled connection is a
//! tunnel stream, so no request pays a TLS handshake. Bounded: at most
//! [`MAX_IDLE_H1`] HTTP/1 connections kept per key, and connections idle for
//! [`IDLE_TIMEOUT`] are closed.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_core::{identity::SpiffeId, names::PodUid};
use tracing::debug;

use crate::{
    proxy::{
        inbound::Accounting,
        pods::ServedPod,
        relay::{CountedIo, UpstreamIo},
    },
    telemetry::http::Destination,
};

pub use crate::proxy::http::Body;

/// HTTP/1 connections kept idle per key.
pub const MAX_IDLE_H1: usize = 32;
/// A pooled connection unused this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Which pooled connections a request may use.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub pod: PodUid,
    pub endpoint: SocketAddr,
    pub h2: bool,
}

#[derive(Debug)]
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// One upstream HTTP connection.
pub struct Conn {
    sender: Sender,
    /// Carried over mutual TLS.
    pub tls: bool,
    /// The other end's identity, when it is a meshed pod.
    pub peer: Option<SpiffeId>,
    /// Where it goes, for the request metrics.
    pub dst: Arc<Destination>,
    /// When it last carried a request (shared by every handle on an
    /// HTTP/2 connection), milliseconds since [`now_ms`]'s epoch.
    last_used: Arc<AtomicU64>,
    /// The destination pod's accounting, when it is served here: counted
    /// open while the connection lives.
    accounting: Option<Arc<Accounting>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("sender", &self.sender)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Another handle on a multiplexed (HTTP/2) connection.
    fn share(&self) -> Option<Conn> {
        match &self.sender {
            Sender::H2(s) => Some(Conn {
                sender: Sender::H2(s.clone()),
                tls: self.tls,
                peer: self.peer.clone(),
                dst: self.dst.clone(),
                last_used: self.last_used.clone(),
                accounting: self.accounting.clone(),
            }),
            Sender::H1(_) => None,
        }
    }

    /// An HTTP connection over `io` (HTTP/2 when `h2`; HTTP/1 with
    /// upgrades otherwise).
    pub async fn handshake(
        io: UpstreamIo,
        h2: bool,
        tls: bool,
        peer: Option<SpiffeId>,
        dst: Arc<Destination>,
        accounting: Option<Accounting>,
    ) -> Result<Self, hyper::Error> {
        // Bytes to and from a destination pod served here count for it.
        let counters = accounting.as_ref().and_then(Accounting::inbound);
        let io = CountedIo::new(
            io,
            counters.map(|i| vec![i.sent.clone()]).unwrap_or_default(),
            counters
                .map(|i| vec![i.received.clone()])
                .unwrap_or_default(),
        );
        let io = TokioIo::new(io);
        let sender = if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::Builder::new().handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "upstream HTTP/1 connection ended");
                }
            });
            Sender::H1(sender)
        };
        let mut conn = Self {
            sender,
            tls,
            peer,
            dst,
            last_used: Arc::new(AtomicU64::new(now_ms())),
            accounting: accounting.map(Arc::new),
        };
        // Ready before it is pooled (an HTTP/1 sender is not until its
        // connection task has run).
        match &mut conn.sender {
            Sender::H1(s) => s.ready().await?,
            Sender::H2(s) => s.ready().await?,
        }
        Ok(conn)
    }

    /// The destination pod, when it is served on this node (reached
    /// through the proxy once).
    pub fn local(&self) -> Option<&Arc<ServedPod>> {
        self.accounting.as_ref()?.served()
    }

    /// The other end's SPIFFE ID, if any.
    pub fn peer_uri(&self) -> Option<&str> {
        self.peer.as_ref().map(SpiffeId::uri)
    }

    fn usable(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => !s.is_closed() && s.is_ready(),
            Sender::H2(s) => !s.is_closed() && s.is_ready(),
        }
    }

    fn closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `req`; a request that was never written comes back in the
    /// error (it may go elsewhere).
    pub async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        self.last_used.store(now_ms(), Ordering::Relaxed);
        match &mut self.sender {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }
}

/// Milliseconds since the first call (the pool's clock).
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The pool.
#[derive(Debug, Default)]
pub struct Pool {
    conns: Mutex<HashMap<Key, Vec<Conn>>>,
}

impl Pool {
    /// A connection for `key` that can take a request now.
    pub fn take(&self, key: &Key) -> Option<Conn> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed());
        let found = if key.h2 {
            // Multiplexed: shared, stays in the pool.
            list.iter().find(|c| c.usable()).and_then(Conn::share)
        } else {
            let i = list.iter().position(Conn::usable)?;
            Some(list.swap_remove(i))
        };
        if list.is_empty() {
            conns.remove(key);
        }
        found
    }

    /// Whether an idle connection of `pod` to one of `endpoints` (sorted;
    /// HTTP/1 or HTTP/2) could take a request now. Looks up each endpoint,
    /// or goes through the pool when it is the smaller (a large Service).
    pub fn holds(&self, pod: &PodUid, endpoints: &[SocketAddr]) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.len() < endpoints.len() * 2 {
            return conns.iter().any(|(key, list)| {
                key.pod == *pod
                    && endpoints.binary_search(&key.endpoint).is_ok()
                    && list.iter().any(Conn::usable)
            });
        }
        endpoints.iter().any(|&endpoint| {
            [false, true].into_iter().any(|h2| {
                let key = Key {
                    pod: pod.clone(),
                    endpoint,
                    h2,
                };
                conns
                    .get(&key)
                    .is_some_and(|list| list.iter().any(Conn::usable))
            })
        })
    }

    /// Puts a connection (back) for later requests.
    pub fn put(&self, key: Key, conn: Conn) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(key.clone()).or_default();
        if key.h2 {
            if !list.iter().any(|c| !c.closed()) {
                list.clear();
                list.push(conn);
            }
        } else if list.len() < MAX_IDLE_H1 {
            list.push(conn);
        }
    }

    /// Closes connections idle too long, forgets closed ones.
    pub fn tidy(&self) {
        let now = now_ms();
        let idle = IDLE_TIMEOUT.as_millis() as u64;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|_, list| {
            list.retain(|c| {
                !c.closed() && now.saturating_sub(c.last_used.load(Ordering::Relaxed)) < idle
            });
            !list.is_empty()
        });
    }

    /// Connections pooled now.
    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/1 connection to a listener on loopback that accepts and
    /// holds it (ready: HTTP/1 needs no exchange before a request).
    async fn conn(listener: &tokio::net::TcpListener) -> (Conn, tokio::net::TcpStream) {
        let addr = listener.local_addr().expect("addr");
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let conn = Conn::handshake(
            UpstreamIo::Tcp(client.expect("connect")),
            false,
            false,
            None,
            Arc::default(),
            None,
        )
        .await
        .expect("handshake");
        (conn, server.expect("accept").0)
    }

    fn uid(u: &str) -> PodUid {
        PodUid::new(u).expect("a pod UID")
    }

    #[tokio::test]
    async fn holds_finds_an_idle_connection_of_the_pod_to_an_endpoint() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let pool = Pool::default();
        let endpoint: SocketAddr = "10.0.0.5:80".parse().expect("addr");
        let (c, _held) = conn(&listener).await;
        pool.put(
            Key {
                pod: uid("a"),
                endpoint,
                h2: false,
            },
            c,
        );
        let (c, _held_too) = conn(&listener).await;
        pool.put(
            Key {
                pod: uid("c"),
                endpoint: "10.0.0.7:80".parse().expect("addr"),
                h2: false,
            },
            c,
        );
        let few: Vec<SocketAddr> = vec![endpoint];
        let many: Vec<SocketAddr> = (1..=20)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        // Both ways of looking: by endpoint (one endpoint, two pooled
        // keys) and through the pool (twenty endpoints).
        for endpoints in [&few, &many] {
            assert!(pool.holds(&uid("a"), endpoints));
            assert!(!pool.holds(&uid("b"), endpoints), "another pod's");
        }
        let other: Vec<SocketAddr> = vec!["10.0.0.6:80".parse().expect("addr")];
        assert!(!pool.holds(&uid("a"), &other));
        // Taken (in use): nothing idle.
        let key = Key {
            pod: uid("a"),
            endpoint,
            h2: false,
        };
        let taken = pool.take(&key).expect("pooled");
        for endpoints in [&few, &many] {
            assert!(!pool.holds(&uid("a"), endpoints));
        }
        drop(taken);
    }
}
