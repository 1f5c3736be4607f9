//! Property tests, and the short in-suite run of the fuzz entry points (the same functions the
//! cargo-fuzz targets call; `cargo xtask fuzz` runs them for longer on nightly).

use std::time::Duration;

use dutgate_jobspec::{JobSpec, PatternEngine, fuzzing};
use proptest::prelude::*;

/// Console-like bytes: pattern fragments, line endings and garbage, so matches actually happen.
fn console_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"start".to_vec()),
        Just(b"tick".to_vec()),
        Just(b"stop".to_vec()),
        Just(b"REBOOT".to_vec()),
        Just(b"status: 0".to_vec()),
        Just(b"WARN".to_vec()),
        Just(b"MCE".to_vec()),
        Just(b"safe to turn off".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    proptest::collection::vec(piece, 0..64).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Acceptance 3: feeding a stream split at random points gives the events (and the status)
    /// of feeding it whole.
    #[test]
    fn chunking_does_not_change_events(
        stream in console_stream(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let job = fuzzing::example_job();
        let mut whole = PatternEngine::for_job(&job);
        let mut expected = whole.feed(&stream);
        expected.extend(whole.finish());

        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut chunked = PatternEngine::for_job(&job);
        let mut got = Vec::new();
        let mut prev = 0;
        for p in points.into_iter().chain([stream.len()]) {
            got.extend(chunked.feed(&stream[prev..p]));
            prev = p;
        }
        got.extend(chunked.finish());
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(chunked.status(), whole.status());
        prop_assert_eq!(chunked.session_ended(), whole.session_ended());
    }

    /// Lines longer than the cap are cut at the same place however they arrive.
    #[test]
    fn long_lines_chunking(len in 0usize..70_000, cut in any::<prop::sample::Index>()) {
        let mut stream = vec![b'x'; len];
        stream.extend_from_slice(b"MCE\n");
        let job = fuzzing::example_job();
        let mut a = PatternEngine::for_job(&job);
        let expected = a.feed(&stream);
        let mut b = PatternEngine::for_job(&job);
        let at = cut.index(stream.len() + 1);
        let mut got = b.feed(&stream[..at]);
        got.extend(b.feed(&stream[at..]));
        prop_assert_eq!(got, expected);
    }

    /// Any timeout written back by `to_yaml` reads back to the same duration and retries.
    #[test]
    fn durations_round_trip(
        days in 0u32..400, hours in 0u32..48, minutes in 0u32..120,
        seconds in 0u32..120, millis in 0.0f64..5000.0, retries in 0u32..10,
    ) {
        let text = format!(
            "timeouts:\n  boot_cycle: {{days: {days}, hours: {hours}, minutes: {minutes}, seconds: {seconds}, milliseconds: {millis}, retries: {retries}}}\n\
             deployment: {{start: {{kernel: {{url: 'http://gw/k'}}}}}}\n"
        );
        let job = JobSpec::parse(&text).unwrap();
        let expected_ms = f64::from(days) * 86_400_000.0 + f64::from(hours) * 3_600_000.0
            + f64::from(minutes) * 60_000.0 + f64::from(seconds) * 1000.0 + millis;
        let got = job.timeouts.boot_cycle.duration.unwrap();
        prop_assert!((got.as_secs_f64() * 1000.0 - expected_ms).abs() < 1e-3);
        let again = JobSpec::parse(&job.to_yaml().unwrap()).unwrap();
        prop_assert_eq!(again, job);
    }

}

proptest! {
    // A few thousand inputs per entry point: a few seconds in a debug build.
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Short run of the parser fuzz entry: mutations of a valid job (bytes replaced, removed,
    /// duplicated), so the inputs reach deep into the schema rather than failing at byte 0.
    #[test]
    fn fuzz_parse_short(
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
        fuzzing::parse(&data);
    }

    /// Short run of the pattern fuzz entry on arbitrary bytes.
    #[test]
    fn fuzz_patterns_short(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzzing::patterns(&data);
    }

    /// Arbitrary bytes never panic the parser either.
    #[test]
    fn fuzz_parse_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::parse(&data);
    }
}

const SEED: &str = r#"version: 1
deadline: 2026-11-23 08:00:00
target: {id: "{{ machine_id }}", tags: [a, "b:c"]}
timeouts:
  first_console_activity: {minutes: 2, retries: 3}
  overall: &o {hours: 2}
  infra_setup: {<<: *o, milliseconds: 1.5}
  watchdogs: {wd: {seconds: 30, retries: 1}}
console_patterns:
  session_end: {regex: "^.*safe to turn off\r$"}
  job_success: {regex: 'status: 0'}
  watchdogs:
    wd: {start: {regex: a}, reset: {regex: b}, stop: {regex: c}}
deployment:
  start:
    kernel:
      url: "{{ minio_url }}/k"
      cmdline: [a, "b={{ job_bucket }}", c]
    initramfs: {url: "http://gw/i"}
  continue:
    kernel: {cmdline: "{% for i in range(3) %}x{{ i }} {% endfor %}"}
"#;

#[test]
fn seed_is_valid() {
    let job =
        JobSpec::parse_and_render(SEED, &dutgate_jobspec::TemplateVars::placeholders()).unwrap();
    assert_eq!(job.deployment.r#continue.kernel.cmdline, "x0 x1 x2 ");
    assert_eq!(
        job.timeouts.infra_setup.duration,
        Some(Duration::from_secs(7200) + Duration::from_micros(1500))
    );
}
