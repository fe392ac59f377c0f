//! Kubernetes objects reduced to what the state store keeps: pods,
//! namespaces, Services, EndpointSlices (`v1` and `v1beta1`) and core
//! Endpoints, AuthorizationPolicies. Pure functions, tested on hand-made objects.
//! Services and their endpoints are `endpoints`'.
mod endpoints;

pub(super) use endpoints::{endpoints_v1, service_info, slice_v1, slice_v1beta1};
use std::{net::IpAddr, time::SystemTime};

use k8s_openapi::{
    api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::api::DynamicObject;
use nodemesh_core::{
    names::{
        IDLE_TIMEOUT_ANNOTATION, INBOUND_POLICY_ANNOTATION, InboundPolicy,
        MAX_CONNECTIONS_ANNOTATION, MAX_REQUESTS_ANNOTATION, MeshLabel, OPAQUE_PORTS_ANNOTATION,
        PodUid, PortSet, SKIP_INBOUND_PORTS_ANNOTATION, parse_limit,
    },
    policy::{Policy, PolicySpec},
};

use crate::{
    cgroup::QosClass,
    discovery::SourceErrorReason,
    state::{CgroupRef, Namespace, ObjectKey, PodInfo, PodLimits, Workload},
};

pub(super) fn meta_key(meta: &ObjectMeta) -> Option<ObjectKey> {
    Some(ObjectKey {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
    })
}

pub(super) fn object_name(meta: &ObjectMeta) -> String {
    format!(
        "pod/{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The workload running a pod, and a problem if its owner is of an unknown
/// kind. A ReplicaSet made by a Deployment is named `<deployment>-<hash>`
/// where `<hash>` is the pod's `pod-template-hash` label: that names the
/// Deployment without asking the API server.
fn workload(p: &K8sPod) -> (Workload, Option<String>) {
    let pod_name = p.metadata.name.clone().unwrap_or_default();
    let owners = p.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return (
            Workload {
                kind: "pod".into(),
                name: pod_name,
            },
            None,
        );
    };
    let kind = owner.kind.to_ascii_lowercase();
    let named = |kind: &str, name: &str| Workload {
        kind: kind.into(),
        name: name.into(),
    };
    match kind.as_str() {
        "replicaset" => {
            let hash = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) if !deployment.is_empty() => {
                    (named("deployment", deployment), None)
                }
                _ => (named("replicaset", &owner.name), None),
            }
        }
        "statefulset" | "daemonset" | "job" | "replicationcontroller" | "cronjob" => {
            (named(&kind, &owner.name), None)
        }
        _ => (
            named(&kind, &owner.name),
            Some(format!(
                "owner {}/{} is of a kind nodemesh does not know; metrics use it as is",
                owner.kind, owner.name
            )),
        ),
    }
}

/// The opaque-ports annotation of an object: the ports, or why not.
fn opaque_ports(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<PortSet, String> {
    match annotations.and_then(|a| a.get(OPAQUE_PORTS_ANNOTATION)) {
        None => Ok(PortSet::default()),
        Some(text) => PortSet::parse(text)
            .map_err(|e| format!("annotation {OPAQUE_PORTS_ANNOTATION}={text:?}: {e}; ignored")),
    }
}

/// The ports a pod's probes use (numbers, or container port names).
fn probe_ports(spec: Option<&k8s_openapi::api::core::v1::PodSpec>) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let Some(spec) = spec else {
        return Vec::new();
    };
    let mut ports = Vec::new();
    for c in &spec.containers {
        let named = |name: &str| {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        let resolve = |port: &IntOrString| match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => named(name),
        };
        for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            let port = probe
                .http_get
                .as_ref()
                .and_then(|h| resolve(&h.port))
                .or_else(|| probe.tcp_socket.as_ref().and_then(|t| resolve(&t.port)))
                .or_else(|| probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()));
            if let Some(port) = port
                && !ports.contains(&port)
            {
                ports.push(port);
            }
        }
    }
    ports
}

/// At most this many ports a pod may exempt from inbound capture.
const MAX_SKIP_PORTS: usize = 1024;

