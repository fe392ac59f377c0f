//! The soak: one agent (node b's) carrying many connections at once —
//! tunnel streams from a meshed client on node a, plaintext clients inbound
//! capture hands over, same-node meshed connections — then a churn of new
//! connections from all three, then idle. What it measures per phase: the
//! agent's RSS, open files and CPU, and the clients' errors; at the end,
//! whether every gauge is back to 0 and what came back of the memory.
//! `cargo xtask soak` runs the full form and prints the table; the e2e
//! suite runs a short form and checks errors, gauges and files (never
//! times or memory: those are the table's).
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{Agent, PodSpec, TcpApp, mesh::MeshBed, sys};

const ECHO: u16 = 8080;

/// How big a soak.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// Connections held at once, split 2:2:1 over tunnel, inbound, local.
    pub connections: u32,
    /// How long the churn lasts.
    pub churn: Duration,
    /// Pause between one client's new connections during the churn.
    pub churn_pause: Duration,
    /// The agent binary (a release build), else the test build's.
    pub agent: Option<PathBuf>,
}

impl SoakOptions {
    /// The full form: 10 000 connections, a minute of churn (about 1 000
    /// new connections a second from three clients).
    pub fn full(agent: Option<PathBuf>) -> Self {
        Self {
            connections: 10_000,
            churn: Duration::from_secs(60),
            churn_pause: Duration::from_millis(2),
            agent,
        }
    }

    /// The short form for CI.
    pub fn short() -> Self {
        Self {
            connections: 1_000,
            churn: Duration::from_secs(5),
            churn_pause: Duration::from_millis(2),
            agent: None,
        }
    }
}

/// One phase's figures (the agent on node b).
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: &'static str,
    /// Connections the clients held, or made in the phase.
    pub connections: u64,
    pub rss_kib: u64,
    pub fds: usize,
    /// CPU seconds the agent used in the phase.
    pub cpu_s: f64,
    pub errors: u64,
    pub seconds: f64,
}

/// What a soak saw.
#[derive(Clone, Debug)]
pub struct SoakReport {
    /// Why fewer connections were held than asked, if so.
    pub capped: Option<String>,
    pub phases: Vec<Phase>,
    /// The admission gauges and open-connection series once idle again.
    pub connections_in_use: f64,
    pub open_connections: f64,
    /// The first client errors, if any.
    pub first_errors: Vec<String>,
}

impl SoakReport {
    pub fn baseline(&self) -> &Phase {
        &self.phases[0]
    }

    pub fn end(&self) -> &Phase {
        &self.phases[self.phases.len() - 1]
    }

    pub fn errors(&self) -> u64 {
        self.phases.iter().map(|p| p.errors).sum()
    }

    /// The table, as README shows it.
    pub fn table(&self) -> String {
        let base = self.baseline().rss_kib as f64;
        let mut out = String::from(
            "| phase | connections | seconds | agent RSS MiB | KiB per connection | open files | CPU s | client errors |\n|---|---|---|---|---|---|---|---|\n",
        );
        for p in &self.phases {
            let per = if p.name == "held" && p.connections > 0 {
                format!("{:.1}", (p.rss_kib as f64 - base) / p.connections as f64)
            } else {
                "-".into()
            };
            out += &format!(
                "| {} | {} | {:.1} | {:.1} | {} | {} | {:.2} | {} |\n",
                p.name,
                p.connections,
                p.seconds,
                p.rss_kib as f64 / 1024.0,
                per,
                p.fds,
                p.cpu_s,
                p.errors
            );
        }
        out
    }
}

/// The agent's figures now.
fn figures(agent: &Agent) -> (u64, usize, u64) {
    let pid = agent.pid().expect("the agent runs");
    (
        sys::rss_kib(pid).unwrap_or(0),
        sys::fd_count(pid).unwrap_or(0),
        sys::cpu_ticks(pid),
    )
}

fn ticks_per_second() -> f64 {
    100.0
}

/// The connections an agent started from here can hold: two descriptors
/// each within the open-file hard limit it inherits (it cannot raise it
/// without CAP_SYS_RESOURCE), as the agent itself derives it.
fn fd_budget() -> u32 {
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1 << 20, |(_, hard)| hard);
    (hard.saturating_sub(4096) / 2).min(1 << 20) as u32
}

