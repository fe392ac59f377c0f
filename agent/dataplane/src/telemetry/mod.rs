//! Telemetry: the proxy's per-pod TCP families and why connections fail.
//! Each component registers its own metrics under the `nodemesh_` prefix
//! (label sets shared with other processes are in `nodemesh_core::labels`);
//! `admin` serves the registry. Nothing here knows where pods come from.
//!
//! Series are per pod and direction (bounded by the pods on the node), and
//! removed when a pod stops being captured.
pub mod http;
pub mod stats;
pub mod tap;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use nodemesh_core::{
    label_values,
    labels::{PodLabels, Tls},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

label_values! {
    /// Why the proxy could not reach a connection's destination.
    pub enum ConnectError {
        /// The destination refused (RST): nothing listens there.
        Refused => "refused",
        /// No route to the destination host or network.
        Unreachable => "unreachable",
        /// No answer within the connect timeout.
        Timeout => "timeout",
        /// The connection's original destination was not recorded by eBPF.
        NoOriginalDestination => "no_original_destination",
        /// The mutual-TLS tunnel to the destination's node failed (see
        /// `nodemesh_tunnel_errors_total` for why).
        Tunnel => "tunnel",
        /// A Service with no ready endpoint, or none that could be reached.
        NoEndpoints => "no_endpoints",
        /// The destination pod (or this node) is over its admission share.
        Overloaded => "overloaded",
        /// Anything else.
        Other => "other",
    }
}

label_values! {
    /// Where a refused entry came in.
    pub enum Door {
        /// A connection from the pod's app, on its outbound listener.
        Outbound => "outbound",
        /// A connection inbound capture handed over (plaintext clients).
        Inbound => "inbound",
        /// A stream of the tunnel from another node.
        Tunnel => "tunnel",
        /// A connection from a meshed pod on this node to this pod.
        Local => "local",
        /// An HTTP request (or HTTP/2 stream).
        Request => "request",
    }
}

label_values! {
    /// Why an entry was refused.
    pub enum Refusal {
        /// The pod holds its whole share.
        PodShare => "pod_share",
        /// The client holds its whole share of this node.
        ClientShare => "client_share",
        /// The node's budget is spent (every pod together).
        NodeBudget => "node_budget",
    }
}

/// The labels an admission refusal is counted under.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    #[prometheus(flatten)]
    pod: PodLabels,
    door: Door,
    reason: Refusal,
}

impl ConnectError {
    pub fn classify(e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Self::Refused,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                Self::Unreachable
            }
            Some(libc::ETIMEDOUT) => Self::Timeout,
            _ if e.kind() == std::io::ErrorKind::TimedOut => Self::Timeout,
            _ => Self::Other,
        }
    }
}

label_values! {
    /// Why an inbound connection to a meshed pod was refused.
    pub enum InboundDenial {
        /// The policy wants mutual TLS; the client is not meshed.
        Unauthenticated => "unauthenticated",
        /// Plaintext from outside the cluster's pods and nodes.
        OutsideCluster => "outside_cluster",
        /// The policy lets nobody in.
        Denied => "denied",
        /// `AuthorizationPolicy` objects select the pod and port, and none
        /// of them allows this client.
        Unauthorized => "unauthorized",
        /// Someone in the pod dialled the agent's own inbound listener
        /// (on loopback) instead of an app: never delivered.
        AgentPort => "agent_port",
    }
}

label_values! {
    /// Which of the agent's TLS endpoints a handshake was on.
    pub enum TlsEndpoint {
        /// A tunnel connection another node dialled.
        TunnelInbound => "tunnel_inbound",
        /// A tunnel connection this node dialled.
        TunnelOutbound => "tunnel_outbound",
        /// The tap port (the identity service reading this node).
        TapPort => "tap_port",
        /// This agent asking the identity service for certificates.
        IdentityService => "identity_service",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KxLabels {
    endpoint: TlsEndpoint,
    /// The key exchange group negotiated (`X25519MLKEM768`: the
    /// post-quantum hybrid every nodemesh endpoint prefers).
    group: String,
}

/// TLS handshakes by endpoint and negotiated key exchange: the proof that
/// the post-quantum hybrid is what is in use, not just offered.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    handshakes: Family<KxLabels, Counter>,
}

impl TlsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed, by endpoint and negotiated key exchange group",
            m.handshakes.clone(),
        );
        m
    }

    /// Counts a completed handshake of `conn`.
    pub fn handshake<D>(&self, endpoint: TlsEndpoint, conn: &rustls::ConnectionCommon<D>) {
        // A closed set: the provider's groups (`pki::provider`).
        let group = conn
            .negotiated_key_exchange_group()
            .map_or_else(|| "none".to_owned(), |g| format!("{:?}", g.name()));
        self.handshakes
            .get_or_create(&KxLabels { endpoint, group })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    #[prometheus(flatten)]
    pod: PodLabels,
    reason: InboundDenial,
}

