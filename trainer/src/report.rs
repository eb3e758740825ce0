//! The Markdown results tables, `metrics.json`, the plots and the saved baseline heads.

use std::collections::BTreeMap;
use std::fmt::Write;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::benchmark::BenchmarkConfig;
use crate::error::{Result, TrainerError};
use crate::evaluate::MethodResult;
use crate::features::FeatureSpec;
use crate::heads::Heads;
use crate::metrics::RECALL_CUTOFFS;
use crate::plots::{plot_recall_at_k, plot_training_curves, Series};
use crate::train::{EpochRecord, TrainSettings, Variant};

/// File name of the metrics inside the model directory.
pub const METRICS_FILE: &str = "metrics.json";

/// Training history of one set of heads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Epoch whose weights were kept.
    pub best_epoch: usize,
    /// Whether early stopping ended training before the last epoch.
    #[serde(default)]
    pub stopped_early: bool,
    /// One record per epoch.
    pub history: Vec<EpochRecord>,
}

/// Sizes of the data a run used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCounts {
    /// Train-split images used for training.
    pub train_images: usize,
    /// Single-step training queries.
    pub train_queries: usize,
    /// Two-step training queries.
    #[serde(default)]
    pub two_step_train_queries: usize,
    /// Held-out validation queries.
    pub validation_queries: usize,
    /// Single-step test queries.
    pub test_queries: usize,
    /// Two-step test queries.
    #[serde(default)]
    pub two_step_test_queries: usize,
    /// Catalog images (the test split).
    pub catalog_images: usize,
    /// Unique query texts.
    pub texts: usize,
}

/// Settings of a run as recorded in `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedConfig {
    /// Benchmark sizes and seed.
    pub benchmark: BenchmarkConfig,
    /// Backbones and input settings.
    pub features: FeatureSpec,
    /// Optimisation settings.
    pub training: TrainSettings,
    /// libtorch intra-op threads of the backbone feature pass.
    pub threads: usize,
    /// libtorch intra-op threads of head training and evaluation.
    #[serde(default)]
    pub train_threads: usize,
    /// Whether the quick preset filled the unset options.
    pub quick: bool,
    /// Whether the TIRG baseline was trained.
    #[serde(default)]
    pub train_tirg: bool,
}

/// Contents of `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Training seed: initialisation, dropout and batch order. The data seed is in `config.benchmark`.
    pub seed: u64,
    /// Single-step test results keyed by method (`fusion`, `tirg`, `image_only`, `text_only`, `late_fusion`).
    pub methods: BTreeMap<String, MethodResult>,
    /// Two-step test results keyed by method; empty when the run had no two-step test queries.
    #[serde(default)]
    pub two_step_methods: BTreeMap<String, MethodResult>,
    /// Training histories keyed by variant (`fusion`, `text_only`, `tirg`).
    pub training: BTreeMap<String, TrainingSummary>,
    /// Wall time of each stage in seconds.
    pub timings_seconds: BTreeMap<String, f64>,
    /// Whether the backbone features came from the cache (`hit`) or were computed (`miss`).
    pub feature_cache: String,
    /// Sizes of the data.
    pub counts: DataCounts,
    /// Full settings of the run.
    pub config: RecordedConfig,
}

/// Formats recall as a percentage with one decimal.
fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{:.1}", 100.0 * value))
}

/// Renders the Recall@K table and the per-kind Recall@10 table in Markdown.
pub fn markdown_tables(results: &[MethodResult]) -> String {
    let mut table = String::new();
    let header: Vec<String> = RECALL_CUTOFFS.iter().map(|k| format!("R@{k}")).collect();
    let _ = writeln!(table, "| Method | {} |", header.join(" | "));
    let _ = writeln!(table, "|---|{}", "---:|".repeat(RECALL_CUTOFFS.len()));
    for result in results {
        let cells: Vec<String> = RECALL_CUTOFFS
            .iter()
            .map(|&k| percent(result.recalls.at(k)))
            .collect();
        let _ = writeln!(
            table,
            "| {} | {} |",
            result.method.title(),
            cells.join(" | ")
        );
    }

    let _ = writeln!(table);
    let _ = writeln!(
        table,
        "| Method | R@10 colour | R@10 class | R@10 both | median rank |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|");
    for result in results {
        let kind =
            |name: &str| percent(result.per_kind.get(name).and_then(|recalls| recalls.at(10)));
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} |",
            result.method.title(),
            kind("colour"),
            kind("class"),
            kind("both"),
            result.median_rank
        );
    }
    table
}

