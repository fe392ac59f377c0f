//! The pods this node's proxy serves: what capture handed it (the pod, its
//! network namespace) and their metric handles, made once per capture.
//! Inbound finds a destination's entry here; the fast-path collector lists
//! them. A [`PodHandle`] keeps a pod served; dropping it lets go.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use nodemesh_core::{
    labels::{Direction, PodLabels},
    names::PodUid,
    wire::TapPeer,
};
use tokio_util::sync::CancellationToken;

use super::admission::PodShare;
use crate::{
    netns::Netns,
    state::{Pod, StateStore},
    telemetry::{
        PodTcpMetrics,
        http::{HttpMetrics, Workload},
    },
};

/// One served pod.
#[derive(Debug)]
pub struct ServedPod {
    pub pod: Arc<Pod>,
    /// Where its upstream sockets are made (`None` in tests: the agent's
    /// own namespace).
    pub netns: Option<Arc<Netns>>,
    /// Its series as a client.
    pub outbound: PodTcpMetrics,
    /// Its series as a server, when the mesh routes between pods.
    pub inbound: Option<PodTcpMetrics>,
    /// Its share of the node's admission budgets.
    pub share: Arc<PodShare>,
    /// Its request series are its workload's, held while it is served.
    pub http: HttpMetrics,
    pub source: Workload,
    /// Connections its app accepted before it was captured may still be
    /// open (decided again whenever the policy may have changed, until
    /// none is left).
    pub precapture: std::sync::atomic::AtomicBool,
}

impl ServedPod {
    /// Its address a connection to `dst` comes from: as the state knows
    /// it, else (a pod whose address is not published yet — a Job's
    /// container can connect before the kubelet reports it) as its netns
    /// would send.
    pub fn address_for(&self, state: &StateStore, dst: SocketAddr) -> Option<IpAddr> {
        let v6 = dst.ip().to_canonical().is_ipv6();
        state.pod_ip(&self.pod.uid, v6).or_else(|| {
            let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
            self.netns
                .as_ref()?
                .source_ip(dst)
                .ok()
                .filter(|ip| ip.is_ipv6() == v6 && !ip.is_loopback() && !ip.is_unspecified())
        })
    }
}

/// `pod` as a tap event names one end.
pub fn tap_peer(pod: &Pod) -> TapPeer {
    TapPeer {
        namespace: pod.namespace.clone(),
        workload: format!("{}/{}", pod.workload.kind, pod.workload.name),
        pod: pod.name.clone(),
        identity: pod
            .identity()
            .map(|id| id.uri().to_owned())
            .unwrap_or_default(),
        addr: String::new(),
    }
}

/// `pod`'s workload, as the request metrics name it.
pub fn workload(pod: &Pod) -> Workload {
    Workload {
        namespace: pod.namespace.clone(),
        kind: pod.workload.kind.clone(),
        name: pod.workload.name.clone(),
        serviceaccount: pod.service_account.clone(),
    }
}

/// The metric labels of `pod` in `direction`.
pub fn labels(pod: &Pod, direction: Direction) -> PodLabels {
    PodLabels {
        namespace: pod.namespace.clone(),
        workload_kind: pod.workload.kind.clone(),
        workload_name: pod.workload.name.clone(),
        pod: pod.name.clone(),
        serviceaccount: pod.service_account.clone(),
        direction,
    }
}

/// The served pods by UID (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct ServedPods(Arc<RwLock<HashMap<PodUid, Arc<ServedPod>>>>);

impl ServedPods {
    pub fn get(&self, uid: &PodUid) -> Option<Arc<ServedPod>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    /// Every served pod now.
    pub fn all(&self) -> Vec<Arc<ServedPod>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn insert(&self, served: Arc<ServedPod>) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(served.pod.uid.clone(), served);
    }

    /// Removes `served`, unless another entry took its place meanwhile.
    fn remove(&self, served: &Arc<ServedPod>) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&served.pod.uid)
            .is_some_and(|e| Arc::ptr_eq(e, served))
        {
            map.remove(&served.pod.uid);
        }
    }
}

/// Keeps one pod served: its listener accepting, its entry and series in
/// place. Dropping it stops the listener (connections already accepted
/// carry on) and forgets the entry and the series.
#[derive(Debug)]
pub struct PodHandle {
    served: Arc<ServedPod>,
    pods: ServedPods,
    stop: CancellationToken,
}

impl PodHandle {
    /// Registers `served`; `stop` is its listener's.
    pub(super) fn new(served: Arc<ServedPod>, pods: ServedPods, stop: CancellationToken) -> Self {
        pods.insert(served.clone());
        Self { served, pods, stop }
    }

    pub fn served(&self) -> &Arc<ServedPod> {
        &self.served
    }

    /// Stops the pod's listener; its connections, inbound streams and
    /// series stay until the handle is dropped (shutdown: after the drain).
    pub fn stop_accepting(&self) {
        self.stop.cancel();
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        self.pods.remove(&self.served);
        self.served.outbound.remove();
        if let Some(inbound) = &self.served.inbound {
            inbound.remove();
        }
        self.served.http.release(&self.served.source);
    }
}
