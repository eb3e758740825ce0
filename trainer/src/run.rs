//! The whole training run: benchmark, features, heads, baselines, evaluation, model directory
//! with metrics, tables and plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use densebert4ret_model::bert::BertConfig;
use densebert4ret_model::{
    write_model_dir, DenseBert4Ret, Device, ModelConfig, TextTokenizer, TokenOverflow,
    TEXT_CONFIG_FILE, TEXT_TOKENIZER_FILE,
};
use tch::Tensor;

use crate::benchmark::{Benchmark, BenchmarkConfig};
use crate::error::{Result, TrainerError};
use crate::evaluate::{evaluate_benchmark, MethodResult, TrainedSet};
use crate::features::{load_or_compute, map_images, map_texts, CacheStatus, FeatureSpec, Features};
use crate::finetune::{load_or_compute_trunks, FineTuneSpec, Tails};
use crate::heads::Heads;
use crate::report::{
    markdown_report_with_sets, save_baseline, write_evaluation_files, DataCounts, Metrics,
    RecordedConfig, TrainingSummary, METRICS_FILE,
};
use crate::train::{fine_tune_heads, train_heads_with, Checkpointing, TrainSettings, Variant};

/// Largest difference allowed between the in-memory heads and the reloaded model directory.
const RELOAD_TOLERANCE: f64 = 1e-5;

/// Largest difference allowed between tuned features computed through the cached trunks and
/// the reloaded backbones' whole forward pass, whose batches and padding differ.
const BACKBONE_RELOAD_TOLERANCE: f64 = 1e-4;

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Benchmark sizes and seed.
    pub benchmark: BenchmarkConfig,
    /// Backbones and input settings.
    pub features: FeatureSpec,
    /// Optimisation settings.
    pub training: TrainSettings,
    /// Directory of the feature cache files.
    pub cache_dir: PathBuf,
    /// Model directory to write.
    pub output_dir: PathBuf,
    /// Whether an existing non-empty output directory may be replaced.
    pub overwrite: bool,
    /// libtorch intra-op threads of the backbone feature pass.
    pub threads: usize,
    /// libtorch intra-op threads of head training and evaluation.
    pub train_threads: usize,
    /// Whether the quick preset filled the unset options.
    pub quick: bool,
    /// Whether to train the TIRG baseline alongside.
    pub train_tirg: bool,
    /// Directory of the per-epoch checkpoints, one subdirectory per variant.
    pub checkpoint_dir: PathBuf,
    /// Continue each variant from its checkpoint when there is one.
    pub resume: bool,
    /// Fine-tune the fusion model's backbone tails; `None` keeps the backbones frozen.
    pub fine_tune: Option<FineTuneSpec>,
}

/// Results of a finished run.
#[derive(Debug)]
pub struct RunReport {
    /// Contents written to `metrics.json`.
    pub metrics: Metrics,
    /// Markdown tables of the test results, two-step queries included.
    pub table: String,
    /// Model directory written.
    pub output_dir: PathBuf,
}

/// Records the wall time of each stage.
struct Stopwatch {
    started: Instant,
    timings: BTreeMap<String, f64>,
}

impl Stopwatch {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            timings: BTreeMap::new(),
        }
    }

    fn time<T>(&mut self, stage: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        tracing::info!(stage, "stage started");
        let value = work()?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(stage, seconds = format!("{seconds:.1}"), "stage finished");
        self.timings.insert(stage.to_owned(), seconds);
        Ok(value)
    }
}

