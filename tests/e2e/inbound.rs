//! Inbound capture on two nodes with a real API server: every connection
//! to a meshed pod enters its node's agent first, the app sees its real
//! client, and the inbound policy decides who gets in.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use nodemesh_core::names::{INBOUND_POLICY_ANNOTATION, MESH_LABEL, SKIP_INBOUND_PORTS_ANNOTATION};
use nodemesh_tests::{
    Metrics, Node, Pod, PodSpec, eventually,
    kube::unique,
    mesh::{MeshBed, next_mesh_agent},
    sys::in_netns,
};

const ECHO: u16 = 8080;
const SKIPPED: u16 = 9090;
const OTHER: u16 = 7070;

pub(crate) fn at(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::from((pod.ip, port))
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

pub(crate) fn certificates(m: &Metrics) -> f64 {
    m.sum("nodemesh_identity_certificates", &[])
}

/// Inbound connections to `pod` by TLS and peer identity ("" = none).
fn inbound_opens(m: &Metrics, pod: &str, tls: &str, peer: &str) -> f64 {
    m.sum(
        "nodemesh_tcp_peer_open_total",
        &[
            ("pod", pod),
            ("direction", "inbound"),
            ("tls", tls),
            ("peer_identity", peer),
        ],
    )
}

pub(crate) fn denied(m: &Metrics, pod: &str, reason: &str) -> f64 {
    m.sum(
        "nodemesh_inbound_denied_total",
        &[("pod", pod), ("reason", reason)],
    )
}

fn sorted(mut ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ips.sort();
    ips
}

/// An unmeshed namespace for plaintext clients.
pub(crate) fn plain_namespace(bed: &MeshBed) -> String {
    let ns = unique("plain");
    bed.cluster.namespace(&ns, &[]);
    ns
}

/// A connection from the node itself (as kubelet's probes come) that
/// sends a line and reads it back.
fn from_node(node: &Node, to: SocketAddr) -> Result<(), String> {
    line_from(&node.netns, to)
}

/// What a plain client from `netns` gets at `to` when it sends a line and
/// waits for it back: `Ok(())` echoed, else how it failed.
pub(crate) fn line_from(netns: &std::path::Path, to: SocketAddr) -> Result<(), String> {
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"probe\n").map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        (&buf == b"probe\n")
            .then_some(())
            .ok_or_else(|| "a different answer".to_string())
    })
}

/// A meshed server on node b and four clients, meshed and not, on both
/// nodes: each connection enters node b's agent once (its inbound metrics
/// count all four, the plaintext ones too), and the server app sees each
/// client pod's own address.
pub fn the_app_sees_its_client_and_plaintext_is_captured() {
    let bed = MeshBed::new("24h");
    let plain = plain_namespace(&bed);
    let server = bed.pod(&bed.b, "server", "server");
    let near = bed.pod(&bed.b, "near", "web");
    let far = bed.pod(&bed.a, "far", "web");
    let plain_near = bed
        .cluster
        .run_pod(&bed.b, PodSpec::new(&plain, "plain-near"));
    let plain_far = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "plain-far"));
    bed.agent_b
        .wait_metric("server's and web's certificates", |m| {
            certificates(m) == 2.0
        });
    bed.agent_a
        .wait_metric("web's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    for client in [&near, &far, &plain_near, &plain_far] {
        let x = client.tcp().exchange_ok(at(&server, ECHO), 64 * 1024);
        assert!(x.intact, "{}: {x:?}", client.name);
    }
    let peers = srv.peers(ECHO);
    assert_eq!(
        sorted(peers.iter().map(|p| p.ip()).collect()),
        sorted(vec![
            near.ip.into(),
            far.ip.into(),
            plain_near.ip.into(),
            plain_far.ip.into()
        ]),
        "the app sees each client pod: {peers:?}"
    );
    // A tunnelled client's port is the agent's delivering socket's: the
    // app can still listen on it (it could without the mesh).
    let used = peers
        .iter()
        .find(|p| p.ip() == IpAddr::from(far.ip))
        .expect("the far client")
        .port();
    srv.listen(used);
    let web = spiffe(&bed.ns, "web");
    let m = bed
        .agent_b
        .wait_metric("four inbound connections on the server", |m| {
            m.sum(
                "nodemesh_tcp_peer_open_total",
                &[("pod", "server"), ("direction", "inbound")],
            ) == 4.0
        });
    // Same node: once through the proxy, both ends known, no TLS inside
    // the node. Other node: the tunnel. Unmeshed: captured plaintext, no
    // identity.
    assert_eq!(
        inbound_opens(&m, "server", "false", &web),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(inbound_opens(&m, "server", "true", &web), 1.0, "{}", m.text);
    assert_eq!(inbound_opens(&m, "server", "false", ""), 2.0, "{}", m.text);
    assert!(
        m.sum(
            "nodemesh_tcp_received_bytes_total",
            &[("pod", "server"), ("direction", "inbound")]
        ) >= (4 * 64 * 1024) as f64,
        "{}",
        m.text
    );
}

