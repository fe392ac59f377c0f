//! The HTTP path in one process, without root: requests through a Service
//! (balancing, locality, a refusing endpoint, none at all), a policy
//! refusal on the same node, an upgrade, HTTP/1 and HTTP/2, and the
//! clients that half-close or pipeline. The same real proxy as the agent's,
//! on 127.0.0.1 (see `support`).
#![allow(clippy::unwrap_used)] // a test: a panic with a message is how it fails

mod support;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use support::{
    Cluster, addr,
    http::{Client, HttpServer},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 8080;

/// A Service `shop/web` at 10.96.0.10:80 over HTTP servers at `ips`.
async fn web(cluster: &Cluster, ips: &[&str]) -> (SocketAddr, Vec<std::sync::Arc<HttpServer>>) {
    let vip = addr("10.96.0.10", 80);
    let mut servers = Vec::new();
    for ip in ips {
        servers.push(cluster.http(ip, PORT).await);
    }
    cluster.service("web", vip, PORT, ips);
    (vip, servers)
}

/// `n` sequential GETs from `client` on node a over one connection: who
/// answered how often.
async fn sequential(
    cluster: &Cluster,
    vip: SocketAddr,
    h2: bool,
    n: usize,
) -> HashMap<SocketAddr, usize> {
    let mut client = Client::over(cluster.dial(0, "client", vip).await, h2).await;
    let mut counts = HashMap::new();
    for _ in 0..n {
        let a = client.get("web.shop", "/", None).await;
        assert_eq!(a.status, 200, "{a:?}");
        *counts.entry(a.served_by.unwrap()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn http1_and_http2_requests_through_a_service_are_balanced_per_request() {
    let cluster = Cluster::two_nodes().await;
    // Two plain endpoints on node b: alike, so neither may keep it all.
    let (vip, servers) = web(&cluster, &["10.2.0.7", "10.2.0.8"]).await;
    for h2 in [false, true] {
        let counts = sequential(&cluster, vip, h2, 200).await;
        for s in &servers {
            let n = counts.get(&s.at).copied().unwrap_or(0);
            // Each request on its own: both endpoints have some over one
            // connection. (Not half each: one slow answer on this shared
            // machine keeps work off an endpoint for about a second, as
            // peak EWMA means it to; the even spread of sequential work is
            // the balancer's unit tests', in simulated time.)
            assert!(n >= 2, "h2={h2}: {} got {n} of 200 ({counts:?})", s.at);
        }
    }
    let m = cluster.metrics(0);
    assert_eq!(
        m.value(
            "nodemesh_request_total",
            &[("workload_name", "client"), ("direction", "outbound")]
        ),
        400.0,
        "{}",
        m.text
    );
}

#[tokio::test]
async fn a_healthy_endpoint_on_the_same_node_gets_the_sequential_requests() {
    let cluster = Cluster::two_nodes().await;
    cluster.wait_certificates().await;
    // `near` on node a (the client's), `far` and `far2` on node b.
    let (vip, servers) = web(&cluster, &["10.1.0.3", "10.2.0.3", "10.2.0.6"]).await;
    // (A pause of the shared machine may send one or two elsewhere: a
    // peak 4x the other node's is taken for a slow endpoint.)
    let counts = sequential(&cluster, vip, false, 100).await;
    let near = counts.get(&servers[0].at).copied().unwrap_or(0);
    assert!(near >= 90, "100 sequential requests: {counts:?}");

    // Overloaded (slow): the others get the work, it is tried now and then.
    servers[0].set(|k| k.latency = Duration::from_millis(60));
    let counts = sequential(&cluster, vip, false, 60).await;
    let near = counts.get(&servers[0].at).copied().unwrap_or(0);
    assert!(
        near <= 20,
        "the slow same-node endpoint got {near} of 60 ({counts:?})"
    );
}

#[tokio::test]
async fn a_refusing_endpoint_costs_no_request_and_none_left_is_a_503() {
    let cluster = Cluster::two_nodes().await;
    let good = cluster.http("10.2.0.7", PORT).await;
    cluster.refusing("10.2.0.8", PORT);
    let vip = addr("10.96.0.10", 80);
    cluster.service("web", vip, PORT, &["10.2.0.7", "10.2.0.8"]);
    let counts = sequential(&cluster, vip, false, 30).await;
    assert_eq!(counts.get(&good.at), Some(&30), "{counts:?}");

    // All refuse: the proxy answers 502, saying so.
    let down = addr("10.96.0.12", 80);
    cluster.refusing("10.2.0.4", PORT);
    cluster.service("down", down, PORT, &["10.2.0.4", "10.2.0.8"]);
    let mut client = Client::over(cluster.dial(0, "client", down).await, false).await;
    let a = client.get("down.shop", "/", None).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert!(a.proxy_error.is_some_and(|e| e.contains("cannot reach")));

    // No endpoint at all: 503.
    let empty = addr("10.96.0.11", 80);
    cluster.service("empty", empty, PORT, &[]);
    for h2 in [false, true] {
        let mut client = Client::over(cluster.dial(0, "client", empty).await, h2).await;
        let a = client.get("empty.shop", "/", None).await;
        assert_eq!(a.status, 503, "h2={h2}: {a:?}");
        assert_eq!(a.proxy_error.as_deref(), Some("no endpoint available"));
    }
}

#[tokio::test]
async fn a_pod_on_the_same_node_refusing_by_policy_is_a_403_not_a_retry_elsewhere() {
    let cluster = Cluster::two_nodes().await;
    cluster.wait_certificates().await;
    let locked = cluster.http("10.1.0.4", PORT).await;
    for h2 in [false, true] {
        let mut client = Client::over(cluster.dial(0, "client", locked.at).await, h2).await;
        let a = client.get("locked.shop", "/", None).await;
        assert_eq!(a.status, 403, "h2={h2}: {a:?}");
        assert!(a.proxy_error.is_some_and(|e| e.contains("inbound policy")));
    }
    // Through a Service whose one endpoint says no: the same 403.
    let vip = addr("10.96.0.13", 80);
    cluster.service("locked", vip, PORT, &["10.1.0.4"]);
    for h2 in [false, true] {
        let mut client = Client::over(cluster.dial(0, "client", vip).await, h2).await;
        let a = client.get("locked.shop", "/", None).await;
        assert_eq!(a.status, 403, "h2={h2}: {a:?}");
    }
    assert_eq!(locked.served(), 0, "nothing reached it");
}

#[tokio::test]
async fn an_upgrade_becomes_a_byte_stream_after_the_servers_101() {
    let cluster = Cluster::two_nodes().await;
    cluster.wait_certificates().await;
    // To a meshed pod on the same node, and across the tunnel.
    for ip in ["10.1.0.3", "10.2.0.3"] {
        let server = cluster.http(ip, PORT).await;
        let mut conn = cluster.dial(0, "client", server.at).await;
        conn.write_all(
            b"GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(
                conn.read(&mut b).await.unwrap(),
                1,
                "{}",
                String::from_utf8_lossy(&head)
            );
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{ip}: {head}");
        assert!(head.contains("upgrade: echo"), "{head}");
        conn.write_all(b"ping over the upgrade").await.unwrap();
        let mut back = [0u8; 21];
        conn.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping over the upgrade");
    }
}

#[tokio::test]
async fn grpc_status_travels_in_the_trailers_and_is_counted() {
    let cluster = Cluster::two_nodes().await;
    cluster.wait_certificates().await;
    let (vip, servers) = web(&cluster, &["10.2.0.3"]).await;
    servers[0].set(|k| k.grpc_status = 14);
    let mut client = Client::over(cluster.dial(0, "client", vip).await, true).await;
    let a = client
        .get("web.shop", "/pkg.Svc/Call", Some("application/grpc"))
        .await;
    assert_eq!(
        (a.status, a.grpc_status.as_deref()),
        (200, Some("14")),
        "{a:?}"
    );
    let m = cluster.metrics(0);
    assert_eq!(
        m.value(
            "nodemesh_response_total",
            &[
                ("workload_name", "client"),
                ("grpc_status", "14"),
                ("classification", "failure")
            ]
        ),
        1.0,
        "{}",
        m.text
    );
}

/// Writes `request`, half-closes, and reads everything back.
async fn half_closed(conn: &mut tokio::net::TcpStream, request: &[u8]) -> String {
    conn.write_all(request).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut back))
        .await
        .expect("an answer, and the end")
        .unwrap();
    String::from_utf8_lossy(&back).into_owned()
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_requests_gets_every_answer() {
    let cluster = Cluster::two_nodes().await;
    cluster.wait_certificates().await;
    // Outside the mesh, a meshed pod here (the inbound path too), one on
    // node b (across the tunnel), and a Service.
    let (vip, _) = web(&cluster, &["10.2.0.7"]).await;
    let mut dsts = Vec::new();
    for ip in ["10.2.0.4", "10.1.0.3", "10.2.0.3"] {
        dsts.push(cluster.http(ip, PORT).await.at);
    }
    dsts.push(vip);
    for dst in dsts {
        // `printf 'GET / HTTP/1.0\r\n\r\n' | nc -N`
        let mut conn = cluster.dial(0, "client", dst).await;
        let back = half_closed(&mut conn, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
        assert!(back.starts_with("HTTP/1.0 200"), "{dst}: {back:?}");
        // HTTP/1.1 with `Connection: close`.
        let mut conn = cluster.dial(0, "client", dst).await;
        let back = half_closed(
            &mut conn,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(back.starts_with("HTTP/1.1 200"), "{dst}: {back:?}");
        // Three pipelined, then the half-close: three answers.
        let mut conn = cluster.dial(0, "client", dst).await;
        let one = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let back = half_closed(&mut conn, one.repeat(3).as_bytes()).await;
        assert_eq!(back.matches("HTTP/1.1 200").count(), 3, "{dst}: {back:?}");
    }
}

#[tokio::test]
async fn any_method_and_a_leading_empty_line_are_http_not_bytes() {
    let cluster = Cluster::two_nodes().await;
    let server = cluster.http("10.2.0.4", PORT).await;
    for request in [
        &b"PROPFIND /dav/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        b"PURGE /cache HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let mut conn = cluster.dial(0, "client", server.at).await;
        let back = half_closed(&mut conn, request).await;
        assert!(back.starts_with("HTTP/1.1 200"), "{back:?}");
    }
    let m = cluster.metrics(0);
    assert_eq!(
        m.value("nodemesh_request_total", &[("workload_name", "client")]),
        3.0,
        "each counted as a request: {}",
        m.text
    );
    assert_eq!(server.served(), 3);
}

#[tokio::test]
async fn a_client_first_text_protocol_is_never_held_for_the_detect_timeout() {
    // A first line that starts like a method of its own (a bare word, a
    // word and a space) must not make detection wait for more: it is
    // bytes at once, not after the timeout.
    let cluster = Cluster::two_nodes().await;
    let dst = cluster.echo("10.2.0.4", PORT).await;
    for first in [
        &b"HELLO"[..],
        b"NODEMESH-MARKER-1-",
        b"AUTH secret",
        b"PURGE /x HT",
    ] {
        let mut conn = cluster.dial(0, "client", dst).await;
        conn.write_all(first).await.unwrap();
        let mut back = vec![0u8; first.len()];
        conn.read_exact(&mut back).await.unwrap();
        assert_eq!(back, first);
    }
    let m = cluster.metrics(0);
    let detected = |result: &str| {
        m.value(
            "nodemesh_protocol_detect_total",
            &[("direction", "outbound"), ("result", result)],
        )
    };
    assert_eq!(detected("timeout"), 0.0, "{}", m.text);
    assert_eq!(detected("opaque"), 4.0, "{}", m.text);
}
