//! DUT console bytes through the secret masker: never a panic, chunking never changes the
//! output, and it is exactly the stream with every occurrence of the secret replaced.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dutgate_salad::fuzzing::mask(data);
});