/// The skip-inbound-ports annotation, expanded.
fn skip_ports(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<Vec<u16>, String> {
    let Some(text) = annotations.and_then(|a| a.get(SKIP_INBOUND_PORTS_ANNOTATION)) else {
        return Ok(Vec::new());
    };
    let set = PortSet::parse(text).map_err(|e| {
        format!("annotation {SKIP_INBOUND_PORTS_ANNOTATION}={text:?}: {e}; ignored")
    })?;
    let ports: Vec<u16> = (1..=u16::MAX)
        .filter(|p| set.contains(*p))
        .take(MAX_SKIP_PORTS + 1)
        .collect();
    if ports.len() > MAX_SKIP_PORTS {
        return Err(format!(
            "annotation {SKIP_INBOUND_PORTS_ANNOTATION}={text:?}: more than {MAX_SKIP_PORTS} ports; ignored"
        ));
    }
    Ok(ports)
}

/// The inbound-policy annotation of an object. One that cannot be read
/// means `deny` (with the problem, for the object's owner): a typo must
/// never open what it meant to close.
fn inbound_policy(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> (Option<InboundPolicy>, Option<String>) {
    match annotations.and_then(|a| a.get(INBOUND_POLICY_ANNOTATION)) {
        None => (None, None),
        Some(text) => match InboundPolicy::parse(text) {
            Ok(policy) => (Some(policy), None),
            Err(e) => (
                Some(InboundPolicy::Deny),
                Some(format!(
                    "annotation {INBOUND_POLICY_ANNOTATION}={text:?}: {e}; deny applies until it is fixed"
                )),
            ),
        },
    }
}

/// A pod's limit annotations; one that cannot be read is a problem and
/// ignored (the pod keeps its fair share).
fn limits(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    problems: &mut Vec<(SourceErrorReason, String)>,
) -> PodLimits {
    let get = |key: &'static str| annotations.and_then(|a| a.get(key)).map(|t| (key, t));
    let mut count = |found: Option<(&str, &String)>| {
        let (key, text) = found?;
        parse_limit(text)
            .map_err(|e| {
                problems.push((
                    SourceErrorReason::InvalidAnnotation,
                    format!("annotation {key}={text:?}: {e}; ignored"),
                ));
            })
            .ok()
    };
    let max_connections = count(get(MAX_CONNECTIONS_ANNOTATION));
    let max_requests = count(get(MAX_REQUESTS_ANNOTATION));
    let idle_timeout = get(IDLE_TIMEOUT_ANNOTATION).and_then(|(key, text)| {
        nodemesh_core::config::parse_positive_duration(text)
            .map_err(|e| {
                problems.push((
                    SourceErrorReason::InvalidAnnotation,
                    format!("annotation {key}={text:?}: {e}; ignored"),
                ));
            })
            .ok()
    });
    PodLimits {
        max_connections,
        max_requests,
        idle_timeout,
    }
}

/// Another node's pod, reduced to what this node routes and authorizes
/// by: its addresses, node, identity, workload, mesh label and opaque
/// ports. Its labels (what only its own node's policies select by), its
/// containers, probes and limits are its own agent's business: a tenant
/// creating pods with large labels grows one agent, not every agent.
pub(super) fn keep_remote(info: &mut PodInfo) {
    info.labels = std::collections::BTreeMap::new();
    info.container_ids = Vec::new();
    info.probe_ports = Vec::new();
    info.skip_inbound_ports = Vec::new();
    info.limits = PodLimits::default();
}

/// A pod reduced to what the state keeps, with the problems found on the
/// way (reported by the caller, for pods on its node). `None` for a pod
/// that cannot be kept at all.
pub(super) fn pod(p: &K8sPod) -> (Option<PodInfo>, Vec<(SourceErrorReason, String)>) {
    let (info, problems, _) = pod_and_policy(p);
    (info, problems)
}

/// [`pod`], and the problem with its inbound-policy annotation if any (its
/// owner gets a Warning Event about it).
pub(super) fn pod_and_policy(
    p: &K8sPod,
) -> (
    Option<PodInfo>,
    Vec<(SourceErrorReason, String)>,
    Option<String>,
) {
    let mut problems = Vec::new();
    // Every object the API server sends has a UID; skip one that does not.
    let Some(uid) = p.metadata.uid.as_deref() else {
        return (None, problems, None);
    };
    let uid = match PodUid::new(uid) {
        Ok(uid) => uid,
        Err(problem) => {
            problems.push((SourceErrorReason::InvalidPod, problem));
            return (None, problems, None);
        }
    };
    let labels = p.metadata.labels.clone().unwrap_or_default();
    let mesh_label = MeshLabel::parse(&labels).unwrap_or_else(|problem| {
        problems.push((SourceErrorReason::InvalidLabel, problem));
        None
    });
    let opaque = opaque_ports(p.metadata.annotations.as_ref()).unwrap_or_else(|problem| {
        problems.push((SourceErrorReason::InvalidAnnotation, problem));
        PortSet::default()
    });
    let annotations = p.metadata.annotations.as_ref();
    let skip_inbound_ports = skip_ports(annotations).unwrap_or_else(|problem| {
        problems.push((SourceErrorReason::InvalidAnnotation, problem));
        Vec::new()
    });
    let (policy, policy_problem) = inbound_policy(annotations);
    let limits = limits(annotations, &mut problems);
    if let Some(problem) = &policy_problem {
        problems.push((SourceErrorReason::InvalidAnnotation, problem.clone()));
    }
    let (workload, owner_problem) = workload(p);
    if let Some(problem) = owner_problem {
        problems.push((SourceErrorReason::UnknownOwner, problem));
    }
    let status = p.status.as_ref();
    let spec = p.spec.as_ref();
    // The primary address first, then the others (`podIPs` / `hostIPs`,
    // which older API servers leave out).
    let addresses = |primary: Option<&String>, all: Vec<&String>| {
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in primary.into_iter().chain(all) {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        ips
    };
    let info = PodInfo {
        uid,
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        ips: addresses(
            status.and_then(|s| s.pod_ip.as_ref()),
            status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().map(|p| &p.ip).collect())
                .unwrap_or_default(),
        ),
        node: spec.and_then(|s| s.node_name.clone()),
        host_ips: addresses(
            status.and_then(|s| s.host_ip.as_ref()),
            status
                .and_then(|s| s.host_ips.as_ref())
                .map(|ips| ips.iter().map(|h| &h.ip).collect())
                .unwrap_or_default(),
        ),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        workload,
        cgroup: CgroupRef::Kubelet {
            qos: status
                .and_then(|s| s.qos_class.as_deref())
                .and_then(QosClass::parse),
        },
        netns: None,
        container_ids: status.map(container_ids).unwrap_or_default(),
        mesh_label,
        opaque_ports: opaque,
        skip_inbound_ports,
        inbound_policy: policy,
        limits,
        probe_ports: probe_ports(spec),
        labels,
        terminal: matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
        deletion: p
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0)),
    };
    (Some(info), problems, policy_problem)
}

