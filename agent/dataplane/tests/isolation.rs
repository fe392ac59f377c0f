//! One pod cannot hurt another: each test names an attacker, which takes
//! a door's whole share, and a victim, which is served all the same; the
//! attacker's excess is refused and counted on it. In one process, real
//! sockets on 127.0.0.1 and real TLS between the two nodes (see
//! `proxy.rs`); inbound capture's door is proven on the netns bed.
#![allow(clippy::unwrap_used)] // a test: a panic with a message is how it fails

mod support;

use std::{net::SocketAddr, time::Duration};

use http_body_util::BodyExt;
use nodemesh_dataplane::{proxy::AdmissionConfig, state::PodLimits};
use support::Cluster;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PORT: u16 = 8080;

/// With three meshed pods on the node: 20 each, and 16 (the floor) for
/// one client.
const SMALL: AdmissionConfig = AdmissionConfig {
    max_connections: 60,
    max_requests: 60,
};
const LARGE: AdmissionConfig = AdmissionConfig {
    max_connections: 1000,
    max_requests: 1000,
};

/// One byte there and back: the connection is relayed.
async fn ping(conn: &mut TcpStream) -> std::io::Result<()> {
    conn.write_all(b"x").await?;
    let mut one = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut one))
        .await
        .map_err(|_| std::io::Error::other("no echo in time"))??;
    Ok(())
}

/// `n` connections of `pod` on `node` to `dst`, each relayed.
async fn hold(
    cluster: &Cluster,
    node: usize,
    pod: &str,
    dst: SocketAddr,
    n: usize,
) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..n {
        let mut c = cluster.dial(node, pod, dst).await;
        ping(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{pod}'s connection {i} within its share: {e}"));
        held.push(c);
    }
    held
}

/// The connection is refused: reset or closed before any echo.
async fn refused(cluster: &Cluster, node: usize, pod: &str, dst: SocketAddr) {
    let mut c = cluster.dial(node, pod, dst).await;
    assert!(
        ping(&mut c).await.is_err(),
        "{pod}'s connection over its share is refused"
    );
}

fn refusals(cluster: &Cluster, node: usize, pod: &str, door: &str, reason: &str) -> f64 {
    cluster.metrics(node).value(
        "nodemesh_admission_refused_total",
        &[("pod", pod), ("door", door), ("reason", reason)],
    )
}

/// Waits until node `node` holds `n` connections (closes are noticed as
/// the relays end).
async fn settles(cluster: &Cluster, node: usize, n: usize) {
    let admission = cluster.admission(node);
    for _ in 0..100 {
        if admission.connections() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "node {node} holds {} connections, not {n}",
        admission.connections()
    );
}

#[tokio::test]
async fn a_pod_over_its_share_has_its_own_new_connections_reset_and_its_neighbour_is_served() {
    // Node a serves three meshed pods (client, near, locked): 20 each.
    let cluster = Cluster::two_nodes_with([SMALL, LARGE], &[]).await;
    let dst = cluster.echo("10.2.0.4", PORT).await;
    let attacker = hold(&cluster, 0, "client", dst, 20).await;
    refused(&cluster, 0, "client", dst).await;
    refused(&cluster, 0, "client", dst).await;
    // The neighbour has all of its own.
    let victim = hold(&cluster, 0, "near", dst, 20).await;
    assert_eq!(
        refusals(&cluster, 0, "client", "outbound", "pod_share"),
        2.0
    );
    assert_eq!(refusals(&cluster, 0, "near", "outbound", "pod_share"), 0.0);
    let m = cluster.metrics(0);
    assert_eq!(
        m.value("nodemesh_admission_connections_in_use", &[]),
        40.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.value("nodemesh_admission_limit", &[("budget", "connections")]),
        60.0
    );
    // What the attacker held is given back as its connections close.
    drop(attacker);
    settles(&cluster, 0, 20).await;
    let again = hold(&cluster, 0, "client", dst, 20).await;
    drop((again, victim));
    settles(&cluster, 0, 0).await;
}

