//! Golden metrics over sliding windows, kept in the agent so `nodemesh
//! stat` needs no Prometheus: per workload, direction and peer, requests,
//! successes, TLS share and a latency histogram with the fixed buckets of
//! [`LATENCY_BOUNDS_MS`] (so agents' answers add up exactly); per workload
//! and direction, TCP connections and bytes.
//!
//! Windows: the last 10 s and 1 m come from 1-second slots (60 kept), the
//! last 10 m from 10-second slots (60 kept). Bounded: at most
//! [`MAX_SERIES`] request series (more fold into `peer="other"` of their
//! workload), each at most 120 slots of 24 counters (~27 KiB): under 14 MiB
//! however busy the node; series with nothing in 10 minutes go.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Instant,
};

use nodemesh_core::wire::{
    Golden, LATENCY_BOUNDS_MS, STAT_WINDOWS, StatKey, StatReport, StatRow, TcpRow, TcpStat,
    WorkloadRef,
};

/// Request series kept at most.
pub const MAX_SERIES: usize = 512;
/// Seconds per slot of the fine and the coarse ring, and slots kept.
const FINE: u64 = 1;
const COARSE: u64 = 10;
const SLOTS: usize = 60;

/// Slots of something that adds up.
#[derive(Debug)]
struct Ring<T> {
    width: u64,
    slots: VecDeque<(u64, T)>,
}

impl<T: Default> Ring<T> {
    fn new(width: u64) -> Self {
        Self {
            width,
            slots: VecDeque::new(),
        }
    }

    /// The slot for second `now`, made if needed; old ones go.
    fn at(&mut self, now: u64) -> &mut T {
        let start = now - now % self.width;
        if self.slots.back().is_none_or(|(s, _)| *s != start) {
            self.slots.push_back((start, T::default()));
        }
        let horizon = self.width * SLOTS as u64;
        while self.slots.front().is_some_and(|(s, _)| s + horizon <= now) {
            self.slots.pop_front();
        }
        let last = self.slots.len() - 1;
        &mut self.slots[last].1
    }

    /// The slots that overlap the last `secs` seconds.
    fn since(&self, now: u64, secs: u64) -> impl Iterator<Item = &T> {
        let from = now.saturating_sub(secs);
        self.slots
            .iter()
            .filter(move |(s, _)| s + self.width > from)
            .map(|(_, t)| t)
    }

    fn is_stale(&self, now: u64) -> bool {
        self.slots
            .back()
            .is_none_or(|(s, _)| s + self.width * SLOTS as u64 <= now)
    }
}

#[derive(Debug)]
struct Series {
    fine: Ring<Golden>,
    coarse: Ring<Golden>,
}

/// Cumulative TCP counts of one workload and direction, sampled.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpSample {
    pub pods: u64,
    pub open: u64,
    pub opened: u64,
    pub sent: u64,
    pub received: u64,
}

#[derive(Debug)]
struct TcpSeries {
    fine: Ring<TcpSample>,
    coarse: Ring<TcpSample>,
    last: TcpSample,
    /// The second of its first sample: its counts started from zero then
    /// (what came before that sample counts in a window that holds it).
    born: u64,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    requests: HashMap<StatKey, Series>,
    tcp: HashMap<(String, WorkloadRef), TcpSeries>,
}

/// The store (cheap to clone).
#[derive(Clone, Debug)]
pub struct Stats(Arc<Mutex<Inner>>);

