//! Pods as the state store keeps them: what discovery learnt ([`PodInfo`]),
//! plus what the store resolves once per change, never per connection (the
//! validated identity, whether the pod is meshed).
use std::{collections::BTreeMap, net::IpAddr, ops::Deref, path::PathBuf, time::SystemTime};

use nodemesh_core::{
    identity::{Identity, SpiffeId},
    names::{InboundPolicy, MeshLabel, PodUid, PortSet},
};

use crate::cgroup::QosClass;

/// Where a pod's cgroup is, below the agent's cgroup root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupRef {
    /// This path, relative to the root.
    Path(PathBuf),
    /// Wherever kubelet put it: found from the pod's UID and QoS class
    /// (either cgroup driver).
    Kubelet { qos: Option<QosClass> },
}

/// What runs the pod: the owner kind (lowercase: `deployment`,
/// `statefulset`, `daemonset`, `job`, …, or `pod` for a bare pod) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// A pod's own limits, from its annotations, in place of the node's
/// defaults (each within the node's budget).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodLimits {
    /// Connections through the proxy at once.
    pub max_connections: Option<usize>,
    /// HTTP requests in flight.
    pub max_requests: Option<usize>,
    /// How long an opaque connection may stay silent both ways.
    pub idle_timeout: Option<std::time::Duration>,
}

/// A pod as discovery (the API server, or the pod file) describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    /// The pod's addresses (`status.podIPs`: the primary first, at most one
    /// per family); a pod is captured only once it has one.
    pub ips: Vec<IpAddr>,
    /// The node it is scheduled to.
    pub node: Option<String>,
    /// Its node's addresses (`status.hostIPs`, else `status.hostIP`; the
    /// primary first): where the node's tunnel is.
    pub host_ips: Vec<IpAddr>,
    /// It runs in its node's network namespace (`spec.hostNetwork`): its
    /// address is the node's, never a meshed pod's.
    pub host_network: bool,
    pub service_account: String,
    pub workload: Workload,
    pub cgroup: CgroupRef,
    /// The pod's netns; when absent, that of its sandbox's process (in its
    /// cgroup: the container cgroup that is none of `container_ids`).
    pub netns: Option<PathBuf>,
    /// Its containers' runtime ids (`status.containerStatuses` and the
    /// init and ephemeral ones), for pods on this node: what is not the
    /// sandbox.
    pub container_ids: Vec<String>,
    /// Its own `nodemesh.io/mesh` label.
    pub mesh_label: Option<MeshLabel>,
    /// Its `config.nodemesh.io/opaque-ports` annotation (its own ports).
    pub opaque_ports: PortSet,
    /// Its `config.nodemesh.io/skip-inbound-ports`: not captured inbound.
    pub skip_inbound_ports: Vec<u16>,
    /// Its `config.nodemesh.io/default-inbound-policy`.
    pub inbound_policy: Option<InboundPolicy>,
    /// Its own limits (`config.nodemesh.io/max-connections`, …).
    pub limits: PodLimits,
    /// Its labels (what `AuthorizationPolicy` selectors match).
    pub labels: BTreeMap<String, String>,
    /// The ports its containers' probes use: the kubelet reaches them from
    /// the node whatever the policy.
    pub probe_ports: Vec<u16>,
    /// Its phase is `Succeeded` or `Failed`: its containers are done.
    pub terminal: bool,
    /// When it is being deleted: the time by which it is gone
    /// (`metadata.deletionTimestamp`, which already includes the grace).
    pub deletion: Option<SystemTime>,
}

