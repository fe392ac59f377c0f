//! `nodemesh identity`: signs workload certificates for node agents.
//!
//! `POST /v1/certify` over HTTPS, with the agent's service-account token as
//! a bearer token and `{"namespace", "serviceAccount", "csr"}` as the body.
//! The service signs only when:
//! 1. the API server accepts the token (TokenReview, audience
//!    [`TOKEN_AUDIENCE`](super::TOKEN_AUDIENCE));
//! 2. it belongs to one of the agents' service accounts;
//! 3. it is bound to a pod (a projected token), and that pod exists: its
//!    node is the agent's node;
//! 4. a pod with the requested service account runs on that node (node
//!    authorization: an agent gets only the identities of its own pods).
//!
//! Any other request gets a clear JSON error and is counted by reason; no
//! certificate ever leaves with an error. The service's own serving
//! certificate is signed by the same issuer, so agents trust it through the
//! trust anchors they already hold.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use prometheus_client::{
    encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family,
    registry::Registry,
};
use rcgen::KeyPair;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Identity,
    pki::{self, PkiError, Signer},
};
use crate::{
    admin::{AdminError, AdminServer, AdminState},
    config::{ConfigErrors, parse_duration},
    discovery::kube::{self as kube_source, KubeError},
    metrics::{PREFIX, label_values},
};

/// Flags of `nodemesh identity`.
#[derive(Args, Clone, Debug)]
pub struct IdentityArgs {
    /// Where to serve HTTPS.
    #[arg(
        long,
        env = "NODEMESH_IDENTITY_ADDR",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    pub addr: String,

    /// Where to serve /metrics, /live and /ready.
    #[arg(
        long,
        env = "NODEMESH_ADMIN_ADDR",
        default_value = "0.0.0.0:9990",
        value_name = "ADDR"
    )]
    pub admin_addr: String,

    /// The issuer certificate (PEM; intermediates may follow it).
    #[arg(long, env = "NODEMESH_ISSUER_CERT", value_name = "PATH")]
    pub issuer_certificate_file: PathBuf,

    /// The issuer's private key (PEM).
    #[arg(long, env = "NODEMESH_ISSUER_KEY", value_name = "PATH")]
    pub issuer_key_file: PathBuf,

    /// The trust anchors (PEM bundle) the issuer must chain to.
    #[arg(long, env = "NODEMESH_TRUST_ANCHORS", value_name = "PATH")]
    pub trust_anchors_file: PathBuf,

    /// The SPIFFE trust domain.
    #[arg(
        long,
        env = "NODEMESH_TRUST_DOMAIN",
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    pub trust_domain: String,

    /// How long the workload certificates it signs are valid.
    #[arg(
        long,
        env = "NODEMESH_CERT_LIFETIME",
        default_value = "24h",
        value_name = "DURATION"
    )]
    pub cert_lifetime: String,

    /// Service accounts (`namespace/name`) whose tokens may ask for
    /// certificates: the agents'. Repeat or separate with commas.
    #[arg(
        long = "agent-service-account",
        env = "NODEMESH_AGENT_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "nodemesh/nodemesh-agent",
        value_name = "NS/NAME"
    )]
    pub agent_service_accounts: Vec<String>,

    /// DNS names of the service's own certificate (what agents dial).
    /// Repeat or separate with commas.
    #[arg(
        long = "server-name",
        env = "NODEMESH_IDENTITY_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "nodemesh-identity.nodemesh.svc",
        value_name = "DNS"
    )]
    pub server_names: Vec<String>,

    /// kubeconfig to reach the API server (default: in-cluster).
    #[arg(long, env = "NODEMESH_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

/// A validated configuration.
#[derive(Debug)]
pub struct IdentityConfig {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub signer: Signer,
    pub cert_lifetime: Duration,
    pub agent_service_accounts: Vec<String>,
    pub server_names: Vec<String>,
    pub kubeconfig: Option<PathBuf>,
}

/// Connections served at once (each request is a TokenReview and a pod
/// list; agents make one per identity per half-lifetime).
const MAX_CONNECTIONS: usize = 512;
/// A connection (handshake, request, answer) must be done within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Shortest workload certificate lifetime accepted (tests rotate fast).
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(10);
/// Longest: a week.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

