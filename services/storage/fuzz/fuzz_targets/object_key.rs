//! Object keys, list prefixes and copy-source keys from untrusted bytes: a key the embedded
//! endpoint accepts stays inside its bucket, also after one more percent-decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dutgate_storage::fuzzing::object_key(data);
});
