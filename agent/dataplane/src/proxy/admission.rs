//! Admission: the one object every way into the node's proxy takes a
//! ticket from, so that one pod (or one client) over its share is refused
//! its *own* new work while every other pod is served.
//!
//! The node has two budgets: connections open at once (every door:
//! a pod's outbound listener, inbound capture, tunnel streams, same-node
//! deliveries) and HTTP requests in flight. Each served pod gets a share
//! of each — the budget split evenly among the pods served now, never
//! below a floor, or what its `config.nodemesh.io/max-connections` /
//! `max-requests` annotation says (within the budget). Connections into
//! a pod also count against their client (its address: the client pod's
//! for a meshed one, as its node vouches, else the peer's): one client
//! holds at most half of a pod's share, so no single client fills a
//! server's.
//!
//! A ticket is given back when dropped; a refusal says why
//! ([`Refusal`]) and the caller counts it on the pod it refused
//! (`nodemesh_admission_refused_total`) and resets the connection, or
//! answers `503` to the request.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use nodemesh_core::throttle::Throttle;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::warn;

use crate::{state::PodLimits, telemetry::PodTcpMetrics};

pub use crate::telemetry::{Door, Refusal};

/// The smallest share of each budget a pod gets, however many pods the
/// node serves (when the pods outnumber the budget, the node's budget
/// still bounds them all).
pub const FLOOR: usize = 16;

/// The node's budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Connections open at once, every door together.
    pub max_connections: usize,
    /// HTTP requests in flight at once.
    pub max_requests: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    budget: &'static str,
}

/// The node's admission (cheap to clone).
#[derive(Clone, Debug)]
pub struct Admission(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    cfg: AdmissionConfig,
    connections: Gauge,
    requests: Gauge,
    /// Pods holding a share now.
    pods: AtomicUsize,
    /// Connections open per (client address, pod) (an entry goes with its
    /// last connection).
    clients: Mutex<HashMap<(IpAddr, u64), usize>>,
    /// The next pod share's id.
    next_pod: AtomicU64,
    /// Refusals are logged once per door a minute (the rest counted).
    logs: Throttle,
}

