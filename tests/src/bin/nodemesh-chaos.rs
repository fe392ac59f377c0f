//! `cargo xtask chaos`: the test a platform team runs first on a node
//! proxy. A victim — a meshed client pod `web` on node a running `wrk`
//! against a meshed HTTP server `api` on node b — keeps a steady load,
//! first quiet, then while an attacker does each of: thousands of idle
//! connections, slow-loris on the HTTP port, a connect/close loop at full
//! speed, non-reading sinks, 10 000 HTTP/2 streams on one connection, a
//! flood of requests with 1 MB headers. The attacker is a meshed pod on
//! the victim's node (`noisy`) and an unmeshed client of a meshed pod
//! (`outsider`, plaintext captured inbound at node b), both aiming at
//! `target` on node b, whose agent the victim's requests cross too. Both
//! agents run under a 512 MiB cgroup v1 memory limit (where a hybrid host
//! and containerd put the DaemonSet's). Prints a table; asserts nothing
//! about speed (these machines are shared and noisy).
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nodemesh_tests::{Agent, Pod, PodSpec, apps::http, harness, mesh::MeshBed, sys::MemoryCgroup};

const ECHO: u16 = 8080;
const HTTP: u16 = 8081;
const SOURCE: u16 = 8082;
const SECONDS: u32 = 10;

