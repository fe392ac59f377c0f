//! Requests through Services: every HTTP request (every HTTP/2 stream) is
//! balanced on its own over the endpoints on both nodes, slow and refusing
//! endpoints get less or nothing, gRPC, upgrades and large uploads pass,
//! a server-first protocol never waits for detection, and the golden
//! request metrics say what happened.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use nodemesh_tests::{
    Agent, AgentOptions, Cluster, Metrics, Node, PodSpec,
    apps::{grpc, http},
    eventually,
    kube::unique,
    mesh::{self, MeshBed},
};

const HTTP: u16 = 8080;
const GRPC: u16 = 50051;

fn by_server(outcomes: &[http::Outcome]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for o in outcomes {
        assert_eq!(o.status, Some(200), "{o:?}");
        *counts
            .entry(o.server.clone().unwrap_or_default())
            .or_default() += 1;
    }
    counts
}

fn requests(m: &Metrics, labels: &[(&str, &str)]) -> f64 {
    m.sum("nodemesh_request_total", labels)
}

pub fn requests_to_a_service_are_balanced_one_by_one_across_nodes() {
    let bed = MeshBed::new("24h");
    let near = bed.pod(&bed.a, "web-near", "web");
    let far = bed.pod(&bed.b, "web-far", "web");
    let far2 = bed.pod(&bed.b, "web-far2", "web");
    let slow = bed.pod(&bed.b, "web-slow", "web");
    let idle = bed.pod(&bed.a, "web-idle", "web");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_b.wait_metric("web's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let serve = |pod: &nodemesh_tests::Pod, name: &str, delay_ms: u64| {
        let mut app = pod.http();
        app.serve(
            HTTP,
            http::Knobs {
                name: Some(name.into()),
                delay_ms,
                ..http::Knobs::default()
            },
        );
        app
    };
    let _near = serve(&near, "near", 0);
    let _far = serve(&far, "far", 0);
    let _far2 = serve(&far2, "far2", 0);
    let _slow = serve(&slow, "slow", 50);
    let vip = SocketAddr::from((bed.cluster.service(&bed.ns, "web", 80, HTTP), 80));
    bed.cluster.endpoint_slice(
        &bed.ns,
        "web",
        HTTP,
        &[
            (&far, &bed.b, true),
            (&far2, &bed.b, true),
            (&slow, &bed.b, true),
        ],
    );
    bed.agent_a.wait_service(vip, 3);
    let mut cli = client.http();
    let marker = format!("/NODEMESH-REQUEST-{}", std::process::id());

    // Three keep-alive connections, 150 requests to the other node's
    // endpoints (none on the client's: see the locality test): each
    // balanced on its own; the endpoint 50 ms slower gets clearly fewer.
    let capture = bed.link.capture();
    let outcomes = cli.run(http::Run {
        requests: 150,
        concurrency: 3,
        ..http::Run::get(vip, &marker, 0)
    });
    let seen = capture.finish();
    let counts = by_server(&outcomes);
    assert!(
        counts.get("far").copied().unwrap_or(0) >= 20
            && counts.get("far2").copied().unwrap_or(0) >= 20,
        "requests spread over the fast endpoints: {counts:?}"
    );
    let slow_share = counts.get("slow").copied().unwrap_or(0);
    assert!(
        slow_share >= 1 && slow_share * 4 < counts["far"].min(counts["far2"]),
        "the slow endpoint gets clearly fewer: {counts:?}"
    );
    assert!(
        !mesh::contains(&seen, marker.as_bytes()),
        "a request visible in the clear on the link"
    );

    // Golden metrics on the client's node: per destination workload and
    // Service, TLS where it crossed nodes.
    let client_ns = bed.ns.clone();
    let service = format!("{client_ns}/web:80");
    let m = bed.agent_a.wait_metric("150 requests counted", |m| {
        requests(m, &[("workload_name", "client"), ("dst_service", &service)]) == 150.0
    });
    let far_tls = requests(
        &m,
        &[
            ("dst_workload_name", "web-far"),
            ("tls", "true"),
            ("dst_service", &service),
        ],
    ) + requests(&m, &[("dst_workload_name", "web-far2"), ("tls", "true")])
        + requests(&m, &[("dst_workload_name", "web-slow"), ("tls", "true")]);
    assert_eq!(
        far_tls, 150.0,
        "requests to the other node carried over mutual TLS\n{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "nodemesh_response_total",
            &[("dst_service", &service), ("classification", "success")]
        ),
        150.0
    );

    // An endpoint that refuses (nothing listens in web-idle): no request
    // fails; the others take its share.
    bed.cluster.endpoint_slice(
        &bed.ns,
        "web",
        HTTP,
        &[
            (&near, &bed.a, true),
            (&far, &bed.b, true),
            (&idle, &bed.a, true),
        ],
    );
    bed.agent_a.wait_service(vip, 3);
    let outcomes = cli.run(http::Run {
        requests: 60,
        concurrency: 2,
        ..http::Run::get(vip, "/", 0)
    });
    let counts = by_server(&outcomes);
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");

    // Scaled down to one, live; then 100 requests, 10 answered 500.
    bed.cluster
        .endpoint_slice(&bed.ns, "web", HTTP, &[(&far, &bed.b, true)]);
    bed.agent_a.wait_service(vip, 1);
    let before = bed.agent_a.metrics();
    let ok = cli.run(http::Run::get(vip, "/", 90));
    let failed = cli.run(http::Run::get(vip, "/?status=500", 10));
    assert!(
        ok.iter().all(|o| o.server.as_deref() == Some("far")),
        "{ok:?}"
    );
    assert!(failed.iter().all(|o| o.status == Some(500)), "{failed:?}");
    let labels =
        |class: &'static str| [("dst_workload_name", "web-far"), ("classification", class)];
    let m = bed.agent_a.wait_metric("100 more responses counted", |m| {
        m.sum("nodemesh_response_total", &labels("success"))
            + m.sum("nodemesh_response_total", &labels("failure"))
            == before.sum("nodemesh_response_total", &labels("success"))
                + before.sum("nodemesh_response_total", &labels("failure"))
                + 100.0
    });
    assert_eq!(
        m.sum("nodemesh_response_total", &labels("success"))
            - before.sum("nodemesh_response_total", &labels("success")),
        90.0
    );
    assert_eq!(
        m.sum(
            "nodemesh_response_total",
            &[
                ("dst_workload_name", "web-far"),
                ("status_code", "500"),
                ("classification", "failure")
            ]
        ),
        10.0
    );

    // No ready endpoint: the proxy answers 503 itself, counted a failure.
    bed.cluster
        .endpoint_slice(&bed.ns, "web", HTTP, &[(&far, &bed.b, false)]);
    bed.agent_a.wait_service(vip, 0);
    let none = cli.run(http::Run::get(vip, "/", 3));
    assert!(none.iter().all(|o| o.status == Some(503)), "{none:?}");
    bed.agent_a
        .wait_metric("proxy errors counted as failures", |m| {
            m.sum(
                "nodemesh_response_total",
                &[
                    ("dst_service", &service),
                    ("status_code", "503"),
                    ("classification", "failure"),
                ],
            ) == 3.0
        });
    drop(bed.identity);
}

