//! Training of the heads on cached backbone features: triplet or soft-triplet loss, Adam or
//! AdamW with warm-up and cosine decay, checkpoints, resume and early stopping.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use densebert4ret_model::HeadConfig;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::benchmark::{Benchmark, RowQuery};
use crate::error::{Result, TrainerError};
use crate::features::Features;
use crate::finetune::{FineTuneSpec, Tails, Trunks};
use crate::heads::{CompositionKind, Heads};
use crate::loss::{soft_triplet_loss, triplet_loss, Loss, Mining};
use crate::metrics::{best_relevant_ranks, recall_at, RankingInput};
use crate::optim::{Optimizer, OptimizerKind};
use crate::progress;

/// Cut-off of the validation recall that selects the best epoch.
pub const VALIDATION_CUTOFF: usize = 10;

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Maximum passes over the training queries.
    pub epochs: usize,
    /// Queries per optimiser step, which is also the pool of in-batch negatives.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Fraction of the steps spent on the linear warm-up from 0 to the peak.
    pub warmup_fraction: f64,
    /// Learning rate at the end of the cosine decay, as a fraction of the peak.
    pub final_learning_rate_fraction: f64,
    /// Optimiser family.
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerKind,
    /// Weight decay: decoupled for AdamW, added to the gradient for Adam.
    pub weight_decay: f64,
    /// Training objective.
    #[serde(default = "default_loss")]
    pub loss: Loss,
    /// Triplet margin on cosine similarities.
    pub margin: f64,
    /// Negative selection of the triplet loss.
    pub mining: Mining,
    /// Inverse temperature of the soft-triplet softmax over cosine similarities.
    #[serde(default = "default_soft_triplet_scale")]
    pub soft_triplet_scale: f64,
    /// Epochs without a better validation Recall@10 before training stops; 0 never stops early.
    #[serde(default)]
    pub patience: usize,
    /// Seed of the initialisation, dropout and batch order.
    pub seed: u64,
    /// Head sizes.
    pub head: HeadConfig,
}

fn default_optimizer() -> OptimizerKind {
    OptimizerKind::AdamW
}

fn default_loss() -> Loss {
    Loss::Triplet
}

/// Default inverse temperature of the soft-triplet loss.
pub const DEFAULT_SOFT_TRIPLET_SCALE: f64 = 10.0;

fn default_soft_triplet_scale() -> f64 {
    DEFAULT_SOFT_TRIPLET_SCALE
}

/// Query composition and inputs of a set of trained heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Reference image features and text features through the fusion MLP: DenseBert4Ret.
    Fusion,
    /// Text features only, the image features replaced by zeros.
    TextOnly,
    /// Reference image and text features through TIRG's gated residual composition.
    Tirg,
}

impl Variant {
    /// Name used in logs, checkpoints and `metrics.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Fusion => "fusion",
            Variant::TextOnly => "text_only",
            Variant::Tirg => "tirg",
        }
    }

    /// Query composition the variant trains.
    pub fn composition(self) -> CompositionKind {
        match self {
            Variant::Fusion | Variant::TextOnly => CompositionKind::Fusion,
            Variant::Tirg => CompositionKind::Tirg,
        }
    }
}

/// Statistics of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub loss: f64,
    /// Validation Recall@10 after the epoch.
    pub validation_recall_at_10: f64,
    /// Learning rate of the epoch's last step.
    pub learning_rate: f64,
    /// Wall time of the epoch, validation included.
    pub seconds: f64,
}

/// Trained heads with their history.
#[derive(Debug)]
pub struct TrainedHeads {
    /// Heads holding the weights of the best epoch.
    pub heads: Heads,
    /// One record per epoch run, resumed epochs included.
    pub history: Vec<EpochRecord>,
    /// Epoch whose weights were kept.
    pub best_epoch: usize,
    /// Whether training stopped before `epochs` because the validation recall stopped improving.
    pub stopped_early: bool,
}

/// Where and how training saves and resumes its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointing {
    /// Directory of this variant's checkpoint, written after every epoch.
    pub dir: PathBuf,
    /// Continue from the checkpoint in `dir` when there is one.
    pub resume: bool,
    /// Return after this many epochs of this call, as an interrupted run would; `None` runs
    /// to the end.
    pub stop_after_epochs: Option<usize>,
}

/// Query rows resolved to feature-matrix rows.
struct QueryRows {
    references: Vec<i64>,
    texts: Vec<i64>,
    targets: Vec<i64>,
}