/// The victim's figures over one phase.
struct Victim {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

/// `wrk` from `pod` for [`SECONDS`].
fn wrk(pod: &Pod, url: &str) -> Victim {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c16", &format!("-d{SECONDS}s"), "--latency", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = pod.spawn(cmd).wait_with_output().expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    };
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and
    // "Non-2xx or 3xx responses: N".
    let socket_errors: u64 = line("Socket errors:")
        .map(|l| {
            l.split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let non_2xx: u64 = line("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Victim {
        rps: line("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        p50_us: line("50%")
            .and_then(|v| nodemesh_tests::wrk::micros(&v))
            .unwrap_or(f64::NAN),
        p99_us: line("99%")
            .and_then(|v| nodemesh_tests::wrk::micros(&v))
            .unwrap_or(f64::NAN),
        errors: socket_errors + non_2xx,
    }
}

/// A shell loop in `pod` for the phase.
fn shell(pod: &Pod, script: &str) -> std::process::Child {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    pod.spawn(cmd)
}

/// Slow-loris from `pod`: `n` connections to `to`, each sending a request
/// line and one header byte every few seconds, never finishing.
fn slow_loris(pod: &Pod, to: SocketAddr, n: u32) -> std::process::Child {
    let script = format!(
        r#"
import socket, time
socks = []
for _ in range({n}):
    try:
        s = socket.create_connection(("{ip}", {port}), timeout=2)
        s.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    except OSError:
        pass
end = time.time() + {secs}
while time.time() < end:
    for s in list(socks):
        try:
            s.send(b"X")
        except OSError:
            socks.remove(s)
    time.sleep(2)
"#,
        ip = to.ip(),
        port = to.port(),
        secs = SECONDS + 2
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    pod.spawn(cmd)
}

fn refused(agents: &[&Agent]) -> f64 {
    agents
        .iter()
        .map(|a| {
            let m = a.metrics();
            m.sum("nodemesh_admission_refused_total", &[])
                + m.sum("nodemesh_inbound_denied_total", &[])
        })
        .sum()
}

struct Row {
    attack: &'static str,
    victim: Victim,
    refused: f64,
    rss_b_mib: f64,
}

fn main() {
    harness::play_role();
    let args: Vec<String> = std::env::args().collect();
    let agent: Option<PathBuf> = args
        .iter()
        .skip_while(|a| *a != "--agent")
        .nth(1)
        .map(PathBuf::from);
    println!(
        "nodemesh chaos: a victim's wrk (16 connections, {SECONDS}s a phase, web on node a -> api on node b, both meshed) while an attacker on node a (meshed `noisy`, unmeshed `outsider`) hits `target` on node b; agents under a 512 MiB v1 memory limit"
    );
    let limit_a = MemoryCgroup::v1(
        &format!("nodemesh-chaos-a-{}", std::process::id()),
        512 << 20,
    );
    let limit_b = MemoryCgroup::v1(
        &format!("nodemesh-chaos-b-{}", std::process::id()),
        512 << 20,
    );
    if limit_b.is_none() {
        println!("(no cgroup v1 memory controller here: the agents run without a memory limit)");
    }
    let bed = chaos_bed(agent.as_deref(), limit_a.as_ref(), limit_b.as_ref());
    let plain = nodemesh_tests::kube::unique("plain");
    bed.cluster.namespace(&plain, &[]);
    let api = bed.pod(&bed.b, "api", "api");
    let target = bed.pod(&bed.b, "target", "target");
    let web = bed.pod(&bed.a, "web", "web");
    let noisy = bed.pod(&bed.a, "noisy", "noisy");
    let outsider = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "outsider"));
    bed.agent_b.wait_metric("node b's pods captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
    });
    bed.agent_a.wait_metric("node a's pods captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
    });
    let mut api_http = api.http();
    api_http.serve(
        HTTP,
        http::Knobs {
            bytes: 1024,
            ..http::Knobs::default()
        },
    );
    let mut target_http = target.http();
    target_http.serve(HTTP, http::Knobs::default());
    let mut target_tcp = target.tcp();
    target_tcp.listen(ECHO);
    target_tcp.source(SOURCE);
    let url = format!("http://{}:{HTTP}/", api.ip);
    let echo = SocketAddr::from((target.ip, ECHO));
    let source = SocketAddr::from((target.ip, SOURCE));
    let http_at = SocketAddr::from((target.ip, HTTP));
    // Warm: certificates, tunnel connections.
    let _ = wrk(&web, &url);
    let agents = [&bed.agent_a, &bed.agent_b];
    let header = std::env::temp_dir().join(format!("nodemesh-chaos-{}.hdr", std::process::id()));
    std::fs::write(&header, format!("X-Big: {}\n", "a".repeat(1 << 20))).expect("write header");

    let mut rows = Vec::new();
    let mut phase = |attack: &'static str, start: &mut dyn FnMut() -> Vec<Box<dyn FnOnce()>>| {
        eprintln!("  {attack}");
        let before = refused(&agents);
        let stops = start();
        let victim = wrk(&web, &url);
        let rss_b_mib = bed.agent_b.rss_kib().unwrap_or(0) as f64 / 1024.0;
        for stop in stops {
            stop();
        }
        rows.push(Row {
            attack,
            victim,
            refused: refused(&agents) - before,
            rss_b_mib,
        });
        std::thread::sleep(Duration::from_secs(2));
    };

