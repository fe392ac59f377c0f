//! The store's one way in: a batch of changes, applied under the write
//! lock, waking readers once at its end.
use std::sync::RwLockWriteGuard;

use super::*;

/// A batch of changes to the store (see [`StateStore::update`]).
pub struct Update<'a> {
    pub(super) state: RwLockWriteGuard<'a, ProxyState>,
    pub(super) local_changed: bool,
    /// Services or slices changed: the cluster IP index is rebuilt once,
    /// at the end of the batch.
    pub(super) services_changed: bool,
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
        self.local_changed |= self.state.insert(pod);
    }

    /// Forgets a pod.
    pub fn delete_pod(&mut self, uid: &PodUid) {
        self.local_changed |= self.state.remove(uid);
    }

    /// Adds or replaces a namespace; its pods are meshed again accordingly.
    pub fn apply_namespace(&mut self, name: &str, ns: Namespace) {
        if self.state.namespaces.get(name) == Some(&ns) {
            return;
        }
        self.state.namespaces.insert(name.to_owned(), ns);
        self.remesh(&HashSet::from([name.to_owned()]));
    }

    pub fn delete_namespace(&mut self, name: &str) {
        if self.state.namespaces.remove(name).is_some() {
            self.remesh(&HashSet::from([name.to_owned()]));
        }
    }

    /// Replaces every namespace with a complete list.
    pub fn replace_namespaces(&mut self, namespaces: Vec<(String, Namespace)>) {
        let fresh: HashMap<String, Namespace> = namespaces.into_iter().collect();
        let changed: HashSet<String> = self
            .state
            .namespaces
            .keys()
            .chain(fresh.keys())
            .filter(|n| self.state.namespaces.get(*n) != fresh.get(*n))
            .cloned()
            .collect();
        self.state.namespaces = fresh;
        self.remesh(&changed);
        if !self.state.synced.namespaces {
            self.state.synced.namespaces = true;
            self.local_changed = true;
        }
    }

    /// Applies the labels of the `changed` namespaces to their pods again
    /// (one pass over the pods, however many changed).
    fn remesh(&mut self, changed: &HashSet<String>) {
        if changed.is_empty() {
            return;
        }
        let state = &mut *self.state;
        let labels: HashMap<&String, Option<MeshLabel>> = changed
            .iter()
            .map(|n| (n, state.namespaces.get(n).and_then(|ns| ns.mesh_label)))
            .collect();
        for pod in state.pods.values_mut() {
            let Some(label) = labels.get(&pod.namespace) else {
                continue;
            };
            let again = pod.with_namespace(*label);
            if again.meshed() != pod.meshed() {
                self.local_changed |= state.local.contains(&pod.uid);
                *pod = Arc::new(again);
            }
        }
    }

    /// Adds or replaces an accepted policy (`None`: the object is not one
    /// that can be enforced, so any earlier version goes).
    pub fn apply_policy(&mut self, key: ObjectKey, policy: Option<Policy>) {
        match policy {
            Some(p) => {
                self.state.policies.insert(key, p);
            }
            None => {
                self.state.policies.remove(&key);
            }
        }
    }

    pub fn delete_policy(&mut self, key: &ObjectKey) {
        self.state.policies.remove(key);
    }

    /// Replaces every policy with a complete list (or none: the API has no
    /// such kind).
    pub fn replace_policies(&mut self, policies: Vec<(ObjectKey, Policy)>) {
        self.state.policies = policies.into_iter().collect();
        if !self.state.synced.policies {
            self.state.synced.policies = true;
            self.local_changed = true;
        }
    }

    pub fn apply_node(&mut self, name: String, addrs: Vec<IpAddr>) {
        self.state.nodes.insert(name, addrs);
    }

    /// This node's zone.
    pub fn apply_zone(&mut self, zone: Option<String>) {
        if self.state.zone != zone {
            self.state.zone = zone;
            self.services_changed = true;
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        self.state.nodes.remove(name);
    }

    pub fn replace_nodes(&mut self, nodes: Vec<(String, Vec<IpAddr>)>) {
        self.state.nodes = nodes.into_iter().collect();
    }

    pub fn apply_service(&mut self, key: ObjectKey, service: ServiceInfo) {
        if self.state.services.services.get(&key) != Some(&service) {
            self.state.services.services.insert(key, service);
            self.services_changed = true;
        }
    }

    pub fn delete_service(&mut self, key: &ObjectKey) {
        self.services_changed |= self.state.services.services.remove(key).is_some();
    }

    pub fn replace_services(&mut self, services: Vec<(ObjectKey, ServiceInfo)>) {
        self.state.services.services = services.into_iter().collect();
        self.services_changed = true;
        if !self.state.synced.services {
            self.state.synced.services = true;
            self.local_changed = true;
        }
    }

    /// Adds or replaces one EndpointSlice (or Endpoints object).
    pub fn apply_slice(&mut self, key: ObjectKey, slice: SliceInfo) {
        if self.state.services.slices.get(&key) != Some(&slice) {
            self.state.services.slices.insert(key, slice);
            self.services_changed = true;
        }
    }

    pub fn delete_slice(&mut self, key: &ObjectKey) {
        self.services_changed |= self.state.services.slices.remove(key).is_some();
    }

    pub fn replace_slices(&mut self, slices: Vec<(ObjectKey, SliceInfo)>) {
        self.state.services.slices = slices.into_iter().collect();
        self.services_changed = true;
        if !self.state.synced.slices {
            self.state.synced.slices = true;
            self.local_changed = true;
        }
    }
}
