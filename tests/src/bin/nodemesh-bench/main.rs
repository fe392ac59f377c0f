//! `cargo xtask bench`: the same-node path, direct vs meshed with and
//! without the sk_msg fast path; then, with an API server, inbound capture
//! (unmeshed clients to a meshed server, same node and across nodes),
//! same-node meshed to meshed, and the cross-node mutual-TLS tunnel, with
//! connection-setup times; on both, HTTP/1.1
//! keep-alive requests (wrk) and gRPC unary calls, direct vs meshed, with
//! the agents' CPU per 1000 requests. With `--peers ZTUNNEL`, only the
//! cross-node path beside istio's ztunnel (`peers.rs`). Prints tables;
//! asserts nothing about speed (these machines are shared and noisy).
mod peers;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use nodemesh_core::names::MESH_LABEL;
use nodemesh_tests::{
    Agent, AgentOptions, Cluster, Node, Pod, PodSpec, TcpApp,
    apps::{grpc, http},
    harness,
    kube::unique,
    mesh::{self, IdentityService, Install, Link},
};

const PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const GRPC_PORT: u16 = 50051;
/// wrk's connections (fixed concurrency) and seconds per run.
const WRK_CONNECTIONS: u32 = 16;
const WRK_SECONDS: u32 = 5;

struct Settings {
    agent: PathBuf,
    round_trips: u32,
    size: u32,
    bulk_mib: u64,
    repeats: usize,
    /// `--peers ZTUNNEL`: only the cross-node comparison with ztunnel.
    peers: Option<PathBuf>,
}

fn settings() -> Settings {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().skip_while(|a| *a != flag).nth(1).cloned();
    let number = |flag: &str, default: u64| {
        value(flag).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{flag} {v:?}: not a number");
                std::process::exit(2)
            })
        })
    };
    Settings {
        agent: value("--agent").map(PathBuf::from).unwrap_or_else(|| {
            eprintln!(
                "usage: nodemesh-bench --agent <nodemesh binary> [--round-trips N] [--size BYTES] [--bulk-mib N] [--repeats N] [--peers <ztunnel binary>]"
            );
            std::process::exit(2)
        }),
        round_trips: number("--round-trips", 20_000) as u32,
        size: number("--size", 64) as u32,
        bulk_mib: number("--bulk-mib", 512),
        repeats: number("--repeats", 3).max(1) as usize,
        peers: value("--peers").map(PathBuf::from),
    }
}

/// Medians over the repeats.
#[derive(Clone, Copy, Debug)]
struct Row {
    p50_us: f64,
    p99_us: f64,
    mib_per_s: f64,
}

