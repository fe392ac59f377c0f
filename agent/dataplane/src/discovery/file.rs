//! A pod source that reads a YAML file and notices when it changes.
//!
//! ```yaml
//! pods:
//!   - namespace: demo
//!     name: web-0
//!     uid: 3f0c6f0e-7d8b-4c1e-9a55-0d6f5c1b2a10
//!     ip: 10.42.0.2                # or ips: [10.42.0.2, fd00:42::2]
//!     serviceAccount: web          # default: "default"
//!     labels: {nodemesh.io/mesh: enabled}
//!     cgroup: kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f0c6f0e_7d8b_4c1e_9a55_0d6f5c1b2a10.slice
//!     netns: /run/netns/web-0     # optional: else a process in the cgroup tells
//!     workload: {kind: statefulset, name: web}   # optional: default the pod itself
//! ```
//!
//! The file is polled (cheap, and immune to editors that replace files by
//! renaming). A file that does not parse leaves the last good pods in
//! place; an invalid entry is skipped and the others still apply. Each
//! problem is logged and counted once, when it first appears.
use std::{
    collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use nodemesh_core::names::{InboundPolicy, MeshLabel, PodUid, PortSet, parse_limit};

use super::{SourceErrorReason, SourceMetrics};
use crate::{
    cgroup::QosClass,
    state::{CgroupRef, PodInfo, PodLimits, StateStore, Workload},
};

/// The pod file's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodFile {
    #[serde(default)]
    pods: Vec<serde_norway::Value>,
}

/// One entry of `pods:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodEntry {
    namespace: String,
    name: String,
    uid: String,
    #[serde(default)]
    ip: Option<String>,
    /// Dual-stack: at most one address per family (`ip` is the first).
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default = "default_service_account")]
    service_account: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Relative to the cgroup root; when absent, found the way kubelet lays
    /// out pod cgroups (from the uid and `qosClass`).
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default)]
    qos_class: Option<String>,
    #[serde(default)]
    netns: Option<PathBuf>,
    /// What runs the pod (default: the pod itself).
    #[serde(default)]
    workload: Option<WorkloadEntry>,
    /// Who may connect to it (default: the agent's).
    #[serde(default)]
    inbound_policy: Option<String>,
    /// Its probes' ports (reached from the node whatever the policy).
    #[serde(default)]
    probe_ports: Vec<u16>,
    /// Ports not captured inbound.
    #[serde(default)]
    skip_inbound_ports: Vec<u16>,
    /// Its own limits (else its fair share of the node's).
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_requests: Option<usize>,
    /// How long its opaque connections may stay silent (`30m`).
    #[serde(default)]
    idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadEntry {
    kind: String,
    name: String,
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// What one version of the file yields: the pods, and what was wrong.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Every pod of the file, in file order, all on `node`.
    pub pods: Vec<PodInfo>,
    /// Problems with single entries or labels (the rest still applies).
    pub problems: Vec<(SourceErrorReason, String)>,
}

/// Parses the file's text: the pods of `node`. `Err` means the file as a
/// whole is unusable.
pub fn parse(text: &str, node: &str) -> Result<Parsed, String> {
    if text.trim().is_empty() {
        // An emptied file means "no pods", not "malformed".
        return Ok(Parsed::default());
    }
    let file: PodFile = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let mut parsed = Parsed::default();
    let mut seen = BTreeSet::new();
    for (i, value) in file.pods.into_iter().enumerate() {
        let entry: PodEntry = match serde_norway::from_value(value) {
            Ok(entry) => entry,
            Err(e) => {
                parsed
                    .problems
                    .push((SourceErrorReason::InvalidPod, format!("pods[{i}]: {e}")));
                continue;
            }
        };
        let where_ = format!("pods[{i}] ({}/{})", entry.namespace, entry.name);
        match pod_from_entry(entry, node) {
            Ok((pod, label_problem)) => {
                if let Some(problem) = label_problem {
                    parsed.problems.push((
                        SourceErrorReason::InvalidLabel,
                        format!("{where_}: {problem}"),
                    ));
                }
                if !seen.insert(pod.uid.clone()) {
                    parsed.problems.push((
                        SourceErrorReason::InvalidPod,
                        format!(
                            "{where_}: uid {} appears twice; later entry skipped",
                            pod.uid
                        ),
                    ));
                    continue;
                }
                parsed.pods.push(pod);
            }
            Err(problem) => parsed.problems.push((
                SourceErrorReason::InvalidPod,
                format!("{where_}: {problem}"),
            )),
        }
    }
    Ok(parsed)
}

