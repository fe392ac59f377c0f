//! The agent's client of the identity service: one certificate per
//! request, for a fresh key made here (private keys never leave the
//! agent), checked before it is used.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use nodemesh_core::{
    identity::{CERTIFY_PATH, Identity},
    pki::{self, PkiError},
    wire::{CertifyError, CertifyRequest, CertifyResponse},
};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{IssueError, Issued, Issuer};

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

/// Finds a Service's cluster IP without DNS (the Kubernetes API): the
/// agent runs on the host network, where cluster DNS may be absent, slow or
/// not yet up.
pub trait ServiceAddrs: Send + Sync + 'static {
    fn cluster_ip<'a>(&'a self, namespace: &'a str, name: &'a str)
    -> BoxFuture<'a, Option<IpAddr>>;
}

/// Talks to the identity service.
pub struct IdentityClient {
    cfg: IdentityClientConfig,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    services: Option<Arc<dyn ServiceAddrs>>,
    tls_metrics: Option<crate::telemetry::TlsMetrics>,
}

/// `<name>.<namespace>.svc[.<cluster domain>]`: a Service's DNS name.
fn service_name(host: &str) -> Option<(&str, &str)> {
    let mut labels = host.split('.');
    let (name, namespace, svc) = (labels.next()?, labels.next()?, labels.next()?);
    (svc == "svc" && !name.is_empty() && !namespace.is_empty()).then_some((name, namespace))
}

impl std::fmt::Debug for IdentityClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityClient")
            .field("addr", &self.cfg.addr)
            .finish_non_exhaustive()
    }
}

impl IdentityClient {
    pub fn new(cfg: IdentityClientConfig) -> Result<Self, IdentityClientError> {
        let roots = roots(&cfg.trust_anchors_pem)?;
        let mut tls = ClientConfig::builder_with_provider(pki::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| IdentityClientError::Tls(format!("{:?}: {e}", cfg.server_name)))?;
        Ok(Self {
            cfg,
            tls: TlsConnector::from(Arc::new(tls)),
            server_name,
            services: None,
            tls_metrics: None,
        })
    }

    /// Counts its handshakes (by key exchange) in `metrics`.
    pub fn with_tls_metrics(mut self, metrics: crate::telemetry::TlsMetrics) -> Self {
        self.tls_metrics = Some(metrics);
        self
    }

    /// Resolves a Service name (`name.namespace.svc…`) through `services`
    /// first, DNS only if that finds nothing.
    pub fn with_services(mut self, services: Arc<dyn ServiceAddrs>) -> Self {
        self.services = Some(services);
        self
    }

    /// Where the identity service is now.
    async fn resolve(&self) -> Result<SocketAddr, IdentityClientError> {
        let resolve_err = |why: String| IdentityClientError::Resolve {
            addr: self.cfg.addr.clone(),
            why,
        };
        if let Ok(addr) = self.cfg.addr.parse::<SocketAddr>() {
            return Ok(addr);
        }
        let (host, port) = self
            .cfg
            .addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| resolve_err("expected host:port".into()))?;
        if let (Some(services), Some((name, namespace))) = (&self.services, service_name(host))
            && let Some(ip) = services.cluster_ip(namespace, name).await
        {
            return Ok(SocketAddr::new(ip, port));
        }
        tokio::net::lookup_host(&self.cfg.addr)
            .await
            .map_err(|e| resolve_err(e.to_string()))?
            .next()
            .ok_or_else(|| resolve_err("no address".into()))
    }

    /// One request: a fresh key and CSR, signed by the identity service.
    pub async fn fetch(&self, id: &Identity) -> Result<Issued, IdentityClientError> {
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
        Ok(Issued {
            key: certified,
            info,
        })
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
        let addr = self.resolve().await?;
        let connect_err = |source| IdentityClientError::Connect {
            addr: self.cfg.addr.clone(),
            source,
        };
        let tcp = TcpStream::connect(addr).await.map_err(connect_err)?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(connect_err)?;
        if let Some(m) = &self.tls_metrics {
            m.handshake(
                crate::telemetry::TlsEndpoint::IdentityService,
                tls.get_ref().1,
            );
        }
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

impl Issuer for IdentityClient {
    fn issue<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<Issued, IssueError>> {
        Box::pin(async move { self.fetch(id).await.map_err(|e| IssueError(e.to_string())) })
    }
}

/// The trust anchors of a PEM bundle, as rustls verifies against them.
pub fn roots(trust_anchors_pem: &str) -> Result<Arc<RootCertStore>, IdentityClientError> {
    let mut roots = RootCertStore::empty();
    for cert in pki::certs_from_pem(trust_anchors_pem, "trust anchors")? {
        roots
            .add(cert)
            .map_err(|e| IdentityClientError::Tls(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_recognised() {
        assert_eq!(
            service_name("nodemesh-identity.nodemesh.svc"),
            Some(("nodemesh-identity", "nodemesh"))
        );
        assert_eq!(service_name("id.ns.svc.cluster.local"), Some(("id", "ns")));
        assert_eq!(service_name("example.com"), None);
        assert_eq!(service_name("a.b.c"), None);
        assert_eq!(service_name(".ns.svc"), None);
    }
}
