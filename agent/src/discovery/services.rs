//! The service index: Service VIP:port → its endpoints (pod address, port,
//! node, ready/serving/terminating, the pod's identity and whether it is
//! meshed). Built from Services, EndpointSlices (or Endpoints) and the
//! cluster's pods; what load balancing and cross-node routing read.
//!
//! Only the fields used are kept. Each source keeps the "synced" semantics
//! of a list+watch: on a relist the old entries are replaced at once, so
//! nothing stale survives and nothing is counted twice.
use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use serde::Serialize;

use super::MeshLabel;

/// A map fed by a list+watch: `init` … `init_apply`* … `init_done` replaces
/// the contents atomically; `apply`/`delete` change it live.
#[derive(Debug)]
pub struct Synced<K, V> {
    live: HashMap<K, V>,
    pending: Option<HashMap<K, V>>,
    synced: bool,
}

impl<K, V> Default for Synced<K, V> {
    fn default() -> Self {
        Self {
            live: HashMap::new(),
            pending: None,
            synced: false,
        }
    }
}

impl<K: Eq + Hash, V> Synced<K, V> {
    pub fn apply(&mut self, k: K, v: V) {
        self.live.insert(k, v);
    }
    pub fn delete(&mut self, k: &K) -> Option<V> {
        self.live.remove(k)
    }
    pub fn init(&mut self) {
        self.pending = Some(HashMap::new());
    }
    pub fn init_apply(&mut self, k: K, v: V) {
        self.pending.get_or_insert_with(HashMap::new).insert(k, v);
    }
    /// Replaces the contents with what the relist returned.
    pub fn init_done(&mut self) {
        if let Some(fresh) = self.pending.take() {
            self.live = fresh;
        }
        self.synced = true;
    }
    /// A complete list has been seen at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }
    pub fn get(&self, k: &K) -> Option<&V> {
        self.live.get(k)
    }
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.live.values()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.live.iter()
    }
    pub fn len(&self) -> usize {
        self.live.len()
    }
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
}

/// One EndpointSlice (or one Endpoints object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: ObjectKey,
    /// (port name, port) pairs, TCP only.
    pub ports: Vec<(Option<String>, u16)>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// What the index knows of a pod anywhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: Option<String>,
    pub host_ip: Option<IpAddr>,
    pub ip: Option<IpAddr>,
    pub mesh_label: Option<MeshLabel>,
}

/// One endpoint as routing sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>` of the pod behind it.
    pub identity: Option<String>,
    /// The pod is meshed (its own label, or its namespace's).
    pub meshed: bool,
}

/// A Service VIP:port and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub addr: SocketAddr,
    pub port_name: Option<String>,
    pub endpoints: Vec<Endpoint>,
}

/// The index itself.
#[derive(Debug, Default)]
pub struct ServiceIndex {
    pub trust_domain: String,
    pub services: Synced<ObjectKey, ServiceInfo>,
    pub slices: Synced<ObjectKey, SliceInfo>,
    pub pods: Synced<String, PodIdentity>,
    pub namespaces: Synced<String, Option<MeshLabel>>,
    /// Pod IP → pod uid, kept in step with `pods`.
    by_ip: HashMap<IpAddr, String>,
}

/// The index shared by discovery (writer) and routing/admin (readers).
pub type SharedIndex = Arc<RwLock<ServiceIndex>>;

