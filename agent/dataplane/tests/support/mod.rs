//! A two-node cluster in one process for the proxy's tests: each node a
//! state store, a certificate store signing with a CA made here, and the
//! real proxy, built from `ProxyInputs` the way the agent builds it, with
//! a connector and original destinations injected so everything runs on
//! 127.0.0.1 without root.
#![allow(dead_code)] // each test file uses some of it

pub mod http;

use self::http::HttpServer;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use nodemesh_core::{
    admin::encode,
    identity::{Identity, SpiffeId},
    names::{MeshLabel, PodUid},
    pki::{self, Signer},
};
use nodemesh_dataplane::{
    identity::{CertStore, LocalIssuer, client::roots},
    netns::Netns,
    proxy::{
        Admission, AdmissionConfig, Connector, Drain, OrigDsts, PodHandle, Proxy, ProxyConfig,
        ProxyInputs, ProxyMetrics,
        connect::connect_with_timeout,
        inbound::InboundConfig,
        tunnel::{OpenError, TunnelConfig, TunnelMetrics, TunnelPool},
    },
    state::{
        CgroupRef, EndpointInfo, ObjectKey, PodInfo, PodLimits, ServiceInfo, ServicePort,
        SliceInfo, StateStore, Workload,
    },
};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_util::sync::CancellationToken;

const TRUST_DOMAIN: &str = "cluster.local";
const TUNNEL_PORT: u16 = 15008;
const NODES: [(&str, &str); 2] = [("node-a", "192.168.0.1"), ("node-b", "192.168.0.2")];

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// Where the "cluster" addresses really are: on loopback.
type AddressMap = Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>;

/// Dials the loopback address a cluster address stands for (or the
/// address itself when it stands for nothing).
struct LoopbackConnector(AddressMap);

impl Connector for LoopbackConnector {
    fn connect(
        &self,
        _from: Option<&Arc<Netns>>,
        dst: SocketAddr,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        let real = self.0.lock().unwrap().get(&dst).copied().unwrap_or(dst);
        connect_with_timeout(TcpSocket::new_v4(), real, Duration::from_secs(2))
    }
}

/// Original destinations by the client's port, as a test dials.
#[derive(Default)]
struct Recorded(Mutex<HashMap<u16, SocketAddr>>);

impl OrigDsts for Recorded {
    fn key(&self, conn: &TcpStream) -> Option<u64> {
        Some(conn.peer_addr().ok()?.port().into())
    }

    fn take(&self, port: u64) -> Option<SocketAddr> {
        self.0.lock().unwrap().remove(&(port as u16))
    }
}

/// One node: its state, certificates, proxy and served pods.
pub struct Node {
    state: StateStore,
    certs: Arc<CertStore>,
    /// Kept alive for the test.
    _proxy: Proxy,
    admission: Admission,
    registry: Registry,
    recorded: Arc<Recorded>,
    /// Served pods by name: their outbound listener.
    listeners: HashMap<String, SocketAddr>,
    _handles: Vec<PodHandle>,
}

