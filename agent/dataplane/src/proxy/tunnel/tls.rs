//! TLS for the tunnel: TLS 1.3 only, mutual, certificates from the
//! agent's store, no session resumption (a resumed session would skip
//! checking the peer's current certificate), and what a failed handshake
//! means as a metric label.
use std::sync::Arc;

use super::TunnelError;
use crate::identity::CertStore;
use nodemesh_core::{
    identity::Identity,
    pki::{self, provider},
};
use rustls::{
    ClientConfig, ServerConfig,
    client::ResolvesClientCert,
    pki_types::CertificateDer,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

/// ALPN: the tunnel speaks HTTP/2 only.
const ALPN: &[u8] = b"h2";

/// The SPIFFE ID in a peer's leaf certificate.
pub fn peer_spiffe(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    pki::cert_info(certs?.first()?).ok()?.spiffe_id
}

/// When a connection with a peer presenting `certs` stops taking new
/// streams: at `max_age` from now, or at the peer certificate's expiry if
/// that is sooner (an identity is never used past its certificate).
pub fn retire_at(
    certs: Option<&[CertificateDer<'_>]>,
    max_age: std::time::Duration,
) -> std::time::Instant {
    let now = std::time::Instant::now();
    let left = certs
        .and_then(|c| c.first())
        .and_then(|leaf| pki::cert_info(leaf).ok())
        .map(|info| {
            info.not_after
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    now + left.min(max_age)
}

/// Classifies a failed handshake.
pub fn classify(e: &std::io::Error) -> TunnelError {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => TunnelError::ExpiredCertificate,
        Some(Error::InvalidCertificate(_)) => TunnelError::UntrustedCertificate,
        Some(Error::NoCertificatesPresented) => TunnelError::NoClientCertificate,
        Some(Error::InvalidMessage(_)) => TunnelError::NotTls,
        Some(Error::AlertReceived(rustls::AlertDescription::BadCertificate))
        | Some(Error::AlertReceived(rustls::AlertDescription::UnknownCA)) => {
            TunnelError::UntrustedCertificate
        }
        Some(Error::AlertReceived(rustls::AlertDescription::CertificateExpired)) => {
            TunnelError::ExpiredCertificate
        }
        _ => TunnelError::Handshake,
    }
}

/// Whether this node holds a certificate for the identity named in SNI.
pub fn serves_name(store: &CertStore, name: Option<&str>) -> bool {
    name.and_then(|n| Identity::parse_dns_name(n, store.trust_domain()))
        .is_some_and(|id| store.current(&id).is_some())
}

/// The server's settings: client certificates required and checked
/// against the trust anchors; the server's own picked by SNI.
pub fn server_config(store: &Arc<CertStore>) -> Result<ServerConfig, rustls::Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(store.roots(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SniResolver {
            store: store.clone(),
        }));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Every connection is a full handshake: a resumed session would skip
    // checking the client's certificate (expiry, renewal).
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// A client's settings for presenting `src`'s current certificate.
pub fn client_config(
    store: &Arc<CertStore>,
    src: &Identity,
) -> Result<ClientConfig, rustls::Error> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store.roots())
        .with_client_cert_resolver(Arc::new(SourceCert {
            store: store.clone(),
            id: src.clone(),
        }));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Full handshakes only: a renewed certificate must really be used.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// Picks the certificate of the identity named in SNI. For a name this
/// node holds none for, the agent's own: the handshake goes on exactly as
/// for a known name and fails at the same step for a client without a
/// valid certificate (the server refuses the connection after it; see
/// `TunnelServer`), so a prober learns from the answer only what the
/// certificate it is shown says.
#[derive(Debug)]
struct SniResolver {
    store: Arc<CertStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .and_then(|n| Identity::parse_dns_name(n, self.store.trust_domain()))
            .and_then(|id| self.store.current(&id))
            .or_else(|| self.store.pinned_current())
            .map(|c| c.key)
    }
}

/// Presents one identity's current certificate.
#[derive(Debug)]
struct SourceCert {
    store: Arc<CertStore>,
    id: Identity,
}

impl ResolvesClientCert for SourceCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.current(&self.id).map(|c| c.key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A connection retires at the cap, or at its peer certificate's end
    /// when that comes first; with no certificate to go by, at once.
    #[test]
    fn a_connection_retires_at_the_cap_or_the_certificates_end() {
        let day = Duration::from_secs(86_400);
        let anchor = pki::generate_trust_anchor("cluster.local", day).unwrap();
        let issuer = pki::generate_issuer(&anchor, "cluster.local", day).unwrap();
        let signer = pki::Signer::load(
            &issuer.cert_pem,
            &issuer.key_pem,
            &anchor.cert_pem,
            "cluster.local",
        )
        .unwrap();
        let identity = nodemesh_core::identity::Identity::new("ns", "sa").unwrap();
        let (key, _) = pki::new_csr(&identity, "cluster.local").unwrap();
        let issued = signer
            .sign_server(&key, &["peer.example".into()], Duration::from_secs(600))
            .unwrap();
        let certs = pki::certs_from_pem(&issued.cert_pem, "peer").unwrap();
        let hour = Duration::from_secs(3600);
        // The certificate (10 min) ends before the cap (1 h).
        let at = retire_at(Some(&certs), hour);
        let left = at.saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_secs(600), "{left:?}");
        assert!(left > Duration::from_secs(500), "{left:?}");
        // The cap (1 min) comes before the certificate's end.
        let at = retire_at(Some(&certs), Duration::from_secs(60));
        assert!(at.saturating_duration_since(Instant::now()) <= Duration::from_secs(60));
        // Nothing to go by: no new stream.
        assert!(retire_at(None, hour) <= Instant::now());
    }
}
