//! Fine-tuning of the image backbone's last block and the text encoder's top layers together
//! with the heads.
//!
//! Only the tails of the backbones train, so the trunk outputs (the input of the last image
//! block and the hidden states below the top text layers) are computed once per run and
//! cached on disk like the frozen features. Each training step runs the tails with gradients
//! on the trunk rows of its batch. BatchNorm in the image tail keeps its running statistics,
//! so that a row's features do not depend on the rest of its batch, as at serving time.

use std::path::{Path, PathBuf};

use densebert4ret_model::{
    ImageTower, TextTower, TEXT_CONFIG_FILE, TEXT_TOKENIZER_FILE, TEXT_WEIGHTS_FILE,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::benchmark::Benchmark;
use crate::error::{Result, TrainerError};
use crate::features::{
    catalog_sha256, features_digest, map_images, map_texts, sha256_hex, FeatureSpec, Features,
};

/// Version of the trunk cache layout; bump it when the stored tensors change meaning.
const TRUNK_CACHE_FORMAT: u32 = 1;

/// Rows per tail forward pass when computing whole feature matrices.
const TAIL_BATCH: i64 = 512;

/// Default learning rate of the backbone tails as a fraction of the heads' rate.
pub const DEFAULT_BACKBONE_LEARNING_RATE_SCALE: f64 = 0.1;

/// Default number of top text encoder layers that fine-tuning trains.
pub const DEFAULT_TEXT_LAYERS: usize = 2;

/// Prefix of the image tail's variables in optimiser state and checkpoints.
const IMAGE_PREFIX: &str = "image_backbone.";

/// Prefix of the text tail's variables in optimiser state and checkpoints.
const TEXT_PREFIX: &str = "text_encoder.";

/// Backbone layers that fine-tuning trains besides the heads, and their learning rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineTuneSpec {
    /// Top text encoder layers trained; 0 keeps the text encoder frozen.
    pub text_layers: usize,
    /// Learning rate of the backbone weights as a fraction of the heads' learning rate.
    pub learning_rate_scale: f64,
}

impl FineTuneSpec {
    /// Checks the settings against the text encoder's layer count.
    pub fn validate(&self, encoder_layers: usize) -> Result<()> {
        if self.text_layers > encoder_layers {
            return Err(TrainerError::InvalidInput(format!(
                "--fine-tune-text-layers is {}, but the text encoder has {encoder_layers} layers; pass at most {encoder_layers}",
                self.text_layers
            )));
        }
        if !(self.learning_rate_scale > 0.0 && self.learning_rate_scale.is_finite()) {
            return Err(TrainerError::InvalidInput(format!(
                "--backbone-learning-rate-scale is {}, expected a positive number",
                self.learning_rate_scale
            )));
        }
        Ok(())
    }
}

/// Trunk outputs of every image and text of a run, rows aligned with [`Features`].
#[derive(Debug)]
pub struct Trunks {
    /// `[train_catalog.len(), C, h, w]`, the input of the last image block.
    pub train_images: Tensor,
    /// Rows of the validation catalog, when the benchmark has one.
    pub validation_images: Option<Tensor>,
    /// One tensor per test catalog.
    pub test_images: Vec<Tensor>,
    /// Text rows: `[T, L, hidden]` hidden states below the tail layers, padded to the longest
    /// text, or the pooled features `[T, hidden]` when the text encoder stays frozen.
    pub texts: Tensor,
    /// `[T, L]` attention mask of `texts`; `None` when the text encoder stays frozen.
    pub text_mask: Option<Tensor>,
}

/// Inputs that determine the trunk cache file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrunkCacheKey {
    format: u32,
    features_digest: String,
    text_layers: usize,
    extra_texts: Vec<String>,
    validation_catalog_sha256: Option<String>,
}

const TRAIN_IMAGES: &str = "train_images";
const VALIDATION_IMAGES: &str = "validation_images";
const TEXTS: &str = "texts";
const TEXT_MASK: &str = "text_mask";

fn test_images_name(position: usize) -> String {
    format!("test_images_{position}")
}

