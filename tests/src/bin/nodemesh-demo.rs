//! `cargo xtask demo`: a real Kubernetes API server, two simulated nodes
//! with a few pods, nodemesh installed (identity PKI, the identity service,
//! release agents discovering pods from the API), labels that mesh and
//! unmesh pods live, traffic between the pods (across nodes through the
//! mutual-TLS tunnel, checked on the wire), HTTP requests through a
//! Service balanced over both nodes (nearest first), and what the proxies saw: per pod,
//! and per workload (success rate, requests, latency percentiles).
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use nodemesh_core::names::MESH_LABEL;
use nodemesh_tests::{
    Agent, AgentOptions, Cluster, Metrics, Node, Pod, PodSpec, TcpApp,
    apps::http,
    harness,
    mesh::{self, IdentityService, Install, Link},
};

const PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const STEPS: u32 = 10;

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
        "starting a Kubernetes API server (kube-apiserver v1.20.2 + etcd on 127.0.0.1)",
    );
    let cluster = Cluster::start();
    println!(
        "      https://127.0.0.1:{}  kubeconfig {}",
        cluster.port,
        cluster.kubeconfig.display()
    );

    step(
        2,
        "building two nodes on a link and running pods on them (netns + kubelet-style cgroups; status patched as kubelet would)",
    );
    let node = Node::new();
    let node_b = Node::new();
    let link = Link::connect(&[&node, &node_b]);
    cluster.namespace("shop", &[]);
    let web = cluster.run_pod(
        &node,
        PodSpec::new("shop", "web-5d8f7-abcde")
            .owner("ReplicaSet", "web-5d8f7")
            .label("pod-template-hash", "5d8f7")
            .service_account("web"),
    );
    let api = cluster.run_pod(
        &node,
        PodSpec::new("shop", "api-0")
            .owner("StatefulSet", "api")
            .service_account("api"),
    );
    let db = cluster.run_pod(
        &node,
        PodSpec::new("shop", "db-0")
            .owner("StatefulSet", "db")
            .service_account("db"),
    );
    let api_b = cluster.run_pod(
        &node_b,
        PodSpec::new("shop", "api-1")
            .owner("StatefulSet", "api")
            .service_account("api"),
    );
    let vip = cluster.service("shop", "api", 80, HTTP_PORT);
    cluster.endpoint_slice(
        "shop",
        "api",
        HTTP_PORT,
        &[(&api, &node, true), (&api_b, &node_b, true)],
    );
    let payments = cluster.run_pod(
        &node_b,
        PodSpec::new("shop", "payments-0")
            .owner("StatefulSet", "payments")
            .service_account("payments"),
    );
    for (pod, on) in [
        (&web, &node),
        (&api, &node),
        (&db, &node),
        (&api_b, &node_b),
        (&payments, &node_b),
    ] {
        println!(
            "      pod {:<20} {:<11} node {} ({})",
            pod.key(),
            pod.ip,
            on.name,
            on.ip
        );
    }
    println!(
        "      service shop/api {vip}:80 → {}:{HTTP_PORT}, {}:{HTTP_PORT}",
        api.ip, api_b.ip
    );

    step(
        3,
        "nodemesh install | kubectl apply -f - (trust anchor + issuer, identity service, agents on both nodes)",
    );
    let install = Install::apply(&cluster, &node.dir);
    let identity = IdentityService::start(&node, &install, "24h");
    println!(
        "      identity service on {} ({}), trust domain cluster.local",
        identity.addr,
        install.server_name()
    );
    // stat and edges read the agents through the API server (its
    // aggregated API, served by the identity service), as RBAC allows.
    let tap_api = mesh::AggregatedApi::apply(&install, &identity, &node);
    println!(
        "      aggregated API tap.nodemesh.io available (nodemesh stat, tap, top, edges, check)"
    );
    let started = Instant::now();
    let opts = |n: &Node| AgentOptions {
        binary: Some(agent_bin.clone()),
        log: "info".into(),
        ..mesh::mesh_agent_options(&install, &identity, n)
    };
    let agent = Agent::start_ready(&node, opts(&node));
    let agent_b = Agent::start_ready(&node_b, opts(&node_b));
    println!(
        "      agents ready in {} ms ({} agent --node-name …); nothing meshed yet: {} pods captured",
        started.elapsed().as_millis(),
        agent_bin.display(),
        agent.metrics().sum("nodemesh_meshed_pods", &[])
            + agent_b.metrics().sum("nodemesh_meshed_pods", &[])
    );

    step(4, "kubectl label namespace shop nodemesh.io/mesh=enabled");
    cluster.label_namespace("shop", MESH_LABEL, Some("enabled"));
    let m = agent.wait_metric("shop's pods captured with their certificates", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 3.0
            && m.sum("nodemesh_identity_certificates", &[]) == 3.0
    });
    let mb = agent_b.wait_metric("api-1 and payments captured with their certificates", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
            && m.sum("nodemesh_identity_certificates", &[]) == 2.0
    });
    println!(
        "      captured live, no pod restarted: {} pods; each agent got one certificate per service account (node authorization: only for its own pods): {} + {}",
        m.sum("nodemesh_meshed_pods", &[]) + mb.sum("nodemesh_meshed_pods", &[]),
        m.sum("nodemesh_identity_certificates", &[]),
        mb.sum("nodemesh_identity_certificates", &[])
    );

    step(
        5,
        "kubectl label pod db-0 nodemesh.io/mesh=disabled (a pod opts out of its namespace)",
    );
    cluster.label_pod(&db, MESH_LABEL, Some("disabled"));
    let m = agent.wait_metric("db released", |m| m.sum("nodemesh_meshed_pods", &[]) == 2.0);
    println!(
        "      released: {} pods captured now",
        m.sum("nodemesh_meshed_pods", &[])
    );

    step(
        6,
        "sending traffic: every pod talks to every other pod's echo server",
    );
    let mut apps: Vec<(Arc<Pod>, TcpApp)> = [&web, &api, &db]
        .iter()
        .map(|pod| {
            let mut app = pod.tcp();
            app.listen(PORT);
            ((*pod).clone(), app)
        })
        .collect();
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
            let how = if pod.name == "db-0" {
                "direct (db opted out)"
            } else {
                "through the node proxy"
            };
            println!(
                "      {:<20} → {:<20} 2 connections, intact, {how}",
                pod.key(),
                name
            );
        }
    }

    step(
        7,
        "across nodes: web and api → payments-0 through the mutual-TLS tunnel, watched on the link",
    );
    let mut pay = payments.tcp();
    pay.listen(PORT);
    let marker = "CARD-NUMBER-4111-1111-1111-1111;";
    let capture = link.capture();
    let pay_addr = SocketAddr::from((payments.ip, PORT));
    for (pod, app) in apps.iter_mut().filter(|(p, _)| p.name != "db-0") {
        let x = app
            .text(pay_addr, marker, 100)
            .unwrap_or_else(|f| panic!("{} → payments: {f:?}", pod.key()));
        assert!(x.intact, "{} → payments: bytes changed", pod.key());
        app.exchange_ok(pay_addr, 1 << 20);
        println!(
            "      {:<20} → shop/payments-0       2 connections, intact, mTLS tunnel {} → {}:15008",
            pod.key(),
            node.ip,
            node_b.ip
        );
    }
    let seen = capture.finish();
    println!(
        "      captured {} on the link; the marker {:?} appears in it: {}",
        bytes(seen.len() as f64),
        marker,
        if mesh::contains(&seen, marker.as_bytes()) {
            "YES"
        } else {
            "no (encrypted)"
        }
    );
    let mb = agent_b.wait_metric("payments saw its clients", |m| {
        m.sum(
            "nodemesh_tcp_peer_open_total",
            &[("pod", "payments-0"), ("tls", "true")],
        ) >= 4.0
    });
    for client in ["web", "api"] {
        let id = format!("spiffe://cluster.local/ns/shop/sa/{client}");
        println!(
            "      node {} saw payments-0's clients: {id} tls=true, {} connections",
            node_b.name,
            mb.sum(
                "nodemesh_tcp_peer_open_total",
                &[
                    ("pod", "payments-0"),
                    ("direction", "inbound"),
                    ("tls", "true"),
                    ("peer_identity", &id)
                ]
            )
        );
    }

    step(
        8,
        "HTTP through the Service shop/api: web sends 300 requests (10% asked to fail, 4 at a time), each balanced on its own, nearest first: api-0 on this node while it keeps up, api-1 (the other node, mTLS) for the rest",
    );
    let mut api_servers: Vec<_> = [(&api, "api-0"), (&api_b, "api-1")]
        .into_iter()
        .map(|(pod, name)| {
            let mut app = pod.http();
            app.serve(
                HTTP_PORT,
                http::Knobs {
                    name: Some(name.into()),
                    bytes: 1024,
                    ..http::Knobs::default()
                },
            );
            app
        })
        .collect();
    let mut web_http = web.http();
    let to = SocketAddr::from((vip, 80));
    let mut outcomes = web_http.run(http::Run {
        requests: 270,
        concurrency: 4,
        ..http::Run::get(to, "/", 0)
    });
    outcomes.extend(web_http.run(http::Run::get(to, "/?status=503", 30)));
    let by_server = |name: &str| {
        outcomes
            .iter()
            .filter(|o| o.server.as_deref() == Some(name))
            .count()
    };
    println!(
        "      answered by api-0: {}, by api-1: {}; 2xx: {}, 5xx: {}",
        by_server("api-0"),
        by_server("api-1"),
        outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| s < 300))
            .count(),
        outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| s >= 500))
            .count(),
    );
    let m = agent.wait_metric("web's requests counted", |m| {
        m.sum("nodemesh_response_total", &[("workload_name", "web")]) == 300.0
    });
    print_requests(&m);
    drop(api_servers.drain(..));

    step(
        9,
        "what the agent on the first node knows: per-pod metrics and the service index (from :4191)",
    );
    let m = agent.wait_metric("all connections closed", |m| {
        m.sum("nodemesh_tcp_open_connections", &[]) == 0.0
    });
    print_table(&m, &[&web, &api, &db]);
    // The operator's view of the same, no Prometheus: the CLI through the
    // API server (both nodes' agents, merged).
    for args in [
        &["stat", "sts", "-n", "shop", "-t", "1m"][..],
        &["edges", "sts", "-n", "shop", "-o", "wide"][..],
    ] {
        let argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        println!("      $ nodemesh {}", argv.join(" "));
        let out = std::process::Command::new(&agent_bin)
            .args(&argv)
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .output();
        match out {
            Ok(out) => {
                for line in String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&out.stderr).lines())
                {
                    println!("      {line}");
                }
            }
            Err(e) => println!("      (cannot run nodemesh: {e})"),
        }
    }
    if let Ok((200, body)) = agent.get("/v1/services")
        && let Ok(services) = serde_json::from_str::<serde_json::Value>(&body)
    {
        for svc in services
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["namespace"] == "shop")
        {
            for ep in svc["endpoints"].as_array().into_iter().flatten() {
                println!(
                    "      service shop/{} {} → {} ready={} identity={}",
                    svc["name"].as_str().unwrap_or(""),
                    svc["addr"].as_str().unwrap_or(""),
                    ep["addr"].as_str().unwrap_or(""),
                    ep["ready"],
                    ep["identity"].as_str().unwrap_or("?"),
                );
            }
        }
    }
    if let Some(kib) = agent.rss_kib() {
        println!("      agent memory (RSS): {:.1} MiB", kib as f64 / 1024.0);
    }

    step(
        10,
        "cleaning up: agents, identity service, pods, nodes, link, pins, API server",
    );
    drop(apps);
    drop(pay);
    drop(tap_api);
    drop((agent, agent_b, identity));
    drop(install);
    drop(link);
    drop((node, node_b));
    drop(cluster);
    println!("\ndemo finished in {:.1}s", t0.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(10));
}

