//! The embedded endpoint with the storage client, as the executor and a DUT use them.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::{Embedded, client_with, tarball};
use dutgate_storage::StorageError;
use futures::TryStreamExt;

fn is_denied(r: Result<impl Sized, StorageError>) -> bool {
    matches!(r, Err(StorageError::Server { status: 403, .. }))
}

#[tokio::test]
async fn job_bucket_life_initial_state_dut_writes_artifacts_revoke_delete() {
    let e = Embedded::start().await;
    let job = e.storage.create_job_bucket("1234").await.unwrap();
    assert_eq!(job.bucket, "job-1234");
    assert_eq!(
        job.endpoint_url,
        format!("http://127.0.0.1:{}", e.gateway.ports.s3)
    );
    assert!(!job.shared_admin_keys);
    assert_ne!(job.access_key, e.admin.access_key);
    // A retried set-up keeps the bucket and gets fresh keys; the first keys stay valid.
    let again = e.storage.create_job_bucket("1234").await.unwrap();
    assert_eq!(again.bucket, job.bucket);
    assert_ne!(again.access_key, job.access_key);

    // The submitter's initial state, extracted into the bucket; the symlink is not followed.
    let tgz = tarball(
        &[
            ("share/input.txt", b"hello dut\n", 0o644),
            ("./run.sh", b"#!/bin/sh\necho run\n", 0o755),
        ],
        true,
    );
    let summary = e
        .storage
        .upload_tarball(&job.bucket, &tgz[..])
        .await
        .unwrap();
    assert_eq!((summary.files, summary.skipped), (2, 1));
    assert_eq!(summary.bytes, 10 + 19);

    // The DUT sees the files with its own keys, and mc's attributes came along.
    let dut = e.dut_client(&job);
    let mut keys: Vec<String> = dut
        .list(&job.bucket)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    assert_eq!(keys, ["run.sh", "share/input.txt"]);
    let body = dut.get(&job.bucket, "share/input.txt").await.unwrap();
    assert_eq!(body.size, Some(10));
    let bytes: Vec<Bytes> = body.into_stream().try_collect().await.unwrap();
    assert_eq!(bytes.concat(), b"hello dut\n");

    // The DUT writes results; they come back as artifacts.
    dut.put_bytes(
        &job.bucket,
        "results/junit.xml",
        Bytes::from_static(b"<testsuite/>"),
    )
    .await
    .unwrap();
    // Listing in pages of one key gives the same answer.
    let paged: Vec<String> = dut
        .clone()
        .with_list_page_size(1)
        .list(&job.bucket)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(paged, ["results/junit.xml", "run.sh", "share/input.txt"]);
    let dest = tempfile::tempdir().unwrap();
    let got = e
        .storage
        .download_all(&job.bucket, dest.path())
        .await
        .unwrap();
    assert_eq!(got.files, 3);
    assert_eq!(
        std::fs::read(dest.path().join("results/junit.xml")).unwrap(),
        b"<testsuite/>"
    );
    assert_eq!(
        std::fs::read(dest.path().join("run.sh")).unwrap(),
        b"#!/bin/sh\necho run\n"
    );

    // Revoked keys stop working at once; the admin still reads the bucket (retention).
    e.storage.revoke(&job.bucket).await.unwrap();
    assert!(is_denied(dut.list(&job.bucket).await));
    assert_eq!(e.storage.list(&job.bucket).await.unwrap().len(), 3);

    // Deleting removes objects, bucket and their metadata files; twice is fine.
    e.storage.delete_bucket(&job.bucket).await.unwrap();
    e.storage.delete_bucket(&job.bucket).await.unwrap();
    assert!(!e.storage.client().bucket_exists(&job.bucket).await.unwrap());
    let data = e.config.data_dir(&e.gateway);
    // The backend's own directories stay, empty.
    let mut leftovers: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with(".dutgate-"))
        .collect();
    for own in [".dutgate-meta", ".dutgate-uploads"] {
        leftovers.extend(
            std::fs::read_dir(data.join(own))
                .unwrap()
                .map(|d| format!("{own}/{}", d.unwrap().file_name().to_string_lossy())),
        );
    }
    assert!(
        leftovers.is_empty(),
        "left in {}: {leftovers:?}",
        data.display()
    );
    e.stop().await;
}

