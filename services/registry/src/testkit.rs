//! Seeded OCI image layouts for tests and benchmarks.
