//! Discovery from the Kubernetes API (kube-rs, rustls).
//!
//! Watches, each a list+watch that restarts with backoff when the API server
//! goes away and relists when it must:
//! - Pods on this node (`spec.nodeName=<node>`) → the [`NodePods`] snapshot
//!   the capture loop reconciles against;
//! - Namespaces (their `nodemesh.io/mesh` label meshes all their pods);
//! - Services, EndpointSlices (v1, else v1beta1, else core Endpoints) and
//!   every pod in the cluster (slimmed down to address, node and identity)
//!   → the [`ServiceIndex`].
//!
//! Each object is reduced to the fields used as soon as it arrives.
//! Problems with single objects (a malformed label, an unknown owner kind)
//! are logged and counted once per object, and never stop the others.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures_util::{Stream, StreamExt, stream::select_all};
use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Namespace, Pod as K8sPod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    CgroupRef, MeshLabel, NodePods, Pod, PodUid, PodsTx, SourceErrorReason, SourceMetrics,
    Workload,
    services::{
        EndpointInfo, ObjectKey, PodIdentity, ServiceInfo, ServicePort, SharedIndex, SliceInfo,
        mesh_decision,
    },
};
use crate::cgroup::QosClass;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a cluster and no kubeconfig ({0}); pass --kubeconfig or --pod-file"
    )]
    Infer(kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(kube::Error),
}

/// A client from `kubeconfig`, or the in-cluster service account, or
/// `$KUBECONFIG`/`~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.to_owned(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Whether the agent's own DaemonSet is gone (deleted, or its RBAC with
/// it): then nodemesh is being uninstalled. Any other answer, including no
/// answer, means "keep the node's eBPF state".
pub async fn daemonset_gone(client: &Client, namespace: &str, name: &str) -> bool {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    match tokio::time::timeout(Duration::from_secs(5), api.get(name)).await {
        Ok(Ok(ds)) => ds.metadata.deletion_timestamp.is_some(),
        Ok(Err(kube::Error::Api(status))) => status.code == 404 || status.code == 403,
        _ => false,
    }
}

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

/// What one watch event carries, for every watched kind.
enum Update {
    NodePod(watcher::Event<K8sPod>),
    Namespace(watcher::Event<Namespace>),
    ClusterPod(watcher::Event<K8sPod>),
    Service(watcher::Event<Service>),
    Slice(watcher::Event<EndpointSlice>),
    SliceBeta(watcher::Event<DynamicObject>),
    Endpoints(watcher::Event<Endpoints>),
    /// A watch failed; it retries by itself.
    Error(&'static str, watcher::Error),
}

type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

fn watch<K, F>(api: Api<K>, config: watcher::Config, kind: &'static str, wrap: F) -> Updates
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(watcher::Event<K>) -> Update + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |r| match r {
            Ok(event) => wrap(event),
            Err(e) => Update::Error(kind, e),
        })
        .boxed()
}

/// A node pod, reduced to what capture needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodePod {
    pod: Pod,
    mesh_label: Option<MeshLabel>,
}

/// The Kubernetes pod source.
pub struct KubeSource {
    pub client: Client,
    pub node_name: String,
    pub metrics: SourceMetrics,
    pub index: SharedIndex,
}

impl KubeSource {
    /// Watches until `shutdown`, publishing node pod snapshots on `tx` and
    /// keeping the service index current.
    pub async fn run(self, tx: PodsTx, shutdown: CancellationToken) {
        let Some(endpoints_api) = EndpointsApi::discover(&self.client, &shutdown).await else {
            return;
        };
        info!(node = %self.node_name, endpoints = ?endpoints_api, "watching the Kubernetes API");
        let c = &self.client;
        let mut streams: Vec<Updates> = vec![
            watch(
                Api::<K8sPod>::all(c.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name)),
                "pods on this node",
                Update::NodePod,
            ),
            watch(
                Api::<Namespace>::all(c.clone()),
                watcher::Config::default(),
                "namespaces",
                Update::Namespace,
            ),
            watch(
                Api::<K8sPod>::all(c.clone()),
                watcher::Config::default(),
                "pods",
                Update::ClusterPod,
            ),
            watch(
                Api::<Service>::all(c.clone()),
                watcher::Config::default(),
                "services",
                Update::Service,
            ),
        ];
        streams.push(match endpoints_api {
            EndpointsApi::SlicesV1 => watch(
                Api::<EndpointSlice>::all(c.clone()),
                watcher::Config::default(),
                "endpointslices",
                Update::Slice,
            ),
            EndpointsApi::SlicesV1Beta1 => {
                let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
                let resource = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
                watch(
                    Api::<DynamicObject>::all_with(c.clone(), &resource),
                    watcher::Config::default(),
                    "endpointslices (v1beta1)",
                    Update::SliceBeta,
                )
            }
            EndpointsApi::Endpoints => watch(
                Api::<Endpoints>::all(c.clone()),
                watcher::Config::default(),
                "endpoints",
                Update::Endpoints,
            ),
        });
        let mut updates = select_all(streams);
        let mut state = State::new(self.metrics.clone());
        loop {
            let update = tokio::select! {
                u = updates.next() => u,
                _ = shutdown.cancelled() => return,
            };
            let Some(update) = update else { return };
            let node_changed = state.apply(update, &self.index);
            if node_changed && let Some(snapshot) = state.node_snapshot() {
                let changed = tx.send_if_modified(|current| {
                    if current.as_deref() == Some(&snapshot) {
                        false
                    } else {
                        *current = Some(Arc::new(snapshot));
                        true
                    }
                });
                if changed {
                    debug!("node pods changed");
                }
            }
        }
    }
}

