//! Test-set evaluation of DenseBert4Ret and the baselines in one harness.
//!
//! Every method ranks the catalog of each test query set with its own query
//! and catalog embeddings, and all share [`best_relevant_ranks`]. Recall is
//! reported at the dataset's cut-offs. Two-step queries go through the same
//! harness as a separate query set, and where the protocol averages over
//! sets (FashionIQ's three categories) the single-step figures are the means
//! over the sets.

use std::collections::{BTreeMap, BTreeSet};

use densebert4ret_model::l2_normalize;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::benchmark::{Benchmark, RowQuery, TestSet};
use crate::error::{Result, TrainerError};
use crate::features::Features;
use crate::heads::Heads;
use crate::metrics::{best_relevant_ranks, recall_at, RankingInput, Recalls};

/// Retrieval method compared on the test queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Fusion MLP over reference image and text features, projected catalog.
    Fusion,
    /// TIRG gated residual composition over the projected reference and text features.
    Tirg,
    /// Cosine similarity of raw backbone features of the reference and the catalog.
    ImageOnly,
    /// Heads trained with zeroed image features: text embedding against the projected catalog.
    TextOnly,
    /// Sum of the projected reference and the text-only embedding, renormalised, with the text-only heads.
    LateFusion,
}

impl Method {
    /// Methods in report order.
    pub const ALL: [Method; 5] = [
        Method::Fusion,
        Method::Tirg,
        Method::ImageOnly,
        Method::TextOnly,
        Method::LateFusion,
    ];

    /// Key in `metrics.json`.
    pub fn key(self) -> &'static str {
        match self {
            Method::Fusion => "fusion",
            Method::Tirg => "tirg",
            Method::ImageOnly => "image_only",
            Method::TextOnly => "text_only",
            Method::LateFusion => "late_fusion",
        }
    }

    /// Name in the Markdown table.
    pub fn title(self) -> &'static str {
        match self {
            Method::Fusion => "DenseBert4Ret (fusion MLP)",
            Method::Tirg => "TIRG (gated residual)",
            Method::ImageOnly => "Image only (raw backbone cosine)",
            Method::TextOnly => "Text only",
            Method::LateFusion => "Late fusion (image + text)",
        }
    }
}

/// Largest K of the Recall@K curve stored per method.
pub const CURVE_MAX_K: usize = 50;

/// Test results of one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    /// Method evaluated.
    pub method: Method,
    /// Recall over all test queries.
    pub recalls: Recalls,
    /// Recall per query kind (`colour`, `class`, `shape`, `both`, ...).
    pub per_kind: BTreeMap<String, Recalls>,
    /// Median 0-based rank of the best relevant item.
    pub median_rank: usize,
    /// Recall@K for K = 1 to the larger of [`CURVE_MAX_K`] and the protocol's largest
    /// cut-off, element `K - 1`.
    #[serde(default)]
    pub recall_curve: Vec<f64>,
}

/// Trained heads the evaluation compares.
#[derive(Debug, Clone, Copy)]
pub struct TrainedSet<'a> {
    /// DenseBert4Ret fusion heads.
    pub fusion: &'a Heads,
    /// Heads trained on text alone, also used by late fusion.
    pub text_only: &'a Heads,
    /// TIRG heads, when they were trained.
    pub tirg: Option<&'a Heads>,
    /// Features of the fusion model's fine-tuned backbones; `None` when the fusion model
    /// reads the frozen features that every other method reads.
    pub fusion_features: Option<&'a Features>,
}

/// Results of every method on the test sets of a benchmark.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Single-step results: of the one single-step set, or the means over the sets when
    /// the protocol averages over them.
    pub single_step: Vec<MethodResult>,
    /// Results on the two-step set; empty when the benchmark has none.
    pub two_step: Vec<MethodResult>,
    /// Results of each single-step set by set name, when there are several.
    pub per_set: BTreeMap<String, Vec<MethodResult>>,
}