impl TryFrom<&IdentityArgs> for IdentityConfig {
    type Error = ConfigErrors;

    fn try_from(a: &IdentityArgs) -> Result<Self, ConfigErrors> {
        let mut problems = Vec::new();
        let addr = a
            .addr
            .parse()
            .map_err(|e| problems.push(format!("--addr {:?}: {e}", a.addr)))
            .ok();
        let admin_addr = a
            .admin_addr
            .parse()
            .map_err(|e| problems.push(format!("--admin-addr {:?}: {e}", a.admin_addr)))
            .ok();
        let cert_lifetime = match parse_duration(&a.cert_lifetime) {
            Ok(d) if (MIN_CERT_LIFETIME..=MAX_CERT_LIFETIME).contains(&d) => Some(d),
            Ok(_) => {
                problems.push(format!(
                    "--cert-lifetime {:?}: must be between 10s and 7d",
                    a.cert_lifetime
                ));
                None
            }
            Err(why) => {
                problems.push(format!("--cert-lifetime {:?}: {why}", a.cert_lifetime));
                None
            }
        };
        for sa in &a.agent_service_accounts {
            match sa.split_once('/') {
                Some((ns, name)) if Identity::new(ns, name).is_ok() => {}
                _ => problems.push(format!(
                    "--agent-service-account {sa:?}: expected namespace/name"
                )),
            }
        }
        for name in &a.server_names {
            if !crate::config::is_dns_subdomain(name) {
                problems.push(format!("--server-name {name:?}: not a DNS name"));
            }
        }
        if !crate::config::is_dns_subdomain(&a.trust_domain) {
            problems.push(format!(
                "--trust-domain {:?}: not a DNS name",
                a.trust_domain
            ));
        }
        let read =
            |flag: &str, path: &PathBuf, problems: &mut Vec<String>| match std::fs::read_to_string(
                path,
            ) {
                Ok(text) => Some(text),
                Err(e) => {
                    problems.push(format!("--{flag} {}: {e}", path.display()));
                    None
                }
            };
        let cert = read(
            "issuer-certificate-file",
            &a.issuer_certificate_file,
            &mut problems,
        );
        let key = read("issuer-key-file", &a.issuer_key_file, &mut problems);
        let anchors = read("trust-anchors-file", &a.trust_anchors_file, &mut problems);
        let signer = match (cert, key, anchors) {
            (Some(cert), Some(key), Some(anchors)) => {
                match Signer::load(&cert, &key, &anchors, &a.trust_domain) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        problems.push(format!("issuer: {e}"));
                        None
                    }
                }
            }
            _ => None,
        };
        match (addr, admin_addr, cert_lifetime, signer) {
            (Some(addr), Some(admin_addr), Some(cert_lifetime), Some(signer))
                if problems.is_empty() =>
            {
                Ok(Self {
                    addr,
                    admin_addr,
                    signer,
                    cert_lifetime,
                    agent_service_accounts: a
                        .agent_service_accounts
                        .iter()
                        .map(|sa| {
                            let (ns, name) = sa.split_once('/').unwrap_or_default();
                            format!("system:serviceaccount:{ns}:{name}")
                        })
                        .collect(),
                    server_names: a.server_names.clone(),
                    kubeconfig: a.kubeconfig.clone(),
                })
            }
            _ => Err(ConfigErrors(problems)),
        }
    }
}

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
}

label_values! {
    /// How a certify request ended.
    pub enum CertifyResult {
        Ok => "ok",
        /// No token, or the API server does not accept it.
        Unauthenticated => "unauthenticated",
        /// The token is not an agent's.
        NotAnAgent => "not_an_agent",
        /// The token is not bound to a pod, or that pod is gone.
        UnboundToken => "unbound_token",
        /// No pod with that service account runs on the agent's node.
        NotOnNode => "not_on_node",
        /// Malformed request or CSR.
        BadRequest => "bad_request",
        /// The API server could not be asked.
        ApiError => "api_error",
        /// Signing failed.
        SigningError => "signing_error",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: CertifyResult,
}

/// The body of a certify request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyRequest {
    pub namespace: String,
    pub service_account: String,
    /// PEM.
    pub csr: String,
}

