//! `nodemesh stat`: golden metrics per workload, merged from agents'
//! `/v1/stat` (histograms added bucket by bucket, so percentiles across
//! nodes are exact to the bucket, never averaged).
//!
//! It reads them through the API server (`nodemesh-viewer` lets a user), or
//! with `--agent` directly on a node.
use std::collections::BTreeMap;

use clap::{Args, ValueEnum};
use nodemesh_core::wire::{Golden, STAT_WINDOWS, StatReport, TcpStat};

use crate::agents::{Reach, Source};
use serde::Serialize;

/// What `stat` can be asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(alias = "deployment", alias = "deployments", alias = "deploy")]
    Deploy,
    #[value(alias = "statefulset", alias = "statefulsets")]
    Sts,
    #[value(alias = "daemonset", alias = "daemonsets")]
    Ds,
    #[value(alias = "jobs")]
    Job,
    #[value(alias = "pods", alias = "po")]
    Pod,
    #[value(alias = "namespace", alias = "namespaces")]
    Ns,
}

impl Resource {
    /// The workload kind the agents report (`None`: namespaces).
    fn kind(self) -> Option<&'static str> {
        match self {
            Resource::Deploy => Some("deployment"),
            Resource::Sts => Some("statefulset"),
            Resource::Ds => Some("daemonset"),
            Resource::Job => Some("job"),
            Resource::Pod => Some("pod"),
            Resource::Ns => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
}

/// `nodemesh stat`.
#[derive(Args, Debug)]
pub struct StatArgs {
    /// deploy, sts, ds, job, pod or ns.
    pub resource: Resource,
    /// One of them (default: all).
    pub name: Option<String>,
    /// The namespace (default: every namespace).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Every namespace (the default; as kubectl's -A).
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Only requests to workloads of this name (`deploy/web` or `web`):
    /// what the selected workloads sent there, as their clients saw it.
    #[arg(long, value_name = "RES")]
    pub to: Option<String>,
    /// Only requests from workloads of this name: what the selected
    /// workloads got from there, as those clients saw it.
    #[arg(long, value_name = "RES")]
    pub from: Option<String>,
    /// The window: 10s, 1m or 10m.
    #[arg(short = 't', long, default_value = "1m")]
    pub window: String,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    #[command(flatten)]
    pub reach: Reach,
}

#[derive(Debug, thiserror::Error)]
pub enum StatError {
    #[error("-t {0:?}: one of 10s, 1m, 10m")]
    Window(String),
    #[error("--from and --to together: choose one")]
    FromAndTo,
    #[error("agent {agent}: {message}")]
    Agent { agent: String, message: String },
    #[error("{0}")]
    Reach(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// One line of the answer.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct StatLine {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    /// Its pods the asked agents serve.
    pub meshed_pods: u64,
    pub requests: u64,
    pub successes: u64,
    /// `None` without requests (an opaque-only workload).
    pub success_rate: Option<f64>,
    pub rps: Option<f64>,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    /// Share of requests over mutual TLS.
    pub tls_share: Option<f64>,
    pub tcp_open: u64,
    pub tcp_opened: u64,
    pub read_bytes_per_sec: f64,
    pub write_bytes_per_sec: f64,
    pub window_secs: u64,
}

/// Runs `stat`: the text to print.
pub fn run(args: &StatArgs) -> Result<String, StatError> {
    if !STAT_WINDOWS.iter().any(|(w, _)| *w == args.window) {
        return Err(StatError::Window(args.window.clone()));
    }
    if args.from.is_some() && args.to.is_some() {
        return Err(StatError::FromAndTo);
    }
    let lines = lines(
        &merged(&args.reach, &args.window, args.namespace.as_deref())?,
        args,
    );
    Ok(render(&lines, args.output))
}

/// Every agent's report for `window`, merged (any that does not answer is
/// an error: a partial picture would pass for the whole).
pub(crate) fn merged(
    reach: &Reach,
    window: &str,
    namespace: Option<&str>,
) -> Result<StatReport, StatError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StatError::Runtime)?;
    let reports = runtime.block_on(async {
        let source = Source::new(reach).await.map_err(StatError::Reach)?;
        let mut out = Vec::new();
        for (agent, report) in source
            .stats(window, namespace)
            .await
            .map_err(StatError::Reach)?
        {
            out.push(report.map_err(|message| StatError::Agent { agent, message })?);
        }
        Ok::<_, StatError>(out)
    })?;
    Ok(StatReport::merge(&reports))
}

