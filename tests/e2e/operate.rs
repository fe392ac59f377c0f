//! Operating the mesh without Prometheus: `nodemesh stat` reads the golden
//! metrics the agents keep over sliding windows — exact request counts,
//! success rates and latency buckets for known traffic, TCP-only
//! workloads by their connections — and the agents give them to their
//! node only.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    thread,
    time::Duration,
};

use nodemesh_tests::{
    Node, Pod, agent,
    apps::http,
    mesh::MeshBed,
    sys::{Killed, in_netns},
};
use serde_json::Value;

const HTTP: u16 = 8080;
const REDIS: u16 = 6379;

fn at(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::from((pod.ip, port))
}

/// `nodemesh stat …` run on `node` (in its netns), asking its agent (on
/// the node's address here; `0.0.0.0:4191`, so also 127.0.0.1, installed).
fn stat(node: &Node, args: &[&str]) -> (bool, String, String) {
    let exe: PathBuf = std::env::current_exe().expect("current_exe");
    let mut argv: Vec<String> = vec![agent::ROLE.into(), "stat".into()];
    argv.extend(args.iter().map(|s| s.to_string()));
    argv.extend(["--agent".into(), node.admin_addr().to_string()]);
    in_netns(&node.netns, move || {
        let out = Command::new(exe)
            .args(&argv)
            .output()
            .expect("run nodemesh stat");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}

fn stat_json(node: &Node, args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out, err) = stat(node, &all);
    assert!(ok, "nodemesh stat failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn line<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no line for {name}: {lines:#?}"))
}

/// A plain HTTP GET of the agent's `/v1/stat` from wherever this runs:
/// the status line.
fn get_stat(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET /v1/stat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer.lines().next().unwrap_or_default();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    format!("{status} {}", body.trim())
}

