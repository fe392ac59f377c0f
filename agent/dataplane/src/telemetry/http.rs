//! Golden request metrics: requests, responses (status, gRPC status,
//! success or failure) and response latency, on both sides of a request:
//! `outbound` (at the client's proxy: per source workload and destination
//! workload and Service) and `inbound` (at the server's: per server
//! workload and client identity), by TLS and protocol.
//!
//! Bounded: series are per *workload* of a served pod, not per pod; each
//! keeps at most [`MAX_DESTINATIONS`] peer label sets (more count as
//! `other`); its series go when its last served pod does; the latency
//! histogram has [`BUCKETS`] buckets.
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nodemesh_core::{
    label_values,
    labels::Direction,
    wire::{StatKey, WorkloadRef},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{stats::Stats, tap::Tap};

/// Destination label sets kept per source workload.
pub const MAX_DESTINATIONS: usize = 64;
/// Latency buckets, seconds: sub-millisecond to ten seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

label_values! {
    /// What carried the request.
    pub enum Protocol {
        Http1 => "http1",
        H2 => "h2",
        /// HTTP/2 with `content-type: application/grpc`.
        Grpc => "grpc",
    }
}

label_values! {
    /// What detection concluded for a connection.
    pub enum Detected {
        /// HTTP/1.x: a method and a space.
        Http1 => "http1",
        /// The HTTP/2 preface (gRPC included).
        H2 => "h2",
        /// A TLS ClientHello: relayed as bytes.
        Tls => "tls",
        /// Anything else the client sent first: relayed as bytes.
        Opaque => "opaque",
        /// The server spoke first: relayed as bytes.
        ServerFirst => "server_first",
        /// Nobody spoke within the detect timeout: relayed as bytes.
        Timeout => "timeout",
        /// Opaque by configuration (a port, an annotation, `appProtocol`).
        Configured => "configured",
    }
}

label_values! {
    /// Whether a response counts as a success.
    pub enum Classification {
        Success => "success",
        /// 5xx, a gRPC status other than OK, or made by the proxy.
        Failure => "failure",
    }
}

/// A workload, as the labels name it.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub serviceaccount: String,
}

/// Where a request went.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Destination {
    /// The destination pod's workload; empty when it is not a known pod.
    pub workload: Workload,
    /// `namespace/name:port` of the Service dialled, or empty.
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    direction: Direction,
    namespace: String,
    workload_kind: String,
    workload_name: String,
    serviceaccount: String,
    dst_namespace: String,
    dst_workload_kind: String,
    dst_workload_name: String,
    dst_serviceaccount: String,
    dst_service: String,
    /// Inbound: the client's SPIFFE ID (empty: not authenticated).
    client_id: String,
    tls: String,
    protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectLabels {
    direction: Direction,
    result: Detected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    #[prometheus(flatten)]
    request: RequestLabels,
    status_code: String,
    grpc_status: String,
    classification: Classification,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

type Latency = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// What one source workload has made.
#[derive(Debug, Default)]
struct Source {
    holders: usize,
    series: HashMap<RequestLabels, Arc<Series>>,
    responses: HashSet<ResponseLabels>,
}

/// (status code, gRPC status, failure): what a response's series adds to
/// its request's.
type ResponseKey = (u16, Option<u32>, bool);

/// One request label set's series, resolved once and shared by its
/// requests: finding them by label set (thirteen strings compared per
/// lookup, several lookups and clones per request) took a tenth of the
/// agent's CPU under load. A series released meanwhile (its workload's
/// last pod gone) is no longer exported: what its requests still count
/// reaches only the windows, which forget it in their own time.
#[derive(Debug)]
struct Series {
    holder: Workload,
    labels: RequestLabels,
    requests: Counter,
    /// Made with its first measured response (a request that never got
    /// one makes no latency series).
    latency: std::sync::OnceLock<Histogram>,
    /// Its responses' counters, by [`ResponseKey`] (a few).
    responses: Mutex<Vec<(ResponseKey, Counter)>>,
    /// Its key in the windows (`/v1/stat`).
    stat_key: StatKey,
}

/// The request families.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: Latency,
    detected: Family<DetectLabels, Counter>,
    sources: Arc<Mutex<HashMap<Workload, Source>>>,
    /// The same requests over sliding windows (`/v1/stat`).
    stats: Stats,
    /// Live requests (`/v1/tap`).
    tap: Tap,
}

