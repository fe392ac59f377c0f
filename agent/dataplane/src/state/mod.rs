//! The state store: everything the agent knows about the cluster, in one
//! place. Discovery (the Kubernetes API, or the pod file) is its only
//! writer; capture, the proxy, the tunnel, the certificate store and the
//! admin server read it.
//!
//! - pods by UID, with their node, node address, service account, a
//!   validated identity and whether they are meshed (resolved once per
//!   change, not per connection);
//! - pods by IP: only live pods own an address (not finished, not past
//!   their deletion grace); two live claims on one address resolve to
//!   [`Target::Conflict`], never to a guess, and an address a meshed pod
//!   just left is [`Target::Stale`], never plain;
//! - namespaces (their mesh label);
//! - Services → ports → endpoints.
//!
//! The proxy asks one question per connection, [`StateStore::upstream`];
//! capture and the certificate store follow [`StateStore::local_changes`]
//! and read [`StateStore::local_pods`].
pub mod pod;
pub mod service;
mod update;

pub use self::update::Update;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock, RwLockReadGuard},
    time::SystemTime,
};

use nodemesh_core::{
    config::IpCidr,
    names::{InboundPolicy, MeshLabel, PodUid, PortSet},
    policy::{Policy, PolicyClient},
    wire::ServiceView,
};
use tokio::sync::watch;

use self::service::Services;
pub use self::{
    pod::{CgroupRef, Pod, PodInfo, PodLimits, Workload},
    service::{
        ConfiguredProtocol, EndpointInfo, ObjectKey, ServiceInfo, ServicePort, ServiceTarget,
        SliceInfo,
    },
};

/// What a namespace contributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Its `nodemesh.io/mesh` label: meshes its pods that have none.
    pub mesh_label: Option<MeshLabel>,
    /// Its `config.nodemesh.io/opaque-ports`: ports of its pods.
    pub opaque_ports: PortSet,
    /// Its `config.nodemesh.io/default-inbound-policy`.
    pub inbound_policy: Option<InboundPolicy>,
}

/// The answer to "where does this connection go?".
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The original destination, as the app dialled it.
    pub dst: SocketAddr,
    pub target: Target,
}

/// What is behind a destination address.
#[derive(Clone, Debug)]
pub enum Target {
    /// No live pod owns the address: outside the cluster, a node, a
    /// finished pod's old address, or not known (yet).
    Unknown,
    /// The live pod that owns the address.
    Pod(Arc<Pod>),
    /// Several live pods claim the address: nobody can tell which one a
    /// connection would reach.
    Conflict {
        claims: usize,
        /// One of them is meshed (so a guess could send its traffic in the
        /// clear).
        meshed: bool,
    },
    /// No live pod has the address, but a meshed pod that finished or is
    /// past its deletion time had it: it may still be running (a late
    /// kubelet, a skewed clock), so the address is not anybody's to reach
    /// in the clear yet.
    Stale,
    /// A Service's cluster IP and port: the proxy picks an endpoint.
    Service(Arc<ServiceTarget>),
    /// No pod is known at the address, but a Service's endpoints list it on
    /// a node: a pod whose object has not arrived yet, meshed or not — not
    /// to be reached in the clear on a guess.
    Unseen,
    /// An address of the cluster's Service network (`--service-cidr`) that
    /// is no Service port known here: a Service not listed yet, whose
    /// endpoints may be meshed — not to be sent to kube-proxy in the clear.
    UnknownService,
}

/// Which kinds have been listed completely at least once.
#[derive(Clone, Copy, Debug, Default)]
struct Synced {
    pods: bool,
    namespaces: bool,
    /// Whether the source has authorization policies to list first (the
    /// Kubernetes source), and whether it has.
    policies_expected: bool,
    policies: bool,
    /// The same for Services and their endpoints: a cluster IP not known
    /// yet would be routed around the mesh.
    services_expected: bool,
    services: bool,
    slices: bool,
}

impl Synced {
    /// Everything the agent acts on has been listed.
    fn complete(&self) -> bool {
        self.pods
            && self.namespaces
            && (self.policies || !self.policies_expected)
            && ((self.services && self.slices) || !self.services_expected)
    }
}

