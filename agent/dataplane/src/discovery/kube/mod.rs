//! Discovery from the Kubernetes API (kube-rs, rustls), into the state
//! store.
//!
//! Watches, each a list+watch that restarts with backoff when the API server
//! goes away and relists when it must:
//! - every Pod of the cluster, once: this node's are the ones to capture;
//!   every pod's address, node and identity route connections;
//! - Namespaces (their `nodemesh.io/mesh` label meshes all their pods);
//! - Services and EndpointSlices (v1, else v1beta1, else core Endpoints);
//! - `AuthorizationPolicy` objects (where the API server has none — an
//!   older install — none apply, and a warning says so).
//!
//! A relist replaces what the state had for that kind at once (nothing
//! stale survives, nothing is counted twice). Problems with single objects
//! on this node (a malformed label, an unknown owner kind) are logged and
//! counted once per object, and never stop the others.
mod convert;
pub mod events;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
mod uninstall;

pub use uninstall::{UninstallWatch, uninstalling};

use std::{collections::HashSet, pin::Pin, time::Duration};

use futures_util::{Stream, StreamExt, stream::select_all};
use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace as K8sNamespace, Node as K8sNode, Pod as K8sPod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use nodemesh_core::policy::{self, Policy};

use super::{SourceErrorReason, SourceMetrics};
use crate::state::{Namespace, ObjectKey, PodInfo, ServiceInfo, SliceInfo, StateStore, Update};

/// Which API serves endpoints here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointsApi {
    /// `discovery.k8s.io/v1` (Kubernetes 1.21+).
    SlicesV1,
    /// `discovery.k8s.io/v1beta1` (1.17–1.24).
    SlicesV1Beta1,
    /// core `v1` Endpoints.
    Endpoints,
}

