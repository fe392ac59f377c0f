//! The test bed's HTTP and gRPC apps through the mesh: detected, served
//! request by request, every request and call answered as the server was
//! asked to, bodies whole, and the golden request metrics exact.
use std::net::SocketAddr;

use nodemesh_tests::{
    Agent, AgentOptions, Node, PodSpec,
    apps::{grpc, http},
};

const HTTP: u16 = 8080;
const GRPC: u16 = 50051;

pub fn http_and_grpc_apps_pass_through_the_mesh() {
    let node = Node::new();
    let client = node.pod(PodSpec::new("demo", "client").meshed());
    let server = node.pod(PodSpec::new("demo", "server"));
    node.write_pods(&[&client, &server]);
    let agent = Agent::start_ready(&node, AgentOptions::default());
    agent.wait_metric("client captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 1.0
    });

    // HTTP/1.1 keep-alive: 90 answered 200, then 10 asked to fail with 500.
    let mut hsrv = server.http();
    hsrv.serve(
        HTTP,
        http::Knobs {
            name: Some("server".into()),
            ..http::Knobs::default()
        },
    );
    let mut hcli = client.http();
    let to = SocketAddr::from((server.ip, HTTP));
    let ok = hcli.run(http::Run::get(to, "/", 90));
    let failing = hcli.run(http::Run::get(to, "/?status=500", 10));
    assert_eq!(ok.len(), 90);
    assert!(
        ok.iter().all(|o| o.status == Some(200)
            && o.received == 16
            && o.server.as_deref() == Some("server")),
        "{ok:?}"
    );
    assert!(failing.iter().all(|o| o.status == Some(500)), "{failing:?}");
    // HTTP/2 with prior knowledge, 4 concurrent streams, bodies both ways.
    let h2 = hcli.run(http::Run {
        requests: 40,
        concurrency: 4,
        version: http::Version::H2,
        method: "POST".into(),
        path: "/?bytes=40000".into(),
        body_bytes: 100_000,
        ..http::Run::get(to, "/", 0)
    });
    assert!(
        h2.iter()
            .all(|o| o.status == Some(200) && o.received == 40_000 && o.error.is_none()),
        "{h2:?}"
    );
    let seen = hsrv.seen(HTTP);
    assert_eq!(seen.requests, 140);
    assert_eq!(seen.by_status, [(200, 130), (500, 10)]);
    assert_eq!(seen.received, 40 * 100_000, "request bodies arrived whole");
    assert_eq!(
        seen.peers.into_iter().collect::<Vec<_>>(),
        [client.ip],
        "the server sees the client pod"
    );

    // gRPC: unary OK and NOT_FOUND; server streaming, whole and cut short.
    let mut gsrv = server.grpc();
    gsrv.serve(GRPC, grpc::Knobs::default());
    let mut gcli = client.grpc();
    let to = SocketAddr::from((server.ip, GRPC));
    let unary = gcli.run(grpc::Run::unary(to, 20));
    assert!(
        unary.iter().all(|o| o.code == 0 && o.messages == 1),
        "{unary:?}"
    );
    let not_found = gcli.run(grpc::Run {
        ask: Some(grpc::Knobs {
            code: 5,
            ..grpc::Knobs::default()
        }),
        ..grpc::Run::unary(to, 5)
    });
    assert!(not_found.iter().all(|o| o.code == 5), "{not_found:?}");
    let streams = gcli.run(grpc::Run {
        method: grpc::Method::Stream,
        concurrency: 3,
        ask: Some(grpc::Knobs {
            messages: 4,
            ..grpc::Knobs::default()
        }),
        ..grpc::Run::unary(to, 6)
    });
    assert!(
        streams.iter().all(|o| o.code == 0 && o.messages == 4),
        "{streams:?}"
    );
    let cut = gcli.run(grpc::Run {
        method: grpc::Method::Stream,
        ask: Some(grpc::Knobs {
            messages: 2,
            code: 13,
            ..grpc::Knobs::default()
        }),
        ..grpc::Run::unary(to, 2)
    });
    assert!(
        cut.iter().all(|o| o.code == 13 && o.messages == 2),
        "the status after the messages arrives intact: {cut:?}"
    );
    assert_eq!(gsrv.seen(GRPC).calls, 33);

    // Golden metrics, exact: per protocol, status and gRPC status.
    let m = agent.wait_metric("every response counted", |m| {
        m.sum("nodemesh_response_total", &[]) == 173.0
    });
    // The gRPC server greets first (HTTP/2 SETTINGS): still detected as
    // HTTP/2, never as a server-first protocol.
    assert_eq!(
        m.sum(
            "nodemesh_protocol_detect_total",
            &[("result", "server_first")]
        ),
        0.0,
        "{}",
        m.text
    );
    let requests = |protocol: &str| {
        m.sum(
            "nodemesh_request_total",
            &[
                ("workload_name", "client"),
                ("dst_workload_name", "server"),
                ("protocol", protocol),
            ],
        )
    };
    assert_eq!(
        (requests("http1"), requests("h2"), requests("grpc")),
        (100.0, 40.0, 33.0),
        "{}",
        m.text
    );
    let responses = |labels: &[(&str, &str)]| m.sum("nodemesh_response_total", labels);
    assert_eq!(
        responses(&[("protocol", "http1"), ("classification", "success")]),
        90.0
    );
    assert_eq!(
        responses(&[
            ("protocol", "http1"),
            ("status_code", "500"),
            ("classification", "failure")
        ]),
        10.0
    );
    assert_eq!(
        responses(&[("protocol", "grpc"), ("grpc_status", "0")]),
        26.0
    );
    assert_eq!(
        responses(&[
            ("protocol", "grpc"),
            ("grpc_status", "5"),
            ("classification", "failure")
        ]),
        5.0
    );
    assert_eq!(
        responses(&[("protocol", "grpc"), ("grpc_status", "13")]),
        2.0
    );
    assert_eq!(
        m.sum(
            "nodemesh_response_latency_seconds_count",
            &[("protocol", "h2")]
        ),
        40.0
    );
    assert!(
        m.sum("nodemesh_protocol_detect_total", &[("result", "http1")]) >= 1.0
            && m.sum("nodemesh_protocol_detect_total", &[("result", "h2")]) >= 2.0,
        "{}",
        m.text
    );

    // All of it went through the agent, over a handful of connections.
    let opened = m.sum(
        "nodemesh_tcp_open_total",
        &[("pod", "client"), ("direction", "outbound")],
    );
    assert!(
        (4.0..=20.0).contains(&opened),
        "{opened} connections\n{}",
        m.text
    );
    assert!(
        m.sum(
            "nodemesh_tcp_sent_bytes_total",
            &[("pod", "client"), ("direction", "outbound")]
        ) >= (40 * 100_000) as f64
    );
}
