//! S3 XML bodies from untrusted bytes: `DeleteObjects` and `CompleteMultipartUpload`
//! request bodies (what a DUT sends the embedded endpoint) and listing/error answers (what
//! an S3 server sends the client). Never a panic; every key the endpoint would accept stays
//! inside its bucket.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dutgate_storage::fuzzing::s3_xml(data);
});
