//! What the fuzz targets (`tests/fuzz`) feed Kubernetes objects to: any
//! bytes, read as the API server's JSON, then converted as discovery
//! converts them. Compiled for the fuzzer and for the tests that replay
//! its findings (never in the agent).
use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;

use super::convert;

/// Every object kind discovery reads, from `json`; nothing may panic.
pub fn objects(json: &[u8]) {
    if let Ok(p) = serde_json::from_slice::<Pod>(json) {
        let (info, _, _) = convert::pod_and_policy(&p);
        if let Some(mut info) = info {
            convert::keep_remote(&mut info);
        }
    }
    if let Ok(ns) = serde_json::from_slice::<Namespace>(json) {
        let _ = convert::namespace(&ns);
    }
    if let Ok(s) = serde_json::from_slice::<Service>(json) {
        let _ = convert::service_info(&s);
    }
    if let Ok(s) = serde_json::from_slice::<EndpointSlice>(json) {
        let _ = convert::slice_v1(&s);
    }
    if let Ok(e) = serde_json::from_slice::<Endpoints>(json) {
        let _ = convert::endpoints_v1(&e);
    }
    if let Ok(n) = serde_json::from_slice::<Node>(json) {
        let _ = (convert::node_zone(&n), convert::node_addresses(&n));
    }
    if let Ok(o) = serde_json::from_slice::<DynamicObject>(json) {
        let _ = convert::policy(&o);
        let _ = convert::slice_v1beta1(&o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds and every input the fuzzer ever crashed on.
    #[test]
    fn objects_seen_by_the_fuzzer_convert_without_panic() {
        for seed in [
            &br#"{"metadata":{"uid":"u","name":"p","namespace":"n","annotations":{"config.nodemesh.io/max-connections":"99999999999999999999"}},"status":{"podIPs":[{"ip":"10.0.0.1"},{"ip":"::1"}]}}"#[..],
            br#"{"metadata":{"name":"ns","labels":{"nodemesh.io/mesh":"x"}}}"#,
            br#"{"metadata":{"name":"p","namespace":"n"},"spec":{"podSelector":{"matchExpressions":[{"key":"a","operator":"Bogus"}]}}}"#,
            br#"{"addressType":"IPv4","endpoints":[{"addresses":["nope"]}],"ports":[{"port":70000}]}"#,
            b"",
            b"\xff\xfe",
        ] {
            objects(seed);
        }
    }
}
