//! What nodemesh's processes say to each other over HTTP, as JSON: the
//! identity service's certify API, and the agent's admin views. Types only:
//! whoever serves or reads them does so with its own client and server.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `POST /v1/certify` on the identity service: the body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyRequest {
    pub namespace: String,
    pub service_account: String,
    /// PEM.
    pub csr: String,
}

/// The body of a successful certify answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyResponse {
    /// PEM: the workload certificate.
    pub certificate: String,
    /// PEM: the issuer (and intermediates) to present after it.
    pub chain: String,
    /// Unix seconds.
    pub not_after: u64,
}

/// The body of a refused certify request (or of any identity service
/// error).
#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyError {
    /// The reason, as in `nodemesh_identity_certify_total{result}`.
    pub error: String,
    pub message: String,
}

/// `GET /v1/services` on an agent's admin server: one Service VIP:port and
/// its endpoints as the agent sees them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub addr: SocketAddr,
    pub port_name: Option<String>,
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint of a [`ServiceView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>` of the pod behind it.
    pub identity: Option<String>,
    /// The pod is meshed (its own label, or its namespace's).
    pub meshed: bool,
}

/// The windows `GET /v1/stat?window=…` answers for: name and seconds.
pub const STAT_WINDOWS: [(&str, u64); 3] = [("10s", 10), ("1m", 60), ("10m", 600)];

/// Latency bucket upper bounds, milliseconds, shared by every agent and
/// the CLI: histograms of any agents add up bucket by bucket (merged
/// exactly; percentiles are never averaged). One more bucket counts what
/// is above the last bound.
pub const LATENCY_BOUNDS_MS: [f64; 20] = [
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0,
    1000.0, 2500.0, 5000.0, 10000.0,
];

/// A workload (or, for peers, whatever is known of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadRef {
    pub namespace: String,
    /// `deployment`, `statefulset`, `daemonset`, `job`, `pod`…; empty when
    /// unknown (a peer outside the mesh).
    pub kind: String,
    pub name: String,
    /// Its pods' service account (their identity), when known.
    #[serde(default)]
    pub serviceaccount: String,
}

/// What one row of a stat is about: a workload, one direction, one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StatKey {
    /// `inbound` (the workload served) or `outbound` (it called).
    pub direction: String,
    pub workload: WorkloadRef,
    /// Outbound: the destination workload; inbound: empty.
    pub peer: WorkloadRef,
    /// Inbound: the client's SPIFFE ID (empty: not authenticated);
    /// outbound: empty.
    pub peer_identity: String,
}

/// Requests in a window, mergeable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Golden {
    pub requests: u64,
    pub successes: u64,
    /// Requests over mutual TLS.
    pub tls: u64,
    /// Counts per bucket of [`LATENCY_BOUNDS_MS`] (one more: above).
    pub latency: Vec<u64>,
}

impl Golden {
    /// One request.
    pub fn record(&mut self, success: bool, tls: bool, latency_ms: f64) {
        if self.latency.len() != LATENCY_BOUNDS_MS.len() + 1 {
            self.latency.resize(LATENCY_BOUNDS_MS.len() + 1, 0);
        }
        self.requests += 1;
        self.successes += u64::from(success);
        self.tls += u64::from(tls);
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| latency_ms <= *b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency[bucket] += 1;
    }

    /// One request whose latency is not known (the proxy answered it, no
    /// response came): counted, not in the histogram.
    pub fn record_unmeasured(&mut self, success: bool, tls: bool) {
        self.requests += 1;
        self.successes += u64::from(success);
        self.tls += u64::from(tls);
    }

    /// Adds `other` (another window slot, another agent).
    pub fn merge(&mut self, other: &Golden) {
        self.requests += other.requests;
        self.successes += other.successes;
        self.tls += other.tls;
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }

    /// The `q` quantile (0–1) of latency, ms: the upper bound of the
    /// bucket it falls in (`None` without requests; the last bound for
    /// what is above it).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(
                    LATENCY_BOUNDS_MS
                        .get(i)
                        .copied()
                        .unwrap_or(LATENCY_BOUNDS_MS[LATENCY_BOUNDS_MS.len() - 1]),
                );
            }
        }
        None
    }
}

/// TCP connections of a workload in one direction (all peers), mergeable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpStat {
    /// Open now.
    pub open: u64,
    /// Opened in the window.
    pub opened: u64,
    /// Bytes the workload's pods sent, and received, in the window.
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

impl TcpStat {
    pub fn merge(&mut self, other: &TcpStat) {
        self.open += other.open;
        self.opened += other.opened;
        self.sent_bytes += other.sent_bytes;
        self.received_bytes += other.received_bytes;
    }
}

