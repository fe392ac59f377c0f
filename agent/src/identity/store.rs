//! The agent's certificates: one per service account that has a meshed pod
//! on the node. Fetched from the identity service when the first such pod
//! appears, renewed at half of its remaining life (so an identity-service
//! outage of up to half a lifetime goes unnoticed), forgotten when the last
//! such pod leaves. Private keys are made here and never leave the agent.
//!
//! Renewal swaps the certificate used for new TLS handshakes; connections
//! already established keep theirs, so nothing is dropped.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName, sign::CertifiedKey};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    CERTIFY_PATH, Identity,
    pki::{self, PkiError},
    service::{CertifyError, CertifyRequest, CertifyResponse},
};
use crate::discovery::NodePods;

/// How the agent reaches the identity service.
#[derive(Clone, Debug)]
pub struct IdentityClientConfig {
    /// `host:port` of the identity service.
    pub addr: String,
    /// The name its certificate must carry.
    pub server_name: String,
    /// PEM bundle of trust anchors.
    pub trust_anchors_pem: String,
    /// The agent's projected service-account token (re-read every time: the
    /// kubelet rotates it).
    pub token_file: PathBuf,
    pub trust_domain: String,
    /// Longest wait for one request.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityClientError {
    #[error("cannot read the service-account token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot resolve the identity service {addr}: {why}")]
    Resolve { addr: String, why: String },
    #[error("cannot connect to the identity service at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("the identity service did not answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP with the identity service failed: {0}")]
    Http(String),
    #[error("the identity service refused ({status}, {error}): {message}")]
    Refused {
        status: u16,
        error: String,
        message: String,
    },
    #[error("the identity service's answer is unusable: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("invalid trust anchors or TLS settings: {0}")]
    Tls(String),
}

/// The certificate in use for one identity.
#[derive(Clone, Debug)]
pub struct Current {
    pub key: Arc<CertifiedKey>,
    /// Counts up with every renewal.
    pub generation: u64,
    pub not_after: SystemTime,
    pub serial: String,
}

#[derive(Debug)]
struct Slot {
    current: watch::Sender<Option<Current>>,
    stop: CancellationToken,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    result: &'static str,
}

#[derive(Clone, Debug)]
struct StoreMetrics {
    held: Gauge,
    expiry: Family<IdentityLabels, Gauge>,
    requests: Family<RequestLabels, Counter>,
}

/// Certificates by identity.
pub struct CertStore {
    cfg: IdentityClientConfig,
    roots: Arc<RootCertStore>,
    client_tls: TlsConnector,
    server_name: ServerName<'static>,
    slots: RwLock<HashMap<Identity, Arc<Slot>>>,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("identity_service", &self.cfg.addr)
            .finish_non_exhaustive()
    }
}