pub fn grpc_upgrades_and_large_uploads_pass_through_a_service() {
    let bed = MeshBed::new("24h");
    let server = bed.pod(&bed.b, "api", "api");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_b.wait_metric("api's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let mut hsrv = server.http();
    hsrv.serve(HTTP, http::Knobs::default());
    let mut gsrv = server.grpc();
    gsrv.serve(GRPC, grpc::Knobs::default());
    let web = SocketAddr::from((bed.cluster.service(&bed.ns, "web", 80, HTTP), 80));
    let rpc = SocketAddr::from((bed.cluster.service(&bed.ns, "rpc", 9090, GRPC), 9090));
    bed.cluster
        .endpoint_slice(&bed.ns, "web", HTTP, &[(&server, &bed.b, true)]);
    bed.cluster
        .endpoint_slice(&bed.ns, "rpc", GRPC, &[(&server, &bed.b, true)]);
    bed.agent_a.wait_service(web, 1);
    bed.agent_a.wait_service(rpc, 1);

    // gRPC unary and server streaming, statuses intact and counted.
    let mut gcli = client.grpc();
    let unary = gcli.run(grpc::Run::unary(rpc, 20));
    assert!(unary.iter().all(|o| o.code == 0), "{unary:?}");
    let unavailable = gcli.run(grpc::Run {
        ask: Some(grpc::Knobs {
            code: 14,
            ..grpc::Knobs::default()
        }),
        ..grpc::Run::unary(rpc, 5)
    });
    assert!(unavailable.iter().all(|o| o.code == 14), "{unavailable:?}");
    let streams = gcli.run(grpc::Run {
        method: grpc::Method::Stream,
        concurrency: 2,
        ask: Some(grpc::Knobs {
            messages: 5,
            ..grpc::Knobs::default()
        }),
        ..grpc::Run::unary(rpc, 4)
    });
    assert!(
        streams.iter().all(|o| o.code == 0 && o.messages == 5),
        "{streams:?}"
    );
    let m = bed.agent_a.wait_metric("gRPC responses counted", |m| {
        m.sum("nodemesh_response_total", &[("protocol", "grpc")]) == 29.0
    });
    assert_eq!(
        m.sum(
            "nodemesh_response_total",
            &[("protocol", "grpc"), ("grpc_status", "0"), ("tls", "true")]
        ),
        24.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "nodemesh_response_total",
            &[
                ("protocol", "grpc"),
                ("grpc_status", "14"),
                ("classification", "failure")
            ]
        ),
        5.0
    );

    // One long-lived HTTP/2 connection follows the endpoints: one added
    // while calls flow gets its share, with no new connection.
    let second = bed.pod(&bed.a, "api-2", "api");
    let mut gsrv2 = second.grpc();
    gsrv2.serve(GRPC, grpc::Knobs::default());
    let calls = std::thread::spawn(move || {
        let outcomes = gcli.run(grpc::Run {
            ask: Some(grpc::Knobs {
                delay_ms: 10,
                ..grpc::Knobs::default()
            }),
            ..grpc::Run::unary(rpc, 200)
        });
        (gcli, outcomes)
    });
    std::thread::sleep(Duration::from_millis(500));
    bed.cluster.endpoint_slice(
        &bed.ns,
        "rpc",
        GRPC,
        &[(&server, &bed.b, true), (&second, &bed.a, true)],
    );
    let (_gcli, outcomes) = calls.join().expect("the calls");
    assert!(outcomes.iter().all(|o| o.code == 0), "{outcomes:?}");
    let joined = gsrv2.seen(GRPC).calls;
    assert!(
        joined >= 10,
        "the endpoint added mid-connection got {joined} of 200 calls"
    );

    // An HTTP/1.1 upgrade (WebSocket): 101, then bytes both ways.
    let mut raw = client.tcp();
    let (status, echoed, intact) = raw.upgrade(web, 1 << 20).expect("upgrade");
    assert!(status.contains(" 101 "), "{status}");
    assert!(intact && echoed == 1 << 20);

    // A 1 GiB upload streams through; the agent's memory stays bounded.
    let mut hcli = client.http();
    let rss_before = bed.agent_a.rss_kib().unwrap_or(0);
    let upload = hcli.run(http::Run {
        method: "POST".into(),
        body_bytes: 1 << 30,
        timeout_ms: 300_000,
        ..http::Run::get(web, "/", 1)
    });
    assert_eq!(upload[0].status, Some(200), "{upload:?}");
    assert_eq!(hsrv.seen(HTTP).received, 1 << 30, "the whole body arrived");
    let rss_after = bed.agent_a.rss_kib().unwrap_or(0);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the agent's RSS grew from {rss_before} KiB to {rss_after} KiB for a 1 GiB upload"
    );
    eprintln!("agent RSS {rss_before} KiB before a 1 GiB upload, {rss_after} KiB after");
}