/// Known traffic → exact numbers: `web` sends 100 requests to each of two
/// `api` pods (one per node; 10 of each answered 500; the other node's
/// pod 30 ms slower), and opens 3 connections to a TCP-only `cache`.
pub fn stat_shows_what_the_agents_saw() {
    let bed = MeshBed::new("24h");
    let web = bed.deployment(&bed.a, "web", "web-5f7c9d-a1");
    let api_a = bed.deployment(&bed.a, "api", "api-5f7c9d-a1");
    let api_b = bed.deployment(&bed.b, "api", "api-5f7c9d-b1");
    let cache = bed.deployment(&bed.b, "cache", "cache-5f7c9d-b1");
    bed.agent_a
        .wait_metric("web's and api's certificates", |m| {
            m.sum("nodemesh_identity_certificates", &[]) == 2.0
        });
    bed.agent_b
        .wait_metric("api's and cache's certificates", |m| {
            m.sum("nodemesh_identity_certificates", &[]) == 2.0
        });
    let mut srv_a = api_a.http();
    srv_a.serve(HTTP, http::Knobs::default());
    let mut srv_b = api_b.http();
    srv_b.serve(
        HTTP,
        http::Knobs {
            delay_ms: 30,
            ..http::Knobs::default()
        },
    );
    let mut redis = cache.tcp();
    redis.listen(REDIS);
    let mut cli = web.http();
    for api in [&api_a, &api_b] {
        let ok = cli.run(http::Run::get(at(api, HTTP), "/", 90));
        let failed = cli.run(http::Run::get(at(api, HTTP), "/?status=500", 10));
        assert!(ok.iter().all(|o| o.status == Some(200)), "{ok:?}");
        assert!(failed.iter().all(|o| o.status == Some(500)), "{failed:?}");
    }
    let mut tcp = web.tcp();
    for _ in 0..3 {
        tcp.exchange_ok(at(&cache, REDIS), 100);
    }
    // The TCP counters are sampled once a second.
    thread::sleep(Duration::from_millis(2500));

    // Node b: api's pod there served 100 (90 OK) over mTLS, all slower
    // than 30 ms (the (25, 50] ms bucket); cache: connections, no requests.
    let b = stat_json(&bed.b, &["deploy", "-n", &bed.ns, "-t", "1m"]);
    let api = line(&b, "api");
    assert_eq!(api["requests"], 100, "{api:#}");
    assert_eq!(api["successes"], 90);
    assert_eq!(api["success_rate"], 0.9);
    assert_eq!(api["latency_ms_p50"], 50.0, "{api:#}");
    assert_eq!(api["latency_ms_p99"], 50.0);
    assert_eq!(api["tls_share"], 1.0, "through the tunnel");
    assert_eq!(api["meshed_pods"], 1);
    let cache_line = line(&b, "cache");
    assert_eq!(cache_line["requests"], 0);
    assert!(cache_line["success_rate"].is_null(), "{cache_line:#}");
    assert_eq!(cache_line["tcp_opened"], 3, "{cache_line:#}");
    // Node a: api's pod there, same node (no TLS inside the node), fast.
    let a = stat_json(&bed.a, &["deploy", "api", "-n", &bed.ns, "-t", "10s"]);
    assert_eq!(a.len(), 1, "{a:#?}");
    let api = line(&a, "api");
    assert_eq!(
        (api["requests"].as_u64(), api["successes"].as_u64()),
        (Some(100), Some(90))
    );
    assert_eq!(api["tls_share"], 0.0);
    assert!(
        api["latency_ms_p99"].as_f64().is_some_and(|ms| ms < 25.0),
        "{api:#}"
    );
    // `--to`: what web sent to api, as web saw it (both pods: 200 requests,
    // 180 OK, the slow half in the 50 ms bucket).
    let to = stat_json(&bed.a, &["deploy", "-n", &bed.ns, "--to", "deploy/api"]);
    let web_line = line(&to, "web");
    assert_eq!(web_line["requests"], 200, "{web_line:#}");
    assert_eq!(web_line["successes"], 180);
    assert_eq!(web_line["latency_ms_p99"], 50.0);
    // `--from`: the same requests, shown for api.
    let from = stat_json(&bed.a, &["deploy", "-n", &bed.ns, "--from", "deploy/web"]);
    assert_eq!(line(&from, "api")["requests"], 200);
    // The table.
    let (ok, table, err) = stat(&bed.b, &["deploy", "-n", &bed.ns, "-o", "wide"]);
    assert!(ok, "{err}");
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(
        table.contains("90.00%") && table.contains("cache"),
        "{table}"
    );
    let (ok, _, err) = stat(&bed.b, &["deploy", "-t", "5m"]);
    assert!(!ok && err.contains("one of 10s, 1m, 10m"), "{err}");

    // Edges: on node a web → api through the agent once (identity known,
    // no wire); on node b over mTLS (named by identity: web's own rows are
    // on node a).
    let edges = |node: &Node| -> Vec<Value> {
        let exe: PathBuf = std::env::current_exe().expect("current_exe");
        let argv: Vec<String> = [
            agent::ROLE,
            "edges",
            "deploy",
            "-n",
            &bed.ns,
            "-o",
            "json",
            "--agent",
            &node.admin_addr().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = in_netns(&node.netns, move || {
            Command::new(exe).args(&argv).output().expect("edges")
        });
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("edges JSON")
    };
    let web_id = format!("spiffe://cluster.local/ns/{}/sa/web", bed.ns);
    let api_id = format!("spiffe://cluster.local/ns/{}/sa/api", bed.ns);
    let on_a = edges(&bed.a);
    let e = on_a
        .iter()
        .find(|e| e["dst"] == "api")
        .expect("web → api on node a");
    assert_eq!(
        (e["src"].as_str(), e["secured"].as_str()),
        (Some("web"), Some("√ (node)")),
        "{on_a:#?}"
    );
    let on_b = edges(&bed.b);
    let e = on_b
        .iter()
        .find(|e| e["dst"] == "api")
        .expect("web → api on node b");
    assert_eq!(e["secured"], "√", "{on_b:#?}");
    assert_eq!(e["src"], "sa/web");
    assert_eq!(
        (e["client_id"].as_str(), e["server_id"].as_str()),
        (Some(web_id.as_str()), Some(api_id.as_str()))
    );

    // Nobody but the node itself: not another node, not a pod.
    let agent_b = bed.b.admin_addr();
    let from_node_a = in_netns(&bed.a.netns, move || get_stat(agent_b));
    assert!(from_node_a.contains("403"), "from node a: {from_node_a}");
    let from_pod = in_netns(&web.netns, move || get_stat(agent_b));
    assert!(from_pod.contains("403"), "from a pod: {from_pod}");
}

/// `nodemesh tap` on `node`, started now, ending after `count` events:
/// feeds `traffic` until it ends (it may start listening a moment later),
/// then its JSON lines.
fn tap_while(node: &Node, args: &[&str], mut traffic: impl FnMut()) -> Vec<Value> {
    let exe: PathBuf = std::env::current_exe().expect("current_exe");
    let mut argv: Vec<String> = vec![agent::ROLE.into(), "tap".into()];
    argv.extend(args.iter().map(|s| s.to_string()));
    argv.extend([
        "-o".into(),
        "json".into(),
        "--agent".into(),
        node.admin_addr().to_string(),
    ]);
    let mut child = Killed::new(in_netns(&node.netns, move || {
        Command::new(exe)
            .args(&argv)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run nodemesh tap")
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if child.get().try_wait().expect("tap").is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.get().kill();
            break;
        }
        traffic();
        thread::sleep(Duration::from_millis(200));
    }
    let out = child.take().wait_with_output().expect("tap output");
    assert!(
        out.status.success(),
        "nodemesh tap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// One request's `req`, `rsp` and `end`, in order, with both identities.
fn one_request(events: &[Value], direction: &str, src: &str, dst: &str) {
    assert_eq!(events.len(), 3, "{events:#?}");
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["req", "rsp", "end"], "{events:#?}");
    assert!(events.iter().all(|e| e["id"] == events[0]["id"]));
    for e in events {
        assert_eq!(e["direction"], direction, "{e:#}");
        assert_eq!(e["src"]["identity"], src, "{e:#}");
        assert_eq!(e["dst"]["identity"], dst, "{e:#}");
        assert_eq!(e["tls"], true, "{e:#}");
        assert_eq!(e["method"], "GET");
        assert!(
            e["path"].as_str().is_some_and(|p| p.starts_with("/tapme")),
            "{e:#}"
        );
    }
    assert_eq!(events[1]["status"], 200);
    assert!(events[1]["latency_us"].as_u64().is_some());
    assert_eq!(events[2]["response_bytes"], 16);
}

/// `tap` sees requests made while it runs — on the server's node (inbound)
/// and on the client's (outbound) — filtered by path and peer, with both
/// identities; pods get nothing.
pub fn tap_shows_live_requests_with_both_identities() {
    let bed = MeshBed::new("24h");
    let web = bed.deployment(&bed.a, "web", "web-5f7c9d-a1");
    let api = bed.deployment(&bed.b, "api", "api-5f7c9d-b1");
    bed.agent_a.wait_metric("web's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    bed.agent_b.wait_metric("api's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let mut srv = api.http();
    srv.serve(HTTP, http::Knobs::default());
    let to = at(&api, HTTP);
    let web_id = format!("spiffe://cluster.local/ns/{}/sa/web", bed.ns);
    let api_id = format!("spiffe://cluster.local/ns/{}/sa/api", bed.ns);
    let mut traffic = || {
        // One the filter skips, one it takes.
        let mut cli = web.http();
        let other = cli.run(http::Run::get(to, "/other", 1));
        let tapped = cli.run(http::Run::get(to, "/tapme/1?secret=x", 1));
        assert!(
            other.iter().chain(&tapped).all(|o| o.status == Some(200)),
            "{other:?} {tapped:?}"
        );
    };
    let inbound = tap_while(
        &bed.b,
        &[
            "deploy/api",
            "-n",
            &bed.ns,
            "--path",
            "/tapme",
            "--count",
            "3",
        ],
        &mut traffic,
    );
    one_request(&inbound, "inbound", &web_id, &api_id);
    assert_eq!(inbound[0]["path"], "/tapme/1", "no query string");
    let outbound = tap_while(
        &bed.a,
        &[
            "deploy/web",
            "--to",
            "deploy/api",
            "--path",
            "/tapme",
            "--count",
            "3",
        ],
        &mut traffic,
    );
    one_request(&outbound, "outbound", &web_id, &api_id);

    // `top`: the busiest paths over 4 s of traffic, /top/a three times as
    // often as /top/b.
    let exe: PathBuf = std::env::current_exe().expect("current_exe");
    let argv: Vec<String> = [
        agent::ROLE,
        "top",
        "deploy/api",
        "-n",
        &bed.ns,
        "--path",
        "/top/",
        "--duration",
        "4s",
        "--every",
        "1h",
        "--agent",
        &bed.b.admin_addr().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut top = Killed::new(in_netns(&bed.b.netns, move || {
        Command::new(exe)
            .args(&argv)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run nodemesh top")
    }));
    thread::sleep(Duration::from_millis(500));
    let mut cli = web.http();
    let (mut a, mut b) = (0, 0);
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        cli.run(http::Run::get(to, "/top/a", 3));
        cli.run(http::Run::get(to, "/top/b", 1));
        a += 3;
        b += 1;
    }
    assert!(top.get().wait().expect("top").success());
    let mut table = String::new();
    top.get()
        .stdout
        .take()
        .expect("top's output")
        .read_to_string(&mut table)
        .expect("read top");
    let rows: Vec<&str> = table.lines().filter(|l| l.contains("/top/")).collect();
    assert!(rows.len() == 2, "{table}");
    assert!(
        rows[0].contains("/top/a") && rows[1].contains("/top/b"),
        "{table}"
    );
    let count = |row: &str| -> u64 {
        row.split_whitespace()
            .nth(2)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count(rows[0]) > 0
            && count(rows[0]) <= a
            && count(rows[1]) <= b
            && count(rows[0]) >= count(rows[1]),
        "sent /top/a {a}, /top/b {b}: {table}"
    );
    assert!(rows[0].contains("100.00%"), "{table}");
    // Pods get nothing.
    let agent_b = bed.b.admin_addr();
    let from_pod = in_netns(&web.netns, move || {
        let mut s = TcpStream::connect_timeout(&agent_b, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(
            s,
            "GET /v1/tap HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    });
    assert!(
        from_pod.starts_with("HTTP/1.1 403"),
        "a pod tapping: {from_pod}"
    );
}

/// Prometheus users: the Grafana dashboard (deploy/grafana) uses only names
/// the agent at `metrics` exports (a family shows once it has a series, so
/// call this where every kind the dashboard shows has happened).
pub fn the_dashboard_uses_only_exported_names(metrics: &nodemesh_tests::Metrics) {
    let exported: Vec<String> = metrics
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/nodemesh.json"),
        )
        .expect("deploy/grafana/nodemesh.json"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel:#}");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("nodemesh_"))
            {
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    exported.iter().any(|e| e == family),
                    "the dashboard's {name} is not exported ({family}); exported: {exported:?}"
                );
            }
        }
    }
}

/// `GET path` from inside `netns`: the body (empty when it fails).
fn http_get(netns: &std::path::Path, addr: SocketAddr, path: &str) -> String {
    http_get_as(netns, addr, path, &addr.to_string())
}

/// The same, naming `host` in `Host`.
fn http_get_as(netns: &std::path::Path, addr: SocketAddr, path: &str, host: &str) -> String {
    let (path, host) = (path.to_owned(), host.to_owned());
    in_netns(netns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        if write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .is_err()
        {
            return String::new();
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    })
}

/// Where the test run leaves screenshots for people to look at.
fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// Headless Chromium on `node`: the page's DOM once its scripts ran, and a
/// screenshot of it as `shot`.
fn chromium(node: &Node, url: &str, shot: &str) -> String {
    let profile = node.dir.join(format!("chromium-{shot}"));
    let png = screenshots().join(format!("{shot}.png"));
    let run = |extra: Vec<String>| {
        let mut argv: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--virtual-time-budget=6000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.push(format!("--user-data-dir={}", profile.display()));
        argv.extend(extra);
        argv.push(url.to_owned());
        in_netns(&node.netns, move || {
            Command::new("chromium")
                .args(&argv)
                .output()
                .expect("run chromium (cargo xtask setup installs it)")
        })
    };
    let out = run(vec!["--dump-dom".into()]);
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shot_out = run(vec![format!("--screenshot={}", png.display())]);
    assert!(
        shot_out.status.success() && png.exists(),
        "chromium screenshot: {}",
        String::from_utf8_lossy(&shot_out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The dashboard in a real browser (headless Chromium): the overview, a
/// namespace's workloads and a workload page show the numbers `stat`
/// shows, the tap page a request made during the test; screenshots are
/// left in target/screenshots.
pub fn the_dashboard_shows_live_numbers_in_a_real_browser() {
    let bed = MeshBed::new("24h");
    let web = bed.deployment(&bed.a, "web", "web-5f7c9d-a1");
    let api = bed.deployment(&bed.b, "api", "api-5f7c9d-b1");
    bed.agent_a.wait_metric("web's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    bed.agent_b.wait_metric("api's certificate", |m| {
        m.sum("nodemesh_identity_certificates", &[]) == 1.0
    });
    let mut srv = api.http();
    srv.serve(HTTP, http::Knobs::default());
    let mut cli = web.http();
    let to = at(&api, HTTP);
    cli.run(http::Run::get(to, "/", 90));
    cli.run(http::Run::get(to, "/?status=500", 10));

    // The dashboard on node b, asking its agent.
    let port = 50_000 + (std::process::id() % 10_000) as u16;
    let exe: PathBuf = std::env::current_exe().expect("current_exe");
    let argv: Vec<String> = vec![
        agent::ROLE.into(),
        "dashboard".into(),
        "--port".into(),
        port.to_string(),
        "--agent".into(),
        bed.b.admin_addr().to_string(),
    ];
    let _dashboard = Killed::new(in_netns(&bed.b.netns, move || {
        Command::new(exe)
            .args(&argv)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run nodemesh dashboard")
    }));
    let ui = SocketAddr::from(([127, 0, 0, 1], port));
    nodemesh_tests::eventually("the dashboard serves", Duration::from_secs(15), || {
        let body = http_get(&bed.b.netns, ui, "/");
        body.contains("nodemesh")
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    // A request the tap page must show (the dashboard follows the agent's
    // tap from its start: sent until it has it).
    nodemesh_tests::eventually(
        "the dashboard has seen a live request",
        Duration::from_secs(15),
        || {
            cli.run(http::Run::get(to, "/tapme/dashboard", 1));
            let body = http_get(&bed.b.netns, ui, "/api/tap?since=0&path=/tapme");
            body.contains("/tapme/dashboard")
                .then_some(())
                .ok_or_else(|| body.chars().take(200).collect::<String>())
        },
    );
    // Another site's page whose name was re-pointed here gets nothing.
    let rebound = http_get_as(&bed.b.netns, ui, "/api/stat?window=1m", "evil.example:80");
    assert!(rebound.contains("unexpected Host"), "{rebound}");
    let stat = stat_json(&bed.b, &["deploy", "-n", &bed.ns, "-t", "1m"]);
    let api_line = line(&stat, "api");
    let success = format!(
        "{:.2}%",
        api_line["success_rate"].as_f64().expect("a success rate") * 100.0
    );

    let base = format!("http://127.0.0.1:{port}/");
    let overview = chromium(&bed.b, &base, "dashboard-overview");
    assert!(
        overview.contains(&format!("data-namespace=\"{}\"", bed.ns)),
        "{overview}"
    );
    let ns_page = chromium(
        &bed.b,
        &format!("{base}#/ns/{}", bed.ns),
        "dashboard-namespace",
    );
    let row = ns_page
        .split("<tr")
        .find(|r| r.contains("data-workload=\"api\""))
        .unwrap_or_else(|| panic!("no api row: {ns_page}"));
    assert!(
        row.contains(&success),
        "stat says {success}; the page: {row}"
    );
    assert!(row.contains("<svg"), "a sparkline: {row}");
    let w_page = chromium(
        &bed.b,
        &format!("{base}#/w/{}/deployment/api", bed.ns),
        "dashboard-workload",
    );
    assert!(w_page.contains(&success), "{w_page}");
    assert!(w_page.contains("every request over mutual TLS"), "{w_page}");
    assert!(
        w_page.contains(&format!("{}/sa:web", bed.ns)),
        "the edge from web: {w_page}"
    );
    let tap = chromium(&bed.b, &format!("{base}#/tap?path=/tapme"), "dashboard-tap");
    assert!(tap.contains("/tapme/dashboard"), "{tap}");
    assert!(
        tap.contains("spiffe://cluster.local/ns/"),
        "identities: {tap}"
    );
}
