//! Routing: from what the state says about a destination to how the proxy
//! reaches it. A pure function: no I/O, no locks, tested below with every
//! case that matters. Balancing over Service endpoints grows here.
use std::{fmt, net::IpAddr, sync::Arc};

use nodemesh_core::identity::SpiffeId;

use crate::state::{Pod, Target, Upstream};

/// What routing knows of the node it runs on.
#[derive(Clone, Copy, Debug)]
pub struct RouteCtx<'a> {
    /// This node's name.
    pub node: &'a str,
    /// Whether meshed pods are routed as such (workload identity and the
    /// tunnel on). Off, everything goes straight to the destination.
    pub mesh: bool,
}

/// How to reach a destination.
#[derive(Clone, Debug)]
pub enum Route<'a> {
    /// Plain TCP from the client's netns, as without the mesh.
    Direct,
    /// A meshed pod on this node: straight to it (no TLS inside the node),
    /// through the inbound side so both ends are accounted.
    Local { dst: &'a Arc<Pod>, id: &'a SpiffeId },
    /// A meshed pod on another node: a stream of the mutual-TLS tunnel to
    /// that node's agent, as the client's identity.
    Tunnel {
        node_ip: IpAddr,
        src: &'a SpiffeId,
        dst: &'a SpiffeId,
    },
    /// Not routable now, and never to be sent in the clear: reset.
    Refuse(Refusal),
}

/// Why a connection is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The destination is meshed, on another node whose address is not
    /// known (yet).
    NodeUnknown { dst: String },
    /// The client pod has no valid identity to present.
    NoSourceIdentity,
    /// Several live pods claim the destination address.
    Conflict { claims: usize },
    /// A meshed pod had the address, and no live pod has it now.
    Stale,
    /// Routed to the tunnel, but this node runs none.
    NoTunnel,
    /// A Service lists the address on a node, but its pod is not known yet.
    Unseen,
    /// An address of the Service network that is no Service port known
    /// here (yet).
    UnknownService,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NodeUnknown { dst } => {
                write!(f, "{dst} is meshed but its node's address is not known yet")
            }
            Self::NoSourceIdentity => f.write_str("the source has no valid identity"),
            Self::Conflict { claims } => write!(
                f,
                "{claims} live pods claim the destination address; refusing to guess"
            ),
            Self::Stale => f.write_str(
                "a meshed pod that finished or is being deleted had this address, and no live pod has it",
            ),
            Self::NoTunnel => f.write_str("this node runs no tunnel"),
            Self::Unseen => f.write_str(
                "a Service lists this address on a node, but its pod is not known yet",
            ),
            Self::UnknownService => f.write_str(
                "the address is in the Service network (--service-cidr) but no Service port known here",
            ),
        }
    }
}

