//! Live requests for `nodemesh tap`: the HTTP paths publish each request's
//! start, response head and end — only while someone listens (no cost
//! otherwise) — and each reader gets the ones its filter wants, sampled to
//! its `max_rps`. Bounded: [`CAPACITY`] events in flight; a reader that
//! falls behind is told how many it missed, and the data path never waits
//! for it. Never header values or bodies.
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use nodemesh_core::wire::{TapEvent, TapFilter, TapPeer};
use tokio::sync::broadcast;

/// Events buffered for readers.
pub const CAPACITY: usize = 1024;
/// Sampled requests a reader remembers (to pass their `rsp`/`end` on).
const REMEMBERED: usize = 10_000;

/// The hub (cheap to clone).
#[derive(Clone, Debug)]
pub struct Tap {
    tx: broadcast::Sender<Arc<TapEvent>>,
    ids: Arc<AtomicU64>,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            tx: broadcast::Sender::new(CAPACITY),
            ids: Arc::default(),
        }
    }
}

impl Tap {
    /// Starts a request's events, if anyone listens; `ends` (source,
    /// destination) is only worked out then — nothing is spent per request
    /// while nobody taps.
    pub fn start(
        &self,
        direction: &str,
        ends: impl FnOnce() -> (TapPeer, TapPeer),
        tls: bool,
        req: &hyper::Request<hyper::body::Incoming>,
    ) -> Option<Tapped> {
        if self.tx.receiver_count() == 0 {
            return None;
        }
        let (src, dst) = ends();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(hyper::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        Some(Tapped {
            tap: self.clone(),
            started: Instant::now(),
            event: TapEvent {
                kind: "req".into(),
                id: self.ids.fetch_add(1, Ordering::Relaxed),
                direction: direction.into(),
                src,
                dst,
                tls,
                method: req.method().to_string(),
                authority,
                path: req.uri().path().to_owned(),
                ..TapEvent::default()
            },
        })
    }

    pub fn subscribe(&self, filter: TapFilter) -> Reader {
        Reader {
            rx: self.tx.subscribe(),
            filter,
            wanted: HashSet::new(),
            second: Instant::now(),
            this_second: 0,
        }
    }
}

/// One request being tapped.
#[derive(Debug)]
pub struct Tapped {
    tap: Tap,
    started: Instant,
    event: TapEvent,
}

impl Tapped {
    /// Its destination, once chosen (a Service's endpoint).
    pub fn to(&mut self, dst: TapPeer, tls: bool) {
        self.event.dst = dst;
        self.event.tls = tls;
    }

    /// The same request as the server's side sees it (a pod on this node,
    /// reached through the agent once: one agent, both sides), under an id
    /// of its own.
    pub fn server_side(&self) -> Tapped {
        let mut event = self.event.clone();
        event.kind = "req".into();
        event.direction = "inbound".into();
        event.id = self.tap.ids.fetch_add(1, Ordering::Relaxed);
        Tapped {
            tap: self.tap.clone(),
            started: self.started,
            event,
        }
    }

    pub fn is_server_side(&self) -> bool {
        self.event.direction == "inbound"
    }

    /// The request goes out.
    pub fn sent(&self) {
        let _ = self.tap.tx.send(Arc::new(self.event.clone()));
    }

    /// Its response's head.
    pub fn response(&mut self, status: u16, grpc_status: Option<u32>) {
        self.event.kind = "rsp".into();
        self.event.status = Some(status);
        self.event.grpc_status = grpc_status;
        self.event.latency_us = Some(self.started.elapsed().as_micros() as u64);
        let _ = self.tap.tx.send(Arc::new(self.event.clone()));
    }

    /// Its end: `bytes` of response body; the gRPC status from trailers.
    pub fn end(mut self, bytes: u64, grpc_status: Option<u32>) {
        self.event.kind = "end".into();
        self.event.latency_us = None;
        self.event.grpc_status = grpc_status.or(self.event.grpc_status);
        self.event.duration_us = Some(self.started.elapsed().as_micros() as u64);
        self.event.response_bytes = Some(bytes);
        let _ = self.tap.tx.send(Arc::new(self.event));
    }
}

/// One reader's view.
pub struct Reader {
    rx: broadcast::Receiver<Arc<TapEvent>>,
    filter: TapFilter,
    /// Requests sampled in: their later events pass.
    wanted: HashSet<u64>,
    second: Instant,
    this_second: u32,
}

impl Reader {
    /// The next event this reader wants; `None` once the hub is gone.
    pub async fn next(&mut self) -> Option<Arc<TapEvent>> {
        loop {
            let event = match self.rx.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some(Arc::new(TapEvent {
                        kind: "dropped".into(),
                        count: Some(n),
                        ..TapEvent::default()
                    }));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            match event.kind.as_str() {
                "req" => {
                    if !self.filter.matches(&event) || !self.admit() {
                        continue;
                    }
                    if self.wanted.len() >= REMEMBERED {
                        self.wanted.clear();
                    }
                    self.wanted.insert(event.id);
                    return Some(event);
                }
                "end" if self.wanted.remove(&event.id) => return Some(event),
                _ if self.wanted.contains(&event.id) => return Some(event),
                _ => {}
            }
        }
    }

    /// Sampling: at most `max_rps` requests a second.
    fn admit(&mut self) -> bool {
        let Some(max) = self.filter.max_rps else {
            return true;
        };
        if self.second.elapsed().as_secs() >= 1 {
            self.second = Instant::now();
            self.this_second = 0;
        }
        self.this_second += 1;
        self.this_second <= max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str) -> TapEvent {
        TapEvent {
            kind: "req".into(),
            direction: "outbound".into(),
            path: path.into(),
            ..TapEvent::default()
        }
    }

    #[tokio::test]
    async fn a_reader_gets_the_requests_it_asked_for_with_their_ends() {
        let tap = Tap::default();
        let mut reader = tap.subscribe(TapFilter {
            path_prefix: Some("/api".into()),
            ..TapFilter::default()
        });
        for (id, path) in [(1, "/other"), (2, "/api/x")] {
            let t = Tapped {
                tap: tap.clone(),
                started: Instant::now(),
                event: TapEvent {
                    id,
                    ..request(path)
                },
            };
            t.sent();
            let mut t = t;
            t.response(200, None);
            t.end(5, None);
        }
        let kinds: Vec<(String, u64)> = [
            reader.next().await.unwrap(),
            reader.next().await.unwrap(),
            reader.next().await.unwrap(),
        ]
        .iter()
        .map(|e| (e.kind.clone(), e.id))
        .collect();
        assert_eq!(
            kinds,
            [("req".into(), 2), ("rsp".into(), 2), ("end".into(), 2)]
        );
    }

    #[tokio::test]
    async fn a_slow_reader_is_told_what_it_missed() {
        let tap = Tap::default();
        let mut reader = tap.subscribe(TapFilter::default());
        for _ in 0..(CAPACITY + 10) {
            let _ = tap.tx.send(Arc::new(request("/")));
        }
        let first = reader.next().await.unwrap();
        assert_eq!(first.kind, "dropped");
        assert_eq!(first.count, Some(10));
    }
}