impl HttpMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(histogram as fn() -> Histogram),
            detected: Family::default(),
            sources: Arc::default(),
            stats: Stats::default(),
            tap: Tap::default(),
        };
        registry.register(
            "protocol_detect",
            "Connections of meshed pods by direction and what detection concluded (node-wide)",
            m.detected.clone(),
        );
        registry.register(
            "request",
            "HTTP requests (HTTP/2 streams) the proxy carried for a meshed pod",
            m.requests.clone(),
        );
        registry.register(
            "response",
            "Responses, by status code, gRPC status and classification (5xx, gRPC errors and proxy errors are failures)",
            m.responses.clone(),
        );
        registry.register_with_unit(
            "response_latency",
            "Time from a request to its response's head",
            prometheus_client::registry::Unit::Seconds,
            m.latency.clone(),
        );
        m
    }

    /// Where live requests are published.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The windowed view of the same requests.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Counts what detection concluded for one connection.
    pub fn detected(&self, direction: Direction, result: Detected) {
        self.detected
            .get_or_create(&DetectLabels { direction, result })
            .inc();
    }

    /// A served pod of `workload` starts making requests; paired with one
    /// [`HttpMetrics::release`].
    pub fn hold(&self, workload: &Workload) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.entry(workload.clone()).or_default().holders += 1;
    }

    /// The last pod of `workload` let go: its series go.
    pub fn release(&self, workload: &Workload) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let Some(source) = sources.get_mut(workload) else {
            return;
        };
        source.holders = source.holders.saturating_sub(1);
        if source.holders > 0 {
            return;
        }
        if let Some(source) = sources.remove(workload) {
            for labels in source.series.keys() {
                self.requests.remove(labels);
                self.latency.remove(labels);
            }
            for labels in &source.responses {
                self.responses.remove(labels);
            }
        }
    }

    /// One request of `source` to `dst`: counted now; its response counted
    /// with [`Request::response`].
    pub fn request(
        &self,
        source: &Workload,
        dst: &Destination,
        tls: bool,
        protocol: Protocol,
    ) -> Option<Request> {
        let labels = RequestLabels {
            direction: Direction::Outbound,
            namespace: source.namespace.clone(),
            workload_kind: source.kind.clone(),
            workload_name: source.name.clone(),
            serviceaccount: source.serviceaccount.clone(),
            dst_namespace: dst.workload.namespace.clone(),
            dst_workload_kind: dst.workload.kind.clone(),
            dst_workload_name: dst.workload.name.clone(),
            dst_serviceaccount: dst.workload.serviceaccount.clone(),
            dst_service: dst.service.clone(),
            client_id: String::new(),
            tls: tls.to_string(),
            protocol,
        };
        self.count(source, labels)
    }

    /// One request to a pod of `server` (a served pod) from `client` (its
    /// SPIFFE ID; `None`: not authenticated), at the server's edge.
    pub fn inbound_request(
        &self,
        server: &Workload,
        client: Option<&str>,
        tls: bool,
        protocol: Protocol,
    ) -> Option<Request> {
        let labels = RequestLabels {
            direction: Direction::Inbound,
            namespace: server.namespace.clone(),
            workload_kind: server.kind.clone(),
            workload_name: server.name.clone(),
            serviceaccount: server.serviceaccount.clone(),
            dst_namespace: String::new(),
            dst_workload_kind: String::new(),
            dst_workload_name: String::new(),
            dst_serviceaccount: String::new(),
            dst_service: String::new(),
            client_id: client.unwrap_or_default().to_owned(),
            tls: tls.to_string(),
            protocol,
        };
        self.count(server, labels)
    }

    /// Counts a request in `holder`'s series (capped: see
    /// [`MAX_DESTINATIONS`]).
    fn count(&self, holder: &Workload, mut labels: RequestLabels) -> Option<Request> {
        let series = {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            // A pod no longer served: nothing is counted.
            let src = sources.get_mut(holder).filter(|s| s.holders > 0)?;
            match src.series.get(&labels) {
                Some(series) => series.clone(),
                None => {
                    if src.series.len() >= MAX_DESTINATIONS {
                        let other = |s: &mut String| {
                            if !s.is_empty() {
                                *s = "other".into();
                            }
                        };
                        other(&mut labels.dst_namespace);
                        other(&mut labels.dst_workload_kind);
                        other(&mut labels.dst_workload_name);
                        other(&mut labels.dst_serviceaccount);
                        other(&mut labels.dst_service);
                        other(&mut labels.client_id);
                        if labels.direction == Direction::Outbound {
                            labels.dst_workload_name = "other".into();
                        }
                    }
                    src.series
                        .entry(labels)
                        .or_insert_with_key(|labels| Arc::new(self.series(holder, labels)))
                        .clone()
                }
            }
        };
        series.requests.inc();
        Some(Request {
            metrics: self.clone(),
            series,
            latency_us: AtomicU64::new(u64::MAX),
        })
    }

    /// The series of `labels`, made or found in the families.
    fn series(&self, holder: &Workload, labels: &RequestLabels) -> Series {
        Series {
            holder: holder.clone(),
            requests: self.requests.get_or_create(labels).clone(),
            latency: std::sync::OnceLock::new(),
            responses: Mutex::default(),
            stat_key: StatKey {
                direction: labels.direction.as_str().to_owned(),
                workload: WorkloadRef {
                    namespace: labels.namespace.clone(),
                    kind: labels.workload_kind.clone(),
                    name: labels.workload_name.clone(),
                    serviceaccount: labels.serviceaccount.clone(),
                },
                peer: WorkloadRef {
                    namespace: labels.dst_namespace.clone(),
                    kind: labels.dst_workload_kind.clone(),
                    name: labels.dst_workload_name.clone(),
                    serviceaccount: labels.dst_serviceaccount.clone(),
                },
                peer_identity: labels.client_id.clone(),
            },
            labels: labels.clone(),
        }
    }
}

