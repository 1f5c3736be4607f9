//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the in-suite random-input
//! tests, so CI exercises exactly what the fuzzer runs. Both read DUT output, which is
//! untrusted: they must never panic, whatever the bytes.

use crate::association::{Event, LineScanner, MAX_LINE};
use crate::secrets::{MASK, MAX_SECRET_LEN, MIN_SECRET_LEN, Masker};

/// Splits `stream` where the bytes of `cuts` say (each taken modulo what is left).
fn pieces<'a>(cuts: &[u8], stream: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    for &c in cuts
        .iter()
        .cycle()
        .take(if cuts.is_empty() { 0 } else { 4096 })
    {
        if rest.is_empty() {
            break;
        }
        let n = (usize::from(c) % rest.len()).max(1);
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out.push(rest);
    out
}

/// The line scanner on arbitrary console bytes: the first 8 bytes choose chunk boundaries,
/// the rest is the stream. Chunking never changes the events (apart from where in its chunk
/// an announcing line starts), an event's line start lies within its chunk, and the scanner
/// never keeps more than [`MAX_LINE`] bytes.
pub fn scan(data: &[u8]) {
    let (cuts, stream) = data.split_at(data.len().min(8));
    let normalise = |events: Vec<Event>| -> Vec<Event> {
        events
            .into_iter()
            .map(|e| match e {
                Event::Bind { machine, .. } => Event::Bind {
                    machine,
                    line_start: 0,
                },
                other => other,
            })
            .collect()
    };
    let mut whole = LineScanner::new();
    let mut expected = Vec::new();
    whole.scan(stream, &mut expected);
    let mut chunked = LineScanner::new();
    let mut got = Vec::new();
    for piece in pieces(cuts, stream) {
        let mut events = Vec::new();
        chunked.scan(piece, &mut events);
        for e in &events {
            if let Event::Bind { line_start, .. } = e {
                assert!(*line_start <= piece.len(), "line start past its chunk");
            }
        }
        assert!(chunked.buffered() <= MAX_LINE);
        got.extend(events);
    }
    assert_eq!(normalise(got), normalise(expected));
}

/// The secret masker on arbitrary console bytes: byte 0 gives a secret's length, the secret
/// follows, then 8 bytes of chunk boundaries, then the stream. Chunking never changes the
/// output, nothing is lost but the secrets, and a secret that cannot overlap the mask text
/// never comes out.
pub fn mask(data: &[u8]) {
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let len = MIN_SECRET_LEN + usize::from(len) % (MAX_SECRET_LEN - MIN_SECRET_LEN + 1);
    if rest.len() < len {
        return;
    }
    let (secret, rest) = rest.split_at(len);
    // Secrets arrive as JSON strings: text.
    let Ok(secret) = std::str::from_utf8(secret) else {
        return;
    };
    let (cuts, stream) = rest.split_at(rest.len().min(8));
    let secrets = [secret.to_string()];
    let mut whole = Masker::new();
    whole.set(&secrets).expect("a valid secret");
    let mut expected = whole.push(stream);
    expected.extend(whole.flush());
    let mut chunked = Masker::new();
    chunked.set(&secrets).expect("a valid secret");
    let mut got = Vec::new();
    for piece in pieces(cuts, stream) {
        got.extend(chunked.push(piece));
        assert!(chunked.held() < len, "held back a whole secret's length");
    }
    got.extend(chunked.flush());
    assert_eq!(got, expected);
    // The reference: leftmost occurrences, without overlaps, each replaced by the mask.
    let s = secret.as_bytes();
    let mut reference = Vec::with_capacity(stream.len());
    let mut i = 0;
    while i < stream.len() {
        if stream[i..].starts_with(s) {
            reference.extend_from_slice(MASK);
            i += s.len();
        } else {
            reference.push(stream[i]);
            i += 1;
        }
    }
    assert_eq!(
        got, reference,
        "not the exact replacement of every occurrence"
    );
    if !s.iter().any(|b| MASK.contains(b)) {
        assert!(!got.windows(s.len()).any(|w| w == s), "a secret came out");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn scan_never_panics(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            super::scan(&data);
        }

        #[test]
        fn scan_with_markers(
            noise in proptest::collection::vec(any::<u8>(), 0..300),
            at in 0usize..300,
        ) {
            let mut data = noise.clone();
            let at = at.min(data.len());
            data.splice(at..at, b"\nSALAD.ping\r\nx SALAD.machine_id=52:54:00:12:34:56 y\n".iter().copied());
            super::scan(&data);
        }

        #[test]
        fn mask_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            super::mask(&data);
        }

        #[test]
        fn mask_with_occurrences(
            secret in "[a-zA-Z0-9/+]{8,40}",
            noise in proptest::collection::vec(any::<u8>(), 0..300),
            at in proptest::collection::vec(0usize..300, 1..4),
            cuts in proptest::collection::vec(any::<u8>(), 8),
        ) {
            let mut stream = noise.clone();
            for a in at {
                let a = a.min(stream.len());
                stream.splice(a..a, secret.bytes());
            }
            let mut data = vec![(secret.len() - crate::secrets::MIN_SECRET_LEN) as u8];
            data.extend_from_slice(secret.as_bytes());
            data.extend_from_slice(&cuts);
            data.extend_from_slice(&stream);
            super::mask(&data);
        }
    }
}