impl QueryRows {
    fn new(benchmark: &Benchmark, queries: &[RowQuery]) -> Result<Self> {
        let mut rows = Self {
            references: Vec::new(),
            texts: Vec::new(),
            targets: Vec::new(),
        };
        for query in queries {
            rows.references.push(query.reference as i64);
            rows.texts.push(benchmark.text_row(&query.text)? as i64);
            rows.targets.push(query.target);
        }
        Ok(rows)
    }
}

/// Learning rate at `step` of `total`: linear warm-up, then cosine decay to the final fraction.
pub fn learning_rate_at(settings: &TrainSettings, step: usize, total: usize) -> f64 {
    let peak = settings.learning_rate;
    let warmup = (settings.warmup_fraction * total as f64).round() as usize;
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = (step - warmup) as f64 / decay_steps as f64;
    let floor = peak * settings.final_learning_rate_fraction;
    floor + (peak - floor) * 0.5 * (1.0 + (PI * progress.min(1.0)).cos())
}

/// Trains fresh heads on the training queries and keeps the epoch with the best validation
/// Recall@10, without checkpoints.
pub fn train_heads(
    benchmark: &Benchmark,
    features: &Features,
    settings: &TrainSettings,
    variant: Variant,
) -> Result<TrainedHeads> {
    train_heads_with(benchmark, features, settings, variant, None)
}

/// Trains heads, optionally saving a checkpoint after every epoch and resuming from one.
///
/// Each epoch reseeds libtorch and the batch order from the seed and the epoch number, and
/// the optimiser moments are part of the checkpoint, so a resumed run reproduces the
/// uninterrupted one exactly. Trainings in one process run one at a time, because libtorch's
/// random generator is process-wide. Training stops early once the validation Recall@10 has not
/// improved for `settings.patience` epochs.
pub fn train_heads_with(
    benchmark: &Benchmark,
    features: &Features,
    settings: &TrainSettings,
    variant: Variant,
    checkpointing: Option<&Checkpointing>,
) -> Result<TrainedHeads> {
    train_on(
        benchmark,
        &Inputs::Frozen(features),
        settings,
        variant,
        checkpointing,
    )
}

/// Trains heads together with the backbone tails of `tails`, which run on the cached trunk
/// outputs. The tails keep the weights of the best epoch, like the heads.
///
/// Checkpoints, resume and early stopping work as in [`train_heads_with`]; the checkpoint
/// also contains the tail weights and their optimiser moments.
pub fn fine_tune_heads(
    benchmark: &Benchmark,
    trunks: &Trunks,
    tails: &Tails,
    fine_tune: &FineTuneSpec,
    settings: &TrainSettings,
    variant: Variant,
    checkpointing: Option<&Checkpointing>,
) -> Result<TrainedHeads> {
    train_on(
        benchmark,
        &Inputs::Tuned {
            trunks,
            tails,
            fine_tune,
        },
        settings,
        variant,
        checkpointing,
    )
}

/// Source of the backbone features of a training.
enum Inputs<'a> {
    /// Cached features of frozen backbones.
    Frozen(&'a Features),
    /// Backbone tails trained on cached trunk outputs.
    Tuned {
        trunks: &'a Trunks,
        tails: &'a Tails,
        fine_tune: &'a FineTuneSpec,
    },
}