/// Evaluates every available method on every test set of `benchmark`.
pub fn evaluate_benchmark(
    benchmark: &Benchmark,
    features: &Features,
    trained: &TrainedSet<'_>,
) -> Result<Evaluation> {
    let mut per_set = BTreeMap::new();
    let mut single_sets = Vec::new();
    for set in benchmark.single_step_sets() {
        let results = evaluate_queries(benchmark, features, set, trained)?;
        single_sets.push(results.clone());
        per_set.insert(set.name.clone(), results);
    }
    let single_step = match single_sets.len() {
        0 => {
            return Err(TrainerError::InvalidInput(format!(
                "{} has no single-step test queries",
                benchmark.spec
            )))
        }
        1 => single_sets.swap_remove(0),
        // Several sets without averaging do not occur among the datasets read today;
        // the mean is the one figure that summarises them either way.
        _ => mean_over_sets(&single_sets),
    };
    if per_set.len() == 1 {
        per_set.clear();
    }
    let two_step = match benchmark.two_step_set() {
        Some(set) => evaluate_queries(benchmark, features, set, trained)?,
        None => Vec::new(),
    };
    Ok(Evaluation {
        single_step,
        two_step,
        per_set,
    })
}

/// Means of each method's recalls over the sets that evaluated it; the median rank is the
/// median of the per-set medians.
fn mean_over_sets(sets: &[Vec<MethodResult>]) -> Vec<MethodResult> {
    let mut results = Vec::new();
    for method in Method::ALL {
        let of_method: Vec<&MethodResult> = sets
            .iter()
            .filter_map(|results| results.iter().find(|result| result.method == method))
            .collect();
        if of_method.is_empty() {
            continue;
        }
        let count = of_method.len() as f64;
        let mean_recalls = |pick: &dyn Fn(&MethodResult) -> Option<Recalls>| -> Recalls {
            let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
            for recalls in of_method.iter().filter_map(|result| pick(result)) {
                for (key, value) in recalls.0 {
                    let entry = sums.entry(key).or_default();
                    entry.0 += value;
                    entry.1 += 1.0;
                }
            }
            Recalls(
                sums.into_iter()
                    .map(|(key, (sum, n))| (key, sum / n))
                    .collect(),
            )
        };
        let kinds: BTreeSet<&String> = of_method
            .iter()
            .flat_map(|result| result.per_kind.keys())
            .collect();
        let per_kind = kinds
            .into_iter()
            .map(|kind| {
                (
                    kind.clone(),
                    mean_recalls(&|result| result.per_kind.get(kind).cloned()),
                )
            })
            .collect();
        let mut medians: Vec<usize> = of_method.iter().map(|result| result.median_rank).collect();
        medians.sort_unstable();
        let curve_len = of_method
            .iter()
            .map(|result| result.recall_curve.len())
            .min()
            .unwrap_or(0);
        results.push(MethodResult {
            method,
            recalls: mean_recalls(&|result| Some(result.recalls.clone())),
            per_kind,
            median_rank: medians[medians.len() / 2],
            recall_curve: (0..curve_len)
                .map(|k| {
                    of_method
                        .iter()
                        .map(|result| result.recall_curve[k])
                        .sum::<f64>()
                        / count
                })
                .collect(),
        });
    }
    results
}

