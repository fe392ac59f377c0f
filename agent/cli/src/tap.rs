//! `nodemesh tap`: live requests from agents' `/v1/tap` (NDJSON), filtered
//! by the agents, printed as they come: `req`, `rsp` and `end` lines per
//! request, with both ends' identities. Never header values or bodies.
//!
//! It reads them through the API server (`nodemesh-tapper` lets a user), or
//! with `--agent` directly on a node. An agent that cannot be followed is
//! said on stderr; the others go on.
use std::io::Write;

use clap::{Args, ValueEnum};
use nodemesh_core::wire::{TapEvent, TapFilter};
use tokio::sync::mpsc;

use crate::agents::{Reach, Source, TapItem};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TapOutput {
    Text,
    Json,
}

/// `nodemesh tap`.
#[derive(Args, Debug)]
pub struct TapArgs {
    /// What to tap: `deploy/web`, `pod/web-1`, `ns/shop` (or a bare
    /// workload name).
    pub resource: String,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only requests between it and this workload (`deploy/api`).
    #[arg(long, value_name = "RES")]
    pub to: Option<String>,
    #[arg(long)]
    pub method: Option<String>,
    /// Only paths starting so.
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    #[arg(long)]
    pub authority: Option<String>,
    /// Requests a second at most, per agent (sampled; a request's three
    /// events go together).
    #[arg(long, default_value_t = 100)]
    pub max_rps: u32,
    /// Stop after this many events (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: TapOutput,
    #[command(flatten)]
    pub reach: Reach,
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{0:?}: not KIND/NAME (deploy/web, pod/web-1, ns/shop)")]
    Resource(String),
    #[error("{0}")]
    Reach(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// The filter the arguments ask for.
pub fn filter(args: &TapArgs) -> Result<TapFilter, TapError> {
    let mut f = TapFilter {
        namespace: args.namespace.clone(),
        to: args.to.as_deref().map(|t| name_of(t).to_owned()),
        method: args.method.clone(),
        path_prefix: args.path.clone(),
        authority: args.authority.clone(),
        max_rps: Some(args.max_rps),
        ..TapFilter::default()
    };
    let (kind, name) = match args.resource.split_once('/') {
        Some((k, n)) if !n.is_empty() => (k, n),
        Some(_) => return Err(TapError::Resource(args.resource.clone())),
        None => ("", args.resource.as_str()),
    };
    match kind {
        "ns" | "namespace" => f.namespace = Some(name.to_owned()),
        "po" | "pod" => f.pod = Some(name.to_owned()),
        "" | "deploy" | "deployment" | "sts" | "statefulset" | "ds" | "daemonset" | "job" => {
            f.workload = Some(name.to_owned())
        }
        _ => return Err(TapError::Resource(args.resource.clone())),
    }
    Ok(f)
}

fn name_of(res: &str) -> &str {
    res.rsplit('/').next().unwrap_or(res)
}

/// Runs `tap`, printing to stdout until `--count` events (or interrupted).
pub fn run(args: &TapArgs) -> Result<(), TapError> {
    let filter = filter(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TapError::Runtime)?;
    runtime.block_on(async {
        let source = Source::new(&args.reach).await.map_err(TapError::Reach)?;
        let (tx, mut rx) = mpsc::channel::<TapItem>(256);
        source
            .tap("tap", filter.query(), filter.namespace.as_deref(), tx)
            .await;
        let mut seen = 0;
        while let Some(item) = rx.recv().await {
            let (who, event) = match item {
                Ok(i) => i,
                // The API server refused or failed: nothing will come.
                Err((who, message)) if who == "API server" => {
                    return Err(TapError::Reach(message));
                }
                Err((who, message)) => {
                    eprintln!(
                        "tap: {}: {}",
                        crate::term::printable(&who),
                        crate::term::printable(&message)
                    );
                    continue;
                }
            };
            let line = match args.output {
                TapOutput::Json => serde_json::to_string(&event).unwrap_or_default(),
                // Agents' strings never drive the terminal.
                TapOutput::Text => crate::term::printable(&text(&who, &event)).into_owned(),
            };
            // A closed stdout (`| head`) ends the tap.
            if writeln!(std::io::stdout(), "{line}").is_err() {
                break;
            }
            seen += 1;
            if args.count > 0 && seen >= args.count {
                break;
            }
        }
        Ok(())
    })
}

/// A Linkerd-shaped line; `who` is the agent (its node, or address).
pub fn text(who: &str, e: &TapEvent) -> String {
    // Ids are per agent: named by its node (the agent says, and so does
    // the API server), else by the address it was reached at.
    let agent = if e.node.is_empty() {
        who.parse::<std::net::SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| who.to_owned())
    } else {
        e.node.clone()
    };
    let proxy = if e.direction == "inbound" {
        "in"
    } else {
        "out"
    };
    // `ip:port` as Linkerd shows it, then which pod that is.
    let end = |side: &str, p: &nodemesh_core::wire::TapPeer| {
        let pod = if p.namespace.is_empty() {
            p.pod.clone()
        } else {
            format!("{}/{}", p.namespace, p.pod)
        };
        match (p.addr.is_empty(), pod.is_empty() || pod == p.addr) {
            (true, _) => format!("{side}={pod}"),
            (false, true) => format!("{side}={}", p.addr),
            (false, false) => format!("{side}={} {side}_pod={pod}", p.addr),
        }
    };
    let head = format!(
        "{} id={}:{} proxy={proxy} {} {} tls={}",
        e.kind,
        agent,
        e.id,
        end("src", &e.src),
        end("dst", &e.dst),
        e.tls,
    );
    let ids = format!(
        "src_id={} dst_id={}",
        if e.src.identity.is_empty() {
            "-"
        } else {
            &e.src.identity
        },
        if e.dst.identity.is_empty() {
            "-"
        } else {
            &e.dst.identity
        },
    );
    match e.kind.as_str() {
        "req" => format!(
            "{head} :method={} :authority={} :path={} {ids}",
            e.method, e.authority, e.path
        ),
        "rsp" => format!(
            "{head} :status={} latency={}µs{}",
            e.status.unwrap_or_default(),
            e.latency_us.unwrap_or_default(),
            e.grpc_status
                .map(|s| format!(" grpc-status={s}"))
                .unwrap_or_default()
        ),
        "end" => format!(
            "{head} duration={}µs response-length={}B{}",
            e.duration_us.unwrap_or_default(),
            e.response_bytes.unwrap_or_default(),
            e.grpc_status
                .map(|s| format!(" grpc-status={s}"))
                .unwrap_or_default()
        ),
        "dropped" => format!(
            "dropped {} events from {} (reading too slowly)",
            e.count.unwrap_or_default(),
            who
        ),
        other => format!("{other} id={agent}:{}", e.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(resource: &str) -> TapArgs {
        TapArgs {
            resource: resource.into(),
            namespace: Some("shop".into()),
            to: Some("deploy/api".into()),
            method: Some("GET".into()),
            path: Some("/v1".into()),
            authority: None,
            max_rps: 10,
            count: 0,
            output: TapOutput::Text,
            reach: Reach::default(),
        }
    }

    #[test]
    fn resources_become_filters() {
        let f = filter(&args("deploy/web")).unwrap();
        assert_eq!(f.workload.as_deref(), Some("web"));
        assert_eq!(f.to.as_deref(), Some("api"));
        assert_eq!(f.max_rps, Some(10));
        assert_eq!(
            filter(&args("pod/web-1")).unwrap().pod.as_deref(),
            Some("web-1")
        );
        assert_eq!(
            filter(&args("ns/other")).unwrap().namespace.as_deref(),
            Some("other")
        );
        assert!(filter(&args("svc/web")).is_err());
        assert!(filter(&args("deploy/")).is_err());
    }

    #[test]
    fn lines_look_like_linkerds() {
        let e = TapEvent {
            kind: "rsp".into(),
            id: 7,
            direction: "outbound".into(),
            status: Some(200),
            latency_us: Some(1234),
            tls: true,
            ..TapEvent::default()
        };
        let line = text("10.0.0.1:4191", &e);
        assert!(text("node-a", &e).starts_with("rsp id=node-a:7 "));
        assert!(
            line.starts_with("rsp id=10.0.0.1:7 proxy=out")
                && line.contains(":status=200 latency=1234µs"),
            "{line}"
        );
        // The agent names its node: the id reads the same through --agent
        // and through the API server.
        let named = TapEvent {
            node: "node-a".into(),
            src: nodemesh_core::wire::TapPeer {
                namespace: "shop".into(),
                pod: "web-1".into(),
                addr: "10.1.0.5:41234".into(),
                ..Default::default()
            },
            dst: nodemesh_core::wire::TapPeer {
                pod: "93.184.216.34:443".into(),
                addr: "93.184.216.34:443".into(),
                ..Default::default()
            },
            ..e.clone()
        };
        let line = text("10.0.0.1:4191", &named);
        assert!(
            line.starts_with(
                "rsp id=node-a:7 proxy=out src=10.1.0.5:41234 src_pod=shop/web-1 dst=93.184.216.34:443 tls=true"
            ),
            "{line}"
        );
        assert_eq!(line, text("node-a", &named));
    }
}
