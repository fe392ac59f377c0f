//! The agent's tap port (`:4190`): `/v1/stat` and `/v1/tap` over mutual
//! TLS, answered to one identity only — the identity service's tap client
//! (`spiffe://<td>/nodemesh/tap`, outside the workload space: no node can
//! get a certificate for it), which serves them through the API server
//! (`tap.nodemesh.io`) to the users Kubernetes RBAC allows. The port presents the agent's own identity's
//! certificate (asked for like a workload's, kept whatever the pods).
//!
//! A pod that dials it without that identity's certificate gets a failed
//! handshake or a closed connection, never data.
use std::{convert::Infallible, sync::Arc, time::Duration};

use hyper::{Method, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use nodemesh_core::{
    admin::{AdminResponse, text},
    identity::Identity,
    pki::provider,
};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{admin::AgentRoutes, identity::CertStore, proxy::tunnel::tls::peer_spiffe};
use nodemesh_core::listen::Guard;

/// Connections served at once, once the client is known to be the
/// identity service (it holds one per tap reader and asks for stats now
/// and then).
const MAX_CONNECTIONS: usize = 64;
/// Any pod can reach the port and start a handshake: handshakes have their
/// own short slots (the guard's: a newer one evicts the oldest, of its
/// source first), and never take a served one.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The tap port's settings.
pub struct TapPort {
    pub store: Arc<CertStore>,
    /// The agent's own identity: its certificate is presented.
    pub me: Identity,
    pub routes: AgentRoutes,
    pub tls: crate::telemetry::TlsMetrics,
    /// Connections per source and handshake slots.
    pub guard: Guard,
}

/// Presents the agent's current certificate (none yet: the handshake
/// fails, and the client tries again later).
#[derive(Debug)]
struct OwnCert {
    store: Arc<CertStore>,
    me: Identity,
}

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.store.current(&self.me).map(|c| c.key);
        if key.is_none() {
            debug!(identity = %self.me, "tap port: no certificate for the agent's own identity yet");
        }
        key
    }
}

fn tls(port: &TapPort) -> Result<ServerConfig, rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(port.store.roots(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(OwnCert {
            store: port.store.clone(),
            me: port.me.clone(),
        }));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Serves the tap port on `listeners` until `shutdown`.
pub fn serve(
    port: TapPort,
    listeners: Vec<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), rustls::Error> {
    let acceptor = TlsAcceptor::from(Arc::new(tls(&port)?));
    let allowed = nodemesh_core::identity::tap_client_id(port.store.trust_domain());
    let port = Arc::new(port);
    // Anyone can knock: refusals are logged once a minute, with a count.
    let logs = Arc::new(nodemesh_core::throttle::Throttle::new(Duration::from_secs(
        60,
    )));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, client = %allowed, "tap port listening");
        }
        let (acceptor, allowed, port, connections, shutdown, logs) = (
            acceptor.clone(),
            allowed.clone(),
            port.clone(),
            connections.clone(),
            shutdown.clone(),
            logs.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            warn!(error = %e, "tap port: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = shutdown.cancelled() => return,
                };
                let Some(slot) = port.guard.connection(peer.ip()) else {
                    debug!(%peer, "tap port: over its connection caps; closed");
                    continue;
                };
                let handshake = port.guard.handshake(peer.ip());
                let (acceptor, allowed, port, connections, shutdown, logs) = (
                    acceptor.clone(),
                    allowed.clone(),
                    port.clone(),
                    connections.clone(),
                    shutdown.clone(),
                    logs.clone(),
                );
                tokio::spawn(async move {
                    let _slot = slot;
                    let accepted = tokio::select! {
                        t = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => t,
                        () = handshake.evicted() => {
                            debug!(%peer, "tap port: handshake evicted by a newer one");
                            return;
                        }
                    };
                    let tls = match accepted {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "tap port: handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "tap port: handshake timed out");
                            return;
                        }
                    };
                    port.tls
                        .handshake(crate::telemetry::TlsEndpoint::TapPort, tls.get_ref().1);
                    let client = peer_spiffe(tls.get_ref().1.peer_certificates());
                    drop(handshake);
                    if client.as_deref() != Some(allowed.as_str()) {
                        if let Some(held) = logs.allow("not_the_tap_client") {
                            warn!(%peer, client = client.as_deref().unwrap_or("-"), allowed = %allowed, not_logged = held, "tap port: refused a client that is not the identity service");
                        }
                        return;
                    }
                    let Ok(_permit) = connections.try_acquire_owned() else {
                        warn!(%peer, limit = MAX_CONNECTIONS, "tap port: too many connections from the identity service; closing this one");
                        return;
                    };
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let port = port.clone();
                        async move { Ok::<_, Infallible>(route(&port.routes, req.method(), req.uri())) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(nodemesh_core::admin::HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(tls), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => if let Err(e) = r {
                            debug!(%peer, error = %e, "tap port: connection ended with an error");
                        },
                        _ = shutdown.cancelled() => {}
                    }
                });
            }
        });
    }
    Ok(())
}

fn route(routes: &AgentRoutes, method: &Method, uri: &hyper::Uri) -> AdminResponse {
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    routes.answer(uri.path(), uri.query()).unwrap_or_else(|| {
        text(
            StatusCode::NOT_FOUND,
            "/v1/stat, /v1/tap and /v1/node only\n",
        )
    })
}