/// How often a refusal at each door is logged.
const LOG_WINDOW: Duration = Duration::from_secs(60);

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Self {
        Self(Arc::new(Inner {
            cfg,
            connections: Gauge::default(),
            requests: Gauge::default(),
            pods: AtomicUsize::new(0),
            clients: Mutex::default(),
            next_pod: AtomicU64::new(0),
            logs: Throttle::new(LOG_WINDOW),
        }))
    }

    /// Registers the budgets and what is held of them now.
    pub fn register(&self, registry: &mut Registry) {
        let limit = Family::<BudgetLabels, Gauge>::default();
        for (budget, max) in [
            ("connections", self.0.cfg.max_connections),
            ("requests", self.0.cfg.max_requests),
        ] {
            limit
                .get_or_create(&BudgetLabels { budget })
                .set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        registry.register(
            "admission_limit",
            "The node's budgets: connections open at once, HTTP requests in flight",
            limit,
        );
        registry.register(
            "admission_connections_in_use",
            "Connections holding a slot of the node's budget now",
            self.0.connections.clone(),
        );
        registry.register(
            "admission_requests_in_use",
            "HTTP requests holding a slot of the node's budget now",
            self.0.requests.clone(),
        );
    }

    pub fn config(&self) -> AdmissionConfig {
        self.0.cfg
    }

    /// A share for one served pod, for as long as it is held.
    pub fn pod(&self, limits: PodLimits) -> Arc<PodShare> {
        self.0.pods.fetch_add(1, Ordering::Relaxed);
        Arc::new(PodShare {
            id: self.0.next_pod.fetch_add(1, Ordering::Relaxed),
            admission: self.clone(),
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            limits: Mutex::new(limits),
        })
    }

    /// Connections open now, every door together.
    pub fn connections(&self) -> usize {
        usize::try_from(self.0.connections.get()).unwrap_or(0)
    }

    /// Requests in flight now.
    pub fn requests(&self) -> usize {
        usize::try_from(self.0.requests.get()).unwrap_or(0)
    }

    /// A budget split among the pods served now, with the floor, within
    /// the budget.
    fn fair(&self, budget: usize) -> usize {
        let pods = self.0.pods.load(Ordering::Relaxed).max(1);
        (budget / pods).max(FLOOR).min(budget)
    }

    /// A pod's fair share of the connection budget.
    pub fn fair_connections(&self) -> usize {
        self.fair(self.0.cfg.max_connections)
    }

    /// Takes one from `gauge` under `max`, or gives it back.
    fn take(gauge: &Gauge, max: usize) -> bool {
        let before = gauge.inc();
        if usize::try_from(before).unwrap_or(0) >= max {
            gauge.dec();
            return false;
        }
        true
    }

    fn take_client(&self, client: (IpAddr, u64), share: usize) -> bool {
        let mut clients = self.0.clients.lock().unwrap_or_else(|p| p.into_inner());
        let held = clients.entry(client).or_insert(0);
        if *held >= share {
            if *held == 0 {
                clients.remove(&client);
            }
            return false;
        }
        *held += 1;
        true
    }

    fn give_client(&self, client: (IpAddr, u64)) {
        let mut clients = self.0.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = clients.get_mut(&client) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                clients.remove(&client);
            }
        }
    }

    /// Counts a refusal on the pod it refused (`on`: its series for the
    /// door's direction) and logs it, once per door in a window.
    pub fn refused(
        &self,
        on: Option<&PodTcpMetrics>,
        pod: &str,
        door: Door,
        why: Refusal,
        client: Option<IpAddr>,
    ) {
        if let Some(m) = on {
            m.refused(door, why);
        }
        if let Some(held) = self.0.logs.allow(door.as_str()) {
            warn!(pod, %door, reason = %why, client = ?client, not_logged = held, "refused: over its admission share");
        }
    }

    /// Clients holding connections now (for tests and the soak).
    pub fn clients(&self) -> usize {
        self.0
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// One served pod's share of the node's budgets.
#[derive(Debug)]
pub struct PodShare {
    id: u64,
    admission: Admission,
    connections: AtomicUsize,
    requests: AtomicUsize,
    limits: Mutex<PodLimits>,
}

impl Drop for PodShare {
    fn drop(&mut self) {
        self.admission.0.pods.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PodShare {
    /// The node's admission it is a share of.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Its annotations changed.
    pub fn set_limits(&self, limits: PodLimits) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    fn limits(&self) -> PodLimits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its own idle timeout for opaque relays, if its annotation sets one.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.limits().idle_timeout
    }

    /// Its connection share now.
    pub fn connection_share(&self) -> usize {
        let a = &self.admission;
        self.limits()
            .max_connections
            .map(|n| n.min(a.0.cfg.max_connections))
            .unwrap_or_else(|| a.fair_connections())
    }

    /// What one client may hold of it: half its share, at least the
    /// floor, never more than the share.
    pub fn client_share(&self) -> usize {
        let share = self.connection_share();
        (share / 2).max(FLOOR).min(share)
    }

    /// Its request share now.
    pub fn request_share(&self) -> usize {
        let a = &self.admission;
        self.limits()
            .max_requests
            .map(|n| n.min(a.0.cfg.max_requests))
            .unwrap_or_else(|| a.fair(a.0.cfg.max_requests))
    }

    /// Connections it holds now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requests it holds now.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    fn take_own(count: &AtomicUsize, share: usize) -> bool {
        if count.fetch_add(1, Ordering::AcqRel) >= share {
            count.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// A connection of this pod (`client`: the address it comes from,
    /// for a connection into it).
    pub fn connection(
        self: &Arc<Self>,
        client: Option<IpAddr>,
    ) -> Result<ConnectionTicket, Refusal> {
        let a = &self.admission;
        if !Self::take_own(&self.connections, self.connection_share()) {
            return Err(Refusal::PodShare);
        }
        let client = client.map(|ip| (ip.to_canonical(), self.id));
        if let Some(c) = client
            && !a.take_client(c, self.client_share())
        {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ClientShare);
        }
        if !Admission::take(&a.0.connections, a.0.cfg.max_connections) {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            if let Some(c) = client {
                a.give_client(c);
            }
            return Err(Refusal::NodeBudget);
        }
        Ok(ConnectionTicket {
            pod: self.clone(),
            client,
        })
    }

    /// An HTTP request of this pod.
    pub fn request(self: &Arc<Self>) -> Result<RequestTicket, Refusal> {
        let a = &self.admission;
        if !Self::take_own(&self.requests, self.request_share()) {
            return Err(Refusal::PodShare);
        }
        if !Admission::take(&a.0.requests, a.0.cfg.max_requests) {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::NodeBudget);
        }
        Ok(RequestTicket { pod: self.clone() })
    }
}

/// A connection's slot: in the pod's share, its client's and the node's,
/// until dropped.
#[derive(Debug)]
pub struct ConnectionTicket {
    pod: Arc<PodShare>,
    client: Option<(IpAddr, u64)>,
}

impl Drop for ConnectionTicket {
    fn drop(&mut self) {
        self.pod.connections.fetch_sub(1, Ordering::AcqRel);
        let a = &self.pod.admission;
        a.0.connections.dec();
        if let Some(c) = self.client {
            a.give_client(c);
        }
    }
}

/// A request's slot, until dropped (the response's end).
#[derive(Debug)]
pub struct RequestTicket {
    pod: Arc<PodShare>,
}

impl Drop for RequestTicket {
    fn drop(&mut self) {
        self.pod.requests.fetch_sub(1, Ordering::AcqRel);
        self.pod.admission.0.requests.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(connections: usize, requests: usize) -> Admission {
        Admission::new(AdmissionConfig {
            max_connections: connections,
            max_requests: requests,
        })
    }

    #[test]
    fn shares_follow_the_pods_present_with_a_floor() {
        let a = node(1000, 400);
        let one = a.pod(PodLimits::default());
        assert_eq!(one.connection_share(), 1000);
        assert_eq!(one.request_share(), 400);
        let pods: Vec<_> = (0..9).map(|_| a.pod(PodLimits::default())).collect();
        assert_eq!(one.connection_share(), 100);
        assert_eq!(one.request_share(), 40);
        assert_eq!(one.client_share(), 50);
        drop(pods);
        assert_eq!(one.connection_share(), 1000, "shares grow back as pods go");
        let many: Vec<_> = (0..200).map(|_| a.pod(PodLimits::default())).collect();
        assert_eq!(one.connection_share(), FLOOR);
        assert_eq!(one.client_share(), FLOOR);
        drop(many);
        // Annotations: within the node's budget.
        one.set_limits(PodLimits {
            max_connections: Some(5),
            max_requests: Some(1 << 30),
            idle_timeout: None,
        });
        assert_eq!(one.connection_share(), 5);
        assert_eq!(one.request_share(), 400);
    }

    #[test]
    fn a_pod_over_its_share_is_refused_and_the_others_are_not() {
        let a = node(60, 60);
        let attacked = a.pod(PodLimits::default());
        let victim = a.pod(PodLimits::default());
        let mut held = Vec::new();
        // Many clients fill the attacked pod's share (30), no more.
        let mut refused = None;
        for i in 0..100u8 {
            let client = IpAddr::from([10, 0, 0, i]);
            match attacked.connection(Some(client)) {
                Ok(t) => held.push(t),
                Err(r) => {
                    refused = Some(r);
                    break;
                }
            }
        }
        assert_eq!(held.len(), 30);
        assert_eq!(refused, Some(Refusal::PodShare));
        // The other pod still has all of its own.
        let own: Vec<_> = (0..30).map(|_| victim.connection(None).unwrap()).collect();
        assert_eq!(victim.connection(None).unwrap_err(), Refusal::PodShare);
        assert_eq!(a.connections(), 60);
        drop(own);
        drop(held);
        assert_eq!(a.connections(), 0);
        assert_eq!(attacked.connections(), 0);
        assert_eq!(a.clients(), 0, "no client entry outlives its connections");
    }

    #[test]
    fn one_client_holds_at_most_half_of_a_pods_share() {
        let a = node(100, 100);
        let server = a.pod(PodLimits::default());
        let other = a.pod(PodLimits::default());
        assert_eq!(server.client_share(), 25);
        let attacker = IpAddr::from([10, 0, 0, 1]);
        let held: Vec<_> = (0..25)
            .map(|_| server.connection(Some(attacker)).unwrap())
            .collect();
        assert_eq!(
            server.connection(Some(attacker)).unwrap_err(),
            Refusal::ClientShare
        );
        // IPv4-mapped: the same client.
        assert_eq!(
            server
                .connection(Some("::ffff:10.0.0.1".parse().unwrap()))
                .unwrap_err(),
            Refusal::ClientShare
        );
        assert_eq!(server.connections(), 25, "a refusal holds nothing");
        // Another client of the same pod is served, and the attacker's
        // share of another pod is its own.
        let t = server
            .connection(Some(IpAddr::from([10, 0, 0, 9])))
            .unwrap();
        let u = other.connection(Some(attacker)).unwrap();
        assert_eq!(server.connections(), 26);
        drop((held, t, u));
        assert_eq!(server.connections(), 0);
        assert_eq!(a.connections(), 0);
        assert_eq!(a.clients(), 0);
        // A pod whose annotation sets a small share: the share is the cap.
        let small = a.pod(PodLimits {
            max_connections: Some(4),
            ..PodLimits::default()
        });
        assert_eq!(small.client_share(), 4);
    }

    #[test]
    fn the_node_budget_bounds_pods_beyond_it() {
        // More pods than the budget has floors for: each may take FLOOR,
        // the node still stops at its budget.
        let a = node(40, 40);
        let pods: Vec<_> = (0..4).map(|_| a.pod(PodLimits::default())).collect();
        let mut held = Vec::new();
        for p in &pods[..2] {
            for _ in 0..FLOOR {
                held.push(p.connection(None).unwrap());
            }
        }
        for _ in 0..(40 - 2 * FLOOR) {
            held.push(pods[2].connection(None).unwrap());
        }
        assert_eq!(pods[3].connection(None).unwrap_err(), Refusal::NodeBudget);
        assert_eq!(pods[3].connections(), 0, "a refusal holds nothing");
        let requests: Vec<_> = (0..FLOOR).map(|_| pods[0].request().unwrap()).collect();
        assert_eq!(pods[0].request().unwrap_err(), Refusal::PodShare);
        assert_eq!(a.requests(), FLOOR);
        drop(requests);
        drop(held);
        assert_eq!(a.requests() + a.connections(), 0);
    }

    #[test]
    fn concurrent_takers_never_exceed_a_share() {
        let a = node(10_000, 10);
        let pod = a.pod(PodLimits {
            max_connections: Some(100),
            ..PodLimits::default()
        });
        let held = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (pod, held) = (pod.clone(), held.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if let Ok(t) = pod.connection(None) {
                            held.lock().unwrap().push(t);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(held.lock().unwrap().len(), 100);
        assert_eq!(a.connections(), 100);
        held.lock().unwrap().clear();
        assert_eq!(a.connections(), 0);
    }
}
