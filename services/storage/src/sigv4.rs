//! SigV4 signing lives in its own small crate (`dutgate-sigv4`) so that the static DUT-side
//! agent signs exactly like the gateway; this module keeps the `crate::sigv4` paths.

pub use dutgate_sigv4::*;