/// The source's memory: node pods, namespace labels, what was reported.
struct State {
    node_pods: super::services::Synced<String, NodePod>,
    namespaces: super::services::Synced<String, Option<MeshLabel>>,
    /// (object, problem) pairs already logged and counted.
    reported: HashSet<(String, String)>,
    /// Watches currently failing, so an outage is logged once.
    failing: HashSet<&'static str>,
    metrics: SourceMetrics,
}

impl State {
    fn new(metrics: SourceMetrics) -> Self {
        Self {
            node_pods: Default::default(),
            namespaces: Default::default(),
            reported: HashSet::new(),
            failing: HashSet::new(),
            metrics,
        }
    }

    /// Logs and counts a problem with one object, once.
    fn report(&mut self, object: &str, reason: SourceErrorReason, problem: String) {
        if self.reported.insert((object.to_owned(), problem.clone())) {
            warn!(object, %reason, %problem, "Kubernetes object partly ignored");
            self.metrics.error(reason);
        }
    }

    fn forget_reports(&mut self, object: &str) {
        self.reported.retain(|(o, _)| o != object);
    }

    /// Applies one event; returns whether node pods or namespaces changed.
    fn apply(&mut self, update: Update, index: &SharedIndex) -> bool {
        use watcher::Event::*;
        if let Update::Error(kind, e) = update {
            if self.failing.insert(kind) {
                warn!(watch = kind, error = %e, "Kubernetes watch failed; retrying with backoff");
                self.metrics.error(SourceErrorReason::Watch);
            }
            return false;
        }
        let mut idx = index.write().unwrap_or_else(|p| p.into_inner());
        match update {
            Update::NodePod(event) => {
                self.recovered("pods on this node");
                match event {
                    Apply(p) => {
                        if let Some((uid, node_pod)) = self.node_pod(&p) {
                            self.node_pods.apply(uid, node_pod);
                        }
                    }
                    InitApply(p) => {
                        if let Some((uid, node_pod)) = self.node_pod(&p) {
                            self.node_pods.init_apply(uid, node_pod);
                        }
                    }
                    Delete(p) => {
                        if let Some(uid) = p.metadata.uid.as_deref() {
                            self.node_pods.delete(&uid.to_owned());
                            self.forget_reports(&object_name(&p.metadata));
                        }
                    }
                    Init => self.node_pods.init(),
                    InitDone => {
                        self.node_pods.init_done();
                        info!(pods = self.node_pods.len(), "pods on this node listed");
                    }
                }
                true
            }
            Update::Namespace(event) => {
                self.recovered("namespaces");
                let ns_change = |s: &mut Self, ns: &Namespace| -> (String, Option<MeshLabel>) {
                    let name = ns.metadata.name.clone().unwrap_or_default();
                    let labels = ns.metadata.labels.clone().unwrap_or_default();
                    let label = match MeshLabel::parse(&labels) {
                        Ok(l) => l,
                        Err(problem) => {
                            s.report(
                                &format!("namespace/{name}"),
                                SourceErrorReason::InvalidLabel,
                                problem,
                            );
                            None
                        }
                    };
                    (name, label)
                };
                match event {
                    Apply(ns) => {
                        let (name, label) = ns_change(self, &ns);
                        idx.namespaces.apply(name.clone(), label);
                        self.namespaces.apply(name, label);
                    }
                    InitApply(ns) => {
                        let (name, label) = ns_change(self, &ns);
                        idx.namespaces.init_apply(name.clone(), label);
                        self.namespaces.init_apply(name, label);
                    }
                    Delete(ns) => {
                        let name = ns.metadata.name.clone().unwrap_or_default();
                        idx.namespaces.delete(&name);
                        self.namespaces.delete(&name);
                        self.forget_reports(&format!("namespace/{name}"));
                    }
                    Init => {
                        idx.namespaces.init();
                        self.namespaces.init();
                    }
                    InitDone => {
                        idx.namespaces.init_done();
                        self.namespaces.init_done();
                    }
                }
                true
            }
            Update::ClusterPod(event) => {
                self.recovered("pods");
                match event {
                    Apply(p) => {
                        if let Some(uid) = p.metadata.uid.clone() {
                            idx.pod_apply(uid, pod_identity(&p));
                        }
                    }
                    InitApply(p) => {
                        if let Some(uid) = p.metadata.uid.clone() {
                            idx.pods.init_apply(uid, pod_identity(&p));
                        }
                    }
                    Delete(p) => {
                        if let Some(uid) = p.metadata.uid.as_deref() {
                            idx.pod_delete(uid);
                        }
                    }
                    Init => idx.pods.init(),
                    InitDone => idx.pods_init_done(),
                }
                false
            }
            Update::Service(event) => {
                self.recovered("services");
                sync(&mut idx.services, event, |s: &Service| {
                    Some((meta_key(&s.metadata)?, service_info(s)))
                });
                false
            }
            Update::Slice(event) => {
                self.recovered("endpointslices");
                sync(&mut idx.slices, event, |s: &EndpointSlice| {
                    Some((meta_key(&s.metadata)?, slice_v1(s)?))
                });
                false
            }
            Update::SliceBeta(event) => {
                self.recovered("endpointslices (v1beta1)");
                sync(&mut idx.slices, event, |s: &DynamicObject| {
                    Some((meta_key(&s.metadata)?, slice_v1beta1(s)?))
                });
                false
            }
            Update::Endpoints(event) => {
                self.recovered("endpoints");
                sync(&mut idx.slices, event, |e: &Endpoints| {
                    Some((meta_key(&e.metadata)?, endpoints_v1(e)?))
                });
                false
            }
            Update::Error(..) => false,
        }
    }

