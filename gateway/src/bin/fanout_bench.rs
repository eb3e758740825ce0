//! Measures what the gateway's fan-out adds over the shards it waits for.
//!
//! Starts index-svc processes on 127.0.0.1 (the `index-svc` binary next to
//! this one), fills each with the same number of random unit vectors, and
//! sends the same queries through `gateway::fan_out` over 1, 4 and 8 shards.
//! For every request the overhead is the fan-out's latency minus the
//! slowest shard's latency in that request. A direct call to one shard of
//! the same size is measured alongside.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use densebert4ret_proto::v1::index_client::IndexClient;
use densebert4ret_proto::v1::{IndexItem, IndexSearchRequest, IndexStatsRequest, IndexUpsertRequest, QueryVector};
use gateway::{connect_shards, fan_out, FanOutOptions, GatewaySettings, ShardReplicas};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

const FINGERPRINT: &str = "fanout-bench";

/// Fan-out overhead benchmark over local index-svc processes.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Shard counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 8])]
    shards: Vec<usize>,
    /// Vectors stored in each shard.
    #[arg(long, default_value_t = 20_000)]
    vectors_per_shard: usize,
    /// Vector dimension.
    #[arg(long, default_value_t = 256)]
    dimension: usize,
    /// Measured queries per shard count, after 50 warm-up queries.
    #[arg(long, default_value_t = 500)]
    queries: usize,
    /// Results per query.
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// index-svc binary; defaults to the one next to this executable.
    #[arg(long)]
    index_svc: Option<PathBuf>,
    /// Seed of the vectors and queries.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// One index-svc child process, killed on drop.
struct IndexProcess {
    _child: Child,
    url: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn unit_vector(random: &mut StdRng, dimension: usize) -> Vec<f32> {
    let mut vector: Vec<f32> = (0..dimension).map(|_| random.gen_range(-1.0f32..1.0)).collect();
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    vector.iter_mut().for_each(|value| *value /= norm);
    vector
}

async fn start_index(binary: &PathBuf, data_dir: &std::path::Path, shard: usize) -> anyhow::Result<IndexProcess> {
    let address = format!("127.0.0.1:{}", free_port()?);
    let child = Command::new(binary)
        .env("INDEX__LISTEN", &address)
        .env("INDEX__SHARD_ID", shard.to_string())
        .env("INDEX__DATA_DIR", data_dir.join(format!("shard-{shard}")))
        .env("INDEX__FSYNC", "false")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    Ok(IndexProcess { _child: child, url: format!("http://{address}") })
}

async fn connect_when_serving(url: &str) -> anyhow::Result<IndexClient<Channel>> {
    let started = Instant::now();
    loop {
        if let Ok(mut client) = IndexClient::connect(url.to_string()).await {
            if client.stats(IndexStatsRequest {}).await.is_ok() {
                return Ok(client.max_encoding_message_size(64 * 1024 * 1024));
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("index-svc at {url} was not serving after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns the value at quantile `q` of sorted `values`, in microseconds.
fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

fn summary(mut values: Vec<Duration>) -> (f64, f64) {
    values.sort();
    (quantile(&values, 0.5), quantile(&values, 0.95))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    densebert4ret_common::init_tracing("fanout-bench");
    let args = Args::parse();
    let max_shards = args.shards.iter().copied().max().context("pass at least one shard count")?;
    if args.shards.contains(&0) || args.queries == 0 || args.k == 0 {
        anyhow::bail!("shard counts, --queries and --k must be at least 1");
    }
    let binary = match &args.index_svc {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.parent().context("executable has no directory")?.join("index-svc"),
    };
    let data_dir = std::env::temp_dir().join(format!("fanout-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir)?;

    let outcome = run(&args, &binary, &data_dir, max_shards).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    outcome
}

async fn run(args: &Args, binary: &PathBuf, data_dir: &std::path::Path, max_shards: usize) -> anyhow::Result<()> {
    // Shard 0 of every run is process 0, so the direct call always goes to
    // a shard of the same size as the fanned-out ones.
    let mut processes = Vec::with_capacity(max_shards);
    for shard in 0..max_shards {
        processes.push(start_index(binary, data_dir, shard).await?);
    }
    let mut random = StdRng::seed_from_u64(args.seed);
    eprintln!("filling {max_shards} shards with {} vectors of dimension {} each", args.vectors_per_shard, args.dimension);
    for (shard, process) in processes.iter().enumerate() {
        let mut client = connect_when_serving(&process.url).await?;
        let items: Vec<IndexItem> = (0..args.vectors_per_shard)
            .map(|index| IndexItem {
                id: format!("shard-{shard}-vector-{index}"),
                vector: unit_vector(&mut random, args.dimension),
                ..Default::default()
            })
            .collect();
        for chunk in items.chunks(2_000) {
            client
                .upsert(IndexUpsertRequest { items: chunk.to_vec(), model_fingerprint: FINGERPRINT.into() })
                .await
                .with_context(|| format!("upsert into {} failed", process.url))?;
        }
    }
    let queries: Vec<Vec<f32>> = (0..args.queries + 50).map(|_| unit_vector(&mut random, args.dimension)).collect();
    let request = |values: &Vec<f32>| IndexSearchRequest {
        queries: vec![QueryVector { values: values.clone() }],
        k: args.k,
        model_fingerprint: FINGERPRINT.into(),
        ..Default::default()
    };

    let mut direct = connect_when_serving(&processes[0].url).await?;
    let mut direct_latencies = Vec::with_capacity(args.queries);
    for (number, query) in queries.iter().enumerate() {
        let started = Instant::now();
        direct.search(request(query)).await.context("direct search failed")?;
        if number >= 50 {
            direct_latencies.push(started.elapsed());
        }
    }
    let (direct_p50, direct_p95) = summary(direct_latencies);

    println!("| shards | direct call to one shard p50 / p95 (us) | fan-out p50 / p95 (us) | slowest shard p50 / p95 (us) | overhead p50 / p95 (us) |");
    println!("|---|---|---|---|---|");
    for &shard_count in &args.shards {
        let settings = GatewaySettings {
            shards: processes[..shard_count].iter().map(|process| ShardReplicas::parse(&process.url)).collect(),
            ..GatewaySettings::default()
        };
        let shards = connect_shards(&settings)?;
        let mut totals = Vec::with_capacity(args.queries);
        let mut slowest = Vec::with_capacity(args.queries);
        let mut overheads = Vec::with_capacity(args.queries);
        for (number, query) in queries.iter().enumerate() {
            let options = FanOutOptions {
                deadline: tokio::time::Instant::now() + Duration::from_secs(10),
                attempt_timeout: Duration::from_secs(10),
                allow_partial: false,
            };
            let started = Instant::now();
            let result = fan_out(&shards, request(query), args.k as usize, options).await?;
            let total = started.elapsed();
            if number < 50 {
                continue;
            }
            let max_shard = result.shard_latencies.iter().flatten().max().copied().unwrap_or_default();
            totals.push(total);
            slowest.push(max_shard);
            overheads.push(total.saturating_sub(max_shard));
        }
        let (total_p50, total_p95) = summary(totals);
        let (slowest_p50, slowest_p95) = summary(slowest);
        let (overhead_p50, overhead_p95) = summary(overheads);
        println!(
            "| {shard_count} | {direct_p50:.0} / {direct_p95:.0} | {total_p50:.0} / {total_p95:.0} | {slowest_p50:.0} / {slowest_p95:.0} | {overhead_p50:.0} / {overhead_p95:.0} |"
        );
    }
    Ok(())
}
