//! Recall@K with the reference image excluded from the ranking.
//!
//! This follows the protocol of TIRG (Vo et al., "Composing Text and Image
//! for Image Retrieval - An Empirical Odyssey", CVPR 2019). The query's own
//! reference image is removed from the catalog, and the query is a hit at K
//! when at least one relevant catalog item is among the K highest-scored items.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Result, TrainerError};

/// Cut-offs of Fashion-MNIST colours and easy-VQA shapes; other datasets report the
/// cut-offs of their protocol.
pub const RECALL_CUTOFFS: [usize; 4] = [1, 5, 10, 50];

/// Queries whose score rows are ranked at once, which bounds memory to
/// `QUERY_CHUNK * catalog size` scores.
const QUERY_CHUNK: i64 = 512;

/// Queries and catalog described by integer (class, colour) codes for relevance.
#[derive(Debug)]
pub struct RankingInput<'a> {
    /// `[Q, D]` query embeddings.
    pub queries: &'a Tensor,
    /// `[N, D]` catalog embeddings.
    pub catalog: &'a Tensor,
    /// `[Q]` target code of each query.
    pub query_targets: &'a [i64],
    /// `[N]` attribute code of each catalog item.
    pub catalog_codes: &'a [i64],
    /// Catalog row of each query's reference image, `None` when the reference is not in the catalog.
    pub excluded: &'a [Option<usize>],
}

/// Computes, for each query, the 0-based rank of its best relevant item.
///
/// The rank is the number of non-relevant catalog items, the reference
/// excluded, that score at least as high as the best relevant item. Ties thus
/// count against the query, and the query is a hit at K exactly when its rank
/// is below K. A query with no relevant item gets rank `usize::MAX`.
/// Scores are dot products, so callers pass L2-normalised rows for cosine similarity.
pub fn best_relevant_ranks(input: &RankingInput<'_>) -> Result<Vec<usize>> {
    let query_count = input.queries.size()[0];
    let catalog_size = input.catalog.size()[0];
    check_len("query targets", input.query_targets.len(), query_count)?;
    check_len("reference exclusions", input.excluded.len(), query_count)?;
    check_len("catalog codes", input.catalog_codes.len(), catalog_size)?;
    if let Some(row) = input
        .excluded
        .iter()
        .flatten()
        .find(|&&row| row as i64 >= catalog_size)
    {
        return Err(TrainerError::InvalidInput(format!(
            "reference row {row} is outside the catalog of {catalog_size} items"
        )));
    }

    let device = input.catalog.device();
    let catalog_codes = Tensor::from_slice(input.catalog_codes)
        .to_device(device)
        .unsqueeze(0);
    let catalog = input.catalog.to_kind(Kind::Float);
    let mut ranks = Vec::with_capacity(query_count as usize);

    for start in (0..query_count).step_by(QUERY_CHUNK as usize) {
        let length = QUERY_CHUNK.min(query_count - start);
        let end = (start + length) as usize;
        let queries = input.queries.narrow(0, start, length).to_kind(Kind::Float);
        let scores = queries.mm(&catalog.tr());

        let targets = Tensor::from_slice(&input.query_targets[start as usize..end])
            .to_device(device)
            .unsqueeze(1);
        let relevant = targets.eq_tensor(&catalog_codes);
        let mut considered = Tensor::ones([length, catalog_size], (Kind::Bool, device));
        let (query_rows, catalog_rows): (Vec<i64>, Vec<i64>) = input.excluded[start as usize..end]
            .iter()
            .enumerate()
            .filter_map(|(offset, row)| row.map(|row| (offset as i64, row as i64)))
            .unzip();
        if !query_rows.is_empty() {
            let indices = [
                Some(Tensor::from_slice(&query_rows).to_device(device)),
                Some(Tensor::from_slice(&catalog_rows).to_device(device)),
            ];
            let _ = considered.index_put_(&indices, &Tensor::from(false).to_device(device), false);
        }
        let relevant = relevant.logical_and(&considered);
        let non_relevant = relevant.logical_not().logical_and(&considered);

        let best = scores
            .masked_fill(&relevant.logical_not(), f64::NEG_INFINITY)
            .amax([1i64].as_slice(), true);
        let outranking = scores
            .ge_tensor(&best)
            .logical_and(&non_relevant)
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64);
        let has_relevant = relevant.any_dim(1, false);

        let outranking = Vec::<i64>::try_from(&outranking)?;
        let has_relevant = Vec::<bool>::try_from(&has_relevant)?;
        for (count, found) in outranking.into_iter().zip(has_relevant) {
            ranks.push(if found { count as usize } else { usize::MAX });
        }
    }
    Ok(ranks)
}

fn check_len(field: &str, actual: usize, expected: i64) -> Result<()> {
    if actual as i64 != expected {
        return Err(TrainerError::InvalidInput(format!(
            "{actual} {field} for {expected} rows"
        )));
    }
    Ok(())
}

/// Fraction of queries whose best relevant rank is below `k`.
pub fn recall_at(ranks: &[usize], k: usize) -> f64 {
    if ranks.is_empty() {
        return 0.0;
    }
    ranks.iter().filter(|&&rank| rank < k).count() as f64 / ranks.len() as f64
}

/// Recall at each reported cut-off, keyed `"R@1"`, `"R@5"` and so on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recalls(pub BTreeMap<String, f64>);

impl Recalls {
    /// Recalls of the given ranks at every cut-off of [`RECALL_CUTOFFS`].
    pub fn from_ranks(ranks: &[usize]) -> Self {
        Self::from_ranks_at(ranks, &RECALL_CUTOFFS)
    }

    /// Recalls of the given ranks at each of `cutoffs`.
    pub fn from_ranks_at(ranks: &[usize], cutoffs: &[usize]) -> Self {
        Self(
            cutoffs
                .iter()
                .map(|&k| (format!("R@{k}"), recall_at(ranks, k)))
                .collect(),
        )
    }

    /// Cut-offs present, ascending.
    pub fn cutoffs(&self) -> Vec<usize> {
        let mut cutoffs: Vec<usize> = self
            .0
            .keys()
            .filter_map(|key| key.strip_prefix("R@")?.parse().ok())
            .collect();
        cutoffs.sort_unstable();
        cutoffs
    }

    /// Recall at `k`, or `None` when `k` is not a reported cut-off.
    pub fn at(&self, k: usize) -> Option<f64> {
        self.0.get(&format!("R@{k}")).copied()
    }
}