impl Inputs<'_> {
    fn image_dim(&self) -> i64 {
        match self {
            Inputs::Frozen(features) => features.image_dim(),
            Inputs::Tuned { tails, .. } => tails.image_dim(),
        }
    }

    fn text_dim(&self) -> i64 {
        match self {
            Inputs::Frozen(features) => features.text_dim(),
            Inputs::Tuned { tails, .. } => tails.text_dim(),
        }
    }

    /// Features of training catalog rows, with gradients through a tuned tail.
    fn train_images(&self, rows: &[i64]) -> Tensor {
        let rows = Tensor::from_slice(rows);
        match self {
            Inputs::Frozen(features) => features.train_images.index_select(0, &rows),
            Inputs::Tuned { trunks, tails, .. } => {
                tails.image_features(&trunks.train_images.index_select(0, &rows))
            }
        }
    }

    /// Features of text rows; `train` turns the tuned text layers' dropout on.
    fn texts(&self, rows: &[i64], train: bool) -> Tensor {
        match self {
            Inputs::Frozen(features) => features.texts.index_select(0, &Tensor::from_slice(rows)),
            Inputs::Tuned { trunks, tails, .. } => tails.text_features(trunks, rows, train),
        }
    }

    /// Features of the whole validation catalog, without gradients.
    fn validation_catalog(&self) -> Tensor {
        match self {
            Inputs::Frozen(features) => features.validation_catalog().shallow_clone(),
            Inputs::Tuned { trunks, tails, .. } => tails.embed_images(
                trunks
                    .validation_images
                    .as_ref()
                    .unwrap_or(&trunks.train_images),
            ),
        }
    }

    /// Features of text rows in eval mode, without gradients.
    fn eval_texts(&self, rows: &[i64]) -> Tensor {
        match self {
            Inputs::Frozen(features) => features.texts.index_select(0, &Tensor::from_slice(rows)),
            Inputs::Tuned { trunks, tails, .. } => tails.embed_texts(trunks, rows),
        }
    }

    /// Fails unless the inputs have one validation catalog row per validation image of
    /// `benchmark`, or none when the validation queries search the training images.
    fn check_validation_rows(&self, benchmark: &Benchmark) -> Result<()> {
        let rows = match self {
            Inputs::Frozen(features) => features.validation_images.as_ref(),
            Inputs::Tuned { trunks, .. } => trunks.validation_images.as_ref(),
        }
        .map(|tensor| tensor.size()[0] as usize);
        let expected = benchmark.validation_catalog.as_ref().map(Vec::len);
        if rows != expected {
            return Err(TrainerError::InvalidInput(format!(
                "the benchmark has {} validation images, but the features have {}; compute the \
                 features with features::load_or_compute for this benchmark",
                expected.unwrap_or(0),
                rows.unwrap_or(0)
            )));
        }
        Ok(())
    }

    /// Backbone variables that train with the heads.
    fn tail_variables(&self) -> &[(String, Tensor)] {
        match self {
            Inputs::Frozen(_) => &[],
            Inputs::Tuned { tails, .. } => tails.variables(),
        }
    }
}