/// `all-authenticated` on a pod: plaintext is refused before the app
/// accepts anything, mTLS clients are served, the skipped port and the
/// probe port (from the node) stay open; annotation and label changes
/// apply live.
pub fn all_authenticated_refuses_plaintext_and_changes_apply_live() {
    let bed = MeshBed::new("24h");
    let plain_ns = plain_namespace(&bed);
    let server = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(INBOUND_POLICY_ANNOTATION, "all-authenticated")
            .annotation(SKIP_INBOUND_PORTS_ANNOTATION, &SKIPPED.to_string())
            .tcp_probe(ECHO),
    );
    let web = bed.pod(&bed.a, "web", "web");
    let plain = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain_ns, "plain"));
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    bed.agent_a
        .wait_metric("web's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    for port in [ECHO, SKIPPED, OTHER] {
        srv.listen(port);
    }

    // Plaintext from another node: reset, and the app never accepted.
    let refused = plain
        .tcp()
        .exchange(at(&server, ECHO), 1000)
        .expect_err("plaintext refused under all-authenticated");
    assert!(
        refused.kind == "reset" || refused.kind == "other",
        "{refused:?}"
    );
    assert!(srv.peers(ECHO).is_empty(), "the app accepted nothing");
    bed.agent_b.wait_metric("the refusal counted", |m| {
        denied(m, "server", "unauthenticated") == 1.0
    });
    // mTLS from the same place: served, as itself.
    web.tcp().exchange_ok(at(&server, ECHO), 1000);
    assert_eq!(
        srv.peers(ECHO).iter().map(|p| p.ip()).collect::<Vec<_>>(),
        vec![IpAddr::from(web.ip)]
    );
    // The exempt port is not captured: plaintext reaches the app directly.
    plain.tcp().exchange_ok(at(&server, SKIPPED), 1000);
    assert_eq!(
        srv.peers(SKIPPED)
            .iter()
            .map(|p| p.ip())
            .collect::<Vec<_>>(),
        vec![IpAddr::from(plain.ip)]
    );
    // Exemptions change live: without it, the port is captured again.
    bed.cluster
        .annotate_pod(&server, SKIP_INBOUND_PORTS_ANNOTATION, Some("1"));
    eventually(
        "the port is captured again",
        Duration::from_secs(15),
        || match plain.tcp().exchange(at(&server, SKIPPED), 1000) {
            Err(_) => Ok(()),
            Ok(x) => Err(format!("still exempt: {x:?}")),
        },
    );
    // The node may reach the probe port, and only that one.
    from_node(&bed.b, at(&server, ECHO)).expect("the probe port from the node");
    assert!(
        from_node(&bed.b, at(&server, OTHER)).is_err(),
        "another port from the node is refused"
    );
    assert!(srv.peers(OTHER).is_empty());
    let m = bed.agent_b.wait_metric("the node's refusal counted", |m| {
        denied(m, "server", "unauthenticated") >= 3.0
    });
    assert!(
        m.text.contains("nodemesh_inbound_denied_total"),
        "{}",
        m.text
    );
    assert!(
        bed.agent_b
            .log()
            .contains("inbound connection refused by policy"),
        "{}",
        bed.agent_b.log_tail(30)
    );

    // `cluster-unauthenticated`, live: plaintext from a pod of the cluster
    // is let in.
    bed.cluster.annotate_pod(
        &server,
        INBOUND_POLICY_ANNOTATION,
        Some("cluster-unauthenticated"),
    );
    eventually(
        "plaintext from the cluster is let in",
        Duration::from_secs(15),
        || match plain.tcp().exchange(at(&server, ECHO), 1000) {
            Ok(_) => Ok(()),
            Err(f) => Err(format!("still refused: {f:?}")),
        },
    );

    // `deny`, live: the meshed client is refused too.
    bed.cluster
        .annotate_pod(&server, INBOUND_POLICY_ANNOTATION, Some("deny"));
    eventually("deny applies", Duration::from_secs(15), || {
        match web.tcp().exchange(at(&server, ECHO), 1000) {
            Err(_) => Ok(()),
            Ok(x) => Err(format!("still served: {x:?}")),
        }
    });
    bed.agent_b.wait_metric("the denial counted", |m| {
        denied(m, "server", "denied") >= 1.0
    });
    // The namespace's default does not override the pod's own annotation;
    // removing the pod's falls back to it.
    bed.cluster
        .apply_manifests(
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{{MESH_LABEL}: enabled}}, annotations: {{{INBOUND_POLICY_ANNOTATION}: all-unauthenticated}}}}\n",
                bed.ns
            ),
            false,
        )
        .expect("annotate the namespace");
    bed.cluster
        .annotate_pod(&server, INBOUND_POLICY_ANNOTATION, None);
    eventually(
        "the namespace's policy applies",
        Duration::from_secs(15),
        || match plain.tcp().exchange(at(&server, ECHO), 1000) {
            Ok(_) => Ok(()),
            Err(f) => Err(format!("still refused: {f:?}")),
        },
    );
    assert!(
        srv.peers(ECHO)
            .iter()
            .any(|p| p.ip() == IpAddr::from(plain.ip)),
        "the app sees the plaintext client"
    );

    // Opting the pod out releases it live: nothing captured any more.
    bed.cluster
        .annotate_pod(&server, INBOUND_POLICY_ANNOTATION, Some("deny"));
    bed.cluster.label_pod(&server, MESH_LABEL, Some("disabled"));
    bed.agent_b.wait_metric("the server released", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 0.0
    });
    let before = srv.peers(ECHO).len();
    plain.tcp().exchange_ok(at(&server, ECHO), 1000);
    assert_eq!(srv.peers(ECHO).len(), before + 1, "straight to the app");
}