/// The body of a successful answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyResponse {
    /// PEM: the workload certificate.
    pub certificate: String,
    /// PEM: the issuer (and intermediates) to present after it.
    pub chain: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// The body of a refusal.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyError {
    /// A [`CertifyResult`] value.
    pub error: String,
    pub message: String,
}

struct Service {
    cfg: IdentityConfig,
    client: Client,
    results: Family<ResultLabels, Counter>,
}

/// Serves the current serving certificate, renewed in the background.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn serving_cert(cfg: &IdentityConfig) -> Result<(Arc<CertifiedKey>, Duration), PkiError> {
    let key = KeyPair::generate()?;
    // At least an hour, however short workload certificates are: renewed
    // at half-life, never left to lapse between renewals.
    let lifetime = cfg.cert_lifetime.max(Duration::from_secs(3600));
    let issued = cfg.signer.sign_server(&key, &cfg.server_names, lifetime)?;
    let left = issued
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Ok((pki::certified_key(&issued, &key)?, left))
}

/// Runs the service until `shutdown`.
pub async fn run(
    cfg: IdentityConfig,
    shutdown: CancellationToken,
) -> Result<(), IdentityServiceError> {
    let client = kube_source::client(cfg.kubeconfig.as_deref()).await?;
    let mut registry = Registry::with_prefix(PREFIX);
    let results = Family::<ResultLabels, Counter>::default();
    registry.register(
        "identity_certify",
        "Certificate requests the identity service answered, by result",
        results.clone(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let admin = AdminServer::start(
        cfg.admin_addr,
        AdminState {
            registry: Arc::new(registry),
            ready: ready.clone(),
            services: None,
        },
    )?;

    let (cert, left) = serving_cert(&cfg)?;
    let resolver = Arc::new(ServingCert(RwLock::new(cert)));
    let mut tls = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener =
        TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| IdentityServiceError::Bind {
                addr: cfg.addr,
                source,
            })?;
    let addr = cfg.addr;
    let service = Arc::new(Service {
        cfg,
        client,
        results,
    });
    tokio::spawn(renew_serving_cert(
        service.clone(),
        resolver,
        left,
        shutdown.clone(),
    ));
    ready.store(true, Ordering::Release);
    info!(%addr, trust_domain = %service.cfg.signer.trust_domain(), lifetime = ?service.cfg.cert_lifetime, "identity service ready");
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn!(%peer, limit = MAX_CONNECTIONS, "too many connections to the identity service; closing this one");
            continue;
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
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
    resolver: Arc<ServingCert>,
    mut left: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep((left / 2).max(Duration::from_secs(10))) => {}
            _ = shutdown.cancelled() => return,
        }
        match serving_cert(&service.cfg) {
            Ok((cert, l)) => {
                *resolver.0.write().unwrap_or_else(|p| p.into_inner()) = cert;
                left = l;
            }
            Err(e) => {
                warn!(error = %e, "cannot renew the serving certificate; retrying in 10s");
                left = Duration::ZERO;
            }
        }
    }
}

type Answer = Result<CertifyResponse, (CertifyResult, String)>;

