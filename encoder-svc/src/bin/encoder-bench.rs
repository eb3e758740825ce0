//! Load benchmark of encoder-svc over gRPC on 127.0.0.1.
//!
//! One run measures the served throughput and latency of composed queries
//! and catalog images at several client concurrencies, with dynamic batching
//! on and off. It also compares mixed with separate batches of the two kinds
//! and one worker with several. Reference points are a tight in-process
//! libtorch loop over the same model (the ceiling) and PyTorch eager through
//! scripts/encoder_eager_bench.py. An overload run with short deadlines
//! ends it. The results are printed as Markdown tables.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use densebert4ret_model::{preprocess_image, DenseBert4Ret, Device};
use densebert4ret_proto::v1::encoder_client::EncoderClient;
use densebert4ret_proto::v1::{embed_query_request, EmbedImagesRequest, EmbedQueryRequest};
use encoder_svc::batcher::{run_forward, Embedded, Reference, Work};
use encoder_svc::Precision;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Benchmarks encoder-svc against a tight libtorch loop and PyTorch eager.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Model directory to serve.
    #[arg(long, env = "ENCODER__MODEL_DIR", default_value = "artifacts/models/fmnist-colours")]
    model_dir: PathBuf,
    /// libtorch intra-op threads (and PyTorch threads) in every run. On a
    /// machine whose cores are busy with other work, 1 avoids OpenMP
    /// threads waiting for each other at every operator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Requests sent per measured point.
    #[arg(long, default_value_t = 256)]
    requests: usize,
    /// Client concurrencies, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    concurrency: Vec<usize>,
    /// Largest batch with batching on.
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    /// Python interpreter for the PyTorch eager comparison; empty skips it.
    #[arg(long, default_value = ".venv/bin/python")]
    python: String,
}

/// Workload of one measured point.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Queries,
    Images,
    /// Queries and images alternate.
    Mixed,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Self::Queries => "queries",
            Self::Images => "images",
            Self::Mixed => "mixed",
        }
    }
}

/// Result of one measured point.
struct Point {
    throughput: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    mean_batch: f64,
    errors: usize,
}