/// Runs a soak; the caller prints or checks the report.
pub fn run(opts: &SoakOptions) -> SoakReport {
    // A same-node connection takes two slots (the client pod's, the
    // server's): 3/4 of the budget leaves room for the 2:2:1 mix.
    let budget = fd_budget();
    let mut opts = opts.clone();
    let mut capped = None;
    if opts.connections > budget / 4 * 3 {
        capped = Some(format!(
            "{} asked; the agents' open-file hard limit allows {budget} connections (2 descriptors each), of which this mix fits {}",
            opts.connections,
            budget / 4 * 3
        ));
        opts.connections = budget / 4 * 3;
    }
    let opts = &opts;
    let bed = MeshBed::with_agent(
        crate::Node::new(),
        crate::Node::new(),
        "24h",
        &[],
        opts.agent.as_deref(),
    );
    let plain = crate::kube::unique("plain");
    bed.cluster.namespace(&plain, &[]);
    // The server may hold the whole budget (its annotation): what binds
    // is then each client's half of it, and the node's.
    let server = bed.cluster.run_pod(
        &bed.b,
        PodSpec::new(&bed.ns, "server")
            .service_account("server")
            .annotation(
                nodemesh_core::names::MAX_CONNECTIONS_ANNOTATION,
                &budget.to_string(),
            ),
    );
    let neighbour = bed.pod(&bed.b, "neighbour", "neighbour");
    let client = bed.pod(&bed.a, "client", "client");
    let outsider = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "outsider"));
    bed.agent_b.wait_metric("node b's pods captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
    });
    bed.agent_a.wait_metric("node a's pod captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 1.0
    });
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let to: SocketAddr = SocketAddr::from((server.ip, ECHO));
    let mut apps: Vec<(&'static str, TcpApp)> = vec![
        ("tunnel", client.tcp()),
        ("inbound", outsider.tcp()),
        ("local", neighbour.tcp()),
    ];
    // Certificates and the tunnel up before the baseline.
    for (what, app) in &mut apps {
        app.exchange(to, 10)
            .unwrap_or_else(|f| panic!("a first {what} connection: {f:?}"));
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut phases = Vec::new();
    let mut first_errors = Vec::new();
    let (rss, fds, cpu) = figures(&bed.agent_b);
    phases.push(Phase {
        name: "baseline",
        connections: 0,
        rss_kib: rss,
        fds,
        cpu_s: 0.0,
        errors: 0,
        seconds: 0.0,
    });

    // Held: 2:2:1 over the three doors, opened at once.
    let share = [opts.connections * 2 / 5, opts.connections * 2 / 5, 0];
    let counts = [share[0], share[1], opts.connections - share[0] - share[1]];
    let started = Instant::now();
    let held: Vec<(u32, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = apps
            .iter_mut()
            .zip(counts)
            .map(|((what, app), n)| {
                s.spawn(move || {
                    let (held, failures) = app.hold(to, n);
                    let failures = failures
                        .into_iter()
                        .map(|f| format!("{what}: {f:?}"))
                        .collect::<Vec<_>>();
                    (held, failures, n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (held, failures, n) = h.join().expect("a holding client");
                let mut failures = failures;
                if held < n && failures.is_empty() {
                    failures.push(format!("{} of {n} held", held));
                }
                (held, failures)
            })
            .collect()
    });
    let total: u32 = held.iter().map(|(h, _)| h).sum();
    let errors = u64::from(opts.connections - total);
    for (_, f) in &held {
        first_errors.extend(f.iter().take(3).cloned());
    }
    let (rss, fds, cpu2) = figures(&bed.agent_b);
    phases.push(Phase {
        name: "held",
        connections: u64::from(total),
        rss_kib: rss,
        fds,
        cpu_s: (cpu2 - cpu) as f64 / ticks_per_second(),
        errors,
        seconds: started.elapsed().as_secs_f64(),
    });
    for (_, app) in &mut apps {
        app.release();
    }
    crate::eventually(
        "the held connections closed",
        Duration::from_secs(60),
        || {
            let m = bed.agent_b.metrics();
            let open = m.sum("nodemesh_admission_connections_in_use", &[]);
            if open == 0.0 {
                Ok(())
            } else {
                Err(format!("{open} still open"))
            }
        },
    );

    // Churn: every client makes new connections, one after another.
    let (_, _, cpu) = figures(&bed.agent_b);
    let started = Instant::now();
    // Batches of 100: a failed one counts as one error (its connections
    // before the failure are not counted as made).
    let made: Vec<(u64, u64, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = apps
            .iter_mut()
            .map(|(what, app)| {
                let (churn, pause) = (opts.churn, opts.churn_pause);
                s.spawn(move || {
                    let until = Instant::now() + churn;
                    let (mut made, mut errors, mut first) = (0u64, 0u64, Vec::new());
                    while Instant::now() < until {
                        match app.setup(to, 100, pause) {
                            Ok(micros) => made += micros.len() as u64,
                            Err(f) => {
                                errors += 1;
                                if first.len() < 3 {
                                    first.push(format!(
                                        "{what} at {:.0}s: {f:?}",
                                        churn.as_secs_f64()
                                            - until
                                                .saturating_duration_since(Instant::now())
                                                .as_secs_f64()
                                    ));
                                }
                            }
                        }
                    }
                    (made, errors, first)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a churning client"))
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut churned = 0;
    let mut churn_errors = 0;
    for (n, e, first) in made {
        churned += n;
        churn_errors += e;
        first_errors.extend(first);
    }
    let (rss, fds, cpu2) = figures(&bed.agent_b);
    phases.push(Phase {
        name: "churn",
        connections: churned,
        rss_kib: rss,
        fds,
        cpu_s: (cpu2 - cpu) as f64 / ticks_per_second(),
        errors: churn_errors,
        seconds,
    });

    // Idle: everything closed; the agent gives its memory back within
    // its tidy's 10 s.
    let (_, _, cpu) = figures(&bed.agent_b);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(12));
    let m = bed.agent_b.metrics();
    let connections_in_use = m.sum("nodemesh_admission_connections_in_use", &[]);
    let open_connections = m.sum("nodemesh_tcp_open_connections", &[]);
    let (rss, fds, cpu2) = figures(&bed.agent_b);
    phases.push(Phase {
        name: "idle",
        connections: 0,
        rss_kib: rss,
        fds,
        cpu_s: (cpu2 - cpu) as f64 / ticks_per_second(),
        errors: 0,
        seconds: started.elapsed().as_secs_f64(),
    });
    SoakReport {
        capped,
        phases,
        connections_in_use,
        open_connections,
        first_errors,
    }
}
