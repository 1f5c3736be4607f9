//! Masking of job secrets in console output (design.md §10: a job's secrets are never in
//! clear in logs).
//!
//! A machine's current job tells salad its secrets (`PUT /api/v1/machine/{id}/secrets`);
//! every byte of that machine's output then passes through its [`Masker`] before any sink
//! (clients, scrollback, console log) sees it. A secret may arrive split over several reads
//! (a UART delivers a few bytes at a time), so the masker holds back the end of the output
//! while it could still be the start of a secret: at most `len(longest secret) - 1` bytes,
//! and only until the stream goes idle for `secret_hold_ms` (then they are sent as they are).
//!
//! Invariant: every complete occurrence of a secret that reaches the masker within one burst
//! of output (no pause longer than the hold time inside it) is replaced by [`MASK`]; all other
//! bytes come out unchanged and in order.

use regex::bytes::Regex;

/// What a secret is replaced with.
pub const MASK: &[u8] = b"[MASKED]";
/// Shorter strings are not secrets worth masking, and masking them would mangle the console.
pub const MIN_SECRET_LEN: usize = 8;
/// Longest secret accepted: bounds the bytes held back and the work per chunk.
pub const MAX_SECRET_LEN: usize = 256;
/// Most secrets per machine.
pub const MAX_SECRETS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretsError {
    #[error("at most {MAX_SECRETS} secrets per machine ({0} given)")]
    TooMany(usize),
    #[error("secrets[{0}]: must be {MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes long")]
    BadLength(usize),
}

/// A machine's secrets and the output held back because it may be the start of one.
#[derive(Debug, Default)]
pub struct Masker {
    secrets: Vec<Vec<u8>>,
    /// Matches any secret, longest first (leftmost match, then the longer alternative).
    re: Option<Regex>,
    held: Vec<u8>,
}

impl Masker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates `secrets` (see the `MIN`/`MAX` constants).
    pub fn check(secrets: &[String]) -> Result<(), SecretsError> {
        if secrets.len() > MAX_SECRETS {
            return Err(SecretsError::TooMany(secrets.len()));
        }
        for (i, s) in secrets.iter().enumerate() {
            if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&s.len()) {
                return Err(SecretsError::BadLength(i));
            }
        }
        Ok(())
    }

    /// Replaces the secrets (an empty list clears them). Held bytes stay held: they are
    /// matched against the new set with the next chunk or flushed on idle.
    pub fn set(&mut self, secrets: &[String]) -> Result<(), SecretsError> {
        Self::check(secrets)?;
        let mut list: Vec<Vec<u8>> = secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
        list.dedup();
        self.re = if list.is_empty() {
            None
        } else {
            // Each byte as `\xHH` with Unicode off: the pattern matches the exact bytes,
            // whatever they are, and needs no escaping rules.
            let pattern = list
                .iter()
                .map(|s| s.iter().map(|b| format!("\\x{b:02x}")).collect::<String>())
                .collect::<Vec<_>>()
                .join("|");
            // Bounded (32 × 256 bytes), so building cannot fail for size; were it to fail
            // anyway the machine would go unmasked, so it is refused instead.
            Some(
                regex::bytes::RegexBuilder::new(&pattern)
                    .unicode(false)
                    .build()
                    .map_err(|_| SecretsError::BadLength(0))?,
            )
        };
        self.secrets = list;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Bytes held back right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Masks `chunk` (after what was held back) and returns what may be sent on now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let Some(re) = &self.re else {
            let mut out = std::mem::take(&mut self.held);
            out.extend_from_slice(chunk);
            return out;
        };
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(data.len());
        let mut last = 0;
        for m in re.find_iter(&data) {
            out.extend_from_slice(&data[last..m.start()]);
            out.extend_from_slice(MASK);
            last = m.end();
        }
        let keep = self.partial_suffix(&data[last..]);
        let cut = data.len() - keep;
        out.extend_from_slice(&data[last..cut]);
        self.held = data[cut..].to_vec();
        out
    }

    /// Everything held back, as it is (the stream went idle).
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `tail` that is a proper prefix of some secret.
    fn partial_suffix(&self, tail: &[u8]) -> usize {
        let longest = self.secrets.first().map_or(0, Vec::len);
        let max = tail.len().min(longest.saturating_sub(1));
        (1..=max)
            .rev()
            .find(|&n| {
                let suffix = &tail[tail.len() - n..];
                self.secrets
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn masker(secrets: &[&str]) -> Masker {
        let mut m = Masker::new();
        m.set(&secrets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        m
    }

    fn run(m: &mut Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(m.push(c));
        }
        out.extend(m.flush());
        out
    }

    #[test]
    fn masks_whole_and_split_secrets() {
        let mut m = masker(&["AKIAEXAMPLE123", "s3cr3t-value"]);
        assert_eq!(
            run(&mut m, &[b"key=AKIAEXAMPLE123,s3cr3t-value\n"]),
            b"key=[MASKED],[MASKED]\n"
        );
        assert_eq!(
            run(&mut m, &[b"x AKIAEX", b"AMP", b"LE123 y\n"]),
            b"x [MASKED] y\n"
        );
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = masker(&["abcdefgh"]);
        assert_eq!(m.push(b"hello abc"), b"hello ");
        assert_eq!(m.held(), 3);
        assert_eq!(m.push(b"x"), b"abcx");
        assert_eq!(m.held(), 0);
        assert_eq!(m.push(b"abcdefg"), b"");
        assert_eq!(m.flush(), b"abcdefg");
    }

    #[test]
    fn limits() {
        assert_eq!(
            Masker::check(&["short".into()]),
            Err(SecretsError::BadLength(0))
        );
        assert_eq!(
            Masker::check(&vec!["x".repeat(10); MAX_SECRETS + 1]),
            Err(SecretsError::TooMany(MAX_SECRETS + 1))
        );
        let mut m = masker(&["(regex?)*chars"]);
        assert_eq!(run(&mut m, &[b"a(regex?)*chars"]), b"a[MASKED]");
    }

    proptest! {
        /// However the output is cut, no secret survives and nothing else changes.
        #[test]
        fn chunking_never_leaks(
            noise in proptest::collection::vec(any::<u8>(), 0..300),
            at in 0usize..300,
            cuts in proptest::collection::vec(0usize..400, 0..10),
        ) {
            let secret = b"SeCrEt-0123456789";
            let at = at.min(noise.len());
            let mut data = noise[..at].to_vec();
            data.extend_from_slice(secret);
            data.extend_from_slice(&noise[at..]);
            let mut m = masker(&[std::str::from_utf8(secret).unwrap()]);
            let whole = run(&mut m, &[&data]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut last = 0;
            for c in cuts {
                pieces.push(&data[last..c]);
                last = c;
            }
            pieces.push(&data[last..]);
            let split = run(&mut m, &pieces);
            prop_assert_eq!(&whole, &split);
            prop_assert!(!whole.windows(secret.len()).any(|w| w == secret));
            prop_assert!(whole.windows(MASK.len()).any(|w| w == MASK));
        }
    }
}