/// A counted request.
#[derive(Debug)]
pub struct Request {
    metrics: HttpMetrics,
    series: Arc<Series>,
    /// Its latency once known (`u64::MAX`: not yet), for the windows.
    latency_us: AtomicU64,
}

impl Request {
    /// Its response's head arrived after `latency`.
    pub fn latency(&self, latency: Duration) {
        self.latency_us.store(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX - 1),
            Ordering::Relaxed,
        );
        let histogram = match self.series.latency.get() {
            Some(h) => h,
            None => {
                let Some(h) = self.latency_series() else {
                    return;
                };
                self.series.latency.get_or_init(|| h)
            }
        };
        histogram.observe(latency.as_secs_f64());
    }

    /// Its series' latency histogram, made now (none if the series'
    /// workload let go).
    fn latency_series(&self) -> Option<Histogram> {
        let sources = self
            .metrics
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        sources.get(&self.series.holder).filter(|s| s.holders > 0)?;
        // Made under the lock: a release cannot slip in between.
        Some(
            self.metrics
                .latency
                .get_or_create(&self.series.labels)
                .clone(),
        )
    }

    /// Its response ended: `status` (0 when the proxy made none), the gRPC
    /// status if any, and whether the proxy made it.
    pub fn response(&self, status: u16, grpc_status: Option<u32>, proxy_error: bool) {
        let failure = proxy_error || status >= 500 || grpc_status.is_some_and(|s| s != 0);
        let key = (status, grpc_status, failure);
        let cached = self
            .series
            .responses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, c)| c.clone());
        let counter = match cached {
            Some(c) => c,
            None => {
                let Some(c) = self.response_series(status, grpc_status, failure) else {
                    return;
                };
                self.series
                    .responses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((key, c.clone()));
                c
            }
        };
        counter.inc();
        let latency_ms = match self.latency_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(us as f64 / 1000.0),
        };
        self.metrics.stats.record(
            &self.series.stat_key,
            !failure,
            self.series.labels.tls == "true",
            latency_ms,
        );
    }

    /// The first response of its kind in this series: its counter, made
    /// and kept for release (none if the series' workload let go).
    fn response_series(
        &self,
        status: u16,
        grpc_status: Option<u32>,
        failure: bool,
    ) -> Option<Counter> {
        let labels = ResponseLabels {
            request: self.series.labels.clone(),
            status_code: status.to_string(),
            // The 17 codes gRPC defines; anything else is one value.
            grpc_status: grpc_status
                .map(|s| {
                    if s <= 16 {
                        s.to_string()
                    } else {
                        "other".into()
                    }
                })
                .unwrap_or_default(),
            classification: if failure {
                Classification::Failure
            } else {
                Classification::Success
            },
        };
        let mut sources = self
            .metrics
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let src = sources
            .get_mut(&self.series.holder)
            .filter(|s| s.holders > 0)?;
        // Made under the lock: a release cannot slip in between.
        let counter = self.metrics.responses.get_or_create(&labels).clone();
        src.responses.insert(labels);
        Some(counter)
    }
}

