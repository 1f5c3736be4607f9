//! `session_end`'s `job_bucket`: the job's files for its ci-tron client to mirror
//! (`executorctl -s DIR` runs `mcli mirror --overwrite --remove client/<bucket> DIR`).
//!
//! The job's own bucket is gone by then: its teardown revoked the DUT's keys, kept the files
//! as the job's artifacts (`artifacts/bucket/`) and deleted it. Those files are put in a
//! bucket of their own, `<prefix><job id>-client`, with a read-only key accepted from the
//! client's address and `executor.trusted_client_networks` only, for [`READER_TTL`]; the
//! bucket is deleted when the key expires. The DUT never holds a key to it.

use std::net::IpAddr;
use std::time::Duration;

use dutgate_core::ServiceName;
use ipnet::IpNet;
use serde_json::Value;

use super::wire::JobBucket;
use crate::api::AppState;
use crate::model::kind;

/// How long the client may mirror the job's files after the session ended.
pub const READER_TTL: Duration = Duration::from_secs(10 * 60);

/// The job's files offered to the client at `client`, which reached the executor at `host`
/// (then the S3 endpoint is offered on that host), or `None` when the job had no bucket (or
/// the gateway no object storage).
pub async fn publish(
    s: &AppState,
    id: i64,
    client: IpAddr,
    host: Option<&str>,
) -> Result<Option<JobBucket>, String> {
    let Some(store) = &s.cfg.object_store else {
        return Ok(None);
    };
    if job_bucket(s, id).await?.is_none() {
        return Ok(None);
    }
    let storage = dutgate_storage::JobStorage::new(&s.gw, &store.0)
        .await
        .map_err(|e| e.to_string())?;
    let mut networks: Vec<IpNet> = s.cfg.trusted_client_networks.clone();
    networks.push(IpNet::from(dutgate_core::outbound::canonical(client)));
    let files = s.sup.job_dir(id).join("artifacts").join("bucket");
    let published = storage
        .publish_for_reader(&format!("{id}-client"), &files, &networks, READER_TTL)
        .await
        .map_err(|e| e.to_string())?;
    let bucket = published.bucket.clone();
    // The key expires by itself; the bucket goes with it. An executor stopped in between
    // leaves the bucket behind (docs/security.md, known gaps).
    tokio::spawn(async move {
        tokio::time::sleep(READER_TTL).await;
        if let Err(e) = storage.delete_bucket(&bucket).await {
            tracing::warn!(job_id = id, bucket = %bucket, error = %e, "deleting a client bucket");
        }
    });
    let mut url = reqwest::Url::parse(&s.gw.public_url(ServiceName::S3))
        .map_err(|e| format!("the gateway's S3 URL: {e}"))?;
    if let Some(host) = host {
        url.set_host(Some(host))
            .map_err(|e| format!("the host the client used ({host}): {e}"))?;
    }
    url.set_username(&published.access_key)
        .and_then(|()| url.set_password(Some(published.secret_key.expose())))
        .map_err(|()| "the gateway's S3 URL cannot carry credentials".to_string())?;
    tracing::info!(job_id = id, bucket = %published.bucket, files = published.files, %client,
        "job files offered to the ci-tron client");
    Ok(Some(JobBucket {
        minio_access_url: url.as_str().trim_end_matches('/').to_string(),
        bucket_name: published.bucket,
    }))
}

/// The name of the job's bucket, from its setup event.
async fn job_bucket(s: &AppState, id: i64) -> Result<Option<String>, String> {
    let events = s.store.events(id, 0).await.map_err(|e| e.to_string())?;
    Ok(events
        .iter()
        .filter(|e| e.kind == kind::PHASE)
        .find_map(|e| e.data.get("bucket").and_then(Value::as_str))
        .map(str::to_string))
}
