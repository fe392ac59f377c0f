//! The balancer in simulated time: spread, locality, peaks, rests.
use super::*;

fn addrs(n: u16) -> Vec<SocketAddr> {
    (1..=n)
        .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 80)))
        .collect()
}

#[test]
fn work_spreads_over_every_endpoint() {
    let b = Balancer::default();
    let eps = addrs(4);
    let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
    let mut held = Vec::new();
    for _ in 0..400 {
        let f = b.pick(&[&eps], &[]).unwrap();
        *counts.entry(f.endpoint().addr).or_default() += 1;
        held.push(f);
    }
    // Equal latency: in-flight work evens the choice out.
    for ep in &eps {
        let n = counts.get(ep).copied().unwrap_or(0);
        assert!((80..=120).contains(&n), "{ep}: {n} of 400 ({counts:?})");
    }
}

#[test]
fn a_slow_endpoint_gets_less_work() {
    let b = Balancer::default();
    let eps = addrs(3);
    let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
    for _ in 0..600 {
        let f = b.pick(&[&eps], &[]).unwrap();
        let addr = f.endpoint().addr;
        *counts.entry(addr).or_default() += 1;
        let rtt = if addr == eps[0] {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(1)
        };
        f.endpoint().observe(rtt, true);
    }
    let slow = counts[&eps[0]];
    assert!(
        slow < 60,
        "the slow endpoint got {slow} of 600 ({counts:?})"
    );
}

#[test]
fn a_refusing_endpoint_rests_then_gets_one_probe() {
    let b = Balancer::default();
    let eps = addrs(2);
    let bad = eps[0];
    // It refuses once: it rests.
    loop {
        let f = b.pick(&[&eps], &[]).unwrap();
        if f.endpoint().addr == bad {
            f.failure();
            break;
        }
        f.success();
    }
    for _ in 0..100 {
        let f = b.pick(&[&eps], &[]).unwrap();
        assert_ne!(f.endpoint().addr, bad, "resting endpoints get no work");
        f.success();
    }
    // Alone, it is still tried (a probe beats a certain failure).
    let f = b.pick(&[&[bad]], &[]).unwrap();
    assert_eq!(f.endpoint().addr, bad);
    assert!(f.endpoint().resting());
    f.success();
    assert!(!b.pick(&[&[bad]], &[]).unwrap().endpoint().resting());
}

#[test]
fn excluded_endpoints_are_not_picked() {
    let b = Balancer::default();
    let eps = addrs(2);
    for _ in 0..50 {
        assert_eq!(b.pick(&[&eps], &[eps[0]]).unwrap().endpoint().addr, eps[1]);
    }
    assert!(b.pick(&[&eps], &eps).is_none());
    assert!(b.pick(&[&[]], &[]).is_none());
}

/// Sequential work (one at a time), each answered in `rtt(addr)`, with
/// `step` between picks: how many each endpoint got.
fn sequential(
    b: &Balancer,
    tiers: &[&[SocketAddr]],
    n: usize,
    step: Duration,
    rtt: impl Fn(SocketAddr) -> Duration,
) -> HashMap<SocketAddr, usize> {
    let mut now = Instant::now();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let f = b.pick_at(tiers, &[], now).unwrap();
        let addr = f.endpoint().addr;
        *counts.entry(addr).or_default() += 1;
        now += rtt(addr);
        f.endpoint().observe_at(rtt(addr), true, now);
        f.told.store(true, Ordering::Relaxed);
        now += step;
    }
    counts
}

#[test]
fn sequential_work_spreads_over_equal_endpoints_and_never_pins() {
    // Two endpoints alike: P2C looks at both every time, so a stale
    // estimate decided it all before (≥ 96 % to one in most runs).
    let b = Balancer::default();
    let eps = addrs(2);
    let counts = sequential(&b, &[&eps], 900, Duration::from_millis(2), |_| {
        Duration::from_micros(400)
    });
    for ep in &eps {
        let n = counts.get(ep).copied().unwrap_or(0);
        assert!((270..=630).contains(&n), "{ep}: {n} of 900 ({counts:?})");
    }
}

