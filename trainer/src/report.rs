//! The Markdown results table and `metrics.json`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::benchmark::BenchmarkConfig;
use crate::evaluate::MethodResult;
use crate::features::FeatureSpec;
use crate::metrics::RECALL_CUTOFFS;
use crate::train::{EpochRecord, TrainSettings};

/// File name of the metrics inside the model directory.
pub const METRICS_FILE: &str = "metrics.json";

/// Training history of one set of heads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Epoch whose weights were kept.
    pub best_epoch: usize,
    /// One record per epoch.
    pub history: Vec<EpochRecord>,
}

/// Sizes of the data a run used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCounts {
    /// Train-split images used for training.
    pub train_images: usize,
    /// Training queries.
    pub train_queries: usize,
    /// Held-out validation queries.
    pub validation_queries: usize,
    /// Test queries.
    pub test_queries: usize,
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
    /// libtorch intra-op threads.
    pub threads: usize,
    /// Whether the quick preset filled the unset options.
    pub quick: bool,
}

/// Contents of `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Seed of the subset, training queries, initialisation and batch order.
    pub seed: u64,
    /// Test-set results keyed by method (`fusion`, `image_only`, `text_only`, `late_fusion`).
    pub methods: BTreeMap<String, MethodResult>,
    /// Training histories keyed by variant (`fusion`, `text_only`).
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
