//! Compares the encoder's embeddings on CUDA (fp32 and fp16) with the CPU
//! ones and measures forward-pass throughput per batch size.
//!
//! Exits with status 1 when an fp32 CUDA embedding differs from the CPU one
//! by more than `--tolerance`, and with status 0 after the CPU run alone on
//! a machine without a CUDA device, saying so.
//!
//! NOTE: the CUDA part has not been run yet, because no machine with an
//! NVIDIA GPU was available while it was written.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use densebert4ret_model::{image_to_chw, DenseBert4Ret, Device};
use encoder_svc::batcher::{run_forward, Embedded, Reference, Work};
use encoder_svc::Precision;

/// Checks CUDA embeddings of encoder-svc against the CPU.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Model directory to load.
    #[arg(long, env = "ENCODER__MODEL_DIR", default_value = "artifacts/models/fmnist-colours")]
    model_dir: PathBuf,
    /// CUDA device index.
    #[arg(long, default_value_t = 0)]
    cuda: usize,
    /// Largest allowed max-abs difference between fp32 CUDA and CPU embeddings.
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f32,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    batch_sizes: Vec<usize>,
    /// Forward passes timed per batch size.
    #[arg(long, default_value_t = 20)]
    iterations: usize,
}

const TEXTS: [&str; 4] = ["in red", "the same but as a dress", "a blue shirt please", "make it green and long sleeved"];
const SAMPLES: usize = 16;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("encoder-gpu-check: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let cpu = DenseBert4Ret::load(&args.model_dir, Device::Cpu)?;
    let works = sample_works(&cpu)?;
    let reference = embed(&cpu, Precision::Fp32, &works)?;
    println!("model {} ({}), {} queries and {} images", args.model_dir.display(), cpu.fingerprint(), SAMPLES, SAMPLES);
    report_throughput("cpu", &cpu, Precision::Fp32, &works, &args.batch_sizes, args.iterations)?;

    let devices = tch::Cuda::device_count();
    if devices == 0 {
        println!("no CUDA device present (tch::Cuda::device_count() = 0): ran the CPU reference only; run this on a machine with an NVIDIA GPU to compare");
        return Ok(ExitCode::SUCCESS);
    }
    if args.cuda as i64 >= devices {
        anyhow::bail!("--cuda {} requested but this machine has {devices} CUDA device(s)", args.cuda);
    }

    let cuda = DenseBert4Ret::load(&args.model_dir, Device::Cuda(args.cuda))?;
    let mut failed = false;
    for precision in [Precision::Fp32, Precision::Fp16] {
        let embedded = embed(&cuda, precision, &works)?;
        let (max_abs, min_cosine) = compare(&reference, &embedded);
        let verdict = if precision == Precision::Fp32 && max_abs > args.tolerance {
            failed = true;
            format!("FAIL (tolerance {})", args.tolerance)
        } else {
            "ok".to_string()
        };
        println!("cuda:{} {precision}: max abs difference {max_abs:.2e}, min cosine {min_cosine:.6} against cpu fp32: {verdict}", args.cuda);
        report_throughput(&format!("cuda:{} {precision}", args.cuda), &cuda, precision, &works, &args.batch_sizes, args.iterations)?;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Builds `SAMPLES` composed queries and `SAMPLES` catalog images from
/// synthetic colour patterns.
fn sample_works(model: &DenseBert4Ret) -> anyhow::Result<Vec<Work>> {
    let size = model.image_size() as u32;
    let normalization = model.image_normalization();
    let mut works = Vec::with_capacity(2 * SAMPLES);
    for index in 0..SAMPLES {
        let seed = index as u32;
        let image = image::RgbImage::from_fn(48, 48, |x, y| {
            image::Rgb([(x * 5 + seed * 13) as u8, (y * 5 + seed * 29) as u8, (seed * 53) as u8])
        });
        let pixels = image_to_chw(&image, size, normalization);
        let tokens = model.tokenizer().encode(TEXTS[index % TEXTS.len()])?;
        works.push(Work::Query { reference: Reference::Pixels(pixels.clone()), tokens });
        works.push(Work::Image { pixels });
    }
    Ok(works)
}

fn embed(model: &DenseBert4Ret, precision: Precision, works: &[Work]) -> anyhow::Result<Vec<Vec<f32>>> {
    let refs: Vec<&Work> = works.iter().collect();
    let outputs = run_forward(model, precision, &refs).map_err(|message| anyhow::anyhow!("forward pass failed: {message}"))?;
    Ok(outputs
        .into_iter()
        .map(|output| match output {
            Embedded::Query { embedding } | Embedded::Image { embedding, .. } => embedding,
        })
        .collect())
}

/// Returns the largest absolute difference and the smallest cosine
/// similarity between matching rows.
fn compare(reference: &[Vec<f32>], other: &[Vec<f32>]) -> (f32, f32) {
    let mut max_abs = 0.0f32;
    let mut min_cosine = 1.0f32;
    for (left, right) in reference.iter().zip(other) {
        let mut dot = 0.0f32;
        let (mut left_norm, mut right_norm) = (0.0f32, 0.0f32);
        for (a, b) in left.iter().zip(right) {
            max_abs = max_abs.max((a - b).abs());
            dot += a * b;
            left_norm += a * a;
            right_norm += b * b;
        }
        min_cosine = min_cosine.min(dot / (left_norm.sqrt() * right_norm.sqrt()).max(1e-12));
    }
    (max_abs, min_cosine)
}

fn report_throughput(
    label: &str,
    model: &DenseBert4Ret,
    precision: Precision,
    works: &[Work],
    batch_sizes: &[usize],
    iterations: usize,
) -> anyhow::Result<()> {
    for &batch_size in batch_sizes {
        let batch: Vec<&Work> = works.iter().cycle().take(batch_size.max(1)).collect();
        run_forward(model, precision, &batch).map_err(|message| anyhow::anyhow!("forward pass failed: {message}"))?;
        let started = Instant::now();
        for _ in 0..iterations.max(1) {
            run_forward(model, precision, &batch).map_err(|message| anyhow::anyhow!("forward pass failed: {message}"))?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let items = (batch.len() * iterations.max(1)) as f64;
        println!("{label}: batch {batch_size:>4} (half queries, half images): {:>9.1} items/s", items / seconds);
    }
    Ok(())
}
