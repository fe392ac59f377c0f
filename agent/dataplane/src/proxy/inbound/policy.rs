//! Who may connect to a meshed pod: the `AuthorizationPolicy` objects that
//! select the pod and port, else the default policy of the pod's
//! annotation, else its namespace's, else the agent's; decided per
//! connection from what the agent knows of the client. A pure function,
//! tested below.
use std::net::IpAddr;

use nodemesh_core::names::InboundPolicy;

use crate::telemetry::InboundDenial;

/// The client of an inbound connection, as the agent knows it.
#[derive(Clone, Copy, Debug)]
pub enum Client<'a> {
    /// A meshed workload: its SPIFFE ID (from mutual TLS, or the agent's
    /// own knowledge of a pod on this node).
    Meshed(&'a str),
    /// Plaintext from this address.
    Plain(IpAddr),
}

/// What else the decision needs about the connection.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// The kubelet probing a probe port from the pod's node.
    pub probe: bool,
    /// The client's address is a pod's or a node's of the cluster.
    pub in_cluster: bool,
    /// What the authorization policies selecting the pod and port say:
    /// `None` when none does.
    pub authorized: Option<bool>,
}

/// Whether `policy` lets `client` in.
pub fn decide(
    policy: InboundPolicy,
    client: Client<'_>,
    facts: Facts,
) -> Result<(), InboundDenial> {
    if facts.probe {
        return Ok(());
    }
    match facts.authorized {
        Some(true) => return Ok(()),
        Some(false) => return Err(InboundDenial::Unauthorized),
        None => {}
    }
    match (policy, client) {
        (InboundPolicy::Deny, _) => Err(InboundDenial::Denied),
        (InboundPolicy::AllUnauthenticated, _) => Ok(()),
        (_, Client::Meshed(_)) => Ok(()),
        (InboundPolicy::AllAuthenticated, Client::Plain(_)) => Err(InboundDenial::Unauthenticated),
        (InboundPolicy::ClusterUnauthenticated, Client::Plain(_)) => {
            if facts.in_cluster {
                Ok(())
            } else {
                Err(InboundDenial::OutsideCluster)
            }
        }
    }
}

/// The install's `floor`, then the pod's `policy`: a client must pass
/// both — no annotation or policy object opens what the floor closes
/// (only the kubelet's probes pass it).
pub fn decide_under(
    floor: InboundPolicy,
    policy: InboundPolicy,
    client: Client<'_>,
    facts: Facts,
) -> Result<(), InboundDenial> {
    decide(
        floor,
        client,
        Facts {
            authorized: None,
            ..facts
        },
    )
    .and_then(|()| decide(policy, client, facts))
}

/// Whether deciding under `floor` and `policy` needs to know if the client
/// is in the cluster (a scan of the known addresses: asked only then).
pub fn asks_in_cluster(floor: InboundPolicy, policy: InboundPolicy) -> bool {
    [floor, policy].contains(&InboundPolicy::ClusterUnauthenticated)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Client<'static> = Client::Plain(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 9)));
    const MESHED: Client<'static> = Client::Meshed("spiffe://cluster.local/ns/shop/sa/web");

    fn facts(probe: bool, in_cluster: bool) -> Facts {
        Facts {
            probe,
            in_cluster,
            authorized: None,
        }
    }

    #[test]
    fn authorization_policies_decide_before_the_default() {
        let allowed = Facts {
            authorized: Some(true),
            ..facts(false, false)
        };
        let refused = Facts {
            authorized: Some(false),
            ..facts(false, false)
        };
        assert_eq!(decide(InboundPolicy::Deny, PLAIN, allowed), Ok(()));
        assert_eq!(
            decide(InboundPolicy::AllUnauthenticated, MESHED, refused),
            Err(InboundDenial::Unauthorized)
        );
        let probe = Facts {
            authorized: Some(false),
            ..facts(true, false)
        };
        assert_eq!(decide(InboundPolicy::Deny, PLAIN, probe), Ok(()));
    }

    #[test]
    fn each_policy_lets_in_whom_it_says() {
        use InboundPolicy::*;
        let anyone = facts(false, false);
        assert_eq!(decide(AllUnauthenticated, PLAIN, anyone), Ok(()));
        assert_eq!(decide(AllAuthenticated, MESHED, anyone), Ok(()));
        assert_eq!(
            decide(AllAuthenticated, PLAIN, anyone),
            Err(InboundDenial::Unauthenticated)
        );
        assert_eq!(
            decide(ClusterUnauthenticated, PLAIN, anyone),
            Err(InboundDenial::OutsideCluster)
        );
        assert_eq!(
            decide(ClusterUnauthenticated, PLAIN, facts(false, true)),
            Ok(())
        );
        assert_eq!(decide(ClusterUnauthenticated, MESHED, anyone), Ok(()));
        assert_eq!(decide(Deny, MESHED, anyone), Err(InboundDenial::Denied));
    }

    /// A floor of cluster-unauthenticated holds under a looser pod policy:
    /// in-cluster plaintext passes, outside plaintext does not; and a pod
    /// policy cannot open what the floor closes.
    #[test]
    fn the_floor_is_decided_with_the_facts_it_needs() {
        use InboundPolicy::*;
        assert!(asks_in_cluster(ClusterUnauthenticated, AllUnauthenticated));
        assert!(asks_in_cluster(AllUnauthenticated, ClusterUnauthenticated));
        assert!(!asks_in_cluster(AllAuthenticated, AllUnauthenticated));
        let floor = ClusterUnauthenticated;
        assert_eq!(
            decide_under(floor, AllUnauthenticated, PLAIN, facts(false, true)),
            Ok(())
        );
        assert_eq!(
            decide_under(floor, AllUnauthenticated, PLAIN, facts(false, false)),
            Err(InboundDenial::OutsideCluster)
        );
        let opened = Facts {
            authorized: Some(true),
            ..facts(false, false)
        };
        assert_eq!(
            decide_under(AllAuthenticated, Deny, PLAIN, opened),
            Err(InboundDenial::Unauthenticated)
        );
    }

    #[test]
    fn probes_from_the_node_pass_every_policy() {
        for policy in InboundPolicy::ALL {
            assert_eq!(
                decide(policy, PLAIN, facts(true, false)),
                Ok(()),
                "{policy:?}"
            );
        }
    }
}
