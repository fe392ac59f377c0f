//! Services: a meshed pod's connection to a cluster IP is resolved by the
//! agent (kube-proxy never sees it), balanced over the ready endpoints on
//! both nodes, each reached the right way (tunnel, same node, plain), and
//! follows the endpoints live.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use nodemesh_tests::{
    Node, Pod, PodSpec, TcpApp,
    kube::unique,
    mesh::{self, MeshBed},
};

const ECHO: u16 = 8080;
const PORT: u16 = 80;

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Which server answered each of `n` connections to `to` (by the servers'
/// peer logs), all checked intact and redirected.
fn spread(
    client: &mut TcpApp,
    to: SocketAddr,
    n: usize,
    marker: &str,
    servers: &mut [(&str, TcpApp)],
) -> BTreeMap<String, usize> {
    let before: Vec<usize> = servers
        .iter_mut()
        .map(|(_, s)| s.peers(ECHO).len())
        .collect();
    for i in 0..n {
        let x = client
            .text(to, marker, 16)
            .unwrap_or_else(|f| panic!("connection {i} to {to}: {f:?}"));
        assert!(x.intact && x.redirected(), "{x:?}");
    }
    servers
        .iter_mut()
        .zip(before)
        .map(|((name, s), b)| (name.to_string(), s.peers(ECHO).len() - b))
        .collect()
}

pub fn connections_to_a_cluster_ip_are_balanced_over_endpoints_on_both_nodes() {
    let bed = MeshBed::new("24h");
    let near = bed.pod(&bed.a, "echo-near", "echo");
    let far1 = bed.pod(&bed.b, "echo-far1", "echo");
    let far2 = bed.pod(&bed.b, "echo-far2", "echo");
    let idle = bed.pod(&bed.a, "echo-idle", "echo");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_b.wait_metric("echo certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let mut servers: Vec<(&str, TcpApp)> = [("near", &near), ("far1", &far1), ("far2", &far2)]
        .into_iter()
        .map(|(name, pod)| {
            let mut app = pod.tcp();
            app.listen(ECHO);
            (name, app)
        })
        .collect();
    let vip = SocketAddr::from((bed.cluster.service(&bed.ns, "echo", PORT, ECHO), PORT));
    // The other node's two first: spread over both; nothing readable on
    // the link.
    let far_only: Vec<(&Pod, &Node, bool)> = vec![(&far1, &bed.b, true), (&far2, &bed.b, true)];
    bed.cluster.endpoint_slice(&bed.ns, "echo", ECHO, &far_only);
    bed.agent_a.wait_service(vip, 2);
    let mut cli = client.tcp();
    let marker = format!("NODEMESH-SVC-{}-", std::process::id());
    let capture = bed.link.capture();
    let counts = spread(&mut cli, vip, 40, &marker, &mut servers);
    let seen = capture.finish();
    assert!(
        counts["far1"] >= 8 && counts["far2"] >= 8 && counts["near"] == 0,
        "40 connections over 2 endpoints: {counts:?}"
    );
    assert!(
        !mesh::contains(&seen, marker.as_bytes()),
        "Service traffic visible in the clear on the link"
    );
    // Through the tunnel to the far ones: their agent saw the client's
    // identity; the near one was reached inside the node.
    let client_id = spiffe(&bed.ns, "client");
    bed.agent_b
        .wait_metric("the far endpoints saw the client's identity", |m| {
            mesh::tunnelled_in(m, "echo-far1", &client_id)
                + mesh::tunnelled_in(m, "echo-far2", &client_id)
                == (counts["far1"] + counts["far2"]) as f64
        });
    // One on this node too: it has the connections while it is healthy
    // (no tunnel hop), reached inside the node.
    let all: Vec<(&Pod, &Node, bool)> = vec![
        (&near, &bed.a, true),
        (&far1, &bed.b, true),
        (&far2, &bed.b, true),
    ];
    bed.cluster.endpoint_slice(&bed.ns, "echo", ECHO, &all);
    bed.agent_a.wait_service(vip, 3);
    let counts = spread(&mut cli, vip, 30, &marker, &mut servers);
    assert!(
        counts["near"] >= 27,
        "30 connections, one endpoint on this node: {counts:?}"
    );
    let m = bed.agent_a.metrics();
    assert_eq!(
        m.sum(
            "nodemesh_tcp_peer_open_total",
            &[
                ("pod", "echo-near"),
                ("direction", "inbound"),
                ("tls", "false"),
                ("peer_identity", &client_id)
            ],
        ),
        counts["near"] as f64,
        "{}",
        m.text
    );

    // Not ready, and gone: no new connections there, live.
    let some: Vec<(&Pod, &Node, bool)> = vec![
        (&near, &bed.a, false),
        (&far1, &bed.b, true),
        (&far2, &bed.b, true),
    ];
    bed.cluster.endpoint_slice(&bed.ns, "echo", ECHO, &some);
    bed.agent_a.wait_service(vip, 2);
    let counts = spread(&mut cli, vip, 20, &marker, &mut servers);
    assert_eq!(
        counts["near"], 0,
        "not-ready endpoints get nothing: {counts:?}"
    );
    bed.cluster
        .endpoint_slice(&bed.ns, "echo", ECHO, &[(&far1, &bed.b, true)]);
    bed.agent_a.wait_service(vip, 1);
    let counts = spread(&mut cli, vip, 10, &marker, &mut servers);
    assert_eq!(counts["far1"], 10, "scaled down to one: {counts:?}");

    // An endpoint that refuses (nothing listens in echo-idle): the client
    // never sees it; the others take its share.
    bed.cluster.endpoint_slice(
        &bed.ns,
        "echo",
        ECHO,
        &[
            (&far1, &bed.b, true),
            (&idle, &bed.a, true),
            (&far2, &bed.b, true),
        ],
    );
    bed.agent_a.wait_service(vip, 3);
    let counts = spread(&mut cli, vip, 30, &marker, &mut servers);
    assert_eq!(counts["far1"] + counts["far2"], 30, "{counts:?}");
    drop(bed.identity);
}

pub fn unmeshed_endpoints_are_plain_and_no_endpoints_is_a_reset() {
    let bed = MeshBed::new("24h");
    let plain_ns = unique("plain");
    bed.cluster.namespace(&plain_ns, &[]);
    let plain: Arc<Pod> = bed
        .cluster
        .run_pod(&bed.b, PodSpec::new(&plain_ns, "plain-echo"));
    let client = bed.pod(&bed.a, "client", "client");
    let mut srv = plain.tcp();
    srv.listen(ECHO);
    let vip = SocketAddr::from((bed.cluster.service(&plain_ns, "plain", PORT, ECHO), PORT));
    bed.cluster
        .endpoint_slice(&plain_ns, "plain", ECHO, &[(&plain, &bed.b, true)]);
    bed.agent_a.wait_service(vip, 1);
    let mut cli = client.tcp();
    let x = cli.exchange_ok(vip, 64 << 10);
    assert!(x.redirected(), "{x:?}");
    bed.agent_a
        .wait_metric("a plain connection, no peer identity", |m| {
            m.sum(
                "nodemesh_tcp_peer_open_total",
                &[
                    ("pod", "client"),
                    ("direction", "outbound"),
                    ("tls", "false"),
                    ("peer_identity", ""),
                ],
            ) == 1.0
        });
    // The agent dialled the endpoint itself (kube-proxy is not on this
    // bed): the server saw the client pod's own address.
    assert_eq!(
        srv.peers(ECHO),
        vec![SocketAddr::new(client.ip.into(), srv.peers(ECHO)[0].port())]
    );

    bed.cluster
        .endpoint_slice(&plain_ns, "plain", ECHO, &[(&plain, &bed.b, false)]);
    bed.agent_a.wait_service(vip, 0);
    let refused = cli.exchange(vip, 1000).expect_err("no ready endpoint");
    assert_eq!(refused.kind, "reset", "{refused:?}");
    bed.agent_a.wait_metric("counted", |m| {
        m.sum(
            "nodemesh_tcp_connect_errors_total",
            &[("pod", "client"), ("reason", "no_endpoints")],
        ) == 1.0
    });
    assert!(bed.agent_a.log().contains("has no ready endpoints"));
}