fn main() {
    harness::play_role();
    let s = settings();
    if let Some(ztunnel) = &s.peers {
        peers::run(&s, ztunnel);
        return;
    }
    println!(
        "nodemesh bench: same-node path, {} round trips of {} bytes and {} MiB bulk echo, median of {} runs",
        s.round_trips, s.size, s.bulk_mib, s.repeats
    );
    let node = Node::new();
    let client = node.pod(PodSpec::new("bench", "client"));
    let server = node.pod(PodSpec::new("bench", "server"));
    node.write_pods(&[&client, &server]);
    let opts = |fast_path: bool| AgentOptions {
        binary: Some(s.agent.clone()),
        log: "warn".into(),
        ..AgentOptions::default().fast_path(fast_path)
    };
    let mut agent = Agent::start_ready(&node, opts(false));
    let mut srv = server.tcp();
    srv.listen(PORT);
    // The fast-path row needs reads that survive the kernel's spurious
    // EAGAIN (docs/datapath.md); harmless elsewhere.
    let mut app = client.tcp().tolerating_fast_path_eagain();
    let dst = SocketAddr::from((server.ip, PORT));
    let mut rss = Vec::new();

    let RequestApps {
        _hsrv: hsrv,
        _gsrv: gsrv,
        mut gcli,
        mut hcli,
        url,
        hto,
        rpc,
    } = request_apps(&client, &server);

    eprintln!("  running: direct (client not meshed)");
    let direct = measure(&mut app, dst, &s);
    let http_direct = wrk(&client, &url, &s, Wrk::KEEP_ALIVE, &[]);
    let seq_direct = sequential(&mut hcli, hto, &s, &[]);
    let grpc_direct = grpc_calls(&mut gcli, rpc, &s, &[]);

    client.set_label(MESH_LABEL, Some("enabled"));
    node.write_pods(&[&client, &server]);
    agent.wait_metric("client captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 1.0
    });
    eprintln!("  running: meshed, fast path off (the default)");
    let off = measure(&mut app, dst, &s);
    let http_meshed = wrk(&client, &url, &s, Wrk::KEEP_ALIVE, &pids(&[&agent]));
    let seq_meshed = sequential(&mut hcli, hto, &s, &[&agent]);
    let grpc_meshed = grpc_calls(&mut gcli, rpc, &s, &[&agent]);
    rss.push(agent.rss_kib());
    check_captured(&agent, &client, &s);
    check_requests(&agent);

    agent.stop(std::time::Duration::from_secs(10));
    let agent = Agent::start_ready(&node, opts(true));
    agent.wait_metric("client captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 1.0
    });
    eprintln!("  running: meshed, fast path on");
    let on = measure(&mut app, dst, &s);
    rss.push(agent.rss_kib());

    print_rows(
        "path",
        &[
            ("direct (not meshed)", direct),
            ("meshed, fast path off (default)", off),
            ("meshed, fast path on", on),
        ],
    );
    let rss: Vec<String> = rss
        .iter()
        .map(|k| k.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)))
        .collect();
    println!(
        "\nagent RSS after the meshed runs: fast path off {}, fast path on {}",
        rss[0], rss[1]
    );
    println!(
        "(bulk: bytes sent one way per second while the echo comes back on the same connection)"
    );
    print_requests(
        "same node",
        &[
            ("HTTP/1.1 1 KiB, direct", http_direct),
            ("HTTP/1.1 1 KiB, meshed", http_meshed),
            ("one at a time, direct", seq_direct),
            ("one at a time, meshed", seq_meshed),
            ("gRPC unary, direct", grpc_direct),
            ("gRPC unary, meshed", grpc_meshed),
        ],
    );
    drop((app, srv, agent, hsrv, gsrv, gcli, hcli));
    drop(node);
    cross_node(&s);
}

