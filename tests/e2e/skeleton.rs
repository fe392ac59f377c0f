//! The walking skeleton: eBPF steers a meshed pod's connections into the
//! node's one proxy; everything else is left alone.
//!
//! Longer than 500 lines on purpose: one scenario family, each test a
//! story read top to bottom; splitting would scatter the shared checks.
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use nodemesh_core::names::MESH_LABEL;
use nodemesh_tests::{
    Agent, AgentOptions, Metrics, Node, Pod, PodSpec, agent, eventually, node::PodEntry,
};

const ECHO: u16 = 8080;
const MIB: u64 = 1 << 20;

fn pod_labels(pod: &Pod) -> [(&str, &str); 3] {
    [
        ("namespace", pod.namespace.as_str()),
        ("pod", pod.name.as_str()),
        ("direction", "outbound"),
    ]
}

fn opened(m: &Metrics, pod: &Pod) -> f64 {
    m.sum("nodemesh_tcp_open_total", &pod_labels(pod))
}

fn closed(m: &Metrics, pod: &Pod) -> f64 {
    m.sum("nodemesh_tcp_close_total", &pod_labels(pod))
}

fn meshed(m: &Metrics) -> f64 {
    m.sum("nodemesh_meshed_pods", &[])
}

fn echo(pod: &Pod) -> SocketAddr {
    SocketAddr::from((pod.ip, ECHO))
}

/// A redirected socket is connected to the listener in its own netns (the
/// kernel's view: the app itself sees its pod's address and its server).
fn was_redirected(x: &nodemesh_tests::Exchange) -> bool {
    x.redirected()
}

/// Waits until every connection the agent opened for `pod` has closed and
/// returns that scrape.
fn settled(agent: &Agent, pod: &Pod, opens: f64) -> Metrics {
    agent.wait_metric(
        &format!("{} has {opens} closed connections", pod.key()),
        |m| opened(m, pod) == opens && closed(m, pod) == opens,
    )
}

pub fn meshed_pod_goes_through_the_agent() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let agent = Agent::start_ready(&node, AgentOptions::default());
    agent.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();

    let before = agent.metrics();
    assert_eq!(opened(&before, &client), 0.0);

    let small = app.exchange_ok(echo(&server), 11);
    assert!(
        was_redirected(&small),
        "the connect was not redirected: {small:?}"
    );
    // The app sees what it would without the mesh: its own address, and
    // the server it dialled.
    assert_eq!(small.peer, echo(&server), "getpeername: {small:?}");
    assert_eq!(
        small.local.ip(),
        IpAddr::V4(client.ip),
        "getsockname: {small:?}"
    );
    let m = settled(&agent, &client, 1.0);
    assert_eq!(
        m.sum("nodemesh_tcp_sent_bytes_total", &pod_labels(&client)),
        11.0
    );
    assert_eq!(
        m.sum("nodemesh_tcp_received_bytes_total", &pod_labels(&client)),
        11.0
    );
    assert_eq!(
        m.sum("nodemesh_tcp_open_connections", &pod_labels(&client)),
        0.0
    );
    // The proxy connected from inside the pod: the server sees the pod.
    let peers = srv.peers(ECHO);
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].ip(), IpAddr::V4(client.ip));

    let big = 4 * MIB + 123;
    app.exchange_ok(echo(&server), big);
    let m = settled(&agent, &client, 2.0);
    assert_eq!(
        m.sum("nodemesh_tcp_sent_bytes_total", &pod_labels(&client)),
        (11 + big) as f64
    );
    assert_eq!(
        m.sum("nodemesh_tcp_received_bytes_total", &pod_labels(&client)),
        (11 + big) as f64
    );
    assert_eq!(
        opened(&m, &server),
        0.0,
        "the unmeshed server is not captured"
    );

    // The admin server's other endpoints.
    assert_eq!(agent.get("/live").expect("GET /live").0, 200);
    assert_eq!(agent.get("/ready").expect("GET /ready").0, 200);
    assert_eq!(agent.get("/nope").expect("GET /nope").0, 404);
}