/// Runs every stage and writes the model directory with its `metrics.json`.
pub fn run(config: &RunConfig) -> Result<RunReport> {
    check_output_dir(&config.output_dir, config.overwrite)?;
    tch::set_num_threads(config.threads as i32);
    let mut stopwatch = Stopwatch::new();

    let benchmark = stopwatch.time("benchmark", || Benchmark::build(&config.benchmark))?;
    tracing::info!(
        dataset = %benchmark.spec,
        train_images = benchmark.train_catalog.len(),
        train_queries = benchmark.train_queries.len(),
        validation_queries = benchmark.validation_queries.len(),
        validation_images = benchmark.validation_catalog.as_ref().map_or(0, Vec::len),
        test_queries = benchmark.test_query_count(),
        texts = benchmark.texts.len(),
        "built benchmark"
    );

    let (features, cache_status, _) = stopwatch.time("features", || {
        load_or_compute(&benchmark, &config.features, &config.cache_dir)
    })?;
    tch::set_num_threads(config.train_threads as i32);
    let checkpointing = |variant: Variant| Checkpointing {
        dir: config.checkpoint_dir.join(variant.as_str()),
        resume: config.resume,
        stop_after_epochs: None,
    };
    let mut trained = Vec::new();
    let mut variants = vec![Variant::Fusion, Variant::TextOnly];
    if config.train_tirg {
        variants.push(Variant::Tirg);
    }
    let trunks = match &config.fine_tune {
        Some(fine_tune) => {
            // Check the settings before the trunk pass, which takes minutes.
            let text_config =
                BertConfig::from_file(&config.features.text_dir.join(TEXT_CONFIG_FILE))?;
            fine_tune.validate(text_config.num_hidden_layers.max(0) as usize)?;
            tch::set_num_threads(config.threads as i32);
            let (trunks, _) = stopwatch.time("trunks", || {
                load_or_compute_trunks(&benchmark, &config.features, fine_tune, &config.cache_dir)
            })?;
            tch::set_num_threads(config.train_threads as i32);
            Some((trunks, fine_tune))
        }
        None => None,
    };
    let mut fusion_tails = None;
    for variant in variants {
        let stage = format!("train_{}", variant.as_str());
        let heads = match (&trunks, variant) {
            // Only the DenseBert4Ret model fine-tunes; the baselines stay on frozen features.
            (Some((trunks, fine_tune)), Variant::Fusion) => {
                let tails = Tails::load(&config.features, fine_tune)?;
                let heads = stopwatch.time(&stage, || {
                    fine_tune_heads(
                        &benchmark,
                        trunks,
                        &tails,
                        fine_tune,
                        &config.training,
                        variant,
                        Some(&checkpointing(variant)),
                    )
                })?;
                fusion_tails = Some(tails);
                heads
            }
            _ => stopwatch.time(&stage, || {
                train_heads_with(
                    &benchmark,
                    &features,
                    &config.training,
                    variant,
                    Some(&checkpointing(variant)),
                )
            })?,
        };
        trained.push((variant, heads));
    }
    let tuned_features = match (&trunks, &fusion_tails) {
        (Some((trunks, _)), Some(tails)) => {
            Some(stopwatch.time("tuned_features", || Ok(tails.test_features(trunks)))?)
        }
        _ => None,
    };
    let find = |wanted: Variant| {
        trained
            .iter()
            .find(|(variant, _)| *variant == wanted)
            .map(|(_, heads)| &heads.heads)
    };
    let (Some(fusion), Some(text_only)) = (find(Variant::Fusion), find(Variant::TextOnly)) else {
        return Err(TrainerError::InvalidInput(
            "the fusion and text-only heads were not trained".to_owned(),
        ));
    };
    let set = TrainedSet {
        fusion,
        text_only,
        tirg: find(Variant::Tirg),
        fusion_features: tuned_features.as_ref(),
    };
    let evaluation = stopwatch.time("evaluate", || {
        evaluate_benchmark(&benchmark, &features, &set)
    })?;
    let table = markdown_report_with_sets(&evaluation);

    let by_key = |results: &[MethodResult]| {
        results
            .iter()
            .map(|result| (result.method.key().to_owned(), result.clone()))
            .collect()
    };
    let mut metrics = Metrics {
        seed: config.training.seed,
        methods: by_key(&evaluation.single_step),
        two_step_methods: by_key(&evaluation.two_step),
        per_set_methods: evaluation
            .per_set
            .iter()
            .map(|(name, results)| (name.clone(), by_key(results)))
            .collect(),
        training: trained
            .iter()
            .map(|(variant, heads)| {
                (
                    variant.as_str().to_owned(),
                    TrainingSummary {
                        best_epoch: heads.best_epoch,
                        stopped_early: heads.stopped_early,
                        history: heads.history.clone(),
                    },
                )
            })
            .collect(),
        timings_seconds: BTreeMap::new(),
        feature_cache: match cache_status {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
        }
        .to_owned(),
        counts: DataCounts {
            train_images: benchmark.train_catalog.len(),
            train_queries: benchmark.train_queries.len(),
            two_step_train_queries: benchmark.two_step_train_queries.len(),
            validation_queries: benchmark.validation_queries.len(),
            validation_images: benchmark.validation_catalog.as_ref().map_or(0, Vec::len),
            test_queries: benchmark.test_query_count(),
            two_step_test_queries: benchmark.two_step_test_query_count(),
            catalog_images: benchmark.catalog_image_count(),
            texts: benchmark.texts.len() + benchmark.extra_texts.len(),
        },
        config: RecordedConfig {
            benchmark: config.benchmark.clone(),
            features: config.features.clone(),
            training: config.training.clone(),
            threads: config.threads,
            train_threads: config.train_threads,
            quick: config.quick,
            train_tirg: config.train_tirg,
            fine_tune: config.fine_tune.clone(),
        },
    };

    // The metrics file goes into the model directory, so this stage records
    // its own time before it finishes.
    let write_started = Instant::now();
    tracing::info!(stage = "write_model", "stage started");
    let model_config = model_config(config)?;
    let staging = write_staged_model(config, &model_config, fusion, fusion_tails.as_ref())?;
    match &tuned_features {
        Some(tuned) => {
            verify_reload(&staging, &benchmark, tuned, fusion)?;
            verify_tuned_backbones(&staging, &model_config, &benchmark, config, tuned)?;
        }
        None => verify_reload(&staging, &benchmark, &features, fusion)?,
    }
    for (variant, heads) in &trained {
        if *variant != Variant::Fusion {
            save_baseline(&staging, *variant, &heads.heads)?;
        }
    }
    // A missing plot font must not cost the trained model, so plot errors end as a warning;
    // metrics.json and evaluation.md still carry every figure.
    match write_evaluation_files(&staging, &metrics, &table) {
        Err(TrainerError::Plot(reason)) => {
            tracing::warn!(%reason, "skipped the PNG plots");
        }
        other => other?,
    }
    stopwatch.timings.insert(
        "write_model".to_owned(),
        write_started.elapsed().as_secs_f64(),
    );
    stopwatch.timings.insert(
        "total".to_owned(),
        stopwatch.started.elapsed().as_secs_f64(),
    );
    metrics.timings_seconds = stopwatch.timings.clone();
    write_metrics(&staging, &metrics)?;
    replace_dir(&staging, &config.output_dir)?;
    tracing::info!(
        stage = "write_model",
        seconds = format!("{:.1}", write_started.elapsed().as_secs_f64()),
        "stage finished"
    );

    Ok(RunReport {
        metrics,
        table,
        output_dir: config.output_dir.clone(),
    })
}

