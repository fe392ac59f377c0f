//! What the `annotations` fuzz target (`tests/fuzz`) feeds any text
//! to: every annotation and label value the agents parse, identities,
//! and an `AuthorizationPolicy` spec.
use std::collections::BTreeMap;

use crate::names::{InboundPolicy, MESH_LABEL, MeshLabel, PodUid, PortSet, parse_limit};

pub fn values(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = InboundPolicy::parse(text);
    if let Ok(set) = PortSet::parse(text) {
        let _ = (set.contains(0), set.contains(u16::MAX));
    }
    let _ = parse_limit(text);
    let _ = PodUid::new(text);
    let _ = MeshLabel::parse(&BTreeMap::from([(MESH_LABEL.to_owned(), text.to_owned())]));
    let _ = crate::config::parse_positive_duration(text);
    let _ = crate::identity::Identity::parse_spiffe(text);
    let _ = crate::identity::Identity::parse_dns_name(text, "cluster.local");
    if let Some((ns, sa)) = text.split_once('/') {
        let _ = crate::identity::Identity::new(ns, sa);
    }
    if let Ok(spec) = serde_json::from_str::<crate::policy::PolicySpec>(text) {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        match crate::policy::Policy::new("shop", "p", &spec) {
            Ok(p) => {
                let _ = p.selects("shop", &labels, 8080);
            }
            Err(_) => {
                let _ = crate::policy::Policy::fail_closed("shop", "p", &spec);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_seen_by_the_fuzzer_parse_without_panic() {
        for seed in [
            &b"65535-0"[..],
            b"0-65535,,",
            b"1-2-3",
            b"spiffe://",
            b"spiffe://td/ns//sa/x",
            b"99999999999999999999h",
            br#"{"podSelector":{"matchExpressions":[{"key":"a","operator":"In"}]},"ports":[0,70000]}"#,
            b"\xc3",
        ] {
            super::values(seed);
        }
    }
}
