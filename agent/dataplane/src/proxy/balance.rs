//! Choosing among a Service's endpoints: power of two choices over
//! peak-EWMA latency × (in flight + 1), as linkerd2-proxy does, with
//! failure accrual. One [`Balancer`] per node holds every endpoint's
//! statistics (by address), shared by every client pod and Service, for
//! connections and, once detected, requests.
//!
//! - **Peak EWMA**: a sample above the average replaces it at once (a slow
//!   endpoint is noticed on its first slow answer); below, the average
//!   decays toward it with a 10 s time constant.
//! - **Failure accrual**: an endpoint that cannot be connected to
//!   ([`FAILURES_TO_TRIP`] times in a row) gets no new work until its
//!   backoff (1 s, doubling per failed probe to 30 s) is over; then one
//!   probe may go, and its success clears the record. Only connection
//!   failures count: an answer, even an error, is the app's.
//! - Bounded: endpoints unused for [`FORGET_AFTER`] are forgotten, and at
//!   most [`MAX_ENDPOINTS`] are tracked.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// The latency assumed for an endpoint never measured.
const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// How fast the average forgets a peak.
const DECAY: Duration = Duration::from_secs(10);
/// Consecutive connection failures after which an endpoint rests.
pub const FAILURES_TO_TRIP: u32 = 1;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Statistics of endpoints unused this long are dropped.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);
/// At most this many endpoints are tracked per node.
pub const MAX_ENDPOINTS: usize = 16_384;

/// One endpoint's statistics.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
    inner: Mutex<Stats>,
    /// Milliseconds since the balancer's epoch it was last chosen.
    last_used: AtomicU64,
}

#[derive(Debug)]
struct Stats {
    /// Peak-EWMA latency, nanoseconds.
    ewma_ns: f64,
    updated: Instant,
    failures: u32,
    /// Resting until then (a probe may go after).
    down_until: Option<Instant>,
    backoff: Duration,
    /// A probe is out: nobody else is sent while it is.
    probing: bool,
}

/// Work in flight at an endpoint; finishing it (dropping) lowers the load.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
    /// Whether an outcome was recorded (a probe with none is let go on
    /// drop, so the endpoint is not left out).
    told: std::sync::atomic::AtomicBool,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The work reached the endpoint and it answered (connected, or sent a
    /// response head): its latency counts, its failures are forgotten.
    pub fn success(&self) {
        self.told.store(true, Ordering::Relaxed);
        self.endpoint.observe(self.started.elapsed(), true);
    }

    /// The endpoint answered a request sent at `sent`: that latency
    /// counts (not the connection's setup before it, which would make a
    /// new endpoint look slow and starve it), its failures are forgotten.
    pub fn answered(&self, sent: Instant) {
        self.told.store(true, Ordering::Relaxed);
        self.endpoint.observe(sent.elapsed(), true);
    }

    /// It reached the endpoint, but its time is not the endpoint's (a new
    /// tunnel connection's handshake was in it): failures are forgotten,
    /// the latency is not sampled.
    pub fn reached(&self) {
        self.told.store(true, Ordering::Relaxed);
        self.endpoint.reached();
    }

    /// It never reached the endpoint (refused, unreachable, timed out).
    pub fn failure(&self) {
        self.told.store(true, Ordering::Relaxed);
        self.endpoint.observe(self.started.elapsed(), false);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.told.load(Ordering::Relaxed) {
            // Cancelled, or not the endpoint's doing: a probe may go again.
            self.endpoint.stats().probing = false;
        }
    }
}