/// The test cluster.
pub struct Cluster {
    nodes: Vec<Node>,
    map: AddressMap,
    echoes: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    stop: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A pod `ns/name` (service account `name`) at `ip` on `node`.
fn pod(ns: &str, name: &str, ip: &str, node: Option<usize>, meshed: bool) -> PodInfo {
    PodInfo {
        uid: PodUid::new(&format!("{ns}-{name}")).unwrap(),
        namespace: ns.into(),
        name: name.into(),
        ips: vec![ip.parse().unwrap()],
        node: node
            .map(|n| NODES[n].0.to_owned())
            .or(Some("node-c".into())),
        host_ips: node
            .map(|n| NODES[n].1.parse().unwrap())
            .into_iter()
            .collect(),
        host_network: false,
        service_account: name.into(),
        workload: Workload {
            kind: "pod".into(),
            name: name.into(),
        },
        cgroup: CgroupRef::Kubelet { qos: None },
        netns: None,
        container_ids: Vec::new(),
        mesh_label: meshed.then_some(MeshLabel::Enabled),
        opaque_ports: Default::default(),
        skip_inbound_ports: Vec::new(),
        inbound_policy: None,
        limits: Default::default(),
        probe_ports: Vec::new(),
        labels: Default::default(),
        terminal: false,
        deletion: None,
    }
}

/// The cluster's pods: `client` and `near` (meshed) on node a; `far`
/// and `far2` (meshed), `server` (not), and two pods claiming one address
/// (one of them meshed) on node b; `lost` (meshed) on a node whose
/// address nobody knows.
fn pods() -> Vec<PodInfo> {
    vec![
        pod("shop", "client", "10.1.0.2", Some(0), true),
        pod("shop", "near", "10.1.0.3", Some(0), true),
        pod("shop", "far", "10.2.0.3", Some(1), true),
        pod("shop", "far2", "10.2.0.6", Some(1), true),
        pod("plain", "server", "10.2.0.4", Some(1), false),
        pod("plain", "twin1", "10.2.0.5", Some(1), false),
        pod("shop", "twin2", "10.2.0.5", Some(1), true),
        pod("shop", "lost", "10.3.0.3", None, true),
        PodInfo {
            inbound_policy: Some(nodemesh_core::names::InboundPolicy::Deny),
            ..pod("shop", "locked", "10.1.0.4", Some(0), true)
        },
        pod("plain", "web1", "10.2.0.7", Some(1), false),
        pod("plain", "web2", "10.2.0.8", Some(1), false),
    ]
}

impl Cluster {
    pub async fn two_nodes() -> Self {
        let budgets = AdmissionConfig {
            max_connections: 1000,
            max_requests: 1000,
        };
        Self::two_nodes_with([budgets; 2], &[]).await
    }

    /// The same, each node's proxy with its budgets, and pods (by name)
    /// with their own limits, as their annotations would set them.
    pub async fn two_nodes_with(
        budgets: [AdmissionConfig; 2],
        limits: &[(&str, PodLimits)],
    ) -> Self {
        let pods = || {
            let mut all = pods();
            for p in &mut all {
                if let Some((_, l)) = limits.iter().find(|(n, _)| *n == p.name) {
                    p.limits = *l;
                }
            }
            all
        };
        let anchor = pki::generate_trust_anchor(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
        let issuer =
            pki::generate_issuer(&anchor, TRUST_DOMAIN, Duration::from_secs(1800)).unwrap();
        let map = AddressMap::default();
        let stop = CancellationToken::new();
        let mut nodes = Vec::new();
        for (budgets, (name, ip)) in budgets.into_iter().zip(NODES) {
            let state = StateStore::new(name, TRUST_DOMAIN);
            state.update(|u| u.replace_namespaces(Vec::new()));
            state.replace_pods(pods());
            let mut registry = Registry::with_prefix("nodemesh");
            let signer = Signer::load(
                &issuer.cert_pem,
                &issuer.key_pem,
                &anchor.cert_pem,
                TRUST_DOMAIN,
            )
            .unwrap();
            let certs = Arc::new(CertStore::new(
                Arc::new(LocalIssuer {
                    signer,
                    lifetime: Duration::from_secs(600),
                }),
                roots(&anchor.cert_pem).unwrap(),
                TRUST_DOMAIN,
                &mut registry,
            ));
            tokio::spawn(certs.clone().run(state.clone(), stop.clone()));
            let recorded = Arc::new(Recorded::default());
            let admission = Admission::new(budgets);
            admission.register(&mut registry);
            let proxy = Proxy::new(ProxyInputs {
                cfg: ProxyConfig {
                    buffer_size: 64 * 1024,
                    buffer_budget: 64 << 20,
                    idle_timeout: Duration::from_secs(3600),
                    tunnel: tunnel_config(),
                    detect_timeout: std::time::Duration::from_millis(300),
                    inbound: InboundConfig {
                        default_policy: nodemesh_core::names::InboundPolicy::AllUnauthenticated,
                        floor: nodemesh_core::names::InboundPolicy::AllUnauthenticated,
                        cgroup_root: None,
                        connect_timeout: Duration::from_secs(2),
                        // The proxy's own.
                        detect_timeout: Duration::ZERO,
                    },
                },
                state: state.clone(),
                certs: Some(certs.clone()),
                metrics: ProxyMetrics::new(&mut registry),
                connector: Arc::new(LoopbackConnector(map.clone())),
                orig_dst: recorded.clone(),
                clients: None,
                drain: Drain::default(),
                admission: admission.clone(),
            })
            .unwrap();
            let tunnel = TcpListener::bind("127.0.0.1:0").await.unwrap();
            map.lock()
                .unwrap()
                .insert(addr(ip, TUNNEL_PORT), tunnel.local_addr().unwrap());
            proxy.serve_tunnel(vec![tunnel], stop.clone());
            let mut listeners = HashMap::new();
            let mut handles = Vec::new();
            for pod in state
                .local_pods()
                .unwrap()
                .into_iter()
                .filter(|p| p.meshed())
            {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                listeners.insert(pod.name.clone(), listener.local_addr().unwrap());
                handles.push(proxy.serve_pod(pod, None, vec![listener], Vec::new()));
            }
            nodes.push(Node {
                state: state.clone(),
                certs,
                _proxy: proxy,
                admission,
                registry,
                recorded,
                listeners,
                _handles: handles,
            });
        }
        Cluster {
            nodes,
            map,
            echoes: Mutex::default(),
            stop,
        }
    }

    /// A loopback listener that `ip:port` stands for from now on.
    async fn stand_in(&self, ip: &str, port: u16) -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = addr(ip, port);
        self.map
            .lock()
            .unwrap()
            .insert(at, listener.local_addr().unwrap());
        (listener, at)
    }