/// `deploy/web` or `web`: the name part.
fn name_of(res: &str) -> &str {
    res.rsplit('/').next().unwrap_or(res)
}

/// The report as lines for the asked resource.
pub fn lines(report: &StatReport, args: &StatArgs) -> Vec<StatLine> {
    let kind = args.resource.kind();
    // Which workload a row is about, if it is asked for: (ns, kind, name).
    let select = |ns: &str, k: &str, name: &str| -> Option<(String, String, String)> {
        if args.namespace.as_deref().is_some_and(|n| n != ns) {
            return None;
        }
        let key = match kind {
            Some(kind) if kind == k => (ns.to_owned(), k.to_owned(), name.to_owned()),
            Some(_) => return None,
            None => (String::new(), "namespace".to_owned(), ns.to_owned()),
        };
        if args.name.as_deref().is_some_and(|n| n != key.2) {
            return None;
        }
        Some(key)
    };
    let mut golden: BTreeMap<(String, String, String), Golden> = BTreeMap::new();
    for row in &report.requests {
        let k = &row.key;
        let selected = match (&args.from, &args.to) {
            // What the selected workloads sent to `to`.
            (None, Some(to)) if k.direction == "outbound" && k.peer.name == name_of(to) => {
                select(&k.workload.namespace, &k.workload.kind, &k.workload.name)
            }
            // What `from` sent to the selected workloads.
            (Some(from), None) if k.direction == "outbound" && k.workload.name == name_of(from) => {
                select(&k.peer.namespace, &k.peer.kind, &k.peer.name)
            }
            // What the selected workloads served.
            (None, None) if k.direction == "inbound" => {
                select(&k.workload.namespace, &k.workload.kind, &k.workload.name)
            }
            _ => None,
        };
        if let Some(key) = selected {
            golden.entry(key).or_default().merge(&row.golden);
        }
    }
    let mut tcp: BTreeMap<(String, String, String), (u64, TcpStat)> = BTreeMap::new();
    for row in &report.tcp {
        let direction = if args.to.is_some() {
            "outbound"
        } else {
            "inbound"
        };
        if row.direction != direction {
            continue;
        }
        if let Some(key) = select(
            &row.workload.namespace,
            &row.workload.kind,
            &row.workload.name,
        ) {
            let e = tcp.entry(key).or_default();
            e.0 += row.pods;
            e.1.merge(&row.tcp);
        }
    }
    let window = report.window_secs.max(1) as f64;
    let mut keys: Vec<_> = golden.keys().chain(tcp.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|key| {
            let g = golden.get(&key).cloned().unwrap_or_default();
            let (pods, t) = tcp.get(&key).cloned().unwrap_or_default();
            let with = |v: f64| (g.requests > 0).then_some(v);
            StatLine {
                namespace: key.0,
                kind: key.1,
                name: key.2,
                meshed_pods: pods,
                requests: g.requests,
                successes: g.successes,
                success_rate: with(g.successes as f64 / g.requests.max(1) as f64),
                rps: with(g.requests as f64 / window),
                latency_ms_p50: g.quantile_ms(0.5),
                latency_ms_p95: g.quantile_ms(0.95),
                latency_ms_p99: g.quantile_ms(0.99),
                tls_share: with(g.tls as f64 / g.requests.max(1) as f64),
                tcp_open: t.open,
                tcp_opened: t.opened,
                read_bytes_per_sec: t.received_bytes as f64 / window,
                write_bytes_per_sec: t.sent_bytes as f64 / window,
                window_secs: report.window_secs,
            }
        })
        .collect()
}