/// Loads the trunk outputs of `benchmark` from `cache_dir`, or computes and stores them.
pub fn load_or_compute_trunks(
    benchmark: &Benchmark,
    spec: &FeatureSpec,
    fine_tune: &FineTuneSpec,
    cache_dir: &Path,
) -> Result<(Trunks, PathBuf)> {
    let key = TrunkCacheKey {
        format: TRUNK_CACHE_FORMAT,
        features_digest: features_digest(benchmark, spec)?,
        text_layers: fine_tune.text_layers,
        extra_texts: benchmark.extra_texts.clone(),
        validation_catalog_sha256: benchmark
            .validation_catalog
            .as_deref()
            .map(catalog_sha256)
            .transpose()?,
    };
    let key_json =
        serde_json::to_vec(&key).map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    let path = cache_dir.join(format!(
        "trunks-{}.safetensors",
        &sha256_hex(&key_json)[..16]
    ));
    if path.is_file() {
        let trunks = read_trunks(&path, benchmark, fine_tune)?;
        tracing::info!(path = %path.display(), "loaded cached trunk outputs");
        return Ok((trunks, path));
    }

    tracing::info!(path = %path.display(), "no trunk cache found, running the backbone trunks");
    let trunks = compute_trunks(benchmark, spec, fine_tune)?;
    write_trunks(cache_dir, &path, &trunks)?;
    Ok((trunks, path))
}

fn compute_trunks(
    benchmark: &Benchmark,
    spec: &FeatureSpec,
    fine_tune: &FineTuneSpec,
) -> Result<Trunks> {
    let backbones = spec.load_backbones()?;
    let image = backbones.image();
    let trunk = |items: &[densebert4ret_datasets::BenchmarkItem], label: &str| {
        map_images(&benchmark.images, items, spec, label, |images| {
            Ok(image.f_trunk(images)?)
        })
    };
    let test_images = benchmark
        .test_catalogs
        .iter()
        .map(|catalog| trunk(catalog, "test image trunks"))
        .collect::<Result<Vec<_>>>()?;
    let validation_images = benchmark
        .validation_catalog
        .as_deref()
        .map(|catalog| trunk(catalog, "validation image trunks"))
        .transpose()?;
    let train_images = trunk(&benchmark.train_catalog, "train image trunks")?;

    let texts: Vec<String> = benchmark
        .texts
        .iter()
        .chain(&benchmark.extra_texts)
        .cloned()
        .collect();
    let text = backbones.text();
    let (texts, text_mask) = if fine_tune.text_layers == 0 {
        let batches = map_texts(&texts, spec, |ids, mask| Ok(text.f_features(ids, mask)?))?;
        let rows: Vec<Tensor> = batches.into_iter().map(|(rows, _)| rows).collect();
        (Tensor::cat(&rows, 0), None)
    } else {
        let batches = map_texts(&texts, spec, |ids, mask| {
            Ok(text.f_trunk(ids, mask, fine_tune.text_layers)?)
        })?;
        let longest = batches
            .iter()
            .map(|(hidden, _)| hidden.size()[1])
            .max()
            .unwrap_or(1);
        // Padding every batch to the longest text changes no pooled feature: padded
        // positions are masked out of attention and pooling.
        let mut hidden_rows = Vec::with_capacity(batches.len());
        let mut mask_rows = Vec::with_capacity(batches.len());
        for (hidden, mask) in batches {
            let missing = longest - hidden.size()[1];
            hidden_rows.push(hidden.constant_pad_nd([0, 0, 0, missing]));
            mask_rows.push(mask.constant_pad_nd([0, missing]));
        }
        (
            Tensor::cat(&hidden_rows, 0),
            Some(Tensor::cat(&mask_rows, 0)),
        )
    };
    Ok(Trunks {
        train_images,
        validation_images,
        test_images,
        texts,
        text_mask,
    })
}