fn model_config(config: &RunConfig) -> Result<ModelConfig> {
    let mut model_config = ModelConfig::new(config.features.architecture);
    model_config.image_backbone.image_size = config.features.image_size;
    model_config.text_encoder.pooling = config.features.pooling;
    model_config.text_encoder.max_tokens = config.features.max_tokens;
    model_config.text_encoder.overflow = TokenOverflow::Truncate;
    model_config.head.hidden_dim = config.training.head.hidden_dim;
    model_config.head.joint_dim = config.training.head.joint_dim;
    model_config.head.dropout = config.training.head.dropout;
    model_config.head.input_norm = config.training.head.input_norm;
    model_config
        .validate()
        .map_err(|reason| TrainerError::InvalidInput(format!("model configuration: {reason}")))?;

    // The tokenizer check fails fast on a max_tokens the tokenizer cannot honour.
    TextTokenizer::from_file(
        config.features.text_dir.join(TEXT_TOKENIZER_FILE),
        config.features.max_tokens,
        TokenOverflow::Truncate,
    )?;
    Ok(model_config)
}

/// Fails before any work when the output directory exists, is not empty and may not be replaced.
fn check_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let not_empty = std::fs::read_dir(dir)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if not_empty && !overwrite {
        return Err(TrainerError::InvalidInput(format!(
            "the output directory {} already contains files; pass --force to replace it or --out to choose another",
            dir.display()
        )));
    }
    Ok(())
}

fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| {
            TrainerError::InvalidInput(format!(
                "the output path {} must end in a UTF-8 directory name",
                dir.display()
            ))
        })?;
    let parent = dir
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.{tag}-{}", std::process::id())))
}

/// Writes the model into a hidden sibling of the output directory and returns its path.
fn write_staged_model(
    config: &RunConfig,
    model_config: &ModelConfig,
    heads: &Heads,
    tails: Option<&Tails>,
) -> Result<PathBuf> {
    let staging = sibling(&config.output_dir, "new")?;
    if let Some(parent) = staging.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|error| TrainerError::io("failed to create", parent, error))?;
    }
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .map_err(|error| TrainerError::io("failed to remove", &staging, error))?;
    }
    let Some(tails) = tails else {
        write_model_dir(
            &staging,
            model_config,
            &config.features.image_weights,
            &config.features.text_dir,
            &heads.store,
        )?;
        return Ok(staging);
    };

    // The model directory takes copies of the backbone files, so the tuned weights go to
    // files of their own first.
    let tuned = sibling(&config.output_dir, "tuned")?;
    let image_weights = tuned.join("image_backbone.safetensors");
    let text_dir = tuned.join("text_encoder");
    let written = tails.save(&image_weights, &text_dir).and_then(|()| {
        write_model_dir(
            &staging,
            model_config,
            &image_weights,
            &text_dir,
            &heads.store,
        )
        .map_err(TrainerError::from)
    });
    if let Err(error) = std::fs::remove_dir_all(&tuned) {
        tracing::warn!(path = %tuned.display(), %error, "failed to remove the tuned weights");
    }
    written?;
    Ok(staging)
}

/// Rows of each catalog and text list compared between the reloaded backbones and the
/// tuned features.
const VERIFY_ROWS: usize = 8;

/// Loads the backbones written to `dir` and checks that they give the tuned features on
/// the first test images and texts, decoded and tokenized from scratch.
fn verify_tuned_backbones(
    dir: &Path,
    model_config: &ModelConfig,
    benchmark: &Benchmark,
    config: &RunConfig,
    tuned: &Features,
) -> Result<()> {
    let spec = FeatureSpec {
        image_weights: dir.join(&model_config.image_backbone.weights),
        text_dir: dir.join(
            Path::new(&model_config.text_encoder.config)
                .parent()
                .unwrap_or(Path::new("")),
        ),
        ..config.features.clone()
    };

    let backbones = spec.load_backbones()?;
    let catalog = benchmark.test_catalogs.first().ok_or_else(|| {
        TrainerError::InvalidInput(format!("{} has no test catalog", benchmark.spec))
    })?;

    let images = &catalog[..catalog.len().min(VERIFY_ROWS)];
    let image_features = map_images(&benchmark.images, images, &spec, "verify images", |batch| {
        Ok(backbones.f_image_features(batch)?)
    })?;
    let texts = &benchmark.texts[..benchmark.texts.len().min(VERIFY_ROWS)];
    let text_features = Tensor::cat(
        &map_texts(texts, &spec, |ids, mask| {
            Ok(backbones.f_text_features(ids, mask)?)
        })?
        .into_iter()
        .map(|(rows, _)| rows)
        .collect::<Vec<_>>(),
        0,
    );

    let image_difference = (image_features
        - tuned.test_images[0].narrow(0, 0, images.len() as i64))
    .abs()
    .max()
    .double_value(&[]);
    let text_difference = (text_features - tuned.texts.narrow(0, 0, texts.len() as i64))
        .abs()
        .max()
        .double_value(&[]);
    if image_difference > BACKBONE_RELOAD_TOLERANCE || text_difference > BACKBONE_RELOAD_TOLERANCE {
        return Err(TrainerError::InvalidInput(format!(
            "the backbones written to {} differ from the tuned ones (max image feature difference \
             {image_difference:e}, text feature difference {text_difference:e})",
            dir.display()
        )));
    }
    tracing::info!(dir = %dir.display(), image_difference, text_difference, "reloaded backbones match the tuned ones");
    Ok(())
}

