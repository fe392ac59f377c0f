//! `nodemesh edges`: who talked to whom in the last 10 minutes, and how
//! securely, from what the servers' agents saw (each request's client
//! identity, and whether it came over mutual TLS).
//!
//! SECURED: `√` every request over mTLS; `√ (node)` the client a meshed pod
//! on the server's node (through the agent once: identity known, nothing
//! on a wire); `×` some or all in plaintext.
use std::collections::BTreeMap;

use clap::Args;
use nodemesh_core::{
    identity::Identity,
    wire::{Golden, StatReport},
};
use serde::Serialize;

use crate::stat::{Output, Resource, StatError};

/// `nodemesh edges`.
#[derive(Args, Debug)]
pub struct EdgesArgs {
    /// deploy, sts, ds, job, pod or ns: edges with such a workload at
    /// either end.
    pub resource: Resource,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    #[command(flatten)]
    pub reach: crate::agents::Reach,
}

/// One edge.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Edge {
    pub src: String,
    pub dst: String,
    pub src_ns: String,
    pub dst_ns: String,
    pub secured: String,
    pub client_id: String,
    pub server_id: String,
    pub requests: u64,
}

pub fn run(args: &EdgesArgs) -> Result<String, StatError> {
    let edges = edges(
        &crate::stat::merged(&args.reach, "10m", args.namespace.as_deref())?,
        args,
    );
    Ok(render(&edges, args.output))
}

/// The edges of a report.
pub fn edges(report: &StatReport, args: &EdgesArgs) -> Vec<Edge> {
    // Client identities → their workload, from what clients reported.
    let mut workload_of: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    for row in &report.requests {
        let w = &row.key.workload;
        if row.key.direction == "outbound" && !w.serviceaccount.is_empty() {
            workload_of.insert(
                (w.namespace.clone(), w.serviceaccount.clone()),
                (w.kind.clone(), w.name.clone()),
            );
        }
    }
    let kind = match args.resource {
        Resource::Deploy => "deployment",
        Resource::Sts => "statefulset",
        Resource::Ds => "daemonset",
        Resource::Job => "job",
        Resource::Pod => "pod",
        Resource::Ns => "",
    };
    let mut by_edge: BTreeMap<(String, String, String, String, String, String), Golden> =
        BTreeMap::new();
    for row in &report.requests {
        if row.key.direction != "inbound" {
            continue;
        }
        let dst = &row.key.workload;
        let client = Identity::parse_spiffe(&row.key.peer_identity).ok();
        let (src_kind, src, src_ns) = match &client {
            Some((_, id)) => {
                match workload_of.get(&(id.namespace.clone(), id.service_account.clone())) {
                    Some((k, n)) => (k.clone(), n.clone(), id.namespace.clone()),
                    None => (
                        String::new(),
                        format!("sa/{}", id.service_account),
                        id.namespace.clone(),
                    ),
                }
            }
            None => (String::new(), "(not meshed)".to_owned(), String::new()),
        };
        let wanted_kind = kind.is_empty() || dst.kind == kind || src_kind == kind;
        let wanted_ns = args
            .namespace
            .as_ref()
            .is_none_or(|n| *n == dst.namespace || *n == src_ns);
        if !(wanted_kind && wanted_ns) {
            continue;
        }
        let server_id = client
            .as_ref()
            .map(|(td, _)| {
                Identity::new(&dst.namespace, &dst.serviceaccount)
                    .map(|id| id.spiffe_id(td))
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        by_edge
            .entry((
                src,
                dst.name.clone(),
                src_ns,
                dst.namespace.clone(),
                row.key.peer_identity.clone(),
                server_id,
            ))
            .or_default()
            .merge(&row.golden);
    }
    by_edge
        .into_iter()
        .map(
            |((src, dst, src_ns, dst_ns, client_id, server_id), g)| Edge {
                secured: if client_id.is_empty() {
                    "×".into()
                } else if g.tls == g.requests {
                    "√".into()
                } else if g.tls == 0 {
                    "√ (node)".into()
                } else {
                    "√ (mixed)".into()
                },
                src,
                dst,
                src_ns,
                dst_ns,
                client_id,
                server_id,
                requests: g.requests,
            },
        )
        .collect()
}

pub fn render(edges: &[Edge], output: Output) -> String {
    if output == Output::Json {
        return serde_json::to_string_pretty(edges).unwrap_or_default() + "\n";
    }
    let mut rows = vec![vec![
        "SRC".to_owned(),
        "DST".into(),
        "SRC_NS".into(),
        "DST_NS".into(),
        "SECURED".into(),
    ]];
    if output == Output::Wide {
        rows[0].extend(["CLIENT_ID".into(), "SERVER_ID".into(), "REQUESTS".into()]);
    }
    for e in edges {
        let mut r = vec![
            e.src.clone(),
            e.dst.clone(),
            if e.src_ns.is_empty() {
                "-".into()
            } else {
                e.src_ns.clone()
            },
            e.dst_ns.clone(),
            e.secured.clone(),
        ];
        if output == Output::Wide {
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            r.extend([
                dash(&e.client_id),
                dash(&e.server_id),
                e.requests.to_string(),
            ]);
        }
        rows.push(r);
    }
    crate::agents::table(&rows)
}

#[cfg(test)]
mod tests {
    use nodemesh_core::wire::{StatKey, StatRow, WorkloadRef};

    use super::*;

    fn w(name: &str) -> WorkloadRef {
        WorkloadRef {
            namespace: "shop".into(),
            kind: "deployment".into(),
            name: name.into(),
            serviceaccount: name.into(),
        }
    }

    fn row(
        direction: &str,
        workload: &str,
        peer: Option<&str>,
        client: &str,
        tls: bool,
    ) -> StatRow {
        let mut golden = Golden::default();
        golden.record(true, tls, 1.0);
        StatRow {
            key: StatKey {
                direction: direction.into(),
                workload: w(workload),
                peer: peer.map(w).unwrap_or_default(),
                peer_identity: client.into(),
            },
            golden,
        }
    }

    #[test]
    fn edges_name_clients_by_workload_and_say_how_they_were_secured() {
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let report = StatReport {
            requests: vec![
                row("outbound", "web", Some("api"), "", true),
                row("inbound", "api", None, web, true),
                row("inbound", "db", None, web, false),
                row("inbound", "api", None, "", false),
            ],
            ..StatReport::default()
        };
        let args = EdgesArgs {
            resource: Resource::Deploy,
            namespace: Some("shop".into()),
            output: Output::Json,
            reach: crate::agents::Reach::default(),
        };
        let e = edges(&report, &args);
        let summary: Vec<(&str, &str, &str)> = e
            .iter()
            .map(|e| (e.src.as_str(), e.dst.as_str(), e.secured.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("(not meshed)", "api", "×"),
                ("web", "api", "√"),
                ("web", "db", "√ (node)"),
            ]
        );
        assert_eq!(e[1].server_id, "spiffe://cluster.local/ns/shop/sa/api");
        let table = render(&e, Output::Wide);
        assert!(table.starts_with("SRC"), "{table}");
    }
}
