//! The store: addresses, liveness, conflicts, meshing, relists, Services.
use std::time::Duration;

use super::{pod::test_pods, *};

fn store() -> StateStore {
    let store = StateStore::new("node-a", "cluster.local");
    store.update(|u| {
        u.replace_namespaces(vec![(
            "shop".into(),
            Namespace {
                mesh_label: Some(MeshLabel::Enabled),
                opaque_ports: Default::default(),
                inbound_policy: None,
            },
        )])
    });
    store.replace_pods(vec![
        test_pods::pod("shop", "web", "10.1.0.2", "node-a", "192.168.0.1"),
        test_pods::pod("other", "db", "10.2.0.3", "node-b", "192.168.0.2"),
    ]);
    store
}

fn owner(store: &StateStore, ip: &str) -> Target {
    store
        .upstream(SocketAddr::new(ip.parse().unwrap(), 80))
        .target
}

#[test]
fn pods_are_found_by_address_with_their_identity_and_meshing() {
    let store = store();
    let Target::Pod(web) = owner(&store, "10.1.0.2") else {
        panic!("web by its IP");
    };
    assert!(web.meshed(), "meshed by its namespace");
    assert_eq!(
        web.identity().map(|i| i.uri()),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    let Target::Pod(db) = owner(&store, "10.2.0.3") else {
        panic!("db by its IP");
    };
    assert!(!db.meshed());
    assert!(matches!(owner(&store, "10.9.9.9"), Target::Unknown));
}

#[test]
fn finished_and_deleted_pods_own_no_address() {
    // `shop` is meshed: an address a meshed pod left is stale, never plain.
    let store = store();
    let mut done = test_pods::pod("shop", "job", "10.1.0.7", "node-a", "192.168.0.1");
    done.terminal = true;
    let mut gone = test_pods::pod("shop", "old", "10.1.0.8", "node-a", "192.168.0.1");
    gone.deletion = Some(SystemTime::now() - Duration::from_secs(1));
    let mut going = test_pods::pod("shop", "going", "10.1.0.9", "node-a", "192.168.0.1");
    going.deletion = Some(SystemTime::now() + Duration::from_secs(30));
    store.update(|u| {
        u.apply_pod(done);
        u.apply_pod(gone);
        u.apply_pod(going);
    });
    assert!(matches!(owner(&store, "10.1.0.7"), Target::Stale));
    assert!(matches!(owner(&store, "10.1.0.8"), Target::Stale));
    // An unmeshed pod's old address is simply nobody's.
    let mut plain = test_pods::pod("other", "cron", "10.2.0.7", "node-b", "192.168.0.2");
    plain.terminal = true;
    store.update(|u| u.apply_pod(plain));
    assert!(matches!(owner(&store, "10.2.0.7"), Target::Unknown));
    assert!(
        matches!(owner(&store, "10.1.0.9"), Target::Pod(p) if p.name == "going"),
        "still within its grace"
    );
    // A finished pod's address taken by a new pod: the new one owns it.
    store.update(|u| {
        u.apply_pod(test_pods::pod(
            "shop",
            "new",
            "10.1.0.7",
            "node-a",
            "192.168.0.1",
        ))
    });
    assert!(matches!(owner(&store, "10.1.0.7"), Target::Pod(p) if p.name == "new"));
    let local: Vec<String> = store
        .local_pods()
        .unwrap()
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert!(!local.contains(&"job".to_owned()), "{local:?}");
    assert!(local.contains(&"going".to_owned()), "{local:?}");
}

#[test]
fn two_live_claims_on_one_address_are_a_conflict() {
    let store = store();
    store.update(|u| {
        u.apply_pod(test_pods::pod(
            "other",
            "twin",
            "10.1.0.2",
            "node-b",
            "192.168.0.2",
        ))
    });
    assert!(matches!(
        owner(&store, "10.1.0.2"),
        Target::Conflict {
            claims: 2,
            meshed: true
        }
    ));
    store.update(|u| u.delete_pod(&PodUid::new("uid-other-twin").unwrap()));
    assert!(matches!(owner(&store, "10.1.0.2"), Target::Pod(p) if p.name == "web"));
    // Unmeshed twins: a conflict nobody's traffic depends on the mesh for.
    store.update(|u| {
        u.apply_pod(test_pods::pod(
            "other",
            "twin",
            "10.2.0.3",
            "node-b",
            "192.168.0.2",
        ))
    });
    assert!(matches!(
        owner(&store, "10.2.0.3"),
        Target::Conflict {
            claims: 2,
            meshed: false
        }
    ));
}

#[test]
fn host_network_pods_own_no_pod_address() {
    let store = store();
    let mut host = test_pods::meshed(
        "kube-system",
        "proxy",
        "192.168.0.1",
        "node-a",
        "192.168.0.1",
    );
    let mut flagged = test_pods::pod("kube-system", "cni", "192.168.0.9", "node-a", "192.168.0.1");
    flagged.host_network = true;
    store.update(|u| {
        u.apply_pod(host.clone());
        u.apply_pod(flagged);
    });
    assert!(matches!(owner(&store, "192.168.0.1"), Target::Unknown));
    assert!(matches!(owner(&store, "192.168.0.9"), Target::Unknown));
    let local = store.local_pods().unwrap();
    let proxy = local.iter().find(|p| p.name == "proxy").unwrap();
    assert!(
        !proxy.meshed(),
        "a host-network pod is never meshed, whatever its label says"
    );
    // Moving off the host network gives it its address.
    host.ips = vec!["10.1.0.5".parse().unwrap()];
    store.update(|u| u.apply_pod(host));
    assert!(matches!(owner(&store, "10.1.0.5"), Target::Pod(_)));
}

#[test]
fn addresses_follow_their_pods_and_relists_replace_everything() {
    let store = store();
    let mut web = test_pods::pod("shop", "web", "10.1.0.4", "node-a", "192.168.0.1");
    store.update(|u| u.apply_pod(web.clone()));
    assert!(matches!(owner(&store, "10.1.0.2"), Target::Unknown));
    assert!(matches!(owner(&store, "10.1.0.4"), Target::Pod(_)));
    web.ips = vec!["10.1.0.6".parse().unwrap()];
    store.replace_pods(vec![web]);
    assert!(
        matches!(owner(&store, "10.2.0.3"), Target::Unknown),
        "gone in the relist"
    );
    assert!(matches!(owner(&store, "10.1.0.4"), Target::Unknown));
    assert!(matches!(owner(&store, "10.1.0.6"), Target::Pod(_)));
}

#[test]
fn local_pods_wait_for_a_complete_picture_and_follow_labels() {
    let store = StateStore::new("node-a", "cluster.local");
    let mut changes = store.local_changes();
    store.replace_pods(vec![test_pods::pod(
        "shop",
        "web",
        "10.1.0.2",
        "node-a",
        "192.168.0.1",
    )]);
    assert!(store.local_pods().is_none(), "namespaces not listed yet");
    store.update(|u| u.replace_namespaces(vec![]));
    let pods = store.local_pods().expect("both listed");
    assert_eq!(pods.len(), 1);
    assert!(!pods[0].meshed());
    assert!(changes.has_changed().unwrap());
    changes.mark_unchanged();
    // The namespace label meshes it; the pod label opts it out.
    store.update(|u| {
        u.apply_namespace(
            "shop",
            Namespace {
                mesh_label: Some(MeshLabel::Enabled),
                opaque_ports: Default::default(),
                inbound_policy: None,
            },
        )
    });
    assert!(changes.has_changed().unwrap());
    assert!(store.local_pods().unwrap()[0].meshed());
    changes.mark_unchanged();
    let mut out = test_pods::pod("shop", "web", "10.1.0.2", "node-a", "192.168.0.1");
    out.mesh_label = Some(MeshLabel::Disabled);
    store.update(|u| u.apply_pod(out));
    assert!(!store.local_pods().unwrap()[0].meshed());
    changes.mark_unchanged();
    // Other nodes' pods do not disturb this node.
    store.update(|u| {
        u.apply_pod(test_pods::pod(
            "shop",
            "far",
            "10.2.0.2",
            "node-b",
            "192.168.0.2",
        ))
    });
    assert!(!changes.has_changed().unwrap());
}

#[test]
fn services_list_their_endpoints_with_the_pods_behind_them() {
    let store = store();
    let key = |ns: &str, name: &str| ObjectKey {
        namespace: ns.into(),
        name: name.into(),
    };
    store.update(|u| {
        u.apply_service(
            key("shop", "web"),
            ServiceInfo {
                opaque_ports: Default::default(),
                cluster_ips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    app_protocol: None,
                }],
                prefer_zone: false,
            },
        );
        u.apply_slice(
            key("shop", "web-abc"),
            SliceInfo {
                service: key("shop", "web"),
                ports: vec![(Some("http".into()), 8080)],
                endpoints: vec![
                    EndpointInfo {
                        addresses: vec!["10.1.0.2".parse().unwrap()],
                        node: None,
                        ready: true,
                        serving: true,
                        terminating: false,
                        ..EndpointInfo::default()
                    },
                    EndpointInfo {
                        addresses: vec!["10.3.0.3".parse().unwrap()],
                        node: None,
                        ready: false,
                        serving: true,
                        terminating: true,
                        ..EndpointInfo::default()
                    },
                ],
            },
        );
    });
    let views = store.services();
    assert_eq!(views.len(), 1);
    let view = &views[0];
    assert_eq!(
        (view.namespace.as_str(), view.name.as_str()),
        ("shop", "web")
    );
    assert_eq!(view.addr, "10.96.0.10:80".parse().unwrap());
    let first = &view.endpoints[0];
    assert_eq!(first.addr, "10.1.0.2:8080".parse().unwrap());
    assert_eq!(first.node.as_deref(), Some("node-a"), "from the pod");
    assert_eq!(
        first.identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert!(first.meshed);
    let second = &view.endpoints[1];
    assert!(second.terminating && !second.ready);
    assert_eq!(second.identity, None, "pod unknown");

    // A connection to the cluster IP and port: the ready endpoints only.
    let Target::Service(target) = owner(&store, "10.96.0.10") else {
        panic!("the cluster IP is a Service's")
    };
    assert_eq!(target.service, key("shop", "web"));
    assert_eq!(&target.endpoints[..], &["10.1.0.2:8080".parse().unwrap()]);
    assert!(
        !matches!(
            store.upstream("10.96.0.10:81".parse().unwrap()).target,
            Target::Service(_)
        ),
        "another port is not the Service's"
    );
    store.update(|u| u.replace_slices(vec![]));
    assert!(store.services()[0].endpoints.is_empty());
    let Target::Service(target) = owner(&store, "10.96.0.10") else {
        panic!("still the Service's")
    };
    assert!(target.endpoints.is_empty(), "no endpoints left");

    // With the Service network configured, an address there that is no
    // Service port known here is refused, never sent direct.
    assert!(matches!(owner(&store, "10.96.0.99"), Target::Unknown));
    store.set_service_cidrs(vec![
        nodemesh_core::config::parse_ip_cidr("10.96.0.0/12").unwrap(),
    ]);
    assert!(matches!(
        owner(&store, "10.96.0.99"),
        Target::UnknownService
    ));
    assert!(matches!(
        store.upstream("10.96.0.10:81".parse().unwrap()).target,
        Target::UnknownService
    ));
    assert!(matches!(owner(&store, "10.96.0.10"), Target::Service(_)));
    assert!(matches!(owner(&store, "10.200.0.1"), Target::Unknown));
}

