//! An app can't tell it is meshed: ordinary blocking clients and real bulk
//! senders work with the default settings, a dying agent looks like a
//! reset connection, and the agent never runs out of file descriptors
//! before the apps do.
use std::{net::SocketAddr, process::Command, time::Duration};

use nodemesh_tests::{Agent, AgentOptions, Node, PodSpec, eventually, sys::in_netns};

const ECHO: u16 = 8080;
const MIB: u64 = 1 << 20;

/// One node, a meshed client and an unmeshed server, the agent as
/// configured by default.
fn bed() -> (
    Node,
    std::sync::Arc<nodemesh_tests::Pod>,
    std::sync::Arc<nodemesh_tests::Pod>,
) {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    (node, client, server)
}

fn captured(agent: &Agent) {
    agent.wait_metric("client captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 1.0
    });
}

pub fn an_ordinary_blocking_client_works_with_the_default_settings() {
    let (node, client, server) = bed();
    let agent = Agent::start_ready(&node, AgentOptions::default());
    captured(&agent);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    let to = SocketAddr::from((server.ip, ECHO));
    let mut failures = Vec::new();
    for run in 0..100 {
        match app.duplex_blocking(to, 4 * MIB) {
            Ok(x) if x.intact => {}
            Ok(x) => failures.push(format!("run {run}: not intact: {x:?}")),
            Err(f) => failures.push(format!("run {run}: {f:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 100 blocking full-duplex transfers failed: {failures:#?}",
        failures.len()
    );
    let m = agent.metrics();
    let sent = m.sum(
        "nodemesh_tcp_sent_bytes_total",
        &[("pod", "client"), ("direction", "outbound")],
    );
    assert_eq!(sent, (100 * 4 * MIB) as f64, "all of it through the agent");
}

pub fn iperf3_bulk_passes_with_the_default_settings() {
    let (node, client, server) = bed();
    let agent = Agent::start_ready(&node, AgentOptions::default());
    captured(&agent);
    let mut iperf_server = Command::new("iperf3");
    iperf_server.args(["--server", "--port", "5201"]);
    iperf_server.stdout(std::process::Stdio::null());
    let _server = ChildGuard(server.spawn(iperf_server));
    let ip = server.ip.to_string();
    let netns = server.netns.clone();
    eventually("iperf3 server listening", Duration::from_secs(10), || {
        if listening(&netns, 5201) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let mut failures = Vec::new();
    for run in 0..20 {
        let mut c = Command::new("iperf3");
        c.args(["--client", &ip, "--port", "5201", "--time", "1", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = client
            .spawn(c)
            .wait_with_output()
            .expect("iperf3 client ran");
        if !out.status.success() {
            failures.push(format!(
                "run {run}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("error"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 20 iperf3 runs failed: {failures:#?}",
        failures.len()
    );
    // Each run: a control and a data connection, through the agent.
    agent.wait_metric("40 connections through the agent", |m| {
        m.sum(
            "nodemesh_tcp_close_total",
            &[("pod", "client"), ("direction", "outbound")],
        ) >= 40.0
    });
}

/// Whether something listens on TCP `port` in the netns at `netns`.
fn listening(netns: &std::path::Path, port: u16) -> bool {
    let tables = in_netns(netns, || {
        ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .join("\n")
    });
    // local_address is hex "IP:PORT"; state 0A is LISTEN.
    let port = format!(":{port:04X} ");
    tables
        .lines()
        .any(|l| l.contains(&port) && l.split_whitespace().nth(3) == Some("0A"))
}

/// Kills the child when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn a_dying_agent_resets_what_it_carries_and_new_connections_fail_closed() {
    let (node, client, server) = bed();
    let mut agent = Agent::start_ready(&node, AgentOptions::default());
    captured(&agent);
    let mut src = server.tcp();
    src.source(9000);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    let to = SocketAddr::from((server.ip, 9000));
    let downloading = std::thread::spawn(move || (app.download(to, 10), app));
    agent.wait_metric("the download is going through the agent", |m| {
        m.sum(
            "nodemesh_tcp_received_bytes_total",
            &[("pod", "client"), ("direction", "outbound")],
        ) > (8 * MIB) as f64
    });
    agent.kill();
    let (download, mut app) = downloading.join().expect("the download thread");
    assert_eq!(
        download.end, "error",
        "a download cut by the agent's death must not look complete: {download:?}"
    );
    assert_eq!(
        download.error.as_ref().map(|f| f.kind.as_str()),
        Some("reset"),
        "{download:?}"
    );
    // Until an agent is back, the pod's new connections fail: never around
    // the proxy.
    let cut = app
        .exchange(SocketAddr::from((server.ip, ECHO)), 1000)
        .expect_err("no agent, no connection");
    assert_eq!(cut.kind, "refused", "{cut:?}");
    assert!(srv.peers(ECHO).is_empty(), "nothing reached the server");
    let agent = Agent::start_ready(&node, AgentOptions::default());
    captured(&agent);
    app.exchange_ok(SocketAddr::from((server.ip, ECHO)), 1000);
}

pub fn an_agent_under_a_low_open_file_limit_serves_many_connections() {
    let (node, client, server) = bed();
    let agent = Agent::start_ready(
        &node,
        AgentOptions {
            open_files: Some(1024),
            ..AgentOptions::default()
        },
    );
    captured(&agent);
    agent.wait_log("open-file limit raised");
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    let (held, failures) = app.hold(SocketAddr::from((server.ip, ECHO)), 1500);
    assert_eq!(held, 1500, "first failures: {failures:?}");
    // Each is two sockets in the agent; /metrics still answers.
    let m = agent.metrics();
    assert_eq!(
        m.sum(
            "nodemesh_tcp_open_connections",
            &[("pod", "client"), ("direction", "outbound")]
        ),
        1500.0,
        "{}",
        m.text
    );
    assert_eq!(app.release(), 1500);
    agent.wait_metric("all closed", |m| {
        m.sum(
            "nodemesh_tcp_open_connections",
            &[("pod", "client"), ("direction", "outbound")],
        ) == 0.0
    });
}
