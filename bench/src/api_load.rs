//! `api-load URL TOKEN RATE SECONDS`: an open-loop load of GET requests at a
//! fixed rate. Latency is measured from each request's *scheduled* start, so
//! a stalled server cannot hide its queueing (no coordinated omission).
//! Prints requests, errors, p50, p99 and max in milliseconds.

use std::time::{Duration, Instant};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, token, rate, seconds] = &args[..] else {
        return Err("usage: api-load URL TOKEN RATE SECONDS".into());
    };
    let rate: u64 = rate.parse()?;
    let seconds: u64 = seconds.parse()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()?;
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    let mut handles = Vec::with_capacity((rate * seconds) as usize);
    for i in 0..rate * seconds {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let request = client.get(url).bearer_auth(token);
        handles.push(tokio::spawn(async move {
            let ok = matches!(request.send().await, Ok(r) if r.status().is_success());
            (scheduled.elapsed(), ok)
        }));
    }
    let mut latencies = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for handle in handles {
        let (latency, ok) = handle.await?;
        if !ok {
            errors += 1;
        }
        latencies.push(latency);
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "requests {} errors {} p50_ms {:.2} p99_ms {:.2} max_ms {:.2}",
        latencies.len(),
        errors,
        ms(at(0.50)),
        ms(at(0.99)),
        ms(at(1.0))
    );
    Ok(())
}
