//! Names that are API (the opt-in label, the default ports) and the
//! validation of names that come from users or the API server.
use std::{collections::BTreeMap, fmt};

/// The opt-in label, on a pod or its namespace.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

/// Ports whose connections are relayed as bytes, never inspected for HTTP
/// (on a Service, a namespace or a pod): `3306,5432,8000-8100`.
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.nodemesh.io/opaque-ports";

/// Ports of a pod whose inbound connections are not captured (on a pod):
/// `9100,8000-8100`.
pub const SKIP_INBOUND_PORTS_ANNOTATION: &str = "config.nodemesh.io/skip-inbound-ports";

/// Who may connect to a pod (on a pod or a namespace; else the agent's
/// `--default-inbound-policy`).
pub const INBOUND_POLICY_ANNOTATION: &str = "config.nodemesh.io/default-inbound-policy";

/// The most connections a pod may hold through the node's proxy at once
/// (on a pod; else its fair share of the node's budget): `5000`.
pub const MAX_CONNECTIONS_ANNOTATION: &str = "config.nodemesh.io/max-connections";

/// The most HTTP requests a pod may have in flight through the node's
/// proxy (on a pod; else its fair share): `2000`.
pub const MAX_REQUESTS_ANNOTATION: &str = "config.nodemesh.io/max-requests";

/// How long a pod's opaque connections may stay silent both ways before
/// the proxy closes them (on a pod; else `--idle-timeout`): `30m`, `4h`.
pub const IDLE_TIMEOUT_ANNOTATION: &str = "config.nodemesh.io/idle-timeout";

/// The largest limit an annotation may set.
pub const MAX_LIMIT: usize = 1 << 20;

/// A limit as an annotation writes it: a whole number from 1 to
/// [`MAX_LIMIT`].
pub fn parse_limit(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!("not a whole number from 1 to {MAX_LIMIT}")),
    }
}

/// Who may connect to a meshed pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InboundPolicy {
    /// Everyone; mutual TLS where the client is meshed.
    AllUnauthenticated,
    /// Only meshed clients of the trust domain (mutual TLS).
    AllAuthenticated,
    /// Meshed clients, and plaintext from the cluster's pods and nodes.
    ClusterUnauthenticated,
    /// Nobody.
    Deny,
}

impl InboundPolicy {
    pub const ALL: [InboundPolicy; 4] = [
        Self::AllUnauthenticated,
        Self::AllAuthenticated,
        Self::ClusterUnauthenticated,
        Self::Deny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllAuthenticated => "all-authenticated",
            Self::ClusterUnauthenticated => "cluster-unauthenticated",
            Self::Deny => "deny",
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == text.trim())
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a policy (one of {})",
                    Self::ALL.map(Self::as_str).join(", ")
                )
            })
    }
}

/// Ports opaque with no configuration: server-first protocols (SMTP,
/// MySQL/MariaDB, PostgreSQL, Redis, memcached, …) a client never speaks
/// first on.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// A set of ports, as the opaque-ports annotation writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    /// `3306,5432,8000-8100` (spaces allowed).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let port = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{s:?} is not a port"))
            };
            let range = match part.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(part)?, port(part)?),
            };
            if range.0 > range.1 {
                return Err(format!("{part:?}: the range is backwards"));
            }
            ranges.push(range);
        }
        Ok(Self(ranges))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }
}

/// The inbound listener's port inside each meshed pod's netns: what
/// inbound capture hands connections to (never dialled by anyone).
pub const INBOUND_PORT: u16 = 15006;

/// The outbound listener's port inside each meshed pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// The mutual-TLS tunnel between nodes, on each node's address.
pub const TUNNEL_PORT: u16 = 15008;
/// The agent's admin server (`/metrics`, `/live`, `/ready`) on each node.
pub const ADMIN_PORT: u16 = 4191;
/// The agent's tap port on each node: `/v1/stat` and `/v1/tap` over mutual
/// TLS, for the identity service's identity only (the API behind
/// [`API_GROUP`] reaches agents there).
pub const TAP_PORT: u16 = 4190;
/// Where the identity service serves the aggregated API (HTTPS).
pub const API_PORT: u16 = 8443;
/// The aggregated API group the CLI reads stat and tap through (RBAC
/// decides who may): `GET /apis/tap.nodemesh.io/v1alpha1/stat` (verb
/// `list`) and `…/tap?watch=true` (verb `watch`).
pub const API_GROUP: &str = "tap.nodemesh.io";
pub const API_VERSION: &str = "v1alpha1";

