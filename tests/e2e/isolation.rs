//! One pod cannot hurt another, on the two-node bed (real eBPF capture,
//! real agents): the audit's measurement re-run as a test. An unmeshed
//! pod on another node holding idle connections to a meshed server used
//! to take the node's one pool (60 slots: 53 held left a meshed neighbour
//! one connection at a time). Now the attacker gets its client's share of
//! the server, a second one the rest of the server's share, and both
//! excesses are refused and counted; the neighbour keeps all of its own.
use std::net::SocketAddr;

use nodemesh_tests::{PodSpec, mesh::MeshBed};

use crate::inbound::{at, line_from, plain_namespace};

const ECHO: u16 = 8080;

fn refusals(m: &nodemesh_tests::Metrics, pod: &str, door: &str, reason: &str) -> f64 {
    m.sum(
        "nodemesh_admission_refused_total",
        &[("pod", pod), ("door", door), ("reason", reason)],
    )
}

pub fn idle_connections_from_outside_fill_only_their_share() {
    // Node b serves two meshed pods: 30 connections each; one client
    // holds at most 16 (the floor) into the node's pods.
    let bed = MeshBed::with_agent_args(
        nodemesh_tests::Node::new(),
        nodemesh_tests::Node::new(),
        "24h",
        &["--max-connections", "60"],
    );
    let plain = plain_namespace(&bed);
    let server = bed.pod(&bed.b, "server", "server");
    let neighbour = bed.pod(&bed.b, "neighbour", "neighbour");
    let attacker = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "attacker"));
    let second = bed.cluster.run_pod(&bed.a, PodSpec::new(&plain, "second"));
    let elsewhere = bed
        .cluster
        .run_pod(&bed.a, PodSpec::new(&plain, "elsewhere"));
    bed.agent_b.wait_metric("both captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
    });
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut other = elsewhere.tcp();
    other.listen(ECHO);
    let to_server: SocketAddr = at(&server, ECHO);

    // The attacker: its client's share, no more.
    let mut a = attacker.tcp();
    let (held, failures) = a.hold(to_server, 20);
    assert_eq!(held, 16, "the attacker's first failures: {failures:?}");
    assert!(
        failures
            .iter()
            .all(|f| f.kind == "reset" || f.kind == "other"),
        "{failures:?}"
    );
    // A second client: the rest of the server's share (30).
    let mut s = second.tcp();
    let (held, _) = s.hold(to_server, 16);
    assert_eq!(held, 14, "the server's share is 30");
    let m = bed.agent_b.metrics();
    assert_eq!(
        refusals(&m, "server", "inbound", "client_share"),
        4.0,
        "{}",
        m.text
    );
    assert_eq!(
        refusals(&m, "server", "inbound", "pod_share"),
        2.0,
        "{}",
        m.text
    );

    // The neighbour on the same node has all of its own share.
    let mut n = neighbour.tcp();
    let (held, failures) = n.hold(at(&elsewhere, ECHO), 30);
    assert_eq!(held, 30, "the neighbour's first failures: {failures:?}");
    let m = bed.agent_b.metrics();
    assert_eq!(
        m.sum("nodemesh_admission_refused_total", &[("pod", "neighbour")]),
        0.0,
        "{}",
        m.text
    );
    // The server itself is full (that is what its share is for): a new
    // client of it is refused until the attackers let go.
    assert!(line_from(&elsewhere.netns, to_server).is_err());
    assert_eq!(a.release() + s.release(), 30);
    bed.agent_b
        .wait_metric("the attackers' slots given back", |m| {
            m.sum("nodemesh_admission_connections_in_use", &[]) == 30.0
        });
    line_from(&elsewhere.netns, to_server).expect("served again once they let go");
    assert_eq!(n.release(), 30);
    bed.agent_b.wait_metric("every slot given back", |m| {
        m.sum("nodemesh_admission_connections_in_use", &[]) == 0.0
    });
}

/// The soak's short form (`cargo xtask soak` is the full one): held
/// connections through every door of one agent, a churn, then idle — no
/// client error, every gauge back to 0, the agent's open files back to
/// their baseline (give or take the few it keeps: pooled tunnel
/// connections, watches). Memory and time are the table's, printed here.
pub fn a_short_soak_leaves_nothing_open() {
    let report = nodemesh_tests::soak::run(&nodemesh_tests::soak::SoakOptions::short());
    eprint!("{}", report.table());
    assert_eq!(
        report.errors(),
        0,
        "client errors: {:?}",
        report.first_errors
    );
    assert_eq!(report.connections_in_use, 0.0);
    assert_eq!(report.open_connections, 0.0);
    let (base, end) = (report.baseline().fds, report.end().fds);
    assert!(
        end <= base + base / 10 + 8,
        "open files: {base} at the baseline, {end} once idle"
    );
}
