//! `cargo xtask demo`: a simulated node with a few pods, the release agent,
//! traffic between the pods, and what the proxy saw per pod.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use nodemesh::discovery::MESH_LABEL;
use nodemesh_tests::{Agent, AgentOptions, Metrics, Node, Pod, PodSpec, harness};

const PORT: u16 = 8080;

fn main() {
    harness::play_role();
    let agent_bin = std::env::args()
        .skip_while(|a| a != "--agent")
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            eprintln!("usage: nodemesh-demo --agent <path to the nodemesh binary>");
            std::process::exit(2)
        });
    let t0 = Instant::now();

    step(
        1,
        "building a node: a netns with a bridge, a cgroup root, a bpffs pin directory",
    );
    let node = Node::new();
    let web = node.pod(PodSpec::new("shop", "web").meshed());
    let api = node.pod(PodSpec::new("shop", "api").meshed());
    let db = node.pod(PodSpec::new("shop", "db"));
    node.write_pods(&[&web, &api, &db]);
    for pod in [&web, &api, &db] {
        let meshed = pod.labels().get(MESH_LABEL).map(String::as_str) == Some("enabled");
        println!(
            "      pod {:<9} {:<11} netns {}  {}",
            pod.key(),
            pod.ip,
            pod.netns.display(),
            if meshed {
                "nodemesh.io/mesh=enabled"
            } else {
                "(not meshed)"
            }
        );
    }

    step(
        2,
        &format!("starting the agent: {} agent", agent_bin.display()),
    );
    let started = Instant::now();
    let agent = Agent::start_ready(
        &node,
        AgentOptions {
            binary: Some(agent_bin),
            log: "info".into(),
            ..AgentOptions::default()
        },
    );
    agent.wait_metric("web and api captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
    });
    println!(
        "      ready in {} ms; admin on {} inside the node",
        started.elapsed().as_millis(),
        agent.admin
    );

    step(
        3,
        "sending traffic: every pod talks to every other pod's echo server",
    );
    let mut apps: Vec<_> = [&web, &api, &db]
        .iter()
        .map(|pod| {
            let mut app = pod.app();
            app.listen(PORT);
            (pod.to_owned(), app)
        })
        .collect();
    let talk = |apps: &mut Vec<(&std::sync::Arc<Pod>, nodemesh_tests::App)>, note: &str| {
        let targets: Vec<(String, SocketAddr)> = apps
            .iter()
            .map(|(p, _)| (p.key(), SocketAddr::from((p.ip, PORT))))
            .collect();
        for (pod, app) in apps.iter_mut() {
            for (name, dst) in &targets {
                if *name == pod.key() {
                    continue;
                }
                for bytes in [2_000, 1 << 20] {
                    let x = app
                        .exchange(*dst, bytes)
                        .unwrap_or_else(|f| panic!("{} → {name}: {f:?}", pod.key()));
                    assert!(x.intact, "{} → {name}: bytes changed", pod.key());
                }
                println!(
                    "      {:<9} → {:<9} 2 connections, 1 MiB each way, intact{note}",
                    pod.key(),
                    name
                );
            }
        }
    };
    talk(&mut apps, "");

    step(
        4,
        "labelling shop/db live (no restart): its new connections are captured too",
    );
    db.set_label(MESH_LABEL, Some("enabled"));
    node.write_pods(&[&web, &api, &db]);
    agent.wait_metric("db captured", |m| m.sum("nodemesh_meshed_pods", &[]) == 3.0);
    talk(&mut apps, " (db meshed now)");

    step(5, "what the proxy saw, per pod (from /metrics)");
    let m = agent.wait_metric("all connections closed", |m| {
        m.sum("nodemesh_tcp_open_connections", &[]) == 0.0
    });
    print_table(&m, &[&web, &api, &db]);
    if let Some(kib) = agent.rss_kib() {
        println!("      agent memory (RSS): {:.1} MiB", kib as f64 / 1024.0);
    }

    step(6, "cleaning up: agent, pods, node, pins");
    drop(apps);
    drop(agent);
    drop(node);
    println!("\ndemo finished in {:.1}s", t0.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(10));
}

fn step(n: u32, what: &str) {
    println!("[{n}/6] {what}");
}

fn print_table(m: &Metrics, pods: &[&Pod]) {
    println!(
        "      {:<10} {:>6} {:>12} {:>12} {:>16} {:>16} {:>7}",
        "POD", "CONNS", "SENT", "RECEIVED", "FAST-PATH→PROXY", "FAST-PATH→APP", "ERRORS"
    );
    for pod in pods {
        let l = [
            ("namespace", pod.namespace.as_str()),
            ("pod", pod.name.as_str()),
        ];
        let fast = |to| m.sum("nodemesh_fastpath_bytes_total", &[l[0], l[1], ("to", to)]);
        println!(
            "      {:<10} {:>6.0} {:>12} {:>12} {:>16} {:>16} {:>7.0}",
            pod.name,
            m.sum("nodemesh_tcp_open_total", &l),
            bytes(m.sum("nodemesh_tcp_sent_bytes_total", &l)),
            bytes(m.sum("nodemesh_tcp_received_bytes_total", &l)),
            bytes(fast("proxy")),
            bytes(fast("app")),
            m.sum("nodemesh_tcp_connect_errors_total", &l),
        );
    }
    println!("      (db's counters start when it was labelled: earlier connections went direct)");
}

fn bytes(n: f64) -> String {
    if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}
