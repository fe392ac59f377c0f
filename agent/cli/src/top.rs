//! `nodemesh top`: the busiest paths of a workload, live — from the same
//! stream as `tap` (sampled by the agents), counted here: method and
//! path, requests, success, best and worst latency. In a terminal the
//! table is redrawn every second; otherwise a table is printed every
//! `--every` (and once at the end).
use std::{
    collections::HashMap,
    io::IsTerminal,
    time::{Duration, Instant},
};

use clap::Args;
use nodemesh_core::wire::{TapEvent, TapFilter, TapPeer};
use tokio::sync::mpsc;

use crate::tap::{TapArgs, TapError, TapOutput};

/// `nodemesh top`.
#[derive(Args, Debug)]
pub struct TopArgs {
    /// What to watch: `deploy/web`, `pod/web-1`, `ns/shop`.
    pub resource: String,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Only requests between it and this workload.
    #[arg(long, value_name = "RES")]
    pub to: Option<String>,
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    /// Requests a second at most, per agent (sampled).
    #[arg(long, default_value_t = 100)]
    pub max_rps: u32,
    /// Rows shown.
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
    /// Stop after this long (e.g. `30s`; default: until interrupted).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// When not in a terminal: a table this often.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub every: Duration,
    #[command(flatten)]
    pub reach: crate::agents::Reach,
}

/// One path's numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathStat {
    pub count: u64,
    pub successes: u64,
    pub best_us: u64,
    pub worst_us: u64,
}

/// Whether `e` is the selected side's view of its request: a call it
/// served (inbound) or made (outbound) — a request across nodes is seen by
/// both agents, and counted once.
pub fn ours(f: &TapFilter, e: &TapEvent) -> bool {
    let is = |p: &TapPeer| {
        f.workload
            .as_ref()
            .is_none_or(|w| p.workload.rsplit('/').next() == Some(w.as_str()))
            && f.pod.as_ref().is_none_or(|pod| *pod == p.pod)
            && f.namespace.as_ref().is_none_or(|ns| *ns == p.namespace)
    };
    let namespace_only = f.workload.is_none() && f.pod.is_none();
    match e.direction.as_str() {
        "inbound" => is(&e.dst),
        // Within a namespace asked for as a whole, its server's side counts.
        _ => is(&e.src) && !(namespace_only && is(&e.dst)),
    }
}

/// Counts a response (`rsp` events only).
pub fn count(table: &mut HashMap<(String, String), PathStat>, e: &TapEvent) {
    if e.kind != "rsp" {
        return;
    }
    let latency = e.latency_us.unwrap_or_default();
    let s = table
        .entry((e.method.clone(), e.path.clone()))
        .or_insert(PathStat {
            best_us: u64::MAX,
            ..PathStat::default()
        });
    s.count += 1;
    let failed = e.status.is_none_or(|s| s >= 500) || e.grpc_status.is_some_and(|g| g != 0);
    s.successes += u64::from(!failed);
    s.best_us = s.best_us.min(latency);
    s.worst_us = s.worst_us.max(latency);
}

/// The table, busiest first.
pub fn render(table: &HashMap<(String, String), PathStat>, rows: usize) -> String {
    let mut lines: Vec<_> = table.iter().collect();
    lines.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let mut out = format!(
        "{:<8} {:<40} {:>7} {:>8} {:>10} {:>10}\n",
        "METHOD", "PATH", "COUNT", "SUCCESS", "BEST", "WORST"
    );
    for ((method, path), s) in lines.into_iter().take(rows) {
        out.push_str(&format!(
            "{:<8} {:<40} {:>7} {:>7.2}% {:>8}µs {:>8}µs\n",
            crate::term::printable(method),
            crate::term::printable(path),
            s.count,
            s.successes as f64 * 100.0 / s.count.max(1) as f64,
            s.best_us,
            s.worst_us
        ));
    }
    out
}