    fn recovered(&mut self, kind: &'static str) {
        if self.failing.remove(kind) {
            info!(watch = kind, "Kubernetes watch recovered");
        }
    }

    /// Reduces a node pod, reporting what is wrong with it. Pods whose
    /// containers have all finished are left out.
    fn node_pod(&mut self, p: &K8sPod) -> Option<(String, NodePod)> {
        let object = object_name(&p.metadata);
        let uid = p.metadata.uid.clone()?;
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let uid_ok = match PodUid::new(&uid) {
            Ok(u) => u,
            Err(problem) => {
                self.report(&object, SourceErrorReason::InvalidPod, problem);
                return None;
            }
        };
        let labels: BTreeMap<String, String> = p.metadata.labels.clone().unwrap_or_default();
        let mesh_label = match MeshLabel::parse(&labels) {
            Ok(l) => l,
            Err(problem) => {
                self.report(&object, SourceErrorReason::InvalidLabel, problem);
                None
            }
        };
        let (workload, owner_problem) = workload(p);
        if let Some(problem) = owner_problem {
            self.report(&object, SourceErrorReason::UnknownOwner, problem);
        }
        let status = p.status.as_ref();
        let spec = p.spec.as_ref();
        let pod = Pod {
            uid: uid_ok,
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            labels,
            workload,
            cgroup: CgroupRef::Kubelet {
                qos: status
                    .and_then(|s| s.qos_class.as_deref())
                    .and_then(QosClass::parse),
            },
            netns: None,
            meshed: false,
        };
        Some((uid, NodePod { pod, mesh_label }))
    }

    /// The node's pods with their mesh decision, once both the pods and the
    /// namespaces have been listed.
    fn node_snapshot(&self) -> Option<NodePods> {
        if !self.node_pods.synced() || !self.namespaces.synced() {
            return None;
        }
        let pods = self
            .node_pods
            .values()
            .map(|np| {
                let ns_label = self.namespaces.get(&np.pod.namespace).copied().flatten();
                let mut pod = np.pod.clone();
                pod.meshed = mesh_decision(np.mesh_label, ns_label);
                (pod.uid.clone(), Arc::new(pod))
            })
            .collect();
        Some(NodePods { pods })
    }
}