const TEXTS: [&str; 6] = [
    "in red",
    "the same but as a dress",
    "a blue shirt please",
    "make it green and long sleeved",
    "i would prefer a pullover instead, in a darker shade of grey",
    "same item",
];
const SAMPLES: usize = 32;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let images: Arc<Vec<Vec<u8>>> = Arc::new((0..SAMPLES).map(sample_png).collect());
    println!("# encoder benchmark: {} requests per point, {} libtorch threads, model {}", args.requests, args.threads, args.model_dir.display());

    // Ceiling: the same model in a tight in-process loop.
    let (ceiling_batch, ceiling_queries, ceiling_images, inputs_dir) = tight_loop(&args)?;
    let eager = if args.python.is_empty() { None } else { run_eager(&args, &inputs_dir, ceiling_batch) };

    let base = [
        ("TORCH_THREADS", args.threads.to_string()),
        ("WORKERS", "1".to_string()),
        ("BATCHING__QUEUE_CAPACITY", "1024".to_string()),
    ];
    let mut table = Vec::new();
    let mut at_32 = std::collections::HashMap::new();
    for (label, max_batch, max_wait) in [("on", args.max_batch_size, 5), ("off (max batch 1)", 1, 0)] {
        let server = Server::start(&args, &base, &[("BATCHING__MAX_BATCH_SIZE", max_batch.to_string()), ("BATCHING__MAX_WAIT_MS", max_wait.to_string())]).await?;
        for load in [Load::Queries, Load::Images] {
            for &concurrency in &args.concurrency {
                let point = drive(&server, load, concurrency, args.requests, &images, None).await?;
                if concurrency == 32 {
                    at_32.insert((label, load.name()), point.throughput);
                }
                table.push((label.to_string(), load, concurrency, point));
            }
        }
        if max_batch > 1 {
            let point = drive(&server, Load::Mixed, 32, args.requests, &images, None).await?;
            table.push(("on, mixed kinds".into(), Load::Mixed, 32, point));
        }
    }
    {
        let server = Server::start(&args, &base, &[("BATCHING__MAX_BATCH_SIZE", args.max_batch_size.to_string()), ("BATCHING__MIXED_KINDS", "false".into())]).await?;
        let point = drive(&server, Load::Mixed, 32, args.requests, &images, None).await?;
        table.push(("on, separate kinds".into(), Load::Mixed, 32, point));
    }
    {
        // Two workers share the same threads: each gets half of them, at least one.
        let worker_threads = (args.threads / 2).max(1);
        let server = Server::start(
            &args,
            &[("TORCH_THREADS", worker_threads.to_string()), ("WORKERS", "2".into()), ("BATCHING__QUEUE_CAPACITY", "1024".into())],
            &[("BATCHING__MAX_BATCH_SIZE", args.max_batch_size.to_string())],
        )
        .await?;
        let point = drive(&server, Load::Queries, 32, args.requests, &images, None).await?;
        table.push((format!("on, 2 workers x {worker_threads} threads"), Load::Queries, 32, point));
    }

    println!("\n## Served over gRPC\n");
    println!("| batching | load | clients | req/s | p50 ms | p95 ms | p99 ms | mean batch | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, load, concurrency, point) in &table {
        println!(
            "| {label} | {} | {concurrency} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            load.name(),
            point.throughput,
            point.p50_ms,
            point.p95_ms,
            point.p99_ms,
            point.mean_batch,
            point.errors
        );
    }

    println!("\n## Ratios at 32 clients\n");
    for load in ["queries", "images"] {
        let on = at_32.get(&("on", load)).copied().unwrap_or(0.0);
        let off = at_32.get(&("off (max batch 1)", load)).copied().unwrap_or(0.0);
        let ceiling = if load == "queries" { ceiling_queries } else { ceiling_images };
        println!("- {load}: batching on / off = {:.2}x; served / tight loop (batch {ceiling_batch}, {ceiling:.1}/s) = {:.2}x", on / off.max(1e-9), on / ceiling.max(1e-9));
        if let Some(eager) = &eager {
            let eager_rate = if load == "queries" { eager.queries } else { eager.images };
            println!("  served / PyTorch eager ({eager_rate:.1}/s) = {:.2}x; tight loop / PyTorch eager = {:.2}x", on / eager_rate.max(1e-9), ceiling / eager_rate.max(1e-9));
        }
    }
    if let Some(eager) = &eager {
        println!("- PyTorch eager embeddings against the Rust ones: max abs difference {:.2e}", eager.max_abs);
    }

    overload(&args, &images).await?;
    if let Err(error) = std::fs::remove_dir_all(&inputs_dir) {
        eprintln!("encoder-bench: failed to remove {}: {error}", inputs_dir.display());
    }
    Ok(())
}

/// Throughputs reported by the eager PyTorch script.
struct Eager {
    queries: f64,
    images: f64,
    max_abs: f64,
}