fn pod_from_entry(e: PodEntry, node: &str) -> Result<(PodInfo, Option<String>), String> {
    let uid = PodUid::new(&e.uid)?;
    if e.namespace.is_empty() || e.name.is_empty() {
        return Err("namespace and name must not be empty".into());
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for s in e.ip.iter().chain(&e.ips) {
        let ip = s
            .parse::<IpAddr>()
            .map_err(|_| format!("ip {s:?} is not an IP address"))?;
        if ips.contains(&ip) {
            continue;
        }
        if ips.iter().any(|other| other.is_ipv6() == ip.is_ipv6()) {
            return Err(format!(
                "ips: more than one {} address (a pod has at most one per family)",
                if ip.is_ipv6() { "IPv6" } else { "IPv4" }
            ));
        }
        ips.push(ip);
    }
    let cgroup = match (e.cgroup, e.qos_class) {
        (Some(path), _) if path.as_os_str().is_empty() => {
            return Err("cgroup must not be empty".into());
        }
        (Some(path), _) => CgroupRef::Path(path),
        (None, None) => CgroupRef::Kubelet { qos: None },
        (None, Some(q)) => CgroupRef::Kubelet {
            qos: Some(QosClass::parse(&q).ok_or_else(|| {
                format!("qosClass {q:?} is not Guaranteed, Burstable or BestEffort")
            })?),
        },
    };
    for (what, n) in [
        ("maxConnections", e.max_connections),
        ("maxRequests", e.max_requests),
    ] {
        if let Some(n) = n {
            parse_limit(&n.to_string()).map_err(|p| format!("{what} {n}: {p}"))?;
        }
    }
    let idle_timeout: Option<Duration> = e
        .idle_timeout
        .as_deref()
        .map(|t| {
            nodemesh_core::config::parse_positive_duration(t)
                .map_err(|p| format!("idleTimeout {t:?}: {p}"))
        })
        .transpose()?;
    let (mesh_label, label_problem) = match MeshLabel::parse(&e.labels) {
        Ok(label) => (label, None),
        Err(problem) => (None, Some(problem)),
    };
    let inbound_policy = e
        .inbound_policy
        .as_deref()
        .map(InboundPolicy::parse)
        .transpose()
        .map_err(|e| format!("inboundPolicy: {e}"))?;
    let workload = match e.workload {
        Some(w) => Workload {
            kind: w.kind.to_ascii_lowercase(),
            name: w.name,
        },
        None => Workload {
            kind: "pod".into(),
            name: e.name.clone(),
        },
    };
    Ok((
        PodInfo {
            uid,
            namespace: e.namespace,
            name: e.name,
            ips,
            node: Some(node.to_owned()),
            host_ips: Vec::new(),
            host_network: false,
            service_account: e.service_account,
            workload,
            cgroup,
            netns: e.netns,
            container_ids: Vec::new(),
            mesh_label,
            opaque_ports: PortSet::default(),
            skip_inbound_ports: e.skip_inbound_ports,
            inbound_policy,
            limits: PodLimits {
                max_connections: e.max_connections,
                max_requests: e.max_requests,
                idle_timeout,
            },
            probe_ports: e.probe_ports,
            labels: e.labels,
            terminal: false,
            deletion: None,
        },
        label_problem,
    ))
}

/// Watches one pod file.
pub struct FileSource {
    pub path: PathBuf,
    pub interval: Duration,
    pub metrics: SourceMetrics,
    /// Where the pods go: the file is this node's whole truth.
    pub state: StateStore,
}

impl FileSource {
    /// Writes the file's pods into the state each time its content
    /// changes, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_content: Option<u64> = None;
        let mut last_read_error: Option<String> = None;
        loop {
            match tokio::fs::read(&self.path).await {
                Ok(bytes) => {
                    last_read_error = None;
                    let hash = {
                        let mut h = DefaultHasher::new();
                        bytes.hash(&mut h);
                        h.finish()
                    };
                    if last_content != Some(hash) {
                        last_content = Some(hash);
                        self.apply(&bytes);
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_read_error.as_deref() != Some(msg.as_str()) {
                        warn!(path = %self.path.display(), error = %msg, "cannot read the pod file; keeping the last pods read");
                        self.metrics.error(SourceErrorReason::Read);
                        last_read_error = Some(msg);
                        // Re-read and re-apply once it is back, even unchanged.
                        last_content = None;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn apply(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        match parse(&text, &self.state.node()) {
            Ok(parsed) => {
                for (reason, problem) in &parsed.problems {
                    warn!(path = %self.path.display(), %problem, "pod file entry skipped or partly ignored");
                    self.metrics.error(*reason);
                }
                info!(
                    path = %self.path.display(),
                    pods = parsed.pods.len(),
                    meshed = parsed.pods.iter().filter(|p| p.mesh_label == Some(MeshLabel::Enabled)).count(),
                    "pod file read"
                );
                // No namespaces here: a pod is meshed by its own label.
                self.state.update(|u| u.replace_namespaces(Vec::new()));
                self.state.replace_pods(parsed.pods);
            }
            Err(problem) => {
                error!(path = %self.path.display(), %problem, "pod file is malformed; keeping the last pods read");
                self.metrics.error(SourceErrorReason::Parse);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
pods:
  - namespace: demo
    name: client
    uid: uid-client
    ip: 10.1.0.2
    labels: {nodemesh.io/mesh: enabled, app: client}
    cgroup: kubepods/pod-client
    netns: /run/netns/client
  - namespace: demo
    name: server
    uid: uid-server
    serviceAccount: web
    cgroup: kubepods/pod-server
"#;

    #[test]
    fn reads_pods_and_their_opt_in() {
        let parsed = parse(GOOD, "node-1").expect("parses");
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        assert_eq!(parsed.pods.len(), 2);
        let by_uid = |uid: &str| {
            let uid = PodUid::new(uid).unwrap();
            parsed.pods.iter().find(|p| p.uid == uid).unwrap()
        };
        let client = by_uid("uid-client");
        assert_eq!(client.mesh_label, Some(MeshLabel::Enabled));
        assert_eq!(client.node.as_deref(), Some("node-1"));
        assert_eq!(client.ips, vec!["10.1.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(client.service_account, "default");
        assert_eq!(client.netns, Some(PathBuf::from("/run/netns/client")));
        let server = by_uid("uid-server");
        assert_eq!(server.mesh_label, None);
        assert_eq!(server.service_account, "web");
    }

    #[test]
    fn a_malformed_file_is_an_error() {
        assert!(parse("pods: [ {", "n").is_err());
        assert!(parse("pods: 3", "n").is_err());
        assert!(
            parse("podz: []", "n").is_err(),
            "unknown top-level keys are typos"
        );
    }

    #[test]
    fn an_empty_file_means_no_pods() {
        assert_eq!(parse("", "n").expect("parses").pods.len(), 0);
        assert_eq!(parse("{}", "n").expect("parses").pods.len(), 0);
        assert_eq!(parse("pods: []", "n").expect("parses").pods.len(), 0);
    }

    #[test]
    fn bad_entries_are_skipped_and_the_rest_applies() {
        let text = r#"
pods:
  - {namespace: a, name: ok, uid: u1, cgroup: c1, labels: {nodemesh.io/mesh: enabled}}
  - {namespace: a, name: kubelet-cgroup, uid: u2, qosClass: Burstable}
  - {namespace: a, name: bad-ip, uid: u3, ip: "10.1.1", cgroup: c3}
  - {namespace: a, name: dual, uid: u9, ips: [10.1.0.9, "fd00::9"], cgroup: c9}
  - {namespace: a, name: two-v4, uid: u10, ip: 10.1.0.10, ips: [10.1.0.11], cgroup: c10}
  - {namespace: a, name: bad-uid, uid: "../x", cgroup: c4}
  - {namespace: a, name: dup, uid: u1, cgroup: c5}
  - {namespace: a, name: typo, uid: u6, cgroop: c6}
  - {namespace: a, name: bad-qos, uid: u8, qosClass: Best}
  - {namespace: a, name: odd-label, uid: u7, cgroup: c7, labels: {nodemesh.io/mesh: "yes"}}
"#;
        let parsed = parse(text, "n").expect("parses");
        let names: Vec<_> = parsed.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["ok", "kubelet-cgroup", "dual", "odd-label"]);
        let reasons: Vec<_> = parsed.problems.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            reasons,
            [
                SourceErrorReason::InvalidPod,
                SourceErrorReason::InvalidPod,
                SourceErrorReason::InvalidPod,
                SourceErrorReason::InvalidPod,
                SourceErrorReason::InvalidPod,
                SourceErrorReason::InvalidPod,
                SourceErrorReason::InvalidLabel,
            ]
        );
        assert!(
            parsed.problems[0].1.contains("10.1.1"),
            "{:?}",
            parsed.problems
        );
        assert!(
            parsed.problems[1].1.contains("more than one IPv4"),
            "{:?}",
            parsed.problems
        );
        assert_eq!(parsed.pods[2].ips.len(), 2);
        assert!(
            parsed.problems[5].1.contains("qosClass"),
            "{:?}",
            parsed.problems
        );
        let kubelet = parsed
            .pods
            .iter()
            .find(|p| p.name == "kubelet-cgroup")
            .unwrap();
        assert_eq!(
            kubelet.cgroup,
            CgroupRef::Kubelet {
                qos: Some(QosClass::Burstable)
            }
        );
        let odd = parsed.pods.iter().find(|p| p.name == "odd-label").unwrap();
        assert_eq!(
            odd.mesh_label, None,
            "a malformed opt-in label does not mesh the pod"
        );
    }
}