pub fn unmeshed_pod_is_left_alone() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "plain"));
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let agent = Agent::start_ready(&node, AgentOptions::default());
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    let x = app.exchange_ok(echo(&server), MIB);
    assert_eq!(x.local.ip(), IpAddr::V4(client.ip), "not redirected: {x:?}");
    let m = agent.metrics();
    assert_eq!(meshed(&m), 0.0);
    assert_eq!(m.sum("nodemesh_tcp_open_total", &[]), 0.0, "{}", m.text);
    assert_eq!(srv.peers(ECHO).len(), 1);
}

pub fn labelling_captures_and_unlabelling_releases_live() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client"));
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let agent = Agent::start_ready(&node, AgentOptions::default());
    let mut srv = server.tcp();
    srv.listen(ECHO);
    // One container process for the whole test: no pod restart.
    let mut app = client.tcp();

    let x = app.exchange_ok(echo(&server), 1000);
    assert!(!was_redirected(&x));
    assert_eq!(opened(&agent.metrics(), &client), 0.0);

    client.set_label(MESH_LABEL, Some("enabled"));
    node.write_pods(&[&client, &server]);
    agent.wait_metric("client captured after labelling", |m| meshed(m) == 1.0);
    let x = app.exchange_ok(echo(&server), 1000);
    assert!(was_redirected(&x), "{x:?}");
    settled(&agent, &client, 1.0);
    assert_eq!(node.pinned_pod_links(), std::slice::from_ref(&client.uid));

    client.set_label(MESH_LABEL, None);
    node.write_pods(&[&client, &server]);
    let m = agent.wait_metric("client released after unlabelling", |m| meshed(m) == 0.0);
    assert_eq!(
        opened(&m, &client),
        0.0,
        "the released pod's series are gone"
    );
    let x = app.exchange_ok(echo(&server), 1000);
    assert!(!was_redirected(&x), "{x:?}");
    assert_eq!(opened(&agent.metrics(), &client), 0.0);
    assert!(node.pinned_pod_links().is_empty());
    agent.wait_log("pod released");
}

pub fn fast_path_carries_the_bytes_when_on_and_not_when_off() {
    for fast_path in [true, false] {
        let node = Node::new();
        let client = node.pod(PodSpec::new("demo", "client").meshed());
        let server = node.pod(PodSpec::new("demo", "server"));
        node.write_pods(&[&client, &server]);
        let agent = Agent::start_ready(&node, AgentOptions::default().fast_path(fast_path));
        agent.wait_metric("client captured", |m| meshed(m) == 1.0);
        let mut srv = server.tcp();
        srv.listen(ECHO);
        let mut app = client.tcp();
        let bytes = 2 * MIB;
        app.exchange_ok(echo(&server), bytes);
        let m = settled(&agent, &client, 1.0);
        let to = |side| {
            let [ns, pod, dir] = pod_labels(&client);
            m.sum(
                "nodemesh_fastpath_bytes_total",
                &[ns, pod, dir, ("to", side)],
            )
        };
        assert_eq!(
            m.sum("nodemesh_tcp_sent_bytes_total", &pod_labels(&client)),
            bytes as f64
        );
        if fast_path {
            assert_eq!(
                to("proxy"),
                bytes as f64,
                "app→proxy bytes all went socket-to-socket\n{}",
                m.text
            );
            assert_eq!(
                to("app"),
                bytes as f64,
                "proxy→app bytes all went socket-to-socket\n{}",
                m.text
            );
        } else {
            assert_eq!(to("proxy") + to("app"), 0.0, "fast path off\n{}", m.text);
        }
    }
}

pub fn agent_upstream_connections_are_never_redirected() {
    let node = Node::new();
    let a = node.pod(PodSpec::new("demo", "a").meshed());
    let b = node.pod(PodSpec::new("demo", "b").meshed());
    node.write_pods(&[&a, &b]);
    let agent = Agent::start_ready(&node, AgentOptions::default());
    agent.wait_metric("both captured", |m| meshed(m) == 2.0);
    let mut b_app = b.tcp();
    b_app.listen(ECHO);
    let mut a_app = a.tcp();
    a_app.listen(ECHO);

    // a → b: one connection reaches b, from a's address; the agent's own
    // upstream socket (made in a's netns) is not redirected again.
    a_app.exchange_ok(echo(&b), 64 * 1024);
    let m = settled(&agent, &a, 1.0);
    assert_eq!(opened(&m, &b), 0.0);
    let peers = b_app.peers(ECHO);
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].ip(), IpAddr::V4(a.ip));

    // a → a's own address: still exactly one proxied connection.
    a_app.exchange_ok(echo(&a), 64 * 1024);
    settled(&agent, &a, 2.0);
    let peers = a_app.peers(ECHO);
    assert_eq!(peers.len(), 1, "{peers:?}");
}