impl PodInfo {
    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Where the capture of this pod must be redone if it changes (not its
    /// addresses: a pod is captured before it has them).
    pub fn same_placement(&self, other: &PodInfo) -> bool {
        self.cgroup == other.cgroup && self.netns == other.netns
    }

    /// Whether its containers may still run at `now`: not in a terminal
    /// phase, and not past its deletion grace.
    pub fn is_live(&self, now: SystemTime) -> bool {
        !self.terminal && self.deletion.is_none_or(|gone_by| now < gone_by)
    }

    /// It runs in its node's network namespace: flagged so, or an address
    /// of it is its node's.
    pub fn on_host_network(&self) -> bool {
        self.host_network || self.ips.iter().any(|ip| self.host_ips.contains(ip))
    }

    /// The addresses this pod claims (owns while it is live): host-network
    /// pods claim none, their addresses are the node's.
    pub(super) fn claimed_ips(&self) -> &[IpAddr] {
        if self.on_host_network() {
            &[]
        } else {
            &self.ips
        }
    }

    /// Where to reach its node's tunnel for a connection to `dst`: the
    /// node's address of the same family if it has one (an IPv6 pod on a
    /// dual-stack node is reached over IPv6), else its primary address.
    pub fn tunnel_ip(&self, dst: IpAddr) -> Option<IpAddr> {
        self.host_ips
            .iter()
            .find(|ip| ip.is_ipv6() == dst.is_ipv6())
            .or(self.host_ips.first())
            .copied()
    }
}

/// A pod in the store: [`PodInfo`] and what the store resolved from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    info: PodInfo,
    identity: Option<SpiffeId>,
    meshed: bool,
}

impl Pod {
    pub(super) fn resolve(info: PodInfo, trust_domain: &str, namespace: Option<MeshLabel>) -> Self {
        let identity = Identity::new(&info.namespace, &info.service_account)
            .ok()
            .map(|id| SpiffeId::new(id, trust_domain));
        let meshed = meshed(&info, namespace);
        Self {
            info,
            identity,
            meshed,
        }
    }

    /// The same pod with its namespace's label applied again.
    pub(super) fn with_namespace(&self, namespace: Option<MeshLabel>) -> Self {
        Self {
            info: self.info.clone(),
            identity: self.identity.clone(),
            meshed: meshed(&self.info, namespace),
        }
    }

    /// Its workload identity; `None` when its names are not a valid one
    /// (the API server never makes such pods).
    pub fn identity(&self) -> Option<&SpiffeId> {
        self.identity.as_ref()
    }

    /// Whether the mesh carries its connections: its own label, else its
    /// namespace's; never for a host-network pod (its sockets are the
    /// node's, shared with every other host-network pod).
    pub fn meshed(&self) -> bool {
        self.meshed
    }

    pub fn info(&self) -> &PodInfo {
        &self.info
    }
}

impl Deref for Pod {
    type Target = PodInfo;

    fn deref(&self) -> &PodInfo {
        &self.info
    }
}

/// Its own label first, then its namespace's; host-network pods never.
fn meshed(info: &PodInfo, namespace: Option<MeshLabel>) -> bool {
    !info.on_host_network() && nodemesh_core::names::mesh_decision(info.mesh_label, namespace)
}

#[cfg(test)]
pub(crate) mod test_pods {
    //! Pods for tests of the store and of what reads it.
    use super::*;

    /// A live, unmeshed pod `ns/name` with `ip` on `node` (host `node_ip`).
    pub fn pod(ns: &str, name: &str, ip: &str, node: &str, node_ip: &str) -> PodInfo {
        PodInfo {
            uid: PodUid::new(&format!("uid-{ns}-{name}")).expect("uid"),
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip.parse().expect("ip")],
            node: Some(node.into()),
            host_ips: vec![node_ip.parse().expect("node ip")],
            host_network: false,
            service_account: name.into(),
            workload: Workload {
                kind: "pod".into(),
                name: name.into(),
            },
            cgroup: CgroupRef::Kubelet { qos: None },
            netns: None,
            container_ids: Vec::new(),
            mesh_label: None,
            opaque_ports: PortSet::default(),
            skip_inbound_ports: Vec::new(),
            inbound_policy: None,
            limits: PodLimits::default(),
            labels: BTreeMap::new(),
            probe_ports: Vec::new(),
            terminal: false,
            deletion: None,
        }
    }

    /// The same, meshed by its own label.
    pub fn meshed(ns: &str, name: &str, ip: &str, node: &str, node_ip: &str) -> PodInfo {
        PodInfo {
            mesh_label: Some(MeshLabel::Enabled),
            ..pod(ns, name, ip, node, node_ip)
        }
    }
}