    phase("quiet", &mut || Vec::new());
    phase(
        "5 000 idle connections (meshed) + 5 000 (unmeshed)",
        &mut || {
            let (mut n, mut o) = (noisy.tcp(), outsider.tcp());
            let held = std::thread::scope(|s| {
                let a = s.spawn(|| n.hold(echo, 5000).0);
                let b = s.spawn(|| o.hold(echo, 5000).0);
                (a.join().unwrap_or(0), b.join().unwrap_or(0))
            });
            eprintln!("    attacker held {} + {}", held.0, held.1);
            vec![Box::new(move || {
                n.release();
                o.release();
            })]
        },
    );
    phase(
        "slow-loris, 2 000 connections on the HTTP port",
        &mut || {
            let a = slow_loris(&noisy, http_at, 1000);
            let b = slow_loris(&outsider, http_at, 1000);
            vec![Box::new(move || {
                for mut c in [a, b] {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            })]
        },
    );
    phase("connect/close loop at full speed", &mut || {
        let until = Instant::now() + Duration::from_secs(u64::from(SECONDS));
        let mut handles = Vec::new();
        for pod in [noisy.clone(), outsider.clone()] {
            handles.push(std::thread::spawn(move || {
                let mut app = pod.tcp();
                let mut made = 0usize;
                while Instant::now() < until {
                    made += app.setup(echo, 200, Duration::ZERO).map_or(0, |m| m.len());
                }
                made
            }));
        }
        vec![Box::new(move || {
            let made: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            eprintln!("    attacker made {made} connections");
        })]
    });
    phase(
        "non-reading sinks, 1 000 (unmeshed) + 3 (meshed) on an endless stream",
        &mut || {
            // A meshed pod's sinks stall its own tunnel connection to that
            // destination once they fill its HTTP/2 window (16 MiB: a few
            // of them); more would only wait out their checks. Its own
            // harm: other pods' streams never share its connections.
            let (mut n, mut o) = (noisy.tcp(), outsider.tcp());
            let _ = (n.hold(source, 3), o.hold(source, 1000));
            vec![Box::new(move || {
                n.release();
                o.release();
            })]
        },
    );
    phase("10 000 HTTP/2 streams on one connection", &mut || {
        let noisy = noisy.clone();
        let h = std::thread::spawn(move || {
            let mut app = noisy.http();
            let outcomes = app.run(http::Run {
                requests: 10_000,
                concurrency: 10_000,
                version: http::Version::H2,
                timeout_ms: 20_000,
                ..http::Run::get(http_at, "/?delay_ms=2000", 0)
            });
            outcomes.iter().filter(|o| o.status == Some(200)).count()
        });
        vec![Box::new(move || {
            let ok = h.join().unwrap_or(0);
            eprintln!("    attacker's streams answered: {ok}");
        })]
    });
    phase("requests with 1 MB headers, in a loop", &mut || {
        let script = format!(
            "end=$(($(date +%s)+{SECONDS})); while [ $(date +%s) -lt $end ]; do curl -s -o /dev/null -H @{} http://{http_at}/; done",
            header.display()
        );
        let a = shell(&noisy, &script);
        let b = shell(&outsider, &script);
        vec![Box::new(move || {
            for mut c in [a, b] {
                let _ = c.wait();
            }
        })]
    });
    let _ = std::fs::remove_file(&header);

    let quiet_p99 = rows[0].victim.p99_us;
    println!(
        "| attack | victim req/s | victim p50 µs | victim p99 µs | p99 × quiet | victim errors | attacker refused | node b agent RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {:.0} | {:.1} |",
            r.attack,
            r.victim.rps,
            r.victim.p50_us,
            r.victim.p99_us,
            r.victim.p99_us / quiet_p99,
            r.victim.errors,
            r.refused,
            r.rss_b_mib
        );
    }
    for (name, limit) in [("a", &limit_a), ("b", &limit_b)] {
        if let Some(l) = limit {
            let (hits, killed) = l.pressure();
            println!(
                "agent {name}: peak {:.1} MiB charged of 512 MiB, limit hit {hits} times, OOM-killed: {}",
                l.max_usage() as f64 / f64::from(1 << 20),
                if killed { "YES" } else { "no" }
            );
        }
    }
    for (name, a) in [("a", &bed.agent_a), ("b", &bed.agent_b)] {
        if a.pid().is_none_or(|p| !nodemesh_tests::sys::pid_alive(p)) {
            println!("agent {name} is gone");
        }
    }
    drop(bed);
}

/// The mesh bed, its agents started inside the memory cgroups.
fn chaos_bed(
    binary: Option<&std::path::Path>,
    a: Option<&MemoryCgroup>,
    b: Option<&MemoryCgroup>,
) -> MeshBed {
    MeshBed::with_agent_cgroups(
        nodemesh_tests::Node::new(),
        nodemesh_tests::Node::new(),
        "24h",
        &[],
        binary,
        [a.map(|c| c.dir.clone()), b.map(|c| c.dir.clone())],
    )
}