/// One row of `GET /v1/stat`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRow {
    pub key: StatKey,
    pub golden: Golden,
}

/// TCP of one workload and direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRow {
    pub direction: String,
    pub workload: WorkloadRef,
    /// The pods of it on this node (meshed, served by this agent).
    pub pods: u64,
    pub tcp: TcpStat,
}

/// `GET /v1/stat?window=10s|1m|10m` on an agent: what it saw in the window
/// (memory bounded: see the agent's docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatReport {
    pub node: String,
    pub window_secs: u64,
    /// [`LATENCY_BOUNDS_MS`], so a reader can check it merges like with
    /// like.
    pub latency_bounds_ms: Vec<f64>,
    pub requests: Vec<StatRow>,
    pub tcp: Vec<TcpRow>,
}

impl StatReport {
    /// Only the rows of workloads in `namespace` (what a user allowed to
    /// read that namespace sees: its workloads, and whom they talk to).
    pub fn only_namespace(&mut self, namespace: &str) {
        self.requests
            .retain(|r| r.key.workload.namespace == namespace);
        self.tcp.retain(|r| r.workload.namespace == namespace);
    }

    /// Several agents' reports as one: rows with the same key added up
    /// (histograms bucket by bucket), sorted by key.
    pub fn merge(reports: &[StatReport]) -> StatReport {
        use std::collections::BTreeMap;
        let mut requests: BTreeMap<StatKey, Golden> = BTreeMap::new();
        let mut tcp: BTreeMap<(String, WorkloadRef), (u64, TcpStat)> = BTreeMap::new();
        for r in reports {
            for row in &r.requests {
                requests
                    .entry(row.key.clone())
                    .or_default()
                    .merge(&row.golden);
            }
            for row in &r.tcp {
                let e = tcp
                    .entry((row.direction.clone(), row.workload.clone()))
                    .or_default();
                e.0 += row.pods;
                e.1.merge(&row.tcp);
            }
        }
        StatReport {
            node: reports
                .iter()
                .map(|r| r.node.as_str())
                .collect::<Vec<_>>()
                .join(","),
            window_secs: reports.first().map_or(0, |r| r.window_secs),
            latency_bounds_ms: LATENCY_BOUNDS_MS.to_vec(),
            requests: requests
                .into_iter()
                .map(|(key, golden)| StatRow { key, golden })
                .collect(),
            tcp: tcp
                .into_iter()
                .map(|((direction, workload), (pods, tcp))| TcpRow {
                    direction,
                    workload,
                    pods,
                    tcp,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespaced_report_holds_only_that_namespaces_workloads() {
        let row = |ns: &str, peer_ns: &str| StatRow {
            key: StatKey {
                direction: "outbound".into(),
                workload: WorkloadRef {
                    namespace: ns.into(),
                    kind: "deployment".into(),
                    name: "web".into(),
                    serviceaccount: "web".into(),
                },
                peer: WorkloadRef {
                    namespace: peer_ns.into(),
                    ..WorkloadRef::default()
                },
                peer_identity: String::new(),
            },
            golden: Golden::default(),
        };
        let tcp = |ns: &str| TcpRow {
            workload: WorkloadRef {
                namespace: ns.into(),
                ..WorkloadRef::default()
            },
            ..TcpRow::default()
        };
        let mut report = StatReport {
            requests: vec![row("shop", "payments"), row("payments", "shop")],
            tcp: vec![tcp("shop"), tcp("payments")],
            ..StatReport::default()
        };
        report.only_namespace("shop");
        assert_eq!(report.requests, vec![row("shop", "payments")]);
        assert_eq!(report.tcp.len(), 1);
        assert_eq!(report.tcp[0].workload.namespace, "shop");
    }

    #[test]
    fn histograms_merge_exactly_and_percentiles_come_from_the_merge() {
        let mut a = Golden::default();
        for _ in 0..90 {
            a.record(true, true, 0.8);
        }
        let mut b = Golden::default();
        for _ in 0..10 {
            b.record(false, false, 40.0);
        }
        let key = StatKey {
            direction: "outbound".into(),
            ..StatKey::default()
        };
        let report = |node: &str, golden: &Golden| StatReport {
            node: node.into(),
            window_secs: 10,
            latency_bounds_ms: LATENCY_BOUNDS_MS.to_vec(),
            requests: vec![StatRow {
                key: key.clone(),
                golden: golden.clone(),
            }],
            tcp: Vec::new(),
        };
        let merged = StatReport::merge(&[report("a", &a), report("b", &b)]);
        assert_eq!(merged.node, "a,b");
        let g = &merged.requests[0].golden;
        assert_eq!((g.requests, g.successes, g.tls), (100, 90, 90));
        // 90 in (0.5, 1] ms, 10 in (25, 50] ms: p50 and p90 are 1 ms, p95
        // and p99 50 ms — not an average of the two agents' percentiles.
        assert_eq!(g.quantile_ms(0.5), Some(1.0));
        assert_eq!(g.quantile_ms(0.9), Some(1.0));
        assert_eq!(g.quantile_ms(0.95), Some(50.0));
        assert_eq!(g.quantile_ms(0.99), Some(50.0));
        assert_eq!(Golden::default().quantile_ms(0.5), None);
        let mut slow = Golden::default();
        slow.record(true, false, 60_000.0);
        assert_eq!(slow.quantile_ms(0.5), Some(10000.0), "above the last bound");
    }
}

/// Splits a tap's NDJSON stream, as its bytes come, into events; a line
/// over 1 MiB means the stream is not a tap.
#[derive(Debug, Default)]
pub struct TapLines(Vec<u8>);

impl TapLines {
    /// The events `data` completes.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<TapEvent>, String> {
        self.0.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(at) = self.0.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=at).collect();
            out.push(serde_json::from_slice(&line).map_err(|e| format!("bad event: {e}"))?);
        }
        if self.0.len() > 1 << 20 {
            return Err("an event over 1 MiB".into());
        }
        Ok(out)
    }
}

/// One agent's part of `GET /apis/tap.nodemesh.io/v1alpha1/stat`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStat {
    pub node: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<StatReport>,
    /// Why there is no report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /apis/tap.nodemesh.io/v1alpha1/stat?window=…`: every agent's
/// report as it answered (merging is the reader's: it knows whether a
/// partial picture will do).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatList {
    pub kind: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub agents: Vec<AgentStat>,
}

