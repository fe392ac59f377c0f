//! Kubernetes objects: any bytes as the API server's JSON, converted as
//! discovery converts them (pods, namespaces, Services, slices, nodes,
//! AuthorizationPolicies).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nodemesh_dataplane::discovery::kube::fuzzing::objects(data);
});
