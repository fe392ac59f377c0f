//! Services in the store: each Service's cluster IPs and TCP ports, and the
//! endpoints its EndpointSlices (or Endpoints) list, joined with the pods
//! behind them when asked. Only the fields used are kept.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use nodemesh_core::{
    names::{DEFAULT_OPAQUE_PORTS, PortSet},
    wire::{EndpointView, ServiceView},
};

use super::pod::Pod;

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// What a Service contributes: its cluster IPs and TCP ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Its `config.nodemesh.io/opaque-ports` (Service ports).
    pub opaque_ports: PortSet,
    /// Its `trafficDistribution` asks for endpoints in the client's zone
    /// first (`PreferClose`, `PreferSameZone`).
    pub prefer_zone: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// `appProtocol` (`http`, `kubernetes.io/h2c`, `grpc`, `tcp`, …).
    pub app_protocol: Option<String>,
}

/// A Service port as a connection to one of its cluster IPs sees it: what
/// the proxy balances over. Rebuilt when Services or endpoints change,
/// shared by every connection meanwhile.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceTarget {
    pub service: ObjectKey,
    pub port: ServicePort,
    /// The ready endpoints' addresses, with the target port (named target
    /// ports are resolved per endpoint by the endpoints controller), sorted.
    pub endpoints: Arc<[SocketAddr]>,
    /// Those on this node: preferred while they are healthy.
    pub on_node: Arc<[SocketAddr]>,
    /// Those for this node's zone (the slices' hints for it, or, when the
    /// Service prefers close endpoints and no hints are given, those in
    /// it); empty when the zone is not known or nothing asks for it.
    pub in_zone: Arc<[SocketAddr]>,
    /// What its port carries, as configured.
    pub protocol: ConfiguredProtocol,
}

impl ServiceTarget {
    /// The endpoints in the order to prefer them, nearest first: the last
    /// tier holds them all.
    pub fn tiers(&self) -> [&[SocketAddr]; 3] {
        [&self.on_node, &self.in_zone, &self.endpoints]
    }
}

/// What a destination carries, as configured (before any detection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfiguredProtocol {
    /// Nothing said: detect.
    Detect,
    /// Bytes only (`appProtocol: tcp`, the opaque-ports annotation, or a
    /// server-first port).
    Opaque,
    /// HTTP/2 with prior knowledge (`kubernetes.io/h2c`, `grpc`).
    H2,
}

impl ConfiguredProtocol {
    /// From a Service port's `appProtocol`, the opaque-ports annotations
    /// that apply, and the ports (dialled and target).
    pub fn of(app_protocol: Option<&str>, opaque: bool, ports: &[u16]) -> Self {
        match app_protocol {
            Some("tcp") => return Self::Opaque,
            Some("kubernetes.io/h2c" | "grpc") => return Self::H2,
            _ => {}
        }
        if opaque || ports.iter().any(|p| DEFAULT_OPAQUE_PORTS.contains(p)) {
            Self::Opaque
        } else {
            Self::Detect
        }
    }
}

/// One EndpointSlice (or one Endpoints object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: ObjectKey,
    /// (port name, port) pairs, TCP only.
    pub ports: Vec<(Option<String>, u16)>,
    pub endpoints: Vec<EndpointInfo>,
}

