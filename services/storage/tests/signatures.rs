//! Which signatures the embedded endpoint takes: SigV4 only, and only fresh. SigV2 comes
//! from boto3 (`signature_version="s3"`, a real client that still speaks it, from
//! `target/test-venv`), stale and presigned SigV4 from the crate's own signer.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::{Embedded, Raw, RawResponse, venv_bin};
use dutgate_storage::JobBucket;
use dutgate_storage::sigv4::{Signer, canonical_query};
use time::{Duration, OffsetDateTime};

/// boto3 with SigV2 against the endpoint: `header` makes a GetObject and prints
/// `<status> <code>` (or `ACCEPTED`), `presign` prints a SigV2 presigned URL.
const BOTO3_SIGV2: &str = r#"
import sys
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
url, ak, sk, bucket, mode = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=ak, aws_secret_access_key=sk,
                  region_name="us-east-1",
                  config=Config(signature_version="s3", s3={"addressing_style": "path"},
                                retries={"max_attempts": 1}, connect_timeout=10, read_timeout=10))
if mode == "header":
    try:
        s3.get_object(Bucket=bucket, Key="x")
        print("ACCEPTED")
    except ClientError as e:
        print(e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"])
else:
    print(s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "x"}, ExpiresIn=600))
"#;

async fn boto3_sigv2(e: &Embedded, job: &JobBucket, mode: &str) -> String {
    let python = venv_bin("python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask test` (it installs services/storage/tests/requirements.txt)",
        python.display()
    );
    let args = [
        "-c".to_string(),
        BOTO3_SIGV2.to_string(),
        e.url.clone(),
        job.access_key.clone(),
        job.secret_key.expose().to_string(),
        job.bucket.clone(),
        mode.to_string(),
    ];
    // A child process blocks its thread: off the runtime's workers.
    let out = tokio::task::spawn_blocking(move || Command::new(python).args(args).output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn job_with_object(e: &Embedded) -> JobBucket {
    let job = e.storage.create_job_bucket("sig").await.unwrap();
    e.dut_client(&job)
        .put_bytes(&job.bucket, "x", Bytes::from_static(b"payload"))
        .await
        .unwrap();
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigv2_is_refused_header_and_presigned() {
    let e = Embedded::start().await;
    let job = job_with_object(&e).await;
    assert_eq!(
        boto3_sigv2(&e, &job, "header").await,
        "400 InvalidRequest",
        "SigV2 header auth"
    );
    let url = boto3_sigv2(&e, &job, "presign").await;
    assert!(url.contains("Signature="), "{url}");
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("<Code>InvalidRequest</Code>") && body.contains("Signature Version 2"),
        "{body}"
    );
    // The admin key pair is no different.
    let admin = JobBucket {
        access_key: e.admin.access_key.clone(),
        secret_key: e.admin.secret_key.clone(),
        ..job.clone()
    };
    assert_eq!(
        boto3_sigv2(&e, &admin, "header").await,
        "400 InvalidRequest"
    );
    e.stop().await;
}

async fn get_signed_at(e: &Embedded, job: &JobBucket, at: OffsetDateTime) -> RawResponse {
    Raw::new("GET", &format!("/{}/x", job.bucket))
        .signed(&e.url, &job.access_key, job.secret_key.expose(), at)
        .await
}

#[tokio::test]
async fn stale_sigv4_headers_are_refused() {
    let e = Embedded::start().await;
    let job = job_with_object(&e).await;
    let now = OffsetDateTime::now_utc();
    // Within 15 minutes either way: a clock that is a little off still works.
    for skew in [
        Duration::ZERO,
        Duration::minutes(-14),
        Duration::minutes(14),
    ] {
        let r = get_signed_at(&e, &job, now + skew).await;
        assert_eq!(r.status, 200, "skew {skew}: {r:?}");
        assert!(r.body.ends_with("payload"), "{r:?}");
    }
    // A captured request replayed later, or one signed far ahead.
    for skew in [
        Duration::minutes(-16),
        Duration::hours(-24),
        Duration::minutes(16),
    ] {
        let r = get_signed_at(&e, &job, now + skew).await;
        assert_eq!(r.status, 403, "skew {skew}: {r:?}");
        assert!(
            r.body.contains("<Code>RequestTimeTooSkewed</Code>"),
            "skew {skew}: {r:?}"
        );
    }
    e.stop().await;
}

fn presigned(e: &Embedded, job: &JobBucket, signed_at: OffsetDateTime, expires: u64) -> String {
    let host = e.url.trim_start_matches("http://");
    let path = format!("/{}/x", job.bucket);
    let q = Signer::new(&job.access_key, job.secret_key.expose(), "us-east-1").presign(
        "GET",
        host,
        &path,
        &[],
        expires,
        signed_at,
    );
    format!("{}{path}?{}", e.url, canonical_query(&q))
}

#[tokio::test]
async fn presigned_urls_expire() {
    let e = Embedded::start().await;
    let job = job_with_object(&e).await;
    let now = OffsetDateTime::now_utc();
    let fresh = reqwest::get(presigned(&e, &job, now, 600)).await.unwrap();
    assert_eq!(fresh.status(), 200);
    assert_eq!(fresh.text().await.unwrap(), "payload");

    // Signed two hours ago for one hour: expired.
    let old = reqwest::get(presigned(&e, &job, now - Duration::hours(2), 3600))
        .await
        .unwrap();
    assert_eq!(old.status(), 403);
    let body = old.text().await.unwrap();
    assert!(
        body.contains("<Code>AccessDenied</Code>") && body.contains("expired"),
        "{body}"
    );
    // Longer than S3's 7 days is refused however fresh.
    let long = reqwest::get(presigned(&e, &job, now, 604_801))
        .await
        .unwrap();
    assert_eq!(long.status(), 400);
    let body = long.text().await.unwrap();
    assert!(
        body.contains("<Code>AuthorizationQueryParametersError</Code>"),
        "{body}"
    );
    e.stop().await;
}

#[tokio::test]
async fn form_posts_and_other_schemes_are_refused() {
    let e = Embedded::start().await;
    let job = job_with_object(&e).await;
    let r = Raw::new("POST", &format!("/{}", job.bucket))
        .header("content-type", "multipart/form-data; boundary=b")
        .body(
            "--b\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\n../x\r\n--b--\r\n"
                .as_bytes()
                .to_vec(),
        )
        .send(&e.url)
        .await;
    assert_eq!(r.status, 501, "{r:?}");
    assert!(r.body.contains("<Code>NotImplemented</Code>"), "{r:?}");
    let r = Raw::new("GET", &format!("/{}/x", job.bucket))
        .header("authorization", "Bearer abc")
        .send(&e.url)
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("<Code>InvalidRequest</Code>"), "{r:?}");
    e.stop().await;
}
