//! `AuthorizationPolicy` (`policy.nodemesh.io/v1alpha1`): which clients may
//! connect to which ports of which pods of a namespace. The wire form (what
//! the API server stores, checked first by the CRD's OpenAPI schema), its
//! validation into a [`Policy`], and the matching every agent does per
//! connection. The identity service writes the `Accepted` condition; the
//! agents enforce accepted policies only.
//!
//! Semantics: the policies of a pod's namespace that select the pod and the
//! port form an allow list — a client any of them allows is let in, any
//! other is refused (`unauthorized`). A pod and port no policy selects
//! keeps its default inbound policy.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    identity::Identity,
    names::{is_dns_label, is_dns_subdomain},
};

pub const GROUP: &str = "policy.nodemesh.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "AuthorizationPolicy";
pub const PLURAL: &str = "authorizationpolicies";
/// The condition the identity service keeps on every policy: `True` when
/// the agents enforce it.
pub const ACCEPTED: &str = "Accepted";

/// The condition that says whether every pod the policy selects is meshed
/// (an unmeshed one is not protected by it: its connections never reach
/// an agent); `status.unmeshedPods` names them.
pub const MESHED: &str = "Meshed";

/// `spec`, as stored.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// The pods of the namespace it applies to; absent or empty: all.
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Their ports it applies to; absent or empty: every port.
    #[serde(default)]
    pub ports: Vec<i64>,
    pub clients: ClientsSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// Who may connect.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClientsSpec {
    /// Meshed clients running as these service accounts (a namespace left
    /// out is the policy's).
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountRef>,
    /// Meshed clients of any service account of these namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Any meshed client of the trust domain (`*`).
    #[serde(default)]
    pub authenticated: bool,
    /// Anyone, plaintext included.
    #[serde(default)]
    pub unauthenticated: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// A policy the agents can enforce: validated, names resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    selector: Vec<Match>,
    ports: Vec<u16>,
    service_accounts: Vec<Identity>,
    namespaces: Vec<String>,
    authenticated: bool,
    unauthenticated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Match {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A client of an inbound connection, as a policy sees it.
#[derive(Clone, Copy, Debug)]
pub enum PolicyClient<'a> {
    /// Authenticated (mutual TLS, or a meshed pod of this node) as this
    /// identity of the trust domain.
    Meshed(&'a Identity),
    /// Plaintext, or an identity of another trust domain.
    Unauthenticated,
}

impl Policy {
    /// Checks a stored policy; the error says what is wrong, for its status.
    pub fn new(namespace: &str, name: &str, spec: &PolicySpec) -> Result<Self, String> {
        match Self::checked(namespace, name, spec) {
            (Some(p), None) => Ok(p),
            (_, why) => Err(why.unwrap_or_default()),
        }
    }

    /// What to enforce for a policy that is not valid (`Err` of
    /// [`Policy::new`]): when what it selects (pods and ports) is clear and
    /// only its clients are wrong, it admits nobody there until fixed (an
    /// invalid policy must not open what it was meant to close); when even
    /// that is unclear, nothing.
    pub fn fail_closed(namespace: &str, name: &str, spec: &PolicySpec) -> Option<Self> {
        Self::checked(namespace, name, spec).0
    }

    /// What to enforce, and why it is not valid if it is not.
    fn checked(namespace: &str, name: &str, spec: &PolicySpec) -> (Option<Self>, Option<String>) {
        let mut problems = Vec::new();
        let mut selector = Vec::new();
        if let Some(s) = &spec.selector {
            for (k, v) in &s.match_labels {
                if k.is_empty() {
                    problems.push("selector.matchLabels: an empty key".to_owned());
                }
                selector.push(Match::Equals(k.clone(), v.clone()));
            }
            for (i, r) in s.match_expressions.iter().enumerate() {
                let at = format!("selector.matchExpressions[{i}]");
                let with_values = |problems: &mut Vec<String>| {
                    if r.values.is_empty() {
                        problems.push(format!("{at}: {} needs values", r.operator));
                    }
                    r.values.clone()
                };
                let without_values = |problems: &mut Vec<String>| {
                    if !r.values.is_empty() {
                        problems.push(format!("{at}: {} takes no values", r.operator));
                    }
                };
                selector.push(match r.operator.as_str() {
                    "In" => Match::In(r.key.clone(), with_values(&mut problems)),
                    "NotIn" => Match::NotIn(r.key.clone(), with_values(&mut problems)),
                    "Exists" => {
                        without_values(&mut problems);
                        Match::Exists(r.key.clone())
                    }
                    "DoesNotExist" => {
                        without_values(&mut problems);
                        Match::DoesNotExist(r.key.clone())
                    }
                    other => {
                        problems.push(format!("{at}: unknown operator {other:?}"));
                        continue;
                    }
                });
            }
        }
        let mut ports = Vec::new();
        for p in &spec.ports {
            match u16::try_from(*p) {
                Ok(port) if port > 0 => ports.push(port),
                _ => problems.push(format!("ports: {p} is not a port")),
            }
        }
        if !is_dns_label(namespace) || !is_dns_subdomain(name) {
            problems.push(format!("{namespace}/{name}: not an object name"));
        }
        // Where it applies is clear from here on.
        let selects_clearly = problems.is_empty();
        let c = &spec.clients;
        let mut service_accounts = Vec::new();
        for sa in &c.service_accounts {
            let ns = sa.namespace.as_deref().unwrap_or(namespace);
            match Identity::new(ns, &sa.name) {
                Ok(id) => service_accounts.push(id),
                Err(e) => problems.push(format!("clients.serviceAccounts: {e}")),
            }
        }
        for ns in &c.namespaces {
            if !is_dns_label(ns) {
                problems.push(format!(
                    "clients.namespaces: {ns:?} is not a namespace name"
                ));
            }
        }
        if c.service_accounts.is_empty()
            && c.namespaces.is_empty()
            && !c.authenticated
            && !c.unauthenticated
        {
            problems.push(
                "clients: allows nobody (name serviceAccounts, namespaces, authenticated or unauthenticated)"
                    .to_owned(),
            );
        }
        if !problems.is_empty() {
            let nobody = selects_clearly.then(|| Self {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                selector: selector.clone(),
                ports: ports.clone(),
                service_accounts: Vec::new(),
                namespaces: Vec::new(),
                authenticated: false,
                unauthenticated: false,
            });
            return (nobody, Some(problems.join("; ")));
        }
        let valid = Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            selector,
            ports,
            service_accounts,
            namespaces: c.namespaces.clone(),
            authenticated: c.authenticated,
            unauthenticated: c.unauthenticated,
        };
        (Some(valid), None)
    }

    /// Whether it applies to port `port` of a pod of `namespace` with
    /// `labels`.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && self.selects_pod(namespace, labels)
    }

    /// Whether it applies to (some port of) a pod of `namespace` with
    /// `labels`.
    pub fn selects_pod(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        namespace == self.namespace
            && self.selector.iter().all(|m| match m {
                Match::Equals(k, v) => labels.get(k) == Some(v),
                Match::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Match::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Match::Exists(k) => labels.contains_key(k),
                Match::DoesNotExist(k) => !labels.contains_key(k),
            })
    }

    /// Whether it lets `client` in.
    pub fn allows(&self, client: PolicyClient<'_>) -> bool {
        if self.unauthenticated {
            return true;
        }
        match client {
            PolicyClient::Unauthenticated => false,
            PolicyClient::Meshed(id) => {
                self.authenticated
                    || self.namespaces.contains(&id.namespace)
                    || self.service_accounts.contains(id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: serde_json::Value) -> PolicySpec {
        serde_json::from_value(yaml).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_policy_selects_by_labels_and_ports_in_its_namespace() {
        let p = Policy::new(
            "shop",
            "api",
            &spec(serde_json::json!({
                "selector": {"matchLabels": {"app": "api"},
                             "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["canary"]}]},
                "ports": [8080],
                "clients": {"serviceAccounts": [{"name": "web"}]}
            })),
        )
        .unwrap();
        let api = labels(&[("app", "api")]);
        assert!(p.selects("shop", &api, 8080));
        assert!(!p.selects("shop", &api, 9090), "another port");
        assert!(!p.selects("other", &api, 8080), "another namespace");
        assert!(!p.selects("shop", &labels(&[("app", "web")]), 8080));
        assert!(!p.selects("shop", &labels(&[("app", "api"), ("tier", "canary")]), 8080));
        let all = Policy::new(
            "shop",
            "all",
            &spec(serde_json::json!({"clients": {"authenticated": true}})),
        )
        .unwrap();
        assert!(all.selects("shop", &BTreeMap::new(), 1));
    }

    #[test]
    fn clients_are_allowed_by_service_account_namespace_or_authentication() {
        let web = Identity::new("shop", "web").unwrap();
        let api = Identity::new("shop", "api").unwrap();
        let batch = Identity::new("batch", "job").unwrap();
        let p = |clients: serde_json::Value| {
            Policy::new(
                "shop",
                "p",
                &spec(serde_json::json!({ "clients": clients })),
            )
            .unwrap()
        };
        let only_web = p(serde_json::json!({"serviceAccounts": [{"name": "web"}]}));
        assert!(only_web.allows(PolicyClient::Meshed(&web)));
        assert!(!only_web.allows(PolicyClient::Meshed(&api)));
        assert!(!only_web.allows(PolicyClient::Unauthenticated));
        let other_ns =
            p(serde_json::json!({"serviceAccounts": [{"name": "web", "namespace": "batch"}]}));
        assert!(!other_ns.allows(PolicyClient::Meshed(&web)));
        let batch_ns = p(serde_json::json!({"namespaces": ["batch"]}));
        assert!(batch_ns.allows(PolicyClient::Meshed(&batch)));
        assert!(!batch_ns.allows(PolicyClient::Meshed(&web)));
        let any = p(serde_json::json!({"authenticated": true}));
        assert!(any.allows(PolicyClient::Meshed(&batch)));
        assert!(!any.allows(PolicyClient::Unauthenticated));
        let open = p(serde_json::json!({"unauthenticated": true}));
        assert!(open.allows(PolicyClient::Unauthenticated));
    }

    #[test]
    fn an_invalid_policy_fails_closed_where_it_clearly_applies() {
        let web = Identity::new("shop", "web").unwrap();
        let bad_clients = spec(serde_json::json!({
            "selector": {"matchLabels": {"app": "api"}},
            "clients": {"authenticated": false}
        }));
        assert!(Policy::new("shop", "p", &bad_clients).is_err());
        let p = Policy::fail_closed("shop", "p", &bad_clients).expect("enforced");
        assert!(p.selects("shop", &labels(&[("app", "api")]), 80));
        assert!(!p.allows(PolicyClient::Meshed(&web)));
        assert!(!p.allows(PolicyClient::Unauthenticated));
        let bad_selector = spec(serde_json::json!({
            "selector": {"matchExpressions": [{"key": "app", "operator": "In"}]},
            "clients": {"authenticated": true}
        }));
        assert!(Policy::fail_closed("shop", "p", &bad_selector).is_none());
    }

    #[test]
    fn what_the_schema_cannot_catch_is_reported() {
        let bad = |v: serde_json::Value| Policy::new("shop", "p", &spec(v)).unwrap_err();
        assert!(bad(serde_json::json!({"clients": {}})).contains("allows nobody"));
        let e = bad(serde_json::json!({
            "selector": {"matchExpressions": [
                {"key": "a", "operator": "In"},
                {"key": "b", "operator": "Exists", "values": ["x"]},
                {"key": "c", "operator": "Near"}
            ]},
            "ports": [0, 70000],
            "clients": {"serviceAccounts": [{"name": "Web!"}], "namespaces": ["NS"]}
        }));
        for want in [
            "In needs values",
            "Exists takes no values",
            "unknown operator \"Near\"",
            "0 is not a port",
            "70000 is not a port",
            "serviceAccounts",
            "\"NS\" is not a namespace name",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
    }
}