    /// An echo server standing for `ip:port`; returns that address.
    pub async fn echo(&self, ip: &str, port: u16) -> SocketAddr {
        let (listener, at) = self.stand_in(ip, port).await;
        let accepted = Arc::new(AtomicUsize::new(0));
        self.echoes.lock().unwrap().insert(at, accepted.clone());
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = stop.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        at
    }

    /// A Service `shop/name` at `vip:port` on every node, its endpoints
    /// `ip:target` (on the nodes their pods are on).
    pub fn service(&self, name: &str, vip: SocketAddr, target: u16, endpoints: &[&str]) {
        let key = |n: &str| ObjectKey {
            namespace: "shop".into(),
            name: n.into(),
        };
        let node_of = |ip: &str| {
            pods()
                .into_iter()
                .find(|p| p.ips.iter().any(|a| a.to_string() == ip))
                .and_then(|p| p.node)
        };
        let slice = SliceInfo {
            service: key(name),
            ports: vec![(None, target)],
            endpoints: endpoints
                .iter()
                .map(|ip| EndpointInfo {
                    addresses: vec![ip.parse().unwrap()],
                    node: node_of(ip),
                    ready: true,
                    serving: true,
                    ..EndpointInfo::default()
                })
                .collect(),
        };
        for node in &self.nodes {
            node.state.update(|u| {
                u.apply_service(
                    key(name),
                    ServiceInfo {
                        cluster_ips: vec![vip.ip()],
                        ports: vec![ServicePort {
                            name: None,
                            port: vip.port(),
                            app_protocol: None,
                        }],
                        opaque_ports: Default::default(),
                        prefer_zone: false,
                    },
                );
                u.apply_slice(key(&format!("{name}-1")), slice.clone());
            });
        }
    }

    /// `ip:port` refuses connections (a port nothing listens on).
    pub fn refusing(&self, ip: &str, port: u16) -> SocketAddr {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let real = closed.local_addr().unwrap();
        drop(closed);
        let at = addr(ip, port);
        self.map.lock().unwrap().insert(at, real);
        at
    }

