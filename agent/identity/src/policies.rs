//! Keeps the `Accepted` condition of every `AuthorizationPolicy`: `True`
//! when the agents enforce it, `False` with the reason when they cannot
//! (what the CRD's schema could not catch); and its `Meshed` condition
//! with `status.unmeshedPods`: the pods it selects that are not meshed,
//! which it does not protect (their connections never reach an agent).
//! One writer for the cluster — the agents check the same way but never
//! write. Pods come and go: every policy is looked at again every 30 s.
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::ListParams;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use nodemesh_core::{
    names::{MeshLabel, mesh_decision},
    policy::{self, ACCEPTED, MESHED, Policy, PolicySpec},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What the condition should say about `o`.
fn verdict(o: &DynamicObject) -> (bool, &'static str, String) {
    let ns = o.metadata.namespace.as_deref().unwrap_or_default();
    let name = o.metadata.name.as_deref().unwrap_or_default();
    let spec = o.data.get("spec").cloned().unwrap_or_default();
    match serde_json::from_value::<PolicySpec>(spec)
        .map_err(|e| format!("spec: {e}"))
        .and_then(|spec| Policy::new(ns, name, &spec))
    {
        Ok(_) => (
            true,
            "Accepted",
            "in force: enforced by every agent on new connections".to_owned(),
        ),
        Err(why) => {
            let spec = serde_json::from_value::<PolicySpec>(
                o.data.get("spec").cloned().unwrap_or_default(),
            );
            match spec.ok().and_then(|s| Policy::fail_closed(ns, name, &s)) {
                Some(_) => (
                    false,
                    "Invalid",
                    format!(
                        "not accepted: {why}; until fixed, the pods and ports it selects admit nobody"
                    ),
                ),
                None => (false, "Invalid", format!("not enforced: {why}")),
            }
        }
    }
}

/// A condition as it is now, if any.
fn current<'a>(o: &'a DynamicObject, kind: &str) -> Option<&'a Value> {
    o.data
        .get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// At most this many unmeshed pods are named.
const MAX_NAMED: usize = 20;

/// The pods `o` selects that are not meshed (sorted, at most
/// [`MAX_NAMED`]), and how many there are.
async fn unmeshed(client: &Client, o: &DynamicObject) -> Result<(Vec<String>, usize), kube::Error> {
    let ns = o.metadata.namespace.as_deref().unwrap_or_default();
    let name = o.metadata.name.as_deref().unwrap_or_default();
    let spec =
        serde_json::from_value::<PolicySpec>(o.data.get("spec").cloned().unwrap_or_default());
    let Some(policy) = spec.ok().and_then(|s| {
        Policy::new(ns, name, &s)
            .ok()
            .or_else(|| Policy::fail_closed(ns, name, &s))
    }) else {
        return Ok((Vec::new(), 0));
    };
    let namespace_label = Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await?
        .and_then(|n| n.metadata.labels)
        .and_then(|l| MeshLabel::parse(&l).ok().flatten());
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let mut names: Vec<String> = pods
        .items
        .iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter(|p| {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            if !policy.selects_pod(ns, &labels) {
                return false;
            }
            let host = p
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            let own = MeshLabel::parse(&labels).ok().flatten();
            host || !mesh_decision(own, namespace_label)
        })
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    let total = names.len();
    names.truncate(MAX_NAMED);
    Ok((names, total))
}

/// One condition as it should be, keeping its transition time when its
/// status stays.
fn condition(
    o: &DynamicObject,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: i64,
) -> (Value, bool) {
    let status = if ok { "True" } else { "False" };
    let now = current(o, kind);
    let same = |field: &str, want: Value| now.and_then(|c| c.get(field)) == Some(&want);
    let unchanged = same("status", json!(status))
        && same("reason", json!(reason))
        && same("message", json!(message))
        && same("observedGeneration", json!(generation));
    // The transition time moves only when the status does.
    let since = now
        .filter(|c| c.get("status") == Some(&json!(status)))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()));
    (
        json!({
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": since,
        }),
        unchanged,
    )
}

/// Writes the conditions of `o` when they are not already what they should
/// be.
async fn reconcile(
    api: &Api<DynamicObject>,
    client: &Client,
    o: &DynamicObject,
) -> Result<(), kube::Error> {
    let (Some(ns), Some(name)) = (&o.metadata.namespace, &o.metadata.name) else {
        return Ok(());
    };
    let (accepted, reason, message) = verdict(o);
    let generation = o.metadata.generation.unwrap_or_default();
    let (names, total) = unmeshed(client, o).await?;
    let (meshed_reason, meshed_message) = if total == 0 {
        ("AllMeshed", "every pod it selects is meshed".to_owned())
    } else {
        (
            "UnmeshedPods",
            format!(
                "{total} pods it selects are not meshed, so it does not protect them: {}{}",
                names.join(", "),
                if total > names.len() { ", …" } else { "" }
            ),
        )
    };
    let (accepted_condition, same_accepted) =
        condition(o, ACCEPTED, accepted, reason, &message, generation);
    let (meshed_condition, same_meshed) = condition(
        o,
        MESHED,
        total == 0,
        meshed_reason,
        &meshed_message,
        generation,
    );
    let named = o.data.get("status").and_then(|s| s.get("unmeshedPods"));
    if same_accepted && same_meshed && named == Some(&json!(names)) {
        return Ok(());
    }
    let patch = json!({
        "status": {
            "conditions": [accepted_condition, meshed_condition],
            "unmeshedPods": names,
        }
    });
    let api = Api::<DynamicObject>::namespaced_with(api.clone().into_client(), ns, &resource());
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    if accepted {
        info!(policy = %format_args!("{ns}/{name}"), generation, "authorization policy accepted");
    } else {
        warn!(policy = %format_args!("{ns}/{name}"), generation, %message, "authorization policy not enforced");
    }
    Ok(())
}

fn resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(policy::GROUP, policy::VERSION, policy::KIND);
    ApiResource::from_gvk_with_plural(&gvk, policy::PLURAL)
}

/// How often every policy is looked at again (the pods it selects change).
const RESYNC: Duration = Duration::from_secs(30);

/// Watches every policy until `shutdown`, keeping their conditions.
pub async fn keep_status(client: Client, shutdown: CancellationToken) {
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource());
    // The policies as last seen (a relist drops those gone meanwhile), to
    // look at again on the resync.
    let writer = kube::runtime::reflector::store::Writer::<DynamicObject>::new(resource());
    let known = writer.as_reader();
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .boxed();
    let mut failing = false;
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    loop {
        let objects = tokio::select! {
            e = events.next() => {
                let Some(event) = e else { return };
                match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        failing = false;
                        vec![std::sync::Arc::new(o)]
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        if !failing {
                            warn!(error = %e, "cannot watch AuthorizationPolicies; retrying with backoff");
                            failing = true;
                        }
                        continue;
                    }
                }
            }
            _ = resync.tick() => known.state(),
            _ = shutdown.cancelled() => return,
        };
        for object in objects {
            // A failed write is tried again at the next change or resync;
            // a short pause keeps a refusing API server from being
            // hammered.
            if let Err(e) = reconcile(&api, &client, &object).await {
                debug!(error = %e, "cannot write an authorization policy's status");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