fn step(n: u32, what: &str) {
    println!("[{n}/{STEPS}] {what}");
}

/// The golden request metrics per (source, destination) workload pair:
/// requests, success rate, latency percentiles (from the histogram).
fn print_requests(m: &Metrics) {
    println!(
        "      {:<18} {:<16} {:<5} {:>8} {:>9} {:>9} {:>9}",
        "FROM", "TO", "TLS", "REQUESTS", "SUCCESS", "P50 ms", "P99 ms"
    );
    let mut pairs: Vec<(String, String, String)> = Vec::new();
    for line in m
        .text
        .lines()
        .filter(|l| l.starts_with("nodemesh_request_total{"))
    {
        let get = |key: &str| {
            line.split(&format!("{key}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let pair = (get("workload_name"), get("dst_workload_name"), get("tls"));
        if !pairs.contains(&pair) {
            pairs.push(pair);
        }
    }
    pairs.sort();
    for (from, to, tls) in pairs {
        let l = [
            ("workload_name", from.as_str()),
            ("dst_workload_name", to.as_str()),
            ("tls", tls.as_str()),
        ];
        let total = m.sum("nodemesh_response_total", &l);
        let ok = m.sum(
            "nodemesh_response_total",
            &[l[0], l[1], l[2], ("classification", "success")],
        );
        let q = |q: f64| {
            m.quantile("nodemesh_response_latency_seconds", &l, q)
                .map_or("-".into(), |s| format!("{:.2}", s * 1000.0))
        };
        println!(
            "      {:<18} {:<16} {:<5} {:>8.0} {:>8.1}% {:>9} {:>9}",
            from,
            if to.is_empty() { "(outside)" } else { &to },
            tls,
            m.sum("nodemesh_request_total", &l),
            if total > 0.0 { 100.0 * ok / total } else { 0.0 },
            q(0.5),
            q(0.99),
        );
    }
}

fn print_table(m: &Metrics, pods: &[&Arc<Pod>]) {
    println!(
        "      {:<18} {:<22} {:>6} {:>10} {:>10} {:>14} {:>14}",
        "POD", "WORKLOAD", "CONNS", "SENT", "RECEIVED", "FAST→PROXY", "FAST→APP"
    );
    for pod in pods {
        let l = [
            ("namespace", pod.namespace.as_str()),
            ("pod", pod.name.as_str()),
        ];
        let workload = m
            .labels("nodemesh_tcp_open_total", &l)
            .map(|labels| format!("{}/{}", labels["workload_kind"], labels["workload_name"]))
            .unwrap_or_else(|| "(not meshed)".into());
        let fast = |to| m.sum("nodemesh_fastpath_bytes_total", &[l[0], l[1], ("to", to)]);
        println!(
            "      {:<18} {:<22} {:>6.0} {:>10} {:>10} {:>14} {:>14}",
            pod.name,
            workload,
            m.sum("nodemesh_tcp_open_total", &l),
            bytes(m.sum("nodemesh_tcp_sent_bytes_total", &l)),
            bytes(m.sum("nodemesh_tcp_received_bytes_total", &l)),
            bytes(fast("proxy")),
            bytes(fast("app")),
        );
    }
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
