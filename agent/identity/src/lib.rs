//! `nodemesh identity`: signs workload certificates for node agents. It
//! depends on `nodemesh-core` only, never on the data plane.
//!
//! `POST /v1/certify` over HTTPS, with the agent's service-account token as
//! a bearer token and `{"namespace", "serviceAccount", "csr"}` as the body.
//! The service signs only when:
//! 1. the API server accepts the token (TokenReview, audience
//!    [`TOKEN_AUDIENCE`](nodemesh_core::identity::TOKEN_AUDIENCE));
//! 2. it belongs to one of the agents' service accounts;
//! 3. it is bound to a pod (a projected token), and that pod exists: its
//!    node is the agent's node;
//! 4. a pod with the requested service account runs on that node (node
//!    authorization: an agent gets only the identities of its own pods).
//!
//! It also keeps the `Accepted` condition of every `AuthorizationPolicy`
//! (the cluster's one writer of it), and serves the aggregated API
//! `tap.nodemesh.io` ([`api`]): stat and tap from every agent, to the users
//! RBAC allows.
//!
//! Any other request gets a clear JSON error and is counted by reason; no
//! certificate ever leaves with an error. The service's own serving
//! certificate is signed by the same issuer, so agents trust it through the
//! trust anchors they already hold.
mod agents;
mod api;
mod bootstrap;
mod certify;
mod config;
mod policies;
mod reviews;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nodemesh_core::{
    admin::{AdminError, AdminServer, AdminState, Ready},
    kube::{self as kube_client, KubeError},
    labels::PREFIX,
    listen::{CapsConfig, Guard, ListenerMetrics},
    pki::{self, PkiError, Signer},
};
use prometheus_client::registry::Registry;
use rcgen::KeyPair;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::config::{IdentityArgs, IdentityConfig, IssuerSource};
use crate::{agents::Agents, api::AggregatedApi, certify::Service};

/// The aggregated API's caps: its one real client, the API server's
/// front proxy, is one address holding a connection per tap reader; a
/// handshake not done is evicted by newer ones (8 per address), so
/// connections that never finish one keep nobody out.
const API_CAPS: CapsConfig = CapsConfig {
    connections: 1024,
    per_source: 512,
    handshakes: 64,
    handshakes_per_source: 8,
};
/// A connection (handshake, request, answer) must be done within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IdentityServiceError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Admin(#[from] AdminError),
    #[error("{0}")]
    Kube(#[from] KubeError),
    #[error("cannot make the serving certificate: {0}")]
    Pki(#[from] PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {addr} for the aggregated API: {source}")]
    ApiBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Issuer(#[from] bootstrap::BootstrapError),
    #[error("internal: the issuer was taken already")]
    NoIssuer,
}

/// Runs the service on its own runtime until SIGTERM or SIGINT: the whole
/// of `nodemesh identity` once its flags are checked.
pub fn main(cfg: IdentityConfig) -> Result<(), IdentityServiceError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("nodemesh-identity")
        .build()
        .map_err(IdentityServiceError::Runtime)?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                info!("shutting down");
                signals.cancel();
            }
        });
        run(cfg, shutdown).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// A certificate renewed in the background, presented as it is now: the
/// serving one (as a server) and the service's own identity's (as the
/// agents' tap ports' client).
#[derive(Debug)]
pub(crate) struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn now(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.now())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.now())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn serving_cert(
    cfg: &IdentityConfig,
    signer: &Signer,
) -> Result<(Arc<CertifiedKey>, Duration), PkiError> {
    let key = KeyPair::generate()?;
    // At least an hour, however short workload certificates are: renewed
    // at half-life, never left to lapse between renewals.
    let lifetime = cfg.cert_lifetime.max(Duration::from_secs(3600));
    let issued = signer.sign_server(&key, &cfg.server_names, lifetime)?;
    let left = issued
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Ok((pki::certified_key(&issued, &key)?, left))
}

