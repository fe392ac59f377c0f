//! Choosing among a Service's endpoints: nearest first, then power of two
//! choices over peak-EWMA latency × (in flight + 1), as linkerd2-proxy
//! does, with failure accrual. One [`Balancer`] per node holds every
//! endpoint's statistics (by address), shared by every client pod and
//! Service, for connections and, once detected, requests.
//!
//! - **Locality**: a Service's endpoints come in tiers, nearest first
//!   (on this node; in this node's zone when the Service prefers close
//!   ones; all). Work goes to the nearest tier with an endpoint that is
//!   not resting and not overloaded: its choice has at most [`OVERLOAD`]
//!   times the work in flight of the next tier's, and answers at most
//!   [`SLOWER`] times slower than that one was last seen to (its estimate
//!   fading over [`FARTHER_DECAY`] there: an idle endpoint elsewhere is
//!   not taken for a faster one because nobody asked it lately).
//! - **Alike**: latencies within [`ALIKE`] of each other are equal, and
//!   the work in flight decides between them.
//! - **P2C in O(1)**: two random endpoints of a tier are looked at, not
//!   every one; only when most of them rest are they all scanned.
//! - **Peak EWMA**: a sample above the average replaces it at once (a slow
//!   endpoint is noticed on its first slow answer); below, the average
//!   moves toward it with a [`DECAY`] time constant, and an estimate nobody
//!   refreshes fades with the same constant — a peak cannot keep work
//!   away from an endpoint for more than a few seconds. An endpoint never
//!   measured counts as fast (it is tried, then known), so a measured one
//!   cannot pin the work while it sits unknown.
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
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Latencies below this are alike (the noise of a host's scheduling); an
/// endpoint never measured counts as this fast.
const FLOOR: Duration = Duration::from_micros(1250);
/// How fast the average forgets a peak, and an unrefreshed estimate fades.
pub const DECAY: Duration = Duration::from_secs(1);
/// A nearer tier's choice is passed over when it has more than this many
/// times the work in flight of the next tier's choice ...
pub const OVERLOAD: f64 = 2.0;
/// ... or answers more than this many times slower.
pub const SLOWER: f64 = 4.0;
/// How slowly the estimate of a farther endpoint fades for that
/// comparison.
pub const FARTHER_DECAY: Duration = Duration::from_secs(30);
/// Latency estimates within this factor of each other are alike: between
/// them, the work in flight decides (noise of a millisecond must not send
/// every sequential request to one endpoint for a second).
pub const ALIKE: f64 = 2.0;
/// Random draws of two a tier gets before its endpoints are all scanned.
const DRAWS: usize = 4;
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
                ewma_ns: FLOOR.as_nanos() as f64,
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

    fn latency(&self, now: Instant) -> f64 {
        self.stats().estimate(now)
    }

    /// Work in flight + 1.
    fn load(&self) -> f64 {
        (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    /// Whether it, a nearer endpoint, is to be passed over for `farther`
    /// now: more than [`OVERLOAD`] times its work, or [`SLOWER`] times its
    /// latency.
    /// The farther one's latency is what it was last seen at, fading only
    /// over [`FARTHER_DECAY`]: an estimate faded for want of samples is
    /// no evidence that it is faster (with the quick fade, every idle
    /// endpoint elsewhere would look fast after a second, and take a
    /// request from a healthy slow-by-nature Service here each time).
    fn overloaded(&self, farther: &Endpoint, now: Instant) -> bool {
        self.load() > OVERLOAD * farther.load()
            || self.latency(now) > SLOWER * farther.stats().estimate_over(now, FARTHER_DECAY)
    }

    /// Whether it is no worse a choice than `other` now: by cost, unless
    /// their latencies are alike ([`ALIKE`]), then by work in flight.
    fn no_worse_than(&self, other: &Endpoint, now: Instant) -> bool {
        let (a, b) = (self.latency(now), other.latency(now));
        if a <= b * ALIKE && b <= a * ALIKE {
            self.load() <= other.load()
        } else {
            a * self.load() <= b * other.load()
        }
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
        self.observe_at(rtt, ok, Instant::now());
    }

    fn observe_at(&self, rtt: Duration, ok: bool, now: Instant) {
        let mut stats = self.stats();
        stats.probing = false;
        if ok {
            let sample = (rtt.as_nanos() as f64).max(FLOOR.as_nanos() as f64);
            // From where the estimate has faded to since its last sample.
            let faded = stats.estimate(now);
            let age = now.saturating_duration_since(stats.updated).as_secs_f64();
            let w = (-age / DECAY.as_secs_f64()).exp();
            stats.ewma_ns = if sample > faded {
                sample
            } else {
                faded * w + sample * (1.0 - w)
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

impl Stats {
    /// The latency estimate at `now`: the average, faded toward the floor
    /// for the time it went unrefreshed.
    fn estimate(&self, now: Instant) -> f64 {
        self.estimate_over(now, DECAY)
    }

    /// The same, faded with `decay`.
    fn estimate_over(&self, now: Instant, decay: Duration) -> f64 {
        let age = now.saturating_duration_since(self.updated).as_secs_f64();
        let floor = FLOOR.as_nanos() as f64;
        floor + (self.ewma_ns - floor).max(0.0) * (-age / decay.as_secs_f64()).exp()
    }
}

/// Every endpoint's statistics on this node.
#[derive(Debug)]
pub struct Balancer {
    endpoints: RwLock<HashMap<SocketAddr, Arc<Endpoint>>>,
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
            endpoints: RwLock::new(HashMap::new()),
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
        if let Some(e) = self
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
        {
            return e.clone();
        }
        let mut map = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
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
        let mut map = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        self.forget_idle(&mut map, Instant::now());
    }

    pub fn tracked(&self) -> usize {
        self.endpoints
            .read()
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

    /// Picks an endpoint of `tiers` (minus `exclude`): each tier's
    /// choice is the cheaper of two random available ones, and the nearest
    /// tier's choice is taken unless it is overloaded against the next's
    /// (the last tier holds every endpoint). When every one rests, the one
    /// whose rest ends first is tried anyway (better a probe than a
    /// certain failure).
    pub fn pick(&self, tiers: &[&[SocketAddr]], exclude: &[SocketAddr]) -> Option<InFlight> {
        self.pick_at(tiers, exclude, Instant::now())
    }

    fn pick_at(
        &self,
        tiers: &[&[SocketAddr]],
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<InFlight> {
        let mut chosen: Option<Arc<Endpoint>> = None;
        for tier in tiers.iter().filter(|t| !t.is_empty()) {
            let Some(candidate) = self.p2c(tier, exclude, now) else {
                continue;
            };
            match &chosen {
                Some(nearer) if !nearer.overloaded(&candidate, now) => break,
                _ => chosen = Some(candidate),
            }
        }
        let chosen = match chosen {
            Some(e) => e,
            None => self.soonest_back(tiers.last()?, exclude, now)?,
        };
        Some(self.start(chosen, now))
    }

    /// The cheaper of two random available endpoints of `tier`, not in
    /// `exclude`: a few draws of two, then a scan when they keep missing.
    fn p2c(
        &self,
        tier: &[SocketAddr],
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<Arc<Endpoint>> {
        let usable = |addr: SocketAddr| {
            (!exclude.contains(&addr))
                .then(|| self.endpoint(addr, now))
                .filter(|e| e.available(now))
        };
        if tier.len() == 1 {
            return usable(tier[0]);
        }
        for _ in 0..DRAWS {
            let a = self.random(tier.len());
            let mut b = self.random(tier.len() - 1);
            if b >= a {
                b += 1;
            }
            match (usable(tier[a]), usable(tier[b])) {
                (Some(a), Some(b)) => {
                    return Some(if a.no_worse_than(&b, now) { a } else { b });
                }
                (Some(one), None) | (None, Some(one)) => return Some(one),
                (None, None) => {}
            }
        }
        let available: Vec<Arc<Endpoint>> = tier.iter().filter_map(|a| usable(*a)).collect();
        match available.len() {
            0 => None,
            1 => available.into_iter().next(),
            n => {
                let a = &available[self.random(n)];
                let b = &available[self.random(n)];
                Some(if a.no_worse_than(b, now) { a } else { b }.clone())
            }
        }
    }

    /// Of `tier` (minus `exclude`), all resting: the one whose rest ends
    /// first.
    fn soonest_back(
        &self,
        tier: &[SocketAddr],
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<Arc<Endpoint>> {
        tier.iter()
            .filter(|a| !exclude.contains(a))
            .map(|a| self.endpoint(*a, now))
            .min_by_key(|e| e.stats().down_until)
    }
}

#[cfg(test)]
mod tests;