fn train_on(
    benchmark: &Benchmark,
    inputs: &Inputs<'_>,
    settings: &TrainSettings,
    variant: Variant,
    checkpointing: Option<&Checkpointing>,
) -> Result<TrainedHeads> {
    validate(settings, benchmark)?;
    inputs.check_validation_rows(benchmark)?;
    // Initialisation and dropout draw from libtorch's process-wide generator, so two
    // trainings in one process would interleave their draws without this lock.
    let _generator = generator_lock();
    tch::manual_seed(settings.seed as i64);
    let image_dim = inputs.image_dim();
    let text_dim = inputs.text_dim();
    let composition = variant.composition();
    let mut heads = Heads::with_composition(composition, image_dim, text_dim, &settings.head);
    let mut best = Heads::with_composition(composition, image_dim, text_dim, &settings.head);

    let training_queries: Vec<RowQuery> = benchmark
        .train_queries
        .iter()
        .chain(&benchmark.two_step_train_queries)
        .cloned()
        .collect();
    let train = QueryRows::new(benchmark, &training_queries)?;
    let validation = QueryRows::new(benchmark, &benchmark.validation_queries)?;
    let positive_rows = positive_rows_by_target(benchmark);
    let validation_codes: Vec<i64> = benchmark
        .validation_items()
        .iter()
        .map(|item| item.key)
        .collect();

    let mut optimizer = Optimizer::new(&heads.store, settings.optimizer, settings.weight_decay);
    let tail = inputs.tail_variables();
    // The tail weights of the best epoch, copied like the heads' `best`.
    let best_tail: Vec<(String, Tensor)> = tail
        .iter()
        .map(|(name, variable)| (name.clone(), variable.detach().copy()))
        .collect();
    if let Inputs::Tuned { fine_tune, .. } = inputs {
        optimizer.add_variables(tail, fine_tune.learning_rate_scale);
    }
    let steps_per_epoch = train.targets.len().div_ceil(settings.batch_size);
    let total_steps = steps_per_epoch * settings.epochs;
    let mut state = TrainingState::default();
    let fingerprint = run_fingerprint(settings, variant, benchmark, inputs)?;
    if let Some(checkpointing) = checkpointing.filter(|checkpointing| checkpointing.resume) {
        if let Some(loaded) = load_checkpoint(
            &checkpointing.dir,
            &fingerprint,
            (&heads, tail),
            (&best, &best_tail),
            &mut optimizer,
        )? {
            state = loaded;
        }
    }
    let first_epoch = state.epoch + 1;

    for epoch in first_epoch..=settings.epochs {
        if state.epochs_without_improvement >= settings.patience && settings.patience > 0 {
            break;
        }
        if let Some(limit) = checkpointing.and_then(|checkpointing| checkpointing.stop_after_epochs)
        {
            if epoch - first_epoch >= limit {
                heads.store.copy(&best.store)?;
                copy_variables(tail, &best_tail)?;
                return Ok(TrainedHeads {
                    heads,
                    history: state.history,
                    best_epoch: state.best_epoch,
                    stopped_early: false,
                });
            }
        }

        let started = Instant::now();
        let epoch_seed = settings
            .seed
            .wrapping_mul(EPOCH_SEED_STRIDE)
            .wrapping_add(epoch as u64);
        tch::manual_seed(epoch_seed as i64);
        let mut rng = ChaCha8Rng::seed_from_u64(epoch_seed);
        let mut order: Vec<usize> = (0..train.targets.len()).collect();
        order.shuffle(&mut rng);
        let bar = progress::bar(
            steps_per_epoch as u64,
            &format!("{} {epoch}/{}", variant.as_str(), settings.epochs),
        );
        let mut loss_sum = 0.0;
        let mut learning_rate = settings.learning_rate;

        for (batch_number, batch) in order.chunks(settings.batch_size).enumerate() {
            let step = (epoch - 1) * steps_per_epoch + batch_number;
            learning_rate = learning_rate_at(settings, step, total_steps);

            let mut references = Vec::with_capacity(batch.len());
            let mut texts = Vec::with_capacity(batch.len());
            let mut targets = Vec::with_capacity(batch.len());
            let mut positives = Vec::with_capacity(batch.len());
            for &query in batch {
                references.push(train.references[query]);
                texts.push(train.texts[query]);
                targets.push(train.targets[query]);
                let candidates = positive_rows.get(&train.targets[query]).ok_or_else(|| {
                    TrainerError::InvalidInput(format!(
                        "training query {query} has a target with no training image"
                    ))
                })?;
                positives.push(candidates[rng.gen_range(0..candidates.len())]);
            }

            let image_input = match variant {
                Variant::Fusion | Variant::Tirg => inputs.train_images(&references),
                Variant::TextOnly => Tensor::zeros(
                    [references.len() as i64, image_dim],
                    (Kind::Float, Device::Cpu),
                ),
            };
            let text_input = inputs.texts(&texts, true);
            let positive_input = inputs.train_images(&positives);
            let anchors = heads.compose_t(&image_input, &text_input, true);
            let positive_embeddings = heads.projection.forward_t(&positive_input, true);
            let targets = Tensor::from_slice(&targets);
            let loss = match settings.loss {
                Loss::Triplet => triplet_loss(
                    &anchors,
                    &positive_embeddings,
                    &targets,
                    settings.margin,
                    settings.mining,
                ),
                Loss::SoftTriplet => soft_triplet_loss(
                    &anchors,
                    &positive_embeddings,
                    &targets,
                    settings.soft_triplet_scale,
                ),
            };
            optimizer.backward_step(&loss, learning_rate);

            let loss_value = loss.double_value(&[]);
            if !loss_value.is_finite() {
                return Err(TrainerError::InvalidInput(format!(
                    "the {} loss became {loss_value} at epoch {epoch}, step {batch_number}; lower --learning-rate",
                    variant.as_str()
                )));
            }
            loss_sum += loss_value;
            bar.inc(1);
            bar.set_message(format!("loss {:.4}", loss_sum / (batch_number + 1) as f64));
        }
        bar.finish_and_clear();

        let recall = validation_recall(&heads, inputs, &validation, &validation_codes, variant)?;
        let record = EpochRecord {
            epoch,
            loss: loss_sum / steps_per_epoch as f64,
            validation_recall_at_10: recall,
            learning_rate,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            variant = variant.as_str(),
            epoch,
            loss = format!("{:.4}", record.loss),
            validation_recall_at_10 = format!("{recall:.4}"),
            seconds = format!("{:.1}", record.seconds),
            "finished epoch"
        );
        state.history.push(record);
        state.epoch = epoch;
        state.steps = optimizer.steps();
        if recall > state.best_recall.unwrap_or(f64::NEG_INFINITY) {
            state.best_recall = Some(recall);
            state.best_epoch = epoch;
            state.epochs_without_improvement = 0;
            best.store.copy(&heads.store)?;
            copy_variables(&best_tail, tail)?;
        } else {
            state.epochs_without_improvement += 1;
        }
        if let Some(checkpointing) = checkpointing {
            save_checkpoint(
                &checkpointing.dir,
                &fingerprint,
                &state,
                (&heads, tail),
                (&best, &best_tail),
                &optimizer,
            )?;
        }
    }

    let stopped_early = state.epoch < settings.epochs;
    if stopped_early {
        tracing::info!(
            variant = variant.as_str(),
            epoch = state.epoch,
            patience = settings.patience,
            "stopped early: the validation recall did not improve"
        );
    }
    heads.store.copy(&best.store)?;
    copy_variables(tail, &best_tail)?;
    tracing::info!(
        variant = variant.as_str(),
        best_epoch = state.best_epoch,
        validation_recall_at_10 = state.best_recall.unwrap_or_default(),
        "kept best epoch"
    );
    Ok(TrainedHeads {
        heads,
        history: state.history,
        best_epoch: state.best_epoch,
        stopped_early,
    })
}

