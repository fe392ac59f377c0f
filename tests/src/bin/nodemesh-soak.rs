//! `cargo xtask soak`: 10 000 connections at once through one agent (tunnel
//! streams, inbound capture, same-node meshed), a minute of churn, then
//! idle; prints the table (see `nodemesh_tests::soak`). Asserts nothing
//! about time or memory; says so when a client saw an error or something
//! was left open.
use std::{path::PathBuf, time::Duration};

use nodemesh_tests::{harness, soak};

fn main() {
    harness::play_role();
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let number = |flag: &str| {
        value(flag).map(|v| {
            v.parse::<u64>().unwrap_or_else(|_| {
                eprintln!("{flag} {v:?}: not a number");
                std::process::exit(2)
            })
        })
    };
    let mut opts = soak::SoakOptions::full(value("--agent").map(PathBuf::from));
    if let Some(n) = number("--connections") {
        opts.connections = n as u32;
    }
    if let Some(s) = number("--churn-seconds") {
        opts.churn = Duration::from_secs(s);
    }
    println!(
        "nodemesh soak: {} connections held through node b's agent (2:2:1 tunnel, inbound, same-node), {:?} of churn, then idle",
        opts.connections, opts.churn
    );
    let report = soak::run(&opts);
    if let Some(why) = &report.capped {
        println!("held fewer: {why}");
    }
    print!("{}", report.table());
    let base = report.baseline();
    let end = report.end();
    println!(
        "after: admission connections in use {}, open connection series {}, RSS {:+.1}% and open files {:+} from the baseline",
        report.connections_in_use,
        report.open_connections,
        (end.rss_kib as f64 / base.rss_kib.max(1) as f64 - 1.0) * 100.0,
        end.fds as i64 - base.fds as i64
    );
    if report.errors() > 0 || report.connections_in_use != 0.0 || report.open_connections != 0.0 {
        println!("NOT CLEAN: first errors {:?}", report.first_errors);
        std::process::exit(1);
    }
}
