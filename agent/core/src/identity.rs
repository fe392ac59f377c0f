//! Workload identity: a namespace's service account, named as a SPIFFE ID.
//! The PKI that signs it is [`crate::pki`]; the signing service is the
//! `nodemesh-identity` crate; the agent's certificates live in the data
//! plane.
//!
//! An identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service
//! account>`. Certificates carry it as a URI SAN, and also as the DNS SAN
//! `<sa>.<ns>.serviceaccount.identity.<trust domain>`, which is what a
//! tunnel client puts in SNI and checks the server's certificate against.
use std::{fmt, sync::Arc, time::Duration};

use crate::names::{is_dns_label, is_dns_subdomain};

/// The audience of the service-account tokens agents present to the
/// identity service (a projected token in the DaemonSet).
pub const TOKEN_AUDIENCE: &str = "identity.nodemesh.io";

/// The HTTP path the identity service signs on.
pub const CERTIFY_PATH: &str = "/v1/certify";

/// The path of the one client identity agents' tap ports answer: the
/// identity service's. Not a workload's (`/ns/<ns>/sa/<sa>`): the certify
/// endpoint signs only those, so no node can ever present it.
pub const TAP_CLIENT_PATH: &str = "/nodemesh/tap";

/// The tap client's SPIFFE ID in `trust_domain`.
pub fn tap_client_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}{TAP_CLIENT_PATH}")
}

/// Shortest workload certificate lifetime the identity service signs
/// (tests rotate fast).
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(10);
/// Longest: a week.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// A workload identity inside a trust domain: a namespace's service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "{0:?} is not a SPIFFE ID of the form spiffe://<trust domain>/ns/<namespace>/sa/<name>"
    )]
    NotSpiffe(String),
    #[error("{0:?} is not a valid namespace name (a DNS label)")]
    Namespace(String),
    #[error("{0:?} is not a valid service account name (a DNS subdomain)")]
    ServiceAccount(String),
    #[error("the identity's DNS name {0:?} is longer than 253 characters")]
    TooLong(String),
}

impl Identity {
    /// Checks the names the way the API server does.
    pub fn new(namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        if !is_dns_label(namespace) {
            return Err(IdentityError::Namespace(namespace.into()));
        }
        if !is_dns_subdomain(service_account) {
            return Err(IdentityError::ServiceAccount(service_account.into()));
        }
        Ok(Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// `<sa>.<ns>.serviceaccount.identity.<td>`: SNI and DNS SAN.
    pub fn dns_name(&self, trust_domain: &str) -> Result<String, IdentityError> {
        let name = format!(
            "{}.{}.serviceaccount.identity.{trust_domain}",
            self.service_account, self.namespace
        );
        if name.len() > 253 {
            return Err(IdentityError::TooLong(name));
        }
        Ok(name)
    }

    /// Reads a SPIFFE ID: (trust domain, identity).
    pub fn parse_spiffe(uri: &str) -> Result<(String, Self), IdentityError> {
        let bad = || IdentityError::NotSpiffe(uri.into());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if !td.is_empty() => {
                Ok((td.to_owned(), Self::new(ns, sa).map_err(|_| bad())?))
            }
            _ => Err(bad()),
        }
    }

    /// Reads an SNI name made by [`Identity::dns_name`] for `trust_domain`.
    pub fn parse_dns_name(name: &str, trust_domain: &str) -> Option<Self> {
        let suffix = format!(".serviceaccount.identity.{trust_domain}");
        let head = name.strip_suffix(&suffix)?;
        // Namespaces hold no dots; service account names may.
        let (sa, ns) = head.rsplit_once('.')?;
        Self::new(ns, sa).ok()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// An identity in its trust domain, with its SPIFFE ID made once: cheap to
/// clone, compared and hashed by the ID. What the data path carries per
/// connection, so no connection builds identity strings.
#[derive(Clone)]
pub struct SpiffeId(Arc<SpiffeInner>);

struct SpiffeInner {
    identity: Identity,
    uri: String,
}

impl SpiffeId {
    pub fn new(identity: Identity, trust_domain: &str) -> Self {
        let uri = identity.spiffe_id(trust_domain);
        Self(Arc::new(SpiffeInner { identity, uri }))
    }

    pub fn identity(&self) -> &Identity {
        &self.0.identity
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn uri(&self) -> &str {
        &self.0.uri
    }
}

impl PartialEq for SpiffeId {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.uri == other.0.uri
    }
}

impl Eq for SpiffeId {}

impl std::hash::Hash for SpiffeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.uri.hash(state);
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_and_dns_names_round_trip() {
        let id = Identity::new("shop", "web.frontend").unwrap();
        let spiffe = id.spiffe_id("cluster.local");
        assert_eq!(spiffe, "spiffe://cluster.local/ns/shop/sa/web.frontend");
        assert_eq!(
            Identity::parse_spiffe(&spiffe).unwrap(),
            ("cluster.local".into(), id.clone())
        );
        let dns = id.dns_name("cluster.local").unwrap();
        assert_eq!(
            dns,
            "web.frontend.shop.serviceaccount.identity.cluster.local"
        );
        assert_eq!(
            Identity::parse_dns_name(&dns, "cluster.local"),
            Some(id.clone())
        );
        assert_eq!(Identity::parse_dns_name(&dns, "other.example"), None);
        let a = SpiffeId::new(id.clone(), "cluster.local");
        assert_eq!(a.uri(), spiffe);
        assert_eq!(a, SpiffeId::new(id, "cluster.local"));
    }

    #[test]
    fn bad_ids_are_refused() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
        ] {
            assert!(Identity::parse_spiffe(bad).is_err(), "{bad}");
        }
        assert!(Identity::new("a.b", "x").is_err());
        assert!(Identity::new("a", "").is_err());
    }
}