/// Serialises trainings within a process; see [`train_heads_with`].
static GENERATOR_LOCK: Mutex<()> = Mutex::new(());

/// Takes the lock that trainings hold while they draw from libtorch's process-wide random
/// generator. Code that seeds or draws from that generator (`tch::manual_seed`,
/// `Tensor::randn`, fresh heads) in parallel with a training takes it too, so that the
/// training stays reproducible.
pub fn generator_lock() -> MutexGuard<'static, ()> {
    GENERATOR_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Multiplier that separates the per-epoch seeds of different run seeds.
const EPOCH_SEED_STRIDE: u64 = 1_000_003;

/// Progress of a training run, saved in `state.json` beside the checkpoint tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TrainingState {
    /// Last finished epoch, 0 before the first.
    epoch: usize,
    /// Optimiser updates so far.
    steps: i64,
    best_epoch: usize,
    best_recall: Option<f64>,
    epochs_without_improvement: usize,
    history: Vec<EpochRecord>,
}

/// `state.json` of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CheckpointFile {
    fingerprint: String,
    state: TrainingState,
    /// Bit patterns of the floating-point values of `state`, in [`state_floats`] order.
    /// serde_json's default parser may land one unit in the last place away from a written
    /// `f64`, so a resumed run restores the exact values from these.
    #[serde(default)]
    float_bits: Vec<u64>,
}

/// Mutable references to every floating-point value of `state`, in a fixed order.
fn state_floats(state: &mut TrainingState) -> Vec<&mut f64> {
    let mut floats: Vec<&mut f64> = state.best_recall.iter_mut().collect();
    for record in &mut state.history {
        floats.push(&mut record.loss);
        floats.push(&mut record.validation_recall_at_10);
        floats.push(&mut record.learning_rate);
        floats.push(&mut record.seconds);
    }
    floats
}

const CHECKPOINT_STATE: &str = "state.json";
const CHECKPOINT_TENSORS: &str = "checkpoint.safetensors";