/// The lines as a table (or JSON).
pub fn render(lines: &[StatLine], output: Output) -> String {
    if output == Output::Json {
        return serde_json::to_string_pretty(lines).unwrap_or_default() + "\n";
    }
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0));
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v}ms"));
    let mut rows = vec![{
        let mut h = vec![
            "NAMESPACE",
            "NAME",
            "MESHED",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
            "TCP_CONN",
        ];
        if output == Output::Wide {
            h.extend(["READ_BYTES/SEC", "WRITE_BYTES/SEC", "TLS"]);
        }
        h.into_iter().map(str::to_owned).collect::<Vec<_>>()
    }];
    for l in lines {
        let mut r = vec![
            if l.namespace.is_empty() {
                "-".to_owned()
            } else {
                l.namespace.clone()
            },
            l.name.clone(),
            l.meshed_pods.to_string(),
            pct(l.success_rate),
            l.rps.map_or("-".to_owned(), |v| format!("{v:.1}rps")),
            ms(l.latency_ms_p50),
            ms(l.latency_ms_p95),
            ms(l.latency_ms_p99),
            l.tcp_open.to_string(),
        ];
        if output == Output::Wide {
            r.push(format!("{:.1}B/s", l.read_bytes_per_sec));
            r.push(format!("{:.1}B/s", l.write_bytes_per_sec));
            r.push(pct(l.tls_share));
        }
        rows.push(r);
    }
    crate::agents::table(&rows)
}

#[cfg(test)]
mod tests {
    use nodemesh_core::wire::{StatKey, StatRow, TcpRow, WorkloadRef};

    use super::*;

    fn w(name: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "shop".into(),
            kind: "deployment".into(),
            name: name.into(),
            serviceaccount: name.into(),
        }
    }

    fn args(to: Option<&str>, from: Option<&str>) -> StatArgs {
        StatArgs {
            resource: Resource::Deploy,
            name: None,
            namespace: None,
            all_namespaces: false,
            to: to.map(str::to_owned),
            from: from.map(str::to_owned),
            window: "10s".into(),
            output: Output::Json,
            reach: crate::agents::Reach::default(),
        }
    }

    #[test]
    fn inbound_rows_make_the_line_and_from_to_narrow_it() {
        let mut served = Golden::default();
        for i in 0..200 {
            served.record(i >= 20, true, if i < 100 { 0.8 } else { 40.0 });
        }
        let mut sent = Golden::default();
        sent.record(true, true, 1.0);
        let report = StatReport {
            node: "a".into(),
            window_secs: 10,
            latency_bounds_ms: vec![],
            requests: vec![
                StatRow {
                    key: StatKey {
                        direction: "inbound".into(),
                        workload: w("api"),
                        peer: WorkloadRef::default(),
                        peer_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                    },
                    golden: served,
                },
                StatRow {
                    key: StatKey {
                        direction: "outbound".into(),
                        workload: w("web"),
                        peer: w("api"),
                        peer_identity: String::new(),
                    },
                    golden: sent,
                },
            ],
            tcp: vec![TcpRow {
                direction: "inbound".into(),
                workload: w("api"),
                pods: 2,
                tcp: TcpStat {
                    open: 3,
                    opened: 5,
                    sent_bytes: 1000,
                    received_bytes: 500,
                },
            }],
        };
        let l = lines(&report, &args(None, None));
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(
            (l[0].name.as_str(), l[0].requests, l[0].successes),
            ("api", 200, 180)
        );
        assert_eq!(l[0].success_rate, Some(0.9));
        assert_eq!(l[0].rps, Some(20.0));
        assert_eq!(
            (l[0].latency_ms_p50, l[0].latency_ms_p99),
            (Some(1.0), Some(50.0))
        );
        assert_eq!((l[0].meshed_pods, l[0].tcp_open), (2, 3));
        assert_eq!(l[0].write_bytes_per_sec, 100.0);
        let to = lines(&report, &args(Some("deploy/api"), None));
        assert_eq!((to[0].name.as_str(), to[0].requests), ("web", 1));
        let from = lines(&report, &args(None, Some("web")));
        assert_eq!((from[0].name.as_str(), from[0].requests), ("api", 1));
        let table = render(&l, Output::Wide);
        assert!(
            table.starts_with("NAMESPACE   NAME   MESHED   SUCCESS"),
            "{table}"
        );
        assert!(table.contains("90.00%"), "{table}");
    }
}
