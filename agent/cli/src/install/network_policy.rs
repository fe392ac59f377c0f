//! The NetworkPolicy in front of the identity service, from `--pod-cidr`.
use super::quoted;

/// The NetworkPolicy in front of the identity service, for a cluster whose
/// pod networks are `pod_cidrs` (none: no policy). Its certificate port
/// (agents, on host network) and aggregated-API port (the API server) take
/// connections only from outside the pod networks, in the families given —
/// a family without a pod network given is not let in at all; the metrics
/// and probe port takes any.
pub(super) fn identity_network_policy(pod_cidrs: &[nodemesh_core::config::IpCidr]) -> String {
    if pod_cidrs.is_empty() {
        return String::new();
    }
    let mut from = String::new();
    for (all, v4) in [("0.0.0.0/0", true), ("::/0", false)] {
        let except: Vec<String> = pod_cidrs
            .iter()
            .filter(|c| c.addr.is_ipv4() == v4)
            .map(|c| format!("              - {}\n", quoted(&c.to_string())))
            .collect();
        if except.is_empty() {
            continue;
        }
        from.push_str(&format!(
            "        - ipBlock:\n            cidr: {}\n            except:\n{}",
            quoted(all),
            except.concat()
        ));
    }
    IDENTITY_NETWORK_POLICY.replace("{{from}}", &from)
}

const IDENTITY_NETWORK_POLICY: &str = r#"# Who reaches the identity service (`nodemesh install --pod-cidr`): its
# certificate port (the agents, on the nodes' network) and aggregated-API
# port (the API server) only from outside the pod networks; the metrics and
# probe port from anywhere.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: nodemesh-identity
  namespace: {{namespace}}
  labels:
    app.kubernetes.io/part-of: nodemesh
spec:
  podSelector:
    matchLabels:
      app.kubernetes.io/name: nodemesh-identity
  policyTypes: [Ingress]
  ingress:
    - ports:
        - port: 8080
          protocol: TCP
        - port: 8443
          protocol: TCP
      from:
{{from}}    - ports:
        - port: 9990
          protocol: TCP
---
"#;

#[cfg(test)]
mod tests {
    use super::super::{InstallArgs, render, tests::object};

    #[test]
    fn the_identity_service_takes_certificate_and_api_calls_only_from_outside_the_pod_network() {
        let policy =
            |args: &InstallArgs| object(&render(args).expect("renders"), "NetworkPolicy", None);
        // Not given: no policy (nothing to tell pods from nodes by).
        assert!(policy(&InstallArgs::default()).is_none());
        let mut args = InstallArgs {
            pod_cidrs: vec!["10.244.0.0/16".into(), "fd00:10:244::/56".into()],
            ..InstallArgs::default()
        };
        let p = policy(&args).expect("a NetworkPolicy");
        assert_eq!(
            p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
            Some("nodemesh-identity")
        );
        let rules = p["spec"]["ingress"].as_sequence().expect("ingress rules");
        let ports = |r: &serde_norway::Value| -> Vec<u64> {
            r["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(ports(&rules[0]), [8080, 8443]);
        let blocks: Vec<(String, Vec<String>)> = rules[0]["from"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|f| {
                let b = &f["ipBlock"];
                (
                    b["cidr"].as_str().unwrap().to_owned(),
                    b["except"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .map(|e| e.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            blocks,
            [
                ("0.0.0.0/0".to_owned(), vec!["10.244.0.0/16".to_owned()]),
                ("::/0".to_owned(), vec!["fd00:10:244::/56".to_owned()]),
            ]
        );
        // The metrics and probe port: from anywhere (no `from`).
        assert_eq!(ports(&rules[1]), [9990]);
        assert!(rules[1].get("from").is_none());
        assert_eq!(rules.len(), 2);
        // One family given: the other is not let in at all.
        args.pod_cidrs = vec!["10.244.0.0/16".into()];
        let p = policy(&args).expect("a NetworkPolicy");
        assert_eq!(
            p["spec"]["ingress"][0]["from"].as_sequence().unwrap().len(),
            1
        );
        assert_eq!(
            p["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"].as_str(),
            Some("0.0.0.0/0")
        );
        assert_eq!(p["spec"]["policyTypes"][0].as_str(), Some("Ingress"));
        // Host bits are dropped (the API server wants a network).
        args.pod_cidrs = vec!["10.244.1.5/16".into()];
        let p = policy(&args).expect("a NetworkPolicy");
        assert_eq!(
            p["spec"]["ingress"][0]["from"][0]["ipBlock"]["except"][0].as_str(),
            Some("10.244.0.0/16")
        );
        // A bad network is an error, not a policy that protects nothing —
        // nor one the API server refuses (an `except` as large as its
        // `cidr`, an IPv4-mapped range under ::/0).
        for bad in [
            "10.244.0.0/33",
            "0.0.0.0/0",
            "::/0",
            "::ffff:10.244.0.0/112",
        ] {
            args.pod_cidrs = vec![bad.into()];
            let err = render(&args).unwrap_err().to_string();
            assert!(err.contains("--pod-cidr"), "{bad}: {err}");
        }
    }
}