#[cfg(test)]
mod tests {
    use nodemesh_core::{admin::encode, labels::PREFIX};

    use super::*;

    fn workload(name: &str) -> Workload {
        Workload {
            namespace: "shop".into(),
            kind: "deployment".into(),
            name: name.into(),
            serviceaccount: name.into(),
        }
    }

    #[test]
    fn requests_and_responses_are_counted_and_classified() {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = HttpMetrics::new(&mut registry);
        let web = workload("web");
        m.hold(&web);
        let dst = Destination {
            workload: workload("api"),
            service: "shop/api:80".into(),
        };
        for status in [200, 200, 503] {
            let r = m.request(&web, &dst, true, Protocol::Http1).unwrap();
            r.latency(Duration::from_millis(2));
            r.response(status, None, false);
        }
        let r = m.request(&web, &dst, true, Protocol::Grpc).unwrap();
        r.response(200, Some(14), false);
        let text = encode(&registry).unwrap();
        assert!(text.contains(r#"nodemesh_request_total{direction="outbound",namespace="shop",workload_kind="deployment",workload_name="web",serviceaccount="web",dst_namespace="shop",dst_workload_kind="deployment",dst_workload_name="api",dst_serviceaccount="api",dst_service="shop/api:80",client_id="",tls="true",protocol="http1"} 3"#), "{text}");
        assert!(
            text.contains(r#"status_code="200",grpc_status="",classification="success"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"status_code="503",grpc_status="",classification="failure"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"protocol="grpc",status_code="200",grpc_status="14",classification="failure"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("nodemesh_response_latency_seconds_bucket"),
            "{text}"
        );
        m.release(&web);
        let text = encode(&registry).unwrap();
        assert!(!text.contains("workload_name=\"web\""), "released: {text}");
        assert!(m.request(&web, &dst, true, Protocol::Http1).is_none());
    }

    #[test]
    fn destinations_per_source_are_capped() {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = HttpMetrics::new(&mut registry);
        let web = workload("web");
        m.hold(&web);
        for i in 0..(MAX_DESTINATIONS + 10) {
            let dst = Destination {
                workload: workload(&format!("api-{i}")),
                service: String::new(),
            };
            m.request(&web, &dst, false, Protocol::Http1).unwrap();
        }
        let text = encode(&registry).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("nodemesh_request_total{"))
            .count();
        assert_eq!(series, MAX_DESTINATIONS + 1, "{text}");
        assert!(text.contains(r#"dst_workload_name="other""#));
    }

    #[test]
    fn a_released_workloads_series_go_and_are_not_brought_back() {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = HttpMetrics::new(&mut registry);
        let web = workload("web");
        let dst = Destination {
            workload: workload("api"),
            service: String::new(),
        };
        let count = |registry: &Registry| {
            let text = encode(registry).unwrap();
            text.lines()
                .filter(|l| {
                    l.starts_with("nodemesh_request_total{")
                        || l.starts_with("nodemesh_response_total{")
                        || l.starts_with("nodemesh_response_latency_seconds_count{")
                })
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
        };
        m.hold(&web);
        for _ in 0..2 {
            let r = m.request(&web, &dst, true, Protocol::Http1).unwrap();
            r.latency(Duration::from_millis(1));
            r.response(200, None, false);
        }
        // One series each (requests, responses, latency), counted twice.
        assert_eq!(count(&registry), ["2", "2", "2"]);
        // In flight when the workload's last pod goes.
        let late = m.request(&web, &dst, true, Protocol::Http1).unwrap();
        m.release(&web);
        assert!(count(&registry).is_empty());
        late.latency(Duration::from_millis(1));
        late.response(503, None, false);
        assert!(count(&registry).is_empty(), "not brought back");
        assert!(m.request(&web, &dst, true, Protocol::Http1).is_none());
        // Held again: from zero.
        m.hold(&web);
        let r = m.request(&web, &dst, true, Protocol::Http1).unwrap();
        r.response(200, None, false);
        assert_eq!(count(&registry), ["1", "1"]);
    }
}
