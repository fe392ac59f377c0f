//! Protocol detection: any first bytes of a connection.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nodemesh_dataplane::proxy::detect::classify(data);
    let _ = nodemesh_dataplane::proxy::detect::is_h2_settings(data);
});
