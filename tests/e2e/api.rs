//! stat and tap through the API server: the aggregated API
//! `tap.nodemesh.io`, served by the identity service, which reaches the
//! agents' tap ports over mutual TLS as its own identity. Kubernetes RBAC
//! decides who may: a user bound to neither ClusterRole gets nothing,
//! `nodemesh-viewer` lets `stat` through, `nodemesh-tapper` `tap`; the
//! numbers are both nodes' merged. A pod knocking on an agent's tap port
//! gets nothing, whatever certificate it shows.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use nodemesh_core::{identity::Identity, names::TAP_PORT};
use nodemesh_tests::{
    PodSpec, agent,
    apps::http,
    kube::{ALICE_TOKEN, unique},
    mesh::{AggregatedApi, MeshBed},
    sys::{Killed, eventually, in_netns},
};
use serde_json::Value;

const HTTP: u16 = 8080;

/// `nodemesh <args> --kubeconfig <kubeconfig>`, from the host (it talks to
/// the API server only).
fn nodemesh(kubeconfig: &Path, args: &[&str]) -> Output {
    spawn(kubeconfig, args)
        .take()
        .wait_with_output()
        .expect("run nodemesh")
}

/// `nodemesh <args> --kubeconfig <kubeconfig>` started from the host, its
/// output piped; killed when dropped.
fn spawn(kubeconfig: &Path, args: &[&str]) -> Killed {
    Killed::new(
        Command::new(std::env::current_exe().expect("current_exe"))
            .arg(agent::ROLE)
            .args(args)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nodemesh"),
    )
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Binds `alice` to a ClusterRole; returns the binding's manifest (to
/// delete).
fn bind(bed: &MeshBed, role: &str) -> String {
    let manifest = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {role}\nsubjects:\n  - kind: User\n    name: alice\n    apiGroup: rbac.authorization.k8s.io\n",
        unique(&format!("alice-{role}"))
    );
    bed.cluster
        .apply_manifests(&manifest, false)
        .unwrap_or_else(|e| panic!("bind alice to {role}: {e}"));
    manifest
}

/// Binds `alice` to a ClusterRole in `namespace` only (a RoleBinding);
/// returns the binding's manifest (to delete).
fn bind_in(bed: &MeshBed, role: &str, namespace: &str) -> String {
    let manifest = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {}\n  namespace: {namespace}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {role}\nsubjects:\n  - kind: User\n    name: alice\n    apiGroup: rbac.authorization.k8s.io\n",
        unique(&format!("alice-{role}"))
    );
    bed.cluster
        .apply_manifests(&manifest, false)
        .unwrap_or_else(|e| panic!("bind alice to {role} in {namespace}: {e}"));
    manifest
}