/// How `src` reaches `upstream`.
pub fn route<'a>(ctx: RouteCtx<'_>, src: &'a Pod, upstream: &'a Upstream) -> Route<'a> {
    if !ctx.mesh {
        return Route::Direct;
    }
    let dst = match &upstream.target {
        Target::Unknown => return Route::Direct,
        // Unmeshed claimants only: the kernel's choice is what it would be
        // without the mesh.
        Target::Conflict { meshed: false, .. } => return Route::Direct,
        Target::Conflict { claims, .. } => {
            return Route::Refuse(Refusal::Conflict { claims: *claims });
        }
        Target::Stale => return Route::Refuse(Refusal::Stale),
        Target::Unseen => return Route::Refuse(Refusal::Unseen),
        Target::UnknownService => return Route::Refuse(Refusal::UnknownService),
        // The caller picks an endpoint first; a cluster IP itself is what
        // kube-proxy would make of it.
        Target::Service(_) => return Route::Direct,
        Target::Pod(dst) => dst,
    };
    let Some(dst_id) = dst.identity().filter(|_| dst.meshed()) else {
        return Route::Direct;
    };
    match (&dst.node, dst.tunnel_ip(upstream.dst.ip().to_canonical())) {
        (Some(node), _) if node == ctx.node => Route::Local { dst, id: dst_id },
        (Some(_), Some(node_ip)) => match src.identity() {
            Some(src_id) => Route::Tunnel {
                node_ip,
                src: src_id,
                dst: dst_id,
            },
            None => Route::Refuse(Refusal::NoSourceIdentity),
        },
        // A meshed pod elsewhere whose node is not known yet: never
        // downgrade to plaintext.
        _ => Route::Refuse(Refusal::NodeUnknown {
            dst: dst_id.uri().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration, time::SystemTime};

    use super::*;
    use crate::state::{Namespace, PodInfo, StateStore, pod::test_pods};

    const ON: RouteCtx<'static> = RouteCtx {
        node: "node-a",
        mesh: true,
    };

    /// The state of a small cluster: `client` on node a; meshed pods on
    /// both nodes; an unmeshed one.
    fn cluster(extra: Vec<PodInfo>) -> StateStore {
        let store = StateStore::new("node-a", "cluster.local");
        let mut pods = vec![
            test_pods::meshed("shop", "client", "10.1.0.2", "node-a", "192.168.0.1"),
            test_pods::meshed("shop", "near", "10.1.0.3", "node-a", "192.168.0.1"),
            test_pods::meshed("shop", "far", "10.2.0.3", "node-b", "192.168.0.2"),
            test_pods::pod("plain", "server", "10.2.0.4", "node-b", "192.168.0.2"),
        ];
        pods.extend(extra);
        store.update(|u| u.replace_namespaces(vec![("shop".into(), Namespace::default())]));
        store.replace_pods(pods);
        store
    }

    fn client(store: &StateStore) -> Arc<Pod> {
        match store.upstream(addr("10.1.0.2")).target {
            Target::Pod(p) => p,
            other => panic!("the client pod: {other:?}"),
        }
    }

    fn addr(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 8080)
    }

    /// The route from the client to `ip`, as a short text.
    fn route_to(store: &StateStore, ctx: RouteCtx<'_>, ip: &str) -> String {
        let src = client(store);
        let upstream = store.upstream(addr(ip));
        match route(ctx, &src, &upstream) {
            Route::Direct => "direct".into(),
            Route::Local { dst, id } => format!("local {} {}", dst.name, id),
            Route::Tunnel { node_ip, src, dst } => format!("tunnel {node_ip} {src} -> {dst}"),
            Route::Refuse(why) => format!("refuse: {why}"),
        }
    }

    #[test]
    fn addresses_outside_the_cluster_and_unmeshed_pods_go_direct() {
        let store = cluster(vec![]);
        assert_eq!(route_to(&store, ON, "93.184.216.34"), "direct");
        assert_eq!(route_to(&store, ON, "10.2.0.4"), "direct", "unmeshed pod");
    }

    #[test]
    fn a_meshed_pod_on_this_node_is_reached_locally() {
        let store = cluster(vec![]);
        assert_eq!(
            route_to(&store, ON, "10.1.0.3"),
            "local near spiffe://cluster.local/ns/shop/sa/near"
        );
    }

    #[test]
    fn a_meshed_pod_on_another_node_goes_through_the_tunnel() {
        let store = cluster(vec![]);
        assert_eq!(
            route_to(&store, ON, "10.2.0.3"),
            "tunnel 192.168.0.2 spiffe://cluster.local/ns/shop/sa/client -> spiffe://cluster.local/ns/shop/sa/far"
        );
    }

    #[test]
    fn dual_stack_pods_are_reached_by_either_address_over_the_matching_node_address() {
        let mut dual = test_pods::meshed("shop", "dual", "10.2.0.5", "node-b", "192.168.0.2");
        dual.ips.push("fd00:2::5".parse().unwrap());
        dual.host_ips.push("fd00:ff::2".parse().unwrap());
        let mut v4_node = test_pods::meshed("shop", "v6only", "fd00:3::6", "node-c", "192.168.0.3");
        v4_node.ips = vec!["fd00:3::6".parse().unwrap()];
        let store = cluster(vec![dual, v4_node]);
        let far =
            "spiffe://cluster.local/ns/shop/sa/client -> spiffe://cluster.local/ns/shop/sa/dual";
        assert_eq!(
            route_to(&store, ON, "10.2.0.5"),
            format!("tunnel 192.168.0.2 {far}")
        );
        assert_eq!(
            route_to(&store, ON, "fd00:2::5"),
            format!("tunnel fd00:ff::2 {far}")
        );
        assert_eq!(
            route_to(&store, ON, "::ffff:10.2.0.5"),
            format!("tunnel 192.168.0.2 {far}"),
            "an IPv4-mapped address is the IPv4 pod"
        );
        assert!(
            route_to(&store, ON, "fd00:3::6").starts_with("tunnel 192.168.0.3 "),
            "a node with one family is reached over it"
        );
    }

    #[test]
    fn a_meshed_pod_whose_node_is_unknown_is_refused_never_plain() {
        let mut lost = test_pods::meshed("shop", "lost", "10.3.0.3", "node-c", "192.168.0.3");
        lost.host_ips.clear();
        let mut unscheduled = test_pods::meshed("shop", "nowhere", "10.3.0.4", "x", "192.168.0.3");
        unscheduled.node = None;
        let store = cluster(vec![lost, unscheduled]);
        assert_eq!(
            route_to(&store, ON, "10.3.0.3"),
            "refuse: spiffe://cluster.local/ns/shop/sa/lost is meshed but its node's address is not known yet"
        );
        assert!(route_to(&store, ON, "10.3.0.4").starts_with("refuse:"));
    }

    #[test]
    fn host_network_pods_are_not_meshed_endpoints() {
        let mut host = test_pods::meshed("shop", "hostnet", "192.168.0.2", "node-b", "192.168.0.2");
        host.host_network = true;
        let store = cluster(vec![host]);
        assert_eq!(route_to(&store, ON, "192.168.0.2"), "direct");
    }

    #[test]
    fn finished_and_deleted_pods_do_not_attract_their_old_address() {
        let mut done = test_pods::meshed("shop", "done", "10.2.0.9", "node-b", "192.168.0.2");
        done.terminal = true;
        let mut gone = test_pods::meshed("shop", "gone", "10.2.0.8", "node-b", "192.168.0.2");
        gone.deletion = Some(SystemTime::now() - Duration::from_secs(5));
        // The address of the finished pod is now an unmeshed pod's.
        let reuse = test_pods::pod("plain", "reuse", "10.2.0.9", "node-b", "192.168.0.2");
        let mut cron = test_pods::pod("plain", "cron", "10.2.0.7", "node-b", "192.168.0.2");
        cron.terminal = true;
        let store = cluster(vec![done, gone, reuse, cron]);
        assert_eq!(
            route_to(&store, ON, "10.2.0.9"),
            "direct",
            "the live owner's"
        );
        assert_eq!(
            route_to(&store, ON, "10.2.0.7"),
            "direct",
            "an unmeshed pod's old address"
        );
        // A meshed pod past its deletion time may still run (a late
        // kubelet, a skewed clock): not in the clear.
        assert!(route_to(&store, ON, "10.2.0.8").starts_with("refuse: a meshed pod that finished"));
    }

    #[test]
    fn duplicate_claims_on_an_address_are_refused_when_one_is_meshed() {
        let twin = test_pods::pod("plain", "twin", "10.2.0.3", "node-b", "192.168.0.2");
        let plain_twin = test_pods::pod("plain", "twin2", "10.2.0.4", "node-b", "192.168.0.2");
        let store = cluster(vec![twin, plain_twin]);
        assert_eq!(
            route_to(&store, ON, "10.2.0.3"),
            "refuse: 2 live pods claim the destination address; refusing to guess"
        );
        assert_eq!(
            route_to(&store, ON, "10.2.0.4"),
            "direct",
            "two unmeshed pods: what the kernel picks, as without the mesh"
        );
    }

    #[test]
    fn a_client_without_identity_cannot_use_the_tunnel() {
        let store = cluster(vec![]);
        let mut nameless = (*client(&store)).info().clone();
        nameless.service_account = "Not_Valid".into();
        store.update(|u| u.apply_pod(nameless));
        assert_eq!(
            route_to(&store, ON, "10.2.0.3"),
            "refuse: the source has no valid identity"
        );
    }

    #[test]
    fn with_the_mesh_off_everything_goes_direct() {
        let twin = test_pods::pod("plain", "twin", "10.2.0.3", "node-b", "192.168.0.2");
        let store = cluster(vec![twin]);
        let off = RouteCtx {
            node: "node-a",
            mesh: false,
        };
        for ip in ["10.1.0.3", "10.2.0.3", "10.2.0.4"] {
            assert_eq!(route_to(&store, off, ip), "direct", "{ip}");
        }
    }
}
