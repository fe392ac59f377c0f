//! Guards for the small listeners anyone on the network can reach (the
//! admin port, the tap port, the identity service's ports): connections
//! capped in all and per source address, and TLS handshakes in slots taken
//! after accept, where a new handshake evicts the oldest one (of its own
//! source first) instead of being refused — so idle connections that never
//! finish a handshake cannot keep anyone else out. Every refusal and
//! eviction is counted in `nodemesh_listener_refused_total{listener,
//! reason}`.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::Notify;

use crate::label_values;

label_values! {
    /// Why a listener closed a connection on arrival.
    pub enum ListenerRefusal {
        /// The listener holds its most connections.
        Connections => "connections",
        /// The source address holds its most connections.
        PerSource => "per_source",
        /// A newer handshake took its slot.
        Evicted => "evicted",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    listener: &'static str,
    reason: ListenerRefusal,
}

/// The refusals of every guarded listener of a process.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    refused: Family<Labels, Counter>,
}

impl ListenerMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "listener_refused",
            "Connections a guarded listener closed on arrival (caps) or in its handshake (evicted by a newer one)",
            m.refused.clone(),
        );
        m
    }

    fn count(&self, listener: &'static str, reason: ListenerRefusal) {
        self.refused
            .get_or_create(&Labels { listener, reason })
            .inc();
    }
}

/// A listener's caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsConfig {
    /// Connections open at once.
    pub connections: usize,
    /// Connections open at once from one address.
    pub per_source: usize,
    /// TLS handshakes at once (a newer one evicts the oldest).
    pub handshakes: usize,
    /// TLS handshakes at once from one address (a newer one evicts that
    /// address's oldest).
    pub handshakes_per_source: usize,
}

impl CapsConfig {
    /// For a port that a few clients use now and then (admin, tap).
    pub const SMALL: Self = Self {
        connections: 256,
        per_source: 64,
        handshakes: 64,
        handshakes_per_source: 8,
    };
    /// For a port every agent of the cluster uses (the identity service).
    pub const CLUSTER: Self = Self {
        connections: 4096,
        per_source: 64,
        handshakes: 256,
        handshakes_per_source: 8,
    };
}

/// One listener's guard (cheap to clone).
#[derive(Clone, Debug)]
pub struct Guard(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    name: &'static str,
    cfg: CapsConfig,
    metrics: ListenerMetrics,
    open: Mutex<Open>,
    handshakes: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

#[derive(Debug, Default)]
struct Slots {
    next: u64,
    /// Oldest first.
    order: VecDeque<(u64, IpAddr)>,
    evict: HashMap<u64, Arc<Notify>>,
    by_source: HashMap<IpAddr, usize>,
}

impl Guard {
    pub fn new(name: &'static str, cfg: CapsConfig, metrics: ListenerMetrics) -> Self {
        Self(Arc::new(Inner {
            name,
            cfg,
            metrics,
            open: Mutex::default(),
            handshakes: Mutex::default(),
        }))
    }

    /// A slot for a connection from `peer` just accepted, held while it is
    /// open; `None` (counted): close it.
    pub fn connection(&self, peer: IpAddr) -> Option<Connection> {
        let peer = canonical(peer);
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        let reason = if open.total >= self.0.cfg.connections {
            Some(ListenerRefusal::Connections)
        } else if open.by_source.get(&peer).copied().unwrap_or(0) >= self.0.cfg.per_source {
            Some(ListenerRefusal::PerSource)
        } else {
            None
        };
        if let Some(reason) = reason {
            drop(open);
            self.0.metrics.count(self.0.name, reason);
            return None;
        }
        open.total += 1;
        *open.by_source.entry(peer).or_insert(0) += 1;
        Some(Connection {
            guard: self.clone(),
            peer,
        })
    }

    /// A handshake slot for `peer`, evicting the oldest handshake (of
    /// `peer` first) when the slots are full.
    pub fn handshake(&self, peer: IpAddr) -> Handshake {
        let peer = canonical(peer);
        let cfg = self.0.cfg;
        let mut slots = self.0.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let mine = slots.by_source.get(&peer).copied().unwrap_or(0);
        let victim = if mine >= cfg.handshakes_per_source {
            slots
                .order
                .iter()
                .find(|(_, p)| *p == peer)
                .map(|(id, _)| *id)
        } else if slots.order.len() >= cfg.handshakes {
            slots.order.front().map(|(id, _)| *id)
        } else {
            None
        };
        if let Some(id) = victim {
            slots.remove(id);
            if let Some(n) = slots.evict.remove(&id) {
                n.notify_one();
            }
            self.0.metrics.count(self.0.name, ListenerRefusal::Evicted);
        }
        let id = slots.next;
        slots.next += 1;
        slots.order.push_back((id, peer));
        *slots.by_source.entry(peer).or_insert(0) += 1;
        let evicted = Arc::new(Notify::new());
        slots.evict.insert(id, evicted.clone());
        Handshake {
            guard: self.clone(),
            id,
            evicted,
        }
    }

    /// Connections open now, and handshakes in progress.
    pub fn counts(&self) -> (usize, usize) {
        let open = self.0.open.lock().unwrap_or_else(|p| p.into_inner()).total;
        let hs = self
            .0
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .len();
        (open, hs)
    }
}

impl Slots {
    fn remove(&mut self, id: u64) {
        if let Some(at) = self.order.iter().position(|(i, _)| *i == id)
            && let Some((_, peer)) = self.order.remove(at)
            && let Some(n) = self.by_source.get_mut(&peer)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&peer);
            }
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A connection's slot, until dropped.
#[derive(Debug)]
pub struct Connection {
    guard: Guard,
    peer: IpAddr,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut open = self.guard.0.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_source.remove(&self.peer);
            }
        }
    }
}

