//! `index-bench`: search QPS and recall@k of one shard over gRPC on
//! loopback, next to faiss-cpu in Python on the same seeded vectors, index
//! strings, query parameters and thread count; and upsert throughput with
//! fsync on.
//!
//! The shard runs in this process on its own runtime and serves on a
//! 127.0.0.1 port chosen at run time; clients share the machine with it, as
//! they would with a gateway on the same host. faiss-cpu runs through
//! `scripts/faiss_cpu_bench.py`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use densebert4ret_proto::v1::index_client::IndexClient;
use densebert4ret_proto::v1::{
    IndexItem, IndexSearchRequest, IndexUpsertRequest, QueryVector, SearchParams,
};
use index_svc::vector_index::{QueryParams, VectorIndex};
use index_svc::{Metric, Settings, Shard};
use tonic::transport::Channel;

/// Benchmark of index-svc against faiss-cpu.
#[derive(Debug, Parser)]
#[command(name = "index-bench")]
struct Cli {
    /// Stored vectors.
    #[arg(long, default_value_t = 50_000)]
    count: usize,
    /// Vector dimension.
    #[arg(long, default_value_t = 128)]
    dimension: usize,
    /// Query vectors; searches cycle through them.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Single-query searches per index type and side.
    #[arg(long, default_value_t = 4000)]
    searches: usize,
    /// Results per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Concurrent clients, and Python threads on the faiss-cpu side.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// FAISS factory strings to compare, separated by semicolons.
    #[arg(long, default_value = "Flat;IVF256,Flat;HNSW32")]
    factories: String,
    /// nprobe of IVF searches on both sides.
    #[arg(long, default_value_t = 16)]
    nprobe: u32,
    /// efSearch of HNSW searches on both sides.
    #[arg(long, default_value_t = 64)]
    ef_search: u32,
    /// Seed of the vector generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Queries per request in the batched run, which compares with
    /// faiss-cpu searching all queries in one call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Single-item upserts of the throughput run (fsync on).
    #[arg(long, default_value_t = 2000)]
    upserts: usize,
    /// Python interpreter with faiss-cpu installed.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The faiss-cpu script.
    #[arg(long, default_value = "scripts/faiss_cpu_bench.py")]
    script: PathBuf,
    /// Directory for the data set and the shard data; a temporary one when
    /// unset.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// Search figures of one side for one index string.
#[derive(Debug, Clone, Copy, Default)]
struct SearchFigures {
    qps: f64,
    recall: f64,
}

/// Shard figures for single-query requests and for batched requests.
#[derive(Debug, Clone, Copy, Default)]
struct ShardFigures {
    single: SearchFigures,
    batched: SearchFigures,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let factories: Vec<String> = cli
        .factories
        .split(';')
        .map(str::trim)
        .filter(|factory| !factory.is_empty())
        .map(str::to_owned)
        .collect();
    let temp = tempfile_dir(cli.work_dir.as_deref())?;
    let work_dir = temp.path.clone();

    eprintln!(
        "generating {} base and {} query vectors of dimension {}",
        cli.count, cli.queries, cli.dimension
    );
    let base = clustered_vectors(cli.seed, cli.count, cli.dimension);
    let queries = clustered_vectors(cli.seed ^ 0x5eed, cli.queries, cli.dimension);
    let truth = exact_top_k(&base, &queries, cli.dimension, cli.k)?;
    write_f32(&work_dir.join("base.f32"), &base)?;
    write_f32(&work_dir.join("queries.f32"), &queries)?;
    write_i64(&work_dir.join("ground_truth.i64"), &truth)?;

    eprintln!("running faiss-cpu");
    let python = run_faiss_cpu(&cli, &factories, &work_dir)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for factory in &factories {
        eprintln!("running index-svc with {factory}");
        let shard_dir = work_dir.join(format!("shard-{}", rows.len()));
        let figures = runtime.block_on(bench_shard(&cli, factory, &shard_dir, &base, &queries, &truth))?;
        rows.push((factory.clone(), figures));
    }
    let upsert = runtime.block_on(bench_upserts(&cli, &work_dir.join("upserts"), &base))?;

