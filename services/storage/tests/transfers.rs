//! The client's transfers: multipart upload of a file above the part size against the
//! embedded endpoint and moto, and retries through a TCP proxy that drops connections and
//! cuts a response half-way.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Embedded, Moto, client_with};
use dutgate_storage::S3Client;
use futures::TryStreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// S3's (and moto's) smallest part but the last.
const PART: usize = 5 * 1024 * 1024;
/// The embedded endpoint takes parts of any size: smaller ones keep the test fast.
const SMALL_PART: usize = 256 * 1024;

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

async fn read_all(c: &S3Client, bucket: &str, key: &str) -> Vec<u8> {
    let body = match c.get(bucket, key).await {
        Ok(b) => b,
        Err(e) => panic!("GET {bucket}/{key}: {e}"),
    };
    let chunks: Vec<Bytes> = match body.into_stream().try_collect().await {
        Ok(c) => c,
        Err(e) => panic!("body of {bucket}/{key}: {e}"),
    };
    chunks.concat()
}

/// A file of two full parts and a short one goes up in parts and comes back whole, with
/// its metadata; the ETag is a multipart one (`…-3`).
async fn multipart_round_trip(c: &S3Client, bucket: &str, part: usize) {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 * part + 12_345);
    let path = dir.path().join("big");
    std::fs::write(&path, &data).unwrap();
    let n = c
        .put_file(
            bucket,
            "out/big.bin",
            &path,
            &[("mc-attrs".into(), "mode:33188".into())],
        )
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let body = c.get(bucket, "out/big.bin").await.unwrap();
    assert_eq!(body.size, Some(data.len() as u64));
    assert_eq!(
        body.content_type.as_deref(),
        Some("application/octet-stream")
    );
    let chunks: Vec<Bytes> = body.into_stream().try_collect().await.unwrap();
    assert!(chunks.concat() == data, "multipart object differs");
    let listed = c.list(bucket).await.unwrap();
    let info = listed.iter().find(|o| o.key == "out/big.bin").unwrap();
    assert_eq!(info.size, data.len() as u64);
    let etag = info.etag.as_deref().unwrap_or_default();
    assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");
    // A file at the part size goes in one PUT.
    let small = pattern(part);
    std::fs::write(&path, &small).unwrap();
    c.put_file(bucket, "out/one.bin", &path, &[]).await.unwrap();
    assert!(read_all(c, bucket, "out/one.bin").await == small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_round_trips_on_the_embedded_endpoint() {
    let e = Embedded::start().await;
    let job = e.storage.create_job_bucket("4242").await.unwrap();
    // With the DUT's own keys: the upload is theirs from start to completion.
    let dut = e.dut_client(&job).with_part_size(SMALL_PART);
    multipart_round_trip(&dut, &job.bucket, SMALL_PART).await;
    // Nothing of the upload is left behind.
    let uploads = e.config.data_dir(&e.gateway).join(".dutgate-uploads");
    assert_eq!(std::fs::read_dir(uploads).unwrap().count(), 0);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_round_trips_on_moto() {
    let moto = Moto::start().await;
    let c = client_with(&moto.url, "AKIDMOTO", "motosecret").with_part_size(PART);
    c.create_bucket("dutgate-multipart").await.unwrap();
    multipart_round_trip(&c, "dutgate-multipart", PART).await;
}

/// What the proxy does to the connections it accepts next.
#[derive(Default)]
struct Faults {
    /// Reset this many connections on accept.
    drop_next: AtomicUsize,
    /// Cut the next connection's answer after this many bytes (0: do not).
    cut_after: AtomicUsize,
    accepted: AtomicUsize,
}

async fn reset(s: TcpStream) {
    // SO_LINGER 0: the close is a RST, as when a peer or a middlebox drops the connection.
    let _ = s.set_zero_linger();
    drop(s);
}

/// A TCP proxy in front of `upstream`, with `faults`; answers its port.
async fn proxy(upstream: std::net::SocketAddr, faults: Arc<Faults>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            faults.accepted.fetch_add(1, Ordering::SeqCst);
            let dropping = faults
                .drop_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if dropping {
                reset(client).await;
                continue;
            }
            let cut = faults.cut_after.swap(0, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                if cut == 0 {
                    let (mut c, mut s) = (client, server);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    return;
                }
                let _ = client.set_zero_linger();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let upload = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut sent = 0usize;
                let mut buf = vec![0u8; 16 * 1024];
                while sent < cut {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(cut - sent),
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                // Both halves gone: the connection is reset half-way through the answer.
                upload.abort();
                let _ = upload.await;
                drop(cw);
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_retried_past_dropped_connections_and_a_cut_body() {
    let e = Embedded::start().await;
    let upstream: std::net::SocketAddr = e.url.trim_start_matches("http://").parse().unwrap();
    let admin = client_with(&e.url, &e.admin.access_key, e.admin.secret_key.expose());
    admin.create_bucket("faults").await.unwrap();
    let data = pattern(3 * 1024 * 1024 + 7);
    admin
        .put_bytes("faults", "obj", Bytes::from(data.clone()))
        .await
        .unwrap();

    let faults = Arc::new(Faults::default());
    let port = proxy(upstream, faults.clone()).await;
    let via = |_: ()| {
        client_with(
            &format!("http://127.0.0.1:{port}"),
            &e.admin.access_key,
            e.admin.secret_key.expose(),
        )
        .with_retries(5, Duration::from_millis(10))
    };

    // Two connections reset on accept: the GET succeeds on the third.
    faults.drop_next.store(2, Ordering::SeqCst);
    let c = via(());
    assert!(read_all(&c, "faults", "obj").await == data);
    assert_eq!(c.failed_attempts(), 2, "retries counted");
    assert_eq!(faults.accepted.load(Ordering::SeqCst), 3);

    // The answer cut after 256 KiB: the body resumes (a range GET) on a new connection.
    faults.cut_after.store(256 * 1024, Ordering::SeqCst);
    let c = via(());
    assert!(
        read_all(&c, "faults", "obj").await == data,
        "resumed body differs"
    );
    assert_eq!(faults.accepted.load(Ordering::SeqCst), 5);

    // A PUT whose connection is reset is sent again.
    faults.drop_next.store(1, Ordering::SeqCst);
    let c = via(());
    c.put_bytes("faults", "put", Bytes::from_static(b"after a reset"))
        .await
        .unwrap();
    assert_eq!(c.failed_attempts(), 1);
    assert_eq!(read_all(&admin, "faults", "put").await, b"after a reset");

    // Without retries the same fault is an error.
    faults.drop_next.store(1, Ordering::SeqCst);
    let c = via(()).with_retries(0, Duration::from_millis(10));
    assert!(c.get("faults", "obj").await.is_err());
    e.stop().await;
}

/// What the backend promises besides transfers: a body that does not match its
/// Content-MD5 replaces nothing; ranges; keys the backend keeps for itself are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_checks_digests_serves_ranges_and_keeps_its_own_names() {
    use common::Raw;
    let e = Embedded::start().await;
    let (ak, sk) = (
        e.admin.access_key.clone(),
        e.admin.secret_key.expose().to_string(),
    );
    let admin = client_with(&e.url, &ak, &sk);
    admin.create_bucket("checks").await.unwrap();
    admin
        .put_bytes("checks", "obj", Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    // base64(md5("other")) is not the body's digest.
    let r = Raw::new("PUT", "/checks/obj")
        .header("content-md5", "eV+cyAhLhq+zTgkvHWLpFQ==")
        .body(b"replaced".to_vec())
        .signed(&e.url, &ak, &sk, now)
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("BadDigest"), "{}", r.body);
    assert_eq!(read_all(&admin, "checks", "obj").await, b"0123456789");
    let r = Raw::new("GET", "/checks/obj")
        .header("range", "bytes=2-5")
        .signed(&e.url, &ak, &sk, now)
        .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, "2345");
    let r = Raw::new("PUT", "/checks/a/.dutgate-tmp-x")
        .body(b"x".to_vec())
        .signed(&e.url, &ak, &sk, now)
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    e.stop().await;
}