/// A node's addresses (`status.addresses`: internal and external IPs).
/// A Node's `topology.kubernetes.io/zone`.
pub(super) fn node_zone(n: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    n.metadata
        .labels
        .as_ref()?
        .get(endpoints::ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

pub(super) fn node_addresses(n: &k8s_openapi::api::core::v1::Node) -> Vec<IpAddr> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect()
}

/// The runtime ids of a pod's containers (init, app, ephemeral), without
/// their `containerd://` scheme.
fn container_ids(status: &k8s_openapi::api::core::v1::PodStatus) -> Vec<String> {
    [
        &status.init_container_statuses,
        &status.container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|c| c.container_id.as_deref())
    .map(|id| id.split_once("://").map_or(id, |(_, id)| id).to_owned())
    .filter(|id| !id.is_empty())
    .collect()
}

/// A namespace's name and what the state keeps of it, with a problem with
/// its label or annotations if any, and the one with its inbound-policy
/// annotation (for a Warning Event).
pub(super) fn namespace(ns: &K8sNamespace) -> (String, Namespace, Option<String>, Option<String>) {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    let (mesh_label, mut problem) = match MeshLabel::parse(&labels) {
        Ok(l) => (l, None),
        Err(problem) => (None, Some(problem)),
    };
    let opaque_ports = opaque_ports(ns.metadata.annotations.as_ref()).unwrap_or_else(|p| {
        problem = Some(p);
        PortSet::default()
    });
    let (inbound_policy, policy_problem) = inbound_policy(ns.metadata.annotations.as_ref());
    if let Some(p) = &policy_problem {
        problem = Some(p.clone());
    }
    (
        name,
        Namespace {
            mesh_label,
            opaque_ports,
            inbound_policy,
        },
        problem,
        policy_problem,
    )
}

/// An `AuthorizationPolicy` as the agents enforce it, and why it is not
/// valid if it is not (the same check the identity service reports in its
/// status). An invalid one that clearly selects pods and ports admits
/// nobody there (`Policy::fail_closed`).
pub(super) fn policy(o: &DynamicObject) -> Option<(Option<Policy>, Option<String>)> {
    let key = meta_key(&o.metadata)?;
    let spec = o.data.get("spec").cloned().unwrap_or_default();
    Some(match serde_json::from_value::<PolicySpec>(spec) {
        Err(e) => (None, Some(format!("spec: {e}"))),
        Ok(spec) => match Policy::new(&key.namespace, &key.name, &spec) {
            Ok(p) => (Some(p), None),
            Err(why) => (
                Policy::fail_closed(&key.namespace, &key.name, &spec),
                Some(why),
            ),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn pod_owned_by(kind: &str, name: &str, hash: Option<&str>) -> K8sPod {
        let mut p = K8sPod::default();
        p.metadata.name = Some("p-1".into());
        p.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "x".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
        if let Some(h) = hash {
            p.metadata.labels = Some(BTreeMap::from([("pod-template-hash".into(), h.into())]));
        }
        p
    }

    #[test]
    fn a_mistyped_inbound_policy_means_deny_and_says_so() {
        let annotated =
            |v: &str| BTreeMap::from([(INBOUND_POLICY_ANNOTATION.to_owned(), v.to_owned())]);
        for typo in ["Deny", "all_authenticated", "", "allow"] {
            let (policy, problem) = inbound_policy(Some(&annotated(typo)));
            assert_eq!(policy, Some(InboundPolicy::Deny), "{typo:?}");
            assert!(
                problem
                    .as_deref()
                    .is_some_and(|p| p.contains("deny applies")),
                "{problem:?}"
            );
        }
        assert_eq!(
            inbound_policy(Some(&annotated("all-authenticated"))),
            (Some(InboundPolicy::AllAuthenticated), None)
        );
        assert_eq!(inbound_policy(None), (None, None));
        // On a pod and on a namespace alike.
        let mut p = pod_owned_by("ReplicaSet", "web-7d4b9c", Some("7d4b9c"));
        p.metadata.uid = Some("u-1".into());
        p.metadata.annotations = Some(annotated("Deny"));
        let (info, problems, policy_problem) = pod_and_policy(&p);
        assert_eq!(
            info.expect("kept").inbound_policy,
            Some(InboundPolicy::Deny)
        );
        assert!(policy_problem.is_some());
        assert!(
            problems
                .iter()
                .any(|(r, _)| *r == SourceErrorReason::InvalidAnnotation)
        );
        let mut ns = K8sNamespace::default();
        ns.metadata.name = Some("shop".into());
        ns.metadata.annotations = Some(annotated("all_authenticated"));
        let (_, namespace, problem, policy_problem) = namespace(&ns);
        assert_eq!(namespace.inbound_policy, Some(InboundPolicy::Deny));
        assert!(problem.is_some() && policy_problem.is_some());
    }

    #[test]
    fn limit_annotations_are_read_and_bad_ones_reported_and_ignored() {
        let mut p = pod_owned_by("ReplicaSet", "web-7d4b9c", Some("7d4b9c"));
        p.metadata.uid = Some("u-1".into());
        p.metadata.annotations = Some(BTreeMap::from([
            (MAX_CONNECTIONS_ANNOTATION.to_owned(), "5000".to_owned()),
            (MAX_REQUESTS_ANNOTATION.to_owned(), "0".to_owned()),
            (IDLE_TIMEOUT_ANNOTATION.to_owned(), "30m".to_owned()),
        ]));
        let (info, problems, _) = pod_and_policy(&p);
        let limits = info.expect("kept").limits;
        assert_eq!(limits.max_connections, Some(5000));
        assert_eq!(limits.max_requests, None, "0 is not a limit");
        assert_eq!(
            limits.idle_timeout,
            Some(std::time::Duration::from_secs(1800))
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].1.contains(MAX_REQUESTS_ANNOTATION));
        for bad in ["-1", "1048577", "lots", ""] {
            p.metadata.annotations = Some(BTreeMap::from([(
                MAX_CONNECTIONS_ANNOTATION.to_owned(),
                bad.to_owned(),
            )]));
            let (info, problems, _) = pod_and_policy(&p);
            assert_eq!(info.unwrap().limits.max_connections, None, "{bad:?}");
            assert_eq!(problems.len(), 1, "{bad:?}");
        }
    }

    #[test]
    fn another_nodes_pod_keeps_only_what_routing_and_identity_need() {
        let mut p = pod_owned_by("ReplicaSet", "web-7d4b9c", Some("7d4b9c"));
        p.metadata.uid = Some("u-1".into());
        let mut big: BTreeMap<String, String> = (0..999)
            .map(|i| (format!("tenant.example/label-{i}"), "x".repeat(63)))
            .collect();
        big.insert("pod-template-hash".into(), "7d4b9c".into());
        p.metadata.labels = Some(big);
        p.metadata.annotations = Some(BTreeMap::from([(
            OPAQUE_PORTS_ANNOTATION.to_owned(),
            "3306".to_owned(),
        )]));
        let (info, _, _) = pod_and_policy(&p);
        let mut info = info.unwrap();
        assert_eq!(info.labels.len(), 1000);
        keep_remote(&mut info);
        assert!(info.labels.is_empty());
        assert!(info.opaque_ports.contains(3306), "routing still needs it");
        assert_eq!(info.workload.name, "web");
    }

    #[test]
    fn workloads_from_owners() {
        let w = |p: &K8sPod| workload(p).0;
        assert_eq!(
            w(&pod_owned_by("ReplicaSet", "web-7d4b9c", Some("7d4b9c"))),
            Workload {
                kind: "deployment".into(),
                name: "web".into()
            }
        );
        assert_eq!(
            w(&pod_owned_by("ReplicaSet", "standalone", None)),
            Workload {
                kind: "replicaset".into(),
                name: "standalone".into()
            }
        );
        for kind in ["StatefulSet", "DaemonSet", "Job"] {
            let got = w(&pod_owned_by(kind, "x", None));
            assert_eq!(got.kind, kind.to_ascii_lowercase());
            assert_eq!(got.name, "x");
        }
        assert_eq!(w(&K8sPod::default()).kind, "pod");
        let (odd, problem) = workload(&pod_owned_by("Rollout", "canary", None));
        assert_eq!(
            odd,
            Workload {
                kind: "rollout".into(),
                name: "canary".into()
            }
        );
        assert!(problem.unwrap().contains("Rollout/canary"));
    }

    #[test]
    fn pods_keep_what_routing_and_capture_need() {
        let p: K8sPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                         "labels": {"nodemesh.io/mesh": "yes"},
                         "deletionTimestamp": "2030-01-01T00:00:00Z"},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web", "hostNetwork": true,
                     "containers": []},
            "status": {"phase": "Succeeded", "podIP": "10.1.0.2", "hostIP": "192.168.0.1",
                       "podIPs": [{"ip": "10.1.0.2"}, {"ip": "fd00:1::2"}],
                       "hostIPs": [{"ip": "192.168.0.1"}, {"ip": "fd00:ff::1"}],
                       "qosClass": "Burstable"}
        }))
        .unwrap();
        let (info, problems) = pod(&p);
        let info = info.expect("kept");
        assert_eq!(info.node.as_deref(), Some("node-1"));
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(info.ips, ips(&["10.1.0.2", "fd00:1::2"]));
        assert_eq!(info.host_ips, ips(&["192.168.0.1", "fd00:ff::1"]));
        assert!(info.host_network && info.terminal);
        assert_eq!(info.service_account, "web");
        assert_eq!(info.mesh_label, None, "a malformed label meshes nothing");
        assert_eq!(
            info.cgroup,
            CgroupRef::Kubelet {
                qos: Some(QosClass::Burstable)
            }
        );
        let gone_by = info.deletion.expect("being deleted");
        assert!(gone_by > SystemTime::now());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, SourceErrorReason::InvalidLabel);

        let mut bad = p.clone();
        bad.metadata.uid = Some("../x".into());
        let (none, problems) = pod(&bad);
        assert!(none.is_none());
        assert_eq!(problems[0].0, SourceErrorReason::InvalidPod);
    }
}
