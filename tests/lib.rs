//! The harness of the cross-service scenarios (`virtual_farm.rs`, `isolation.rs`), which
//! drive the real `dutgate` and `dutctl` binaries and QEMU DUTs:
//!
//! - [`farm`]: building the binaries and the DUT image, `dutgate up` as a process of the
//!   test, machines, jobs and `dutctl run`s in the background, polled waits;
//! - [`netns`]: a network namespace for a farm with a DUT network of its own;
//! - [`fixture`]: an HTTP server of the test on the DUT network (scripts for DUTs, results
//!   posted back, a redirecting upstream);
//! - [`raw_http`]: requests written byte for byte (SigV4-signed for S3) and their answers;
//! - [`api_schema`]: the answers of a scenario checked against the services' OpenAPI
//!   documents, with the operations it never asked;
//! - [`debian`]: the Debian package (`cargo xtask deb`) unpacked, its units read and scored
//!   (also included by `services/dutgate/tests/install.rs`; `real_farm.rs` runs it).

pub mod api_schema;
pub mod debian;
pub mod farm;
pub mod fixture;
pub mod netns;
pub mod raw_http;