/// With no agent on the node, captured inbound fails closed (the app sees
/// nothing); the next agent takes the pod's inbound back.
pub fn without_an_agent_inbound_fails_closed_and_a_new_one_takes_over() {
    let mut bed = MeshBed::new("24h");
    let plain_ns = plain_namespace(&bed);
    let server = bed.pod(&bed.b, "server", "server");
    let plain = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain_ns, "plain"));
    bed.agent_b
        .wait_metric("server's certificate", |m| certificates(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    plain.tcp().exchange_ok(at(&server, ECHO), 1000);
    assert_eq!(srv.peers(ECHO).len(), 1);

    bed.agent_b.kill();
    let cut = plain
        .tcp()
        .exchange_with_timeout(at(&server, ECHO), 1000, Duration::from_secs(2))
        .expect_err("no agent, no inbound connection");
    assert_eq!(srv.peers(ECHO).len(), 1, "nothing reached the app: {cut:?}");

    bed.agent_b = next_mesh_agent(&bed.install, &bed.identity, &bed.b);
    bed.agent_b.wait_metric("the server served again", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 1.0
    });
    eventually(
        "the new agent takes inbound",
        Duration::from_secs(15),
        || {
            plain
                .tcp()
                .exchange_with_timeout(at(&server, ECHO), 1000, Duration::from_secs(2))
                .map(|_| ())
                .map_err(|f| format!("{f:?}"))
        },
    );
    bed.agent_b.wait_metric("captured by the new agent", |m| {
        inbound_opens(m, "server", "false", "") >= 1.0
    });
    let peers = srv.peers(ECHO);
    assert!(
        peers.iter().all(|p| p.ip() == IpAddr::from(plain.ip)),
        "{peers:?}"
    );
}

