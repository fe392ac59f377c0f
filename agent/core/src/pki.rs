//! The mesh's PKI: a trust anchor (root), an issuer (intermediate) it
//! signs, and short-lived workload certificates the issuer signs from the
//! agents' CSRs. ECDSA P-256 keys throughout (rcgen); certificates parsed
//! with x509-parser.
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;

use crate::identity::{Identity, IdentityError};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: not a PEM certificate: {why}")]
    BadPem { what: String, why: String },
    #[error("{what}: cannot parse the certificate: {why}")]
    BadCertificate { what: String, why: String },
    #[error("the issuer certificate is not a CA certificate")]
    IssuerNotCa,
    #[error("the issuer certificate is not signed by any of the trust anchors")]
    IssuerNotTrusted,
    #[error("the issuer certificate expired at {0}")]
    IssuerExpired(humantime::Rfc3339Timestamp),
    #[error("the issuer key does not match the issuer certificate")]
    KeyMismatch,
    #[error("cannot read the certificate signing request: {0}")]
    BadCsr(rcgen::Error),
    #[error("{0}")]
    Identity(#[from] IdentityError),
}

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The one crypto provider of every nodemesh TLS endpoint: aws-lc-rs, with
/// the post-quantum hybrid X25519MLKEM768 first (as Linkerd 2.19 does),
/// then X25519 and P-256 for peers that lack it. Set here, not left to a
/// cargo feature: rustls without `prefer-post-quantum` lists the hybrid
/// last, so a client's key share — and the handshake — would be X25519.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let mut provider = default_provider();
    provider.kx_groups = vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
    ];
    std::sync::Arc::new(provider)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A failing system RNG leaves zeros; rcgen then still makes a valid
    // (if less unique) serial, and the signature stays sound.
    let _ = rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A new self-signed trust anchor for `trust_domain`.