/// One node on the shared API server, a meshed namespace with a server
/// and a client pod, the agent with the given detect timeout.
struct OneNode {
    cluster: &'static Cluster,
    ns: String,
    node: Node,
    server: std::sync::Arc<nodemesh_tests::Pod>,
    client: std::sync::Arc<nodemesh_tests::Pod>,
    agent: Agent,
}

impl OneNode {
    fn new(server: &str, detect_timeout: &str) -> Self {
        let cluster = Cluster::shared();
        let ns = unique("nmt");
        cluster.namespace(&ns, &[(nodemesh_core::names::MESH_LABEL, "enabled")]);
        let node = Node::new();
        let server = cluster.run_pod(&node, PodSpec::new(&ns, server));
        let client = cluster.run_pod(&node, PodSpec::new(&ns, "client"));
        let agent = Agent::start_ready(
            &node,
            AgentOptions::default()
                .kube(cluster)
                .arg("--detect-timeout")
                .arg(detect_timeout),
        );
        agent.wait_metric("both captured", |m| {
            m.sum("nodemesh_meshed_pods", &[]) == 2.0
        });
        Self {
            cluster,
            ns,
            node,
            server,
            client,
            agent,
        }
    }
}

/// A server that speaks first, behind a Service, with a detect timeout of
/// 10 s: the client has the banner long before.
pub fn a_server_first_protocol_never_waits_for_detection() {
    let OneNode {
        cluster,
        ns,
        node,
        server,
        client,
        agent,
    } = OneNode::new("smtp", "10s");
    let banner = "220 mail.example ESMTP ready\r\n";
    let mut srv = server.tcp();
    srv.banner(2525, banner);
    // Port 2525: no list names it (25 would be opaque with no detection).
    let vip = SocketAddr::from((cluster.service(&ns, "mail", 2525, 2525), 2525));
    cluster.endpoint_slice(&ns, "mail", 2525, &[(&server, &node, true)]);
    agent.wait_service(vip, 1);
    let mut cli = client.tcp();
    for to in [vip, SocketAddr::from((server.ip, 2525))] {
        let (text, took) = cli.greeting(to, banner.len() as u32).expect("the banner");
        assert_eq!(text, banner);
        assert!(
            took < Duration::from_secs(1),
            "the banner from {to} took {took:?} (detect timeout 10 s)"
        );
    }
    let m = agent.metrics();
    assert!(
        m.sum(
            "nodemesh_protocol_detect_total",
            &[("result", "server_first")]
        ) >= 1.0,
        "{}",
        m.text
    );
}