/// Applies one watch event to a synced map, with `f` reducing the object.
fn sync<V, O: kube::Resource>(
    map: &mut super::services::Synced<ObjectKey, V>,
    event: watcher::Event<O>,
    f: impl Fn(&O) -> Option<(ObjectKey, V)>,
) {
    use watcher::Event::*;
    match event {
        Apply(o) => match f(&o) {
            Some((k, v)) => map.apply(k, v),
            // An object we cannot use replaces what we had for it.
            None => {
                if let Some(k) = meta_key(o.meta()) {
                    map.delete(&k);
                }
            }
        },
        InitApply(o) => {
            if let Some((k, v)) = f(&o) {
                map.init_apply(k, v);
            }
        }
        Delete(o) => {
            if let Some(k) = meta_key(o.meta()) {
                map.delete(&k);
            }
        }
        Init => map.init(),
        InitDone => map.init_done(),
    }
}

fn meta_key(meta: &ObjectMeta) -> Option<ObjectKey> {
    Some(ObjectKey {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
    })
}

fn object_name(meta: &ObjectMeta) -> String {
    format!(
        "pod/{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The workload running a pod, and a problem if its owner is of an unknown
/// kind. A ReplicaSet made by a Deployment is named `<deployment>-<hash>`
/// where `<hash>` is the pod's `pod-template-hash` label: that names the
/// Deployment without asking the API server.
fn workload(p: &K8sPod) -> (Workload, Option<String>) {
    let pod_name = p.metadata.name.clone().unwrap_or_default();
    let owners = p.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return (
            Workload {
                kind: "pod".into(),
                name: pod_name,
            },
            None,
        );
    };
    let kind = owner.kind.to_ascii_lowercase();
    let named = |kind: &str, name: &str| Workload {
        kind: kind.into(),
        name: name.into(),
    };
    match kind.as_str() {
        "replicaset" => {
            let hash = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) if !deployment.is_empty() => {
                    (named("deployment", deployment), None)
                }
                _ => (named("replicaset", &owner.name), None),
            }
        }
        "statefulset" | "daemonset" | "job" | "replicationcontroller" | "cronjob" => {
            (named(&kind, &owner.name), None)
        }
        _ => (
            named(&kind, &owner.name),
            Some(format!(
                "owner {}/{} is of a kind nodemesh does not know; metrics use it as is",
                owner.kind, owner.name
            )),
        ),
    }
}

/// What the service index keeps of any pod.
fn pod_identity(p: &K8sPod) -> PodIdentity {
    let labels = p.metadata.labels.clone().unwrap_or_default();
    let status = p.status.as_ref();
    let parse = |s: Option<&String>| s.and_then(|ip| ip.parse::<IpAddr>().ok());
    PodIdentity {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        service_account: p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        host_ip: parse(status.and_then(|s| s.host_ip.as_ref())),
        ip: parse(status.and_then(|s| s.pod_ip.as_ref())),
        // Malformed values are reported by the node pod watch; here they
        // simply do not mesh.
        mesh_label: MeshLabel::parse(&labels).ok().flatten(),
    }
}

fn service_info(s: &Service) -> ServiceInfo {
    let spec = s.spec.as_ref();
    let mut cluster_ips: Vec<IpAddr> = spec
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .iter()
        .chain(spec.and_then(|s| s.cluster_ip.as_ref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    cluster_ips.sort();
    cluster_ips.dedup();
    let ports = spec
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.filter(|n| !n.is_empty()),
                port: u16::try_from(p.port).ok()?,
            })
        })
        .collect();
    ServiceInfo { cluster_ips, ports }
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn slice_v1(s: &EndpointSlice) -> Option<SliceInfo> {
    let service = ObjectKey {
        namespace: s.metadata.namespace.clone()?,
        name: s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone(),
    };
    let ports = s
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.clone().filter(|n| !n.is_empty()),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let endpoints = s
        .endpoints
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            EndpointInfo {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                node: e.node_name.clone(),
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            }
        })
        .collect();
    Some(SliceInfo {
        service,
        ports,
        endpoints,
    })
}

/// `discovery.k8s.io/v1beta1`, which the k8s-openapi types no longer
/// carry: the fields read from JSON.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BetaSlice {
    #[serde(default)]
    endpoints: Vec<BetaEndpoint>,
    #[serde(default)]
    ports: Vec<BetaPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BetaEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: BetaConditions,
    #[serde(default)]
    topology: BTreeMap<String, String>,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Default, Deserialize)]