/// Deletes the bindings it holds when the test ends (or fails).
struct Bindings(&'static nodemesh_tests::Cluster, Vec<String>);

impl Drop for Bindings {
    fn drop(&mut self) {
        for m in &self.1 {
            self.0.delete_manifests(m);
        }
    }
}

/// `GET path` on the dashboard at 127.0.0.1:`port`: the body of a 200.
fn get(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if head.starts_with("HTTP/1.1 200") {
        Ok(body.to_owned())
    } else {
        Err(answer)
    }
}

/// `GET path` through the API server as `client`: the status, and (for a
/// 200) the first `want` NDJSON events, read while `traffic` runs (up to
/// 15 s).
fn raw(
    bed: &MeshBed,
    client: &kube::Client,
    path: &str,
    want: usize,
    mut traffic: impl FnMut(),
) -> (u16, Vec<Value>) {
    use http_body_util::BodyExt;
    let req = ::http::Request::get(path)
        .body(kube::client::Body::empty())
        .expect("request");
    let resp = bed
        .cluster
        .block_on(client.send(req))
        .expect("the API server answers");
    let code = resp.status().as_u16();
    if code != 200 || want == 0 {
        return (code, Vec::new());
    }
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let reader = nodemesh_tests::kube::runtime().spawn(async move {
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                if let Ok(v) = serde_json::from_slice::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut events = Vec::new();
    while events.len() < want && Instant::now() < deadline {
        traffic();
        while let Ok(v) = rx.recv_timeout(Duration::from_millis(200)) {
            if v["kind"] != "error" {
                events.push(v);
            }
        }
    }
    reader.abort();
    assert!(events.len() >= want, "{events:#?}");
    (code, events)
}

pub fn stat_and_tap_go_through_the_api_server_as_rbac_allows() {
    let mut bed = MeshBed::new("24h");
    let web = bed.deployment(&bed.a, "web", "web-7d4b8c-a1");
    let api_a = bed.deployment(&bed.a, "api", "api-7d4b8c-a1");
    let api_b = bed.deployment(&bed.b, "api", "api-7d4b8c-b1");
    bed.agent_a
        .wait_metric("web's and api's certificates", |m| {
            m.sum("nodemesh_identity_certificates", &[]) == 2.0
        });
    bed.agent_b.wait_metric("api's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let mut srv_a = api_a.http();
    srv_a.serve(HTTP, http::Knobs::default());
    let mut srv_b = api_b.http();
    srv_b.serve(HTTP, http::Knobs::default());
    let _api = AggregatedApi::apply(&bed.install, &bed.identity, &bed.a);
    let alice = bed.a.dir.join("alice.kubeconfig");
    bed.cluster.kubeconfig_with_token(&alice, ALICE_TOKEN);

    // web → each api pod: 40 requests, 4 of them answered 500.
    let mut cli = web.http();
    for pod in [&api_a, &api_b] {
        let to = SocketAddr::from((pod.ip, HTTP));
        let ok = cli.run(http::Run::get(to, "/", 36));
        let failed = cli.run(http::Run::get(to, "/?status=500", 4));
        assert!(ok.iter().all(|o| o.status == Some(200)), "{ok:?}");
        assert!(failed.iter().all(|o| o.status == Some(500)), "{failed:?}");
    }

    // alice, bound to nothing: refused, and told what to bind.
    let stat_args = ["stat", "deploy", "api", "-n", &bed.ns, "-o", "json"];
    let out = nodemesh(&alice, &stat_args);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("forbidden") && err.contains("nodemesh-viewer"),
        "{}",
        text(&out)
    );
    let tap_args = [
        "tap",
        "deploy/api",
        "-n",
        &bed.ns,
        "-o",
        "json",
        "--count",
        "3",
    ];
    let out = nodemesh(&alice, &tap_args);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{}",
        text(&out)
    );

    // The audit: a RoleBinding in one namespace shows that namespace only,
    // as kubectl users expect — not every namespace, not another one.
    let mut bindings = Bindings(bed.cluster, vec![bind_in(&bed, "nodemesh-viewer", &bed.ns)]);
    eventually(
        "stat in the bound namespace",
        Duration::from_secs(30),
        || {
            let out = nodemesh(&alice, &stat_args);
            let lines: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if out.status.success() && lines.first().is_some_and(|l| l["requests"] == 80) {
                Ok(())
            } else {
                Err(text(&out))
            }
        },
    );
    for args in [
        &["stat", "deploy", "-A", "-o", "json"][..],
        &["stat", "deploy", "-n", "kube-system", "-o", "json"][..],
        &["edges", "deploy", "-o", "json"][..],
    ] {
        let out = nodemesh(&alice, args);
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("forbidden"),
            "{args:?} with a RoleBinding in {}: {}",
            bed.ns,
            text(&out)
        );
    }
    for m in std::mem::take(&mut bindings.1) {
        bed.cluster.delete_manifests(&m);
    }

    // nodemesh-viewer: stat, both nodes' numbers merged (40 + 40 requests,
    // 72 answered 200); tap still refused.
    bindings.1.push(bind(&bed, "nodemesh-viewer"));
    let lines: Vec<Value> = eventually(
        "stat through the API server",
        Duration::from_secs(30),
        || {
            let out = nodemesh(&alice, &stat_args);
            if !out.status.success() {
                return Err(text(&out));
            }
            let lines: Vec<Value> =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
            // Pods are counted from the agents' last one-second sample.
            if lines.first().is_some_and(|l| l["meshed_pods"] == 2) {
                Ok(lines)
            } else {
                Err(text(&out))
            }
        },
    );
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["requests"], 80, "{:#}", lines[0]);
    assert_eq!(lines[0]["successes"], 72);
    assert_eq!(lines[0]["meshed_pods"], 2, "one pod on each node");
    let out = nodemesh(&alice, &tap_args);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nodemesh-tapper"),
        "{}",
        text(&out)
    );

    // Nor `top`: its paths can carry secrets, so it is a tapper's.
    let top_args = [
        "top",
        "deploy/api",
        "-n",
        &bed.ns,
        "--path",
        "/top/",
        "--duration",
        "5s",
        "--every",
        "1h",
    ];
    let out = nodemesh(&alice, &top_args);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "top for a viewer: {}",
        text(&out)
    );

    // nodemesh-tapper: `top` (the busiest paths, the same stream as tap's
    // without identities).
    bindings.1.push(bind(&bed, "nodemesh-tapper"));
    let to_a = SocketAddr::from((api_a.ip, HTTP));
    let top = spawn(&alice, &top_args);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let got = cli.run(http::Run::get(to_a, "/top/busy", 1));
        assert!(got.iter().all(|o| o.status == Some(200)), "{got:?}");
        thread::sleep(Duration::from_millis(100));
    }
    let out = top.take().wait_with_output().expect("top output");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/top/busy"),
        "{}",
        text(&out)
    );

    // The raw `top` stream: paths and numbers, no identities or
    // authorities; a tap is a watch (a plain GET is refused).
    let alice_client = bed
        .cluster
        .block_on(nodemesh_tests::kube::client_from(&alice));
    let (code, _) = raw(
        &bed,
        &alice_client,
        "/apis/tap.nodemesh.io/v1alpha1/top",
        0,
        || {},
    );
    // Without watch=true the API server authorizes `list`, which no role
    // grants on top or tap (a stream must be a watch, or the API server
    // cuts it at its request timeout).
    assert_eq!(code, 403, "a tap without watch=true");
    let mut traffic = || {
        let got = cli.run(http::Run::get(to_a, "/top/raw", 1));
        assert!(got.iter().all(|o| o.status == Some(200)), "{got:?}");
    };
    let (code, events) = raw(
        &bed,
        &alice_client,
        "/apis/tap.nodemesh.io/v1alpha1/top?watch=true&path=%2Ftop%2Fraw",
        3,
        &mut traffic,
    );
    assert_eq!(code, 200);
    for e in &events {
        assert_eq!(e["path"], "/top/raw", "{e:#}");
        assert_eq!(e["src"]["identity"], "", "{e:#}");
        assert_eq!(e["dst"]["identity"], "", "{e:#}");
        assert_eq!(e["authority"], "", "{e:#}");
        assert_eq!(e["src"]["workload"], "deployment/web", "{e:#}");
    }

    // The dashboard, as alice: the browser's API (this process) reads the
    // agents through the API server, both nodes merged.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut dashboard = spawn(&alice, &["dashboard", "--port", &port.to_string()]);
    let report: Value = eventually("the dashboard's /api/stat", Duration::from_secs(20), || {
        if let Ok(Some(status)) = dashboard.get().try_wait() {
            panic!("the dashboard exited: {status}");
        }
        let body = get(port, "/api/stat?window=1m")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["errors"].as_array().is_some_and(|e| e.is_empty()) {
            Ok(v)
        } else {
            Err(body)
        }
    });
    let inbound_api: u64 = report["report"]["requests"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["key"]["direction"] == "inbound" && r["key"]["workload"]["name"] == "api")
        .filter_map(|r| r["golden"]["requests"].as_u64())
        .sum();
    assert!(inbound_api >= 80, "{report:#}");
    drop(dashboard);

    // `nodemesh check` (as the admin): the aggregated API available, and
    // each agent's own report through it.
    let out = nodemesh(
        &bed.cluster.kubeconfig,
        &["check", "--namespace", &bed.install.namespace, "-o", "json"],
    );
    let outcomes: Vec<Value> = serde_json::from_slice(&out.stdout).expect("check JSON");
    let outcome = |check: &str| -> &Value {
        outcomes
            .iter()
            .find(|o| o["check"] == check)
            .unwrap_or_else(|| panic!("no {check:?} in {outcomes:#?}"))
    };
    assert_eq!(outcome("aggregated API")["ok"], true, "{outcomes:#?}");
    for (node, certs) in [(&bed.a, 2), (&bed.b, 1)] {
        let o = outcome(&format!("agent on {}", node.name));
        assert_eq!(o["ok"], true, "{o:#}");
        let detail = o["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("eBPF attached") && detail.contains(&format!("{certs} certificates")),
            "{o:#}"
        );
    }

    // nodemesh-tapper: a tap started before a request sees it — from both
    // nodes' agents, merged: the client's view (outbound, node a) and the
    // server's (inbound, node b), each with both identities, and each
    // event naming the node whose agent saw it.
    let to_b = SocketAddr::from((api_b.ip, HTTP));
    let web_id = format!("spiffe://cluster.local/ns/{}/sa/web", bed.ns);
    let api_id = format!("spiffe://cluster.local/ns/{}/sa/api", bed.ns);
    // One request's three events as one agent saw it, if all are there.
    let triple = |events: &[Value], node: &str, direction: &str| -> Option<Vec<Value>> {
        let mine: Vec<&Value> = events
            .iter()
            .filter(|e| e["node"] == node && e["direction"] == direction)
            .collect();
        let first = mine.iter().find(|e| e["kind"] == "req")?;
        let same: Vec<Value> = mine
            .iter()
            .filter(|e| e["id"] == first["id"])
            .map(|e| (*e).clone())
            .collect();
        (same.len() == 3).then_some(same)
    };
    // What a tap of `resource` through the API server shows while
    // requests go.
    let mut tap_via_api = |resource: &str| -> (Vec<Value>, std::process::Output) {
        let mut tap = spawn(
            &alice,
            &[
                "tap", resource, "-n", &bed.ns, "--path", "/via-api", "-o", "json", "--count", "12",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(6);
        while tap.get().try_wait().expect("tap").is_none() && Instant::now() < deadline {
            let got = cli.run(http::Run::get(to_b, "/via-api/1", 1));
            assert!(got.iter().all(|o| o.status == Some(200)), "{got:?}");
            thread::sleep(Duration::from_millis(300));
        }
        let mut tap = tap.take();
        let _ = tap.kill();
        let out = tap.wait_with_output().expect("tap output");
        let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (events, out)
    };
    // The namespace: every side in it, each seen by its own agent.
    let ns = format!("ns/{}", bed.ns);
    let (inbound, outbound) = eventually(
        "a namespace tapped through the API server",
        Duration::from_secs(30),
        || {
            let (events, out) = tap_via_api(&ns);
            match (
                triple(&events, &bed.b.name, "inbound"),
                triple(&events, &bed.a.name, "outbound"),
            ) {
                (Some(i), Some(o)) => Ok((i, o)),
                _ => Err(text(&out)),
            }
        },
    );
    // A workload: its own side only — each request once, not once per
    // agent that carried it (as Linkerd shows it).
    eventually(
        "a workload tapped through the API server",
        Duration::from_secs(30),
        || {
            let (events, out) = tap_via_api("deploy/api");
            let outbound = events
                .iter()
                .filter(|e| e["direction"] == "outbound")
                .count();
            match triple(&events, &bed.b.name, "inbound") {
                Some(_) if outbound == 0 => Ok(()),
                _ => Err(text(&out)),
            }
        },
    );
    for events in [&inbound, &outbound] {
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
        assert_eq!(kinds, ["req", "rsp", "end"], "{events:#?}");
        for e in events.iter() {
            assert_eq!(e["src"]["identity"], web_id.as_str(), "{e:#}");
            assert_eq!(e["dst"]["identity"], api_id.as_str(), "{e:#}");
            assert_eq!(e["tls"], true, "{e:#}");
            assert_eq!(e["path"], "/via-api/1");
        }
        assert_eq!(events[1]["status"], 200);
    }
    // An agent restarted during a tap is followed again: node b's agent
    // stops, a new one starts, and the same tap shows node b's requests.
    let mut tap = spawn(
        &alice,
        &[
            "tap",
            "deploy/api",
            "-n",
            &bed.ns,
            "--path",
            "/after",
            "-o",
            "json",
        ],
    );
    let stdout = tap.get().stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    bed.agent_b.stop(Duration::from_secs(5));
    bed.agent_b = nodemesh_tests::mesh::next_mesh_agent(&bed.install, &bed.identity, &bed.b);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        // (The new agent may take a moment to hold api's certificate
        // again: a 502 meanwhile is the mesh failing closed.)
        let _ = cli.run(http::Run::get(to_b, "/after/restart", 1));
        while let Ok(e) = rx.recv_timeout(Duration::from_millis(300)) {
            seen |= e["node"] == bed.b.name.as_str()
                && e["direction"] == "inbound"
                && e["path"] == "/after/restart";
        }
    }
    drop(tap);
    assert!(seen, "no event from the restarted agent within 40s");
    drop(bindings);

    // A pod knocking on an agent's tap port: nothing without a
    // certificate, nothing with a workload's; the identity service's
    // identity (the control) is answered.
    let plain_ns = unique("plain");
    bed.cluster.namespace(&plain_ns, &[]);
    let knocker = bed
        .cluster
        .run_pod(&bed.b, PodSpec::new(&plain_ns, "knocker"));
    let dir = bed.b.dir.join("knock");
    std::fs::create_dir_all(&dir).expect("dir");
    let cert_for = |ns: &str, sa: &str| -> (PathBuf, PathBuf) {
        // "tap": the identity service's tap client (outside the workload
        // space); anything else a workload's.
        let (issued, chain) = if sa == "tap" {
            bed.install.pki.tap_client()
        } else {
            let id = Identity::new(ns, sa).expect("identity");
            bed.install.pki.leaf(&id, Duration::from_secs(600))
        };
        let cert = dir.join(format!("{sa}.crt"));
        let key_file = dir.join(format!("{sa}.key"));
        std::fs::write(&cert, format!("{}{chain}", issued.cert_pem)).expect("cert");
        std::fs::write(&key_file, issued.key_pem).expect("key");
        (cert, key_file)
    };
    let agent_name = format!(
        "nodemesh-agent.{}.serviceaccount.identity.cluster.local",
        bed.install.namespace
    );
    let curl = |client: Option<(PathBuf, PathBuf)>| -> Output {
        let mut argv: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "5".into(),
            "--cacert".into(),
            bed.install.pki.anchors_file.display().to_string(),
            "--resolve".into(),
            format!("{agent_name}:{TAP_PORT}:{}", bed.b.ip),
        ];
        if let Some((cert, key)) = client {
            argv.extend([
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
        }
        argv.push(format!("https://{agent_name}:{TAP_PORT}/v1/stat?window=1m"));
        let netns = knocker.netns.clone();
        in_netns(&netns, move || {
            Command::new("curl")
                .args(&argv)
                .output()
                .expect("run curl (cargo xtask setup installs it)")
        })
    };
    let none = curl(None);
    assert!(
        !none.status.success() && none.stdout.is_empty(),
        "{}",
        text(&none)
    );
    let workload = curl(Some(cert_for(&bed.ns, "web")));
    assert!(
        !workload.status.success() && workload.stdout.is_empty(),
        "{}",
        text(&workload)
    );
    // The identity service's own workload identity is not the tap client
    // (the audit: a node that got it read every other node).
    let service = curl(Some(cert_for(&bed.install.namespace, "nodemesh-identity")));
    assert!(
        !service.status.success() && service.stdout.is_empty(),
        "{}",
        text(&service)
    );
    let identity = curl(Some(cert_for(&bed.install.namespace, "tap")));
    assert!(identity.status.success(), "{}", text(&identity));
    let report: Value = serde_json::from_slice(&identity.stdout).expect("a stat report");
    assert_eq!(report["node"], bed.b.name.as_str());
    // The admin port tells a pod nothing either: not the node's stats, nor
    // the cluster's map of Services, endpoints, nodes and identities, nor
    // its live requests.
    let admin = SocketAddr::from((bed.b.ip, nodemesh_core::names::ADMIN_PORT));
    for path in ["/v1/stat", "/v1/services", "/v1/node", "/v1/tap"] {
        let netns = knocker.netns.clone();
        let answer = in_netns(&netns, move || {
            Command::new("curl")
                .args(["-sS", "--max-time", "5"])
                .arg(format!("http://{admin}{path}"))
                .output()
                .expect("curl")
        });
        let body = String::from_utf8_lossy(&answer.stdout);
        assert!(
            body.contains("answers the node itself only"),
            "{path}: {}",
            text(&answer)
        );
    }
}