/// An `AuthorizationPolicy` (manifest text) in `ns`.
fn authz_policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// The policy's `Accepted` condition: (status, message).
fn accepted(bed: &MeshBed, name: &str) -> Option<(String, String)> {
    let o = bed.cluster.get_object(
        "policy.nodemesh.io/v1alpha1",
        "AuthorizationPolicy",
        &bed.ns,
        name,
    )?;
    let c = o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    Some((
        c["status"].as_str()?.to_owned(),
        c["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// The policy tests' pods: `server` (label `app=server`) and `api` on node
/// b, meshed `web` and an unmeshed `plain` on node a; certificates held.
fn policy_pods(bed: &MeshBed) -> [std::sync::Arc<Pod>; 4] {
    let plain_ns = plain_namespace(bed);
    let server = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .label("app", "server"),
    );
    let web = bed.pod(&bed.a, "web", "web");
    let api = bed.pod(&bed.b, "api", "api");
    let plain = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain_ns, "plain"));
    bed.agent_b
        .wait_metric("server's and api's certificates", |m| {
            certificates(m) == 2.0
        });
    bed.agent_a
        .wait_metric("web's certificate", |m| certificates(m) == 1.0);
    [server, web, api, plain]
}

/// An `AuthorizationPolicy` allowing only `sa/web` on one port: `web`
/// (another node, through the tunnel) is served, `api` (the same node, one
/// proxy pass) and plaintext are refused and counted; another port keeps
/// the default; the API server validates the schema and the identity
/// service reports what it cannot; changes and deletion apply live.
pub fn an_authorization_policy_lets_in_only_whom_it_names() {
    let bed = MeshBed::new("24h");
    let [server, web, api, plain] = policy_pods(&bed);
    let mut srv = server.tcp();
    for port in [ECHO, OTHER] {
        srv.listen(port);
    }
    // Before any policy: everyone in (the default, all-unauthenticated).
    api.tcp().exchange_ok(at(&server, ECHO), 100);

    // An open connection is decided again when a policy comes: a plaintext
    // download under way is reset once a policy refuses it.
    const STREAM: u16 = 7171;
    let mut src = server.tcp();
    src.source(STREAM);
    let mut downloader = plain.tcp();
    let stream_to = at(&server, STREAM);
    let downloading = std::thread::spawn(move || downloader.download(stream_to, 30));
    bed.agent_b.wait_metric("the download is under way", |m| {
        m.sum(
            "nodemesh_tcp_sent_bytes_total",
            &[("pod", "server"), ("direction", "inbound")],
        ) > 1_000_000.0
    });
    let close_stream = authz_policy(
        &bed.ns,
        "stream",
        &format!("{{ports: [{STREAM}], clients: {{serviceAccounts: [{{name: web}}]}}}}"),
    );
    bed.cluster
        .apply_manifests(&close_stream, false)
        .expect("a policy for the stream");
    let download = downloading.join().expect("the download thread");
    assert_eq!(download.end, "error", "cut, not finished: {download:?}");
    assert!(download.received > 1_000_000, "{download:?}");
    bed.cluster.delete_manifests(&close_stream);

    let only_web = authz_policy(
        &bed.ns,
        "server",
        &format!(
            "{{selector: {{matchLabels: {{app: server}}}}, ports: [{ECHO}], clients: {{serviceAccounts: [{{name: web}}]}}}}"
        ),
    );
    bed.cluster
        .apply_manifests(&only_web, false)
        .expect("apply the policy");
    eventually(
        "the policy is accepted",
        Duration::from_secs(15),
        || match accepted(&bed, "server") {
            Some((s, _)) if s == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    eventually("api is refused", Duration::from_secs(15), || {
        match api.tcp().exchange(at(&server, ECHO), 100) {
            Err(_) => Ok(()),
            Ok(x) => Err(format!("still served: {x:?}")),
        }
    });
    let accepted_before = srv.peers(ECHO).len();
    web.tcp().exchange_ok(at(&server, ECHO), 1000);
    plain
        .tcp()
        .exchange(at(&server, ECHO), 100)
        .expect_err("plaintext refused");
    let peers = srv.peers(ECHO);
    assert_eq!(
        peers[accepted_before..]
            .iter()
            .map(|p| p.ip())
            .collect::<Vec<_>>(),
        vec![IpAddr::from(web.ip)],
        "only web reached the app"
    );
    bed.agent_b.wait_metric("the refusals counted", |m| {
        denied(m, "server", "unauthorized") >= 2.0
    });
    // A port the policy does not name keeps the default.
    api.tcp().exchange_ok(at(&server, OTHER), 100);
    plain.tcp().exchange_ok(at(&server, OTHER), 100);

    // The schema is the API server's to check.
    for bad in [
        "{ports: [0], clients: {authenticated: true}}",
        "{clients: {}}",
        "{clients: {namespaces: [Not_A_Name]}}",
        "{selector: {matchExpressions: [{key: a, operator: Near}]}, clients: {authenticated: true}}",
    ] {
        let err = bed
            .cluster
            .apply_manifests(&authz_policy(&bed.ns, "bad", bad), false)
            .expect_err(bad);
        assert!(err.contains("AuthorizationPolicy"), "{bad}: {err}");
    }
    // What it cannot check is reported in the status, and not enforced.
    bed.cluster
        .apply_manifests(
            &authz_policy(
                &bed.ns,
                "unenforced",
                "{selector: {matchExpressions: [{key: app, operator: In}]}, clients: {serviceAccounts: [{name: nobody}]}}",
            ),
            false,
        )
        .expect("a policy the schema lets by");
    eventually(
        "the status says why",
        Duration::from_secs(15),
        || match accepted(&bed, "unenforced") {
            Some((s, m)) if s == "False" && m.contains("In needs values") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    web.tcp().exchange_ok(at(&server, ECHO), 100);
    // Clients the schema lets by but that name nobody: where the policy
    // clearly applies, it admits nobody until fixed (never fails open).
    let closed = authz_policy(
        &bed.ns,
        "closed",
        &format!("{{ports: [{OTHER}], clients: {{authenticated: false}}}}"),
    );
    bed.cluster
        .apply_manifests(&closed, false)
        .expect("a policy naming no client");
    eventually("it admits nobody", Duration::from_secs(15), || {
        match (
            accepted(&bed, "closed"),
            api.tcp().exchange(at(&server, OTHER), 100),
        ) {
            (Some((s, m)), Err(_)) if s == "False" && m.contains("admit nobody") => Ok(()),
            (status, x) => Err(format!("{status:?} {x:?}")),
        }
    });
    bed.cluster.delete_manifests(&closed);
    eventually(
        "deleted, the default again",
        Duration::from_secs(15),
        || {
            api.tcp()
                .exchange(at(&server, OTHER), 100)
                .map(|_| ())
                .map_err(|f| format!("{f:?}"))
        },
    );

    // Changed live: now api, not web.
    bed.cluster
        .apply_manifests(&only_web.replace("name: web", "name: api"), false)
        .expect("change the policy");
    eventually(
        "web is refused, api served",
        Duration::from_secs(15),
        || {
            if web.tcp().exchange(at(&server, ECHO), 100).is_ok() {
                return Err("web still served".into());
            }
            api.tcp()
                .exchange(at(&server, ECHO), 100)
                .map(|_| ())
                .map_err(|f| format!("api refused: {f:?}"))
        },
    );
    // Deleted: the default again, plaintext included.
    bed.cluster.delete_manifests(&only_web);
    eventually("the default applies again", Duration::from_secs(15), || {
        plain
            .tcp()
            .exchange(at(&server, ECHO), 100)
            .map(|_| ())
            .map_err(|f| format!("still refused: {f:?}"))
    });
    web.tcp().exchange_ok(at(&server, ECHO), 100);
}

/// Inbound requests to `server` (the pod's workload) by labels.
fn inbound_requests(m: &Metrics, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("direction", "inbound"), ("workload_name", "server")];
    all.extend_from_slice(labels);
    m.sum("nodemesh_request_total", &all)
}

/// HTTP and gRPC to a meshed pod are detected and measured at the server's
/// edge — per client identity (tunnel, same node through the proxy once,
/// plaintext), status and latency — while the app still sees each client;
/// a server-first app is not held up by inbound detection; and a client
/// the policy refuses gets a `403` over HTTP, never reaching the app.
pub fn requests_are_measured_at_the_servers_edge_and_refused_with_403() {
    use nodemesh_tests::apps::{grpc, http};
    const HTTP: u16 = 8080;
    const GRPC: u16 = 50051;
    const SMTP: u16 = 2525;
    let bed = MeshBed::new("24h");
    let [server, web, api, plain] = policy_pods(&bed);
    let mut hsrv = server.http();
    hsrv.serve(HTTP, http::Knobs::default());
    let mut gsrv = server.grpc();
    gsrv.serve(GRPC, grpc::Knobs::default());
    let to = at(&server, HTTP);
    for client in [&web, &api, &plain] {
        let out = client.http().run(http::Run::get(to, "/", 10));
        assert!(out.iter().all(|o| o.status == Some(200)), "{out:?}");
    }
    let failed = plain.http().run(http::Run::get(to, "/?status=500", 2));
    assert!(failed.iter().all(|o| o.status == Some(500)), "{failed:?}");
    let calls = web.grpc().run(grpc::Run::unary(at(&server, GRPC), 5));
    assert!(calls.iter().all(|o| o.code == 0), "{calls:?}");
    let seen = hsrv.seen(HTTP);
    assert_eq!(seen.requests, 32);
    assert_eq!(
        seen.peers.into_iter().collect::<Vec<_>>(),
        sorted(vec![web.ip.into(), api.ip.into(), plain.ip.into()]),
        "the app sees every client"
    );

    let web_id = spiffe(&bed.ns, "web");
    let api_id = spiffe(&bed.ns, "api");
    let m = bed
        .agent_b
        .wait_metric("every inbound response counted", |m| {
            m.sum(
                "nodemesh_response_total",
                &[("direction", "inbound"), ("workload_name", "server")],
            ) == 37.0
        });
    let by = |client: &str, tls: &str, protocol: &str| {
        inbound_requests(
            &m,
            &[("client_id", client), ("tls", tls), ("protocol", protocol)],
        )
    };
    assert_eq!(by(&web_id, "true", "http1"), 10.0, "{}", m.text);
    assert_eq!(by(&api_id, "false", "http1"), 10.0, "one pass: {}", m.text);
    assert_eq!(by("", "false", "http1"), 12.0, "{}", m.text);
    assert_eq!(by(&web_id, "true", "grpc"), 5.0, "{}", m.text);
    assert_eq!(
        m.sum(
            "nodemesh_response_total",
            &[
                ("direction", "inbound"),
                ("status_code", "500"),
                ("classification", "failure")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.sum(
            "nodemesh_response_latency_seconds_count",
            &[("direction", "inbound"), ("workload_name", "server")]
        ),
        37.0
    );
    // Detected on the server's side: the plaintext and tunnelled
    // connections (same-node ones were detected once, as the client's).
    assert!(
        m.sum(
            "nodemesh_protocol_detect_total",
            &[("direction", "inbound"), ("result", "http1")]
        ) >= 2.0
            && m.sum(
                "nodemesh_protocol_detect_total",
                &[("direction", "inbound"), ("result", "h2")]
            ) >= 1.0,
        "{}",
        m.text
    );

    // An app that closes after each response (no keep-alive): the client's
    // keep-alive connection through the server's edge is closed with it
    // and told so, never left leading to a closed app connection (a 502).
    const CLOSING: u16 = 8181;
    let mut closing = server.http();
    closing.serve(
        CLOSING,
        http::Knobs {
            keep_alive: false,
            ..http::Knobs::default()
        },
    );
    let out = plain
        .http()
        .run(http::Run::get(at(&server, CLOSING), "/", 10));
    assert!(out.iter().all(|o| o.status == Some(200)), "{out:?}");
    assert_eq!(closing.seen(CLOSING).requests, 10);

    // A server-first app: its banner decides, not the detect timeout.
    let banner = "220 mail.example ESMTP ready\r\n";
    let mut smtp = server.tcp();
    smtp.banner(SMTP, banner);
    for client in [&plain, &web] {
        let (text, _) = client
            .tcp()
            .greeting(at(&server, SMTP), banner.len() as u32)
            .expect("the banner");
        assert_eq!(text, banner);
    }
    bed.agent_b.wait_metric("the banner decided", |m| {
        m.sum(
            "nodemesh_protocol_detect_total",
            &[("direction", "inbound"), ("result", "server_first")],
        ) >= 2.0
    });

    // Refused over HTTP: a 403 from the proxy, nothing reaches the app.
    bed.cluster
        .apply_manifests(
            &authz_policy(
                &bed.ns,
                "server",
                &format!("{{ports: [{HTTP}], clients: {{serviceAccounts: [{{name: web}}]}}}}"),
            ),
            false,
        )
        .expect("apply the policy");
    eventually("api gets a 403", Duration::from_secs(15), || {
        let out = api.http().run(http::Run::get(to, "/", 1));
        match out.first().and_then(|o| o.status) {
            Some(403) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let before = hsrv.seen(HTTP).requests;
    let refused = plain.http().run(http::Run::get(to, "/", 3));
    assert!(refused.iter().all(|o| o.status == Some(403)), "{refused:?}");
    let served = web.http().run(http::Run::get(to, "/", 3));
    assert!(served.iter().all(|o| o.status == Some(200)), "{served:?}");
    assert_eq!(
        hsrv.seen(HTTP).requests,
        before + 3,
        "only web's requests reached the app"
    );
    let m = bed.agent_b.wait_metric("the refusals counted", |m| {
        denied(m, "server", "unauthorized") >= 2.0
    });
    // Every kind of series the Grafana dashboard shows exists here.
    crate::operate::the_dashboard_uses_only_exported_names(&m);
}

/// A client with a new connection per request (curl, `Connection: close`)
/// leaves the server's pod its ports. Through the tunnel, a meshed
/// client's requests share its pooled connections: the app gets no
/// connection per client connection. An unmeshed client's connections
/// reach the app one to one, and the app, told that the client closes,
/// closes first: the `TIME_WAIT` stays on the app's side, as without the
/// mesh. (The agent's delivering sockets all share the pod's address and
/// the app's port: were the agent to close them first, their `TIME_WAIT`s
/// would use up that one 4-tuple space, some 28 000 a minute.)
pub fn a_new_connection_per_request_leaves_the_servers_ports_alone() {
    use nodemesh_tests::apps::http;
    use std::process::{Command, Stdio};
    const N: usize = 100;
    let bed = MeshBed::new("24h");
    let [server, web, _api, plain] = policy_pods(&bed);
    let mut hsrv = server.http();
    hsrv.serve(ECHO, http::Knobs::default());
    let url = format!("http://{}:{ECHO}/x[1-{N}]", server.ip);
    let curl = |client: &Pod| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            "-H",
            "Connection: close",
            &url,
        ])
        .stdout(Stdio::piped());
        let out = client
            .spawn(cmd)
            .wait_with_output()
            .expect("run curl (cargo xtask setup installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() == N && lines.iter().all(|l| *l == "200 1"),
            "{N} requests, each answered on a new connection: {text}"
        );
    };
    // Sockets in the server's pod: `dport` 8080 are the agent's delivering
    // sockets (the client's own live in its pod), `sport` 8080 the app's.
    let sockets =
        |state: &str, side: &str| server.tcp_sockets(state, Some(&format!("{side} = :{ECHO}")));

    curl(&web);
    let agent_closed = sockets("time-wait", "dport");
    let app_conns = sockets("established", "sport") + sockets("time-wait", "sport");
    assert!(
        agent_closed <= N / 10 && app_conns <= N / 10,
        "through the tunnel, {N} client connections took {app_conns} app connections, {agent_closed} closed by the agent first"
    );

    curl(&plain);
    let agent_closed = sockets("time-wait", "dport");
    let app_closed = sockets("time-wait", "sport");
    assert!(
        agent_closed <= N / 10 && app_closed >= N * 9 / 10,
        "unmeshed: of {N} delivered connections, the app closed {app_closed} first, the agent {agent_closed}"
    );
    assert_eq!(hsrv.seen(ECHO).requests, 2 * N as u64);
}