    /// An HTTP/1 and HTTP/2 (prior knowledge) server standing for
    /// `ip:port`, answering as `knobs` say at the moment.
    pub async fn http(&self, ip: &str, port: u16) -> Arc<HttpServer> {
        let (listener, at) = self.stand_in(ip, port).await;
        let server = Arc::new(HttpServer::new(at));
        let stop = self.stop.clone();
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let (conn, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = stop.cancelled() => return,
                };
                tokio::spawn(s.clone().serve(conn));
            }
        });
        server
    }

    /// Connections the echo server for `at` accepted.
    pub fn echo_accepted(&self, at: SocketAddr) -> usize {
        self.echoes.lock().unwrap()[&at].load(Ordering::SeqCst)
    }

    /// Connects as pod `pod` of node `node` would after eBPF redirected
    /// its `connect(dst)`: to its listener, with `dst` recorded.
    pub async fn dial(&self, node: usize, pod: &str, dst: SocketAddr) -> TcpStream {
        self.dial_inner(node, pod, Some(dst)).await
    }

    /// The same, with no original destination recorded.
    pub async fn dial_unrecorded(&self, node: usize, pod: &str) -> TcpStream {
        self.dial_inner(node, pod, None).await
    }

    async fn dial_inner(&self, node: usize, pod: &str, dst: Option<SocketAddr>) -> TcpStream {
        let node = &self.nodes[node];
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        if let Some(dst) = dst {
            node.recorded.0.lock().unwrap().insert(port, dst);
        }
        socket.connect(node.listeners[pod]).await.unwrap()
    }

    /// Waits until every node holds the certificates of its meshed pods.
    pub async fn wait_certificates(&self) {
        let wanted = [(0, "client"), (0, "near"), (1, "far"), (1, "far2")];
        for _ in 0..200 {
            if wanted.iter().all(|(n, sa)| {
                self.nodes[*n]
                    .certs
                    .current(&Identity::new("shop", sa).unwrap())
                    .is_some()
            }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("certificates not issued within 4s");
    }

    /// Opens a tunnel stream from node a as `client`, over a connection
    /// made for `far`'s identity, to `dst`: the HTTP status node b answers.
    pub async fn connect_as_far(&self, dst: SocketAddr) -> u16 {
        let a = &self.nodes[0];
        let pool = TunnelPool::new(
            tunnel_config(),
            a.certs.clone(),
            TunnelMetrics::new(&mut Registry::default()),
            Arc::new(LoopbackConnector(self.map.clone())),
        );
        let id = |sa: &str| SpiffeId::new(Identity::new("shop", sa).unwrap(), TRUST_DOMAIN);
        let node_b: IpAddr = NODES[1].1.parse().unwrap();
        match pool
            .open(
                &PodUid::new("shop-client").unwrap(),
                &id("client"),
                node_b,
                &id("far"),
                dst,
                None,
            )
            .await
        {
            Ok((mut stream, _slot, _)) => {
                stream.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                stream.read_exact(&mut b).await.unwrap();
                200
            }
            Err(OpenError::Refused { status, .. }) => status.as_u16(),
            Err(e) => panic!("{e}"),
        }
    }

    /// A scrape of node `node`'s metrics.
    /// Node `node`'s admission (what its doors hold now).
    pub fn admission(&self, node: usize) -> &Admission {
        &self.nodes[node].admission
    }

    pub fn metrics(&self, node: usize) -> Metrics {
        Metrics {
            text: encode(&self.nodes[node].registry).unwrap(),
        }
    }
}

fn tunnel_config() -> TunnelConfig {
    TunnelConfig {
        port: TUNNEL_PORT,
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_connection_age: Duration::from_secs(3600),
    }
}

/// A scrape, and sums over it.
pub struct Metrics {
    pub text: String,
}

impl Metrics {
    /// The sum of the series of `name` carrying every label in `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, ""));
                (n == name
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
            })
            .sum()
    }
}