impl EndpointsApi {
    /// Asks the API server, retrying until it answers.
    async fn discover(client: &Client, shutdown: &CancellationToken) -> Option<Self> {
        let mut delay = Duration::from_millis(200);
        loop {
            let served = |list: Result<
                k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList,
                kube::Error,
            >| {
                list.map(|l| l.resources.iter().any(|r| r.name == "endpointslices"))
            };
            match served(client.list_api_group_resources("discovery.k8s.io/v1").await) {
                Ok(true) => return Some(Self::SlicesV1),
                Ok(false) | Err(kube::Error::Api(_)) => {
                    match served(
                        client
                            .list_api_group_resources("discovery.k8s.io/v1beta1")
                            .await,
                    ) {
                        Ok(true) => return Some(Self::SlicesV1Beta1),
                        Ok(false) | Err(kube::Error::Api(_)) => return Some(Self::Endpoints),
                        Err(e) => warn!(error = %e, "cannot reach the API server; retrying"),
                    }
                }
                Err(e) => warn!(error = %e, "cannot reach the API server; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return None,
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

const POLICIES: &str = "authorizationpolicies";

type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

fn watch<K, F>(api: Api<K>, config: watcher::Config, kind: &'static str, wrap: F) -> Events
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(watcher::Event<K>) -> Event + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |r| match r {
            Ok(event) => wrap(event),
            Err(e) => Event::Error(kind, e),
        })
        .boxed()
}

/// What one watch event carries, for every watched kind. Each is moved
/// once, from its stream to `apply`: no point boxing the big ones.
#[allow(clippy::large_enum_variant)]
enum Event {
    Pod(watcher::Event<K8sPod>),
    Node(watcher::Event<K8sNode>),
    Namespace(watcher::Event<K8sNamespace>),
    Service(watcher::Event<Service>),
    Slice(watcher::Event<EndpointSlice>),
    SliceBeta(watcher::Event<DynamicObject>),
    Endpoints(watcher::Event<Endpoints>),
    Policy(watcher::Event<DynamicObject>),
    /// A watch failed; it retries by itself.
    Error(&'static str, watcher::Error),
}

/// The Kubernetes source.
pub struct KubeSource {
    pub client: Client,
    pub metrics: SourceMetrics,
    /// Where everything goes.
    pub state: StateStore,
}

impl KubeSource {
    /// Watches until `shutdown`, keeping the state current.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some(endpoints_api) = EndpointsApi::discover(&self.client, &shutdown).await else {
            return;
        };
        let node = self.state.node();
        info!(%node, endpoints = ?endpoints_api, "watching the Kubernetes API");
        let c = &self.client;
        let all = watcher::Config::default;
        let gvk = GroupVersionKind::gvk(policy::GROUP, policy::VERSION, policy::KIND);
        let policies = ApiResource::from_gvk_with_plural(&gvk, policy::PLURAL);
        self.state.expect_policies();
        self.state.expect_services();
        let mut streams: Vec<Events> = vec![
            watch(
                Api::<DynamicObject>::all_with(c.clone(), &policies),
                all(),
                POLICIES,
                Event::Policy,
            ),
            watch(Api::<K8sPod>::all(c.clone()), all(), "pods", Event::Pod),
            // Nodes' addresses: a tunnel peer vouches only for its own pods.
            watch(Api::<K8sNode>::all(c.clone()), all(), "nodes", Event::Node),
            watch(
                Api::<K8sNamespace>::all(c.clone()),
                all(),
                "namespaces",
                Event::Namespace,
            ),
            watch(
                Api::<Service>::all(c.clone()),
                all(),
                "services",
                Event::Service,
            ),
        ];
        streams.push(match endpoints_api {
            EndpointsApi::SlicesV1 => watch(
                Api::<EndpointSlice>::all(c.clone()),
                all(),
                "endpointslices",
                Event::Slice,
            ),
            EndpointsApi::SlicesV1Beta1 => {
                let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
                let resource = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
                watch(
                    Api::<DynamicObject>::all_with(c.clone(), &resource),
                    all(),
                    "endpointslices (v1beta1)",
                    Event::SliceBeta,
                )
            }
            EndpointsApi::Endpoints => watch(
                Api::<Endpoints>::all(c.clone()),
                all(),
                "endpoints",
                Event::Endpoints,
            ),
        });
        let mut events = select_all(streams);
        let mut source = Source::new(node.clone(), self.metrics.clone());
        source.events = Some(events::KubeEvents {
            client: self.client.clone(),
            node,
        });
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = shutdown.cancelled() => return,
            };
            let Some(event) = event else { return };
            source.apply(event, &self.state);
        }
    }
}

/// A relist in progress: the objects listed so far, applied at once when
/// the list is complete.
struct Relist<T>(Option<Vec<T>>);

impl<T> Default for Relist<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> Relist<T> {
    fn start(&mut self) {
        self.0 = Some(Vec::new());
    }
    fn push(&mut self, item: T) {
        self.0.get_or_insert_with(Vec::new).push(item);
    }
    fn finish(&mut self) -> Vec<T> {
        self.0.take().unwrap_or_default()
    }
}

/// The source's memory: relists in progress, what was reported.
struct Source {
    node: String,
    pods: Relist<PodInfo>,
    namespaces: Relist<(String, Namespace)>,
    nodes: Relist<(String, Vec<std::net::IpAddr>)>,
    services: Relist<(ObjectKey, ServiceInfo)>,
    slices: Relist<(ObjectKey, SliceInfo)>,
    policies: Relist<(ObjectKey, Policy)>,
    /// (object, problem) pairs already logged and counted.
    reported: HashSet<(String, String)>,
    /// Watches currently failing, so an outage is logged once.
    failing: HashSet<&'static str>,
    metrics: SourceMetrics,
    /// Tells owners of what the agent refuses to guess at (an unreadable
    /// inbound policy).
    events: Option<events::KubeEvents>,
    /// Namespaces whose inbound-policy annotation cannot be read: (uid,
    /// problem), and whether this agent told the namespace yet (it does
    /// once it has a pod there: the agents of nodes with none stay quiet).
    ns_policy_problems: std::collections::HashMap<String, (Option<String>, String, bool)>,
}

impl Source {
    fn new(node: String, metrics: SourceMetrics) -> Self {
        Self {
            node,
            pods: Relist::default(),
            namespaces: Relist::default(),
            nodes: Relist::default(),
            services: Relist::default(),
            slices: Relist::default(),
            policies: Relist::default(),
            reported: HashSet::new(),
            failing: HashSet::new(),
            metrics,
            events: None,
            ns_policy_problems: std::collections::HashMap::new(),
        }
    }