/// Loads the written directory and checks that it embeds like the in-memory heads.
fn verify_reload(
    dir: &Path,
    benchmark: &Benchmark,
    features: &Features,
    heads: &Heads,
) -> Result<()> {
    let model = DenseBert4Ret::load(dir, Device::Cpu)?;
    let Some(set) = benchmark.single_step_sets().next() else {
        return Err(TrainerError::InvalidInput(format!(
            "{} has no test queries to check the written model with",
            benchmark.spec
        )));
    };
    let sample = set.queries.len().min(64);
    let references: Vec<i64> = set.queries[..sample]
        .iter()
        .map(|query| query.reference as i64)
        .collect();
    let texts = set.queries[..sample]
        .iter()
        .map(|query| benchmark.text_row(&query.text).map(|row| row as i64))
        .collect::<Result<Vec<_>>>()?;
    let catalog_images = features.test_images.get(set.catalog).ok_or_else(|| {
        TrainerError::InvalidInput(format!("no features for test catalog {}", set.catalog))
    })?;
    let image_features = catalog_images.index_select(0, &Tensor::from_slice(&references));
    let text_features = features.texts.index_select(0, &Tensor::from_slice(&texts));

    let query_difference = (model.f_compose(&image_features, &text_features)?
        - heads.compose(&image_features, &text_features))
    .abs()
    .max()
    .double_value(&[]);
    let catalog_difference = (model.f_project_images(&image_features)?
        - heads.project(&image_features))
    .abs()
    .max()
    .double_value(&[]);
    if query_difference > RELOAD_TOLERANCE || catalog_difference > RELOAD_TOLERANCE {
        return Err(TrainerError::InvalidInput(format!(
            "the written model at {} embeds differently from the trained heads (max query difference {query_difference:e}, \
             catalog difference {catalog_difference:e})",
            dir.display()
        )));
    }
    tracing::info!(dir = %dir.display(), query_difference, catalog_difference, "reloaded model matches the trained heads");
    Ok(())
}

fn write_metrics(dir: &Path, metrics: &Metrics) -> Result<()> {
    let path = dir.join(METRICS_FILE);
    let mut json = serde_json::to_string_pretty(metrics)
        .map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    json.push('\n');
    std::fs::write(&path, json).map_err(|error| TrainerError::io("failed to write", &path, error))
}

/// Moves the staged directory into place, removing what the output path held before.
fn replace_dir(staging: &Path, output: &Path) -> Result<()> {
    let previous = sibling(output, "old")?;
    let had_previous = output.exists();
    if had_previous {
        std::fs::rename(output, &previous)
            .map_err(|error| TrainerError::io("failed to move aside", output, error))?;
    }
    std::fs::rename(staging, output)
        .map_err(|error| TrainerError::io("failed to move the model into", output, error))?;
    if had_previous {
        if let Err(error) = std::fs::remove_dir_all(&previous) {
            tracing::warn!(path = %previous.display(), %error, "failed to remove the previous model directory");
        }
    }
    tracing::info!(dir = %output.display(), "wrote model directory");
    Ok(())
}
