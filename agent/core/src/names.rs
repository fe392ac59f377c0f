//! Names that are API (the opt-in label, the default ports) and the
//! validation of names that come from users or the API server.
use std::{collections::BTreeMap, fmt};

/// The opt-in label, on a pod or its namespace.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

/// The outbound listener's port inside each meshed pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// The mutual-TLS tunnel between nodes, on each node's address.
pub const TUNNEL_PORT: u16 = 15008;
/// The agent's admin server (`/metrics`, `/live`, `/ready`) on each node.
pub const ADMIN_PORT: u16 = 4191;

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
