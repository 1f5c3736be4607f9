//! A registration body (`POST /api/v1/machine/`, sent by any DUT) from untrusted bytes: never
//! a panic, and every accepted body is within bounds and registers the same machine once
//! re-encoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dutgate_mars::fuzzing::registration(data);
});