fn write_trunks(cache_dir: &Path, path: &Path, trunks: &Trunks) -> Result<()> {
    std::fs::create_dir_all(cache_dir)
        .map_err(|error| TrainerError::io("failed to create", cache_dir, error))?;
    let mut named = vec![
        (TRAIN_IMAGES.to_owned(), trunks.train_images.shallow_clone()),
        (TEXTS.to_owned(), trunks.texts.shallow_clone()),
    ];
    if let Some(validation) = &trunks.validation_images {
        named.push((VALIDATION_IMAGES.to_owned(), validation.shallow_clone()));
    }
    if let Some(mask) = &trunks.text_mask {
        named.push((TEXT_MASK.to_owned(), mask.shallow_clone()));
    }
    for (position, tensor) in trunks.test_images.iter().enumerate() {
        named.push((test_images_name(position), tensor.shallow_clone()));
    }
    let partial = path.with_extension(format!("safetensors.partial-{}", std::process::id()));
    Tensor::write_safetensors(&named, &partial)?;
    std::fs::rename(&partial, path)
        .map_err(|error| TrainerError::io("failed to rename", &partial, error))?;
    tracing::info!(path = %path.display(), "wrote trunk cache");
    Ok(())
}

fn read_trunks(path: &Path, benchmark: &Benchmark, fine_tune: &FineTuneSpec) -> Result<Trunks> {
    let mut tensors = Tensor::read_safetensors(path)?;
    let mut take = |name: &str, rows: usize| -> Result<Tensor> {
        let position = tensors
            .iter()
            .position(|(stored, _)| stored == name)
            .ok_or_else(|| TrainerError::InvalidCache {
                path: path.to_owned(),
                reason: format!("tensor {name} is missing"),
            })?;
        let tensor = tensors.swap_remove(position).1;
        if tensor.size().first() != Some(&(rows as i64)) {
            return Err(TrainerError::InvalidCache {
                path: path.to_owned(),
                reason: format!("tensor {name} is {:?}, expected {rows} rows", tensor.size()),
            });
        }
        Ok(tensor)
    };
    let text_count = benchmark.texts.len() + benchmark.extra_texts.len();
    Ok(Trunks {
        train_images: take(TRAIN_IMAGES, benchmark.train_catalog.len())?,
        validation_images: benchmark
            .validation_catalog
            .as_ref()
            .map(|catalog| take(VALIDATION_IMAGES, catalog.len()))
            .transpose()?,
        test_images: benchmark
            .test_catalogs
            .iter()
            .enumerate()
            .map(|(position, catalog)| take(&test_images_name(position), catalog.len()))
            .collect::<Result<Vec<_>>>()?,
        texts: take(TEXTS, text_count)?,
        text_mask: (fine_tune.text_layers > 0)
            .then(|| take(TEXT_MASK, text_count))
            .transpose()?,
    })
}

/// Freshly loaded backbones whose tails train; each training gets its own.
#[derive(Debug)]
pub struct Tails {
    image: ImageTower,
    text: TextTower,
    text_layers: usize,
    variables: Vec<(String, Tensor)>,
    text_dir: PathBuf,
}

impl Tails {
    /// Loads the backbones of `spec` and makes the last image block and the top
    /// `fine_tune.text_layers` text layers trainable.
    pub fn load(spec: &FeatureSpec, fine_tune: &FineTuneSpec) -> Result<Self> {
        let image = ImageTower::load(spec.architecture, &spec.image_weights, Device::Cpu)?;
        let text = TextTower::load_dir(&spec.text_dir, "", spec.pooling, Device::Cpu)?;
        fine_tune.validate(text.layer_count())?;
        let mut variables: Vec<(String, Tensor)> = image
            .unfreeze_tail()
            .into_iter()
            .map(|(name, variable)| (format!("{IMAGE_PREFIX}{name}"), variable))
            .collect();
        if fine_tune.text_layers > 0 {
            variables.extend(
                text.unfreeze_tail(fine_tune.text_layers)?
                    .into_iter()
                    .map(|(name, variable)| (format!("{TEXT_PREFIX}{name}"), variable)),
            );
        }
        tracing::info!(
            variables = variables.len(),
            parameters = variables
                .iter()
                .map(|(_, variable)| variable.numel())
                .sum::<usize>(),
            text_layers = fine_tune.text_layers,
            "unfroze the backbone tails"
        );
        Ok(Self {
            image,
            text,
            text_layers: fine_tune.text_layers,
            variables,
            text_dir: spec.text_dir.clone(),
        })
    }

    /// Trainable variables, named `image_backbone.*` and `text_encoder.*`.
    pub fn variables(&self) -> &[(String, Tensor)] {
        &self.variables
    }