/// Distinct peer identities kept per pod and direction in the peer series;
/// connections with more peers than that count as `peer_identity="other"`.
pub const MAX_PEERS_PER_POD: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    #[prometheus(flatten)]
    pod: PodLabels,
    tls: Tls,
    /// The other end's SPIFFE ID; empty when it has none (not meshed).
    peer_identity: String,
}

/// What the pods with one label set share: how many hold it (a replaced
/// pod and its successor can carry the same name for a while), and its
/// peer series, looked up without allocating on every connection and
/// created once per new peer.
#[derive(Debug, Default)]
struct PodSeries {
    holders: usize,
    /// Indexed by `tls as usize`; keyed by peer identity ("" for none).
    by_tls: [HashMap<String, Counter>; 2],
    /// The last holder let go: nothing is counted any more.
    released: bool,
}

type Shared = Arc<Mutex<PodSeries>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectErrorLabels {
    #[prometheus(flatten)]
    pod: PodLabels,
    reason: ConnectError,
}

/// The proxy's TCP families.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    open: Family<PodLabels, Counter>,
    close: Family<PodLabels, Counter>,
    open_now: Family<PodLabels, Gauge>,
    sent: Family<PodLabels, Counter>,
    received: Family<PodLabels, Counter>,
    connect_errors: Family<ConnectErrorLabels, Counter>,
    peers: Family<PeerLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    /// Who holds which label set.
    holders: Arc<Mutex<HashMap<PodLabels, Shared>>>,
}

impl TcpMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            open: Family::default(),
            close: Family::default(),
            open_now: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            connect_errors: Family::default(),
            peers: Family::default(),
            denied: Family::default(),
            refused: Family::default(),
            holders: Arc::default(),
        };
        registry.register(
            "admission_refused",
            "Connections and requests refused because the pod, its client or the node was over its share, by door and reason",
            m.refused.clone(),
        );
        registry.register(
            "inbound_denied",
            "Connections to a meshed pod its inbound policy refused, by reason",
            m.denied.clone(),
        );
        registry.register(
            "tcp_open",
            "TCP connections the proxy accepted for a meshed pod",
            m.open.clone(),
        );
        registry.register(
            "tcp_close",
            "TCP connections the proxy finished for a meshed pod",
            m.close.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "TCP connections open through the proxy now",
            m.open_now.clone(),
        );
        registry.register_with_unit(
            "tcp_sent",
            "Bytes the meshed pod sent through the proxy",
            prometheus_client::registry::Unit::Bytes,
            m.sent.clone(),
        );
        registry.register_with_unit(
            "tcp_received",
            "Bytes the proxy delivered to the meshed pod",
            prometheus_client::registry::Unit::Bytes,
            m.received.clone(),
        );
        registry.register(
            "tcp_connect_errors",
            "Connections the proxy could not make to their destination, by reason",
            m.connect_errors.clone(),
        );
        registry.register(
            "tcp_peer_open",
            "TCP connections the proxy accepted for a meshed pod, by TLS and the peer's SPIFFE identity",
            m.peers.clone(),
        );
        m
    }

    /// Handles for one pod and direction, so the hot path never hashes
    /// labels. Each call is paired with one [`PodTcpMetrics::remove`].
    pub fn pod(&self, labels: PodLabels) -> PodTcpMetrics {
        let series = self
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(labels.clone())
            .or_default()
            .clone();
        series.lock().unwrap_or_else(|p| p.into_inner()).holders += 1;
        PodTcpMetrics {
            open: self.open.get_or_create_owned(&labels),
            close: self.close.get_or_create_owned(&labels),
            open_now: self.open_now.get_or_create_owned(&labels),
            sent: self.sent.get_or_create_owned(&labels),
            received: self.received.get_or_create_owned(&labels),
            families: self.clone(),
            series,
            labels,
        }
    }
}

/// One pod's TCP counters.
#[derive(Clone, Debug)]
pub struct PodTcpMetrics {
    labels: PodLabels,
    open: Counter,
    close: Counter,
    open_now: Gauge,
    /// Bytes the pod sent (read from its socket).
    pub sent: Counter,
    /// Bytes delivered to the pod (written to its socket).
    pub received: Counter,
    families: TcpMetrics,
    series: Shared,
}

impl PodTcpMetrics {
    pub fn labels(&self) -> &PodLabels {
        &self.labels
    }

    /// Connections opened so far, and open now.
    pub fn counts(&self) -> (u64, u64) {
        (self.open.get(), self.open_now.get().max(0) as u64)
    }

