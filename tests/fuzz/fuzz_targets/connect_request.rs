//! A tunnel stream's request as the server reads it: the CONNECT
//! authority and the `forwarded` header, from any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (authority, forwarded) = data.split_at(split);
    nodemesh_dataplane::proxy::tunnel::server::fuzzing::request(authority, forwarded);
});
