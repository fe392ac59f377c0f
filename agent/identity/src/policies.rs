//! Keeps the `Accepted` condition of every `AuthorizationPolicy`: `True`
//! when the agents enforce it, `False` with the reason when they cannot
//! (what the CRD's schema could not catch). One writer for the cluster —
//! the agents check the same way but never write.
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use nodemesh_core::policy::{self, ACCEPTED, Policy, PolicySpec};
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

/// The condition as it is now, if any.
fn current(o: &DynamicObject) -> Option<&Value> {
    o.data
        .get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(ACCEPTED))
}

/// Writes the condition of `o` when it is not already what it should be.
async fn reconcile(api: &Api<DynamicObject>, o: &DynamicObject) -> Result<(), kube::Error> {
    let (Some(ns), Some(name)) = (&o.metadata.namespace, &o.metadata.name) else {
        return Ok(());
    };
    let (accepted, reason, message) = verdict(o);
    let status = if accepted { "True" } else { "False" };
    let generation = o.metadata.generation.unwrap_or_default();
    let now = current(o);
    let same = |field: &str, want: Value| now.and_then(|c| c.get(field)) == Some(&want);
    if same("status", json!(status))
        && same("reason", json!(reason))
        && same("message", json!(message))
        && same("observedGeneration", json!(generation))
    {
        return Ok(());
    }
    // The transition time moves only when the status does.
    let since = now
        .filter(|c| c.get("status") == Some(&json!(status)))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()));
    let patch = json!({
        "status": {"conditions": [{
            "type": ACCEPTED,
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": since,
        }]}
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

/// Watches every policy until `shutdown`, keeping their conditions.
pub async fn keep_status(client: Client, shutdown: CancellationToken) {
    let api = Api::<DynamicObject>::all_with(client, &resource());
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.cancelled() => return,
        };
        let Some(event) = event else { return };
        let object = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
            Ok(_) => continue,
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot watch AuthorizationPolicies; retrying with backoff");
                    failing = true;
                }
                continue;
            }
        };
        failing = false;
        // A failed write is tried again at the next change or relist; a
        // short pause keeps a refusing API server from being hammered.
        if let Err(e) = reconcile(&api, &object).await {
            debug!(error = %e, "cannot write an authorization policy's status");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