pub fn bypassed_destinations_go_direct() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    let other = node.pod(PodSpec::new("demo", "other"));
    node.write_pods(&[&client, &server, &other]);
    let agent = Agent::start_ready(
        &node,
        AgentOptions::default()
            .arg("--bypass-port")
            .arg("9000")
            .arg("--bypass-cidr")
            .arg(&format!("{}/32", other.ip)),
    );
    agent.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    srv.listen(9000);
    let mut oth = other.tcp();
    oth.listen(ECHO);
    let mut app = client.tcp();

    let x = app.exchange_ok(SocketAddr::from((server.ip, 9000)), 100);
    assert!(!was_redirected(&x), "bypassed port: {x:?}");
    let x = app.exchange_ok(echo(&other), 100);
    assert!(!was_redirected(&x), "bypassed CIDR: {x:?}");
    let x = app.exchange_ok(echo(&server), 100);
    assert!(was_redirected(&x), "not bypassed: {x:?}");
    // The mesh's own port is no bypass on any other address.
    srv.listen(15001);
    let x = app.exchange_ok(SocketAddr::from((server.ip, 15001)), 100);
    assert!(was_redirected(&x), "port 15001 elsewhere: {x:?}");
    settled(&agent, &client, 2.0);
}

pub fn pods_that_cannot_be_captured_are_reported_and_retried() {
    let node = Node::new();
    let good = node.pod(PodSpec::new("demo", "good").meshed());
    let no_cgroup = node.pod(PodSpec::new("demo", "no-cgroup").meshed());
    let no_netns = node.pod(PodSpec::new("demo", "no-netns").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    let broken = |pod: &Pod, cgroup: Option<&str>, netns: Option<&str>| PodEntry {
        cgroup: cgroup.map(Into::into).unwrap_or(pod.cgroup_rel.clone()),
        netns: Some(netns.map(Into::into).unwrap_or(pod.netns.clone())),
        ..pod.entry()
    };
    node.write_pod_entries(&[
        good.entry(),
        broken(
            &no_cgroup,
            Some("kubepods.slice/kubepods-podmissing.slice"),
            None,
        ),
        broken(&no_netns, None, Some("/run/netns/nmt-does-not-exist")),
        server.entry(),
    ]);
    let agent = Agent::start_ready(&node, AgentOptions::default());
    let m = agent.wait_metric("both problems counted", |m| {
        m.sum(
            "nodemesh_pod_capture_errors_total",
            &[("reason", "cgroup_not_found")],
        ) == 1.0
            && m.sum(
                "nodemesh_pod_capture_errors_total",
                &[("reason", "netns_not_found")],
            ) == 1.0
    });
    assert_eq!(meshed(&m), 1.0);
    let log = agent.wait_log("demo/no-netns");
    assert!(log.contains("cannot capture pod"), "{log}");
    assert!(
        log.contains("kubepods-podmissing.slice"),
        "the log names the cgroup"
    );

    // The good pod is served.
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = good.tcp();
    assert!(was_redirected(&app.exchange_ok(echo(&server), 1000)));
    // The pod whose netns was wrong is attached but not served: its
    // connections are refused, never made around the proxy. The one whose
    // cgroup is missing has nothing attached.
    let mut links = vec![good.uid.clone(), no_netns.uid.clone()];
    links.sort();
    assert_eq!(node.pinned_pod_links(), links);
    let mut stray = no_netns.tcp();
    let refused = stray
        .exchange(echo(&server), 1000)
        .expect_err("fail closed");
    assert_eq!(refused.kind, "denied", "{refused:?}");
    assert!(srv.peers(ECHO).iter().all(|p| p.ip() != no_netns.ip));

    // Retries do not log or count the same problem again.
    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.metrics();
    assert_eq!(
        m.sum("nodemesh_pod_capture_errors_total", &[]),
        2.0,
        "{}",
        m.text
    );
    let mentions = agent.log().matches("cannot capture pod").count();
    assert_eq!(mentions, 2, "each problem logged once");

    // Fixed entries are captured on the next retry, with no restart.
    node.write_pods(&[&good, &no_cgroup, &no_netns, &server]);
    agent.wait_metric("all three captured", |m| meshed(m) == 3.0);
    assert!(was_redirected(&stray.exchange_ok(echo(&server), 1000)));
}

pub fn a_malformed_pod_file_keeps_the_last_good_pods() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let agent = Agent::start_ready(&node, AgentOptions::default());
    agent.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();

    node.write_pod_file_raw("pods: [ {namespace: demo, name: ");
    agent.wait_metric("parse error counted", |m| {
        m.sum("nodemesh_pod_source_errors_total", &[("reason", "parse")]) == 1.0
    });
    agent.wait_log("pod file is malformed");
    let x = app.exchange_ok(echo(&server), 1000);
    assert!(was_redirected(&x), "still captured: {x:?}");
    assert_eq!(meshed(&agent.metrics()), 1.0);

    // One bad entry among good ones: skipped, counted, the rest applies.
    let mut bad = client.entry();
    bad.uid = "../../etc".into();
    client.set_label(MESH_LABEL, None);
    node.write_pod_entries(&[client.entry(), server.entry(), bad]);
    agent.wait_metric("client released, bad entry counted", |m| {
        meshed(m) == 0.0
            && m.sum(
                "nodemesh_pod_source_errors_total",
                &[("reason", "invalid_pod")],
            ) == 1.0
    });
    assert!(!was_redirected(&app.exchange_ok(echo(&server), 1000)));
}