/// Two nodes on a link, with the API server, the identity service and
/// meshed agents: direct vs the mutual-TLS tunnel.
fn cross_node(s: &Settings) {
    println!();
    println!(
        "nodemesh bench: cross-node path (two nodes on a link), same sizes; starting an API server"
    );
    // Short, so that pausing between connections measures a new tunnel.
    cross_node_bed(s, "bench", &["--tunnel-idle-timeout", "1s"], |bed| {
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
        // A client on the server's node, for the same-node rows.
        let near = cluster.run_pod(b, PodSpec::new(ns, "near").service_account("near"));
        let mut srv = server.tcp();
        srv.listen(PORT);
        let mut app = client.tcp();
        let mut near_app = near.tcp();
        let dst = SocketAddr::from((server.ip, PORT));

        let RequestApps {
            _hsrv: _http_server,
            _gsrv: _grpc_server,
            mut gcli,
            mut hcli,
            url,
            hto,
            rpc,
        } = request_apps(&client, &server);

        eprintln!("  running: direct, nothing meshed (same node, then cross-node)");
        let near_direct = measure(&mut near_app, dst, s);
        let direct = measure(&mut app, dst, s);
        let direct_setup = setup(&mut app, dst, 200, Duration::ZERO);
        let http_direct = wrk(&client, &url, s, Wrk::KEEP_ALIVE, &[]);
        let seq_direct = sequential(&mut hcli, hto, s, &[]);
        let grpc_direct = grpc_calls(&mut gcli, rpc, s, &[]);
        // Inbound capture alone: the server meshed, its clients not.
        cluster.label_pod(&server, MESH_LABEL, Some("enabled"));
        agent_b.wait_metric("server captured with its certificate", |m| {
            m.sum("nodemesh_meshed_pods", &[]) == 1.0
                && m.sum("nodemesh_identity_certificates", &[]) == 1.0
        });
        eprintln!("  running: unmeshed clients to the meshed server (inbound capture)");
        let near_inbound = measure(&mut near_app, dst, s);
        let inbound = measure(&mut app, dst, s);
        // Same node, both meshed: once through the proxy.
        cluster.label_pod(&near, MESH_LABEL, Some("enabled"));
        agent_b.wait_metric("near client captured with its certificate", |m| {
            m.sum("nodemesh_meshed_pods", &[]) == 2.0
                && m.sum("nodemesh_identity_certificates", &[]) == 2.0
        });
        eprintln!("  running: same node, meshed to meshed");
        let near_meshed = measure(&mut near_app, dst, s);
        let m = agent_b.metrics();
        let plain_in = m.sum(
            "nodemesh_tcp_peer_open_total",
            &[
                ("pod", "server"),
                ("direction", "inbound"),
                ("tls", "false"),
                ("peer_identity", ""),
            ],
        );
        assert!(
            plain_in >= (s.repeats * 4) as f64,
            "the inbound runs were not captured: {plain_in} connections"
        );
        print_rows(
            "same node (API server bed)",
            &[
                ("direct (not meshed)", near_direct),
                ("unmeshed → meshed (inbound)", near_inbound),
                ("meshed → meshed (one pass)", near_meshed),
            ],
        );
        drop(near_app);

        cluster.label_pod(&client, MESH_LABEL, Some("enabled"));
        agent_a.wait_metric("client captured with its certificate", |m| {
            m.sum("nodemesh_meshed_pods", &[]) == 1.0
                && m.sum("nodemesh_identity_certificates", &[]) == 1.0
        });
        eprintln!("  running: cross-node meshed (mTLS tunnel)");
        let meshed = measure(&mut app, dst, s);
        let http_meshed = wrk(
            &client,
            &url,
            s,
            Wrk::KEEP_ALIVE,
            &pids(&[agent_a, agent_b]),
        );
        let seq_meshed = sequential(&mut hcli, hto, s, &[agent_a, agent_b]);
        let grpc_meshed = grpc_calls(&mut gcli, rpc, s, &[agent_a, agent_b]);
        check_requests(agent_a);
        let reused_setup = setup(&mut app, dst, 200, Duration::ZERO);
        eprintln!("  running: connection setup with a new tunnel each time (idle timeout 1s)");
        let new_setup = setup(&mut app, dst, 8, Duration::from_millis(2500));
        let m = agent_a.metrics();
        let streams = m.sum(
            "nodemesh_tunnel_streams_total",
            &[("direction", "outbound")],
        );
        let tunnels = m.sum(
            "nodemesh_tunnel_connections_total",
            &[("direction", "outbound")],
        );
        assert!(
            streams >= (s.repeats * 2 + 200) as f64,
            "the meshed runs did not go through the tunnel: {streams} streams"
        );

        print_rows(
            "cross-node path",
            &[
                ("direct (not meshed)", direct),
                ("unmeshed → meshed (inbound)", inbound),
                ("meshed (mTLS, two agents)", meshed),
            ],
        );
        println!();
        println!(
            "{:<26} {:>9} {:>9} {:>10} {:>10} {:>8}",
            "connection setup", "p50 µs", "p99 µs", "p50 ×direct", "p99 ×direct", "samples"
        );
        for (name, row) in [
            ("direct (not meshed)", direct_setup),
            ("meshed, reused tunnel", reused_setup),
            ("meshed, new tunnel", new_setup),
        ] {
            println!(
                "{:<26} {:>9.1} {:>9.1} {:>10.2} {:>10.2} {:>8}",
                name,
                row.0,
                row.1,
                row.0 / direct_setup.0,
                row.1 / direct_setup.1,
                row.2
            );
        }
        let rss = |agent: &Agent| {
            agent
                .rss_kib()
                .map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
        };
        println!(
            "\nagent RSS after the cross-node runs: node a (client) {}, node b (server) {}",
            rss(agent_a),
            rss(agent_b)
        );
        println!(
            "(setup: connect plus a first 1-byte round trip; {tunnels} tunnel connections carried {streams} streams)"
        );
        print_requests(
            "cross-node (mTLS)",
            &[
                ("HTTP/1.1 1 KiB, direct", http_direct),
                ("HTTP/1.1 1 KiB, meshed", http_meshed),
                ("one at a time, direct", seq_direct),
                ("one at a time, meshed", seq_meshed),
                ("gRPC unary, direct", grpc_direct),
                ("gRPC unary, meshed", grpc_meshed),
            ],
        );
    })
}

