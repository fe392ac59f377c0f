//! `cargo xtask bench -- --peers ZTUNNEL`: the cross-node path beside the
//! closest peer, istio's ztunnel, on one bed with the same clients.
//!
//! Two nodes on a link, a client pod on one and a server pod on the other;
//! the same measures three times: nothing meshed, ztunnel (one per pod in
//! dedicated mode, its in-pod shape: HBONE, mutual TLS 1.3 from its test CA,
//! workloads from a local file; an iptables REDIRECT in the client pod
//! sends its TCP to ztunnel's :15001), then nodemesh (both pods labelled,
//! one agent per node, the mTLS tunnel). Real clients where one fits:
//! iperf3 and wrk; ping-pong, bulk and connection setup from the test app.
//! Each proxied run is checked to have passed its proxies with mutual TLS.
//! Nothing here asserts speed.
use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nodemesh_core::names::MESH_LABEL;
use nodemesh_tests::{
    Metrics, Node, Pod, PodSpec, TcpApp,
    apps::http,
    eventually,
    sys::{self, Killed},
};

use super::{
    CrossNode, HTTP_PORT, PORT, RequestRow, Row, Settings, Wrk, measure, pids, setup, wrk,
};

const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: u32 = 5;
/// ztunnel's ports in its pod: outbound capture, HBONE, metrics, readiness.
const ZT_OUTBOUND: u16 = 15001;
const ZT_HBONE: u16 = 15008;
const ZT_METRICS: u16 = 15020;
const ZT_READY: u16 = 15021;
/// wrk with a new connection for every request (as `ab -c 8` does).
const WRK_CLOSE: Wrk = Wrk {
    connections: 8,
    close: true,
};

/// One column of the table.
struct Column {
    rtt: Row,
    iperf_gbit: f64,
    keep_alive: RequestRow,
    close: RequestRow,
    setup: (f64, f64, usize),
    /// Resident memory of each proxy process, MiB.
    rss_mib: Vec<f64>,
}

pub fn run(s: &Settings, ztunnel: &Path) {
    assert!(
        ztunnel.is_file(),
        "--peers {}: no such file (the ztunnel binary)",
        ztunnel.display()
    );
    println!(
        "nodemesh bench --peers: cross-node, direct vs ztunnel ({}) vs nodemesh; {} round trips of {} bytes, {} MiB bulk, iperf3 {IPERF_SECONDS} s, wrk {} s; median of {}",
        ztunnel.display(),
        s.round_trips,
        s.size,
        s.bulk_mib,
        super::WRK_SECONDS,
        s.repeats
    );
    super::cross_node_bed(s, "peers", &[], |bed| beside(s, ztunnel, bed));
}

/// The three columns, on `bed`.
fn beside(s: &Settings, ztunnel: &Path, bed: &CrossNode<'_>) {
    let CrossNode {
        cluster,
        a,
        b,
        agent_a,
        agent_b,
        ns,
    } = bed;
    let server = cluster.run_pod(b, PodSpec::new(ns, "server").service_account("server"));
    let client = cluster.run_pod(a, PodSpec::new(ns, "client").service_account("client"));
    let mut srv = server.tcp();
    srv.listen(PORT);
    let mut hsrv = server.http();
    hsrv.serve(
        HTTP_PORT,
        http::Knobs {
            bytes: 1024,
            ..http::Knobs::default()
        },
    );
    let mut iperf = Command::new("iperf3");
    iperf
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _iperf = Killed::new(server.spawn(iperf));
    let mut app = client.tcp();
    let dst = SocketAddr::from((server.ip, PORT));
    let url = format!("http://{}:{HTTP_PORT}/", server.ip);

    eprintln!("  running: direct, nothing meshed");
    let direct = column(&client, &mut app, dst, &url, s, &[]);

    settle(&[&client, &server]);
    eprintln!("  running: ztunnel, one per pod (HBONE, mutual TLS)");
    let zt = Ztunnels::start(ztunnel, &[(&client, a), (&server, b)]);
    zt.redirect(&client);
    let zt_col = column(&client, &mut app, dst, &url, s, &zt.pids());
    let mtls = zt.mutual_tls_connections(&client);
    assert!(
        mtls >= (s.repeats * 4) as f64,
        "the ztunnel runs did not pass ztunnel with mutual TLS: {mtls} connections"
    );
    zt.stop(&client);
    settle(&[&client, &server]);

    eprintln!("  running: nodemesh, one agent per node (the mTLS tunnel)");
    cluster.label_pod(&server, MESH_LABEL, Some("enabled"));
    cluster.label_pod(&client, MESH_LABEL, Some("enabled"));
    for agent in [agent_a, agent_b] {
        agent.wait_metric("pod captured with its certificate", |m| {
            m.sum("nodemesh_meshed_pods", &[]) == 1.0
                && m.sum("nodemesh_identity_certificates", &[]) == 1.0
        });
    }
    let agents = [agent_a, agent_b];
    let nm_col = column(&client, &mut app, dst, &url, s, &pids(&agents));
    let streams = agent_a.metrics().sum(
        "nodemesh_tunnel_streams_total",
        &[("direction", "outbound")],
    );
    assert!(
        streams >= (s.repeats * 4) as f64,
        "the nodemesh runs did not go through the tunnel: {streams} streams"
    );

    print_table(&direct, &zt_col, &nm_col);
    drop((app, srv, hsrv));
}