/// First and longest wait between failed requests for one identity.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl CertStore {
    pub fn new(
        cfg: IdentityClientConfig,
        registry: &mut Registry,
    ) -> Result<Self, IdentityClientError> {
        let mut roots = RootCertStore::empty();
        for cert in pki::certs_from_pem(&cfg.trust_anchors_pem, "trust anchors")? {
            roots
                .add(cert)
                .map_err(|e| IdentityClientError::Tls(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let mut tls = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityClientError::Tls(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| IdentityClientError::Tls(format!("{:?}: {e}", cfg.server_name)))?;
        let metrics = StoreMetrics {
            held: Gauge::default(),
            expiry: Family::default(),
            requests: Family::default(),
        };
        registry.register(
            "identity_certificates",
            "Workload certificates the agent holds (one per service account with a meshed pod here)",
            metrics.held.clone(),
        );
        registry.register(
            "identity_certificate_expiry_timestamp_seconds",
            "When the certificate in use for an identity expires (Unix time)",
            metrics.expiry.clone(),
        );
        registry.register(
            "identity_requests",
            "Certificate requests to the identity service, by result",
            metrics.requests.clone(),
        );
        Ok(Self {
            cfg,
            roots,
            client_tls: TlsConnector::from(Arc::new(tls)),
            server_name,
            slots: RwLock::default(),
            metrics,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.cfg.trust_domain
    }

    /// The trust anchors, for verifying peers.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The identity's certificate, if the agent holds a valid one.
    pub fn current(&self, id: &Identity) -> Option<Current> {
        let slot = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)?
            .clone();
        let current = slot.current.borrow().clone()?;
        (current.not_after > SystemTime::now()).then_some(current)
    }

    /// Waits up to `timeout` for the identity's first certificate (a pod's
    /// first connection can race the first request).
    pub async fn wait(&self, id: &Identity, timeout: Duration) -> Option<Current> {
        if let Some(c) = self.current(id) {
            return Some(c);
        }
        let slot = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)?
            .clone();
        let mut rx = slot.current.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|c| c.is_some())).await;
        self.current(id)
    }

    /// Keeps one certificate per service account with a meshed pod on the
    /// node, following the pod snapshots until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        mut pods: watch::Receiver<Option<Arc<NodePods>>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let wanted: HashSet<Identity> = match &*pods.borrow_and_update() {
                Some(snapshot) => snapshot
                    .meshed()
                    .filter_map(|p| Identity::new(&p.namespace, &p.service_account).ok())
                    .collect(),
                None => HashSet::new(),
            };
            if pods.borrow().is_some() {
                self.reconcile(&wanted);
            }
            tokio::select! {
                changed = pods.changed() => if changed.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
        for (_, slot) in self
            .slots
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            slot.stop.cancel();
        }
    }

    fn reconcile(self: &Arc<Self>, wanted: &HashSet<Identity>) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.retain(|id, slot| {
            let keep = wanted.contains(id);
            if !keep {
                slot.stop.cancel();
                self.metrics.expiry.remove(&IdentityLabels {
                    identity: id.spiffe_id(&self.cfg.trust_domain),
                });
                info!(identity = %id.spiffe_id(&self.cfg.trust_domain), "no meshed pod with this service account left; certificate forgotten");
            }
            keep
        });
        for id in wanted {
            if slots.contains_key(id) {
                continue;
            }
            let slot = Arc::new(Slot {
                current: watch::Sender::new(None),
                stop: CancellationToken::new(),
            });
            slots.insert(id.clone(), slot.clone());
            tokio::spawn(self.clone().maintain(id.clone(), slot));
        }
        drop(slots);
        self.update_held();
    }

    /// The gauge counts certificates actually held, not merely wanted.
    fn update_held(&self) {
        let held = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|slot| slot.current.borrow().is_some())
            .count();
        self.metrics.held.set(held as i64);
    }

    /// Fetches, then renews, one identity's certificate until stopped.
    async fn maintain(self: Arc<Self>, id: Identity, slot: Arc<Slot>) {
        let spiffe = id.spiffe_id(&self.cfg.trust_domain);
        let mut generation = 0u64;
        let mut backoff = RETRY_MIN;
        let mut last_error = String::new();
        loop {
            let wait = match self.fetch(&id).await {
                Ok((key, info)) => {
                    generation += 1;
                    backoff = RETRY_MIN;
                    last_error.clear();
                    let now = SystemTime::now();
                    let left = info.not_after.duration_since(now).unwrap_or_default();
                    let expiry = info
                        .not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    info!(identity = %spiffe, serial = %info.serial, expires_in = ?left, generation, "certificate {}", if generation == 1 { "issued" } else { "renewed" });
                    slot.current.send_replace(Some(Current {
                        key,
                        generation,
                        not_after: info.not_after,
                        serial: info.serial,
                    }));
                    self.update_held();
                    if !slot.stop.is_cancelled() {
                        self.metrics
                            .expiry
                            .get_or_create(&IdentityLabels {
                                identity: spiffe.clone(),
                            })
                            .set(expiry);
                    }
                    self.metrics
                        .requests
                        .get_or_create(&RequestLabels { result: "ok" })
                        .inc();
                    (left / 2).max(RETRY_MIN)
                }
                Err(e) => {
                    self.metrics
                        .requests
                        .get_or_create(&RequestLabels { result: "error" })
                        .inc();
                    let text = e.to_string();
                    if text != last_error {
                        warn!(identity = %spiffe, error = %text, retry_in = ?backoff, "cannot get a certificate; will retry");
                        last_error = text;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    // Never sleep past the expiry of what is in use.
                    match slot.current.borrow().as_ref() {
                        Some(c) => wait.min(
                            c.not_after
                                .duration_since(SystemTime::now())
                                .unwrap_or(RETRY_MIN)
                                .max(RETRY_MIN),
                        ),
                        None => wait,
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = slot.stop.cancelled() => return,
            }
        }
    }

    /// One request: a fresh key and CSR, signed by the identity service.
    pub async fn fetch(
        &self,
        id: &Identity,
    ) -> Result<(Arc<CertifiedKey>, pki::CertInfo), IdentityClientError> {
        let (key, csr) = pki::new_csr(id, &self.cfg.trust_domain)?;
        let answer = tokio::time::timeout(self.cfg.timeout, self.request(id, csr))
            .await
            .map_err(|_| IdentityClientError::Timeout(self.cfg.timeout))??;
        let leaf = pki::certs_from_pem(&answer.certificate, "certificate")?;
        let info = pki::cert_info(&leaf[0])?;
        // The certificate's own validity counts, not what the answer says.
        let issued = pki::Issued {
            cert_pem: answer.certificate,
            chain_pem: answer.chain,
            not_after: info.not_after,
        };
        let expected = id.spiffe_id(&self.cfg.trust_domain);
        if info.spiffe_id.as_deref() != Some(expected.as_str()) {
            return Err(IdentityClientError::BadAnswer(format!(
                "asked for {expected}, got a certificate for {:?}",
                info.spiffe_id
            )));
        }
        let certified = pki::certified_key(&issued, &key)?;
        certified.keys_match().map_err(|e| {
            IdentityClientError::BadAnswer(format!("the certificate is not for our key: {e}"))
        })?;
        Ok((certified, info))
    }

    async fn request(
        &self,
        id: &Identity,
        csr: String,
    ) -> Result<CertifyResponse, IdentityClientError> {
        let token = std::fs::read_to_string(&self.cfg.token_file).map_err(|source| {
            IdentityClientError::Token {
                path: self.cfg.token_file.clone(),
                source,
            }
        })?;
        let addr = tokio::net::lookup_host(&self.cfg.addr)
            .await
            .map_err(|e| IdentityClientError::Resolve {
                addr: self.cfg.addr.clone(),
                why: e.to_string(),
            })?
            .next()
            .ok_or_else(|| IdentityClientError::Resolve {
                addr: self.cfg.addr.clone(),
                why: "no address".into(),
            })?;
        let tcp =
            TcpStream::connect(addr)
                .await
                .map_err(|source| IdentityClientError::Connect {
                    addr: self.cfg.addr.clone(),
                    source,
                })?;
        let tls = self
            .client_tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| IdentityClientError::Connect {
                addr: self.cfg.addr.clone(),
                source,
            })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| IdentityClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let body = serde_json::to_vec(&CertifyRequest {
            namespace: id.namespace.clone(),
            service_account: id.service_account.clone(),
            csr,
        })
        .map_err(|e| IdentityClientError::Http(e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(CERTIFY_PATH)
            .header(header::HOST, &self.cfg.server_name)
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| IdentityClientError::Http(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| IdentityClientError::Http(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 256 * 1024)
            .collect()
            .await
            .map_err(|e| IdentityClientError::Http(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            let refusal: CertifyError = serde_json::from_slice(&body).unwrap_or(CertifyError {
                error: "unknown".into(),
                message: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
            return Err(IdentityClientError::Refused {
                status: status.as_u16(),
                error: refusal.error,
                message: refusal.message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| IdentityClientError::BadAnswer(e.to_string()))
    }
}
