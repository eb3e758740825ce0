//! Training of the DenseBert4Ret heads on the Fashion-MNIST colours benchmark.
//!
//! DenseBert4Ret (Khan, Latif, Kim, Kim and Jeon, Information Sciences 612,
//! 2022) fuses image backbone features and BERT text features with an MLP
//! into a joint query embedding. A projection head maps catalog images into
//! the same space, and both heads are trained with a triplet loss. The
//! backbones stay frozen, so their features are computed once and cached
//! ([`features`]), and training runs on the cached features ([`train`]). The
//! test harness ([`evaluate`]) compares the fusion model with image-only,
//! text-only and late-fusion baselines by Recall@K ([`metrics`]).

pub mod benchmark;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod heads;
pub mod loss;
pub mod metrics;
mod progress;
pub mod report;
pub mod run;
pub mod train;

pub use error::{Result, TrainerError};
