//! Every annotation and label value the agent parses, and the policy CRD's
//! spec, from any text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nodemesh_core::fuzzing::values(data);
});