pub fn run(args: &TopArgs) -> Result<(), TapError> {
    let filter = crate::tap::filter(&TapArgs {
        resource: args.resource.clone(),
        namespace: args.namespace.clone(),
        to: args.to.clone(),
        method: None,
        path: args.path.clone(),
        authority: None,
        max_rps: args.max_rps,
        count: 0,
        output: TapOutput::Text,
        reach: args.reach.clone(),
    })?;
    let tty = std::io::stdout().is_terminal();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TapError::Runtime)?;
    runtime.block_on(async {
        let source = crate::agents::Source::new(&args.reach)
            .await
            .map_err(TapError::Reach)?;
        let (tx, mut rx) = mpsc::channel(1024);
        source
            .tap("top", filter.query(), filter.namespace.as_deref(), tx)
            .await;
        let mut table = HashMap::new();
        let started = Instant::now();
        let every = if tty {
            Duration::from_secs(1)
        } else {
            args.every.max(Duration::from_millis(100))
        };
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            let left = args
                .duration
                .map(|d| d.saturating_sub(started.elapsed()))
                .unwrap_or(Duration::MAX);
            tokio::select! {
                item = rx.recv() => match item {
                    Some(Ok((_, event))) if ours(&filter, &event) => count(&mut table, &event),
                    Some(Ok(_)) => {}
                    // The API server refused or failed: nothing will come.
                    Some(Err((who, message))) if who == "API server" => {
                        return Err(TapError::Reach(message));
                    }
                    Some(Err((who, message))) => eprintln!(
                        "top: {}: {}",
                        crate::term::printable(&who),
                        crate::term::printable(&message)
                    ),
                    None => break,
                },
                _ = tick.tick() => {
                    if tty {
                        // Clear the screen, draw again.
                        print!("\x1b[2J\x1b[H{}", render(&table, args.rows));
                    } else {
                        println!("{}", render(&table, args.rows));
                    }
                }
                _ = tokio::time::sleep(left) => break,
            }
        }
        if !tty {
            println!("{}", render(&table, args.rows));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsp(path: &str, status: u16, us: u64) -> TapEvent {
        TapEvent {
            kind: "rsp".into(),
            method: "GET".into(),
            path: path.into(),
            status: Some(status),
            latency_us: Some(us),
            ..TapEvent::default()
        }
    }

    #[test]
    fn a_request_across_nodes_counts_once() {
        let peer = |w: &str| TapPeer {
            namespace: "shop".into(),
            workload: format!("deployment/{w}"),
            ..TapPeer::default()
        };
        let seen = |direction: &str| TapEvent {
            direction: direction.into(),
            src: peer("web"),
            dst: peer("api"),
            ..rsp("/a", 200, 1)
        };
        let api = TapFilter {
            workload: Some("api".into()),
            ..TapFilter::default()
        };
        assert!(ours(&api, &seen("inbound")) && !ours(&api, &seen("outbound")));
        let web = TapFilter {
            workload: Some("web".into()),
            ..TapFilter::default()
        };
        assert!(!ours(&web, &seen("inbound")) && ours(&web, &seen("outbound")));
        let shop = TapFilter {
            namespace: Some("shop".into()),
            ..TapFilter::default()
        };
        assert!(ours(&shop, &seen("inbound")) && !ours(&shop, &seen("outbound")));
    }

    #[test]
    fn paths_are_counted_busiest_first() {
        let mut t = HashMap::new();
        for e in [
            rsp("/a", 200, 100),
            rsp("/a", 500, 300),
            rsp("/b", 200, 50),
            rsp("/a", 200, 200),
        ] {
            count(&mut t, &e);
        }
        count(
            &mut t,
            &TapEvent {
                kind: "req".into(),
                ..rsp("/c", 200, 1)
            },
        );
        let a = &t[&("GET".to_owned(), "/a".to_owned())];
        assert_eq!(
            (a.count, a.successes, a.best_us, a.worst_us),
            (3, 2, 100, 300)
        );
        let out = render(&t, 10);
        let rows: Vec<&str> = out.lines().collect();
        assert!(rows[0].starts_with("METHOD"));
        assert!(
            rows[1].contains("/a") && rows[1].contains("66.67%"),
            "{out}"
        );
        assert!(rows[2].contains("/b"));
        assert_eq!(rows.len(), 3, "requests alone are not counted: {out}");
    }
}