    /// Logs and counts a problem with one object, once; whether it is new.
    fn report(&mut self, object: &str, reason: SourceErrorReason, problem: String) -> bool {
        if self.reported.insert((object.to_owned(), problem.clone())) {
            warn!(object, %reason, %problem, "Kubernetes object partly ignored");
            self.metrics.error(reason);
            true
        } else {
            false
        }
    }

    /// A Warning Event for an unreadable inbound-policy annotation.
    fn policy_event(&self, about: events::About<'_>, problem: &str) {
        if let Some(events) = &self.events {
            events.warn(
                about,
                events::INVALID_POLICY,
                format!("nodemesh cannot read this inbound policy: {problem}"),
            );
        }
    }

    fn forget_reports(&mut self, object: &str) {
        self.reported.retain(|(o, _)| o != object);
    }

    fn recovered(&mut self, kind: &'static str) {
        if self.failing.remove(kind) {
            info!(watch = kind, "Kubernetes watch recovered");
        }
    }

    /// Reduces a pod, reporting its problems when it is on this node (other
    /// nodes' agents report theirs).
    fn pod(&mut self, p: &K8sPod) -> Option<PodInfo> {
        let (mut info, problems, policy_problem) = convert::pod_and_policy(p);
        // This node's agent reports this node's pods; finished ones are no
        // one's concern.
        let here = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node);
        // Another node's pod: only what routing and identity need here.
        if !here && let Some(i) = &mut info {
            convert::keep_remote(i);
        }
        if here && !info.as_ref().is_some_and(|i| i.terminal) {
            let object = convert::object_name(&p.metadata);
            let mut new = false;
            for (reason, problem) in problems {
                new |= self.report(&object, reason, problem);
            }
            if let (true, Some(problem), Some(info)) = (new, policy_problem, &info) {
                let uid = info.uid.to_string();
                self.policy_event(
                    events::About {
                        kind: "Pod",
                        namespace: Some(&info.namespace),
                        name: &info.name,
                        uid: Some(&uid),
                    },
                    &problem,
                );
            }
        }
        info
    }

    /// A namespace; a problem with its inbound policy is told (an Event)
    /// by the agents with a pod of it on their node.
    fn namespace(&mut self, ns: &K8sNamespace, state: &StateStore) -> (String, Namespace) {
        let (name, namespace, problem, policy_problem) = convert::namespace(ns);
        if let Some(problem) = problem {
            let reason = if problem.starts_with("annotation") {
                SourceErrorReason::InvalidAnnotation
            } else {
                SourceErrorReason::InvalidLabel
            };
            self.report(&format!("namespace/{name}"), reason, problem);
        }
        match policy_problem {
            Some(problem) => {
                let uid = ns.metadata.uid.clone();
                let told = self
                    .ns_policy_problems
                    .get(&name)
                    .is_some_and(|(u, p, told)| *told && *u == uid && *p == problem);
                self.ns_policy_problems
                    .insert(name.clone(), (uid, problem, told));
            }
            None => {
                self.ns_policy_problems.remove(&name);
            }
        }
        self.tell_namespaces(state);
        (name, namespace)
    }

    /// Posts the Warning Event of each namespace with an unreadable policy
    /// that has a pod on this node now and was not told yet — whichever
    /// came first, the namespace or the pod (at start, namespaces are
    /// listed before pods).
    fn tell_namespaces(&mut self, state: &StateStore) {
        let Some(events) = &self.events else {
            return;
        };
        for (name, (uid, problem, told)) in &mut self.ns_policy_problems {
            if !*told && state.has_local_pod_in(name) {
                events.warn(
                    events::About {
                        kind: "Namespace",
                        namespace: None,
                        name,
                        uid: uid.as_deref(),
                    },
                    events::INVALID_POLICY,
                    format!("nodemesh cannot read this inbound policy: {problem}"),
                );
                *told = true;
            }
        }
    }