/// A certificate an agent should hold: a meshed service account's on its
/// node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    pub identity: String,
    /// When the one held expires (Unix seconds); `None`: none held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// `GET /v1/node` on an agent: what `nodemesh check` asks of each node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub version: String,
    /// `uname -r`.
    pub kernel: String,
    /// The kernel's BTF (`/sys/kernel/btf/vmlinux`) is there.
    pub btf: bool,
    /// The cgroup v2 hierarchy the agent attaches to.
    pub cgroup_root: String,
    /// Where its eBPF state is pinned.
    pub bpffs: String,
    /// eBPF programs attached and the node's pods read (`/ready`).
    pub ready: bool,
    /// Pods whose connections it captures now.
    pub meshed_pods: u64,
    pub certificates: Vec<CertView>,
}

/// One agent's part of `GET /apis/tap.nodemesh.io/v1alpha1/agents`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentNode {
    pub node: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<NodeReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /apis/tap.nodemesh.io/v1alpha1/agents`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentList {
    pub kind: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub agents: Vec<AgentNode>,
}

/// One end of a tapped request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapPeer {
    pub namespace: String,
    /// `kind/name` of its workload, when known.
    pub workload: String,
    pub pod: String,
    /// Its SPIFFE ID, when authenticated or meshed.
    pub identity: String,
}

/// One line of `GET /v1/tap` (NDJSON): a request's start (`req`), its
/// response's head (`rsp`), its end (`end`) — or `dropped` (this reader
/// fell behind and missed `count` events). Never header values or bodies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapEvent {
    pub kind: String,
    /// Ties a request's events together (per agent).
    pub id: u64,
    /// `outbound` (seen by the client's proxy) or `inbound` (the server's).
    pub direction: String,
    pub src: TapPeer,
    pub dst: TapPeer,
    pub tls: bool,
    pub method: String,
    pub authority: String,
    /// Without the query string.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// `rsp`: from the request to the response's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// `end`: from the request to the response's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    /// `dropped`: how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The node whose agent saw it (set by the API, which merges agents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// `error`: an agent's stream could not be had or ended (the others
    /// go on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What a tap reader wants (`/v1/tap?namespace=…&workload=…`): every field
/// set must match; `max_rps` samples requests (their three events go
/// together).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapFilter {
    /// Of either end.
    pub namespace: Option<String>,
    /// The name of either end's workload.
    pub workload: Option<String>,
    pub pod: Option<String>,
    /// The other end's workload name (`--to`).
    pub to: Option<String>,
    pub direction: Option<String>,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub authority: Option<String>,
    pub max_rps: Option<u32>,
}

impl TapFilter {
    /// From a query string (unknown keys are an error).
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut f = TapFilter::default();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            // A query string: `+` is a space, then `%XX` escapes.
            let v = percent_decode(&v.replace('+', " "));
            match k {
                "namespace" => f.namespace = Some(v),
                "workload" => f.workload = Some(v),
                "pod" => f.pod = Some(v),
                "to" => f.to = Some(v),
                "direction" => f.direction = Some(v),
                "method" => f.method = Some(v),
                "path" => f.path_prefix = Some(v),
                "authority" => f.authority = Some(v),
                "max_rps" => {
                    f.max_rps = Some(v.parse().map_err(|_| format!("max_rps={v}: a number"))?)
                }
                other => return Err(format!("unknown filter {other:?}")),
            }
        }
        Ok(f)
    }

    /// As a query string.
    pub fn query(&self) -> String {
        let mut q = Vec::new();
        let mut add = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                q.push(format!("{k}={}", percent_encode(v)));
            }
        };
        add("namespace", &self.namespace);
        add("workload", &self.workload);
        add("pod", &self.pod);
        add("to", &self.to);
        add("direction", &self.direction);
        add("method", &self.method);
        add("path", &self.path_prefix);
        add("authority", &self.authority);
        if let Some(n) = self.max_rps {
            q.push(format!("max_rps={n}"));
        }
        q.join("&")
    }

    /// Whether a request (its `req` event) is wanted.
    pub fn matches(&self, e: &TapEvent) -> bool {
        let name = |w: &str| w.rsplit('/').next().unwrap_or_default().to_owned();
        let either = |want: &Option<String>, a: &str, b: &str| {
            want.as_ref().is_none_or(|w| w == a || w == b)
        };
        let (src_w, dst_w) = (name(&e.src.workload), name(&e.dst.workload));
        // The selected end: the one whose workload is asked for (else
        // either); `to` is then the other one.
        let to_ok = self.to.as_ref().is_none_or(|to| match &self.workload {
            Some(w) if *w == src_w => *to == dst_w,
            Some(w) if *w == dst_w => *to == src_w,
            _ => *to == dst_w || *to == src_w,
        });
        either(&self.namespace, &e.src.namespace, &e.dst.namespace)
            && either(&self.workload, &src_w, &dst_w)
            && either(&self.pod, &e.src.pod, &e.dst.pod)
            && to_ok
            && self.direction.as_ref().is_none_or(|d| *d == e.direction)
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.eq_ignore_ascii_case(&e.method))
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| e.path.starts_with(p.as_str()))
            && self.authority.as_ref().is_none_or(|a| *a == e.authority)
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `%XX` escapes decoded (others left as they are); invalid UTF-8 is
/// replaced.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tap_tests {
    use super::*;

    #[test]
    fn filters_travel_as_a_query_and_match_requests() {
        let f = TapFilter {
            namespace: Some("shop".into()),
            workload: Some("web".into()),
            to: Some("api".into()),
            path_prefix: Some("/a b".into()),
            max_rps: Some(5),
            ..TapFilter::default()
        };
        let q = f.query();
        assert_eq!(TapFilter::parse(&q).unwrap(), f, "{q}");
        assert!(TapFilter::parse("color=red").is_err());
        // Whatever the network sends decodes without a panic.
        assert_eq!(
            TapFilter::parse("path=%a\u{e9}%zz%41")
                .unwrap()
                .path_prefix
                .as_deref(),
            Some("%a\u{e9}%zzA")
        );
        assert_eq!(
            percent_decode("a%2fb%2F%+1+"),
            "a/b/%+1+",
            "no sign, no form space"
        );
        let mut lines = TapLines::default();
        let line = serde_json::to_string(&TapEvent::default()).unwrap();
        assert!(lines.push(&line.as_bytes()[..5]).unwrap().is_empty());
        let rest = format!("{}\n{line}\n", &line[5..]);
        assert_eq!(lines.push(rest.as_bytes()).unwrap().len(), 2);
        assert!(lines.push(&vec![b'x'; (1 << 20) + 1]).is_err());
        let e = TapEvent {
            kind: "req".into(),
            direction: "outbound".into(),
            src: TapPeer {
                namespace: "shop".into(),
                workload: "deployment/web".into(),
                ..TapPeer::default()
            },
            dst: TapPeer {
                namespace: "shop".into(),
                workload: "deployment/api".into(),
                ..TapPeer::default()
            },
            method: "GET".into(),
            path: "/a b/c".into(),
            ..TapEvent::default()
        };
        assert!(f.matches(&e));
        let other_path = TapEvent {
            path: "/b".into(),
            ..e.clone()
        };
        assert!(!f.matches(&other_path));
        let to_db = TapFilter {
            to: Some("db".into()),
            ..f.clone()
        };
        assert!(!to_db.matches(&e));
    }
}
