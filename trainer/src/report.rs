//! The Markdown results tables, `metrics.json`, the plots and the saved baseline heads.

use std::collections::BTreeMap;
use std::fmt::Write;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::benchmark::BenchmarkConfig;
use crate::error::{Result, TrainerError};
use crate::evaluate::MethodResult;
use crate::features::FeatureSpec;
use crate::finetune::FineTuneSpec;
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
    /// Training catalog images.
    pub train_images: usize,
    /// Single-step training queries.
    pub train_queries: usize,
    /// Two-step training queries.
    #[serde(default)]
    pub two_step_train_queries: usize,
    /// Validation queries.
    pub validation_queries: usize,
    /// Images of the validation catalog; 0 when the validation queries search the training
    /// images.
    #[serde(default)]
    pub validation_images: usize,
    /// Single-step test queries.
    pub test_queries: usize,
    /// Two-step test queries.
    #[serde(default)]
    pub two_step_test_queries: usize,
    /// Catalog images over all test catalogs.
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
    /// Fine-tuning of the fusion model's backbone tails; `None` when the backbones stayed
    /// frozen. The baselines always use the frozen backbones of `features`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune: Option<FineTuneSpec>,
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
    /// Single-step results of each test set, keyed by set and method, when the dataset has
    /// several sets (FashionIQ's categories); `methods` then contains their means.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_set_methods: BTreeMap<String, BTreeMap<String, MethodResult>>,
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

/// Cut-offs of the results, or [`RECALL_CUTOFFS`] when there are none.
fn cutoffs_of(results: &[MethodResult]) -> Vec<usize> {
    results
        .first()
        .map(|result| result.recalls.cutoffs())
        .filter(|cutoffs| !cutoffs.is_empty())
        .unwrap_or_else(|| RECALL_CUTOFFS.to_vec())
}

/// Query kinds of the results in report order: the kinds of the offline benchmarks first,
/// then any others alphabetically.
fn kinds_of(results: &[MethodResult]) -> Vec<String> {
    const ORDER: [&str; 4] = ["colour", "class", "shape", "both"];
    let mut kinds: Vec<String> = results
        .iter()
        .flat_map(|result| result.per_kind.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    kinds.sort_by_key(|kind| {
        let position = ORDER.iter().position(|known| known == kind);
        (position.unwrap_or(ORDER.len()), kind.clone())
    });
    kinds
}

/// Renders the Recall@K table and the per-kind recall table in Markdown. The per-kind
/// table reports R@10, or the largest cut-off when 10 is not one of them.
pub fn markdown_tables(results: &[MethodResult]) -> String {
    let cutoffs = cutoffs_of(results);
    let mut table = String::new();
    let header: Vec<String> = cutoffs.iter().map(|k| format!("R@{k}")).collect();
    let _ = writeln!(table, "| Method | {} |", header.join(" | "));
    let _ = writeln!(table, "|---|{}", "---:|".repeat(cutoffs.len()));
    for result in results {
        let cells: Vec<String> = cutoffs
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

    let kind_k = if cutoffs.contains(&10) {
        10
    } else {
        cutoffs.last().copied().unwrap_or(10)
    };
    let kinds = kinds_of(results);
    let _ = writeln!(table);
    let kind_header: Vec<String> = kinds
        .iter()
        .map(|kind| format!("R@{kind_k} {kind}"))
        .collect();
    let _ = writeln!(
        table,
        "| Method | {}median rank |",
        kind_header
            .iter()
            .map(|cell| format!("{cell} | "))
            .collect::<String>()
    );
    let _ = writeln!(table, "|---|{}---:|", "---:|".repeat(kinds.len()));
    for result in results {
        let cells: String = kinds
            .iter()
            .map(|kind| {
                let value = result
                    .per_kind
                    .get(kind)
                    .and_then(|recalls| recalls.at(kind_k));
                format!("{} | ", percent(value))
            })
            .collect();
        let _ = writeln!(
            table,
            "| {} | {cells}{} |",
            result.method.title(),
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
    let cutoffs = cutoffs_of(two_step);
    let header: Vec<String> = cutoffs.iter().map(|k| format!("R@{k}")).collect();
    let _ = writeln!(report, "| Two-step queries | {} |", header.join(" | "));
    let _ = writeln!(report, "|---|{}", "---:|".repeat(cutoffs.len()));
    for result in two_step {
        let cells: Vec<String> = cutoffs
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

/// Renders [`markdown_report`] and, when the dataset has several single-step test sets,
/// a Recall@K table per set under a heading naming the set.
pub fn markdown_report_with_sets(evaluation: &crate::evaluate::Evaluation) -> String {
    let mut report = markdown_report(&evaluation.single_step, &evaluation.two_step);
    for (name, results) in &evaluation.per_set {
        let _ = writeln!(report);
        let _ = writeln!(report, "Test set {name}:");
        let _ = writeln!(report);
        report.push_str(&markdown_tables(results));
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