#[tokio::test]
async fn job_keys_open_their_bucket_and_nothing_else() {
    let e = Embedded::start().await;
    let a = e.storage.create_job_bucket("a-1").await.unwrap();
    let b = e.storage.create_job_bucket("b-2").await.unwrap();
    e.storage
        .client()
        .put_bytes(&b.bucket, "secret.txt", Bytes::from_static(b"b's data"))
        .await
        .unwrap();
    let dut_a = e.dut_client(&a);

    // Own bucket: fine.
    dut_a
        .put_bytes(&a.bucket, "x", Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert!(dut_a.bucket_exists(&a.bucket).await.unwrap());

    // Another job's bucket: 403 for read, list, write and delete.
    assert!(is_denied(dut_a.get(&b.bucket, "secret.txt").await));
    assert!(is_denied(dut_a.list(&b.bucket).await));
    assert!(is_denied(
        dut_a
            .put_bytes(&b.bucket, "y", Bytes::from_static(b"2"))
            .await
    ));
    assert!(is_denied(
        dut_a.delete_object(&b.bucket, "secret.txt").await
    ));
    // `../job-b-2/secret.txt` from its own bucket (the HTTP client normalises the `..`
    // away, so this reaches bucket b; tests/isolation.rs sends such paths as they are).
    assert!(is_denied(
        dut_a.get(&a.bucket, "../job-b-2/secret.txt").await
    ));
    assert!(is_denied(
        dut_a
            .put_bytes(&a.bucket, "../job-b-2/evil", Bytes::from_static(b"!"))
            .await
    ));
    // Bucket administration: ListBuckets, CreateBucket, DeleteBucket (even its own).
    let root = reqwest_signed_get(&e.url, &a.access_key, a.secret_key.expose(), "/").await;
    assert_eq!(root.0, 403, "ListBuckets with job keys: {}", root.1);
    assert!(root.1.contains("AccessDenied"), "{}", root.1);
    assert!(is_denied(dut_a.create_bucket("job-new").await));
    assert!(is_denied(dut_a.delete_bucket(&a.bucket).await));
    // Key administration.
    let admin_list = reqwest_signed_get(
        &e.url,
        &a.access_key,
        a.secret_key.expose(),
        "/dutgate-admin/v1/keys",
    )
    .await;
    assert_eq!(admin_list.0, 403, "{}", admin_list.1);

    // Wrong secret and unknown keys are refused too.
    let forged = client_with(
        &e.url,
        &a.access_key,
        "not-the-secret-not-the-secret-not-the-se",
    );
    assert!(matches!(
        forged.list(&a.bucket).await,
        Err(StorageError::Server { status: 403, .. })
    ));
    let unknown = client_with(&e.url, "DGJOBUNKNOWN00000000", "whatever");
    assert!(matches!(
        unknown.list(&a.bucket).await,
        Err(StorageError::Server { status: 403, .. })
    ));

    // b's data is untouched; the admin sees both buckets via ListBuckets.
    let b_keys: Vec<String> = e
        .storage
        .list(&b.bucket)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(b_keys, ["secret.txt"]);
    let root = reqwest_signed_get(
        &e.url,
        &e.admin.access_key,
        e.admin.secret_key.expose(),
        "/",
    )
    .await;
    assert_eq!(root.0, 200);
    assert!(
        root.1.contains(&a.bucket) && root.1.contains(&b.bucket),
        "{}",
        root.1
    );
    e.stop().await;
}

/// A signed GET of an arbitrary path (ListBuckets, admin routes), with the client's own
/// signer, answering (status, body).
async fn reqwest_signed_get(url: &str, ak: &str, sk: &str, path: &str) -> (u16, String) {
    use dutgate_storage::sigv4::{RequestParts, Signer, sha256_hex};
    let host = url.trim_start_matches("http://");
    let signed = Signer::new(ak, sk, "us-east-1").sign(
        &RequestParts {
            method: "GET",
            host,
            path,
            query: &[],
            headers: &[],
            payload_hash: &sha256_hex(b""),
        },
        time::OffsetDateTime::now_utc(),
    );
    let r = reqwest::Client::new()
        .get(format!("{url}{path}"))
        .header("authorization", signed.authorization)
        .header("x-amz-date", signed.amz_date)
        .header("x-amz-content-sha256", signed.content_sha256)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn job_keys_survive_an_endpoint_restart() {
    let e = Embedded::start().await;
    let job = e.storage.create_job_bucket("restart").await.unwrap();
    e.dut_client(&job)
        .put_bytes(&job.bucket, "before", Bytes::from_static(b"1"))
        .await
        .unwrap();
    let state = e.stop().await;
    let e = Embedded::start_in(state).await;
    let dut = e.dut_client(&job);
    dut.put_bytes(&job.bucket, "after", Bytes::from_static(b"2"))
        .await
        .unwrap();
    assert_eq!(dut.list(&job.bucket).await.unwrap().len(), 2);
    e.stop().await;
}

/// DUT-side tools: curl's SigV4 with the job's keys (lab-notes §6: s3s needs the
/// `x-amz-content-sha256` header, and `-T` so the body is sent as-is). curl blocks its
/// thread, so the endpoint runs on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_aws_sigv4_with_job_keys_puts_and_gets() {
    dutgate_core::testing::require_program("curl", "curl");
    let e = Embedded::start().await;
    let job = e.storage.create_job_bucket("curl").await.unwrap();
    let other = e.storage.create_job_bucket("curl-other").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("obj.bin");
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &payload).unwrap();
    let user = format!("{}:{}", job.access_key, job.secret_key.expose());
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
            ])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &user])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let obj_url = format!("{}/{}/dir/obj.bin", job.endpoint_url, job.bucket);
    assert_eq!(curl(&["-T", src.to_str().unwrap(), &obj_url]), "200");
    let got = dir.path().join("got.bin");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--fail",
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        ])
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &user])
        .arg("-o")
        .arg(&got)
        .arg(&obj_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&got).unwrap(), payload);
    // The executor sees what the DUT wrote.
    let listed = e.storage.list(&job.bucket).await.unwrap();
    assert_eq!(listed[0].key, "dir/obj.bin");
    assert_eq!(listed[0].size, payload.len() as u64);
    // The same keys on the other job's bucket: 403.
    let other_url = format!("{}/{}/x", other.endpoint_url, other.bucket);
    assert_eq!(curl(&["-T", src.to_str().unwrap(), &other_url]), "403");
    assert_eq!(
        curl(&[&format!("{}/{}", other.endpoint_url, other.bucket)]),
        "403"
    );
    e.stop().await;
}