/// What configuration says wins over detection, live: `appProtocol: tcp`
/// and the opaque-ports annotation (Service, namespace) relay HTTP as
/// bytes; a client silent past the detect timeout is relayed as bytes too.
pub fn configuration_overrides_detection_live() {
    let OneNode {
        cluster,
        ns,
        node,
        server,
        client,
        agent,
    } = OneNode::new("web", "300ms");
    let mut srv = server.http();
    srv.serve(HTTP, http::Knobs::default());
    let service = |name: &str| {
        cluster
            .apply_manifests(
                &format!(
                    "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}{extra}}}
spec:
  ports: [{{name: tcp, protocol: TCP, port: 80, targetPort: {HTTP}, appProtocol: {app}}}]
",
                    app = if name == "as-tcp" { "tcp" } else { "http" },
                    extra = if name == "annotated" {
                        ", annotations: {config.nodemesh.io/opaque-ports: \"80\"}"
                    } else {
                        ""
                    },
                ),
                false,
            )
            .expect("the Service");
        cluster.endpoint_slice(&ns, name, HTTP, &[(&server, &node, true)]);
    };
    service("detected");
    service("as-tcp");
    service("annotated");
    let vips: BTreeMap<&str, SocketAddr> = ["detected", "as-tcp", "annotated"]
        .into_iter()
        .map(|name| {
            let svc: k8s_openapi::api::core::v1::Service = cluster
                .block_on(
                    kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(
                        cluster.client.clone(),
                        &ns,
                    )
                    .get(name),
                )
                .expect("get Service");
            let ip: std::net::IpAddr = svc
                .spec
                .and_then(|s| s.cluster_ip)
                .and_then(|ip| ip.parse().ok())
                .expect("cluster IP");
            (name, SocketAddr::new(ip, 80))
        })
        .collect();
    for vip in vips.values() {
        agent.wait_service(*vip, 1);
    }
    let mut cli = client.http();
    let counted = |m: &Metrics, name: &str| {
        m.sum(
            "nodemesh_request_total",
            &[("dst_service", &format!("{ns}/{name}:80"))],
        )
    };
    for name in ["detected", "as-tcp", "annotated"] {
        let out = cli.run(http::Run::get(vips[name], "/", 5));
        assert!(out.iter().all(|o| o.status == Some(200)), "{name}: {out:?}");
    }
    let m = agent.wait_metric("the detected Service's requests", |m| {
        counted(m, "detected") == 5.0
    });
    assert_eq!(
        counted(&m, "as-tcp"),
        0.0,
        "appProtocol: tcp is relayed as bytes"
    );
    assert_eq!(counted(&m, "annotated"), 0.0, "the opaque-ports annotation");
    assert!(
        m.sum(
            "nodemesh_protocol_detect_total",
            &[("result", "configured")]
        ) >= 2.0
    );

    // The namespace's annotation, live: the detected Service goes opaque.
    cluster
        .apply_manifests(
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, annotations: {{config.nodemesh.io/opaque-ports: \"80\"}}}}\n"
            ),
            false,
        )
        .expect("annotate the namespace");
    eventually(
        "the namespace's annotation applies",
        Duration::from_secs(15),
        || {
            let before = counted(&agent.metrics(), "detected");
            let out = cli.run(http::Run::get(vips["detected"], "/", 1));
            let after = counted(&agent.metrics(), "detected");
            if out[0].status == Some(200) && after == before {
                Ok(())
            } else {
                Err(format!("{out:?}: {before} → {after}"))
            }
        },
    );

    // A client silent past the detect timeout: relayed as bytes, intact.
    let mut echo_srv = server.tcp();
    echo_srv.listen(7070);
    let mut tcp = client.tcp();
    let before = agent
        .metrics()
        .sum("nodemesh_protocol_detect_total", &[("result", "timeout")]);
    let x = tcp
        .text_after(
            SocketAddr::from((server.ip, 7070)),
            "GET / HTTP/1.1\r\n\r\n",
            1,
            Duration::from_millis(800),
        )
        .expect("a late talker");
    assert!(x.intact && x.redirected(), "{x:?}");
    agent.wait_metric("the timeout counted", |m| {
        m.sum("nodemesh_protocol_detect_total", &[("result", "timeout")]) == before + 1.0
    });
}

/// A real server-first client and server: MariaDB (its server greets
/// first) on a port no list names, with a detect timeout of 10 s, behind a
/// Service and by pod address: the `mariadb` client's query is answered
/// well before the timeout.
pub fn mariadb_is_never_held_by_detection() {
    use std::process::{Command, Stdio};
    const PORT: u16 = 3307;
    let OneNode {
        cluster,
        ns,
        node,
        server,
        client,
        agent,
    } = OneNode::new("mariadb", "10s");
    let data = node.dir.join("mariadb");
    let init = Command::new("mariadb-install-db")
        .args(["--no-defaults", "--user=root", "--skip-test-db"])
        .arg(format!("--datadir={}", data.display()))
        .output()
        .expect("mariadb-install-db (cargo xtask setup installs mariadb-server)");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut cmd = Command::new("mariadbd");
    cmd.args([
        "--no-defaults",
        "--user=root",
        "--skip-grant-tables",
        "--skip-name-resolve",
        "--bind-address=0.0.0.0",
    ])
    .arg(format!("--port={PORT}"))
    .arg(format!("--datadir={}", data.display()))
    .arg(format!("--socket={}", data.join("mariadb.sock").display()))
    .arg(format!("--pid-file={}", data.join("mariadb.pid").display()))
    .arg(format!("--log-error={}", data.join("error.log").display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _mariadbd = Kill(server.spawn(cmd));
    let vip = SocketAddr::from((cluster.service(&ns, "db", PORT, PORT), PORT));
    cluster.endpoint_slice(&ns, "db", PORT, &[(&server, &node, true)]);
    agent.wait_service(vip, 1);
    let query = |to: SocketAddr| {
        let mut cmd = Command::new("mariadb");
        cmd.args(["--no-defaults", "--protocol=TCP", "-u", "root", "-N", "-B"])
            .arg(format!("--host={}", to.ip()))
            .arg(format!("--port={}", to.port()))
            .args(["-e", "SELECT 6*7"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = std::time::Instant::now();
        let out = client.spawn(cmd).wait_with_output().expect("mariadb");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            started.elapsed(),
        )
    };
    // Up when it answers directly (it initialises its files first).
    eventually(
        "mariadbd answers",
        Duration::from_secs(60),
        || match query(SocketAddr::from((server.ip, PORT))) {
            (true, answer, _, _) if answer == "42" => Ok(()),
            (_, out, err, _) => Err(format!("{out} {err}")),
        },
    );
    for to in [vip, SocketAddr::from((server.ip, PORT))] {
        let (ok, answer, err, took) = query(to);
        assert!(ok && answer == "42", "{to}: {answer} {err}");
        assert!(
            took < Duration::from_secs(2),
            "the query to {to} took {took:?} (detect timeout 10 s)"
        );
    }
    let m = agent.metrics();
    assert!(
        m.sum(
            "nodemesh_protocol_detect_total",
            &[("result", "server_first")]
        ) >= 2.0,
        "{}",
        m.text
    );
}

/// `sh -c script` in `pod` (its netns and cgroup: captured as the pod's
/// own processes are): what it printed.
fn sh(pod: &nodemesh_tests::Pod, script: &str) -> String {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = pod.spawn(cmd).wait_with_output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Which server answered each of `n` sequential curls (a new connection
/// and a new process each) to `to`.
fn curls(client: &nodemesh_tests::Pod, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let out = sh(
        client,
        &format!(
            "for i in $(seq {n}); do curl -s -m 10 -o /dev/null -D - http://{to}/ | tr -d '\\r' | grep -i '^{}:' || echo none; done",
            http::SERVER_HEADER
        ),
    );
    let mut counts = BTreeMap::new();
    for line in out.lines() {
        let server = line.rsplit(' ').next().unwrap_or(line).to_owned();
        *counts.entry(server).or_default() += 1;
    }
    assert_eq!(counts.values().sum::<usize>(), n, "{out}");
    counts
}

/// Real clients through a Service across two nodes, as users judge the
/// mesh: `nc -N` and socat half-close once their request is written (and
/// a pipeline of three ends so) — every answer still comes, on the
/// outbound path, the inbound path and across nodes; sequential curls
/// and gRPC calls on one channel go to the healthy endpoint on the
/// client's own node, and not to it once it is slow or refuses.
pub fn real_clients_half_close_and_prefer_the_healthy_endpoint_on_their_node() {
    let bed = MeshBed::new("24h");
    let near = bed.pod(&bed.a, "web-near", "web");
    let far = bed.pod(&bed.b, "web-far", "web");
    let client = bed.pod(&bed.a, "client", "client");
    bed.agent_b.wait_metric("web's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    // 8080: both fast; 8081: the near one 60 ms slow; 8082: only the far
    // one listens.
    let knobs = |name: &str, delay_ms: u64| http::Knobs {
        name: Some(name.into()),
        delay_ms,
        ..http::Knobs::default()
    };
    let mut near_http = near.http();
    near_http.serve(HTTP, knobs("near", 0));
    near_http.serve(HTTP + 1, knobs("near", 60));
    let mut far_http = far.http();
    for port in [HTTP, HTTP + 1, HTTP + 2] {
        far_http.serve(port, knobs("far", 0));
    }
    let mut near_grpc = near.grpc();
    near_grpc.serve(GRPC, grpc::Knobs::default());
    let mut far_grpc = far.grpc();
    far_grpc.serve(GRPC, grpc::Knobs::default());
    let both: [(&nodemesh_tests::Pod, &Node, bool); 2] =
        [(&near, &bed.a, true), (&far, &bed.b, true)];
    let service = |name: &str, port: u16, target: u16| {
        let vip = SocketAddr::from((bed.cluster.service(&bed.ns, name, port, target), port));
        bed.cluster.endpoint_slice(&bed.ns, name, target, &both);
        bed.agent_a.wait_service(vip, 2);
        vip
    };
    let web = service("web", 80, HTTP);
    let slow = service("web-slow", 80, HTTP + 1);
    let down = service("web-down", 80, HTTP + 2);
    let rpc = service("rpc", 9090, GRPC);

    // Half-closing clients: to the Service, to the pod on this node (its
    // inbound side), to the pod on the other (across the tunnel).
    for (what, ip, port) in [
        ("the Service", web.ip().to_string(), web.port()),
        ("the pod on this node", near.ip.to_string(), HTTP),
        ("the pod on the other node", far.ip.to_string(), HTTP),
    ] {
        let out = sh(
            &client,
            &format!(
                "printf 'GET / HTTP/1.0\\r\\nHost: web\\r\\n\\r\\n' | nc -N -w 10 {ip} {port}"
            ),
        );
        assert!(out.starts_with("HTTP/1.0 200"), "nc -N to {what}: {out:?}");
        let out = sh(
            &client,
            &format!(
                "printf 'GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n' | socat -t 10 -T 20 - TCP:{ip}:{port}"
            ),
        );
        assert!(out.starts_with("HTTP/1.1 200"), "socat to {what}: {out:?}");
        let out = sh(
            &client,
            &format!(
                "for i in 1 2 3; do printf 'GET /p$i HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n'; done | nc -N -w 10 {ip} {port}"
            ),
        );
        assert_eq!(
            out.matches("HTTP/1.1 200").count(),
            3,
            "three pipelined, then a half-close, to {what}: {out:?}"
        );
    }

    // Sequential requests: the healthy endpoint on this node has them.
    let counts = curls(&client, web, 30);
    assert!(
        counts.get("near").copied().unwrap_or(0) >= 27,
        "30 sequential curls: {counts:?}"
    );
    let before = (near_grpc.seen(GRPC).calls, far_grpc.seen(GRPC).calls);
    let calls = client.grpc().run(grpc::Run::unary(rpc, 300));
    assert!(calls.iter().all(|o| o.code == 0), "{calls:?}");
    let near_calls = near_grpc.seen(GRPC).calls - before.0;
    let far_calls = far_grpc.seen(GRPC).calls - before.1;
    assert_eq!(near_calls + far_calls, 300);
    assert!(
        near_calls >= 285,
        "300 sequential gRPC calls on one channel: {near_calls} near, {far_calls} far"
    );

    // Slow there (60 ms against the other node's ~1): the other one has
    // them, the slow one is looked at again now and then.
    let counts = curls(&client, slow, 30);
    assert!(
        counts.get("far").copied().unwrap_or(0) >= 20,
        "30 sequential curls, the near endpoint slow: {counts:?}"
    );
    // Refusing there: every request answered, by the other.
    let counts = curls(&client, down, 20);
    assert_eq!(counts.get("far"), Some(&20), "{counts:?}");
    drop(bed.identity);
}