/// A handshake's slot, until dropped (the handshake is over).
#[derive(Debug)]
pub struct Handshake {
    guard: Guard,
    id: u64,
    evicted: Arc<Notify>,
}

impl Handshake {
    /// Resolves when a newer handshake took this one's slot: give up.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut slots = self
            .guard
            .0
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        slots.remove(self.id);
        slots.evict.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn guard(cfg: CapsConfig) -> (Guard, ListenerMetrics) {
        let metrics = ListenerMetrics::default();
        (Guard::new("test", cfg, metrics.clone()), metrics)
    }

    fn refused(m: &ListenerMetrics, reason: ListenerRefusal) -> u64 {
        m.refused
            .get_or_create(&Labels {
                listener: "test",
                reason,
            })
            .get()
    }

    const CFG: CapsConfig = CapsConfig {
        connections: 10,
        per_source: 4,
        handshakes: 6,
        handshakes_per_source: 3,
    };

    #[test]
    fn connections_are_capped_in_all_and_per_source() {
        let (g, m) = guard(CFG);
        let a = IpAddr::from([10, 0, 0, 1]);
        let held: Vec<_> = (0..4).map(|_| g.connection(a).unwrap()).collect();
        assert!(g.connection(a).is_none(), "a fifth from one address");
        // An IPv4-mapped address is the same source.
        assert!(g.connection("::ffff:10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(refused(&m, ListenerRefusal::PerSource), 2);
        let others: Vec<_> = (1..=6u8)
            .map(|i| g.connection(IpAddr::from([10, 0, 1, i])).unwrap())
            .collect();
        assert!(g.connection(IpAddr::from([10, 0, 2, 1])).is_none());
        assert_eq!(refused(&m, ListenerRefusal::Connections), 1);
        drop((held, others));
        assert_eq!(g.counts(), (0, 0));
        assert!(g.connection(a).is_some());
    }

    #[tokio::test]
    async fn a_new_handshake_evicts_the_oldest_of_its_source_then_of_all() {
        let (g, m) = guard(CFG);
        let attacker = IpAddr::from([10, 0, 0, 1]);
        let first = g.handshake(attacker);
        let _more: Vec<_> = (0..2).map(|_| g.handshake(attacker)).collect();
        // The attacker's fourth takes its own oldest's slot.
        let _fourth = g.handshake(attacker);
        tokio::time::timeout(Duration::from_secs(1), first.evicted())
            .await
            .expect("the attacker's oldest handshake is evicted");
        drop(first);
        assert_eq!(g.counts().1, 3);
        // Many attackers fill every slot: a newcomer evicts the oldest of
        // all, and is never refused.
        let others: Vec<_> = (1..=3u8)
            .map(|i| g.handshake(IpAddr::from([10, 0, 1, i])))
            .collect();
        assert_eq!(g.counts().1, 6);
        let newcomer = g.handshake(IpAddr::from([192, 168, 0, 1]));
        assert_eq!(g.counts().1, 6);
        assert_eq!(refused(&m, ListenerRefusal::Evicted), 2);
        drop((newcomer, others));
        assert_eq!(g.counts().1, 2);
    }
}
