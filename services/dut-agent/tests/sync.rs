//! `dutgate-dut s3 pull|push` against the real embedded S3 endpoint, with a job's DUT keys.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dutgate_core::config::GatewayConfig;
use dutgate_storage::{Config, JobBucket, JobStorage};
use tokio_util::sync::CancellationToken;

struct Endpoint {
    storage: JobStorage,
    url: String,
    shutdown: CancellationToken,
    _state: tempfile::TempDir,
}

async fn start() -> Endpoint {
    let state = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut gateway = GatewayConfig {
        state_dir: state.path().to_path_buf(),
        ..Default::default()
    };
    gateway.ports.s3 = port;
    let config = Config::default();
    let embedded = dutgate_storage::server::build(&gateway, &config)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ =
            dutgate_storage::server::serve(listener, embedded.router, stop, Duration::from_secs(1))
                .await;
    });
    let storage = JobStorage::new(&gateway, &config).await.unwrap();
    Endpoint {
        storage,
        url: format!("http://127.0.0.1:{port}"),
        shutdown,
        _state: state,
    }
}

fn spec(url: &str, b: &JobBucket) -> String {
    format!(
        "{url},{},{},{}",
        b.bucket,
        b.access_key,
        b.secret_key.expose()
    )
}

/// Runs the agent off the async runtime (it is a blocking program, as in the DUT).
async fn agent(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_dutgate-dut"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_the_initial_state_and_pushes_results_with_job_keys() {
    let ep = start().await;
    let job = ep.storage.create_job_bucket("a1").await.unwrap();
    let other = ep.storage.create_job_bucket("b2").await.unwrap();
    let client = ep.storage.client();
    client
        .put_bytes(
            &job.bucket,
            "input/config.txt",
            b"from the submitter".to_vec().into(),
        )
        .await
        .unwrap();
    client
        .put_bytes(&job.bucket, "top level & co.txt", b"second".to_vec().into())
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = agent(vec![
        "s3".into(),
        "pull".into(),
        s(dir.path()),
        spec(&ep.url, &job),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dir.path().join("input/config.txt")).unwrap(),
        b"from the submitter"
    );
    assert_eq!(
        std::fs::read(dir.path().join("top level & co.txt")).unwrap(),
        b"second"
    );

    std::fs::create_dir_all(dir.path().join("results/logs")).unwrap();
    std::fs::write(
        dir.path().join("results/logs/dmesg.txt"),
        vec![b'x'; 200_000],
    )
    .unwrap();
    let out = agent(vec![
        "s3".into(),
        "push".into(),
        s(dir.path()),
        spec(&ep.url, &job),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<String> = ep
        .storage
        .list(&job.bucket)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        keys.contains(&"results/logs/dmesg.txt".to_string()),
        "{keys:?}"
    );
    let mut body = Vec::new();
    let obj = ep
        .storage
        .get(&job.bucket, "results/logs/dmesg.txt")
        .await
        .unwrap();
    let tmp = dir.path().join("check");
    obj.write_to(&tmp).await.unwrap();
    body.extend(std::fs::read(&tmp).unwrap());
    assert_eq!(body.len(), 200_000);

    // The job's keys do not open another job's bucket: a clear error, exit 1.
    let stolen = JobBucket {
        bucket: other.bucket.clone(),
        ..job.clone()
    };
    let out = agent(vec![
        "s3".into(),
        "pull".into(),
        s(dir.path()),
        spec(&ep.url, &stolen),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403"), "{err}");

    // Bad specs are usage errors.
    let out = agent(vec![
        "s3".into(),
        "pull".into(),
        s(dir.path()),
        "nonsense".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    ep.shutdown.cancel();
}