#[test]
fn a_peak_fades_in_seconds_not_minutes() {
    let b = Balancer::default();
    let eps = addrs(2);
    let mut now = Instant::now();
    // One slow answer (a pause): 200 ms.
    let slow = b.endpoint(eps[0], now);
    slow.observe_at(Duration::from_millis(200), true, now);
    assert!(slow.latency(now) > 100.0 * FLOOR.as_nanos() as f64);
    now += 6 * DECAY;
    // Unrefreshed, it fades back among the fast ones.
    assert!(slow.latency(now) < SLOWER * FLOOR.as_nanos() as f64);
    let f = b.pick_at(&[&eps[..1], &eps], &[], now).unwrap();
    assert_eq!(f.endpoint().addr, eps[0], "the nearer one has work again");
}

#[test]
fn the_nearest_tier_is_preferred_while_it_is_healthy_and_not_overloaded() {
    let eps = addrs(3);
    let (local, all) = (&eps[..1], &eps[..]);
    // Healthy: every sequential request stays on this node.
    let b = Balancer::default();
    let counts = sequential(&b, &[local, all], 300, Duration::from_millis(1), |a| {
        if a == eps[0] {
            Duration::from_micros(200)
        } else {
            Duration::from_micros(900)
        }
    });
    assert_eq!(counts.get(&eps[0]), Some(&300), "{counts:?}");

    // Slow (overloaded): most go elsewhere; it is still tried now and
    // then, as its peak fades.
    let b = Balancer::default();
    let counts = sequential(&b, &[local, all], 300, Duration::from_millis(1), |a| {
        if a == eps[0] {
            Duration::from_millis(40)
        } else {
            Duration::from_micros(900)
        }
    });
    let near = counts.get(&eps[0]).copied().unwrap_or(0);
    assert!(
        (1..30).contains(&near),
        "the slow local one got {near} ({counts:?})"
    );

    // Busy: work in flight there spills over to the next tier.
    let b = Balancer::default();
    let held: Vec<InFlight> = (0..3)
        .map(|_| b.pick(&[local, all], &[]).unwrap())
        .collect();
    assert!(
        held.iter().any(|f| f.endpoint().addr != eps[0]),
        "spilled over"
    );

    // Resting (it refused a connection): the next tier has the work.
    let b = Balancer::default();
    b.pick(&[local, all], &[]).unwrap().failure();
    for _ in 0..50 {
        let f = b.pick(&[local, all], &[]).unwrap();
        assert_ne!(f.endpoint().addr, eps[0]);
        f.success();
    }
}

#[test]
fn a_pick_looks_at_two_endpoints_not_all() {
    let b = Balancer::default();
    let eps: Vec<SocketAddr> = (0..5000u32)
        .map(|i| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)))
        .collect();
    for _ in 0..10 {
        b.pick(&[&eps], &[]).unwrap().success();
    }
    assert!(b.tracked() <= 20, "{} endpoints looked up", b.tracked());
}

#[test]
fn a_slow_by_nature_service_stays_on_this_node_though_idle_endpoints_elsewhere_fade() {
    // Every endpoint answers in 50 ms; twenty elsewhere, idle. Each
    // is tried once (it is not known yet), then the node's keeps the
    // work: a faded estimate is no evidence of a faster endpoint.
    let b = Balancer::default();
    let eps = addrs(21);
    let (local, all) = (&eps[..1], &eps[..]);
    let counts = sequential(&b, &[local, all], 2000, Duration::from_millis(5), |_| {
        Duration::from_millis(50)
    });
    let elsewhere = 2000 - counts.get(&eps[0]).copied().unwrap_or(0);
    assert!(
        elsewhere <= 100,
        "{elsewhere} of 2000 left the node ({counts:?})"
    );
}