/// The store's contents.
#[derive(Debug)]
struct ProxyState {
    node: String,
    trust_domain: String,
    pods: HashMap<PodUid, Arc<Pod>>,
    /// Address → the pods claiming it (live or not: liveness is checked
    /// when asked, since deletion grace runs out with time).
    by_ip: HashMap<IpAddr, Vec<PodUid>>,
    /// The pods on this node.
    local: HashSet<PodUid>,
    namespaces: HashMap<String, Namespace>,
    services: Services,
    /// Accepted `AuthorizationPolicy` objects.
    policies: HashMap<ObjectKey, Policy>,
    synced: Synced,
    /// The cluster's Service network, as configured.
    service_cidrs: Vec<IpCidr>,
    /// Nodes' addresses, by node name.
    nodes: HashMap<String, Vec<IpAddr>>,
    /// This node's zone, when its Node object says.
    zone: Option<String>,
}

/// The store, shared by its writer and its readers (cheap to clone).
#[derive(Clone, Debug)]
pub struct StateStore {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: RwLock<ProxyState>,
    /// Bumped whenever this node's pods or their meshing change.
    local: watch::Sender<u64>,
    /// Bumped by every change at all (policies, annotations, labels…).
    any: watch::Sender<u64>,
}

impl StateStore {
    /// An empty store for the agent of `node`.
    pub fn new(node: &str, trust_domain: &str) -> Self {
        Self {
            inner: Arc::new(Shared {
                state: RwLock::new(ProxyState {
                    node: node.to_owned(),
                    trust_domain: trust_domain.to_owned(),
                    pods: HashMap::new(),
                    by_ip: HashMap::new(),
                    local: HashSet::new(),
                    namespaces: HashMap::new(),
                    services: Services::default(),
                    policies: HashMap::new(),
                    synced: Synced::default(),
                    service_cidrs: Vec::new(),
                    nodes: HashMap::new(),
                    zone: None,
                }),
                local: watch::Sender::new(0),
                any: watch::Sender::new(0),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, ProxyState> {
        self.inner.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's name.
    pub fn node(&self) -> String {
        self.read().node.clone()
    }

    pub fn trust_domain(&self) -> String {
        self.read().trust_domain.clone()
    }

    /// Where a connection to `dst` goes: the one question the proxy asks
    /// per connection.
    pub fn upstream(&self, dst: SocketAddr) -> Upstream {
        // `::ffff:a.b.c.d` is the pod (or the Service) at a.b.c.d.
        let canonical = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let state = self.read();
        let target = match state.services.target(canonical) {
            Some(service) => Target::Service(service),
            None => match state.owner(canonical.ip(), SystemTime::now()) {
                Target::Unknown if state.services.on_a_node(canonical.ip()) => Target::Unseen,
                Target::Unknown
                    if state
                        .service_cidrs
                        .iter()
                        .any(|c| c.contains(canonical.ip())) =>
                {
                    Target::UnknownService
                }
                owner => owner,
            },
        };
        Upstream { dst, target }
    }

    /// The pods on this node whose containers may still run (terminating
    /// ones included), once pods and namespaces have been listed; `None`
    /// before, so nobody acts on half a picture.
    pub fn local_pods(&self) -> Option<Vec<Arc<Pod>>> {
        let state = self.read();
        if !state.synced.complete() {
            return None;
        }
        let mut pods: Vec<Arc<Pod>> = state
            .local
            .iter()
            .filter_map(|uid| state.pods.get(uid))
            .filter(|p| !p.terminal)
            .cloned()
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        Some(pods)
    }

    /// The pods on this node, listed or not yet, finished ones too.
    pub fn local_pods_any(&self) -> Vec<Arc<Pod>> {
        let state = self.read();
        state
            .local
            .iter()
            .filter_map(|uid| state.pods.get(uid))
            .cloned()
            .collect()
    }

    /// The pod as known now (a served pod's snapshot may predate its
    /// addresses, annotations or labels).
    pub fn pod(&self, uid: &PodUid) -> Option<Arc<Pod>> {
        self.read().pods.get(uid).cloned()
    }

    /// The pod's address in the family asked for, as known now.
    pub fn pod_ip(&self, uid: &PodUid, v6: bool) -> Option<IpAddr> {
        self.read()
            .pods
            .get(uid)?
            .ips
            .iter()
            .find(|ip| ip.is_ipv6() == v6)
            .copied()
    }

    /// Changes whenever discovery changes anything.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.any.subscribe()
    }

    /// Changes whenever this node's pods, or whether they are meshed,
    /// change.
    pub fn local_changes(&self) -> watch::Receiver<u64> {
        self.inner.local.subscribe()
    }

    /// Whether connections to port `port` of a pod in `namespace` are
    /// opaque by the namespace's annotation.
    pub fn namespace_opaque(&self, namespace: &str, port: u16) -> bool {
        self.read()
            .namespaces
            .get(namespace)
            .is_some_and(|n| n.opaque_ports.contains(port))
    }

    /// The inbound policy of a namespace's annotation, if any.
    pub fn namespace_policy(&self, namespace: &str) -> Option<InboundPolicy> {
        self.read()
            .namespaces
            .get(namespace)
            .and_then(|n| n.inbound_policy)
    }

    /// What the `AuthorizationPolicy` objects say about `client` on `port`
    /// of `pod`: `None` when none selects them (the default policy
    /// decides), else whether one of those that do allows the client.
    pub fn authorized(&self, pod: &Pod, port: u16, client: PolicyClient<'_>) -> Option<bool> {
        let state = self.read();
        let mut selected = false;
        for policy in state.policies.values() {
            if policy.selects(&pod.namespace, &pod.labels, port) {
                if policy.allows(client) {
                    return Some(true);
                }
                selected = true;
            }
        }
        selected.then_some(false)
    }

    /// Whether `ip` is one of node `node`'s addresses, as its Node object
    /// says (a dual-stack node's other family's too, which its pods'
    /// `hostIP` may not list).
    pub fn is_node_address(&self, node: &str, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.read().nodes.get(node).is_some_and(|a| a.contains(&ip))
    }

    /// Records node `name`'s addresses; nothing changes (no one is woken)
    /// when they are what was known — Node objects change often, their
    /// addresses seldom.
    pub fn set_node(&self, name: String, addrs: Vec<IpAddr>) {
        if self.read().nodes.get(&name) != Some(&addrs) {
            self.update(|u| u.apply_node(name, addrs));
        }
    }

    /// Records this node's zone (its `topology.kubernetes.io/zone` label):
    /// the endpoints a Service prefers for it change.
    pub fn set_zone(&self, zone: Option<String>) {
        if self.read().zone != zone {
            self.update(|u| u.apply_zone(zone));
        }
    }

    /// Forgets node `name`, if it was known.
    pub fn remove_node(&self, name: &str) {
        if self.read().nodes.contains_key(name) {
            self.update(|u| u.delete_node(name));
        }
    }

    /// Whether a pod of namespace `ns` is on this node (listed or not).
    pub fn has_local_pod_in(&self, ns: &str) -> bool {
        let state = self.read();
        state
            .local
            .iter()
            .filter_map(|uid| state.pods.get(uid))
            .any(|p| p.namespace == ns)
    }

    /// The source lists Services and their endpoints: nothing is captured
    /// before they are known (a cluster IP not known yet would go around
    /// the mesh).
    pub fn expect_services(&self) {
        let mut state = self.inner.state.write().unwrap_or_else(|p| p.into_inner());
        state.synced.services_expected = true;
    }

    /// The cluster's Service network (`--service-cidr`).
    pub fn set_service_cidrs(&self, cidrs: Vec<IpCidr>) {
        let mut state = self.inner.state.write().unwrap_or_else(|p| p.into_inner());
        state.service_cidrs = cidrs;
    }

    /// The source lists authorization policies: nothing is captured before
    /// they are known (a pod they restrict would be open meanwhile).
    pub fn expect_policies(&self) {
        self.inner
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .synced
            .policies_expected = true;
    }

    /// Whether the policies have been listed once (or found not to exist).
    pub fn policies_listed(&self) -> bool {
        self.read().synced.policies
    }

    /// Whether `ip` is a pod's or a node's address in the cluster (what
    /// `cluster-unauthenticated` lets in).
    pub fn in_cluster(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let state = self.read();
        state.by_ip.contains_key(&ip) || state.pods.values().any(|p| p.host_ips.contains(&ip))
    }

    /// Every Service VIP:port with its endpoints (the admin API).
    pub fn services(&self) -> Vec<ServiceView> {
        let state = self.read();
        let now = SystemTime::now();
        state.services.views(|ip| match state.owner(ip, now) {
            Target::Pod(p) => state.pods.get(&p.uid).map(Arc::as_ref),
            _ => None,
        })
    }

    /// Replaces every pod with a complete list (a relist): nothing stale
    /// survives, nothing is counted twice. The pods are resolved before the
    /// store is locked, so lookups keep flowing meanwhile. Only discovery
    /// calls this.
    pub fn replace_pods(&self, pods: Vec<PodInfo>) {
        let (node, trust_domain, labels) = {
            let state = self.read();
            let labels: HashMap<String, Option<MeshLabel>> = state
                .namespaces
                .iter()
                .map(|(name, ns)| (name.clone(), ns.mesh_label))
                .collect();
            (state.node.clone(), state.trust_domain.clone(), labels)
        };
        let mut fresh = HashMap::with_capacity(pods.len());
        let mut by_ip: HashMap<IpAddr, Vec<PodUid>> = HashMap::new();
        let mut local = HashSet::new();
        for info in pods {
            let ns = labels.get(&info.namespace).copied().flatten();
            let pod = Pod::resolve(info, &trust_domain, ns);
            for ip in pod.claimed_ips() {
                by_ip.entry(*ip).or_default().push(pod.uid.clone());
            }
            if pod.node.as_deref() == Some(node.as_str()) {
                local.insert(pod.uid.clone());
            }
            fresh.insert(pod.uid.clone(), Arc::new(pod));
        }
        self.update(|u| {
            let state = &mut *u.state;
            let changed = state.local.len() != local.len()
                || local
                    .iter()
                    .any(|uid| state.pods.get(uid) != fresh.get(uid));
            u.local_changed |= changed || !state.synced.pods;
            state.pods = fresh;
            state.by_ip = by_ip;
            state.local = local;
            state.synced.pods = true;
        });
    }

    /// Applies a batch of changes. Only discovery calls this.
    pub fn update<R>(&self, f: impl FnOnce(&mut Update<'_>) -> R) -> R {
        let mut update = Update {
            state: self.inner.state.write().unwrap_or_else(|p| p.into_inner()),
            local_changed: false,
            services_changed: false,
        };
        let r = f(&mut update);
        if update.services_changed {
            let state = &mut *update.state;
            state.services.reindex(&state.node, state.zone.as_deref());
        }
        let changed = update.local_changed;
        drop(update);
        if changed {
            self.inner.local.send_modify(|v| *v += 1);
        }
        self.inner.any.send_modify(|v| *v += 1);
        r
    }
}

impl ProxyState {
    fn is_local(&self, pod: &Pod) -> bool {
        pod.node.as_deref() == Some(self.node.as_str())
    }

    /// Who owns `ip` at `now`.
    fn owner(&self, ip: IpAddr, now: SystemTime) -> Target {
        let Some(claims) = self.by_ip.get(&ip) else {
            return Target::Unknown;
        };
        let claimants = || claims.iter().filter_map(|uid| self.pods.get(uid));
        let mut live = claimants().filter(|p| p.is_live(now));
        match (live.next(), live.next()) {
            (Some(pod), None) => Target::Pod(pod.clone()),
            (Some(_), Some(_)) => Target::Conflict {
                claims: claimants().filter(|p| p.is_live(now)).count(),
                meshed: claimants().any(|p| p.is_live(now) && p.meshed()),
            },
            (None, _) if claimants().any(|p| p.meshed()) => Target::Stale,
            (None, _) => Target::Unknown,
        }
    }

    fn namespace_label(&self, namespace: &str) -> Option<MeshLabel> {
        self.namespaces.get(namespace).and_then(|n| n.mesh_label)
    }

    /// Puts `pod` in place of whatever had its UID; whether this node's
    /// pods changed.
    fn insert(&mut self, pod: Pod) -> bool {
        let old = self.pods.get(&pod.uid).cloned();
        if old.as_deref() == Some(&pod) {
            return false;
        }
        let mut local_changed = false;
        if let Some(old) = &old {
            local_changed |= self.is_local(old);
            self.unclaim(old);
        }
        if self.is_local(&pod) {
            local_changed = true;
            self.local.insert(pod.uid.clone());
        } else {
            self.local.remove(&pod.uid);
        }
        self.claim(&pod);
        self.pods.insert(pod.uid.clone(), Arc::new(pod));
        local_changed
    }

    /// Forgets the pod with `uid`; whether this node's pods changed.
    fn remove(&mut self, uid: &PodUid) -> bool {
        let Some(old) = self.pods.remove(uid) else {
            return false;
        };
        self.unclaim(&old);
        self.local.remove(uid)
    }

    fn unclaim(&mut self, pod: &Pod) {
        for ip in pod.claimed_ips() {
            if let Some(claims) = self.by_ip.get_mut(ip) {
                claims.retain(|uid| *uid != pod.uid);
                if claims.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    fn claim(&mut self, pod: &Pod) {
        for ip in pod.claimed_ips() {
            let claims = self.by_ip.entry(*ip).or_default();
            if !claims.contains(&pod.uid) {
                claims.push(pod.uid.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests;