    /// Width of the image features.
    pub fn image_dim(&self) -> i64 {
        self.image.feature_dim()
    }

    /// Width of the text features.
    pub fn text_dim(&self) -> i64 {
        self.text.feature_dim()
    }

    /// Image features of trunk rows `[N, C, h, w]`, with gradients.
    pub fn image_features(&self, trunk_rows: &Tensor) -> Tensor {
        self.image.tail(trunk_rows)
    }

    /// Text features of rows `rows` of `trunks`, with gradients; `train` turns dropout on.
    /// A text that occurs several times in `rows` runs once.
    pub fn text_features(&self, trunks: &Trunks, rows: &[i64], train: bool) -> Tensor {
        let rows = Tensor::from_slice(rows);
        let Some(mask) = &trunks.text_mask else {
            return trunks.texts.index_select(0, &rows);
        };
        let (unique, inverse, _) = rows.unique_dim(0, true, true, false);
        let hidden = trunks.texts.index_select(0, &unique);
        let mask = mask.index_select(0, &unique);
        // Trim the padding that no selected text uses.
        let length = mask
            .sum_dim_intlist(1, false, Kind::Int64)
            .max()
            .int64_value(&[]);
        let length = length.max(1);
        let hidden = hidden.narrow(1, 0, length);
        let mask = mask.narrow(1, 0, length);
        self.text
            .tail_t(&hidden, &mask, self.text_layers, train)
            .index_select(0, &inverse)
    }

    /// Image features of every row of `trunk`, in eval mode without gradients.
    pub fn embed_images(&self, trunk: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let rows = trunk.size()[0];
            let parts: Vec<Tensor> = (0..rows)
                .step_by(TAIL_BATCH as usize)
                .map(|start| {
                    let length = TAIL_BATCH.min(rows - start);
                    self.image.tail(&trunk.narrow(0, start, length))
                })
                .collect();
            concat_rows(parts, self.image_dim())
        })
    }

    /// Text features of `rows` of `trunks` in eval mode without gradients.
    pub fn embed_texts(&self, trunks: &Trunks, rows: &[i64]) -> Tensor {
        tch::no_grad(|| {
            let parts: Vec<Tensor> = rows
                .chunks(TAIL_BATCH as usize)
                .map(|chunk| self.text_features(trunks, chunk, false))
                .collect();
            concat_rows(parts, self.text_dim())
        })
    }

    /// Features of the test catalogs and of every text through the current tails, laid out
    /// as the frozen features are, so that evaluation reads them the same way. Evaluation
    /// reads no training or validation image, so `train_images` has no rows and
    /// `validation_images` is `None`.
    pub fn test_features(&self, trunks: &Trunks) -> Features {
        let text_rows: Vec<i64> = (0..trunks.texts.size()[0]).collect();
        Features {
            train_images: Tensor::zeros([0, self.image_dim()], (Kind::Float, Device::Cpu)),
            test_images: trunks
                .test_images
                .iter()
                .map(|trunk| self.embed_images(trunk))
                .collect(),
            texts: self.embed_texts(trunks, &text_rows),
            validation_images: None,
        }
    }

    /// Writes the tuned image weights to `image_weights` and a text encoder directory with the
    /// tuned weights and the original configuration and tokenizer to `text_dir`.
    pub fn save(&self, image_weights: &Path, text_dir: &Path) -> Result<()> {
        if let Some(parent) = image_weights.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|error| TrainerError::io("failed to create", parent, error))?;
        }
        self.image.save(image_weights)?;
        std::fs::create_dir_all(text_dir)
            .map_err(|error| TrainerError::io("failed to create", text_dir, error))?;
        for file in [TEXT_CONFIG_FILE, TEXT_TOKENIZER_FILE] {
            let source = self.text_dir.join(file);
            let target = text_dir.join(file);
            std::fs::copy(&source, &target)
                .map_err(|error| TrainerError::io("failed to copy", &source, error))?;
        }
        self.text.save(&text_dir.join(TEXT_WEIGHTS_FILE))?;
        Ok(())
    }
}

fn concat_rows(parts: Vec<Tensor>, width: i64) -> Tensor {
    if parts.is_empty() {
        Tensor::zeros([0, width], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(&parts, 0)
    }
}