/// Runs the model in process at batch sizes 1, 8, 32 and 64, prints the
/// table, writes the inputs and embeddings for the PyTorch comparison, and
/// returns the best batch size with its query and image throughput.
fn tight_loop(args: &Args) -> anyhow::Result<(usize, f64, f64, PathBuf)> {
    tch::set_num_threads(args.threads as i32);
    let model = DenseBert4Ret::load(&args.model_dir, Device::Cpu)?;
    let size = model.image_size() as u32;
    let normalization = model.image_normalization();
    let mut pixels = Vec::with_capacity(SAMPLES);
    let mut tokens = Vec::with_capacity(SAMPLES);
    for index in 0..SAMPLES {
        pixels.push(preprocess_image(&sample_png(index), size, normalization, u64::MAX)?);
        tokens.push(model.tokenizer().encode(TEXTS[index % TEXTS.len()])?);
    }
    let queries: Vec<Work> = (0..SAMPLES)
        .map(|index| Work::Query { reference: Reference::Pixels(pixels[index].clone()), tokens: tokens[index].clone() })
        .collect();
    let images: Vec<Work> = pixels.iter().map(|pixels| Work::Image { pixels: pixels.clone() }).collect();

    // Inputs and embeddings for scripts/encoder_eager_bench.py.
    let dir = std::env::temp_dir().join(format!("encoder-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let query_embeddings = embeddings(&model, &queries)?;
    let image_embeddings = embeddings(&model, &images)?;
    let flat: Vec<u8> = pixels.iter().flatten().flat_map(|value| value.to_le_bytes()).collect();
    std::fs::write(dir.join("pixels.f32"), flat)?;
    let description = serde_json::json!({
        "image_size": size,
        "tokens": tokens,
        "pad_id": model.tokenizer().pad_id(),
        "query_embeddings": query_embeddings,
        "image_embeddings": image_embeddings,
    });
    std::fs::write(dir.join("inputs.json"), serde_json::to_vec(&description)?)?;

    println!("\n## Tight libtorch loop (in process, no gRPC)\n");
    println!("| batch | queries/s | images/s |");
    println!("|---|---|---|");
    let mut best = (1, 0.0, 0.0);
    for batch_size in [1usize, 8, 32, 64] {
        let query_rate = items_per_second(&model, &queries, batch_size, args.requests)?;
        let image_rate = items_per_second(&model, &images, batch_size, args.requests)?;
        println!("| {batch_size} | {query_rate:.1} | {image_rate:.1} |");
        if query_rate > best.1 {
            best = (batch_size, query_rate, image_rate);
        }
    }
    Ok((best.0, best.1, best.2, dir))
}

fn embeddings(model: &DenseBert4Ret, works: &[Work]) -> anyhow::Result<Vec<Vec<f32>>> {
    let refs: Vec<&Work> = works.iter().collect();
    let outputs = run_forward(model, Precision::Fp32, &refs).map_err(|message| anyhow::anyhow!(message))?;
    Ok(outputs
        .into_iter()
        .map(|output| match output {
            Embedded::Query { embedding } | Embedded::Image { embedding, .. } => embedding,
        })
        .collect())
}

fn items_per_second(model: &DenseBert4Ret, works: &[Work], batch_size: usize, items: usize) -> anyhow::Result<f64> {
    let batch: Vec<&Work> = works.iter().cycle().take(batch_size).collect();
    run_forward(model, Precision::Fp32, &batch).map_err(|message| anyhow::anyhow!(message))?;
    let passes = items.div_ceil(batch_size).max(2);
    let started = Instant::now();
    for _ in 0..passes {
        run_forward(model, Precision::Fp32, &batch).map_err(|message| anyhow::anyhow!(message))?;
    }
    Ok((passes * batch_size) as f64 / started.elapsed().as_secs_f64())
}

fn run_eager(args: &Args, inputs: &Path, batch_size: usize) -> Option<Eager> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/encoder_eager_bench.py");
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("--model-dir")
        .arg(&args.model_dir)
        .arg("--inputs")
        .arg(inputs)
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--batch-size")
        .arg(batch_size.to_string())
        .arg("--items")
        .arg(args.requests.to_string())
        .stderr(Stdio::inherit())
        .output();
    let output = match output {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            eprintln!("encoder-bench: {} failed with {}", script.display(), output.status);
            return None;
        }
        Err(error) => {
            eprintln!("encoder-bench: failed to run {}: {error}", args.python);
            return None;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().rev().find(|line| line.starts_with('{'))?;
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    println!("\n## PyTorch eager (scripts/encoder_eager_bench.py, batch {batch_size})\n\n{line}");
    Some(Eager {
        queries: value["queries_per_second"].as_f64()?,
        images: value["images_per_second"].as_f64()?,
        max_abs: value["max_abs_difference"].as_f64()?,
    })
}

/// A running encoder-svc, killed on drop.
struct Server {
    child: Child,
    client: EncoderClient<Channel>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(args: &Args, base: &[(&str, String)], extra: &[(&str, String)]) -> anyhow::Result<Self> {
        let binary = std::env::current_exe()?.with_file_name("encoder-svc");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(&binary);
        command
            .env("ENCODER__LISTEN", format!("127.0.0.1:{port}"))
            .env("ENCODER__MODEL_DIR", &args.model_dir)
            .env("ENCODER__DEVICE", "cpu")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, value) in base.iter().chain(extra) {
            command.env(format!("ENCODER__{name}"), value);
        }
        let child = command.spawn().map_err(|error| anyhow::anyhow!("failed to start {}: {error}", binary.display()))?;
        let address = format!("http://127.0.0.1:{port}");
        for _ in 0..600 {
            if let Ok(channel) = Endpoint::from_shared(address.clone())?.connect().await {
                let health = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest { service: "densebert4ret.v1.Encoder".into() })
                    .await;
                if health.is_ok_and(|response| response.get_ref().status == ServingStatus::Serving as i32) {
                    return Ok(Self { child, client: EncoderClient::new(channel) });
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("encoder-svc on port {port} did not report SERVING within 120 s")
    }
}

/// Sends `requests` requests from `concurrency` clients and measures them.
async fn drive(
    server: &Server,
    load: Load,
    concurrency: usize,
    requests: usize,
    images: &Arc<Vec<Vec<u8>>>,
    timeout: Option<Duration>,
) -> anyhow::Result<Point> {
    let requests = if concurrency == 1 { requests.div_ceil(2) } else { requests };
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut client = server.client.clone();
        let next = Arc::clone(&next);
        let images = Arc::clone(images);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= requests {
                    break;
                }
                let image = images[index % images.len()].clone();
                let is_query = match load {
                    Load::Queries => true,
                    Load::Images => false,
                    Load::Mixed => index % 2 == 0,
                };
                let sent = Instant::now();
                let outcome = if is_query {
                    let mut request = tonic::Request::new(EmbedQueryRequest {
                        reference: Some(embed_query_request::Reference::Image(image)),
                        texts: vec![TEXTS[index % TEXTS.len()].to_string()],
                    });
                    if let Some(timeout) = timeout {
                        request.set_timeout(timeout);
                    }
                    client.embed_query(request).await.map(|response| response.into_inner().timing.map_or(0, |timing| timing.batch_size))
                } else {
                    let mut request = tonic::Request::new(EmbedImagesRequest { images: vec![image] });
                    if let Some(timeout) = timeout {
                        request.set_timeout(timeout);
                    }
                    client.embed_images(request).await.map(|response| {
                        response.into_inner().embeddings.first().and_then(|embedding| embedding.timing).map_or(0, |timing| timing.batch_size)
                    })
                };
                samples.push((sent.elapsed(), outcome.map_err(|status| status.code())));
            }
            samples
        }));
    }
    let mut samples = Vec::with_capacity(requests);
    for task in tasks {
        samples.extend(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();

    let mut latencies: Vec<f64> = samples.iter().filter(|(_, outcome)| outcome.is_ok()).map(|(latency, _)| latency.as_secs_f64() * 1e3).collect();
    latencies.sort_by(f64::total_cmp);
    let batches: Vec<f64> = samples.iter().filter_map(|(_, outcome)| outcome.as_ref().ok()).map(|&size| f64::from(size)).collect();
    let errors = samples.len() - latencies.len();
    Ok(Point {
        throughput: latencies.len() as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p95_ms: percentile(&latencies, 0.95),
        p99_ms: percentile(&latencies, 0.99),
        mean_batch: batches.iter().sum::<f64>() / batches.len().max(1) as f64,
        errors,
    })
}

fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// 128 clients against 16 queue slots, each query with a 1 s deadline: at
/// least the time 16 queued queries take on two CPU cores. A rejected
/// client waits 20 ms before its next request.
async fn overload(args: &Args, images: &Arc<Vec<Vec<u8>>>) -> anyhow::Result<()> {
    const CLIENTS: usize = 128;
    const SLOTS: usize = 16;
    const DEADLINE: Duration = Duration::from_millis(1000);
    const BACKOFF: Duration = Duration::from_millis(20);
    let server = Server::start(
        args,
        &[("TORCH_THREADS", args.threads.to_string())],
        &[
            ("BATCHING__MAX_BATCH_SIZE", args.max_batch_size.to_string()),
            ("BATCHING__QUEUE_CAPACITY", SLOTS.to_string()),
            ("LIMITS__MAX_IMAGES_PER_REQUEST", SLOTS.to_string()),
        ],
    )
    .await?;
    let requests = args.requests * 4;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = server.client.clone();
        let next = Arc::clone(&next);
        let images = Arc::clone(images);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= requests {
                    break;
                }
                let mut request = tonic::Request::new(EmbedQueryRequest {
                    reference: Some(embed_query_request::Reference::Image(images[index % images.len()].clone())),
                    texts: vec![TEXTS[index % TEXTS.len()].to_string()],
                });
                request.set_timeout(DEADLINE);
                let sent = Instant::now();
                let outcome = client.embed_query(request).await.map(|_| ()).map_err(|status| status.code());
                samples.push((sent.elapsed(), outcome));
                if outcome == Err(tonic::Code::ResourceExhausted) {
                    // Back off as the rejection message recommends, instead of retrying in a tight loop.
                    tokio::time::sleep(BACKOFF).await;
                }
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await?);
    }
    let mut rejected: Vec<f64> = samples
        .iter()
        .filter(|(_, outcome)| *outcome == Err(tonic::Code::ResourceExhausted))
        .map(|(latency, _)| latency.as_secs_f64() * 1e3)
        .collect();
    rejected.sort_by(f64::total_cmp);
    let mut accepted: Vec<f64> = samples.iter().filter(|(_, outcome)| outcome.is_ok()).map(|(latency, _)| latency.as_secs_f64() * 1e3).collect();
    accepted.sort_by(f64::total_cmp);
    let expired = samples.iter().filter(|(_, outcome)| *outcome == Err(tonic::Code::DeadlineExceeded)).count();
    let mut other = std::collections::BTreeMap::new();
    for (_, outcome) in &samples {
        if let Err(code) = outcome {
            if !matches!(code, tonic::Code::ResourceExhausted | tonic::Code::DeadlineExceeded) {
                *other.entry(format!("{code:?}")).or_insert(0usize) += 1;
            }
        }
    }
    let late = accepted.iter().filter(|&&latency| latency > DEADLINE.as_secs_f64() * 1e3).count();

    println!(
        "\n## Overload: {CLIENTS} clients, {SLOTS} queue slots, {} ms deadlines, {} ms backoff after a rejection, {requests} queries\n",
        DEADLINE.as_millis(),
        BACKOFF.as_millis()
    );
    println!("| outcome | count | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!("| RESOURCE_EXHAUSTED | {} | {:.2} | {:.2} | {:.2} |", rejected.len(), percentile(&rejected, 0.5), percentile(&rejected, 0.99), rejected.last().copied().unwrap_or(f64::NAN));
    println!("| OK | {} | {:.1} | {:.1} | {:.1} |", accepted.len(), percentile(&accepted, 0.5), percentile(&accepted, 0.99), accepted.last().copied().unwrap_or(f64::NAN));
    println!("| DEADLINE_EXCEEDED | {expired} | | | |");
    for (code, count) in &other {
        println!("| {code} | {count} | | | |");
    }
    println!("\naccepted responses later than the deadline: {late} of {}", accepted.len());
    Ok(())
}

/// Encodes a 28x28 PNG whose colours depend on `index`.
fn sample_png(index: usize) -> Vec<u8> {
    let seed = index as u32;
    let image = image::RgbImage::from_fn(28, 28, |x, y| image::Rgb([(x * 9 + seed * 7) as u8, (y * 9 + seed * 17) as u8, (seed * 41) as u8]));
    let mut bytes = Vec::new();
    // NOTE: an encoding error would leave `bytes` empty, and the server then
    // rejects the request as INVALID_ARGUMENT, which shows in the error column.
    let _ = image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png);
    bytes
}