#[tokio::test]
async fn tunnel_streams_take_the_destination_pods_share_and_their_clients() {
    // Node b serves far, far2 and twin2; `far` may hold 8 (its
    // annotation), `far2` 40: there one client's share (half: 20) is what
    // binds. (In one process every tunnel client is 127.0.0.1, node a
    // does not vouch for its pods' addresses: one client. The bed tells
    // clients apart.)
    let limit = |n| PodLimits {
        max_connections: Some(n),
        ..PodLimits::default()
    };
    let cluster =
        Cluster::two_nodes_with([LARGE, SMALL], &[("far", limit(8)), ("far2", limit(40))]).await;
    cluster.wait_certificates().await;
    let far = cluster.echo("10.2.0.3", PORT).await;
    let held_far = hold(&cluster, 0, "client", far, 8).await;
    refused(&cluster, 0, "client", far).await;
    assert_eq!(refusals(&cluster, 1, "far", "tunnel", "pod_share"), 1.0);
    // Another pod of that node is reached all the same, up to the
    // client's half of its share.
    let far2 = cluster.echo("10.2.0.6", PORT).await;
    let held_far2 = hold(&cluster, 0, "client", far2, 20).await;
    refused(&cluster, 0, "near", far2).await;
    assert_eq!(refusals(&cluster, 1, "far2", "tunnel", "client_share"), 1.0);
    drop((held_far, held_far2));
    settles(&cluster, 1, 0).await;
    assert_eq!(cluster.admission(1).clients(), 0);
}

#[tokio::test]
async fn same_node_deliveries_take_the_destination_pods_share() {
    // `client` may hold all of node a's 60 (its own share is not what
    // binds); `near`, the destination, 8.
    let limit = |n| PodLimits {
        max_connections: Some(n),
        ..PodLimits::default()
    };
    let cluster =
        Cluster::two_nodes_with([SMALL, LARGE], &[("client", limit(60)), ("near", limit(8))]).await;
    let near = cluster.echo("10.1.0.3", PORT).await;
    let held = hold(&cluster, 0, "client", near, 8).await;
    refused(&cluster, 0, "client", near).await;
    assert_eq!(refusals(&cluster, 0, "near", "local", "pod_share"), 1.0);
    // The client is refused only there: another destination is reached.
    let plain = cluster.echo("10.2.0.4", PORT).await;
    let other = hold(&cluster, 0, "client", plain, 2).await;
    drop((held, other));
    settles(&cluster, 0, 0).await;
}

#[tokio::test]
async fn requests_over_a_pods_share_get_503_and_the_neighbours_are_answered() {
    let cluster = Cluster::two_nodes_with([SMALL, LARGE], &[]).await;
    let server = cluster.http("10.2.0.4", PORT).await;
    server.set(|k| k.latency = Duration::from_secs(2));
    // One HTTP/2 connection, many streams: 20 in flight fill the share.
    let conn = cluster.dial(0, "client", server.at).await;
    let (send, h2) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(conn),
    )
    .await
    .unwrap();
    tokio::spawn(h2);
    let get = |send: &hyper::client::conn::http2::SendRequest<support::http::TestBody>| {
        let mut send = send.clone();
        let at = server.at;
        async move {
            let req = hyper::Request::builder()
                .uri(format!("http://{at}/"))
                .body(support::http::full(Vec::new()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let error = resp
                .headers()
                .get("nodemesh-proxy-error")
                .map(|v| v.to_str().unwrap().to_owned());
            let _ = resp.into_body().collect().await;
            (status, error)
        }
    };
    let slow: Vec<_> = (0..20).map(|_| tokio::spawn(get(&send))).collect();
    for _ in 0..100 {
        if cluster.admission(0).requests() == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cluster.admission(0).requests(), 20);
    let (status, error) = get(&send).await;
    assert_eq!(status, 503);
    assert!(error.unwrap().contains("pod_share"));
    assert_eq!(refusals(&cluster, 0, "client", "request", "pod_share"), 1.0);
    // The neighbour's request goes through while the attacker's wait.
    let mut near =
        support::http::Client::over(cluster.dial(0, "near", server.at).await, false).await;
    let answer = near.get(&server.at.to_string(), "/", None).await;
    assert_eq!(answer.status, 200);
    for s in slow {
        assert_eq!(s.await.unwrap().0, 200, "those admitted are answered");
    }
    assert_eq!(cluster.admission(0).requests(), 0, "every slot given back");
}

#[tokio::test]
async fn streams_beyond_one_tunnel_connections_room_open_another() {
    // One tunnel connection takes 1 024 streams at once; 1 100 idle
    // connections from one pod to one pod need two (they used to wait for
    // a stream slot until their open timed out).
    let limit = PodLimits {
        max_connections: Some(3000),
        ..PodLimits::default()
    };
    let big = AdmissionConfig {
        max_connections: 5000,
        max_requests: 5000,
    };
    let cluster = Cluster::two_nodes_with([big, big], &[("far", limit), ("client", limit)]).await;
    cluster.wait_certificates().await;
    let far = cluster.echo("10.2.0.3", PORT).await;
    let held = hold(&cluster, 0, "client", far, 1100).await;
    let m = cluster.metrics(0);
    assert_eq!(
        m.value(
            "nodemesh_tunnel_connections_total",
            &[("direction", "outbound")]
        ),
        2.0,
        "{}",
        m.text
    );
    drop(held);
    settles(&cluster, 1, 0).await;
}
