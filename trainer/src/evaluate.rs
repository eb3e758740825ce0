//! Test-set evaluation of DenseBert4Ret and the baselines in one harness.
//!
//! Every method ranks the 10,000 test images for each test query with its
//! own query and catalog embeddings, and all share [`best_relevant_ranks`].
//! Two-step queries go through the same harness as a separate query set.

use std::collections::BTreeMap;

use densebert4ret_datasets::{attribute_code, colour_of, Query, QueryKind};
use densebert4ret_model::l2_normalize;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::benchmark::Benchmark;
use crate::error::Result;
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
    /// Recall per query kind (`colour`, `class`, `both`).
    pub per_kind: BTreeMap<String, Recalls>,
    /// Median 0-based rank of the best relevant item.
    pub median_rank: usize,
    /// Recall@K for K = 1 to [`CURVE_MAX_K`], element `K - 1`.
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
}

/// Evaluates every method on the single-step test queries, reference excluded.
pub fn evaluate_test(
    benchmark: &Benchmark,
    features: &Features,
    fusion: &Heads,
    text_only: &Heads,
) -> Result<Vec<MethodResult>> {
    let trained = TrainedSet {
        fusion,
        text_only,
        tirg: None,
    };
    evaluate_queries(benchmark, features, &benchmark.test_queries, &trained)
}

/// Evaluates every available method on test-split `queries`, reference excluded.
pub fn evaluate_queries(
    benchmark: &Benchmark,
    features: &Features,
    queries: &[Query],
    trained: &TrainedSet<'_>,
) -> Result<Vec<MethodResult>> {
    let test = &benchmark.data.test;
    let reference_rows: Vec<i64> = queries.iter().map(|query| query.reference as i64).collect();
    let text_rows = queries
        .iter()
        .map(|query| benchmark.text_row(&query.text).map(|row| row as i64))
        .collect::<Result<Vec<_>>>()?;
    let query_targets: Vec<i64> = queries.iter().map(|query| query.target_code()).collect();
    let catalog_codes = (0..test.len())
        .map(|index| {
            Ok(attribute_code(
                test.class(index)?,
                colour_of(test.split(), index),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let excluded: Vec<Option<usize>> = queries.iter().map(|query| Some(query.reference)).collect();

    let reference_features = features
        .test_images
        .index_select(0, &Tensor::from_slice(&reference_rows));
    let text_features = features
        .texts
        .index_select(0, &Tensor::from_slice(&text_rows));
    let zero_images = reference_features.zeros_like();

    let mut results = Vec::with_capacity(Method::ALL.len());
    for method in Method::ALL {
        let (query_embeddings, catalog_embeddings) = match method {
            Method::Fusion => (
                trained.fusion.compose(&reference_features, &text_features),
                trained.fusion.project(&features.test_images),
            ),
            Method::Tirg => match trained.tirg {
                Some(tirg) => (
                    tirg.compose(&reference_features, &text_features),
                    tirg.project(&features.test_images),
                ),
                None => continue,
            },
            Method::ImageOnly => (
                l2_normalize(&reference_features),
                l2_normalize(&features.test_images),
            ),
            Method::TextOnly => (
                trained.text_only.compose(&zero_images, &text_features),
                trained.text_only.project(&features.test_images),
            ),
            Method::LateFusion => {
                let image_part = trained.text_only.project(&reference_features);
                let text_part = trained.text_only.compose(&zero_images, &text_features);
                (
                    l2_normalize(&(image_part + text_part)),
                    trained.text_only.project(&features.test_images),
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
        let result = summarise(method, queries, &ranks);
        tracing::info!(method = method.key(), queries = queries.len(), recalls = ?result.recalls.0, "evaluated method");
        results.push(result);
    }
    Ok(results)
}

fn summarise(method: Method, queries: &[Query], ranks: &[usize]) -> MethodResult {
    let mut per_kind = BTreeMap::new();
    for kind in QueryKind::ALL {
        let kind_ranks: Vec<usize> = queries
            .iter()
            .zip(ranks)
            .filter(|(query, _)| query.kind == kind)
            .map(|(_, &rank)| rank)
            .collect();
        per_kind.insert(kind.as_str().to_owned(), Recalls::from_ranks(&kind_ranks));
    }
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    let median_rank = sorted.get(sorted.len() / 2).copied().unwrap_or(usize::MAX);
    MethodResult {
        method,
        recalls: Recalls::from_ranks(ranks),
        per_kind,
        median_rank,
        recall_curve: (1..=CURVE_MAX_K).map(|k| recall_at(ranks, k)).collect(),
    }
}