/// Every measure once more, from `client`, charging `proxies` the CPU.
fn column(
    client: &Pod,
    app: &mut TcpApp,
    dst: SocketAddr,
    url: &str,
    s: &Settings,
    proxies: &[u32],
) -> Column {
    let rtt = measure(app, dst, s);
    let iperf_gbit = super::median(
        (0..s.repeats)
            .map(|_| iperf3(client, dst.ip().to_string().as_str()))
            .collect(),
    );
    let keep_alive = wrk(client, url, s, Wrk::KEEP_ALIVE, proxies);
    let close = wrk(client, url, s, WRK_CLOSE, proxies);
    let setup = setup(app, dst, 200, Duration::ZERO);
    Column {
        rtt,
        iperf_gbit,
        keep_alive,
        close,
        setup,
        rss_mib: proxies
            .iter()
            .filter_map(|&pid| sys::rss_kib(pid))
            .map(|k| k as f64 / 1024.0)
            .collect(),
    }
}

/// One iperf3 stream for IPERF_SECONDS from `client`: Gbit/s received.
fn iperf3(client: &Pod, server: &str) -> f64 {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        server,
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &IPERF_SECONDS.to_string(),
        "-J",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = client
        .spawn(cmd)
        .wait_with_output()
        .expect("run iperf3 (cargo xtask setup installs it)");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .unwrap_or_else(|| {
            panic!(
                "iperf3 said:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Waits for the pods' TIME_WAIT sockets to expire (a minute), so that no
/// column inherits the ports the one before left waiting.
fn settle(pods: &[&Pod]) {
    let total = || {
        pods.iter()
            .map(|p| p.tcp_sockets("time-wait", None))
            .sum::<usize>()
    };
    let n = total();
    if n < 64 {
        return;
    }
    eprintln!("  waiting for {n} TIME_WAIT sockets in the pods to expire");
    eventually("TIME_WAIT sockets expired", Duration::from_secs(90), || {
        std::thread::sleep(Duration::from_secs(1));
        match total() {
            n if n < 64 => Ok(()),
            n => Err(format!("{n} left")),
        }
    });
}

/// One ztunnel per pod, in the pod's netns, with the pods as its
/// workloads (peers/README.md's recipe).
struct Ztunnels {
    procs: Vec<Killed>,
}

impl Ztunnels {
    fn start(binary: &Path, pods: &[(&Pod, &Node)]) -> Self {
        let workloads: Vec<String> = pods
            .iter()
            .map(|(pod, node)| {
                format!(
                    "- {{uid: \"cluster1//v1/Pod/{ns}/{name}\", name: {name}, namespace: {ns}, serviceAccount: {sa}, workloadIps: [\"{ip}\"], protocol: HBONE, node: {node}, network: \"\", services: {{}}}}",
                    ns = pod.namespace,
                    name = pod.name,
                    sa = pod.service_account,
                    ip = pod.ip,
                    node = node.name,
                )
            })
            .collect();
        let procs = pods
            .iter()
            .map(|(pod, node)| {
                let file = node.dir.join(format!("ztunnel-{}.yaml", pod.name));
                std::fs::write(
                    &file,
                    format!(
                        "workloads:\n{}\npolicies: []\nservices: []\n",
                        workloads.join("\n")
                    ),
                )
                .expect("write ztunnel's workloads");
                let log = std::fs::File::create(node.dir.join(format!("ztunnel-{}.log", pod.name)))
                    .expect("ztunnel's log");
                let mut cmd = Command::new(binary);
                cmd.args(["proxy", "ztunnel"])
                    .env("FAKE_CA", "true")
                    .env("XDS_ADDRESS", "")
                    .env("LOCAL_XDS_PATH", &file)
                    .env("PROXY_MODE", "dedicated")
                    .env(
                        "PROXY_WORKLOAD_INFO",
                        format!("{}/{}/{}", pod.namespace, pod.name, pod.service_account),
                    )
                    .env("NODE_NAME", &node.name)
                    .env("ZTUNNEL_WORKER_THREADS", "2")
                    .env("ENABLE_ORIG_SRC", "false")
                    .env("RUST_LOG", "warn")
                    .stdout(log.try_clone().expect("ztunnel's log"))
                    .stderr(log);
                Killed::new(pod.spawn(cmd))
            })
            .collect();
        let zt = Self { procs };
        for (pod, _) in pods {
            eventually(
                &format!("ztunnel ready in pod {}", pod.name),
                Duration::from_secs(30),
                || {
                    let ready = curl(pod, &format!("http://127.0.0.1:{ZT_READY}/healthz/ready"));
                    ready.map(|_| ())
                },
            );
        }
        zt
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.id()).collect()
    }

    /// The client pod's TCP (but its own loopback and ztunnel's HBONE)
    /// to ztunnel's outbound port, as istio-cni does in the pod.
    fn redirect(&self, client: &Pod) {
        iptables(
            client,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "!",
                "-o",
                "lo",
                "!",
                "--dport",
                &ZT_HBONE.to_string(),
                "-j",
                "REDIRECT",
                "--to-ports",
                &ZT_OUTBOUND.to_string(),
            ],
        );
    }

    /// Connections the client's ztunnel opened with mutual TLS.
    fn mutual_tls_connections(&self, client: &Pod) -> f64 {
        let text = curl(client, &format!("http://127.0.0.1:{ZT_METRICS}/metrics"))
            .unwrap_or_else(|e| panic!("ztunnel's metrics: {e}"));
        Metrics::parse(&text).sum(
            "istio_tcp_connections_opened_total",
            &[("connection_security_policy", "mutual_tls")],
        )
    }

    /// Stops them and removes the redirect.
    fn stop(self, client: &Pod) {
        iptables(client, &["-t", "nat", "-F", "OUTPUT"]);
        drop(self);
    }
}

fn iptables(pod: &Pod, args: &[&str]) {
    let mut cmd = Command::new("iptables");
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    let out = pod
        .spawn(cmd)
        .wait_with_output()
        .expect("run iptables (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "iptables {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTP GET from inside `pod` (curl): the body, or why not.
fn curl(pod: &Pod, url: &str) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sf", "--max-time", "2", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = pod
        .spawn(cmd)
        .wait_with_output()
        .map_err(|e| format!("curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "curl {url}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn print_table(direct: &Column, zt: &Column, nm: &Column) {
    println!();
    println!(
        "{:<40} {:>10} {:>18} {:>18}",
        "cross-node", "direct", "ztunnel", "nodemesh"
    );
    // Lower is better for latencies and CPU, higher for rates.
    let line = |name: &str, f: &dyn Fn(&Column) -> f64, digits: usize| {
        let d = f(direct);
        let cell = |c: &Column| {
            let v = f(c);
            format!("{v:.digits$} ({:.2}×)", v / d)
        };
        println!(
            "{:<40} {:>10.digits$} {:>18} {:>18}",
            name,
            d,
            cell(zt),
            cell(nm)
        );
    };
    line("ping-pong 64 B, p50 µs", &|c| c.rtt.p50_us, 0);
    line("ping-pong 64 B, p99 µs", &|c| c.rtt.p99_us, 0);
    line("bulk echo (test app), MiB/s", &|c| c.rtt.mib_per_s, 0);
    line("iperf3, 1 stream, Gbit/s", &|c| c.iperf_gbit, 2);
    line("wrk keep-alive 16 conns, req/s", &|c| c.keep_alive.rps, 0);
    line("wrk keep-alive, p50 µs", &|c| c.keep_alive.p50_us, 0);
    line("wrk keep-alive, p99 µs", &|c| c.keep_alive.p99_us, 0);
    line("wrk new conn per request (8), req/s", &|c| c.close.rps, 0);
    line("connect + first byte, p50 µs", &|c| c.setup.0, 0);
    line("connect + first byte, p99 µs", &|c| c.setup.1, 0);
    // Rows of text: nothing for direct.
    let text = |name: &str, f: &dyn Fn(&Column) -> String| {
        println!("{:<40} {:>10} {:>18} {:>18}", name, "-", f(zt), f(nm));
    };
    let cpu = |r: &RequestRow| r.cpu_per_1000.map_or("-".into(), |v| format!("{v:.3}"));
    text("proxies' CPU s / 1000 req (keep-alive)", &|c| {
        cpu(&c.keep_alive)
    });
    text("proxies' CPU s / 1000 req (new conns)", &|c| cpu(&c.close));
    text("RSS per proxy, MiB", &|c| {
        c.rss_mib
            .iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    });
    println!(
        "(ztunnel: one per pod, 2 worker threads, client pod's TCP redirected by iptables; nodemesh: one agent per node, eBPF capture; both proxies' CPU summed; ratios to direct)"
    );
}
