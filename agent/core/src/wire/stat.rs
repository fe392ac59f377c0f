//! `GET /v1/stat`: golden metrics over sliding windows, mergeable across
//! agents.
use serde::{Deserialize, Serialize};

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