pub fn unreachable_destinations_reset_the_client() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let agent = Agent::start_ready(
        &node,
        AgentOptions::default().arg("--connect-timeout").arg("4s"),
    );
    agent.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    let reason = |m: &Metrics, r: &str| {
        let [ns, pod, dir] = pod_labels(&client);
        m.sum(
            "nodemesh_tcp_connect_errors_total",
            &[ns, pod, dir, ("reason", r)],
        )
    };

    // Nothing listens: refused. Without the mesh connect() would fail; with
    // it the client's connection is reset.
    let f = app
        .exchange(SocketAddr::from((server.ip, 9999)), 100)
        .unwrap_err();
    assert_eq!(f.kind, "reset", "{f:?}");
    agent.wait_metric("refused counted", |m| reason(m, "refused") == 1.0);
    agent.wait_log("cannot connect to destination");

    // Nobody has the address (ARP fails): unreachable.
    let f = app
        .exchange_with_timeout(
            SocketAddr::from((node.unused_ip(), 80)),
            100,
            Duration::from_secs(10),
        )
        .unwrap_err();
    assert_eq!(f.kind, "reset", "{f:?}");
    agent.wait_metric("unreachable counted", |m| reason(m, "unreachable") == 1.0);

    // Packets dropped silently: the connect timeout.
    let f = app
        .exchange_with_timeout(
            SocketAddr::from(([198, 51, 100, 1], 80)),
            100,
            Duration::from_secs(10),
        )
        .unwrap_err();
    assert_eq!(f.kind, "reset", "{f:?}");
    agent.wait_metric("timeout counted", |m| reason(m, "timeout") == 1.0);

    // And the agent goes on serving.
    assert!(was_redirected(&app.exchange_ok(echo(&server), MIB)));
    let m = settled(&agent, &client, 4.0);
    assert_eq!(
        m.sum("nodemesh_tcp_connect_errors_total", &pod_labels(&client)),
        3.0
    );
}