/// The tap client's certificate (what agents' tap ports check): an
/// identity outside the workload space, which the certify endpoint never
/// signs, so no node can present it.
fn own_cert(cfg: &IdentityConfig, signer: &Signer) -> Result<Arc<CertifiedKey>, PkiError> {
    let key = KeyPair::generate()?;
    let lifetime = cfg.cert_lifetime.max(Duration::from_secs(3600));
    let id = nodemesh_core::identity::tap_client_id(signer.trust_domain());
    let issued = signer.sign_client(&key, &id, lifetime)?;
    pki::certified_key(&issued, &key)
}

/// The issuer, from its files or from the cluster (made there on a fresh
/// install), and the trust anchors the aggregated API is to be checked
/// against.
async fn issuer(
    cfg: &mut IdentityConfig,
    client: &kube::Client,
) -> Result<(Signer, Option<String>), IdentityServiceError> {
    match cfg.issuer.take() {
        Some(IssuerSource::Files(signer)) => Ok((*signer, None)),
        Some(IssuerSource::Cluster {
            secret,
            configmap,
            lifetime,
        }) => {
            let (signer, anchors) = bootstrap::ClusterIssuer {
                client,
                namespace: &cfg.identity.namespace,
                secret: &secret,
                configmap: &configmap,
                trust_domain: &cfg.trust_domain,
                lifetime,
            }
            .load()
            .await?;
            Ok((signer, Some(anchors)))
        }
        None => Err(IdentityServiceError::NoIssuer),
    }
}

/// Runs the service until `shutdown`.
pub async fn run(
    mut cfg: IdentityConfig,
    shutdown: CancellationToken,
) -> Result<(), IdentityServiceError> {
    let client = kube_client::client(cfg.kubeconfig.as_deref()).await?;
    let (signer, anchors) = issuer(&mut cfg, &client).await?;
    let anchors = anchors.unwrap_or_else(|| signer.anchors_pem().to_owned());
    if let Some(name) = &cfg.api_service {
        // Not fatal: the aggregated API is unavailable until it is set,
        // the signing is not.
        if let Err(e) = bootstrap::api_service_ca(&client, name, &anchors).await {
            warn!(error = %e, "cannot set the aggregated API's caBundle; nodemesh stat and tap through the API server fail until it is");
        }
    }
    let signer = Arc::new(signer);
    let mut registry = Registry::with_prefix(PREFIX);
    let (cert, left) = serving_cert(&cfg, &signer)?;
    let addr = cfg.addr;
    tokio::spawn(policies::keep_status(client.clone(), shutdown.clone()));
    let service = Arc::new(Service::new(cfg, signer, client, &mut registry));
    let listener_metrics = ListenerMetrics::new(&mut registry);
    let ready = Ready::default();
    let admin = AdminServer::start(
        service.cfg.admin_addr,
        AdminState {
            registry: Arc::new(registry),
            ready: ready.clone(),
            not_ready: "not ready: starting\n",
            routes: None,
            guard: Guard::new("admin", CapsConfig::SMALL, listener_metrics.clone()),
        },
    )?;

    let resolver = Arc::new(CurrentCert(RwLock::new(cert)));
    let own = Arc::new(CurrentCert(RwLock::new(own_cert(
        &service.cfg,
        &service.signer,
    )?)));
    let roots = Arc::new(service.signer.roots()?);
    let agents = Arc::new(Agents::new(
        &service.cfg,
        service.client().clone(),
        roots,
        own.clone(),
    )?);
    let api = Arc::new(AggregatedApi {
        client: service.client().clone(),
        agents,
        front: RwLock::new(None),
    });
    let api_addr = service.cfg.api_addr;
    let api_listener =
        TcpListener::bind(api_addr)
            .await
            .map_err(|source| IdentityServiceError::ApiBind {
                addr: api_addr,
                source,
            })?;
    let api_acceptor = Arc::new(RwLock::new(None));
    tokio::spawn(api::follow_front_proxy(
        api.clone(),
        api_acceptor.clone(),
        resolver.clone(),
        shutdown.clone(),
    ));
    let api_guard = Guard::new("api", API_CAPS, listener_metrics.clone());
    tokio::spawn(serve_api(
        api,
        api_listener,
        api_acceptor,
        api_guard,
        shutdown.clone(),
    ));
    let guard = Guard::new("certify", CapsConfig::CLUSTER, listener_metrics);
    let mut tls = ServerConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| IdentityServiceError::Bind { addr, source })?;
    tokio::spawn(renew_serving_cert(
        service.clone(),
        resolver,
        own,
        left,
        shutdown.clone(),
    ));
    ready.set();
    info!(%addr, trust_domain = %service.signer.trust_domain(), lifetime = ?service.cfg.cert_lifetime, "identity service ready");
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(slot) = guard.connection(peer.ip()) else {
            debug!(%peer, "over the identity service's connection caps; closed");
            continue;
        };
        let handshake = guard.handshake(peer.ip());
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let accepted = tokio::select! {
                t = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)) => t,
                () = handshake.evicted() => {
                    debug!(%peer, "handshake evicted by a newer one");
                    return;
                }
            };
            drop(handshake);
            let tls = match accepted {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, "TLS handshake with a client failed");
                    return;
                }
                Err(_) => {
                    warn!(%peer, "TLS handshake with a client timed out");
                    return;
                }
            };
            let svc = service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(service.handle(req, peer).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = http.serve_connection(TokioIo::new(tls), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Err(_) => debug!(%peer, "connection closed: open too long"),
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "connection ended with an error"),
            }
        });
    }
    admin.stop();
    Ok(())
}