pub fn generate_trust_anchor(
    trust_domain: &str,
    lifetime: Duration,
) -> Result<CertAndKey, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("root.identity.{trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = OffsetDateTime::from(now + lifetime);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new issuer signed by `anchor`.
pub fn generate_issuer(
    anchor: &CertAndKey,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<CertAndKey, PkiError> {
    let anchor_key = KeyPair::from_pem(&anchor.key_pem)?;
    let anchor_issuer = Issuer::from_ca_cert_pem(&anchor.cert_pem, anchor_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("issuer.identity.{trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = OffsetDateTime::from(now + lifetime);
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&key, &anchor_issuer)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadPem {
            what: what.into(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// What the mesh reads from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The URI SAN that is a SPIFFE ID, if any.
    pub spiffe_id: Option<String>,
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex, colon-separated.
    pub serial: String,
    pub is_ca: bool,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// Reads a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let bad = |why: String| PkiError::BadCertificate {
        what: "certificate".into(),
        why,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    let mut spiffe_id = None;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                    spiffe_id = Some((*uri).to_owned())
                }
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    dns_names.push((*dns).to_owned())
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        spiffe_id,
        dns_names,
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
        serial: cert.raw_serial_as_string(),
        is_ca: cert.is_ca(),
        common_name: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
    })
}

/// A freshly signed certificate and the chain to present with it.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    /// The issuer certificate (PEM), presented after the leaf.
    pub chain_pem: String,
    pub not_after: SystemTime,
}

/// Signs workload certificates with the issuer.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    issuer_pem: String,
    issuer_not_after: SystemTime,
    trust_domain: String,
    anchors: Vec<CertificateDer<'static>>,
    anchors_pem: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the issuer and checks it against the trust anchors: a CA, not
    /// expired, signed by one of them, its key matching.
    pub fn load(
        issuer_cert_pem: &str,
        issuer_key_pem: &str,
        anchors_pem: &str,
        trust_domain: &str,
    ) -> Result<Self, PkiError> {
        let issuer_der = certs_from_pem(issuer_cert_pem, "issuer certificate")?
            .into_iter()
            .next()
            .ok_or(PkiError::NoCertificate {
                what: "issuer certificate".into(),
            })?;
        let anchors = certs_from_pem(anchors_pem, "trust anchors")?;
        let (_, issuer_cert) = x509_parser::parse_x509_certificate(&issuer_der).map_err(|e| {
            PkiError::BadCertificate {
                what: "issuer certificate".into(),
                why: e.to_string(),
            }
        })?;
        if !issuer_cert.is_ca() {
            return Err(PkiError::IssuerNotCa);
        }
        let not_after = to_system_time(issuer_cert.validity().not_after);
        if not_after <= SystemTime::now() {
            return Err(PkiError::IssuerExpired(humantime::format_rfc3339_seconds(
                not_after,
            )));
        }
        let trusted = anchors.iter().any(|anchor| {
            x509_parser::parse_x509_certificate(anchor)
                .is_ok_and(|(_, a)| issuer_cert.verify_signature(Some(a.public_key())).is_ok())
        });
        if !trusted {
            return Err(PkiError::IssuerNotTrusted);
        }
        let key = KeyPair::from_pem(issuer_key_pem)?;
        if key.subject_public_key_info() != issuer_cert.public_key().raw {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key)?;
        Ok(Self {
            anchors,
            anchors_pem: anchors_pem.trim().to_owned() + "\n",
            issuer,
            // Presented as is after the leaf: the issuer and any intermediates.
            issuer_pem: issuer_cert_pem.trim().to_owned() + "\n",
            issuer_not_after: not_after,
            trust_domain: trust_domain.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors it was loaded with (PEM).
    pub fn anchors_pem(&self) -> &str {
        &self.anchors_pem
    }

    /// The trust anchors it was loaded with, as a root store.
    pub fn roots(&self) -> Result<rustls::RootCertStore, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        for anchor in &self.anchors {
            roots
                .add(anchor.clone())
                .map_err(|e| PkiError::BadCertificate {
                    what: "trust anchor".into(),
                    why: e.to_string(),
                })?;
        }
        Ok(roots)
    }

    /// When the issuer expires (no certificate it signs outlives it).
    pub fn issuer_not_after(&self) -> SystemTime {
        self.issuer_not_after
    }

    /// Signs the public key of a CSR for `identity`. Only the key is taken
    /// from the CSR (its signature checked); names and validity are the
    /// signer's.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let now = SystemTime::now();
        self.sign_identity(&csr.public_key, identity, now, now + lifetime)
    }

    /// Signs `public_key` for `identity` with an explicit validity (capped
    /// at the issuer's). Tests use this for expired certificates.
    pub fn sign_identity(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, PkiError> {
        let sans = vec![
            SanType::URI(identity.spiffe_id(&self.trust_domain).try_into()?),
            SanType::DnsName(identity.dns_name(&self.trust_domain)?.try_into()?),
        ];
        self.sign(
            public_key,
            &identity.spiffe_id(&self.trust_domain),
            sans,
            not_before,
            not_after,
        )
    }

    /// A client-only certificate for a SPIFFE ID outside the workload
    /// space (the identity service's tap client): its one name, client
    /// authentication only.
    pub fn sign_client(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &str,
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        let now = SystemTime::now();
        let sans = vec![SanType::URI(spiffe_id.to_owned().try_into()?)];
        self.sign_with(
            public_key,
            spiffe_id,
            sans,
            now,
            now + lifetime,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    /// A serving certificate for DNS names (the identity service's own).
    pub fn sign_server(
        &self,
        public_key: &impl PublicKeyData,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<Issued, PkiError> {
        let sans = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName(n.clone().try_into()?)))
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        let now = SystemTime::now();
        let cn = dns_names.first().map(String::as_str).unwrap_or("identity");
        self.sign(public_key, cn, sans, now, now + lifetime)
    }

    fn sign(
        &self,
        public_key: &impl PublicKeyData,
        cn: &str,
        sans: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, PkiError> {
        self.sign_with(
            public_key,
            cn,
            sans,
            not_before,
            not_after,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn sign_with(
        &self,
        public_key: &impl PublicKeyData,
        cn: &str,
        sans: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Issued, PkiError> {
        let not_after = not_after.min(self.issuer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        // A minute of slack for clocks that are a little behind.
        params.not_before = OffsetDateTime::from(not_before - Duration::from_secs(60));
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            chain_pem: self.issuer_pem.clone(),
            not_after,
        })
    }
}

/// A signed certificate with its key, as rustls presents it.
pub fn certified_key(
    issued: &Issued,
    key: &KeyPair,
) -> Result<std::sync::Arc<rustls::sign::CertifiedKey>, PkiError> {
    let mut chain = certs_from_pem(&issued.cert_pem, "certificate")?;
    chain.extend(certs_from_pem(&issued.chain_pem, "certificate chain")?);
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).map_err(|e| {
        PkiError::BadCertificate {
            what: "private key".into(),
            why: e.to_string(),
        }
    })?;
    Ok(std::sync::Arc::new(rustls::sign::CertifiedKey::new(
        chain, signing,
    )))
}

/// A new key pair and a CSR for it (PEM). The identity service ignores the
/// CSR's names; they are there for humans reading it.
pub fn new_csr(identity: &Identity, trust_domain: &str) -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&identity.spiffe_id(trust_domain));
    params.subject_alt_names = vec![SanType::URI(identity.spiffe_id(trust_domain).try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group two providers settle on, over an in-memory handshake.
    fn negotiated(
        client: std::sync::Arc<rustls::crypto::CryptoProvider>,
        server: std::sync::Arc<rustls::crypto::CryptoProvider>,
    ) -> [Option<rustls::NamedGroup>; 2] {
        use std::sync::Arc;
        let (_, signer) = pki();
        let key = KeyPair::generate().unwrap();
        let issued = signer
            .sign_server(&key, &["server.example".into()], Duration::from_secs(600))
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(server)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                certs_from_pem(&format!("{}{}", issued.cert_pem, issued.chain_pem), "chain")
                    .unwrap(),
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(client)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(signer.roots().unwrap())
            .with_no_client_auth();
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), "server.example".try_into().unwrap())
                .unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut wire = Vec::new();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        [
            c.negotiated_key_exchange_group().map(|g| g.name()),
            s.negotiated_key_exchange_group().map(|g| g.name()),
        ]
    }

    /// Both ends of every nodemesh endpoint settle on the post-quantum
    /// hybrid, not just offer it; rustls' own default (this workspace has
    /// no `prefer-post-quantum`) would not, which is why `provider` orders
    /// the groups itself.
    #[test]
    fn the_key_exchange_is_the_post_quantum_hybrid() {
        let hybrid = Some(rustls::NamedGroup::X25519MLKEM768);
        assert_eq!(negotiated(provider(), provider()), [hybrid; 2]);
        let stock = || std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        assert_ne!(negotiated(stock(), stock()), [hybrid; 2]);
    }

    fn pki() -> (CertAndKey, Signer) {
        let anchor = generate_trust_anchor("cluster.local", Duration::from_secs(3600)).unwrap();
        let issuer = generate_issuer(&anchor, "cluster.local", Duration::from_secs(1800)).unwrap();
        let signer = Signer::load(
            &issuer.cert_pem,
            &issuer.key_pem,
            &anchor.cert_pem,
            "cluster.local",
        )
        .unwrap();
        (anchor, signer)
    }

    #[test]
    fn signs_a_csr_for_an_identity_only() {
        let (_, signer) = pki();
        let id = Identity::new("shop", "web").unwrap();
        // The CSR asks for another name: the signer ignores it.
        let other = Identity::new("kube-system", "admin").unwrap();
        let (_, csr) = new_csr(&other, "cluster.local").unwrap();
        let issued = signer
            .sign_csr(&csr, &id, Duration::from_secs(600))
            .unwrap();
        let der = certs_from_pem(&issued.cert_pem, "leaf").unwrap();
        let info = cert_info(&der[0]).unwrap();
        assert_eq!(
            info.spiffe_id.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(
            info.dns_names,
            vec!["web.shop.serviceaccount.identity.cluster.local".to_owned()]
        );
        assert!(!info.is_ca);
        let left = info
            .not_after
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((590..=600).contains(&left), "{left}");
        // Capped at the issuer's expiry.
        let long = signer
            .sign_csr(&csr, &id, Duration::from_secs(86400))
            .unwrap();
        assert_eq!(long.not_after, signer.issuer_not_after());
    }

    #[test]
    fn refuses_an_issuer_from_another_anchor_or_a_wrong_key() {
        let anchor = generate_trust_anchor("cluster.local", Duration::from_secs(3600)).unwrap();
        let other = generate_trust_anchor("cluster.local", Duration::from_secs(3600)).unwrap();
        let issuer = generate_issuer(&anchor, "cluster.local", Duration::from_secs(600)).unwrap();
        let err = Signer::load(
            &issuer.cert_pem,
            &issuer.key_pem,
            &other.cert_pem,
            "cluster.local",
        )
        .unwrap_err();
        assert!(matches!(err, PkiError::IssuerNotTrusted), "{err}");
        let err = Signer::load(
            &issuer.cert_pem,
            &other.key_pem,
            &anchor.cert_pem,
            "cluster.local",
        )
        .unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
        let err = Signer::load(
            &issuer.cert_pem,
            &issuer.key_pem,
            "not pem",
            "cluster.local",
        )
        .unwrap_err();
        assert!(matches!(err, PkiError::NoCertificate { .. }), "{err}");
        // A leaf is no issuer.
        let signer = Signer::load(
            &issuer.cert_pem,
            &issuer.key_pem,
            &anchor.cert_pem,
            "cluster.local",
        )
        .unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = signer
            .sign_identity(
                &key,
                &Identity::new("a", "b").unwrap(),
                SystemTime::now(),
                SystemTime::now() + Duration::from_secs(60),
            )
            .unwrap();
        let err = Signer::load(
            &leaf.cert_pem,
            &key.serialize_pem(),
            &anchor.cert_pem,
            "cluster.local",
        )
        .unwrap_err();
        assert!(matches!(err, PkiError::IssuerNotCa), "{err}");
    }
}
