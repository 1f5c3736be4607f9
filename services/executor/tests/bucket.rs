//! Acceptance 5, end to end: the job bucket on the embedded S3 endpoint. The initial tarball
//! is readable with the job's keys, what the DUT writes comes back as artifacts, and the
//! job's keys open neither another job's bucket nor their own once the job has ended.

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::JobStatus;

const T: Duration = Duration::from_secs(60);

fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        builder.append_data(&mut h, path, *data).unwrap();
    }
    let raw = builder.into_inner().unwrap();
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_bucket_round_trip_and_isolation() {
    // Another job's bucket, with a file the DUT must not read; its name reaches the DUT as a
    // template variable.
    let other_bucket = dutgate_storage::jobs::bucket_name("job-", "other-job").unwrap();
    let farm = Farm::start(Options {
        machines: 1,
        s3: true,
        template_vars: vec![("other_bucket".into(), other_bucket.clone())],
        ..options()
    })
    .await;
    let (url, storage) = {
        let s3 = farm.s3.as_ref().unwrap();
        (s3.url.clone(), s3.storage.clone())
    };
    let other = storage.create_job_bucket("other-job").await.unwrap();
    assert_eq!(other.bucket, other_bucket);
    storage
        .client()
        .put_bytes(
            &other.bucket,
            "secret.txt",
            bytes::Bytes::from_static(b"not yours"),
        )
        .await
        .unwrap();

    let job = job_yaml(&format!("  id: \"{}\"", mac(1)), "bucket", "bucket", "", "").replace(
        "\"sim=bucket\"]",
        "\"sim=bucket\", \"s3={{ s3_url }}\", \"minio={{ minio_url }}\", \"bucket={{ job_bucket }}\", \
         \"ak={{ job_bucket_access_key }}\", \"sk={{ job_bucket_secret_key }}\", \
         \"other={{ other_bucket }}\"]",
    );
    let form = reqwest::multipart::Form::new()
        .part(
            "metadata",
            reqwest::multipart::Part::text(
                serde_json::json!({"version": 1, "job_id": "bucket-test"}).to_string(),
            )
            .mime_str("application/json")
            .unwrap(),
        )
        .part("job", reqwest::multipart::Part::text(job))
        .part(
            "job_bucket_initial_state_tarball_file",
            reqwest::multipart::Part::bytes(tarball(&[("input/hello.txt", b"hello from the CI")])),
        );
    let r = farm
        .http
        .post(format!("{}/api/v1/jobs", farm.url))
        .bearer_auth(USER)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let done = farm.wait_finished(id, T).await;
    let console = farm.console(id).await;
    assert_eq!(done.status, Some(JobStatus::Pass), "{console}");

    // The DUT read the initial state with its own keys, wrote its result, and was refused
    // the other job's bucket.
    assert!(console.contains("INITIAL: hello from the CI"), "{console}");
    assert!(console.contains("WROTE: results/out.txt"), "{console}");
    assert!(console.contains("OTHER: refused 403"), "{console}");

    // The bucket's files are the job's artifacts: the DUT's file and the initial state.
    let list: serde_json::Value = farm
        .get(&format!("/api/v1/jobs/{id}/artifacts"))
        .await
        .json()
        .await
        .unwrap();
    let text = list.to_string();
    assert!(text.contains("bucket/results/out.txt"), "{text}");
    assert!(text.contains("bucket/input/hello.txt"), "{text}");
    let got = farm
        .http
        .get(format!(
            "{}/api/v1/jobs/{id}/artifacts/bucket/results/out.txt",
            farm.url
        ))
        .bearer_auth(USER)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), "written by the DUT");

    // After the job the DUT's keys are revoked: refused everywhere, and the bucket is gone
    // (its files are artifacts now).
    let keys = BUCKET_KEYS.lock().unwrap().clone();
    let (bucket, ak, sk) = keys.last().unwrap().clone();
    assert!(bucket.contains(&id.to_string()), "{bucket}");
    let dut = s3_client(&url, &ak, &sk);
    assert_eq!(s3_read(&dut, &bucket, "input/hello.txt").await, Err(403));
    assert_eq!(s3_read(&dut, &other_bucket, "secret.txt").await, Err(403));
    assert!(!storage.client().bucket_exists(&bucket).await.unwrap());
    // The secret key never reaches the events or the console.
    let events = serde_json::to_string(&farm.events(id).await).unwrap();
    assert!(!events.contains(&sk), "secret key in the events");
    assert!(!console.contains(&sk), "secret key on the console");
    farm.stop().await;
}