/// Renders the single-step tables and, when there are two-step results, their Recall@K table.
pub fn markdown_report(single_step: &[MethodResult], two_step: &[MethodResult]) -> String {
    let mut report = markdown_tables(single_step);
    if two_step.is_empty() {
        return report;
    }
    let _ = writeln!(report);
    let header: Vec<String> = RECALL_CUTOFFS.iter().map(|k| format!("R@{k}")).collect();
    let _ = writeln!(report, "| Two-step queries | {} |", header.join(" | "));
    let _ = writeln!(report, "|---|{}", "---:|".repeat(RECALL_CUTOFFS.len()));
    for result in two_step {
        let cells: Vec<String> = RECALL_CUTOFFS
            .iter()
            .map(|&k| percent(result.recalls.at(k)))
            .collect();
        let _ = writeln!(
            report,
            "| {} | {} |",
            result.method.title(),
            cells.join(" | ")
        );
    }
    report
}

/// File name of the Markdown tables inside a model or evaluation directory.
pub const TABLES_FILE: &str = "evaluation.md";
/// File name of the training-curve plot.
pub const TRAINING_CURVES_FILE: &str = "training_curves.png";
/// File name of the single-step Recall@K plot.
pub const RECALL_PLOT_FILE: &str = "recall_at_k.png";
/// File name of the two-step Recall@K plot.
pub const TWO_STEP_RECALL_PLOT_FILE: &str = "recall_at_k_two_step.png";
/// Directory of the baseline heads inside a model directory.
pub const BASELINES_DIR: &str = "baselines";

/// Writes the Markdown tables and the PNG plots of `metrics` into `dir`.
pub fn write_evaluation_files(dir: &Path, metrics: &Metrics, tables: &str) -> Result<()> {
    let tables_path = dir.join(TABLES_FILE);
    std::fs::write(&tables_path, tables)
        .map_err(|error| TrainerError::io("failed to write", &tables_path, error))?;

    let histories: Vec<(String, Vec<crate::train::EpochRecord>)> = metrics
        .training
        .iter()
        .filter(|(_, summary)| !summary.history.is_empty())
        .map(|(variant, summary)| (variant.clone(), summary.history.clone()))
        .collect();
    if !histories.is_empty() {
        plot_training_curves(&dir.join(TRAINING_CURVES_FILE), &histories)?;
    }
    plot_recall_at_k(
        &dir.join(RECALL_PLOT_FILE),
        "Recall@K, single-step test queries",
        &recall_series(&metrics.methods),
    )?;
    if !metrics.two_step_methods.is_empty() {
        plot_recall_at_k(
            &dir.join(TWO_STEP_RECALL_PLOT_FILE),
            "Recall@K, two-step test queries",
            &recall_series(&metrics.two_step_methods),
        )?;
    }
    Ok(())
}

fn recall_series(methods: &BTreeMap<String, MethodResult>) -> Vec<Series> {
    let mut results: Vec<&MethodResult> = methods.values().collect();
    results.sort_by_key(|result| result.method);
    results
        .into_iter()
        .filter(|result| !result.recall_curve.is_empty())
        .map(|result| Series {
            label: result.method.title().to_owned(),
            points: result
                .recall_curve
                .iter()
                .enumerate()
                .map(|(index, &recall)| ((index + 1) as f64, recall))
                .collect(),
        })
        .collect()
}

/// Saves baseline heads as `baselines/VARIANT.safetensors` under `dir`.
pub fn save_baseline(dir: &Path, variant: Variant, heads: &Heads) -> Result<()> {
    let baselines = dir.join(BASELINES_DIR);
    std::fs::create_dir_all(&baselines)
        .map_err(|error| TrainerError::io("failed to create", &baselines, error))?;
    let path = baselines.join(format!("{}.safetensors", variant.as_str()));
    let named: Vec<(String, tch::Tensor)> = heads.store.variables().into_iter().collect();
    tch::Tensor::write_safetensors(&named, &path)?;
    Ok(())
}

/// Copies the tensors of the safetensors file `path` into the variables of `heads`.
pub fn load_heads(path: &Path, heads: &Heads) -> Result<()> {
    let tensors = tch::Tensor::read_safetensors(path)?;
    let lookup: BTreeMap<&str, &tch::Tensor> = tensors
        .iter()
        .map(|(name, tensor)| (name.as_str(), tensor))
        .collect();
    for (name, mut variable) in heads.store.variables() {
        let stored = lookup.get(name.as_str()).ok_or_else(|| {
            TrainerError::InvalidInput(format!(
                "{} has no tensor {name}; it was written for another head layout",
                path.display()
            ))
        })?;
        if stored.size() != variable.size() {
            return Err(TrainerError::InvalidInput(format!(
                "tensor {name} in {} is {:?}, expected {:?}",
                path.display(),
                stored.size(),
                variable.size()
            )));
        }
        tch::no_grad(|| variable.f_copy_(stored))?;
    }
    Ok(())
}