struct BetaConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct BetaPort {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

fn slice_v1beta1(s: &DynamicObject) -> Option<SliceInfo> {
    let service = ObjectKey {
        namespace: s.metadata.namespace.clone()?,
        name: s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone(),
    };
    let beta: BetaSlice = match serde_json::from_value(s.data.clone()) {
        Ok(b) => b,
        Err(e) => {
            warn!(slice = ?s.metadata.name, error = %e, "malformed v1beta1 EndpointSlice ignored");
            return None;
        }
    };
    let ports = beta
        .ports
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.filter(|n| !n.is_empty()),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let endpoints = beta
        .endpoints
        .into_iter()
        .map(|e| {
            let ready = e.conditions.ready.unwrap_or(true);
            EndpointInfo {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                node: e
                    .node_name
                    .or_else(|| e.topology.get("kubernetes.io/hostname").cloned()),
                ready,
                serving: e.conditions.serving.unwrap_or(ready),
                terminating: e.conditions.terminating.unwrap_or(false),
            }
        })
        .collect();
    Some(SliceInfo {
        service,
        ports,
        endpoints,
    })
}

/// Core Endpoints: one object per Service, subsets of ready and not-ready
/// addresses.
fn endpoints_v1(e: &Endpoints) -> Option<SliceInfo> {
    let service = meta_key(&e.metadata)?;
    let mut ports = Vec::new();
    let mut endpoints = Vec::new();
    for subset in e.subsets.as_deref().unwrap_or_default() {
        for p in subset.ports.as_deref().unwrap_or_default() {
            if p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                && let Ok(port) = u16::try_from(p.port)
            {
                let entry = (p.name.clone().filter(|n| !n.is_empty()), port);
                if !ports.contains(&entry) {
                    ports.push(entry);
                }
            }
        }
        for (addresses, ready) in [
            (&subset.addresses, true),
            (&subset.not_ready_addresses, false),
        ] {
            for a in addresses.as_deref().unwrap_or_default() {
                endpoints.push(EndpointInfo {
                    addresses: a.ip.parse().into_iter().collect(),
                    node: a.node_name.clone(),
                    ready,
                    serving: ready,
                    terminating: false,
                });
            }
        }
    }
    Some(SliceInfo {
        service,
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn pod_owned_by(kind: &str, name: &str, hash: Option<&str>) -> K8sPod {
        let mut p = K8sPod::default();
        p.metadata.name = Some("p-1".into());
        p.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "x".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
        if let Some(h) = hash {
            p.metadata.labels = Some(BTreeMap::from([("pod-template-hash".into(), h.into())]));
        }
        p
    }

    #[test]
    fn workloads_from_owners() {
        let w = |p: &K8sPod| workload(p).0;
        assert_eq!(
            w(&pod_owned_by("ReplicaSet", "web-7d4b9c", Some("7d4b9c"))),
            Workload {
                kind: "deployment".into(),
                name: "web".into()
            }
        );
        assert_eq!(
            w(&pod_owned_by("ReplicaSet", "standalone", None)),
            Workload {
                kind: "replicaset".into(),
                name: "standalone".into()
            }
        );
        for kind in ["StatefulSet", "DaemonSet", "Job"] {
            let got = w(&pod_owned_by(kind, "x", None));
            assert_eq!(got.kind, kind.to_ascii_lowercase());
            assert_eq!(got.name, "x");
        }
        assert_eq!(w(&K8sPod::default()).kind, "pod");
        let (odd, problem) = workload(&pod_owned_by("Rollout", "canary", None));
        assert_eq!(
            odd,
            Workload {
                kind: "rollout".into(),
                name: "canary".into()
            }
        );
        assert!(problem.unwrap().contains("Rollout/canary"));
    }

    #[test]
    fn v1beta1_slices_are_read_from_json() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true},
                 "topology": {"kubernetes.io/hostname": "node-1"}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "terminating": true}}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"}]
        }))
        .unwrap();
        let slice = slice_v1beta1(&obj).expect("a slice");
        assert_eq!(slice.service.name, "web");
        assert_eq!(slice.ports, vec![(Some("http".into()), 8080)]);
        assert_eq!(slice.endpoints[0].node.as_deref(), Some("node-1"));
        assert!(slice.endpoints[0].ready && slice.endpoints[0].serving);
        assert!(!slice.endpoints[1].ready && slice.endpoints[1].terminating);
    }
}
