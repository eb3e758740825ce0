//! Training and evaluation of the DenseBert4Ret heads on composed retrieval benchmarks:
//! Fashion-MNIST colours, easy-VQA shapes, Fashion200k, MIT-States and FashionIQ
//! ([`benchmark`]).
//!
//! DenseBert4Ret (Khan, Latif, Kim, Kim and Jeon, Information Sciences 612,
//! 2022) fuses image backbone features and BERT text features with an MLP
//! into a joint query embedding. A projection head maps catalog images into
//! the same space, and both heads are trained with a triplet or soft-triplet
//! loss ([`loss`]) and Adam or AdamW ([`optim`]). By default the backbones
//! stay frozen, so their features are computed once and cached ([`features`]),
//! and training runs on the cached features with checkpoints, resume and early
//! stopping ([`train`]). Fine-tuning ([`finetune`]) trains the last image block
//! and the top text layers as well, on cached outputs of the layers below. The test harness ([`evaluate`]) compares the fusion
//! model with a TIRG composition ([`heads`]) and image-only, text-only and
//! late-fusion baselines by Recall@K ([`metrics`]), on single-step and
//! two-step queries. [`report`] and [`plots`] write the tables and PNG plots,
//! and [`offline`] evaluates a written model directory.

pub mod benchmark;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod finetune;
pub mod heads;
pub mod loss;
pub mod metrics;
pub mod offline;
pub mod optim;
pub mod plots;
mod progress;
pub mod report;
pub mod run;
pub mod train;

pub use error::{Result, TrainerError};
