//! The fuzz entries of `services/storage/fuzz` (`s3_xml`, `object_key`) on stable, so that every
//! test run exercises them (cargo-fuzz needs nightly) where a fuzzer starts: the committed
//! seeds and mutations of them never panic an entry (each entry asserts its own properties).
//! Arbitrary bytes are the unit tests' part (`src/fuzzing.rs`).

use std::path::PathBuf;

use dutgate_storage::fuzzing;
use proptest::prelude::*;

/// The committed seeds of one fuzz target (`fuzz/seeds/<target>/*`).
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// One seed with byte edits applied: replace, delete, insert, or repeat a slice.
fn mutated(seed: &[u8], edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for (at, op, byte) in edits {
        let i = at.index(data.len() + 1);
        match op {
            0 if i < data.len() => data[i] = *byte,
            1 if i < data.len() => {
                data.remove(i);
            }
            2 => data.insert(i, *byte),
            _ => {
                let tail: Vec<u8> = data[i..].iter().take(16).copied().collect();
                data.splice(i..i, tail);
            }
        }
    }
    data
}

fn edits() -> impl Strategy<Value = Vec<(prop::sample::Index, u8, u8)>> {
    proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 0..8)
}

#[test]
fn the_seeds_pass() {
    for s in seeds("s3_xml") {
        fuzzing::s3_xml(&s);
    }
    for s in seeds("object_key") {
        fuzzing::object_key(&s);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn s3_xml_mutations(which in any::<prop::sample::Index>(), edits in edits()) {
        let seeds = seeds("s3_xml");
        fuzzing::s3_xml(&mutated(&seeds[which.index(seeds.len())], &edits));
    }

    #[test]
    fn object_key_mutations(which in any::<prop::sample::Index>(), edits in edits()) {
        let seeds = seeds("object_key");
        fuzzing::object_key(&mutated(&seeds[which.index(seeds.len())], &edits));
    }

}
