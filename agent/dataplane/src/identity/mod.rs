//! The agent's side of workload identity: one certificate per service
//! account that has a meshed pod on the node. Requested from an [`Issuer`]
//! (the identity service, [`client`]) when the first such pod appears,
//! renewed at half of its remaining life (so an identity-service outage of
//! up to half a lifetime goes unnoticed), forgotten when the last such pod
//! leaves. Private keys are made here and never leave the agent.
//!
//! Renewal swaps the certificate used for new TLS handshakes; connections
//! already established keep theirs, so nothing is dropped.
pub mod client;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use futures_util::future::BoxFuture;
use nodemesh_core::{
    identity::Identity,
    pki::{self, CertInfo, PkiError, Signer},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rustls::{RootCertStore, sign::CertifiedKey};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::StateStore;

/// A certificate for one identity, with its key.
#[derive(Clone, Debug)]
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// Why a certificate could not be had (the issuer's own words).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct IssueError(pub String);

/// Where certificates come from: the identity service, or in tests a CA
/// held in the process.
pub trait Issuer: Send + Sync + 'static {
    /// A new certificate (and key) for `id`.
    fn issue<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<Issued, IssueError>>;
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

/// Signs with an issuer held in this process (tests, and trying the mesh
/// on one machine without an identity service).
#[derive(Debug)]
pub struct LocalIssuer {
    pub signer: Signer,
    /// Validity of each certificate.
    pub lifetime: Duration,
}

impl Issuer for LocalIssuer {
    fn issue<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<Issued, IssueError>> {
        Box::pin(async move {
            let err = |e: PkiError| IssueError(e.to_string());
            let (key, csr) = pki::new_csr(id, self.signer.trust_domain()).map_err(err)?;
            let issued = self.signer.sign_csr(&csr, id, self.lifetime).map_err(err)?;
            let leaf = pki::certs_from_pem(&issued.cert_pem, "certificate").map_err(err)?;
            let info = pki::cert_info(&leaf[0]).map_err(err)?;
            let key = pki::certified_key(&issued, &key).map_err(err)?;
            Ok(Issued { key, info })
        })
    }
}

/// Certificates by identity.
pub struct CertStore {
    issuer: Arc<dyn Issuer>,
    trust_domain: String,
    roots: Arc<RootCertStore>,
    slots: RwLock<HashMap<Identity, Arc<Slot>>>,
    /// Held whatever the pods: the agent's own (its tap port's).
    pinned: RwLock<HashSet<Identity>>,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// First and longest wait between failed requests for one identity.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl CertStore {
    /// A store that gets certificates from `issuer` and checks peers
    /// against `roots` (the trust anchors).
    pub fn new(
        issuer: Arc<dyn Issuer>,
        roots: Arc<RootCertStore>,
        trust_domain: &str,
        registry: &mut Registry,
    ) -> Self {
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
        Self {
            issuer,
            trust_domain: trust_domain.to_owned(),
            roots,
            slots: RwLock::default(),
            pinned: RwLock::default(),
            metrics,
        }
    }

    /// The workload certificates it keeps (the agent's own aside), each
    /// with when the one held expires (`None`: none held now).
    pub fn report(&self) -> Vec<(Identity, Option<SystemTime>)> {
        let pinned = self.pinned.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(Identity, Option<SystemTime>)> = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(id, _)| !pinned.contains(*id))
            .map(|(id, slot)| {
                let held = slot
                    .current
                    .borrow()
                    .as_ref()
                    .map(|c| c.not_after)
                    .filter(|t| *t > SystemTime::now());
                (id.clone(), held)
            })
            .collect();
        out.sort_by_key(|(id, _)| id.to_string());
        out
    }

    /// Keeps `id`'s certificate too, whether or not a meshed pod has it
    /// (the agent's own identity).
    pub fn pin(&self, id: Identity) {
        self.pinned
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
    }

    /// A certificate of a pinned identity (the agent's own), if held: what
    /// the tunnel presents for a name it holds no certificate for, so an
    /// unknown name gets the same handshake as a known one.
    pub fn pinned_current(&self) -> Option<Current> {
        let pinned: Vec<Identity> = self
            .pinned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        pinned.iter().find_map(|id| self.current(id))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
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
    /// node, following the state's pods until `shutdown`.
    pub async fn run(self: Arc<Self>, state: StateStore, shutdown: CancellationToken) {
        let mut changes = state.local_changes();
        loop {
            changes.mark_unchanged();
            if let Some(pods) = state.local_pods() {
                let mut wanted: HashSet<Identity> = pods
                    .iter()
                    .filter(|p| p.meshed())
                    .filter_map(|p| p.identity())
                    .map(|id| id.identity().clone())
                    .collect();
                wanted.extend(
                    self.pinned
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .cloned(),
                );
                self.reconcile(&wanted);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
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
                    identity: id.spiffe_id(&self.trust_domain),
                });
                info!(identity = %id.spiffe_id(&self.trust_domain), "no meshed pod with this service account left; certificate forgotten");
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

    /// The gauge counts workload certificates actually held, not merely
    /// wanted (the agent's own is not a workload's).
    fn update_held(&self) {
        let pinned = self.pinned.read().unwrap_or_else(|p| p.into_inner());
        let held = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(id, slot)| !pinned.contains(*id) && slot.current.borrow().is_some())
            .count();
        self.metrics.held.set(held as i64);
    }

    /// Fetches, then renews, one identity's certificate until stopped.
    async fn maintain(self: Arc<Self>, id: Identity, slot: Arc<Slot>) {
        let spiffe = id.spiffe_id(&self.trust_domain);
        let mut generation = 0u64;
        let mut backoff = RETRY_MIN;
        let mut last_error = String::new();
        loop {
            let wait = match self.issuer.issue(&id).await {
                Ok(Issued { key, info }) => {
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
}