#[test]
fn nothing_is_captured_before_services_and_slices_are_listed() {
    let store = store();
    assert!(store.local_pods().is_some(), "a source without Services");
    store.expect_services();
    assert!(store.local_pods().is_none());
    store.update(|u| u.replace_services(vec![]));
    assert!(store.local_pods().is_none(), "slices still to come");
    store.update(|u| u.replace_slices(vec![]));
    assert!(store.local_pods().is_some());
}

#[test]
fn a_dual_stack_pod_owns_both_its_addresses_and_gives_both_back() {
    let store = store();
    let mut dual = test_pods::pod("shop", "dual", "10.1.0.5", "node-a", "192.168.0.1");
    dual.ips.push("fd00:1::5".parse().unwrap());
    store.update(|u| u.apply_pod(dual.clone()));
    for ip in ["10.1.0.5", "fd00:1::5", "::ffff:10.1.0.5"] {
        let Target::Pod(p) = owner(&store, ip) else {
            panic!("dual by {ip}");
        };
        assert_eq!(p.name, "dual");
    }
    // It loses its IPv6 address: only that one is let go.
    dual.ips.truncate(1);
    store.update(|u| u.apply_pod(dual.clone()));
    assert!(matches!(owner(&store, "fd00:1::5"), Target::Unknown));
    assert!(matches!(owner(&store, "10.1.0.5"), Target::Pod(_)));
    store.update(|u| u.delete_pod(&dual.uid));
    assert!(matches!(owner(&store, "10.1.0.5"), Target::Unknown));
}