impl Service {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if req.uri().path() != super::CERTIFY_PATH {
            return json(
                StatusCode::NOT_FOUND,
                &CertifyError {
                    error: "not_found".into(),
                    message: format!("only POST {} is served", super::CERTIFY_PATH),
                },
            );
        }
        if req.method() != Method::POST {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &CertifyError {
                    error: "method_not_allowed".into(),
                    message: "use POST".into(),
                },
            );
        }
        let answer = self.certify(req).await;
        let result = match &answer {
            Ok(_) => CertifyResult::Ok,
            Err((r, _)) => *r,
        };
        self.results.get_or_create(&ResultLabels { result }).inc();
        match answer {
            Ok(ok) => json(StatusCode::OK, &ok),
            Err((result, message)) => {
                warn!(%peer, %result, %message, "certificate request refused");
                let status = match result {
                    CertifyResult::Unauthenticated => StatusCode::UNAUTHORIZED,
                    CertifyResult::NotAnAgent
                    | CertifyResult::UnboundToken
                    | CertifyResult::NotOnNode => StatusCode::FORBIDDEN,
                    CertifyResult::BadRequest => StatusCode::BAD_REQUEST,
                    CertifyResult::ApiError => StatusCode::SERVICE_UNAVAILABLE,
                    CertifyResult::SigningError | CertifyResult::Ok => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                };
                json(
                    status,
                    &CertifyError {
                        error: result.as_str().into(),
                        message,
                    },
                )
            }
        }
    }

    async fn certify(&self, req: Request<Incoming>) -> Answer {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or((
                CertifyResult::Unauthenticated,
                "no bearer token: send the agent's service-account token".into(),
            ))?;
        let body = Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| {
                (
                    CertifyResult::BadRequest,
                    format!("cannot read the body: {e}"),
                )
            })?
            .to_bytes();
        let request: CertifyRequest = serde_json::from_slice(&body)
            .map_err(|e| (CertifyResult::BadRequest, format!("malformed request: {e}")))?;
        let identity = Identity::new(&request.namespace, &request.service_account)
            .map_err(|e| (CertifyResult::BadRequest, e.to_string()))?;

        // 1. Who is asking.
        let review = TokenReview {
            spec: TokenReviewSpec {
                token,
                audiences: Some(vec![super::TOKEN_AUDIENCE.into()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| (CertifyResult::ApiError, format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        let for_us = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == super::TOKEN_AUDIENCE));
        if status.authenticated != Some(true) || !for_us {
            return Err((
                CertifyResult::Unauthenticated,
                format!(
                    "the API server does not accept the token for audience {}{}",
                    super::TOKEN_AUDIENCE,
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                ),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if !self.cfg.agent_service_accounts.contains(&username) {
            return Err((
                CertifyResult::NotAnAgent,
                format!("{username:?} is not a nodemesh agent's service account"),
            ));
        }
        // 2. Where it runs: the pod its token is bound to.
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (
            first("authentication.kubernetes.io/pod-name"),
            first("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err((
                CertifyResult::UnboundToken,
                "the token is not bound to a pod: agents must use their projected service-account token".into(),
            ));
        };
        let agent_ns = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, _)| ns.to_owned())
            .unwrap_or_default();
        let agent_pod = Api::<Pod>::namespaced(self.client.clone(), &agent_ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| {
                (
                    CertifyResult::ApiError,
                    format!("cannot read the agent's pod: {e}"),
                )
            })?
            .filter(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str()))
            .ok_or_else(|| {
                (
                    CertifyResult::UnboundToken,
                    format!("the token's pod {agent_ns}/{pod_name} ({pod_uid}) no longer exists"),
                )
            })?;
        let node = agent_pod.spec.and_then(|s| s.node_name).ok_or_else(|| {
            (
                CertifyResult::UnboundToken,
                format!("the agent pod {agent_ns}/{pod_name} is not scheduled to a node"),
            )
        })?;
        // 3. Node authorization.
        let pods = Api::<Pod>::namespaced(self.client.clone(), &identity.namespace)
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| (CertifyResult::ApiError, format!("cannot list pods: {e}")))?;
        let runs_there = pods.items.iter().any(|p| {
            let sa = p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            sa == identity.service_account && !matches!(phase, Some("Succeeded" | "Failed"))
        });
        if !runs_there {
            return Err((
                CertifyResult::NotOnNode,
                format!(
                    "no pod with service account {} runs on node {node:?}, the agent's node",
                    identity
                ),
            ));
        }
        // 4. Sign, unless the issuer is about to expire (certificates are
        // capped at its expiry; ever shorter ones would only be asked again).
        let issuer_left = self
            .cfg
            .signer
            .issuer_not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if issuer_left < MIN_CERT_LIFETIME * 6 {
            return Err((
                CertifyResult::SigningError,
                format!("the issuer certificate expires in {issuer_left:?}: rotate the issuer"),
            ));
        }
        let issued = self
            .cfg
            .signer
            .sign_csr(&request.csr, &identity, self.cfg.cert_lifetime)
            .map_err(|e| match e {
                PkiError::BadCsr(_) => (CertifyResult::BadRequest, e.to_string()),
                e => (CertifyResult::SigningError, e.to_string()),
            })?;
        info!(identity = %identity.spiffe_id(self.cfg.signer.trust_domain()), %node, agent = %pod_name, "certificate signed");
        Ok(CertifyResponse {
            certificate: issued.cert_pem,
            chain: issued.chain_pem,
            not_after: issued
                .not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