/// Digest of everything that must match for a checkpoint to be resumed.
fn run_fingerprint(
    settings: &TrainSettings,
    variant: Variant,
    benchmark: &Benchmark,
    inputs: &Inputs<'_>,
) -> Result<String> {
    let mut described = serde_json::json!({
        "settings": settings,
        "variant": variant.as_str(),
        "train_queries": benchmark.train_queries.len() + benchmark.two_step_train_queries.len(),
        "train_images": benchmark.train_catalog.len(),
        "validation_queries": benchmark.validation_queries.len(),
        "image_dim": inputs.image_dim(),
        "text_dim": inputs.text_dim(),
    });
    // Runs without a validation catalog or fine-tuning keep the fingerprint they always had,
    // so their checkpoints stay resumable.
    if let Some(catalog) = &benchmark.validation_catalog {
        described["validation_images"] = serde_json::json!(catalog.len());
    }
    if let Inputs::Tuned { fine_tune, .. } = inputs {
        described["fine_tune"] = serde_json::json!(fine_tune);
    }
    let bytes = serde_json::to_vec(&described)
        .map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn save_checkpoint(
    dir: &Path,
    fingerprint: &str,
    state: &TrainingState,
    current: (&Heads, &[(String, Tensor)]),
    best: (&Heads, &[(String, Tensor)]),
    optimizer: &Optimizer,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|error| TrainerError::io("failed to create", dir, error))?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (prefix, (heads, tail)) in [("w", current), ("best", best)] {
        for (name, tensor) in heads.store.variables() {
            named.push((format!("{prefix}.{name}"), tensor));
        }
        for (name, tensor) in tail {
            named.push((format!("{prefix}.{name}"), tensor.shallow_clone()));
        }
    }
    named.extend(optimizer.state_tensors());

    // Tensors first, then the state that points at them, each through a rename, so a
    // crash leaves either the previous checkpoint or the new one.
    let tensors_path = dir.join(CHECKPOINT_TENSORS);
    let partial = dir.join(format!("{CHECKPOINT_TENSORS}.partial"));
    Tensor::write_safetensors(&named, &partial)?;
    std::fs::rename(&partial, &tensors_path)
        .map_err(|error| TrainerError::io("failed to rename", &partial, error))?;
    let state_path = dir.join(CHECKPOINT_STATE);
    let partial_state = dir.join(format!("{CHECKPOINT_STATE}.partial"));
    let mut saved = state.clone();
    let float_bits = state_floats(&mut saved)
        .into_iter()
        .map(|value| value.to_bits())
        .collect();
    let json = serde_json::to_vec_pretty(&CheckpointFile {
        fingerprint: fingerprint.to_owned(),
        state: saved,
        float_bits,
    })
    .map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    std::fs::write(&partial_state, json)
        .map_err(|error| TrainerError::io("failed to write", &partial_state, error))?;
    std::fs::rename(&partial_state, &state_path)
        .map_err(|error| TrainerError::io("failed to rename", &partial_state, error))?;
    tracing::debug!(dir = %dir.display(), epoch = state.epoch, "saved checkpoint");
    Ok(())
}

/// Loads the checkpoint in `dir` into the heads and optimiser, or returns `None` when the
/// directory contains none.
fn load_checkpoint(
    dir: &Path,
    fingerprint: &str,
    current: (&Heads, &[(String, Tensor)]),
    best: (&Heads, &[(String, Tensor)]),
    optimizer: &mut Optimizer,
) -> Result<Option<TrainingState>> {
    let state_path = dir.join(CHECKPOINT_STATE);
    if !state_path.is_file() {
        tracing::info!(dir = %dir.display(), "no checkpoint to resume, starting from scratch");
        return Ok(None);
    }
    let bytes = std::fs::read(&state_path)
        .map_err(|error| TrainerError::io("failed to read", &state_path, error))?;
    let mut file: CheckpointFile = serde_json::from_slice(&bytes).map_err(|error| {
        TrainerError::InvalidInput(format!(
            "checkpoint state {} is not valid: {error}",
            state_path.display()
        ))
    })?;
    let floats = state_floats(&mut file.state);
    if floats.len() == file.float_bits.len() {
        for (value, bits) in floats.into_iter().zip(&file.float_bits) {
            *value = f64::from_bits(*bits);
        }
    } else {
        tracing::warn!(path = %state_path.display(), "checkpoint has no exact float values; resumed figures may differ in the last digit");
    }
    if file.fingerprint != fingerprint {
        return Err(TrainerError::InvalidInput(format!(
            "the checkpoint in {} was written with other settings or data; rerun with the same \
             options, or delete the directory to start over",
            dir.display()
        )));
    }

    let tensors_path = dir.join(CHECKPOINT_TENSORS);
    let tensors = Tensor::read_safetensors(&tensors_path)?;
    let lookup: HashMap<&str, &Tensor> = tensors
        .iter()
        .map(|(name, tensor)| (name.as_str(), tensor))
        .collect();
    for (prefix, (heads, tail)) in [("w", current), ("best", best)] {
        let variables = heads.store.variables().into_iter().chain(
            tail.iter()
                .map(|(name, tensor)| (name.clone(), tensor.shallow_clone())),
        );
        for (name, mut variable) in variables {
            let key = format!("{prefix}.{name}");
            let stored = lookup.get(key.as_str()).ok_or_else(|| {
                TrainerError::InvalidInput(format!(
                    "checkpoint {} has no tensor {key}; delete the directory to start over",
                    tensors_path.display()
                ))
            })?;
            tch::no_grad(|| variable.f_copy_(stored))?;
        }
    }
    optimizer.load_state(&tensors, file.state.steps)?;
    tracing::info!(dir = %dir.display(), epoch = file.state.epoch, "resumed from checkpoint");
    Ok(Some(file.state))
}

