//! Outbound: connections a meshed pod makes, redirected by `connect4` to the
//! pod's own `127.0.0.1:15001`.
//!
//! For each accepted connection: read the original destination by socket
//! cookie, connect to it from inside the pod's netns (so the destination
//! sees the pod's own address, as without the mesh), relay. A destination
//! that cannot be reached gives the client a reset, a log line and a metric.
use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info_span, warn};

use super::relay::{relay, reset};
use crate::{
    discovery::Pod,
    metrics::{ConnectError, PodTcpMetrics},
    netns::{Netns, socket_cookie},
    redirect::Redirect,
};

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// How long connecting to a destination may take.
    pub connect_timeout: Duration,
    /// Relay buffer per direction per connection.
    pub buffer_size: usize,
    /// Connections proxied at once, all pods together; beyond it new ones
    /// wait in the listeners' backlogs.
    pub max_connections: usize,
}

/// What the outbound proxy knows about one captured pod.
#[derive(Debug)]
pub struct PodProxy {
    pub pod: Arc<Pod>,
    pub netns: Arc<Netns>,
    pub tcp: PodTcpMetrics,
}

/// Shared by every pod's accept loop.
#[derive(Debug)]
pub struct Outbound {
    cfg: OutboundConfig,
    redirect: Arc<Redirect>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
}

/// How long to wait for sock_ops to re-key the original destination: it
/// runs as the handshake completes, so it is normally there before accept.
const ORIG_DST_WAIT: Duration = Duration::from_millis(50);

impl Outbound {
    pub fn new(cfg: OutboundConfig, redirect: Arc<Redirect>) -> Self {
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        Self {
            cfg,
            redirect,
            limit,
            tracker: TaskTracker::new(),
        }
    }

    /// Accepts on one pod's listener until `stop`; then the listener closes.
    /// Connections already accepted carry on.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        pod: Arc<PodProxy>,
        stop: CancellationToken,
    ) {
        loop {
            let permit = tokio::select! {
                permit = self.limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            match accepted {
                Ok((client, peer)) => {
                    let span = info_span!(
                        "outbound",
                        pod = %pod.pod.key(),
                        client = %peer,
                    );
                    let this = self.clone();
                    let pod = pod.clone();
                    self.tracker.spawn(
                        async move {
                            this.proxy(client, &pod).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little
                    // rather than spin.
                    warn!(pod = %pod.pod.key(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn proxy(&self, client: TcpStream, pod: &PodProxy) {
        let _open = pod.tcp.open();
        let mut client = client;
        let _ = client.set_nodelay(true);
        let Some(orig) = self.orig_dst(&client).await else {
            warn!("no original destination recorded for this connection; resetting it");
            pod.tcp.connect_error(ConnectError::NoOriginalDestination);
            reset(&client);
            return;
        };
        let mut server = match self.connect(&pod.netns, orig).await {
            Ok(server) => server,
            Err(e) => {
                let reason = ConnectError::classify(&e);
                warn!(dst = %orig, %reason, error = %e, "cannot connect to destination; resetting the client");
                pod.tcp.connect_error(reason);
                reset(&client);
                return;
            }
        };
        match relay(
            &mut client,
            &mut server,
            self.cfg.buffer_size,
            &pod.tcp.sent,
            &pod.tcp.received,
        )
        .await
        {
            Ok(n) => {
                debug!(dst = %orig, sent = n.client_to_server, received = n.server_to_client, "closed")
            }
            Err(e) => {
                debug!(dst = %orig, error = %e, "relay ended with an error; both sides reset")
            }
        }
    }

    async fn orig_dst(&self, client: &TcpStream) -> Option<SocketAddrV4> {
        let cookie = socket_cookie(client).ok()?;
        let deadline = tokio::time::Instant::now() + ORIG_DST_WAIT;
        loop {
            if let Some(orig) = self.redirect.take_orig_dst(cookie) {
                return Some(orig);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Connects to `dst` with a socket made in the pod's netns.
    async fn connect(&self, netns: &Netns, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
        let socket = netns.tcp_socket()?;
        socket.set_nonblocking(true)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        let stream = tokio::time::timeout(
            self.cfg.connect_timeout,
            socket.connect(SocketAddr::V4(dst)),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Stops taking new connections into account for shutdown and waits for
    /// those in flight, up to `grace`. Returns how many were still open.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            return self.tracker.len();
        }
        0
    }

    /// Connections in flight now.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}