    /// Applies one event to the state.
    fn apply(&mut self, event: Event, state: &StateStore) {
        use watcher::Event::*;
        let kind = match &event {
            Event::Error(kind, e) => {
                // No such kind (an older install), or no right to list it,
                // before the first list: none applies rather than nothing
                // ever being captured. Once listed, an error (a control
                // plane restarting) keeps the last known policies.
                if *kind == POLICIES
                    && let watcher::Error::InitialListFailed(kube::Error::Api(status)) = e
                    && matches!(status.code, 403 | 404)
                    && !state.policies_listed()
                {
                    warn!(
                        code = status.code,
                        "cannot list AuthorizationPolicies (is the CRD installed, and may the agent read it?); none applies until it can"
                    );
                    state.update(|u| u.replace_policies(Vec::new()));
                }
                if self.failing.insert(kind) {
                    warn!(watch = kind, error = %e, "Kubernetes watch failed; retrying with backoff");
                    self.metrics.error(SourceErrorReason::Watch);
                }
                return;
            }
            Event::Pod(_) => "pods",
            Event::Node(_) => "nodes",
            Event::Namespace(_) => "namespaces",
            Event::Service(_) => "services",
            Event::Slice(_) => "endpointslices",
            Event::SliceBeta(_) => "endpointslices (v1beta1)",
            Event::Endpoints(_) => "endpoints",
            Event::Policy(_) => POLICIES,
        };
        self.recovered(kind);
        match event {
            Event::Pod(event) => match event {
                Apply(p) => {
                    if let Some(info) = self.pod(&p) {
                        state.update(|u| u.apply_pod(info));
                        self.tell_namespaces(state);
                    }
                }
                InitApply(p) => {
                    if let Some(info) = self.pod(&p) {
                        self.pods.push(info);
                    }
                }
                Delete(p) => {
                    if let Some(info) = convert::pod(&p).0 {
                        state.update(|u| u.delete_pod(&info.uid));
                    }
                    self.forget_reports(&convert::object_name(&p.metadata));
                }
                Init => self.pods.start(),
                InitDone => {
                    let pods = self.pods.finish();
                    let (all, here) = (
                        pods.len(),
                        pods.iter()
                            .filter(|p| p.node.as_deref() == Some(&self.node))
                            .count(),
                    );
                    state.replace_pods(pods);
                    info!(pods = all, on_this_node = here, "pods listed");
                    self.tell_namespaces(state);
                }
            },
            Event::Namespace(event) => match event {
                Apply(ns) => {
                    let (name, ns) = self.namespace(&ns, state);
                    state.update(|u| u.apply_namespace(&name, ns));
                }
                InitApply(ns) => {
                    let entry = self.namespace(&ns, state);
                    self.namespaces.push(entry);
                }
                Delete(ns) => {
                    let name = ns.metadata.name.clone().unwrap_or_default();
                    state.update(|u| u.delete_namespace(&name));
                    self.forget_reports(&format!("namespace/{name}"));
                    self.ns_policy_problems.remove(&name);
                }
                Init => self.namespaces.start(),
                InitDone => {
                    let namespaces = self.namespaces.finish();
                    state.update(|u| u.replace_namespaces(namespaces));
                }
            },
            Event::Node(event) => {
                let reduce = |n: &K8sNode| (n.metadata.name.clone(), convert::node_addresses(n));
                // This node's zone: which endpoints are near.
                if let Apply(n) | InitApply(n) = &event
                    && n.metadata.name.as_deref() == Some(state.node().as_str())
                {
                    state.set_zone(convert::node_zone(n));
                }
                match event {
                    Apply(n) => {
                        let (name, addrs) = reduce(&n);
                        if let Some(name) = name {
                            state.set_node(name, addrs);
                        }
                    }
                    Delete(n) => {
                        if let Some(name) = &n.metadata.name {
                            state.remove_node(name);
                        }
                    }
                    Init => self.nodes.start(),
                    InitApply(n) => {
                        if let (Some(name), addrs) = reduce(&n) {
                            self.nodes.push((name, addrs));
                        }
                    }
                    InitDone => {
                        let all = self.nodes.finish();
                        state.update(|u| u.replace_nodes(all));
                    }
                }
            }
            Event::Service(event) => sync(
                event,
                &mut self.services,
                state,
                |s: &Service| Some((convert::meta_key(&s.metadata)?, convert::service_info(s))),
                |u, k, v| u.apply_service(k, v),
                |u, k| u.delete_service(k),
                |u, all| u.replace_services(all),
            ),
            Event::Slice(event) => sync(
                event,
                &mut self.slices,
                state,
                |s: &EndpointSlice| Some((convert::meta_key(&s.metadata)?, convert::slice_v1(s)?)),
                |u, k, v| u.apply_slice(k, v),
                |u, k| u.delete_slice(k),
                |u, all| u.replace_slices(all),
            ),
            Event::SliceBeta(event) => sync(
                event,
                &mut self.slices,
                state,
                |s: &DynamicObject| {
                    Some((convert::meta_key(&s.metadata)?, convert::slice_v1beta1(s)?))
                },
                |u, k, v| u.apply_slice(k, v),
                |u, k| u.delete_slice(k),
                |u, all| u.replace_slices(all),
            ),
            Event::Endpoints(event) => sync(
                event,
                &mut self.slices,
                state,
                |e: &Endpoints| Some((convert::meta_key(&e.metadata)?, convert::endpoints_v1(e)?)),
                |u, k, v| u.apply_slice(k, v),
                |u, k| u.delete_slice(k),
                |u, all| u.replace_slices(all),
            ),
            Event::Policy(event) => {
                let mut invalid = Vec::new();
                sync(
                    event,
                    &mut self.policies,
                    state,
                    |o: &DynamicObject| {
                        let (enforced, why) = convert::policy(o)?;
                        let key = convert::meta_key(&o.metadata)?;
                        if let Some(why) = why {
                            invalid.push((key.clone(), why));
                        }
                        Some((key, enforced?))
                    },
                    |u, k, v| u.apply_policy(k, Some(v)),
                    |u, k| u.delete_policy(k),
                    |u, all| u.replace_policies(all),
                );
                for (key, why) in invalid {
                    self.report(
                        &format!("authorizationpolicy/{}/{}", key.namespace, key.name),
                        SourceErrorReason::InvalidPolicy,
                        why,
                    );
                }
            }
            Event::Error(..) => {}
        }
    }
}

