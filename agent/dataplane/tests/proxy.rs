//! The proxy in one process, without root: real sockets on 127.0.0.1,
//! real TLS with a CA made here, the state as discovery would write it.
//! Pod and node addresses are names the injected connector maps to
//! loopback listeners; original destinations are injected too. What eBPF,
//! network namespaces and restarts do is proven on the netns bed
//! (`tests/e2e`); this proves routing, the inbound side and the tunnel.
#![allow(clippy::unwrap_used)] // a test: a panic with a message is how it fails

mod support;

use std::{net::SocketAddr, time::Duration};

use support::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_PORT: u16 = 8080;

/// Sends `msg`, half-closes, and reads the echo to the end.
async fn echo_through(
    cluster: &Cluster,
    node: usize,
    pod: &str,
    dst: SocketAddr,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut conn = cluster.dial(node, pod, dst).await;
    conn.write_all(msg).await?;
    conn.shutdown().await?;
    let mut back = Vec::new();
    conn.read_to_end(&mut back).await?;
    Ok(back)
}

#[tokio::test]
async fn an_unmeshed_destination_is_reached_directly() {
    let cluster = Cluster::two_nodes().await;
    let dst = cluster.echo("10.2.0.4", SERVER_PORT).await;
    let back = echo_through(&cluster, 0, "client", dst, b"hello")
        .await
        .expect("echo");
    assert_eq!(back, b"hello");
    let m = cluster.metrics(0);
    assert_eq!(
        m.value(
            "nodemesh_tcp_peer_open_total",
            &[("pod", "client"), ("tls", "false"), ("peer_identity", "")]
        ),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "nodemesh_tcp_sent_bytes_total",
            &[("pod", "client"), ("direction", "outbound")]
        ),
        5.0
    );
    assert_eq!(m.value("nodemesh_tunnel_connections_total", &[]), 0.0);
}

#[tokio::test]
async fn a_meshed_pod_on_the_same_node_is_reached_once_and_counted_on_both_sides() {
    let cluster = Cluster::two_nodes().await;
    let dst = cluster.echo("10.1.0.3", SERVER_PORT).await;
    let back = echo_through(&cluster, 0, "client", dst, b"same node")
        .await
        .expect("echo");
    assert_eq!(back, b"same node");
    let m = cluster.metrics(0);
    let client = "spiffe://cluster.local/ns/shop/sa/client";
    let near = "spiffe://cluster.local/ns/shop/sa/near";
    assert_eq!(
        m.value(
            "nodemesh_tcp_peer_open_total",
            &[
                ("pod", "client"),
                ("direction", "outbound"),
                ("tls", "false"),
                ("peer_identity", near)
            ]
        ),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "nodemesh_tcp_peer_open_total",
            &[
                ("pod", "near"),
                ("direction", "inbound"),
                ("tls", "false"),
                ("peer_identity", client)
            ]
        ),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "nodemesh_tcp_received_bytes_total",
            &[("pod", "near"), ("direction", "inbound")]
        ),
        9.0
    );
    assert_eq!(
        m.value("nodemesh_tunnel_connections_total", &[]),
        0.0,
        "no TLS inside a node"
    );
}