pub fn a_restarted_agent_takes_over_without_bypass() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let mut first = Agent::start_ready(&node, AgentOptions::default());
    first.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    assert!(was_redirected(&app.exchange_ok(echo(&server), 1000)));

    // A crash leaves eBPF attached: the pod's connections are refused while
    // no agent runs; they never bypass the mesh.
    first.kill();
    assert_eq!(node.pinned_pod_links(), std::slice::from_ref(&client.uid));
    let f = app.exchange(echo(&server), 100).unwrap_err();
    assert_eq!(f.kind, "refused", "{f:?}");
    assert_eq!(
        srv.peers(ECHO).len(),
        1,
        "nothing reached the server directly"
    );

    let mut second = Agent::start_ready(&node, AgentOptions::default());
    second.wait_metric("client captured again", |m| meshed(m) == 1.0);
    assert!(
        second.log().contains("adopted_pods=1"),
        "{}",
        second.log_tail(20)
    );
    assert!(was_redirected(&app.exchange_ok(echo(&server), MIB)));
    settled(&second, &client, 1.0);

    // `nodemesh cleanup` refuses while an agent runs…
    let out = cleanup(&node);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("held by a running agent"),
        "{out:?}"
    );

    // …a graceful stop keeps eBPF in place for the next agent…
    let status = second.stop(Duration::from_secs(20)).expect("agent exited");
    assert!(status.success(), "{status:?}");
    assert!(second.log().contains("eBPF state left in place"));
    assert_eq!(node.pinned_pod_links(), std::slice::from_ref(&client.uid));

    // …and cleanup removes it: connections go direct again.
    let out = cleanup(&node);
    assert!(out.status.success(), "{out:?}");
    assert!(!node.pins.exists());
    assert!(!was_redirected(&app.exchange_ok(echo(&server), 1000)));
}

fn cleanup(node: &Node) -> std::process::Output {
    Command::new(std::env::current_exe().expect("current_exe"))
        .arg(agent::ROLE)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(&node.pins)
        .output()
        .expect("run nodemesh cleanup")
}

pub fn cleanup_on_exit_removes_everything() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let mut agent = Agent::start_ready(&node, AgentOptions::default().arg("--cleanup-on-exit"));
    agent.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    assert!(was_redirected(&app.exchange_ok(echo(&server), 1000)));
    let status = agent.stop(Duration::from_secs(20)).expect("agent exited");
    assert!(status.success(), "{status:?}");
    assert!(
        agent.log().contains("eBPF programs detached and unpinned"),
        "{}",
        agent.log_tail(10)
    );
    assert!(!node.pins.exists(), "pins left at {}", node.pins.display());
    let x = eventually("connections go direct", Duration::from_secs(5), || {
        app.exchange(echo(&server), 1000)
            .map_err(|f| format!("{f:?}"))
    });
    assert!(!was_redirected(&x));
}

pub fn bad_configuration_is_reported_all_at_once() {
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .arg(agent::ROLE)
        .args([
            "agent",
            "--pod-file",
            "/nonexistent/pods.yaml",
            "--outbound-port",
            "70000",
            "--connect-timeout",
            "soon",
            "--bypass-cidr",
            "10.0.0.0/33",
        ])
        .output()
        .expect("run nodemesh agent");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in ["--outbound-port", "--connect-timeout", "--bypass-cidr"] {
        assert!(stderr.contains(flag), "{flag} not reported:\n{stderr}");
    }
}

/// A hybrid host's `/sys/fs/cgroup`, in small: a tmpfs with the node's
/// part of the v2 hierarchy bind-mounted at `unified/`. Unmounted on drop.
struct HybridCgroupRoot(std::path::PathBuf);

impl HybridCgroupRoot {
    fn new(node: &Node) -> Self {
        let root = node.dir.join("hybrid-cgroup");
        std::fs::create_dir_all(&root).expect("mount point");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("mount")
                .args(args)
                .output()
                .expect("run mount");
            assert!(out.status.success(), "mount {args:?}: {out:?}");
        };
        run(&["-t", "tmpfs", "nmt-hybrid", &root.to_string_lossy()]);
        let guard = Self(root.clone());
        std::fs::create_dir_all(root.join("unified")).expect("unified");
        run(&[
            "--bind",
            &node.cgroup.to_string_lossy(),
            &root.join("unified").to_string_lossy(),
        ]);
        guard
    }
}

impl Drop for HybridCgroupRoot {
    fn drop(&mut self) {
        for dir in [self.0.join("unified"), self.0.clone()] {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&dir)
                .status();
        }
    }
}

pub fn a_hybrid_hosts_cgroup_mount_as_root_is_followed_to_its_v2_hierarchy() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let hybrid = HybridCgroupRoot::new(&node);
    let agent = Agent::start_ready(&node, AgentOptions::default().cgroup_root(&hybrid.0));
    let log = agent.wait_log("using its cgroup v2 hierarchy");
    assert!(log.contains("hybrid-cgroup/unified"), "{log}");
    agent.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    assert!(was_redirected(&app.exchange_ok(echo(&server), 1000)));
    drop(agent);
}
