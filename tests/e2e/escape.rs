//! No connection of a meshed pod escapes the mesh: IPv6 and IPv4-mapped
//! sockets, a new pod's very first connection, a destination on the
//! proxy's own port elsewhere, and a pod whose capture fails. Each test
//! watches the link between the nodes (or the server's peers) for what a
//! user would call a leak.
use std::{
    net::{SocketAddr, SocketAddrV6, TcpListener},
    process::{Command, Stdio},
    time::Duration,
};

use nodemesh_core::names::MESH_LABEL;
use nodemesh_tests::{
    Agent, AgentOptions, Cluster, Node, PodSpec,
    kube::unique,
    mesh::{self, MeshBed},
    sys::in_netns,
};

const ECHO: u16 = 8080;

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// The established connections of `netns` to port `port` (`ss`).
fn established_to(netns: &std::path::Path, port: u16) -> String {
    let name = netns
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let out = Command::new("ip")
        .args(["netns", "exec", name, "ss", "-Htn", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An AF_INET6 client, plain IPv6 and IPv4-mapped, to a meshed pod on
/// another node: tunnelled (nothing readable on the link), and what the app
/// sees of the socket is what it would see without the mesh. The server's
/// node reports IPv6 first, so the tunnel runs over its IPv6 address.
pub fn ipv6_and_ipv4_mapped_connections_are_tunnelled() {
    let bed = MeshBed::with_nodes(Node::new(), Node::ipv6_primary(), "24h");
    let server = bed.pod(&bed.b, "server", "server");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_b.wait_metric("server's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut cli = client.tcp();

    let v6 = SocketAddr::from((server.ip6, ECHO));
    let mapped = SocketAddr::V6(SocketAddrV6::new(server.ip.to_ipv6_mapped(), ECHO, 0, 0));
    let v4 = SocketAddr::from((server.ip, ECHO));
    let marker = |what: &str| format!("NODEMESH-{what}-{}-", std::process::id());
    let capture = bed.link.capture();
    for (to, what) in [(v6, "V6"), (mapped, "MAPPED"), (v4, "V4")] {
        let x = cli
            .text(to, &marker(what), 64)
            .unwrap_or_else(|f| panic!("{what} to {to}: {f:?}"));
        assert!(x.intact, "{what}: {x:?}");
        assert!(x.redirected(), "{what}: not through the agent: {x:?}");
        assert_eq!(x.peer, to, "{what}: getpeername is the server as dialled");
        let own = match what {
            "V6" => SocketAddr::from((client.ip6, x.local.port())),
            "MAPPED" => SocketAddr::V6(SocketAddrV6::new(
                client.ip.to_ipv6_mapped(),
                x.local.port(),
                0,
                0,
            )),
            _ => SocketAddr::from((client.ip, x.local.port())),
        };
        assert_eq!(x.local, own, "{what}: getsockname is the pod's own address");
    }
    // The pooled tunnel connection to the server's node is still open: it
    // runs between the nodes' IPv6 addresses.
    let tunnels = established_to(&bed.a.netns, mesh::TUNNEL_PORT);
    assert!(
        tunnels.contains(&format!("[{}]:{}", bed.b.ip6, mesh::TUNNEL_PORT)),
        "{tunnels}"
    );
    let seen = capture.finish();
    assert!(
        seen.len() > 1000,
        "the capture saw traffic ({} bytes)",
        seen.len()
    );
    for what in ["V6", "MAPPED", "V4"] {
        assert!(
            !mesh::contains(&seen, marker(what).as_bytes()),
            "{what} payload visible in the clear on the link"
        );
    }
    let client_id = spiffe(&bed.ns, "client");
    bed.agent_b
        .wait_metric("three connections with the client's identity", |m| {
            mesh::tunnelled_in(m, "server", &client_id) == 3.0
        });
    // The server sees its client's pod address, in the family the client
    // dialled.
    let peers = srv.peers(ECHO);
    let mut expected: Vec<std::net::IpAddr> =
        vec![client.ip6.into(), client.ip.into(), client.ip.into()];
    let mut got: Vec<std::net::IpAddr> = peers.iter().map(|p| p.ip()).collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "{peers:?}");
}

/// A bash client that connects as its first action (retrying a refused
/// connect, as apps do), sends `marker` and reads it back.
fn first_action_client(to: SocketAddr, marker: &str) -> Command {
    let script = format!(
        r#"for i in $(seq 1 100); do
  if exec 3<>/dev/tcp/{ip}/{port}; then
    printf '%s' "{marker}" >&3
    IFS= read -r -t 5 -N {len} reply <&3
    echo "attempts=$i reply=$reply"
    exit 0
  fi
  sleep 0.02
done
echo "attempts=100 gave-up"
exit 1"#,
        ip = to.ip(),
        port = to.port(),
        len = marker.len(),
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// New pods started the way kubelet starts them (the pod object, its
/// cgroup and sandbox, Running, then the app container) whose app connects
/// to a meshed peer on another node as its very first action: never in the
/// clear on the link, and through once the pod is served.
pub fn a_new_pods_first_connection_is_never_in_the_clear() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "server", "server");
    bed.agent_b.wait_metric("server's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let to = SocketAddr::from((server.ip, ECHO));
    let capture = bed.link.capture();
    let mut refused_first = 0;
    const PODS: usize = 5;
    let mut pods = Vec::new();
    for i in 0..PODS {
        let marker = format!("NODEMESH-FIRST-{i}-{}-", std::process::id());
        let pod = bed.cluster.create_pod(
            &bed.a,
            PodSpec::new(&bed.ns, &format!("new-{i}")).service_account("client"),
        );
        pod.start_sandbox();
        bed.cluster.pod_running(&bed.a, &pod);
        let out = pod
            .spawn(first_action_client(to, &marker))
            .wait_with_output()
            .expect("client ran");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains(&format!("reply={marker}")),
            "pod new-{i}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !stdout.contains("attempts=1 ") {
            refused_first += 1;
        }
        pods.push((pod, marker));
    }
    let seen = capture.finish();
    for (pod, marker) in &pods {
        assert!(
            !mesh::contains(&seen, marker.as_bytes()),
            "{}'s first connection was seen in the clear on the link",
            pod.name
        );
    }
    // Every connection the server got came through the tunnel (counted
    // below with the client's identity), each as its client pod.
    let peers = srv.peers(ECHO);
    let mut got: Vec<std::net::IpAddr> = peers.iter().map(|p| p.ip()).collect();
    let mut expected: Vec<std::net::IpAddr> = pods.iter().map(|(p, _)| p.ip.into()).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "{peers:?}");
    let client_id = spiffe(&bed.ns, "client");
    bed.agent_b
        .wait_metric("each with the client's identity", |m| {
            mesh::tunnelled_in(m, "server", &client_id) == PODS as f64
        });
    eprintln!(
        "{refused_first} of {PODS} new pods had their first connect refused (not served yet)"
    );
}

/// A meshed server on another node listening on the proxy's own port
/// (15001, on its pod address): a meshed client reaches it through the
/// tunnel, like any other port.
pub fn a_connection_to_port_15001_elsewhere_is_tunnelled() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "server", "server");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_b.wait_metric("server's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let to = SocketAddr::from((server.ip, 15001));
    let mut srv = server.tcp();
    srv.listen_on(to);
    let mut cli = client.tcp();
    let marker = format!("NODEMESH-15001-{}-", std::process::id());
    let capture = bed.link.capture();
    let x = cli.text(to, &marker, 64).expect("to port 15001");
    assert!(x.intact && x.redirected(), "{x:?}");
    let seen = capture.finish();
    assert!(
        !mesh::contains(&seen, marker.as_bytes()),
        "a connection to port 15001 went around the mesh"
    );
    let client_id = spiffe(&bed.ns, "client");
    bed.agent_b.wait_metric("through the tunnel", |m| {
        mesh::tunnelled_in(m, "server", &client_id) == 1.0
    });
}

/// A pod whose app already holds the proxy's port in its netns cannot be
/// served: its connections are refused (never sent around the proxy), its
/// owner gets a Kubernetes Event saying why, and it is captured once the
/// port is free.
pub fn a_pod_whose_capture_fails_is_refused_and_gets_an_event() {
    let cluster = Cluster::shared();
    let ns = unique("nmt");
    cluster.namespace(&ns, &[(MESH_LABEL, "enabled")]);
    let node = Node::new();
    let server = cluster.run_pod(
        &node,
        PodSpec::new(&ns, "server").label(MESH_LABEL, "disabled"),
    );
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(cluster));
    let pod = cluster.create_pod(&node, PodSpec::new(&ns, "squatter"));
    let held = in_netns(&pod.netns, || {
        TcpListener::bind("127.0.0.1:15001").expect("hold 15001")
    });
    pod.start_sandbox();
    cluster.pod_running(&node, &pod);
    agent.wait_metric("the failure counted", |m| {
        m.sum(
            "nodemesh_pod_capture_errors_total",
            &[("reason", "listen_failed")],
        ) == 1.0
    });
    let events = nodemesh_tests::eventually("the Event", Duration::from_secs(15), || {
        let events = cluster.events(&ns);
        if events.iter().any(|(p, reason, message)| {
            p == "squatter"
                && reason == "NodemeshCaptureFailed"
                && message.contains("listen_failed")
                && message.contains("15001")
        }) {
            Ok(events)
        } else {
            Err(format!("{events:?}"))
        }
    });
    assert!(!events.is_empty());

    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = pod.tcp();
    let refused = app
        .exchange(SocketAddr::from((server.ip, ECHO)), 1000)
        .expect_err("fail closed");
    assert_eq!(refused.kind, "denied", "{refused:?}");
    assert!(srv.peers(ECHO).is_empty(), "nothing reached the server");

    // The port is let go: the next retry serves the pod.
    drop(held);
    agent.wait_metric("captured", |m| m.sum("nodemesh_meshed_pods", &[]) == 1.0);
    let x = app.exchange_ok(SocketAddr::from((server.ip, ECHO)), 1000);
    assert!(x.redirected(), "{x:?}");
}
