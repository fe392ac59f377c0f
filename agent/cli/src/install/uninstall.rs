//! `nodemesh uninstall`: every object the install made or the identity
//! service made, DaemonSet first, namespace last.
use nodemesh_core::config::ConfigErrors;

use super::{InstallArgs, PKI_DOCUMENTS, documents, render};

/// What removes an installation: every object of `render`, DaemonSet
/// first (while the agents may still read their RBAC), namespace last.
pub fn uninstall(namespace: &str) -> Result<String, ConfigErrors> {
    let installed = render(&InstallArgs {
        namespace: namespace.to_owned(),
        ..InstallArgs::default()
    })?;
    // The identity objects the identity service made (not in `render`'s
    // output without given files) go too.
    let made = PKI_DOCUMENTS
        .replace("{{namespace}}", namespace)
        .replace("{{trust_anchors}}", "\"\"")
        .replace("{{issuer_cert}}", "\"\"")
        .replace("{{issuer_key}}", "\"\"");
    let mut docs = Vec::new();
    let installed_docs = documents(&installed);
    let made_docs = documents(&made);
    // After the namespace: removed just before it.
    let ordered = installed_docs
        .iter()
        .take(1)
        .chain(made_docs.iter())
        .chain(installed_docs.iter().skip(1));
    for doc in ordered {
        let value: serde_norway::Value = serde_norway::from_str(doc).map_err(|e| {
            ConfigErrors(vec![format!("internal: the manifests do not parse: {e}")])
        })?;
        let field = |path: &[&str]| {
            path.iter()
                .try_fold(&value, |v, k| v.get(*k))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let mut meta = format!(
            "  name: {}\n",
            field(&["metadata", "name"]).unwrap_or_default()
        );
        if let Some(ns) = field(&["metadata", "namespace"]) {
            meta.push_str(&format!("  namespace: {ns}\n"));
        }
        docs.push(format!(
            "apiVersion: {}\nkind: {}\nmetadata:\n{meta}",
            field(&["apiVersion"]).unwrap_or_default(),
            field(&["kind"]).unwrap_or_default(),
        ));
    }
    docs.reverse();
    Ok(format!(
        "# Removes nodemesh from namespace {namespace}: kubectl delete -f -\n# Agents whose DaemonSet is gone detach their eBPF programs as they stop.\n{}",
        docs.join("---\n")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninstall_lists_every_object_daemonset_first() {
        let out = uninstall("mesh-system").expect("renders");
        let docs = documents(&out);
        assert_eq!(docs.len(), 22);
        // The agents stop first, while the identity service and their RBAC
        // are still there; the aggregated API goes before its server.
        assert!(docs[0].contains("kind: DaemonSet") && docs[0].contains("namespace: mesh-system"));
        assert!(docs[3].contains("kind: APIService"));
        assert!(
            docs[4].contains("kind: RoleBinding") && docs[4].contains("namespace: kube-system")
        );
        assert!(docs[5].contains("kind: Deployment"));
        // The CRD goes with the users' policies, then what the identity
        // service made, before the namespace.
        assert!(docs[18].contains("kind: CustomResourceDefinition"));
        assert!(docs[19].contains("kind: Secret") && docs[19].contains("nodemesh-identity-issuer"));
        assert!(docs[20].contains("kind: ConfigMap"));
        assert!(docs[21].contains("kind: Namespace") && docs[21].contains("name: mesh-system"));
    }
}
