//! The same client against moto's S3 server: a second S3 implementation, so that the client
//! relies on the protocol and not on one server's quirks. Also the external backend's
//! generic mode (DUTs get the admin key pair).

mod common;

use bytes::Bytes;
use common::{Moto, client_with, tarball};
use dutgate_core::Secret;
use dutgate_core::config::GatewayConfig;
use dutgate_storage::{Backend, Config, JobStorage, StorageError};
use futures::TryStreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_round_trip_on_moto() {
    let moto = Moto::start().await;
    let s3 = client_with(&moto.url, "AKIDMOTO", "motosecret").with_list_page_size(2);
    let bucket = "dutgate-client-test";
    assert!(!s3.bucket_exists(bucket).await.unwrap());
    s3.create_bucket(bucket).await.unwrap();
    assert!(s3.bucket_exists(bucket).await.unwrap());

    // Keys that need encoding, bytes and a streamed file with metadata.
    for k in ["a.txt", "dir/b c.txt", "dir/ü+&=.bin", "z/1", "z/2"] {
        s3.put_bytes(bucket, k, Bytes::from(format!("body of {k}")))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("big"), &big).unwrap();
    let n = s3
        .put_file(
            bucket,
            "big.bin",
            &dir.path().join("big"),
            &[("mc-attrs".into(), "mode:33188".into())],
        )
        .await
        .unwrap();
    assert_eq!(n, big.len() as u64);

    // Listing spans pages of 2.
    let listed = s3.list(bucket).await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "a.txt",
            "big.bin",
            "dir/b c.txt",
            "dir/ü+&=.bin",
            "z/1",
            "z/2"
        ]
    );
    assert_eq!(listed[1].size, big.len() as u64);

    let body = s3.get(bucket, "dir/ü+&=.bin").await.unwrap();
    let got: Vec<Bytes> = body.into_stream().try_collect().await.unwrap();
    assert_eq!(got.concat(), b"body of dir/\xc3\xbc+&=.bin");
    let got: Vec<Bytes> = s3
        .get(bucket, "big.bin")
        .await
        .unwrap()
        .into_stream()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(got.concat(), big);

    let missing = s3.get(bucket, "nope").await.err().unwrap();
    assert!(
        matches!(&missing, StorageError::Server { status: 404, code, .. } if code == "NoSuchKey"),
        "{missing:?}"
    );

    s3.remove_bucket(bucket).await.unwrap();
    assert!(!s3.bucket_exists(bucket).await.unwrap());
    // Removing a bucket that is gone is fine.
    s3.remove_bucket(bucket).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_backend_generic_mode_on_moto() {
    let moto = Moto::start().await;
    let gateway = GatewayConfig::default();
    let config = Config {
        backend: Backend::External,
        url: Some(moto.url.clone()),
        dut_url: Some("http://s3.lab.example:9000".into()),
        access_key: Some("AKIDMOTOADMIN".into()),
        secret_key: Some(Secret::new("motoadminsecret")),
        ..Default::default()
    };
    // Without keys the external backend refuses to start.
    let no_keys = Config {
        access_key: None,
        secret_key: None,
        ..config.clone()
    };
    assert!(matches!(
        JobStorage::new(&gateway, &no_keys).await,
        Err(StorageError::Config(_))
    ));

    let storage = JobStorage::new(&gateway, &config).await.unwrap();
    let job = storage.create_job_bucket("77").await.unwrap();
    assert_eq!(job.bucket, "job-77");
    assert!(job.shared_admin_keys);
    assert_eq!(job.access_key, "AKIDMOTOADMIN");
    assert_eq!(job.endpoint_url, "http://s3.lab.example:9000");
    // Creating it again (a retried set-up) keeps it.
    storage.create_job_bucket("77").await.unwrap();

    let tgz = tarball(&[("in/data.txt", b"data", 0o640)], true);
    let up = storage.upload_tarball(&job.bucket, &tgz[..]).await.unwrap();
    assert_eq!((up.files, up.skipped), (1, 1));
    let dut = client_with(&moto.url, &job.access_key, job.secret_key.expose());
    dut.put_bytes(&job.bucket, "out/result.txt", Bytes::from_static(b"PASS"))
        .await
        .unwrap();

    storage.revoke(&job.bucket).await.unwrap();
    let dest = tempfile::tempdir().unwrap();
    let down = storage
        .download_all(&job.bucket, dest.path())
        .await
        .unwrap();
    assert_eq!(down.files, 2);
    assert_eq!(
        std::fs::read(dest.path().join("out/result.txt")).unwrap(),
        b"PASS"
    );
    assert_eq!(
        std::fs::read(dest.path().join("in/data.txt")).unwrap(),
        b"data"
    );
    assert_eq!(down.paths.len(), 2);

    storage.delete_bucket(&job.bucket).await.unwrap();
    assert!(!storage.client().bucket_exists(&job.bucket).await.unwrap());
}
