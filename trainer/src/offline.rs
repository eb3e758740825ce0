//! Evaluation of a written model directory, apart from training.
//!
//! The model directory's `metrics.json` records the benchmark and feature settings of its
//! training run, so the same benchmark is rebuilt and the cached backbone features are
//! reused. The fusion heads come from `head.safetensors` and the baselines from
//! `baselines/`, and every method is ranked by the harness of [`crate::evaluate`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use densebert4ret_datasets::DatasetSpec;

use densebert4ret_model::{fingerprint_dir, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::benchmark::Benchmark;
use crate::error::{Result, TrainerError};
use crate::evaluate::{evaluate_benchmark, MethodResult, TrainedSet};
use crate::features::{load_or_compute, FeatureSpec};
use crate::heads::Heads;
use crate::report::{
    load_heads, markdown_report_with_sets, write_evaluation_files, Metrics, BASELINES_DIR,
    METRICS_FILE,
};
use crate::train::Variant;

/// File name of the evaluation results in the output directory.
pub const EVALUATION_FILE: &str = "evaluation.json";

/// Settings of an evaluation run.
#[derive(Debug, Clone)]
pub struct EvaluateConfig {
    /// Model directory written by a training run.
    pub model_dir: PathBuf,
    /// Dataset to evaluate on; `None` is the one recorded at training time. A different
    /// dataset than the recorded one is rejected, because the heads were trained on it, but
    /// its directory may differ.
    pub dataset: Option<DatasetSpec>,
    /// Directory of the feature cache files.
    pub cache_dir: PathBuf,
    /// Directory for `evaluation.json`, `evaluation.md` and the plots.
    pub output_dir: PathBuf,
    /// Fashion-MNIST directory that replaces the one recorded at training time.
    pub data_dir: Option<PathBuf>,
    /// libtorch intra-op threads.
    pub threads: usize,
}

/// Contents of `evaluation.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Model directory evaluated.
    pub model_dir: PathBuf,
    /// Content fingerprint of the model directory.
    pub model_fingerprint: String,
    /// Dataset evaluated.
    pub dataset: DatasetSpec,
    /// Single-step test results keyed by method; the means over the test sets where the
    /// dataset has several.
    pub methods: BTreeMap<String, MethodResult>,
    /// Single-step results of each test set, keyed by set and method, when there are several.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_set_methods: BTreeMap<String, BTreeMap<String, MethodResult>>,
    /// Two-step test results keyed by method.
    pub two_step_methods: BTreeMap<String, MethodResult>,
}

