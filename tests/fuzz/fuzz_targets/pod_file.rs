//! The pod file: any text, as the agent reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = nodemesh_dataplane::discovery::file::parse(text, "node-a");
    }
});
