//! The wire types the CLI, the identity service and the agents exchange,
//! and the tap filter's query string, from any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nodemesh_core::wire::fuzzing::wire(data);
});
