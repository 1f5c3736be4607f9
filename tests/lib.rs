//! Cross-service scenarios live in this package's tests (`virtual_farm.rs`, `isolation.rs`); the library is
//! empty on purpose: the scenarios drive the real `dutgate` and `dutctl` binaries.