/// Evaluates the model directory and writes `evaluation.json`, `evaluation.md` and the plots.
pub fn evaluate_model_dir(config: &EvaluateConfig) -> Result<(Evaluation, String)> {
    tch::set_num_threads(config.threads as i32);
    let metrics_path = config.model_dir.join(METRICS_FILE);
    let bytes = std::fs::read(&metrics_path)
        .map_err(|error| TrainerError::io("failed to read", &metrics_path, error))?;
    let recorded: Metrics = serde_json::from_slice(&bytes).map_err(|error| {
        TrainerError::InvalidInput(format!(
            "{} is not a metrics file of this trainer: {error}",
            metrics_path.display()
        ))
    })?;
    let model_config = ModelConfig::from_dir(&config.model_dir)?;

    let mut benchmark_config = recorded.config.benchmark.clone();
    if let Some(dataset) = &config.dataset {
        if dataset.name() != benchmark_config.dataset.name() {
            return Err(TrainerError::InvalidInput(format!(
                "--dataset is {dataset}, but {} was trained on {}; pass --dataset {} or another model",
                config.model_dir.display(),
                benchmark_config.dataset,
                benchmark_config.dataset.name()
            )));
        }
        benchmark_config.dataset = dataset.clone();
        if let DatasetSpec::FmnistColours { dir: Some(dir) } = dataset {
            benchmark_config.data_dir = dir.clone();
        }
    }
    if let Some(data_dir) = &config.data_dir {
        benchmark_config.data_dir = data_dir.clone();
    }
    let benchmark = Benchmark::build(&benchmark_config)?;
    // The model directory contains copies of the backbone weights; the feature cache is keyed
    // by their digests, so the copies find the features of the training run.
    let text_config = config.model_dir.join(&model_config.text_encoder.config);
    let text_dir = text_config.parent().map(Path::to_path_buf).ok_or_else(|| {
        TrainerError::InvalidInput(format!(
            "the text encoder config {} has no parent directory",
            text_config.display()
        ))
    })?;
    let spec = FeatureSpec {
        architecture: model_config.image_backbone.architecture,
        image_weights: config.model_dir.join(&model_config.image_backbone.weights),
        text_dir,
        image_size: model_config.image_backbone.image_size,
        max_tokens: model_config.text_encoder.max_tokens,
        pooling: model_config.text_encoder.pooling,
    };
    let (model_features, _, _) = load_or_compute(&benchmark, &spec, &config.cache_dir)?;
    // A fine-tuned model directory contains the tuned backbones; its baselines were trained
    // on the frozen backbones that metrics.json records.
    let (features, tuned) = match &recorded.config.fine_tune {
        Some(_) => {
            let frozen = &recorded.config.features;
            for path in [&frozen.image_weights, &frozen.text_dir] {
                if !path.exists() {
                    return Err(TrainerError::InvalidInput(format!(
                        "{} was fine-tuned, and its baselines need the original backbone {}, \
                         which does not exist; restore it or evaluate on the machine that trained the model",
                        config.model_dir.display(),
                        path.display()
                    )));
                }
            }
            let (frozen, _, _) = load_or_compute(&benchmark, frozen, &config.cache_dir)?;
            (frozen, Some(model_features))
        }
        None => (model_features, None),
    };

    let image_dim = features.image_dim();
    let text_dim = features.text_dim();
    let fusion = Heads::new(image_dim, text_dim, &model_config.head);
    load_heads(&config.model_dir.join(&model_config.head.weights), &fusion)?;
    let baseline = |variant: Variant| -> Result<Option<Heads>> {
        let path = config
            .model_dir
            .join(BASELINES_DIR)
            .join(format!("{}.safetensors", variant.as_str()));
        if !path.is_file() {
            return Ok(None);
        }
        let heads = Heads::with_composition(
            variant.composition(),
            image_dim,
            text_dim,
            &model_config.head,
        );
        load_heads(&path, &heads)?;
        Ok(Some(heads))
    };
    let text_only = baseline(Variant::TextOnly)?.ok_or_else(|| {
        TrainerError::InvalidInput(format!(
            "{} has no {BASELINES_DIR}/text_only.safetensors; retrain it with this version of densebert4ret-train",
            config.model_dir.display()
        ))
    })?;
    let tirg = baseline(Variant::Tirg)?;
    let set = TrainedSet {
        fusion: &fusion,
        text_only: &text_only,
        tirg: tirg.as_ref(),
        fusion_features: tuned.as_ref(),
    };

    let results = evaluate_benchmark(&benchmark, &features, &set)?;
    let tables = markdown_report_with_sets(&results);
    let by_key = |results: &[MethodResult]| -> BTreeMap<String, MethodResult> {
        results
            .iter()
            .map(|result| (result.method.key().to_owned(), result.clone()))
            .collect()
    };
    let evaluation = Evaluation {
        model_dir: config.model_dir.clone(),
        model_fingerprint: fingerprint_dir(&config.model_dir)?,
        dataset: benchmark.spec.clone(),
        methods: by_key(&results.single_step),
        per_set_methods: results
            .per_set
            .iter()
            .map(|(name, results)| (name.clone(), by_key(results)))
            .collect(),
        two_step_methods: by_key(&results.two_step),
    };

    std::fs::create_dir_all(&config.output_dir)
        .map_err(|error| TrainerError::io("failed to create", &config.output_dir, error))?;
    let path = config.output_dir.join(EVALUATION_FILE);
    let mut json = serde_json::to_string_pretty(&evaluation)
        .map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    json.push('\n');
    std::fs::write(&path, json)
        .map_err(|error| TrainerError::io("failed to write", &path, error))?;
    let plotted = Metrics {
        methods: evaluation.methods.clone(),
        two_step_methods: evaluation.two_step_methods.clone(),
        per_set_methods: evaluation.per_set_methods.clone(),
        ..recorded
    };
    write_evaluation_files(&config.output_dir, &plotted, &tables)?;
    tracing::info!(output = %config.output_dir.display(), "wrote evaluation");
    Ok((evaluation, tables))
}
