//! DUT console bytes into salad's line scanner (`SALAD.ping`, `SALAD.machine_id=`): never a
//! panic, bounded memory, and chunking never changes the events.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dutgate_salad::fuzzing::scan(data);
});
