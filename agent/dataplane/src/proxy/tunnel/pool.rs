//! The tunnel's client end: streams to other nodes over pooled mutual-TLS
//! HTTP/2 connections per (source pod, source identity, destination node,
//! destination identity) — one pod's streams never share a connection
//! (and its flow-control window: a client that stops reading stalls the
//! streams of its connection) with another pod's — as many as its streams
//! need (a connection takes at most the
//! server's [`h2::MAX_STREAMS`] at once; a new one is dialled beyond). A
//! renewed source certificate gets a new connection for new streams; idle
//! connections are closed.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, client::conn::http2::SendRequest};
use hyper_util::rt::TokioIo;
use nodemesh_core::{
    identity::{Identity, SpiffeId},
    labels::Direction,
    names::PodUid,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{TunnelConfig, TunnelError, TunnelMetrics, h2, tls};
use crate::{
    identity::{CertStore, Current},
    proxy::{
        connect::Connector,
        relay::{StreamSlot, TunnelStream},
    },
};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    pod: PodUid,
    src: SpiffeId,
    node: SocketAddr,
    dst: SpiffeId,
}

struct Pooled {
    send: SendRequest<Empty<Bytes>>,
    /// The source certificate generation it was made with: a renewed
    /// certificate gets a new connection for new streams.
    generation: u64,
    last_used: Instant,
    /// No new streams on it past this: its age cap, or the server's
    /// certificate's expiry, whichever comes first.
    retire_at: Instant,
    /// Streams open on it now.
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pooled {
    fn streams(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The connections of one key: those that may take streams, fullest
/// last.
type Slot = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// Why an outbound tunnel stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no certificate for {0} yet")]
    NoCertificate(Identity),
    #[error("cannot reach the peer node's tunnel at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the peer at {addr} is {got:?}, not {expected}")]
    WrongIdentity {
        addr: SocketAddr,
        expected: String,
        got: Option<String>,
    },
    #[error("HTTP/2 with {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("the peer node answered {status} for {dst}")]
    Refused { dst: SocketAddr, status: StatusCode },
    #[error("no tunnel stream within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Name(String),
}

impl OpenError {
    fn reason(&self) -> TunnelError {
        match self {
            Self::NoCertificate(_) => TunnelError::NoCertificate,
            Self::Connect { .. } | Self::Refused { .. } | Self::Timeout(_) => TunnelError::Connect,
            Self::Tls { source, .. } => tls::classify(source),
            Self::WrongIdentity { .. } => TunnelError::WrongIdentity,
            Self::Http { .. } | Self::Name(_) => TunnelError::Protocol,
        }
    }
}

/// Opens tunnel streams, pooling connections.
pub struct TunnelPool {
    cfg: TunnelConfig,
    store: Arc<CertStore>,
    metrics: TunnelMetrics,
    connector: Arc<dyn Connector>,
    pool: Mutex<HashMap<PoolKey, Slot>>,
    /// TLS settings per source identity, made once.
    configs: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

impl TunnelPool {
    pub fn new(
        cfg: TunnelConfig,
        store: Arc<CertStore>,
        metrics: TunnelMetrics,
        connector: Arc<dyn Connector>,
    ) -> Self {
        Self {
            cfg,
            store,
            metrics,
            connector,
            pool: Mutex::default(),
            configs: Mutex::default(),
        }
    }

    /// Opens a stream to `dst` (a pod of `dst_id` on the node at
    /// `node_ip`) as `src`; with it, whether a new tunnel connection was
    /// dialled for it (its time then says little about the endpoint).
    pub async fn open(
        &self,
        pod: &PodUid,
        src: &SpiffeId,
        node_ip: IpAddr,
        dst_id: &SpiffeId,
        dst: SocketAddr,
        client: Option<SocketAddr>,
    ) -> Result<(TunnelStream, StreamSlot, bool), OpenError> {
        let limit = self.cfg.connect_timeout + self.cfg.handshake_timeout;
        let result = match tokio::time::timeout(
            limit,
            self.open_inner(pod, src, node_ip, dst_id, dst, client),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(OpenError::Timeout(limit)),
        };
        match &result {
            Ok(_) => self.metrics.stream(Direction::Outbound),
            Err(e) => self.metrics.error(Direction::Outbound, e.reason()),
        }
        result
    }

    async fn open_inner(
        &self,
        pod: &PodUid,
        src: &SpiffeId,
        node_ip: IpAddr,
        dst_id: &SpiffeId,
        dst: SocketAddr,
        client: Option<SocketAddr>,
    ) -> Result<(TunnelStream, StreamSlot, bool), OpenError> {
        let current = self
            .store
            .wait(src.identity(), self.cfg.connect_timeout)
            .await
            .ok_or_else(|| OpenError::NoCertificate(src.identity().clone()))?;
        let key = PoolKey {
            pod: pod.clone(),
            src: src.clone(),
            node: SocketAddr::new(node_ip, self.cfg.port),
            dst: dst_id.clone(),
        };
        let slot = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // A pooled connection the peer just retired (GOAWAY: its age, or
        // this node's certificate expiring there) fails the stream before
        // anything was sent on it: once more on a new connection.
        let (send, stream_slot, dialled) = self.connection(&slot, &key, &current, false).await?;
        match self.request(send, &key, dst, client).await {
            Err(OpenError::Http { .. }) if !dialled => {
                debug!(node = %key.node, "pooled tunnel connection no longer takes streams; dialling a new one");
                drop(stream_slot);
                let (send, stream_slot, _) = self.connection(&slot, &key, &current, true).await?;
                Ok((
                    self.request(send, &key, dst, client).await?,
                    stream_slot,
                    true,
                ))
            }
            r => r.map(|stream| (stream, stream_slot, dialled)),
        }
    }

    /// A pooled connection for `key` with room for a stream (the least
    /// busy; a new one if none may take it, or if `fresh`), the stream's
    /// slot on it, and whether it was dialled now. One connect per key at
    /// a time; the others wait and reuse it.
    async fn connection(
        &self,
        slot: &Slot,
        key: &PoolKey,
        current: &Current,
        fresh: bool,
    ) -> Result<(SendRequest<Empty<Bytes>>, StreamSlot, bool), OpenError> {
        let mut pooled = slot.lock().await;
        let now = Instant::now();
        // Those that may take no new stream go (their open streams carry
        // on: the connection lives while they do).
        pooled.retain(|p| {
            !p.send.is_closed() && p.generation == current.generation && now < p.retire_at
        });
        let room = if fresh {
            None
        } else {
            pooled
                .iter_mut()
                .filter(|p| p.streams() < h2::MAX_STREAMS as usize)
                .min_by_key(|p| p.streams())
        };
        if let Some(p) = room {
            p.last_used = now;
            return Ok((p.send.clone(), StreamSlot::take(&p.streams), false));
        }
        let (send, retire_at) = self.dial(key, current).await?;
        let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let taken = StreamSlot::take(&streams);
        pooled.push(Pooled {
            send: send.clone(),
            generation: current.generation,
            last_used: Instant::now(),
            retire_at,
            streams,
        });
        Ok((send, taken, true))
    }

    /// One CONNECT stream on `send`.
    async fn request(
        &self,
        mut send: SendRequest<Empty<Bytes>>,
        key: &PoolKey,
        dst: SocketAddr,
        client: Option<SocketAddr>,
    ) -> Result<TunnelStream, OpenError> {
        let http_err = |source| OpenError::Http {
            addr: key.node,
            source,
        };
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.to_string());
        if let Some(client) = client {
            req = req.header(super::server::FORWARDED, format!("for=\"{client}\""));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| OpenError::Name(e.to_string()))?;
        send.ready().await.map_err(http_err)?;
        let resp = send.send_request(req).await.map_err(http_err)?;
        if resp.status() != StatusCode::OK {
            return Err(OpenError::Refused {
                dst,
                status: resp.status(),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(http_err)?;
        Ok(TokioIo::new(upgraded))
    }

    fn client_config(&self, src: &Identity) -> Result<Arc<ClientConfig>, OpenError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(src) {
            return Ok(c.clone());
        }
        let cfg = Arc::new(
            tls::client_config(&self.store, src).map_err(|e| OpenError::Name(e.to_string()))?,
        );
        configs.insert(src.clone(), cfg.clone());
        Ok(cfg)
    }

    /// A new mutual-TLS HTTP/2 connection for `key`, and when it stops
    /// taking new streams.
    async fn dial(
        &self,
        key: &PoolKey,
        current: &Current,
    ) -> Result<(SendRequest<Empty<Bytes>>, Instant), OpenError> {
        let td = self.store.trust_domain();
        let name = key
            .dst
            .identity()
            .dns_name(td)
            .map_err(|e| OpenError::Name(e.to_string()))?;
        let server_name = ServerName::try_from(name).map_err(|e| OpenError::Name(e.to_string()))?;
        let tcp = self
            .connector
            .connect(None, key.node)
            .await
            .map_err(|source| OpenError::Connect {
                addr: key.node,
                source,
            })?;
        let connector = TlsConnector::from(self.client_config(key.src.identity())?);
        let tls = tokio::time::timeout(
            self.cfg.handshake_timeout,
            connector.connect(server_name, tcp),
        )
        .await
        .map_err(|_| OpenError::Tls {
            addr: key.node,
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| OpenError::Tls {
            addr: key.node,
            source,
        })?;
        self.metrics.tls.handshake(
            crate::telemetry::TlsEndpoint::TunnelOutbound,
            tls.get_ref().1,
        );
        let got = tls::peer_spiffe(tls.get_ref().1.peer_certificates());
        if got.as_deref() != Some(key.dst.uri()) {
            return Err(OpenError::WrongIdentity {
                addr: key.node,
                expected: key.dst.uri().to_owned(),
                got,
            });
        }
        let retire_at = tls::retire_at(
            tls.get_ref().1.peer_certificates(),
            self.cfg.max_connection_age,
        );
        let (send, conn) = h2::client()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| OpenError::Http {
                addr: key.node,
                source,
            })?;
        let node = key.node;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%node, error = %e, "tunnel connection ended with an error");
            }
        });
        self.metrics.connection(Direction::Outbound);
        info!(src = %key.src, dst = %key.dst, %node, generation = current.generation, "tunnel connection established");
        Ok((send, retire_at))
    }

    /// Closes pooled connections idle for longer than the idle timeout
    /// (streams still open on them carry on), every few seconds until
    /// `stop`.
    pub async fn evict_idle(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.cfg.idle_timeout / 4).max(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
            // TLS settings of identities the node no longer holds.
            self.configs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|id, _| self.store.current(id).is_some());
            let entries: Vec<(PoolKey, Slot)> = self
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (key, slot) in entries {
                let Ok(mut pooled) = slot.try_lock() else {
                    continue;
                };
                // Idle: no stream open on it for the idle timeout (one
                // with streams open is in use now).
                let now = Instant::now();
                pooled.retain_mut(|p| {
                    if p.streams() > 0 {
                        p.last_used = now;
                    }
                    !p.send.is_closed() && now.duration_since(p.last_used) < self.cfg.idle_timeout
                });
                if pooled.is_empty() {
                    // Forgotten under the map's lock, and only if no open
                    // is about to use it (it holds a clone of the slot).
                    let mut map = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                    if Arc::strong_count(&slot) == 2 {
                        map.remove(&key);
                        debug!(node = %key.node, "idle tunnel connection closed");
                    }
                }
            }
        }
    }
}