/// Two nodes on a link with their own API server, nodemesh installed,
/// the identity service on node `a`, the bench's agent on each (with
/// `agent_args`), and a namespace (`prefix`) for the pods, labelled by the
/// runs: what `run` measures on. Torn down after it, in reverse order.
struct CrossNode<'a> {
    cluster: &'a Cluster,
    a: &'a Node,
    b: &'a Node,
    agent_a: Agent,
    agent_b: Agent,
    ns: String,
}

fn cross_node_bed<R>(
    s: &Settings,
    prefix: &str,
    agent_args: &[&str],
    run: impl FnOnce(&CrossNode<'_>) -> R,
) -> R {
    // Declared first, so it stops last.
    let cluster = &Cluster::start();
    let a = Node::new();
    let b = Node::new();
    let _link = Link::connect(&[&a, &b]);
    let install = Install::apply(cluster, &a.dir);
    let identity = IdentityService::start(&a, &install, "24h");
    let opts = |node: &Node| {
        let options = agent_args.iter().fold(
            mesh::mesh_agent_options(&install, &identity, node),
            |o, arg| o.arg(arg),
        );
        AgentOptions {
            binary: Some(s.agent.clone()),
            log: "warn".into(),
            ..options
        }
    };
    let ns = unique(prefix);
    cluster.namespace(&ns, &[]);
    let bed = CrossNode {
        cluster,
        a: &a,
        b: &b,
        agent_a: Agent::start_ready(&a, opts(&a)),
        agent_b: Agent::start_ready(&b, opts(&b)),
        ns,
    };
    run(&bed)
}

/// The servers and clients of the request rows.
struct RequestApps {
    _hsrv: nodemesh_tests::HttpApp,
    _gsrv: nodemesh_tests::GrpcApp,
    gcli: nodemesh_tests::GrpcApp,
    hcli: nodemesh_tests::HttpApp,
    /// wrk's URL, the HTTP app's and the gRPC app's addresses.
    url: String,
    hto: SocketAddr,
    rpc: SocketAddr,
}

/// An HTTP server answering 1 KiB and a gRPC server in `server`; their
/// clients in `client`.
fn request_apps(client: &Pod, server: &Pod) -> RequestApps {
    let mut hsrv = server.http();
    hsrv.serve(
        HTTP_PORT,
        http::Knobs {
            bytes: 1024,
            ..http::Knobs::default()
        },
    );
    let mut gsrv = server.grpc();
    gsrv.serve(GRPC_PORT, grpc::Knobs::default());
    RequestApps {
        _hsrv: hsrv,
        _gsrv: gsrv,
        gcli: client.grpc(),
        hcli: client.http(),
        url: format!("http://{}:{HTTP_PORT}/", server.ip),
        hto: SocketAddr::from((server.ip, HTTP_PORT)),
        rpc: SocketAddr::from((server.ip, GRPC_PORT)),
    }
}

/// Requests: medians over the repeats.
#[derive(Clone, Copy, Debug)]
struct RequestRow {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds of the agents per 1000 requests (none for direct).
    cpu_per_1000: Option<f64>,
}

/// Clock ticks of user and system time `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    nodemesh_tests::sys::cpu_ticks(pid)
}

/// The agents' processes (what a meshed run's CPU is charged to).
fn pids(agents: &[&Agent]) -> Vec<u32> {
    agents.iter().filter_map(|a| a.pid()).collect()
}

/// CPU seconds (user and system) the processes have used.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids.iter().copied().map(cpu_ticks).sum();
    // /proc counts in USER_HZ, 100 on Linux whatever the kernel tick.
    ticks as f64 / 100.0
}

/// How wrk connects.
#[derive(Clone, Copy, Debug)]
struct Wrk {
    connections: u32,
    /// `Connection: close`: a new connection for every request.
    close: bool,
}

impl Wrk {
    const KEEP_ALIVE: Wrk = Wrk {
        connections: WRK_CONNECTIONS,
        close: false,
    };
}