/// Applies one watch event of a kind keyed by `namespace/name`, with
/// `reduce` turning the object into what the state keeps.
fn sync<O: kube::Resource, V>(
    event: watcher::Event<O>,
    relist: &mut Relist<(ObjectKey, V)>,
    state: &StateStore,
    mut reduce: impl FnMut(&O) -> Option<(ObjectKey, V)>,
    apply: impl FnOnce(&mut Update<'_>, ObjectKey, V),
    delete: impl FnOnce(&mut Update<'_>, &ObjectKey),
    replace: impl FnOnce(&mut Update<'_>, Vec<(ObjectKey, V)>),
) {
    use watcher::Event::*;
    match event {
        Apply(o) => match (reduce(&o), convert::meta_key(o.meta())) {
            (Some((k, v)), _) => state.update(|u| apply(u, k, v)),
            // An object we cannot use replaces what we had for it.
            (None, Some(k)) => state.update(|u| delete(u, &k)),
            (None, None) => {}
        },
        InitApply(o) => {
            if let Some(kv) = reduce(&o) {
                relist.push(kv);
            }
        }
        Delete(o) => {
            if let Some(k) = convert::meta_key(o.meta()) {
                state.update(|u| delete(u, &k));
            }
        }
        Init => relist.start(),
        InitDone => {
            let all = relist.finish();
            state.update(|u| replace(u, all));
        }
    }
}

#[cfg(test)]
mod tests;