#[tokio::test]
async fn a_meshed_pod_on_another_node_is_reached_through_the_mutual_tls_tunnel() {
    let cluster = Cluster::two_nodes().await;
    let dst = cluster.echo("10.2.0.3", SERVER_PORT).await;
    cluster.wait_certificates().await;
    for i in 0..2 {
        let msg = format!("across nodes {i}");
        let back = echo_through(&cluster, 0, "client", dst, msg.as_bytes())
            .await
            .expect("echo");
        assert_eq!(back, msg.as_bytes());
    }
    let client = "spiffe://cluster.local/ns/shop/sa/client";
    let far = "spiffe://cluster.local/ns/shop/sa/far";
    let a = cluster.metrics(0);
    assert_eq!(
        a.value(
            "nodemesh_tcp_peer_open_total",
            &[("pod", "client"), ("tls", "true"), ("peer_identity", far)]
        ),
        2.0,
        "{}",
        a.text
    );
    assert_eq!(
        a.value(
            "nodemesh_tunnel_connections_total",
            &[("direction", "outbound")]
        ),
        1.0,
        "one pooled connection"
    );
    assert_eq!(
        a.value(
            "nodemesh_tunnel_streams_total",
            &[("direction", "outbound")]
        ),
        2.0
    );
    let b = cluster.metrics(1);
    assert_eq!(
        b.value(
            "nodemesh_tcp_peer_open_total",
            &[
                ("pod", "far"),
                ("direction", "inbound"),
                ("tls", "true"),
                ("peer_identity", client)
            ]
        ),
        2.0,
        "{}",
        b.text
    );
    assert_eq!(
        b.value("nodemesh_tunnel_streams_total", &[("direction", "inbound")]),
        2.0
    );
}

#[tokio::test]
async fn a_meshed_pod_on_an_unknown_node_is_refused_never_sent_plain() {
    let cluster = Cluster::two_nodes().await;
    // Its echo server is reachable in plain: the proxy must not use it.
    let dst = cluster.echo("10.3.0.3", SERVER_PORT).await;
    let result = echo_through(&cluster, 0, "client", dst, b"secret").await;
    assert!(
        result.as_ref().is_ok_and(|b| b.is_empty()) || result.is_err(),
        "{result:?}"
    );
    let m = cluster.metrics(0);
    assert_eq!(
        m.value(
            "nodemesh_tcp_connect_errors_total",
            &[("pod", "client"), ("reason", "tunnel")]
        ),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        cluster.echo_accepted(dst),
        0,
        "nothing reached the destination"
    );
}

#[tokio::test]
async fn an_address_two_live_pods_claim_is_refused() {
    let cluster = Cluster::two_nodes().await;
    let dst = cluster.echo("10.2.0.5", SERVER_PORT).await;
    let result = echo_through(&cluster, 0, "client", dst, b"which one?").await;
    assert!(
        result.as_ref().is_ok_and(|b| b.is_empty()) || result.is_err(),
        "{result:?}"
    );
    assert_eq!(cluster.echo_accepted(dst), 0);
    let m = cluster.metrics(0);
    assert_eq!(
        m.value(
            "nodemesh_tcp_connect_errors_total",
            &[("pod", "client"), ("reason", "tunnel")]
        ),
        1.0,
        "{}",
        m.text
    );
}

#[tokio::test]
async fn a_connection_without_an_original_destination_is_reset() {
    let cluster = Cluster::two_nodes().await;
    let mut conn = cluster.dial_unrecorded(0, "client").await;
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("answered");
    assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");
    let m = cluster.metrics(0);
    assert_eq!(
        m.value(
            "nodemesh_tcp_connect_errors_total",
            &[("pod", "client"), ("reason", "no_original_destination")]
        ),
        1.0
    );
}

#[tokio::test]
async fn the_tunnel_serves_only_pods_of_the_identity_the_client_verified() {
    let cluster = Cluster::two_nodes().await;
    cluster.wait_certificates().await;
    // `far2` runs on node b under another service account; a stream for
    // it over a connection made for `far`'s identity is refused (404).
    let far2 = cluster.echo("10.2.0.6", SERVER_PORT).await;
    let status = cluster.connect_as_far(far2).await;
    assert_eq!(status, 404);
    assert_eq!(cluster.echo_accepted(far2), 0);
    let b = cluster.metrics(1);
    assert_eq!(
        b.value(
            "nodemesh_tunnel_errors_total",
            &[("direction", "inbound"), ("reason", "unknown_destination")]
        ),
        1.0,
        "{}",
        b.text
    );
    // To `far` itself: served.
    let far = cluster.echo("10.2.0.3", SERVER_PORT).await;
    assert_eq!(cluster.connect_as_far(far).await, 200);
}
