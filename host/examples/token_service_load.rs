//! Measures `azgate token-service` on loopback: cold-start single-flight and cache-hit latency.
//!
//! Starts the IMDS emulator and a token service in-process, then sends `CLIENTS` concurrent
//! keep-alive clients × `REQUESTS` token requests for one identity and prints throughput,
//! latency percentiles and how many calls reached the emulator.
//!
//! You can execute this example with `cargo run --release -p azgate --example token_service_load`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use azgate::token::{HttpClient, HyperClient, ProviderConfig, Source, TokenProvider, TokenService};
use azgate_emulator::Emulator;
use bytes::Bytes;

const CLIENTS: usize = 50;
const REQUESTS: usize = 400;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let emulator = Emulator::start("127.0.0.1:0".parse()?).await?;
    let provider = TokenProvider::new(
        Source::Imds {
            endpoint: emulator.base_url(),
        },
        Arc::new(HyperClient::new()?),
        ProviderConfig::default(),
    );
    let service = TokenService::new(provider)
        .start("127.0.0.1:0".parse()?)
        .await?;
    let url = format!(
        "http://{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F",
        service.local_addr()
    );

    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = HyperClient::new()?;
                let mut latencies = Vec::with_capacity(REQUESTS);
                for _ in 0..REQUESTS {
                    let request = http::Request::get(&url)
                        .header("Metadata", "true")
                        .body(Bytes::new())?;
                    let sent = Instant::now();
                    let response = client.send(request).await?;
                    latencies.push(sent.elapsed());
                    if response.status() != 200 {
                        return Err(format!("status {}", response.status()).into());
                    }
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(latencies)
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = Vec::new();
    for client in clients {
        latencies.extend(client.await?.map_err(|error| error.to_string())?);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "{} requests from {CLIENTS} clients in {elapsed:.2?}: {:.0} req/s; p50 {:.2?}, p99 {:.2?}, max {:.2?}; emulator saw {} token request(s)",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(0.50),
        percentile(0.99),
        percentile(1.0),
        emulator.token_requests(),
    );
    Ok(())
}