async fn renew_serving_cert(
    service: Arc<Service>,
    resolver: Arc<CurrentCert>,
    own: Arc<CurrentCert>,
    mut left: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep((left / 2).max(Duration::from_secs(10))) => {}
            _ = shutdown.cancelled() => return,
        }
        match serving_cert(&service.cfg, &service.signer)
            .and_then(|c| Ok((c, own_cert(&service.cfg, &service.signer)?)))
        {
            Ok(((cert, l), mine)) => {
                resolver.set(cert);
                own.set(mine);
                left = l;
            }
            Err(e) => {
                warn!(error = %e, "cannot renew the serving certificate; retrying in 10s");
                left = Duration::ZERO;
            }
        }
    }
}

/// Serves the aggregated API: the front proxy's connections only (see
/// [`api`]); a tap stream lives as long as its reader.
async fn serve_api(
    api: Arc<AggregatedApi>,
    listener: TcpListener,
    acceptor: Arc<RwLock<Option<TlsAcceptor>>>,
    guard: Guard,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "aggregated API tap.nodemesh.io listening");
    }
    let taps = Arc::new(tokio::sync::Semaphore::new(api::MAX_TAPS));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "aggregated API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(tls) = acceptor.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            debug!(%peer, "aggregated API: front proxy settings not read yet; closing");
            continue;
        };
        let Some(slot) = guard.connection(peer.ip()) else {
            debug!(%peer, "aggregated API: over its connection caps; closed");
            continue;
        };
        let handshake = guard.handshake(peer.ip());
        let (api, taps, shutdown) = (api.clone(), taps.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let accepted = tokio::select! {
                t = tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)) => t,
                () = handshake.evicted() => {
                    debug!(%peer, "aggregated API: handshake evicted by a newer one");
                    return;
                }
            };
            drop(handshake);
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "aggregated API: handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let front = api.front.read().unwrap_or_else(|p| p.into_inner()).clone();
            let refused = match front {
                Some(f) => f.allows(stream.get_ref().1.peer_certificates()).err(),
                None => Some("front proxy settings not read yet".to_owned()),
            };
            if let Some(why) = &refused {
                debug!(%peer, why, "aggregated API: not the front proxy");
            }
            let keep_alive = refused.is_none();
            let svc = service_fn(move |req| {
                let (api, taps, refused) = (api.clone(), taps.clone(), refused.clone());
                async move {
                    Ok::<_, Infallible>(match refused {
                        Some(why) => {
                            api::status(hyper::StatusCode::UNAUTHORIZED, "Unauthorized", &why)
                        }
                        None => api.handle(req, &taps).await,
                    })
                }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            // Anyone else gets one 401 and the connection closed.
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(if keep_alive { 30 } else { 5 }))
                .keep_alive(keep_alive);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    debug!(%peer, error = %e, "aggregated API connection ended with an error");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}