#[test]
fn an_address_a_slice_puts_on_a_node_is_never_taken_for_outside_the_cluster() {
    let store = store();
    let key = ObjectKey {
        namespace: "shop".into(),
        name: "api-abc".into(),
    };
    let endpoint = |ip: &str, node: Option<&str>| EndpointInfo {
        addresses: vec![ip.parse().unwrap()],
        node: node.map(Into::into),
        ready: true,
        serving: true,
        terminating: false,
        ..EndpointInfo::default()
    };
    store.update(|u| {
        u.apply_slice(
            key.clone(),
            SliceInfo {
                service: ObjectKey {
                    namespace: "shop".into(),
                    name: "api".into(),
                },
                ports: vec![(None, 8080)],
                endpoints: vec![
                    endpoint("10.1.0.9", Some("node-a")),
                    endpoint("192.0.2.7", None),
                ],
            },
        )
    });
    assert!(
        matches!(owner(&store, "10.1.0.9"), Target::Unseen),
        "a pod whose object has not arrived: not plain on a guess"
    );
    assert!(
        matches!(owner(&store, "192.0.2.7"), Target::Unknown),
        "an endpoint outside the cluster (no node) is what it says"
    );
    store.update(|u| {
        u.apply_pod(test_pods::pod(
            "shop",
            "api",
            "10.1.0.9",
            "node-a",
            "192.168.0.1",
        ))
    });
    assert!(matches!(owner(&store, "10.1.0.9"), Target::Pod(_)));
}

