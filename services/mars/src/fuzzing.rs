//! Entry points for the cargo-fuzz targets (`services/mars/fuzz`) and for the stable-Rust
//! property test that runs them on a few thousand inputs (`tests/fuzzing.rs`).

use crate::machines::parse_registration;

/// A registration body from untrusted bytes (what any DUT may send): never a panic; an
/// accepted body has its fields within bounds, and re-encoded it parses to the same thing
/// (the check is idempotent: what is stored would be accepted again).
pub fn registration(data: &[u8]) {
    let max = crate::Config::default().max_tags;
    let Ok(reg) = parse_registration(data, max) else {
        return;
    };
    assert!(reg.tags.len() <= max, "too many tags accepted");
    assert!(
        reg.tags.windows(2).all(|w| w[0] < w[1]),
        "tags not sorted and unique"
    );
    assert!(!reg.base_name.is_empty() && reg.base_name.len() <= 64);
    if let Some(t) = &reg.tty {
        assert!(
            !t.contains("..") && !t.starts_with('/'),
            "tty {t:?} escapes /dev"
        );
    }
    let again = serde_json::to_vec(&reg.to_registration()).expect("a registration serialises");
    let back = parse_registration(&again, max).expect("an accepted registration parses again");
    assert_eq!(back, reg);
}