/// The value of [`MESH_LABEL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshLabel {
    Enabled,
    Disabled,
}

impl MeshLabel {
    /// `None` when the label is absent; an error for any other value.
    pub fn parse(labels: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        match labels.get(MESH_LABEL).map(String::as_str) {
            None => Ok(None),
            Some("enabled") => Ok(Some(Self::Enabled)),
            Some("disabled") => Ok(Some(Self::Disabled)),
            Some(other) => Err(format!(
                "label {MESH_LABEL}={other:?} is neither \"enabled\" nor \"disabled\"; ignored"
            )),
        }
    }
}

/// Whether a pod is meshed: its own label first (`enabled`/`disabled`),
/// then its namespace's `enabled`.
pub fn mesh_decision(pod: Option<MeshLabel>, namespace: Option<MeshLabel>) -> bool {
    match pod {
        Some(MeshLabel::Enabled) => true,
        Some(MeshLabel::Disabled) => false,
        None => namespace == Some(MeshLabel::Enabled),
    }
}

/// A pod's UID: also a file name under the pin directory, so only
/// `[A-Za-z0-9._-]` is accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    pub fn new(uid: &str) -> Result<Self, String> {
        let ok = !uid.is_empty()
            && uid.len() <= 128
            && uid != "."
            && uid != ".."
            && uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if ok {
            Ok(Self(uid.to_owned()))
        } else {
            Err(format!(
                "uid {uid:?} must be 1-128 characters of letters, digits, '-', '_' or '.'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 1123 label: what namespace names are.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: what node names, service account names and trust
/// domains are.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets_parse_lists_and_ranges() {
        let set = PortSet::parse("3306, 8000-8100,25").unwrap();
        assert!(set.contains(3306) && set.contains(8050) && set.contains(25));
        assert!(!set.contains(80));
        assert!(PortSet::parse("").unwrap() == PortSet::default());
        assert!(PortSet::parse("http").is_err());
        assert!(PortSet::parse("90-80").is_err());
        assert!(PortSet::parse("0").is_err());
    }

    #[test]
    fn uids_that_could_be_paths_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(PodUid::new(bad).is_err(), "{bad:?}");
        }
        assert!(PodUid::new("0f1e2d3c-aaaa-bbbb-cccc-000000000001").is_ok());
    }

    #[test]
    fn mesh_label_values() {
        let labels = |v: &str| BTreeMap::from([(MESH_LABEL.to_owned(), v.to_owned())]);
        assert_eq!(MeshLabel::parse(&BTreeMap::new()), Ok(None));
        assert_eq!(
            MeshLabel::parse(&labels("enabled")),
            Ok(Some(MeshLabel::Enabled))
        );
        assert_eq!(
            MeshLabel::parse(&labels("disabled")),
            Ok(Some(MeshLabel::Disabled))
        );
        assert!(MeshLabel::parse(&labels("yes")).is_err());
    }

    #[test]
    fn the_pod_label_wins_over_the_namespace() {
        use MeshLabel::*;
        assert!(mesh_decision(None, Some(Enabled)));
        assert!(!mesh_decision(Some(Disabled), Some(Enabled)));
        assert!(mesh_decision(Some(Enabled), None));
        assert!(!mesh_decision(None, None));
        assert!(!mesh_decision(None, Some(Disabled)));
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_subdomain("node-1.example"));
        assert!(is_dns_subdomain("cluster.local"));
        for bad in ["", "Node_1", "a..b", "-a", "a-", &"x".repeat(64)] {
            assert!(!is_dns_subdomain(bad), "{bad:?}");
        }
        assert!(is_dns_label("shop"));
        assert!(!is_dns_label("a.b"));
    }
}