/// HTTP/1.1 GETs with wrk from the client pod, the CPU of `pids` (the
/// proxies) measured around each run.
fn wrk(client: &Pod, url: &str, s: &Settings, how: Wrk, pids: &[u32]) -> RequestRow {
    let mut rows = Vec::new();
    for _ in 0..s.repeats {
        let cpu0 = cpu_seconds(pids);
        let mut cmd = std::process::Command::new("wrk");
        cmd.args([
            "-t2",
            &format!("-c{}", how.connections),
            &format!("-d{WRK_SECONDS}s"),
            "--latency",
        ]);
        if how.close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = client
            .spawn(cmd)
            .wait_with_output()
            .expect("run wrk (cargo xtask setup installs it)");
        let cpu = cpu_seconds(pids) - cpu0;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = |prefix: &str| {
            text.lines()
                .map(str::trim)
                .find(|l| l.starts_with(prefix))
                .map(|l| l[prefix.len()..].trim().to_owned())
        };
        let rps: f64 = line("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "wrk said:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let p50 = line("50%")
            .and_then(|v| nodemesh_tests::wrk::micros(&v))
            .unwrap_or(f64::NAN);
        let p99 = line("99%")
            .and_then(|v| nodemesh_tests::wrk::micros(&v))
            .unwrap_or(f64::NAN);
        let requests = rps * f64::from(WRK_SECONDS);
        rows.push(RequestRow {
            rps,
            p50_us: p50,
            p99_us: p99,
            cpu_per_1000: (!pids.is_empty()).then(|| cpu / (requests / 1000.0)),
        });
    }
    median_row(rows)
}

/// HTTP/1.1 requests one at a time on one keep-alive connection (the
/// latency the mesh adds to an unloaded request).
fn sequential(
    app: &mut nodemesh_tests::HttpApp,
    to: SocketAddr,
    s: &Settings,
    agents: &[&Agent],
) -> RequestRow {
    let requests = 5_000;
    let _ = app.run(http::Run::get(to, "/", 200));
    let mut rows = Vec::new();
    for _ in 0..s.repeats {
        let cpu0 = cpu_seconds(&pids(agents));
        let start = std::time::Instant::now();
        let outcomes = app.run(http::Run::get(to, "/", requests));
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(&pids(agents)) - cpu0;
        assert!(
            outcomes.iter().all(|o| o.status == Some(200)),
            "requests failed"
        );
        rows.push(timed_row(
            outcomes.iter().map(|o| o.micros),
            elapsed,
            (!agents.is_empty()).then_some(cpu),
        ));
    }
    median_row(rows)
}

/// gRPC unary calls, 16 at a time, from the client pod's gRPC app.
fn grpc_calls(
    app: &mut nodemesh_tests::GrpcApp,
    to: SocketAddr,
    s: &Settings,
    agents: &[&Agent],
) -> RequestRow {
    let calls = 20_000;
    let _ = app.run(grpc::Run::unary(to, 200));
    let mut rows = Vec::new();
    for _ in 0..s.repeats {
        let cpu0 = cpu_seconds(&pids(agents));
        let start = std::time::Instant::now();
        let outcomes = app.run(grpc::Run {
            concurrency: WRK_CONNECTIONS,
            ..grpc::Run::unary(to, calls)
        });
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(&pids(agents)) - cpu0;
        assert!(outcomes.iter().all(|o| o.code == 0), "gRPC calls failed");
        rows.push(timed_row(
            outcomes.iter().map(|o| o.micros),
            elapsed,
            (!agents.is_empty()).then_some(cpu),
        ));
    }
    median_row(rows)
}

/// One run of requests the test app timed (µs each) in `elapsed` seconds,
/// with the proxies' CPU seconds if any.
fn timed_row(micros: impl Iterator<Item = u64>, elapsed: f64, cpu: Option<f64>) -> RequestRow {
    let mut micros: Vec<u32> = micros.map(|m| m.min(u64::from(u32::MAX)) as u32).collect();
    micros.sort_unstable();
    let requests = micros.len() as f64;
    RequestRow {
        rps: requests / elapsed,
        p50_us: percentile(&micros, 0.50),
        p99_us: percentile(&micros, 0.99),
        cpu_per_1000: cpu.map(|cpu| cpu / (requests / 1000.0)),
    }
}

fn median_row(rows: Vec<RequestRow>) -> RequestRow {
    RequestRow {
        rps: median(rows.iter().map(|r| r.rps).collect()),
        p50_us: median(rows.iter().map(|r| r.p50_us).collect()),
        p99_us: median(rows.iter().map(|r| r.p99_us).collect()),
        cpu_per_1000: rows
            .iter()
            .map(|r| r.cpu_per_1000)
            .collect::<Option<Vec<f64>>>()
            .map(median),
    }
}

/// Request rows in pairs (direct, meshed): the meshed one shows what the
/// mesh adds.
fn print_requests(title: &str, rows: &[(&str, RequestRow)]) {
    println!();
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>9} {:>9} {:>14}",
        format!("requests, {title}"),
        "req/s",
        "p50 µs",
        "p99 µs",
        "+p50 µs",
        "+p99 µs",
        "agent CPU s/1k"
    );
    for pair in rows.chunks(2) {
        let base = pair[0].1;
        for (name, row) in pair {
            let added = |v: f64, b: f64| {
                if row.cpu_per_1000.is_some() {
                    format!("{:.0}", v - b)
                } else {
                    "-".into()
                }
            };
            println!(
                "{:<28} {:>10.0} {:>9.0} {:>9.0} {:>9} {:>9} {:>14}",
                name,
                row.rps,
                row.p50_us,
                row.p99_us,
                added(row.p50_us, base.p50_us),
                added(row.p99_us, base.p99_us),
                row.cpu_per_1000.map_or("-".into(), |c| format!("{c:.3}")),
            );
        }
    }
    println!(
        "(HTTP: wrk, {WRK_CONNECTIONS} keep-alive connections, {WRK_SECONDS} s; one at a time: the test app, 5000 requests on one connection; gRPC: the test app, {WRK_CONNECTIONS} calls at a time; CPU: the meshed path's agents, user+system)"
    );
}