    /// Counts a connection as open until the guard drops.
    pub fn open(&self) -> OpenGuard {
        self.open.inc();
        self.open_now.inc();
        OpenGuard {
            close: self.close.clone(),
            open_now: self.open_now.clone(),
        }
    }

    /// Counts a connection by TLS state and peer identity (bounded: see
    /// [`MAX_PEERS_PER_POD`]).
    pub fn peer_open(&self, tls: bool, peer: Option<&str>) {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if series.released {
            return;
        }
        let known: usize = series.by_tls.iter().map(HashMap::len).sum();
        let by_peer = &mut series.by_tls[usize::from(tls)];
        let mut peer = peer.unwrap_or_default();
        if !by_peer.contains_key(peer) && known >= MAX_PEERS_PER_POD {
            peer = "other";
        }
        if let Some(counter) = by_peer.get(peer) {
            counter.inc();
            return;
        }
        let counter = self.families.peers.get_or_create_owned(&PeerLabels {
            pod: self.labels.clone(),
            tls: Tls::from(tls),
            peer_identity: peer.to_owned(),
        });
        counter.inc();
        by_peer.insert(peer.to_owned(), counter);
    }

    /// Lets go of this pod's series; the last holder of its label set
    /// removes them all, in every family.
    pub fn remove(&self) {
        let peers = {
            let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
            series.holders = series.holders.saturating_sub(1);
            if series.holders > 0 || series.released {
                return;
            }
            series.released = true;
            std::mem::take(&mut series.by_tls)
        };
        let f = &self.families;
        let labels = &self.labels;
        {
            let mut holders = f.holders.lock().unwrap_or_else(|p| p.into_inner());
            if holders
                .get(labels)
                .is_some_and(|s| Arc::ptr_eq(s, &self.series))
            {
                holders.remove(labels);
            }
        }
        f.open.remove(labels);
        f.close.remove(labels);
        f.open_now.remove(labels);
        f.sent.remove(labels);
        f.received.remove(labels);
        for (tls, by_peer) in [false, true].into_iter().zip(peers) {
            for peer_identity in by_peer.into_keys() {
                f.peers.remove(&PeerLabels {
                    pod: labels.clone(),
                    tls: Tls::from(tls),
                    peer_identity,
                });
            }
        }
        for &reason in ConnectError::ALL {
            f.connect_errors.remove(&ConnectErrorLabels {
                pod: labels.clone(),
                reason,
            });
        }
        for &reason in InboundDenial::ALL {
            f.denied.remove(&DeniedLabels {
                pod: labels.clone(),
                reason,
            });
        }
        for &door in Door::ALL {
            for &reason in Refusal::ALL {
                f.refused.remove(&RefusedLabels {
                    pod: labels.clone(),
                    door,
                    reason,
                });
            }
        }
    }

    /// The last holder let go of the series: nothing is counted any more.
    fn released(&self) -> bool {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .released
    }

    /// Counts a connection or request admission refused.
    pub fn refused(&self, door: Door, reason: Refusal) {
        if self.released() {
            return;
        }
        self.families
            .refused
            .get_or_create(&RefusedLabels {
                pod: self.labels.clone(),
                door,
                reason,
            })
            .inc();
    }

    /// Counts an inbound connection the policy refused.
    pub fn denied(&self, reason: InboundDenial) {
        if self.released() {
            return;
        }
        self.families
            .denied
            .get_or_create(&DeniedLabels {
                pod: self.labels.clone(),
                reason,
            })
            .inc();
    }

    pub fn connect_error(&self, reason: ConnectError) {
        if self.released() {
            return;
        }
        self.families
            .connect_errors
            .get_or_create(&ConnectErrorLabels {
                pod: self.labels.clone(),
                reason,
            })
            .inc();
    }
}

/// Counts the close of a connection when dropped, whatever path ends it.
#[derive(Debug)]
pub struct OpenGuard {
    close: Counter,
    open_now: Gauge,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.close.inc();
        self.open_now.dec();
    }
}

#[cfg(test)]
mod tests {
    use nodemesh_core::{
        admin::encode,
        labels::{Direction, PREFIX},
    };

    use super::*;

