//! HTTP load generator for `cargo xtask bench boot`: `concurrency` clients GET `url` in a loop
//! for `seconds`, reading every body to the end, over kept-alive connections. Prints one JSON
//! line: requests, errors, bytes, requests/s, MB/s, latency p50/p99 in ms.
//!
//! Usage: `boot_load <url> <concurrency> <seconds> [<expected body bytes>]`

use std::time::{Duration, Instant};

use futures::StreamExt;

#[derive(Default)]
struct Tally {
    requests: u64,
    errors: u64,
    bytes: u64,
    latencies_us: Vec<u64>,
}

async fn worker(http: reqwest::Client, url: String, until: Instant, expect: Option<u64>) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < until {
        let start = Instant::now();
        let ok = async {
            let resp = http.get(&url).send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let mut n = 0u64;
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                n += chunk.ok()?.len() as u64;
            }
            Some(n)
        }
        .await;
        match ok {
            Some(n) if expect.is_none_or(|e| e == n) => {
                t.requests += 1;
                t.bytes += n;
                t.latencies_us.push(start.elapsed().as_micros() as u64);
            }
            _ => t.errors += 1,
        }
    }
    t
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: boot_load <url> <concurrency> <seconds> [<expected body bytes>]");
        std::process::exit(2);
    }
    let url = args[1].clone();
    let concurrency: usize = args[2].parse().unwrap_or(1);
    let seconds: f64 = args[3].parse().unwrap_or(1.0);
    let expect: Option<u64> = args.get(4).and_then(|s| s.parse().ok());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap_or_else(|e| panic!("http client: {e}"));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(http.clone(), url.clone(), until, expect)))
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        if let Ok(t) = t.await {
            all.requests += t.requests;
            all.errors += t.errors;
            all.bytes += t.bytes;
            all.latencies_us.extend(t.latencies_us);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let out = serde_json::json!({
        "requests": all.requests,
        "errors": all.errors,
        "bytes": all.bytes,
        "seconds": elapsed,
        "rps": all.requests as f64 / elapsed,
        "mb_per_s": all.bytes as f64 / elapsed / 1e6,
        "p50_ms": percentile(&all.latencies_us, 0.5),
        "p99_ms": percentile(&all.latencies_us, 0.99),
    });
    println!("{out}");
}