fn validate(settings: &TrainSettings, benchmark: &Benchmark) -> Result<()> {
    let invalid = |message: String| Err(TrainerError::InvalidInput(message));
    if settings.epochs == 0 {
        return invalid("--epochs is 0, expected at least 1".to_owned());
    }
    if settings.batch_size < 2 {
        return invalid(format!(
            "--batch-size is {}, expected at least 2 for in-batch negatives",
            settings.batch_size
        ));
    }
    if !(settings.learning_rate > 0.0 && settings.learning_rate.is_finite()) {
        return invalid(format!(
            "--learning-rate is {}, expected a positive number",
            settings.learning_rate
        ));
    }
    if !(0.0..1.0).contains(&settings.warmup_fraction) {
        return invalid(format!(
            "the warm-up fraction is {}, expected 0 <= fraction < 1",
            settings.warmup_fraction
        ));
    }
    if !(settings.margin > 0.0 && settings.margin <= 2.0) {
        return invalid(format!(
            "--margin is {}, expected 0 < margin <= 2 for cosine similarities",
            settings.margin
        ));
    }
    if !(settings.soft_triplet_scale > 0.0 && settings.soft_triplet_scale.is_finite()) {
        return invalid(format!(
            "--soft-triplet-scale is {}, expected a positive number",
            settings.soft_triplet_scale
        ));
    }
    if !(settings.weight_decay >= 0.0 && settings.weight_decay.is_finite()) {
        return invalid(format!(
            "--weight-decay is {}, expected a number >= 0",
            settings.weight_decay
        ));
    }
    if benchmark.train_queries.is_empty() {
        return invalid("there are no training queries; raise --train-queries".to_owned());
    }
    if benchmark.validation_queries.is_empty() {
        return invalid("there are no validation queries; raise --validation-queries".to_owned());
    }
    Ok(())
}

/// Feature-matrix rows of the training images, grouped by attribute key.
fn positive_rows_by_target(benchmark: &Benchmark) -> HashMap<i64, Vec<i64>> {
    let mut groups: HashMap<i64, Vec<i64>> = HashMap::new();
    for (row, item) in benchmark.train_catalog.iter().enumerate() {
        groups.entry(item.key).or_default().push(row as i64);
    }
    groups
}

/// Image input of the fusion MLP: the reference features, or zeros for the text-only variant.
///
/// The features go in unscaled, as the model crate's inference feeds them; the heads'
/// input normalisation (`HeadConfig::input_norm`) evens out their scales.
fn reference_features(image_features: &Tensor, rows: &[i64], variant: Variant) -> Tensor {
    match variant {
        Variant::Fusion | Variant::Tirg => {
            image_features.index_select(0, &Tensor::from_slice(rows))
        }
        Variant::TextOnly => Tensor::zeros(
            [rows.len() as i64, image_features.size()[1]],
            (Kind::Float, image_features.device()),
        ),
    }
}

fn validation_recall(
    heads: &Heads,
    inputs: &Inputs<'_>,
    rows: &QueryRows,
    catalog_codes: &[i64],
    variant: Variant,
) -> Result<f64> {
    let catalog_images = inputs.validation_catalog();
    let image_input = reference_features(&catalog_images, &rows.references, variant);
    let text_input = inputs.eval_texts(&rows.texts);
    let queries = heads.compose(&image_input, &text_input);
    let catalog = heads.project(&catalog_images);
    let excluded: Vec<Option<usize>> = rows
        .references
        .iter()
        .map(|&row| Some(row as usize))
        .collect();
    let ranks = best_relevant_ranks(&RankingInput {
        queries: &queries,
        catalog: &catalog,
        query_targets: &rows.targets,
        catalog_codes,
        excluded: &excluded,
    })?;
    Ok(recall_at(&ranks, VALIDATION_CUTOFF))
}

/// Copies each tensor of `source` into the variable of `target` at the same position.
fn copy_variables(target: &[(String, Tensor)], source: &[(String, Tensor)]) -> Result<()> {
    tch::no_grad(|| {
        for ((_, target), (_, source)) in target.iter().zip(source) {
            target.shallow_clone().f_copy_(source)?;
        }
        Ok(())
    })
}
