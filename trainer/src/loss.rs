//! Triplet loss with in-batch negatives.
//!
//! Row `i` of a batch is a query embedding (the anchor) and the catalog
//! embedding of one image that satisfies it (the positive). The positives of
//! the other rows serve as negatives, except those whose query has the same
//! (class, colour) target. Such an image is relevant to anchor `i` too, so
//! pushing it away would teach the model to rank relevant items low.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Choice of negatives per anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mining {
    /// Average the hinge over every valid (anchor, negative) pair.
    All,
    /// Use the most similar valid negative of each anchor, as VSE++
    /// (Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard
    /// Negatives", BMVC 2018) does.
    Hardest,
    /// Use the most similar valid negative that is still less similar than the
    /// positive, the semi-hard negative of FaceNet (Schroff, Kalenichenko and
    /// Philbin, CVPR 2015). An anchor with no such negative uses its least
    /// similar valid negative.
    SemiHard,
}

impl Mining {
    /// Name accepted on the command line and written to `metrics.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mining::All => "all",
            Mining::Hardest => "hardest",
            Mining::SemiHard => "semi-hard",
        }
    }
}

impl fmt::Display for Mining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mining {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "all" => Ok(Mining::All),
            "hardest" => Ok(Mining::Hardest),
            "semi-hard" => Ok(Mining::SemiHard),
            other => Err(format!(
                "invalid mining {other:?}: expected \"all\", \"hardest\" or \"semi-hard\""
            )),
        }
    }
}

/// Boolean `[B, B]` mask of the valid negatives of each anchor: positive `j`
/// is a negative of anchor `i` when their targets differ, which also excludes
/// `j == i`.
pub fn negative_mask(targets: &Tensor) -> Tensor {
    targets.unsqueeze(1).ne_tensor(&targets.unsqueeze(0))
}

/// Computes the mean triplet hinge `max(0, margin - s(a_i, p_i) + s(a_i, p_j))`
/// over the negatives that `mining` selects.
///
/// `anchors` and `positives` are `[B, D]` L2-normalised embeddings, so `s` is
/// the cosine similarity. `targets` is a `[B]` integer code of each row's
/// (class, colour) target. Anchors without any valid negative contribute
/// nothing. A batch where no anchor has one returns a zero that still carries
/// a gradient, so the optimiser step is a no-op rather than an error.
pub fn triplet_loss(
    anchors: &Tensor,
    positives: &Tensor,
    targets: &Tensor,
    margin: f64,
    mining: Mining,
) -> Tensor {
    let similarities = anchors.mm(&positives.tr());
    let positive = similarities.diag(0).unsqueeze(1);
    let valid = negative_mask(targets);
    let zero = || similarities.sum(Kind::Float) * 0.0;

    match mining {
        Mining::All => {
            let pairs = valid.sum(Kind::Int64).int64_value(&[]);
            if pairs == 0 {
                return zero();
            }
            let hinge = (&similarities - &positive + margin).clamp_min(0.0);
            hinge.masked_select(&valid).sum(Kind::Float) / pairs as f64
        }
        Mining::Hardest => {
            let (negative, has_negative) = masked_max(&similarities, &valid);
            select_anchors(&positive.squeeze_dim(1), &negative, &has_negative, margin)
                .unwrap_or_else(zero)
        }
        Mining::SemiHard => {
            let less_similar = valid.logical_and(&similarities.lt_tensor(&positive));
            let (semi_hard, has_semi_hard) = masked_max(&similarities, &less_similar);
            let (easiest, has_negative) = masked_min(&similarities, &valid);
            let negative = semi_hard.where_self(&has_semi_hard, &easiest);
            select_anchors(&positive.squeeze_dim(1), &negative, &has_negative, margin)
                .unwrap_or_else(zero)
        }
    }
}

/// Mean hinge over the anchors flagged in `keep`, or `None` when none is.
fn select_anchors(
    positive: &Tensor,
    negative: &Tensor,
    keep: &Tensor,
    margin: f64,
) -> Option<Tensor> {
    let kept_count = keep.sum(Kind::Int64).int64_value(&[]);
    if kept_count == 0 {
        return None;
    }
    // Filter before the arithmetic: the masked-out rows hold infinities.
    let hinge =
        (negative.masked_select(keep) - positive.masked_select(keep) + margin).clamp_min(0.0);
    Some(hinge.mean(Kind::Float))
}

/// Row-wise maximum of `values` where `mask` is true, with a `[B]` flag of rows that have any.
fn masked_max(values: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let filled = values.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
    (
        filled.amax([1i64].as_slice(), false),
        mask.any_dim(1, false),
    )
}

/// Row-wise minimum of `values` where `mask` is true, with a `[B]` flag of rows that have any.
fn masked_min(values: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let filled = values.masked_fill(&mask.logical_not(), f64::INFINITY);
    (
        filled.amin([1i64].as_slice(), false),
        mask.any_dim(1, false),
    )
}

/// Training objective over a batch of (query, positive) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// Hinge on cosine similarities with a margin, negatives chosen by [`Mining`].
    Triplet,
    /// Softmax cross-entropy of each query over the in-batch positives, the batch-based
    /// classification loss of TIRG (Vo et al., "Composing Text and Image for Image
    /// Retrieval - An Empirical Odyssey", CVPR 2019).
    SoftTriplet,
}

impl Loss {
    /// Name accepted on the command line and written to `metrics.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Loss::Triplet => "triplet",
            Loss::SoftTriplet => "soft-triplet",
        }
    }
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Loss {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "triplet" => Ok(Loss::Triplet),
            "soft-triplet" => Ok(Loss::SoftTriplet),
            other => Err(format!(
                "invalid loss {other:?}: expected \"triplet\" or \"soft-triplet\""
            )),
        }
    }
}

/// Computes the mean softmax cross-entropy of each anchor over the in-batch positives.
///
/// Row `i` of the `[B, B]` logits is `scale * s(a_i, p_j)`, and the label of anchor `i` is
/// column `i`. Columns `j != i` whose target equals anchor `i`'s are relevant too, so they
/// are masked out of the softmax instead of serving as negatives. `scale` is the inverse
/// temperature: cosine similarities lie in [-1, 1], so a scale of 1 leaves the softmax
/// almost flat.
pub fn soft_triplet_loss(
    anchors: &Tensor,
    positives: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Tensor {
    let logits = anchors.mm(&positives.tr()) * scale;
    let batch = logits.size()[0];
    let eye = Tensor::eye(batch, (Kind::Bool, logits.device()));
    let other_relevant = negative_mask(targets)
        .logical_not()
        .logical_and(&eye.logical_not());
    let logits = logits.masked_fill(&other_relevant, f64::NEG_INFINITY);
    let labels = Tensor::arange(batch, (Kind::Int64, logits.device()));
    logits.cross_entropy_for_logits(&labels)
}