/// A Node object changing what is not its addresses (status, labels: often)
/// wakes no one; new addresses, or its removal, do.
#[test]
fn a_node_wakes_the_state_only_when_its_addresses_change() {
    let state = StateStore::new("node-a", "cluster.local");
    let mut changes = state.changes();
    changes.borrow_and_update();
    let addrs = vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
    state.set_node("node-b".into(), addrs.clone());
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    state.set_node("node-b".into(), addrs);
    assert!(!changes.has_changed().unwrap(), "the same addresses");
    assert!(state.is_node_address("node-b", "fd00::2".parse().unwrap()));
    state.remove_node("node-b");
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    state.remove_node("node-b");
    assert!(!changes.has_changed().unwrap(), "an unknown node");
}

#[test]
fn a_services_endpoints_come_nearest_first() {
    let store = StateStore::new("node-a", "cluster.local");
    let key = |name: &str| ObjectKey {
        namespace: "shop".into(),
        name: name.into(),
    };
    let ep = |ip: &str, node: &str, zone: &str, hint: Option<&str>| EndpointInfo {
        addresses: vec![ip.parse().unwrap()],
        node: Some(node.into()),
        zone: Some(zone.into()),
        for_zones: hint.map(|h| vec![h.into()]),
        ready: true,
        serving: true,
        terminating: false,
    };
    let service = |prefer_zone: bool| ServiceInfo {
        opaque_ports: Default::default(),
        cluster_ips: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            name: None,
            port: 80,
            app_protocol: None,
        }],
        prefer_zone,
    };
    let slice = |endpoints: Vec<EndpointInfo>| SliceInfo {
        service: key("web"),
        ports: vec![(None, 8080)],
        endpoints,
    };
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let tiers = |store: &StateStore| match store.upstream(vip).target {
        Target::Service(t) => {
            let [a, b, c] = t.tiers();
            let s = |x: &[SocketAddr]| x.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>();
            (s(a), s(b), s(c))
        }
        other => panic!("{other:?}"),
    };
    store.update(|u| {
        u.apply_service(key("web"), service(false));
        u.apply_slice(
            key("web-1"),
            slice(vec![
                ep("10.1.0.2", "node-a", "z1", None),
                ep("10.2.0.2", "node-b", "z1", None),
                ep("10.3.0.2", "node-c", "z2", None),
            ]),
        );
    });
    // This node's first; no zone preference asked.
    let all = ["10.1.0.2", "10.2.0.2", "10.3.0.2"];
    assert_eq!(
        tiers(&store),
        (
            vec!["10.1.0.2".into()],
            vec![],
            all.iter().map(|s| s.to_string()).collect()
        )
    );
    // PreferClose, this node's zone not known yet: nothing for the zone.
    store.update(|u| u.apply_service(key("web"), service(true)));
    assert!(tiers(&store).1.is_empty());
    // Its zone known: the zone's endpoints.
    store.set_zone(Some("z1".into()));
    assert_eq!(tiers(&store).1, vec!["10.1.0.2", "10.2.0.2"]);
    // Hints, when every endpoint has them, say which are for the zone.
    store.update(|u| {
        u.apply_slice(
            key("web-1"),
            slice(vec![
                ep("10.1.0.2", "node-a", "z1", Some("z1")),
                ep("10.2.0.2", "node-b", "z1", Some("z2")),
                ep("10.3.0.2", "node-c", "z2", Some("z1")),
            ]),
        );
    });
    assert_eq!(tiers(&store).1, vec!["10.1.0.2", "10.3.0.2"]);
    assert_eq!(tiers(&store).2.len(), 3);
}
