//! The source's relists and live events, as the state sees them.
use std::net::SocketAddr;

use prometheus_client::registry::Registry;
use watcher::Event::*;

use super::*;
use crate::state::Target;

fn pod(name: &str, ip: &str, node: &str) -> K8sPod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"nodemesh.io/mesh": "enabled"}},
        "spec": {"nodeName": node, "containers": []},
        "status": {"phase": "Running", "podIP": ip, "hostIP": "192.168.0.1"}
    }))
    .expect("a pod")
}

fn owner(state: &StateStore, ip: &str) -> Option<String> {
    let dst = SocketAddr::new(ip.parse().expect("ip"), 80);
    match state.upstream(dst).target {
        Target::Pod(p) => Some(p.name.clone()),
        _ => None,
    }
}

#[test]
fn a_relist_replaces_everything_at_once_when_complete() {
    let state = StateStore::new("node-a", "cluster.local");
    let mut source = Source::new(
        "node-a".into(),
        SourceMetrics::new(&mut Registry::default()),
    );
    source.apply(Event::Namespace(Init), &state);
    source.apply(Event::Namespace(InitDone), &state);
    source.apply(Event::Pod(Init), &state);
    source.apply(
        Event::Pod(InitApply(pod("old", "10.1.0.2", "node-a"))),
        &state,
    );
    assert!(
        state.local_pods().is_none(),
        "nothing until the list is complete"
    );
    source.apply(Event::Pod(InitDone), &state);
    assert_eq!(owner(&state, "10.1.0.2").as_deref(), Some("old"));
    assert_eq!(state.local_pods().map(|p| p.len()), Some(1));

    // The API server went away and came back: a relist.
    source.apply(Event::Pod(Init), &state);
    source.apply(
        Event::Pod(InitApply(pod("new", "10.1.0.3", "node-b"))),
        &state,
    );
    assert_eq!(
        owner(&state, "10.1.0.2").as_deref(),
        Some("old"),
        "the old contents stay until the relist is done"
    );
    source.apply(Event::Pod(InitDone), &state);
    assert_eq!(owner(&state, "10.1.0.2"), None, "gone in the relist");
    assert_eq!(owner(&state, "10.1.0.3").as_deref(), Some("new"));
    assert_eq!(
        state.local_pods().map(|p| p.len()),
        Some(0),
        "not on this node"
    );

    // Live events.
    source.apply(Event::Pod(Apply(pod("late", "10.1.0.4", "node-a"))), &state);
    assert_eq!(owner(&state, "10.1.0.4").as_deref(), Some("late"));
    source.apply(
        Event::Pod(Delete(pod("late", "10.1.0.4", "node-a"))),
        &state,
    );
    assert_eq!(owner(&state, "10.1.0.4"), None);
}