impl Endpoint {
    fn new(addr: SocketAddr, now: Instant) -> Self {
        Self {
            addr,
            in_flight: AtomicUsize::new(0),
            inner: Mutex::new(Stats {
                ewma_ns: DEFAULT_RTT.as_nanos() as f64,
                updated: now,
                failures: 0,
                down_until: None,
                backoff: BACKOFF_MIN,
                probing: false,
            }),
            last_used: AtomicU64::new(0),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its load now: latency × (work in flight + 1).
    fn cost(&self, now: Instant) -> f64 {
        let stats = self.stats();
        let age = now.saturating_duration_since(stats.updated).as_secs_f64();
        // With no sample for a while, the average drifts back down.
        let ewma = stats.ewma_ns * (-age / DECAY.as_secs_f64()).exp();
        let floor = DEFAULT_RTT.as_nanos() as f64 / 4.0;
        ewma.max(floor) * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    /// Whether it may get work now; a rested endpoint gets one probe.
    fn available(&self, now: Instant) -> bool {
        let stats = self.stats();
        match stats.down_until {
            None => true,
            Some(until) => now >= until && !stats.probing,
        }
    }

    fn observe(&self, rtt: Duration, ok: bool) {
        let now = Instant::now();
        let mut stats = self.stats();
        stats.probing = false;
        if ok {
            let sample = rtt.as_nanos() as f64;
            let age = now.saturating_duration_since(stats.updated).as_secs_f64();
            let w = (-age / DECAY.as_secs_f64()).exp();
            stats.ewma_ns = if sample > stats.ewma_ns {
                sample
            } else {
                stats.ewma_ns * w + sample * (1.0 - w)
            };
            stats.updated = now;
            stats.failures = 0;
            stats.down_until = None;
            stats.backoff = BACKOFF_MIN;
        } else {
            stats.failures += 1;
            // Resting already: concurrent failures of the same outage do
            // not stretch the rest; a failed probe does.
            let resting = stats.down_until.is_some_and(|until| now < until);
            if stats.failures >= FAILURES_TO_TRIP && !resting {
                let backoff = stats.backoff;
                stats.down_until = Some(now + backoff);
                stats.backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    fn reached(&self) {
        let mut stats = self.stats();
        stats.probing = false;
        stats.failures = 0;
        stats.down_until = None;
        stats.backoff = BACKOFF_MIN;
    }

    /// Whether it rests now (for the admin API and tests).
    pub fn resting(&self) -> bool {
        self.stats()
            .down_until
            .is_some_and(|until| Instant::now() < until)
    }
}

/// Every endpoint's statistics on this node.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
    epoch: Instant,
    rng: AtomicU64,
}

impl Default for Balancer {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self {
            endpoints: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            rng: AtomicU64::new(seed | 1),
        }
    }
}

impl Balancer {
    /// A random number (xorshift; quality is not the point, spread is).
    fn random(&self, below: usize) -> usize {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x % below.max(1) as u64) as usize
    }

    fn endpoint(&self, addr: SocketAddr, now: Instant) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(&addr) {
            return e.clone();
        }
        if map.len() >= MAX_ENDPOINTS {
            self.forget_idle(&mut map, now);
        }
        let e = Arc::new(Endpoint::new(addr, now));
        map.insert(addr, e.clone());
        e
    }

    fn forget_idle(&self, map: &mut HashMap<SocketAddr, Arc<Endpoint>>, now: Instant) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let horizon = FORGET_AFTER.as_millis() as u64;
        map.retain(|_, e| {
            e.in_flight.load(Ordering::Relaxed) > 0
                || now_ms.saturating_sub(e.last_used.load(Ordering::Relaxed)) < horizon
        });
        // Still full: the least recently used go.
        if map.len() >= MAX_ENDPOINTS {
            let mut by_age: Vec<(u64, SocketAddr)> = map
                .iter()
                .map(|(a, e)| (e.last_used.load(Ordering::Relaxed), *a))
                .collect();
            by_age.sort();
            for (_, addr) in by_age.into_iter().take(MAX_ENDPOINTS / 4) {
                map.remove(&addr);
            }
        }
    }

    /// Drops statistics of endpoints unused for a while (called now and
    /// then).
    pub fn tidy(&self) {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        self.forget_idle(&mut map, Instant::now());
    }

    pub fn tracked(&self) -> usize {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Work for the endpoint `addr` itself (a connection already made to
    /// it), unless it rests.
    pub fn choose(&self, addr: SocketAddr) -> Option<InFlight> {
        let now = Instant::now();
        let endpoint = self.endpoint(addr, now);
        if !endpoint.available(now) {
            return None;
        }
        Some(self.start(endpoint, now))
    }

    fn start(&self, chosen: Arc<Endpoint>, now: Instant) -> InFlight {
        {
            let mut stats = chosen.stats();
            if stats.down_until.is_some() {
                stats.probing = true;
            }
        }
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        chosen.last_used.store(
            now.saturating_duration_since(self.epoch).as_millis() as u64,
            Ordering::Relaxed,
        );
        InFlight {
            endpoint: chosen,
            started: now,
            told: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Picks one of `candidates` (minus `exclude`): the cheaper of two
    /// random available ones. When every one rests, the one whose rest
    /// ends first is tried anyway (better a probe than a certain failure).
    pub fn pick(&self, candidates: &[SocketAddr], exclude: &[SocketAddr]) -> Option<InFlight> {
        let now = Instant::now();
        let pool: Vec<Arc<Endpoint>> = candidates
            .iter()
            .filter(|a| !exclude.contains(a))
            .map(|a| self.endpoint(*a, now))
            .collect();
        if pool.is_empty() {
            return None;
        }
        let available: Vec<&Arc<Endpoint>> = pool.iter().filter(|e| e.available(now)).collect();
        let chosen = match available.len() {
            0 => pool
                .iter()
                .min_by_key(|e| e.stats().down_until)
                .cloned()
                .unwrap_or_else(|| pool[0].clone()),
            1 => available[0].clone(),
            n => {
                let a = self.random(n);
                let mut b = self.random(n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (available[a], available[b]);
                if a.cost(now) <= b.cost(now) {
                    a.clone()
                } else {
                    b.clone()
                }
            }
        };
        Some(self.start(chosen, now))
    }
}

#[cfg(test)]
mod tests {
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
            let f = b.pick(&eps, &[]).unwrap();
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
            let f = b.pick(&eps, &[]).unwrap();
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
            let f = b.pick(&eps, &[]).unwrap();
            if f.endpoint().addr == bad {
                f.failure();
                break;
            }
            f.success();
        }
        for _ in 0..100 {
            let f = b.pick(&eps, &[]).unwrap();
            assert_ne!(f.endpoint().addr, bad, "resting endpoints get no work");
            f.success();
        }
        // Alone, it is still tried (a probe beats a certain failure).
        let f = b.pick(&[bad], &[]).unwrap();
        assert_eq!(f.endpoint().addr, bad);
        assert!(f.endpoint().resting());
        f.success();
        assert!(!b.pick(&[bad], &[]).unwrap().endpoint().resting());
    }

    #[test]
    fn excluded_endpoints_are_not_picked() {
        let b = Balancer::default();
        let eps = addrs(2);
        for _ in 0..50 {
            assert_eq!(b.pick(&eps, &[eps[0]]).unwrap().endpoint().addr, eps[1]);
        }
        assert!(b.pick(&eps, &eps).is_none());
        assert!(b.pick(&[], &[]).is_none());
    }
}