    #[test]
    fn guards_count_open_and_close_and_series_can_be_removed() {
        let mut registry = Registry::with_prefix(PREFIX);
        let tcp = TcpMetrics::new(&mut registry);
        let labels = PodLabels {
            namespace: "demo".into(),
            workload_kind: "deployment".into(),
            workload_name: "web".into(),
            pod: "client".into(),
            serviceaccount: "web".into(),
            direction: Direction::Outbound,
        };
        let pod = tcp.pod(labels.clone());
        {
            let _conn = pod.open();
            pod.sent.inc_by(5);
            let text = encode(&registry).unwrap();
            assert!(text.contains(
                r#"nodemesh_tcp_open_connections{namespace="demo",workload_kind="deployment",workload_name="web",pod="client",serviceaccount="web",direction="outbound"} 1"#
            ), "{text}");
        }
        pod.connect_error(ConnectError::Refused);
        pod.peer_open(true, Some("spiffe://cluster.local/ns/demo/sa/db"));
        let text = encode(&registry).unwrap();
        for line in [
            r#"nodemesh_tcp_open_total{namespace="demo",workload_kind="deployment",workload_name="web",pod="client",serviceaccount="web",direction="outbound"} 1"#,
            r#"nodemesh_tcp_close_total{namespace="demo",workload_kind="deployment",workload_name="web",pod="client",serviceaccount="web",direction="outbound"} 1"#,
            r#"nodemesh_tcp_open_connections{namespace="demo",workload_kind="deployment",workload_name="web",pod="client",serviceaccount="web",direction="outbound"} 0"#,
            r#"nodemesh_tcp_sent_bytes_total{namespace="demo",workload_kind="deployment",workload_name="web",pod="client",serviceaccount="web",direction="outbound"} 5"#,
            r#"nodemesh_tcp_connect_errors_total{namespace="demo",workload_kind="deployment",workload_name="web",pod="client",serviceaccount="web",direction="outbound",reason="refused"} 1"#,
            r#"nodemesh_tcp_peer_open_total{namespace="demo",workload_kind="deployment",workload_name="web",pod="client",serviceaccount="web",direction="outbound",tls="true",peer_identity="spiffe://cluster.local/ns/demo/sa/db"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        pod.remove();
        let text = encode(&registry).unwrap();
        assert!(!text.contains("pod=\"client\""), "{text}");
    }

    #[test]
    fn peer_series_are_bounded_per_pod() {
        let mut registry = Registry::with_prefix(PREFIX);
        let tcp = TcpMetrics::new(&mut registry);
        let labels = PodLabels {
            namespace: "demo".into(),
            workload_kind: "pod".into(),
            workload_name: "p".into(),
            pod: "p".into(),
            serviceaccount: "default".into(),
            direction: Direction::Inbound,
        };
        let pod = tcp.pod(labels.clone());
        for i in 0..MAX_PEERS_PER_POD + 10 {
            pod.peer_open(true, Some(&format!("spiffe://td/ns/n/sa/s{i}")));
        }
        let text = encode(&registry).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("nodemesh_tcp_peer_open_total{"))
            .count();
        assert_eq!(series, MAX_PEERS_PER_POD + 1, "{text}");
        assert!(text.contains(r#"peer_identity="other"} 10"#), "{text}");
        pod.remove();
        let text = encode(&registry).unwrap();
        assert!(!text.contains("nodemesh_tcp_peer_open_total{"), "{text}");
    }

    #[test]
    fn a_label_set_two_pods_hold_goes_with_the_last_and_stays_gone() {
        let mut registry = Registry::with_prefix(PREFIX);
        let tcp = TcpMetrics::new(&mut registry);
        let labels = PodLabels {
            namespace: "demo".into(),
            workload_kind: "statefulset".into(),
            workload_name: "db".into(),
            pod: "db-0".into(),
            serviceaccount: "db".into(),
            direction: Direction::Inbound,
        };
        // The old db-0 is terminating while its successor is captured.
        let old = tcp.pod(labels.clone());
        let new = tcp.pod(labels.clone());
        old.peer_open(true, Some("spiffe://td/ns/demo/sa/web"));
        old.remove();
        new.peer_open(true, Some("spiffe://td/ns/demo/sa/web"));
        let text = encode(&registry).unwrap();
        assert!(
            text.contains(r#"peer_identity="spiffe://td/ns/demo/sa/web"} 2"#),
            "{text}"
        );
        assert!(text.contains("nodemesh_tcp_open_total{"), "{text}");
        new.remove();
        // A late connection of a released pod counts nowhere.
        new.peer_open(false, None);
        new.connect_error(ConnectError::Refused);
        let text = encode(&registry).unwrap();
        assert!(!text.contains("pod=\"db-0\""), "{text}");
    }

    #[test]
    fn connect_errors_are_classified() {
        let e = |code| std::io::Error::from_raw_os_error(code);
        assert_eq!(
            ConnectError::classify(&e(libc::ECONNREFUSED)),
            ConnectError::Refused
        );
        assert_eq!(
            ConnectError::classify(&e(libc::EHOSTUNREACH)),
            ConnectError::Unreachable
        );
        assert_eq!(
            ConnectError::classify(&e(libc::ETIMEDOUT)),
            ConnectError::Timeout
        );
        assert_eq!(ConnectError::classify(&e(libc::EPERM)), ConnectError::Other);
    }
}