/// The meshed request runs really went through the HTTP path.
fn check_requests(agent: &Agent) {
    let m = agent.metrics();
    let n = m.sum("nodemesh_request_total", &[]);
    assert!(
        n >= 1000.0,
        "the meshed runs were not seen as requests: {n}"
    );
}

/// A latency/throughput table; the first row is the baseline.
fn print_rows(title: &str, rows: &[(&str, Row)]) {
    let Some(&(_, direct)) = rows.first() else {
        return;
    };
    println!();
    println!(
        "{:<32} {:>9} {:>9} {:>10} {:>10} {:>11} {:>11}",
        title, "p50 µs", "p99 µs", "p50 ×direct", "p99 ×direct", "bulk MiB/s", "bulk ×direct"
    );
    for (name, row) in rows {
        println!(
            "{:<32} {:>9.1} {:>9.1} {:>10.2} {:>10.2} {:>11.0} {:>11.2}",
            name,
            row.p50_us,
            row.p99_us,
            row.p50_us / direct.p50_us,
            row.p99_us / direct.p99_us,
            row.mib_per_s,
            row.mib_per_s / direct.mib_per_s,
        );
    }
}

/// Connection setup times: (p50, p99, samples).
fn setup(app: &mut TcpApp, dst: SocketAddr, count: u32, pause: Duration) -> (f64, f64, usize) {
    let mut micros = app
        .setup(dst, count, pause)
        .unwrap_or_else(|f| panic!("connection setup: {f:?}"));
    micros.sort_unstable();
    (
        percentile(&micros, 0.50),
        percentile(&micros, 0.99),
        micros.len(),
    )
}

fn measure(app: &mut TcpApp, dst: SocketAddr, s: &Settings) -> Row {
    let _ = app.round_trips(dst, 500, s.size).expect("warm-up");
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut tput = Vec::new();
    for _ in 0..s.repeats {
        let mut micros = app
            .round_trips(dst, s.round_trips, s.size)
            .unwrap_or_else(|f| panic!("round trips: {f:?}"));
        micros.sort_unstable();
        p50.push(percentile(&micros, 0.50));
        p99.push(percentile(&micros, 0.99));
        let bytes = s.bulk_mib << 20;
        let elapsed = app
            .bulk(dst, bytes)
            .unwrap_or_else(|f| panic!("bulk: {f:?}"));
        tput.push(bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64());
    }
    Row {
        p50_us: median(p50),
        p99_us: median(p99),
        mib_per_s: median(tput),
    }
}

/// The meshed runs really went through the agent.
fn check_captured(agent: &Agent, client: &Arc<Pod>, s: &Settings) {
    let m = agent.metrics();
    let opened = m.sum("nodemesh_tcp_open_total", &[("pod", client.name.as_str())]);
    assert!(
        opened >= (1 + s.repeats * 2) as f64,
        "the meshed runs did not go through the agent: {opened} connections"
    );
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
