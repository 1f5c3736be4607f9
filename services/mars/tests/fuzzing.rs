//! The registration fuzz entry (`services/mars/fuzz`) on stable: mutations of a valid body
//! and arbitrary bytes never panic it, and what it accepts round-trips.

use dutgate_mars::fuzzing;
use proptest::prelude::*;

const SEED: &str = include_str!("../fuzz/seeds/registration/valid.json");

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn registration_mutations(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 0..8),
    ) {
        let mut data = SEED.as_bytes().to_vec();
        for (at, op, byte) in edits {
            let i = at.index(data.len() + 1);
            match op {
                0 if i < data.len() => data[i] = byte,
                1 if i < data.len() => { data.remove(i); }
                2 => data.insert(i, byte),
                _ => {
                    let tail = data[i..].iter().take(16).copied().collect::<Vec<_>>();
                    data.splice(i..i, tail);
                }
            }
        }
        fuzzing::registration(&data);
    }

    #[test]
    fn registration_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::registration(&data);
    }
}

/// The seed itself is accepted (so the mutations start from a body that gets through).
#[test]
fn the_seed_is_a_valid_registration() {
    let reg = dutgate_mars::machines::parse_registration(SEED.as_bytes(), 256).unwrap();
    assert_eq!(reg.tty.as_deref(), Some("ttyS0"));
    fuzzing::registration(SEED.as_bytes());
}