impl ServiceIndex {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            ..Self::default()
        }
    }

    /// Pod changes go through here so the IP lookup stays right.
    pub fn pod_apply(&mut self, uid: String, pod: PodIdentity) {
        if let Some(old) = self.pods.get(&uid).and_then(|p| p.ip)
            && Some(old) != pod.ip
            && self.by_ip.get(&old) == Some(&uid)
        {
            self.by_ip.remove(&old);
        }
        if let Some(ip) = pod.ip {
            self.by_ip.insert(ip, uid.clone());
        }
        self.pods.apply(uid, pod);
    }

    pub fn pod_delete(&mut self, uid: &str) {
        if let Some(ip) = self.pods.delete(&uid.to_owned()).and_then(|p| p.ip)
            && self.by_ip.get(&ip).map(String::as_str) == Some(uid)
        {
            self.by_ip.remove(&ip);
        }
    }

    pub fn pods_init_done(&mut self) {
        self.pods.init_done();
        self.by_ip = self
            .pods
            .iter()
            .filter_map(|(uid, p)| Some((p.ip?, uid.clone())))
            .collect();
    }

    /// The pod with this IP, if known.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodIdentity> {
        self.pods.get(self.by_ip.get(&ip)?)
    }

    /// Whether a pod is meshed: its own label wins, else its namespace's.
    pub fn is_meshed(&self, pod: &PodIdentity) -> bool {
        mesh_decision(
            pod.mesh_label,
            self.namespaces.get(&pod.namespace).copied().flatten(),
        )
    }

    /// The endpoints behind a Service VIP:port, if `dst` is one.
    pub fn resolve(&self, dst: SocketAddr) -> Option<ServiceView> {
        self.services.iter().find_map(|(key, svc)| {
            if !svc.cluster_ips.contains(&dst.ip()) {
                return None;
            }
            let port = svc.ports.iter().find(|p| p.port == dst.port())?;
            Some(self.view(key, dst, port))
        })
    }

    /// Every Service VIP:port with its endpoints, sorted.
    pub fn views(&self) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = self
            .services
            .iter()
            .flat_map(|(key, svc)| {
                svc.cluster_ips.iter().flat_map(move |ip| {
                    svc.ports
                        .iter()
                        .map(move |port| self.view(key, SocketAddr::new(*ip, port.port), port))
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name, a.addr).cmp(&(&b.namespace, &b.name, b.addr)));
        out
    }

    fn view(&self, key: &ObjectKey, addr: SocketAddr, port: &ServicePort) -> ServiceView {
        let mut endpoints = Vec::new();
        for slice in self.slices.values().filter(|s| &s.service == key) {
            // The slice port with the Service port's name carries the target port.
            let Some(target) = slice
                .ports
                .iter()
                .find(|(name, _)| *name == port.name)
                .map(|(_, p)| *p)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                for ip in &ep.addresses {
                    let pod = self.pod_by_ip(*ip);
                    endpoints.push(Endpoint {
                        addr: SocketAddr::new(*ip, target),
                        node: ep.node.clone().or_else(|| pod.and_then(|p| p.node.clone())),
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        identity: pod.map(|p| {
                            format!(
                                "spiffe://{}/ns/{}/sa/{}",
                                self.trust_domain, p.namespace, p.service_account
                            )
                        }),
                        meshed: pod.is_some_and(|p| self.is_meshed(p)),
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

/// Pod label first (`enabled`/`disabled`), then the namespace's `enabled`.
pub fn mesh_decision(pod: Option<MeshLabel>, namespace: Option<MeshLabel>) -> bool {
    match pod {
        Some(MeshLabel::Enabled) => true,
        Some(MeshLabel::Disabled) => false,
        None => namespace == Some(MeshLabel::Enabled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn index() -> ServiceIndex {
        let mut idx = ServiceIndex::new("cluster.local");
        idx.services.apply(
            key("shop", "web"),
            ServiceInfo {
                cluster_ips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                }],
            },
        );
        idx.slices.apply(
            key("shop", "web-abc"),
            SliceInfo {
                service: key("shop", "web"),
                ports: vec![(Some("http".into()), 8080)],
                endpoints: vec![
                    EndpointInfo {
                        addresses: vec!["10.1.0.2".parse().unwrap()],
                        node: Some("node-1".into()),
                        ready: true,
                        serving: true,
                        terminating: false,
                    },
                    EndpointInfo {
                        addresses: vec!["10.2.0.3".parse().unwrap()],
                        node: None,
                        ready: false,
                        serving: true,
                        terminating: true,
                    },
                ],
            },
        );
        idx.pod_apply(
            "uid-1".into(),
            PodIdentity {
                namespace: "shop".into(),
                name: "web-1".into(),
                service_account: "web".into(),
                node: Some("node-1".into()),
                host_ip: None,
                ip: Some("10.1.0.2".parse().unwrap()),
                mesh_label: None,
            },
        );
        idx.namespaces
            .apply("shop".into(), Some(MeshLabel::Enabled));
        idx
    }

    #[test]
    fn a_vip_resolves_to_its_endpoints_with_identity() {
        let idx = index();
        let view = idx
            .resolve("10.96.0.10:80".parse().unwrap())
            .expect("a service");
        assert_eq!(
            (view.namespace.as_str(), view.name.as_str()),
            ("shop", "web")
        );
        assert_eq!(view.endpoints.len(), 2);
        let first = &view.endpoints[0];
        assert_eq!(first.addr, "10.1.0.2:8080".parse().unwrap());
        assert_eq!(
            first.identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert!(first.meshed, "meshed by its namespace");
        let second = &view.endpoints[1];
        assert!(second.terminating && !second.ready);
        assert_eq!(second.identity, None, "pod unknown");
        assert!(idx.resolve("10.96.0.10:81".parse().unwrap()).is_none());
        assert!(idx.resolve("10.96.0.11:80".parse().unwrap()).is_none());
    }

    #[test]
    fn a_relist_replaces_everything_at_once() {
        let mut idx = index();
        idx.slices.init();
        idx.slices.init_apply(
            key("shop", "web-new"),
            SliceInfo {
                service: key("shop", "web"),
                ports: vec![(Some("http".into()), 8080)],
                endpoints: vec![],
            },
        );
        // Until the relist is done, the old contents stay.
        assert_eq!(
            idx.resolve("10.96.0.10:80".parse().unwrap())
                .unwrap()
                .endpoints
                .len(),
            2
        );
        idx.slices.init_done();
        assert_eq!(idx.slices.len(), 1);
        assert!(
            idx.resolve("10.96.0.10:80".parse().unwrap())
                .unwrap()
                .endpoints
                .is_empty()
        );
    }

    #[test]
    fn pod_ip_changes_follow_the_pod() {
        let mut idx = index();
        let mut pod = idx.pods.get(&"uid-1".to_owned()).unwrap().clone();
        pod.ip = Some("10.1.0.9".parse().unwrap());
        idx.pod_apply("uid-1".into(), pod);
        assert!(idx.pod_by_ip("10.1.0.2".parse().unwrap()).is_none());
        assert!(idx.pod_by_ip("10.1.0.9".parse().unwrap()).is_some());
        idx.pod_delete("uid-1");
        assert!(idx.pod_by_ip("10.1.0.9".parse().unwrap()).is_none());
    }

    #[test]
    fn the_pod_label_wins_over_the_namespace() {
        use MeshLabel::*;
        assert!(mesh_decision(None, Some(Enabled)));
        assert!(!mesh_decision(Some(Disabled), Some(Enabled)));
        assert!(mesh_decision(Some(Enabled), None));
        assert!(!mesh_decision(None, None));
        assert!(!mesh_decision(None, Some(Disabled)));
    }
}
