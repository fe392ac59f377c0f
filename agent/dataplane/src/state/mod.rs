//! The state store: everything the agent knows about the cluster, in one
//! place. Discovery (the Kubernetes API, or the pod file) is its only
//! writer; capture, the proxy, the tunnel, the certificate store and the
//! admin server read it.
//!
//! - pods by UID, with their node, node address, service account, a
//!   validated identity and whether they are meshed (resolved once per
//!   change, not per connection);
//! - pods by IP: only live pods own an address (not finished, not past
//!   their deletion grace), and two live claims on one address resolve to
//!   [`Target::Conflict`], never to a guess;
//! - namespaces (their mesh label);
//! - Services → ports → endpoints.
//!
//! The proxy asks one question per connection, [`StateStore::upstream`];
//! capture and the certificate store follow [`StateStore::local_changes`]
//! and read [`StateStore::local_pods`].
pub mod pod;
pub mod service;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::SystemTime,
};

use nodemesh_core::{names::MeshLabel, names::PodUid, wire::ServiceView};
use tokio::sync::watch;

use self::service::Services;
pub use self::{
    pod::{CgroupRef, Pod, PodInfo, Workload},
    service::{EndpointInfo, ObjectKey, ServiceInfo, ServicePort, SliceInfo},
};

/// What a namespace contributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Its `nodemesh.io/mesh` label: meshes its pods that have none.
    pub mesh_label: Option<MeshLabel>,
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
    /// This many live pods claim the address: nobody can tell which one a
    /// connection would reach.
    Conflict(usize),
}