impl Default for Stats {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Inner {
            start: Instant::now(),
            requests: HashMap::new(),
            tcp: HashMap::new(),
        })))
    }
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request's outcome (`latency_ms`: `None` when no response came).
    pub fn record(&self, key: &StatKey, success: bool, tls: bool, latency_ms: Option<f64>) {
        let mut inner = self.lock();
        let now = inner.start.elapsed().as_secs();
        let inner = &mut *inner;
        // Found without a copy of the key (every request); a new series
        // past the cap counts as `other`.
        let series = match inner.requests.get_mut(key) {
            Some(series) => series,
            None => {
                let key = if inner.requests.len() >= MAX_SERIES {
                    StatKey {
                        peer: WorkloadRef {
                            name: "other".into(),
                            ..WorkloadRef::default()
                        },
                        peer_identity: String::new(),
                        ..key.clone()
                    }
                } else {
                    key.clone()
                };
                inner.requests.entry(key).or_insert_with(|| Series {
                    fine: Ring::new(FINE),
                    coarse: Ring::new(COARSE),
                })
            }
        };
        for ring in [&mut series.fine, &mut series.coarse] {
            let slot = ring.at(now);
            match latency_ms {
                Some(ms) => slot.record(success, tls, ms),
                None => slot.record_unmeasured(success, tls),
            }
        }
    }

    /// The TCP counters of every workload and direction now (cumulative;
    /// the agent samples them once a second).
    pub fn sample_tcp(&self, samples: HashMap<(String, WorkloadRef), TcpSample>) {
        let mut inner = self.lock();
        let now = inner.start.elapsed().as_secs();
        for (key, sample) in samples {
            let s = inner.tcp.entry(key).or_insert_with(|| TcpSeries {
                fine: Ring::new(FINE),
                coarse: Ring::new(COARSE),
                last: sample,
                born: now,
            });
            // The first sample of a slot is its start.
            if s.fine.slots.back().is_none_or(|(t, _)| *t != now) {
                *s.fine.at(now) = sample;
            }
            if s.coarse
                .slots
                .back()
                .is_none_or(|(t, _)| *t != now - now % COARSE)
            {
                *s.coarse.at(now) = sample;
            }
            s.last = sample;
        }
        inner
            .tcp
            .retain(|_, s| !s.fine.is_stale(now) || !s.coarse.is_stale(now));
        inner
            .requests
            .retain(|_, s| !s.fine.is_stale(now) || !s.coarse.is_stale(now));
    }

    /// What the last `window` (one of [`STAT_WINDOWS`]) held.
    pub fn report(&self, node: &str, window: &str) -> Option<StatReport> {
        let secs = STAT_WINDOWS.iter().find(|(w, _)| *w == window)?.1;
        let inner = self.lock();
        let now = inner.start.elapsed().as_secs();
        let fine = secs <= FINE * SLOTS as u64;
        let mut requests: Vec<StatRow> = inner
            .requests
            .iter()
            .filter_map(|(key, s)| {
                let ring = if fine { &s.fine } else { &s.coarse };
                let mut golden = Golden::default();
                for g in ring.since(now, secs) {
                    golden.merge(g);
                }
                (golden.requests > 0).then(|| StatRow {
                    key: key.clone(),
                    golden,
                })
            })
            .collect();
        requests.sort_by(|a, b| a.key.cmp(&b.key));
        let mut tcp: Vec<TcpRow> = inner
            .tcp
            .iter()
            .map(|((direction, workload), s)| {
                let ring = if fine { &s.fine } else { &s.coarse };
                // Born in the window: from zero (else the connections of a
                // pod's first second were never counted).
                let first = if s.born + secs > now {
                    TcpSample::default()
                } else {
                    ring.since(now, secs).next().copied().unwrap_or(s.last)
                };
                let d = |now: u64, then: u64| now.saturating_sub(then);
                TcpRow {
                    direction: direction.clone(),
                    workload: workload.clone(),
                    pods: s.last.pods,
                    tcp: TcpStat {
                        open: s.last.open,
                        opened: d(s.last.opened, first.opened),
                        sent_bytes: d(s.last.sent, first.sent),
                        received_bytes: d(s.last.received, first.received),
                    },
                }
            })
            .filter(|r| r.pods > 0 || r.tcp.opened > 0)
            .collect();
        tcp.sort_by(|a, b| (&a.direction, &a.workload).cmp(&(&b.direction, &b.workload)));
        Some(StatReport {
            node: node.to_owned(),
            window_secs: secs,
            latency_bounds_ms: LATENCY_BOUNDS_MS.to_vec(),
            requests,
            tcp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(peer: &str) -> StatKey {
        StatKey {
            direction: "outbound".into(),
            workload: WorkloadRef {
                namespace: "shop".into(),
                kind: "deployment".into(),
                name: "web".into(),
                serviceaccount: "web".into(),
            },
            peer: WorkloadRef {
                namespace: "shop".into(),
                kind: "deployment".into(),
                name: peer.into(),
                serviceaccount: String::new(),
            },
            peer_identity: String::new(),
        }
    }

    #[test]
    fn every_window_sees_what_just_happened() {
        let stats = Stats::default();
        for i in 0..10 {
            stats.record(&key("api"), i != 0, true, Some(2.0));
        }
        for window in ["10s", "1m", "10m"] {
            let r = stats.report("node-a", window).unwrap();
            assert_eq!(r.requests.len(), 1, "{window}");
            let g = &r.requests[0].golden;
            assert_eq!((g.requests, g.successes, g.tls), (10, 9, 10), "{window}");
            assert_eq!(g.quantile_ms(0.5), Some(2.0));
        }
        assert!(stats.report("node-a", "5m").is_none(), "not a window");
    }

    #[test]
    fn series_are_bounded() {
        let stats = Stats::default();
        for i in 0..(MAX_SERIES + 20) {
            stats.record(&key(&format!("api-{i}")), true, false, Some(1.0));
        }
        let r = stats.report("n", "10s").unwrap();
        assert_eq!(r.requests.len(), MAX_SERIES + 1);
        let other = r
            .requests
            .iter()
            .find(|row| row.key.peer.name == "other")
            .unwrap();
        assert_eq!(other.golden.requests, 20);
    }

    #[test]
    fn a_new_workloads_first_connections_count() {
        let stats = Stats::default();
        let w = WorkloadRef {
            namespace: "shop".into(),
            kind: "deployment".into(),
            name: "api".into(),
            serviceaccount: "api".into(),
        };
        let sample = |opened| TcpSample {
            pods: 1,
            open: 1,
            opened,
            sent: 10 * opened,
            received: 0,
        };
        let key = ("inbound".to_owned(), w);
        // Its first sample already holds 3 connections (made before it).
        stats.sample_tcp(HashMap::from([(key.clone(), sample(3))]));
        stats.sample_tcp(HashMap::from([(key, sample(4))]));
        for window in ["10s", "1m", "10m"] {
            let r = stats.report("n", window).unwrap();
            assert_eq!(r.tcp[0].tcp.opened, 4, "{window}");
            assert_eq!(r.tcp[0].tcp.sent_bytes, 40, "{window}");
        }
    }

    #[test]
    fn rings_keep_their_horizon() {
        let mut ring: Ring<u64> = Ring::new(10);
        *ring.at(0) += 1;
        *ring.at(5) += 1;
        *ring.at(15) += 1;
        assert_eq!(ring.since(25, 10).sum::<u64>(), 1, "the slot 10..20 only");
        assert_eq!(ring.since(15, 600).sum::<u64>(), 3);
        *ring.at(700) += 1;
        assert_eq!(ring.slots.len(), 1, "older than 600 s gone");
    }
}