impl SliceInfo {
    /// The target port for `port`: the slice's port of the same name.
    fn target_port(&self, port: &ServicePort) -> Option<u16> {
        self.ports
            .iter()
            .find(|(name, _)| *name == port.name)
            .map(|(_, p)| *p)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    pub node: Option<String>,
    /// Its `zone`.
    pub zone: Option<String>,
    /// The zones its hints say it is for (`hints.forZones`), if any.
    pub for_zones: Option<Vec<String>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Services and their endpoints.
#[derive(Debug, Default)]
pub(super) struct Services {
    pub(super) services: HashMap<ObjectKey, ServiceInfo>,
    pub(super) slices: HashMap<ObjectKey, SliceInfo>,
    /// Cluster IP:port → what is behind it ([`Services::reindex`]).
    vips: HashMap<SocketAddr, Arc<ServiceTarget>>,
    /// Addresses the slices list on a node: pods, even if their pod object
    /// has not arrived yet.
    on_nodes: HashSet<IpAddr>,
}

impl Services {
    /// What a connection to `dst` reaches, if it is a Service's cluster
    /// IP and port.
    pub(super) fn target(&self, dst: SocketAddr) -> Option<Arc<ServiceTarget>> {
        self.vips.get(&dst).cloned()
    }

    /// Whether a slice lists `ip` as an endpoint on a node (a pod's).
    pub(super) fn on_a_node(&self, ip: IpAddr) -> bool {
        self.on_nodes.contains(&ip)
    }

    /// Rebuilds the cluster IP index after Services or slices changed (or
    /// where this node is): per Service port, the ready endpoints of every
    /// slice of the Service with a port of that name, and which of them
    /// are near (on `node`, for `zone`).
    pub(super) fn reindex(&mut self, node: &str, zone: Option<&str>) {
        let mut by_service: HashMap<&ObjectKey, Vec<&SliceInfo>> = HashMap::new();
        for slice in self.slices.values() {
            by_service.entry(&slice.service).or_default().push(slice);
        }
        self.on_nodes = self
            .slices
            .values()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.node.is_some())
            .flat_map(|e| e.addresses.iter().copied())
            .collect();
        let mut vips = HashMap::new();
        for (key, svc) in &self.services {
            let slices = by_service.get(key).map(Vec::as_slice).unwrap_or_default();
            for port in &svc.ports {
                let mut endpoints = BTreeSet::new();
                let mut on_node = BTreeSet::new();
                let mut in_zone = BTreeSet::new();
                let ready = || {
                    slices.iter().flat_map(|slice| {
                        let target = slice.target_port(port);
                        slice
                            .endpoints
                            .iter()
                            .filter(|e| e.ready && !e.terminating)
                            .filter_map(move |e| Some((e, target?)))
                    })
                };
                // Hints are used only when every endpoint has them (as
                // kube-proxy does: the controller gives all or none).
                let hinted = ready().all(|(e, _)| e.for_zones.is_some());
                for (ep, target) in ready() {
                    let addrs = ep.addresses.iter().map(|ip| SocketAddr::new(*ip, target));
                    endpoints.extend(addrs.clone());
                    if ep.node.as_deref() == Some(node) {
                        on_node.extend(addrs.clone());
                    }
                    let for_zone = zone.is_some_and(|z| match &ep.for_zones {
                        Some(zones) if hinted => zones.iter().any(|h| h == z),
                        _ => svc.prefer_zone && ep.zone.as_deref() == Some(z),
                    });
                    if for_zone {
                        in_zone.extend(addrs);
                    }
                }
                let targets: Vec<u16> = endpoints.iter().map(SocketAddr::port).collect();
                let mut ports = vec![port.port];
                ports.extend(targets);
                let target = Arc::new(ServiceTarget {
                    service: key.clone(),
                    port: port.clone(),
                    endpoints: endpoints.into_iter().collect(),
                    on_node: on_node.into_iter().collect(),
                    in_zone: in_zone.into_iter().collect(),
                    protocol: ConfiguredProtocol::of(
                        port.app_protocol.as_deref(),
                        svc.opaque_ports.contains(port.port),
                        &ports,
                    ),
                });
                for ip in &svc.cluster_ips {
                    vips.insert(SocketAddr::new(*ip, port.port), target.clone());
                }
            }
        }
        self.vips = vips;
    }

    /// Every Service VIP:port with its endpoints, sorted; `pod` finds the
    /// pod that owns an endpoint address.
    pub(super) fn views<'a>(&'a self, pod: impl Fn(IpAddr) -> Option<&'a Pod>) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = self
            .services
            .iter()
            .flat_map(|(key, svc)| {
                let pod = &pod;
                svc.cluster_ips.iter().flat_map(move |ip| {
                    svc.ports
                        .iter()
                        .map(move |port| self.view(key, SocketAddr::new(*ip, port.port), port, pod))
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name, a.addr).cmp(&(&b.namespace, &b.name, b.addr)));
        out
    }

    fn view<'a>(
        &'a self,
        key: &ObjectKey,
        addr: SocketAddr,
        port: &ServicePort,
        pod: &impl Fn(IpAddr) -> Option<&'a Pod>,
    ) -> ServiceView {
        let mut endpoints = Vec::new();
        for slice in self.slices.values().filter(|s| &s.service == key) {
            let Some(target) = slice.target_port(port) else {
                continue;
            };
            for ep in &slice.endpoints {
                for ip in &ep.addresses {
                    let pod = pod(*ip);
                    endpoints.push(EndpointView {
                        addr: SocketAddr::new(*ip, target),
                        node: ep.node.clone().or_else(|| pod.and_then(|p| p.node.clone())),
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        identity: pod.and_then(|p| p.identity()).map(|id| id.uri().to_owned()),
                        meshed: pod.is_some_and(Pod::meshed),
                    });
                }
            }
        }
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        ServiceView {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            addr,
            port_name: port.name.clone(),
            endpoints,
        }
    }
}
