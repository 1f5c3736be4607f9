//! Console bytes into the pattern engine: never a panic, and chunking never changes the events.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dutgate_jobspec::fuzzing::patterns(data);
});