/// Evaluates every available method on the queries of `set`, reference excluded.
pub fn evaluate_queries(
    benchmark: &Benchmark,
    features: &Features,
    set: &TestSet,
    trained: &TrainedSet<'_>,
) -> Result<Vec<MethodResult>> {
    let queries = &set.queries;
    let catalog = benchmark.test_catalogs.get(set.catalog).ok_or_else(|| {
        TrainerError::InvalidInput(format!(
            "test set {} names catalog {}, but the benchmark has {}",
            set.name,
            set.catalog,
            benchmark.test_catalogs.len()
        ))
    })?;
    let reference_rows: Vec<i64> = queries.iter().map(|query| query.reference as i64).collect();
    let text_rows = queries
        .iter()
        .map(|query| benchmark.text_row(&query.text).map(|row| row as i64))
        .collect::<Result<Vec<_>>>()?;
    let query_targets: Vec<i64> = queries.iter().map(|query| query.target).collect();
    let catalog_codes: Vec<i64> = catalog.iter().map(|item| item.key).collect();
    let excluded: Vec<Option<usize>> = queries.iter().map(|query| Some(query.reference)).collect();
    let (catalog_images, reference_features, text_features) =
        set_inputs(features, set, &reference_rows, &text_rows)?;
    let tuned = trained
        .fusion_features
        .map(|tuned| set_inputs(tuned, set, &reference_rows, &text_rows))
        .transpose()?;
    let zero_images = reference_features.zeros_like();

    let mut results = Vec::with_capacity(Method::ALL.len());
    for method in Method::ALL {
        let (query_embeddings, catalog_embeddings) = match method {
            Method::Fusion => {
                let (catalog, references, texts) = match &tuned {
                    Some((catalog, references, texts)) => (catalog, references, texts),
                    None => (&catalog_images, &reference_features, &text_features),
                };
                (
                    trained.fusion.compose(references, texts),
                    trained.fusion.project(catalog),
                )
            }
            Method::Tirg => match trained.tirg {
                Some(tirg) => (
                    tirg.compose(&reference_features, &text_features),
                    tirg.project(&catalog_images),
                ),
                None => continue,
            },
            Method::ImageOnly => (
                l2_normalize(&reference_features),
                l2_normalize(&catalog_images),
            ),
            Method::TextOnly => (
                trained.text_only.compose(&zero_images, &text_features),
                trained.text_only.project(&catalog_images),
            ),
            Method::LateFusion => {
                let image_part = trained.text_only.project(&reference_features);
                let text_part = trained.text_only.compose(&zero_images, &text_features);
                (
                    l2_normalize(&(image_part + text_part)),
                    trained.text_only.project(&catalog_images),
                )
            }
        };
        let ranks = best_relevant_ranks(&RankingInput {
            queries: &query_embeddings,
            catalog: &catalog_embeddings,
            query_targets: &query_targets,
            catalog_codes: &catalog_codes,
            excluded: &excluded,
        })?;
        let result = summarise(method, queries, &ranks, &benchmark.protocol.recall_at);
        tracing::info!(method = method.key(), set = %set.name, queries = queries.len(), recalls = ?result.recalls.0, "evaluated method");
        results.push(result);
    }
    Ok(results)
}

/// Catalog, reference and text features of `set` in `features`.
fn set_inputs(
    features: &Features,
    set: &TestSet,
    reference_rows: &[i64],
    text_rows: &[i64],
) -> Result<(Tensor, Tensor, Tensor)> {
    let catalog_images = features.test_images.get(set.catalog).ok_or_else(|| {
        TrainerError::InvalidInput(format!(
            "the features hold {} test catalogs, test set {} needs catalog {}",
            features.test_images.len(),
            set.name,
            set.catalog
        ))
    })?;
    let references = catalog_images.index_select(0, &Tensor::from_slice(reference_rows));
    let texts = features
        .texts
        .index_select(0, &Tensor::from_slice(text_rows));
    Ok((catalog_images.shallow_clone(), references, texts))
}

fn summarise(
    method: Method,
    queries: &[RowQuery],
    ranks: &[usize],
    cutoffs: &[usize],
) -> MethodResult {
    let mut by_kind: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (query, &rank) in queries.iter().zip(ranks) {
        by_kind.entry(query.kind.clone()).or_default().push(rank);
    }
    let per_kind = by_kind
        .into_iter()
        .map(|(kind, kind_ranks)| (kind, Recalls::from_ranks_at(&kind_ranks, cutoffs)))
        .collect();
    let curve_max = cutoffs.iter().copied().max().unwrap_or(0).max(CURVE_MAX_K);
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    let median_rank = sorted.get(sorted.len() / 2).copied().unwrap_or(usize::MAX);
    MethodResult {
        method,
        recalls: Recalls::from_ranks_at(ranks, cutoffs),
        per_kind,
        median_rank,
        recall_curve: (1..=curve_max).map(|k| recall_at(ranks, k)).collect(),
    }
}