/// Which kinds have been listed completely at least once.
#[derive(Clone, Copy, Debug, Default)]
struct Synced {
    pods: bool,
    namespaces: bool,
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
    namespaces: HashMap<String, Namespace>,
    services: Services,
    synced: Synced,
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
                    namespaces: HashMap::new(),
                    services: Services::default(),
                    synced: Synced::default(),
                }),
                local: watch::Sender::new(0),
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
        Upstream {
            dst,
            target: self.read().owner(dst.ip(), SystemTime::now()),
        }
    }

    /// Whether every pod of the cluster has been listed: before that, an
    /// unknown address may still be a pod's.
    pub fn pods_synced(&self) -> bool {
        self.read().synced.pods
    }

    /// The pods on this node whose containers may still run (terminating
    /// ones included), once pods and namespaces have been listed; `None`
    /// before, so nobody acts on half a picture.
    pub fn local_pods(&self) -> Option<Vec<Arc<Pod>>> {
        let state = self.read();
        if !(state.synced.pods && state.synced.namespaces) {
            return None;
        }
        let mut pods: Vec<Arc<Pod>> = state
            .pods
            .values()
            .filter(|p| state.is_local(p) && !p.terminal)
            .cloned()
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        Some(pods)
    }

    /// Changes whenever this node's pods, or whether they are meshed,
    /// change.
    pub fn local_changes(&self) -> watch::Receiver<u64> {
        self.inner.local.subscribe()
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

    /// Applies a batch of changes. Only discovery calls this.
    pub fn update<R>(&self, f: impl FnOnce(&mut Update<'_>) -> R) -> R {
        let mut update = Update {
            state: self.inner.state.write().unwrap_or_else(|p| p.into_inner()),
            local_changed: false,
        };
        let r = f(&mut update);
        let changed = update.local_changed;
        drop(update);
        if changed {
            self.inner.local.send_modify(|v| *v += 1);
        }
        r
    }
}

impl ProxyState {
    fn is_local(&self, pod: &Pod) -> bool {
        pod.node.as_deref() == Some(self.node.as_str())
    }

    /// The live pod that owns `ip` at `now`.
    fn owner(&self, ip: IpAddr, now: SystemTime) -> Target {
        let Some(claims) = self.by_ip.get(&ip) else {
            return Target::Unknown;
        };
        let mut live = claims
            .iter()
            .filter_map(|uid| self.pods.get(uid))
            .filter(|p| p.is_live(now));
        match (live.next(), live.next()) {
            (None, _) => Target::Unknown,
            (Some(pod), None) => Target::Pod(pod.clone()),
            (Some(_), Some(_)) => Target::Conflict(2 + live.count()),
        }
    }

    fn namespace_label(&self, namespace: &str) -> Option<MeshLabel> {
        self.namespaces.get(namespace).and_then(|n| n.mesh_label)
    }

    fn unclaim(&mut self, pod: &Pod) {
        if let Some(ip) = pod.claimed_ip()
            && let Some(claims) = self.by_ip.get_mut(&ip)
        {
            claims.retain(|uid| *uid != pod.uid);
            if claims.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    fn claim(&mut self, pod: &Pod) {
        if let Some(ip) = pod.claimed_ip() {
            let claims = self.by_ip.entry(ip).or_default();
            if !claims.contains(&pod.uid) {
                claims.push(pod.uid.clone());
            }
        }
    }
}

/// A batch of changes to the store (see [`StateStore::update`]).
pub struct Update<'a> {
    state: RwLockWriteGuard<'a, ProxyState>,
    local_changed: bool,
}

impl Update<'_> {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.state.node
    }

    /// Adds or replaces a pod.
    pub fn apply_pod(&mut self, info: PodInfo) {
        let ns = self.state.namespace_label(&info.namespace);
        let pod = Pod::resolve(info, &self.state.trust_domain, ns);
        let old = self.state.pods.get(&pod.uid).cloned();
        if old.as_deref() == Some(&pod) {
            return;
        }
        if let Some(old) = &old {
            self.local_changed |= self.state.is_local(old);
            self.state.unclaim(old);
        }
        self.local_changed |= self.state.is_local(&pod);
        self.state.claim(&pod);
        self.state.pods.insert(pod.uid.clone(), Arc::new(pod));
    }

    /// Forgets a pod.
    pub fn delete_pod(&mut self, uid: &PodUid) {
        if let Some(old) = self.state.pods.remove(uid) {
            self.local_changed |= self.state.is_local(&old);
            self.state.unclaim(&old);
        }
    }

    /// Replaces every pod with a complete list (a relist): nothing stale
    /// survives, nothing is counted twice.
    pub fn replace_pods(&mut self, pods: Vec<PodInfo>) {
        let keep: std::collections::HashSet<PodUid> = pods.iter().map(|p| p.uid.clone()).collect();
        let gone: Vec<PodUid> = self
            .state
            .pods
            .keys()
            .filter(|uid| !keep.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.delete_pod(&uid);
        }
        for pod in pods {
            self.apply_pod(pod);
        }
        if !self.state.synced.pods {
            self.state.synced.pods = true;
            self.local_changed = true;
        }
    }

    /// Adds or replaces a namespace; its pods are meshed again accordingly.
    pub fn apply_namespace(&mut self, name: &str, ns: Namespace) {
        if self.state.namespaces.get(name) == Some(&ns) {
            return;
        }
        self.state.namespaces.insert(name.to_owned(), ns);
        self.remesh(name);
    }

    pub fn delete_namespace(&mut self, name: &str) {
        if self.state.namespaces.remove(name).is_some() {
            self.remesh(name);
        }
    }

    /// Replaces every namespace with a complete list.
    pub fn replace_namespaces(&mut self, namespaces: Vec<(String, Namespace)>) {
        let fresh: HashMap<String, Namespace> = namespaces.into_iter().collect();
        let changed: Vec<String> = self
            .state
            .namespaces
            .keys()
            .chain(fresh.keys())
            .filter(|n| self.state.namespaces.get(*n) != fresh.get(*n))
            .cloned()
            .collect();
        self.state.namespaces = fresh;
        for name in changed {
            self.remesh(&name);
        }
        if !self.state.synced.namespaces {
            self.state.synced.namespaces = true;
            self.local_changed = true;
        }
    }

    /// Applies namespace `name`'s label to its pods again.
    fn remesh(&mut self, name: &str) {
        let label = self.state.namespace_label(name);
        let state = &mut *self.state;
        for pod in state.pods.values_mut().filter(|p| p.namespace == name) {
            let again = pod.with_namespace(label);
            if again.meshed() != pod.meshed() {
                self.local_changed |= pod.node.as_deref() == Some(state.node.as_str());
                *pod = Arc::new(again);
            }
        }
    }

    pub fn apply_service(&mut self, key: ObjectKey, service: ServiceInfo) {
        self.state.services.services.insert(key, service);
    }

    pub fn delete_service(&mut self, key: &ObjectKey) {
        self.state.services.services.remove(key);
    }

    pub fn replace_services(&mut self, services: Vec<(ObjectKey, ServiceInfo)>) {
        self.state.services.services = services.into_iter().collect();
    }

    /// Adds or replaces one EndpointSlice (or Endpoints object).
    pub fn apply_slice(&mut self, key: ObjectKey, slice: SliceInfo) {
        self.state.services.slices.insert(key, slice);
    }

    pub fn delete_slice(&mut self, key: &ObjectKey) {
        self.state.services.slices.remove(key);
    }

    pub fn replace_slices(&mut self, slices: Vec<(ObjectKey, SliceInfo)>) {
        self.state.services.slices = slices.into_iter().collect();
    }
}

#[cfg(test)]
mod tests;
