//! Job text (template + YAML + schema) from untrusted bytes: never a panic, and every parsed
//! job survives its normalised YAML round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dutgate_jobspec::fuzzing::parse(data);
});
