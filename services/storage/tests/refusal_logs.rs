//! Refusals are logged with the access key id and the source address, never the secret.
//! Alone in its test binary: a thread-local log subscriber in a process where other tests
//! log at the same time can miss events (tracing caches per-callsite interest globally).

mod common;

use bytes::Bytes;
use common::{Embedded, Raw};
use time::OffsetDateTime;

/// A buffer the log lines of the test go to.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn refusals_are_logged_with_key_and_source() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The endpoint runs on this test's single thread, so a thread default catches it.
    let _guard = tracing::subscriber::set_default(subscriber);
    let e = Embedded::start().await;
    let attacker = e.storage.create_job_bucket("attacker").await.unwrap();
    let victim = e.storage.create_job_bucket("victim").await.unwrap();
    e.dut_client(&victim)
        .put_bytes(&victim.bucket, "x", Bytes::from_static(b"victim"))
        .await
        .unwrap();
    let attack = Raw::new("POST", &format!("/{}", attacker.bucket))
        .query("delete", "")
        .body(format!(
            "<Delete><Object><Key>../{}/x</Key></Object></Delete>",
            victim.bucket
        ))
        .signed(
            &e.url,
            &attacker.access_key,
            attacker.secret_key.expose(),
            OffsetDateTime::now_utc(),
        )
        .await;
    assert_eq!(attack.status, 403, "{attack:?}");
    let sigv2 = Raw::new("GET", &format!("/{}/x", attacker.bucket))
        .header(
            "authorization",
            &format!("AWS {}:c2lnbmF0dXJl", attacker.access_key),
        )
        .from("127.0.0.3".parse().unwrap())
        .send(&e.url)
        .await;
    assert_eq!(sigv2.status, 400, "{sigv2:?}");
    e.stop().await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let refusals: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("S3 request refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{text}");
    let key_field = format!("access_key=\"{}\"", attacker.access_key);
    assert!(
        refusals[0].contains(&key_field)
            && refusals[0].contains("peer=127.0.0.1")
            && refusals[0].contains("reason=\"path\""),
        "{}",
        refusals[0]
    );
    assert!(
        refusals[1].contains(&key_field)
            && refusals[1].contains("peer=127.0.0.3")
            && refusals[1].contains("reason=\"sigv2\""),
        "{}",
        refusals[1]
    );
    assert!(
        !text.contains(attacker.secret_key.expose()),
        "a secret is in the logs"
    );
}