#[tokio::test]
async fn plain_tar_and_garbage_tarballs() {
    let e = Embedded::start().await;
    let job = e.storage.create_job_bucket("tar").await.unwrap();
    let tar = tarball(&[("a", b"A", 0o600)], false);
    let s = e
        .storage
        .upload_tarball(&job.bucket, &tar[..])
        .await
        .unwrap();
    assert_eq!(s.files, 1);
    // A tarball that unpacks to more than the configured limit is refused.
    let small = dutgate_storage::Config {
        max_initial_state_bytes: 1000,
        ..e.config.clone()
    };
    let limited = dutgate_storage::JobStorage::new(&e.gateway, &small)
        .await
        .unwrap();
    let big = tarball(
        &[("a", &[0u8; 600], 0o644), ("b", &[0u8; 600], 0o644)],
        true,
    );
    let r = limited.upload_tarball(&job.bucket, &big[..]).await;
    assert!(
        matches!(&r, Err(StorageError::Tarball(m)) if m.contains("1000 bytes")),
        "{r:?}"
    );
    let garbage =
        b"this is not a tarball at all, not even close; it is long enough to be read".repeat(10);
    let r = e.storage.upload_tarball(&job.bucket, &garbage[..]).await;
    assert!(matches!(r, Err(StorageError::Tarball(_))), "{r:?}");
    e.stop().await;
}

#[tokio::test]
async fn healthz_answers_and_unknown_bucket_errors_are_s3_errors() {
    let e = Embedded::start().await;
    let r = reqwest::get(format!("{}/healthz", e.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("s3"));
    let err = e.storage.list("job-nonexistent").await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Server { status: 404, code, .. } if code == "NoSuchBucket"),
        "{err:?}"
    );
    // Anonymous requests are refused.
    let r = reqwest::get(format!("{}/job-nonexistent", e.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    e.stop().await;
}

/// Job keys are DUT credentials: outside the DUT networks they open nothing, while the
/// executor's admin key keeps working from anywhere.
#[tokio::test]
async fn job_keys_work_only_from_the_dut_networks() {
    let e = Embedded::start_with(tempfile::tempdir().unwrap(), |gw| {
        gw.auth.dut_networks = vec!["10.0.2.0/24".parse().unwrap()];
    })
    .await;
    let job = e.storage.create_job_bucket("net").await.unwrap();
    let from_loopback = e.dut_client(&job);
    assert!(is_denied(from_loopback.list(&job.bucket).await));
    assert!(is_denied(
        from_loopback
            .put_bytes(&job.bucket, "x", Bytes::from_static(b"1"))
            .await
    ));
    e.storage
        .client()
        .put_bytes(&job.bucket, "x", Bytes::from_static(b"1"))
        .await
        .unwrap();
    assert_eq!(e.storage.list(&job.bucket).await.unwrap().len(), 1);
    e.stop().await;
}

/// Tarball entries whose names the endpoint would refuse as keys (backslash, control
/// characters) are skipped like links, not a failed upload.
#[tokio::test]
async fn tarball_entries_with_unusable_names_are_skipped() {
    let e = Embedded::start().await;
    let job = e.storage.create_job_bucket("names").await.unwrap();
    let tgz = tarball(
        &[
            ("ok/file", b"fine", 0o644),
            ("dir\\..\\evil", b"no", 0o644),
            ("new\nline", b"no", 0o644),
        ],
        true,
    );
    let s = e
        .storage
        .upload_tarball(&job.bucket, &tgz[..])
        .await
        .unwrap();
    // Two names plus the symlink the helper always adds.
    assert_eq!((s.files, s.skipped), (1, 3));
    let keys: Vec<String> = e
        .storage
        .list(&job.bucket)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["ok/file"]);
    e.stop().await;
}