    println!(
        "\nindex-svc (gRPC, {} clients) vs faiss-cpu {} ({} Python threads, 1 OpenMP thread each); {} vectors, dimension {}, k = {}, nprobe = {}, efSearch = {}",
        cli.threads,
        python.version,
        cli.threads,
        cli.count,
        cli.dimension,
        cli.k,
        cli.nprobe,
        cli.ef_search
    );
    println!(
        "| index | shard QPS | shard recall@{k} | faiss-cpu QPS (threads) | faiss-cpu recall@{k} | ratio | shard QPS ({batch} per request) | faiss-cpu QPS (one batch) | batched ratio |",
        k = cli.k,
        batch = cli.batch
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (factory, shard) in &rows {
        let reference = python
            .results
            .iter()
            .find(|(name, _)| name == factory)
            .map(|(_, figures)| *figures)
            .unwrap_or_default();
        println!(
            "| {factory} | {:.0} | {:.3} | {:.0} | {:.3} | {:.2} | {:.0} | {:.0} | {:.2} |",
            shard.single.qps,
            shard.single.recall,
            reference.threaded.qps,
            reference.threaded.recall,
            shard.single.qps / reference.threaded.qps,
            shard.batched.qps,
            reference.batched_qps,
            shard.batched.qps / reference.batched_qps
        );
        if (shard.batched.recall - shard.single.recall).abs() > 1e-9 {
            eprintln!(
                "warning: {factory} batched recall {:.4} differs from single-query recall {:.4}",
                shard.batched.recall, shard.single.recall
            );
        }
    }
    println!(
        "\nupserts with fsync: {} single-item requests from {} clients: {:.0} requests/s; batches of 100: {:.0} items/s",
        cli.upserts, cli.threads, upsert.0, upsert.1
    );
    Ok(())
}

/// Figures of the faiss-cpu script.
struct PythonFigures {
    version: String,
    results: Vec<(String, PythonRow)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct PythonRow {
    threaded: SearchFigures,
    batched_qps: f64,
}

fn run_faiss_cpu(cli: &Cli, factories: &[String], work_dir: &Path) -> anyhow::Result<PythonFigures> {
    let mut command = Command::new(&cli.python);
    command
        .arg(&cli.script)
        .arg("--data")
        .arg(work_dir)
        .arg("--dimension")
        .arg(cli.dimension.to_string())
        .arg("--k")
        .arg(cli.k.to_string())
        .arg("--nprobe")
        .arg(cli.nprobe.to_string())
        .arg("--ef-search")
        .arg(cli.ef_search.to_string())
        .arg("--threads")
        .arg(cli.threads.to_string())
        .arg("--searches")
        .arg(cli.searches.to_string());
    for factory in factories {
        command.arg("--factory").arg(factory);
    }
    let output = command
        .output()
        .with_context(|| format!("failed to run {}", cli.python.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}",
            cli.script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let value: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("the faiss-cpu script printed no JSON object")?;
    let version = value["faiss_version"].as_str().unwrap_or("unknown").to_owned();
    let mut results = Vec::new();
    if let Some(map) = value["results"].as_object() {
        for (factory, row) in map {
            results.push((
                factory.clone(),
                PythonRow {
                    threaded: SearchFigures {
                        qps: row["threaded_qps"].as_f64().unwrap_or(0.0),
                        recall: row["recall"].as_f64().unwrap_or(0.0),
                    },
                    batched_qps: row["batched_qps"].as_f64().unwrap_or(0.0),
                },
            ));
        }
    }
    Ok(PythonFigures { version, results })
}

/// Opens a shard and serves it on a loopback port chosen at run time.
/// Returns the shard, its address, and the sender that stops the server.
async fn start_shard(
    settings: Settings,
) -> anyhow::Result<(Arc<Shard>, std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let max_message_bytes = settings.max_message_bytes;
    let (shard, _) = tokio::task::spawn_blocking(move || Shard::open(settings)).await??;
    let shard = Arc::new(shard);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(index_svc::serve(
        Arc::clone(&shard),
        listener,
        max_message_bytes,
        async {
            let _ = stopped.await;
        },
    ));
    Ok((shard, address, stop))
}

async fn connect(address: std::net::SocketAddr) -> anyhow::Result<IndexClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    Ok(IndexClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024))
}

async fn bench_shard(
    cli: &Cli,
    factory: &str,
    data_dir: &Path,
    base: &[f32],
    queries: &[f32],
    truth: &[i64],
) -> anyhow::Result<ShardFigures> {
    let settings = Settings {
        data_dir: data_dir.to_owned(),
        dimension: Some(cli.dimension as u32),
        index_factory: factory.to_owned(),
        metric: Metric::InnerProduct,
        train_threshold: Some(cli.count as u64),
        nprobe: cli.nprobe,
        ef_search: cli.ef_search,
        fsync: false,
        max_batch_items: 10_000,
        ..Settings::default()
    };
    let (shard, address, stop) = start_shard(settings).await?;
    let mut client = connect(address).await?;
    let dimension = cli.dimension;
    for (chunk_index, chunk) in base.chunks(5000 * dimension).enumerate() {
        let items = chunk
            .chunks(dimension)
            .enumerate()
            .map(|(offset, vector)| IndexItem {
                id: (chunk_index * 5000 + offset).to_string(),
                vector: vector.to_vec(),
                metadata: Default::default(),
                image_features: Vec::new(),
            })
            .collect();
        client
            .upsert(IndexUpsertRequest {
                items,
                model_fingerprint: String::new(),
            })
            .await?;
    }
    let waiter = Arc::clone(&shard);
    tokio::task::spawn_blocking(move || waiter.wait_for_background_build()).await?;
    if !shard.stats().trained {
        bail!("the {factory} index did not train");
    }

    let params = Some(SearchParams {
        nprobe: cli.nprobe,
        ef_search: cli.ef_search,
    });
    let query_count = queries.len() / dimension;
    let per_client = cli.searches / cli.threads;
    let queries = Arc::new(queries.to_vec());
    let truth = Arc::new(truth.to_vec());
    let k = cli.k;
    let mut clients = Vec::new();
    for _ in 0..cli.threads {
        clients.push(connect(address).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (client_index, mut client) in clients.into_iter().enumerate() {
        let queries = Arc::clone(&queries);
        let truth = Arc::clone(&truth);
        tasks.push(tokio::spawn(async move {
            let mut hits = 0usize;
            let mut checked = 0usize;
            for i in 0..per_client {
                let row = (client_index * per_client + i) % query_count;
                let response = client
                    .search(IndexSearchRequest {
                        queries: vec![QueryVector {
                            values: queries[row * dimension..(row + 1) * dimension].to_vec(),
                        }],
                        k: k as u32,
                        model_fingerprint: String::new(),
                        exclude_ids: Vec::new(),
                        params,
                    })
                    .await?
                    .into_inner();
                let expected = &truth[row * k..(row + 1) * k];
                for item in &response.results[0].items {
                    let id: i64 = item.id.parse().unwrap_or(-1);
                    if expected.contains(&id) {
                        hits += 1;
                    }
                }
                checked += k;
            }
            anyhow::Ok((hits, checked))
        }));
    }
    let mut hits = 0;
    let mut checked = 0;
    for task in tasks {
        let (task_hits, task_checked) = task.await??;
        hits += task_hits;
        checked += task_checked;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let single = SearchFigures {
        qps: (per_client * cli.threads) as f64 / elapsed,
        recall: hits as f64 / checked.max(1) as f64,
    };
    let batched = bench_batched(cli, address, params, &queries, &truth).await?;
    let _ = stop.send(());
    Ok(ShardFigures { single, batched })
}

/// Sends every query once in requests of `cli.batch` queries, split across
/// `cli.threads` clients, as faiss-cpu's one-call search does in-process.
async fn bench_batched(
    cli: &Cli,
    address: std::net::SocketAddr,
    params: Option<SearchParams>,
    queries: &Arc<Vec<f32>>,
    truth: &Arc<Vec<i64>>,
) -> anyhow::Result<SearchFigures> {
    let dimension = cli.dimension;
    let k = cli.k;
    let query_count = queries.len() / dimension;
    let batch = cli.batch.max(1);
    let chunks: Vec<std::ops::Range<usize>> = (0..query_count)
        .step_by(batch)
        .map(|start| start..(start + batch).min(query_count))
        .collect();
    let chunks = Arc::new(chunks);
    let mut clients = Vec::new();
    for _ in 0..cli.threads {
        clients.push(connect(address).await?);
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (client_index, mut client) in clients.into_iter().enumerate() {
        let queries = Arc::clone(queries);
        let truth = Arc::clone(truth);
        let chunks = Arc::clone(&chunks);
        let threads = cli.threads;
        tasks.push(tokio::spawn(async move {
            let mut hits = 0usize;
            let mut checked = 0usize;
            for rows in chunks.iter().skip(client_index).step_by(threads) {
                let request = IndexSearchRequest {
                    queries: rows
                        .clone()
                        .map(|row| QueryVector {
                            values: queries[row * dimension..(row + 1) * dimension].to_vec(),
                        })
                        .collect(),
                    k: k as u32,
                    model_fingerprint: String::new(),
                    exclude_ids: Vec::new(),
                    params,
                };
                let response = client.search(request).await?.into_inner();
                for (row, result) in rows.clone().zip(&response.results) {
                    let expected = &truth[row * k..(row + 1) * k];
                    hits += result
                        .items
                        .iter()
                        .filter(|item| item.id.parse::<i64>().is_ok_and(|id| expected.contains(&id)))
                        .count();
                    checked += k;
                }
            }
            anyhow::Ok((hits, checked))
        }));
    }
    let mut hits = 0;
    let mut checked = 0;
    for task in tasks {
        let (task_hits, task_checked) = task.await??;
        hits += task_hits;
        checked += task_checked;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(SearchFigures {
        qps: query_count as f64 / elapsed,
        recall: hits as f64 / checked.max(1) as f64,
    })
}

/// Returns single-item upsert requests per second and items per second in
/// batches of 100, both with fsync on.
async fn bench_upserts(cli: &Cli, data_dir: &Path, base: &[f32]) -> anyhow::Result<(f64, f64)> {
    let settings = Settings {
        data_dir: data_dir.to_owned(),
        dimension: Some(cli.dimension as u32),
        index_factory: "Flat".to_owned(),
        fsync: true,
        ..Settings::default()
    };
    let (_shard, address, stop) = start_shard(settings).await?;
    let dimension = cli.dimension;
    let base = Arc::new(base.to_vec());
    let count = base.len() / dimension;

    let mut rates = Vec::new();
    for batch in [1usize, 100] {
        let requests_per_client = if batch == 1 {
            cli.upserts / cli.threads
        } else {
            (cli.upserts * 10 / batch / cli.threads).max(1)
        };
        let mut clients = Vec::new();
        for _ in 0..cli.threads {
            clients.push(connect(address).await?);
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (client_index, mut client) in clients.into_iter().enumerate() {
            let base = Arc::clone(&base);
            tasks.push(tokio::spawn(async move {
                for request in 0..requests_per_client {
                    let items = (0..batch)
                        .map(|offset| {
                            let row = (client_index * 7919 + request * batch + offset) % count;
                            IndexItem {
                                id: format!("{batch}-{client_index}-{request}-{offset}"),
                                vector: base[row * dimension..(row + 1) * dimension].to_vec(),
                                metadata: Default::default(),
                                image_features: Vec::new(),
                            }
                        })
                        .collect();
                    client
                        .upsert(IndexUpsertRequest {
                            items,
                            model_fingerprint: String::new(),
                        })
                        .await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let requests = requests_per_client * cli.threads;
        rates.push(if batch == 1 {
            requests as f64 / elapsed
        } else {
            (requests * batch) as f64 / elapsed
        });
    }
    let _ = stop.send(());
    Ok((rates[0], rates[1]))
}

/// Unit vectors around 100 seeded cluster centres, which gives IVF and HNSW
/// the structure of real embeddings rather than uniform noise.
fn clustered_vectors(seed: u64, count: usize, dimension: usize) -> Vec<f32> {
    let mut centres_state = 0x9e37_79b9_7f4a_7c15 ^ 42;
    let centres: Vec<f32> = (0..100 * dimension)
        .map(|_| gaussian(&mut centres_state))
        .collect();
    let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut vectors = Vec::with_capacity(count * dimension);
    for _ in 0..count {
        let centre = (splitmix(&mut state) % 100) as usize;
        let mut vector: Vec<f32> = (0..dimension)
            .map(|j| centres[centre * dimension + j] + 0.6 * gaussian(&mut state))
            .collect();
        let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
        for value in &mut vector {
            *value /= norm;
        }
        vectors.extend_from_slice(&vector);
    }
    vectors
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Standard normal draw (Box-Muller).
fn gaussian(state: &mut u64) -> f32 {
    let u1 = ((splitmix(state) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (splitmix(state) >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Exact top-k row indices of each query by inner product.
fn exact_top_k(base: &[f32], queries: &[f32], dimension: usize, k: usize) -> anyhow::Result<Vec<i64>> {
    let mut index = VectorIndex::new("Flat", dimension as u32, Metric::InnerProduct)?;
    let labels: Vec<u64> = (0..(base.len() / dimension) as u64).collect();
    index.add(base, &labels)?;
    let params = QueryParams {
        nprobe: 1,
        ef_search: 16,
    };
    let (_, found) = index.search(queries, k, params)?;
    Ok(found)
}

fn write_f32(path: &Path, values: &[f32]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("failed to write {}", path.display()))
}

fn write_i64(path: &Path, values: &[i64]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("failed to write {}", path.display()))
}

/// Work directory, removed on drop when the benchmark created it.
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn tempfile_dir(requested: Option<&Path>) -> anyhow::Result<WorkDir> {
    if let Some(path) = requested {
        std::fs::create_dir_all(path)?;
        return Ok(WorkDir {
            path: path.to_owned(),
            remove: false,
        });
    }
    let path = std::env::temp_dir().join(format!("index-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(WorkDir { path, remove: true })
}
