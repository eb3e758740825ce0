//! Frozen backbone features of every image and text a run uses, cached on disk.
//!
//! The backbones never change during head training, so their outputs are
//! computed once. The cache file name is a SHA-256 over the weight files, the
//! image size, the dataset, its training and test catalogs and the query
//! texts, so a rerun with the same inputs loads the features instead of
//! recomputing them, and each dataset gets its own cache file.
//!
//! TODO: fine-tuning the last image block and the top BERT layers needs training through the
//! backbones on images; the trainer supports frozen backbones only.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use densebert4ret_datasets::{BenchmarkItem, ImageLoader};
use densebert4ret_model::{
    image_to_chw, pad_batch, stack_images, Backbones, ImageArchitecture, Pooling, TextTokenizer,
    TokenOverflow, TEXT_CONFIG_FILE, TEXT_TOKENIZER_FILE, TEXT_WEIGHTS_FILE,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::benchmark::Benchmark;
use crate::error::{Result, TrainerError};
use crate::progress::Progress;

/// Version of the cache layout; bump it when the stored tensors change meaning.
const CACHE_FORMAT: u32 = 1;

/// Images per backbone forward pass.
const IMAGE_BATCH: usize = 64;

/// Texts per text-encoder forward pass.
const TEXT_BATCH: usize = 128;

/// Backbones and input settings that determine the features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Image backbone architecture.
    pub architecture: ImageArchitecture,
    /// Safetensors weights of the image backbone.
    pub image_weights: PathBuf,
    /// Directory with the text encoder's `config.json`, `model.safetensors` and `tokenizer.json`.
    pub text_dir: PathBuf,
    /// Side in pixels that the catalog images are resized to.
    pub image_size: u32,
    /// Maximum tokens per text, special tokens included.
    pub max_tokens: usize,
    /// Pooling of the text encoder's token states.
    pub pooling: Pooling,
}

impl FeatureSpec {
    /// Loads the image backbone and the text encoder on the CPU.
    pub fn load_backbones(&self) -> Result<Backbones> {
        Ok(Backbones::load(
            self.architecture,
            &self.image_weights,
            &self.text_dir,
            self.pooling,
            "",
            Device::Cpu,
        )?)
    }
}

/// Cached features, rows aligned with the benchmark.
#[derive(Debug)]
pub struct Features {
    /// `[train_catalog.len(), image_dim]`, row `i` is `train_catalog[i]`.
    pub train_images: Tensor,
    /// One matrix per test catalog, in the order of `Benchmark::test_catalogs`; row `i`
    /// is item `i` of that catalog.
    pub test_images: Vec<Tensor>,
    /// `[texts.len(), text_dim]`, row `i` is `texts[i]`.
    pub texts: Tensor,
    /// `[validation_catalog.len(), image_dim]` when the benchmark has a validation catalog;
    /// row `i` is its item `i`.
    pub validation_images: Option<Tensor>,
}

impl Features {
    /// Width of the image features.
    pub fn image_dim(&self) -> i64 {
        self.train_images.size()[1]
    }

    /// Width of the text features.
    pub fn text_dim(&self) -> i64 {
        self.texts.size()[1]
    }

    /// Features of the catalog the validation queries search, in the rows of
    /// [`Benchmark::validation_items`].
    pub fn validation_catalog(&self) -> &Tensor {
        self.validation_images
            .as_ref()
            .unwrap_or(&self.train_images)
    }
}

/// Inputs that determine the cached features, stored beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheKey {
    format: u32,
    architecture: String,
    image_weights_sha256: String,
    text_weights_sha256: String,
    text_config_sha256: String,
    tokenizer_sha256: String,
    image_size: u32,
    max_tokens: usize,
    pooling: Pooling,
    train_pool_sha256: String,
    test_images: usize,
    texts: Vec<String>,
    /// Dataset name and directory; absent for Fashion-MNIST colours, whose key predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dataset: Option<String>,
    /// SHA-256 over the ids and image sources of every test catalog; absent for
    /// Fashion-MNIST colours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    test_catalogs_sha256: Option<String>,
}

/// Whether [`load_or_compute`] found the features on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// The cache file existed and matched.
    Hit,
    /// The features were computed and written.
    Miss,
}

/// Loads the features of `benchmark` from `cache_dir`, or computes and stores them.
pub fn load_or_compute(
    benchmark: &Benchmark,
    spec: &FeatureSpec,
    cache_dir: &Path,
) -> Result<(Features, CacheStatus, PathBuf)> {
    let key = cache_key(benchmark, spec)?;
    let digest = cache_digest(&key)?;
    let tensors_path = cache_dir.join(format!("features-{}.safetensors", &digest[..16]));
    let key_path = tensors_path.with_extension("json");

    let (mut features, status) = if tensors_path.is_file() && key_path.is_file() {
        let features = read_cache(&tensors_path, &key_path, &key, benchmark)?;
        tracing::info!(path = %tensors_path.display(), "loaded cached backbone features");
        (features, CacheStatus::Hit)
    } else {
        tracing::info!(path = %tensors_path.display(), "no feature cache found, running the backbones");
        let features = compute(benchmark, spec)?;
        write_cache(&tensors_path, &key_path, &key, &features)?;
        (features, CacheStatus::Miss)
    };

    if !benchmark.extra_texts.is_empty() {
        let extra = load_or_compute_texts(&benchmark.extra_texts, spec, cache_dir)?;
        features.texts = Tensor::cat(&[&features.texts, &extra], 0);
    }
    if let Some(items) = &benchmark.validation_catalog {
        features.validation_images = Some(load_or_compute_images(
            items,
            &benchmark.images,
            spec,
            cache_dir,
        )?);
    }
    Ok((features, status, tensors_path))
}

/// Inputs that determine a cache file of extra image features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ImageCacheKey {
    format: u32,
    architecture: String,
    image_weights_sha256: String,
    image_size: u32,
    items_sha256: String,
}

/// Loads or computes the image features of `items`, cached apart from the main features
/// so that a new validation catalog never reruns the backbone over the other catalogs.
fn load_or_compute_images(
    items: &[BenchmarkItem],
    loader: &ImageLoader,
    spec: &FeatureSpec,
    cache_dir: &Path,
) -> Result<Tensor> {
    let key = ImageCacheKey {
        format: CACHE_FORMAT,
        architecture: spec.architecture.as_str().to_owned(),
        image_weights_sha256: sha256_file(&spec.image_weights)?,
        image_size: spec.image_size,
        items_sha256: catalog_sha256(items)?,
    };
    load_or_compute_single(cache_dir, "images", &key, IMAGES, items.len(), || {
        let backbones = spec.load_backbones()?;
        image_features(&backbones, loader, items, spec, "validation images")
    })
}

/// Loads the tensor `name` with `rows` rows from the cache file `<prefix>-<digest of key>`,
/// or computes it with `compute` and writes that file.
fn load_or_compute_single(
    cache_dir: &Path,
    prefix: &str,
    key: &impl Serialize,
    name: &str,
    rows: usize,
    compute: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let key_json =
        serde_json::to_vec(key).map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    let path = cache_dir.join(format!(
        "{prefix}-{}.safetensors",
        &sha256_hex(&key_json)[..16]
    ));
    if let Some(tensor) = read_single(&path, name, rows)? {
        tracing::info!(path = %path.display(), tensor = name, rows, "loaded cached features");
        return Ok(tensor);
    }

    let features = compute()?;
    write_single(cache_dir, &path, name, &features)?;
    tracing::info!(path = %path.display(), tensor = name, rows, "wrote feature cache");
    Ok(features)
}

/// Reads the Float tensor `name` with `rows` rows from the cache file `path`, or returns
/// `None` when the file does not exist.
fn read_single(path: &Path, name: &str, rows: usize) -> Result<Option<Tensor>> {
    if !path.is_file() {
        return Ok(None);
    }
    let mut tensors = Tensor::read_safetensors(path)?;
    if let Some(position) = tensors.iter().position(|(stored, _)| stored == name) {
        let tensor = tensors.swap_remove(position).1;
        if tensor.size().first() == Some(&(rows as i64)) && tensor.kind() == Kind::Float {
            return Ok(Some(tensor));
        }
    }
    Err(TrainerError::InvalidCache {
        path: path.to_owned(),
        reason: format!("expected a Float tensor {name} with {rows} rows"),
    })
}

/// Writes `tensor` as `name` to `path` through a temporary file, so an interrupted run
/// never leaves a cache file that looks complete.
fn write_single(cache_dir: &Path, path: &Path, name: &str, tensor: &Tensor) -> Result<()> {
    std::fs::create_dir_all(cache_dir)
        .map_err(|error| TrainerError::io("failed to create", cache_dir, error))?;
    let partial = path.with_extension(format!("safetensors.partial-{}", std::process::id()));
    Tensor::write_safetensors(&[(name, tensor.shallow_clone())], &partial)?;
    std::fs::rename(&partial, path)
        .map_err(|error| TrainerError::io("failed to rename", &partial, error))
}

/// Inputs that determine a cache file of extra text features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TextCacheKey {
    format: u32,
    text_weights_sha256: String,
    text_config_sha256: String,
    tokenizer_sha256: String,
    max_tokens: usize,
    pooling: Pooling,
    texts: Vec<String>,
}

/// Loads or computes the text features of `texts`, cached apart from the image features so
/// that a new set of texts never reruns the image backbone.
fn load_or_compute_texts(texts: &[String], spec: &FeatureSpec, cache_dir: &Path) -> Result<Tensor> {
    let key = TextCacheKey {
        format: CACHE_FORMAT,
        text_weights_sha256: sha256_file(&spec.text_dir.join(TEXT_WEIGHTS_FILE))?,
        text_config_sha256: sha256_file(&spec.text_dir.join(TEXT_CONFIG_FILE))?,
        tokenizer_sha256: sha256_file(&spec.text_dir.join(TEXT_TOKENIZER_FILE))?,
        max_tokens: spec.max_tokens,
        pooling: spec.pooling,
        texts: texts.to_vec(),
    };
    load_or_compute_single(cache_dir, "texts", &key, TEXTS, texts.len(), || {
        let backbones = spec.load_backbones()?;
        text_features(&backbones, texts, spec)
    })
}

fn cache_key(benchmark: &Benchmark, spec: &FeatureSpec) -> Result<CacheKey> {
    // Fashion-MNIST colours keeps the key it always had, so existing caches stay valid.
    let (train_pool_sha256, test_images, dataset, test_catalogs_sha256) =
        match &benchmark.fashion_mnist {
            Some(subset) => {
                let pool_bytes: Vec<u8> = subset
                    .train_pool
                    .iter()
                    .flat_map(|&index| (index as u64).to_le_bytes())
                    .collect();
                (sha256_hex(&pool_bytes), subset.test_images, None, None)
            }
            None => {
                let test_items: Vec<&BenchmarkItem> =
                    benchmark.test_catalogs.iter().flatten().collect();
                let test_bytes = serde_json::to_vec(&test_items)
                    .map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
                (
                    catalog_sha256(&benchmark.train_catalog)?,
                    test_items.len(),
                    Some(benchmark.spec.to_string()),
                    Some(sha256_hex(&test_bytes)),
                )
            }
        };
    Ok(CacheKey {
        format: CACHE_FORMAT,
        architecture: spec.architecture.as_str().to_owned(),
        image_weights_sha256: sha256_file(&spec.image_weights)?,
        text_weights_sha256: sha256_file(&spec.text_dir.join(TEXT_WEIGHTS_FILE))?,
        text_config_sha256: sha256_file(&spec.text_dir.join(TEXT_CONFIG_FILE))?,
        tokenizer_sha256: sha256_file(&spec.text_dir.join(TEXT_TOKENIZER_FILE))?,
        image_size: spec.image_size,
        max_tokens: spec.max_tokens,
        pooling: spec.pooling,
        train_pool_sha256,
        test_images,
        texts: benchmark.texts.clone(),
        dataset,
        test_catalogs_sha256,
    })
}

fn cache_digest(key: &CacheKey) -> Result<String> {
    let json =
        serde_json::to_vec(key).map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    Ok(sha256_hex(&json))
}

/// Digest of the backbones, input settings, catalogs and single-step texts that name the
/// main feature cache file of `benchmark`.
pub(crate) fn features_digest(benchmark: &Benchmark, spec: &FeatureSpec) -> Result<String> {
    cache_digest(&cache_key(benchmark, spec)?)
}

/// SHA-256 over the ids and image sources of `items`, in order.
pub(crate) fn catalog_sha256(items: &[BenchmarkItem]) -> Result<String> {
    let bytes =
        serde_json::to_vec(items).map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    Ok(sha256_hex(&bytes))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        File::open(path).map_err(|error| TrainerError::io("failed to open", path, error))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|error| TrainerError::io("failed to read", path, error))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn compute(benchmark: &Benchmark, spec: &FeatureSpec) -> Result<Features> {
    let started = Instant::now();
    let backbones = spec.load_backbones()?;

    let test_images = benchmark
        .test_catalogs
        .iter()
        .map(|catalog| image_features(&backbones, &benchmark.images, catalog, spec, "test images"))
        .collect::<Result<Vec<_>>>()?;
    let train_images = image_features(
        &backbones,
        &benchmark.images,
        &benchmark.train_catalog,
        spec,
        "train images",
    )?;
    let texts = text_features(&backbones, &benchmark.texts, spec)?;

    tracing::info!(
        test_images = benchmark.catalog_image_count(),
        train_images = benchmark.train_catalog.len(),
        texts = benchmark.texts.len(),
        image_size = spec.image_size,
        seconds = started.elapsed().as_secs_f64(),
        "computed backbone features"
    );
    Ok(Features {
        train_images,
        test_images,
        texts,
        validation_images: None,
    })
}

fn image_features(
    backbones: &Backbones,
    loader: &ImageLoader,
    items: &[BenchmarkItem],
    spec: &FeatureSpec,
    label: &'static str,
) -> Result<Tensor> {
    map_images(loader, items, spec, label, |images| {
        Ok(backbones.f_image_features(images)?)
    })
}

/// Decodes and preprocesses `items` in batches and concatenates `forward`'s output rows.
pub(crate) fn map_images(
    loader: &ImageLoader,
    items: &[BenchmarkItem],
    spec: &FeatureSpec,
    label: &str,
    forward: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let normalization = spec.architecture.normalization();
    let mut progress = Progress::new(items.len() as u64, label);
    let mut rows = Vec::with_capacity(items.len().div_ceil(IMAGE_BATCH));
    for batch in items.chunks(IMAGE_BATCH) {
        let mut inputs = Vec::with_capacity(batch.len());
        for item in batch {
            inputs.push(image_to_chw(
                &loader.load(&item.image)?,
                spec.image_size,
                normalization,
            ));
        }
        let images = stack_images(&inputs, spec.image_size)?;
        rows.push(forward(&images)?);
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    Ok(Tensor::cat(&rows, 0))
}

fn text_features(backbones: &Backbones, texts: &[String], spec: &FeatureSpec) -> Result<Tensor> {
    let batches = map_texts(texts, spec, |input_ids, attention_mask| {
        Ok(backbones.f_text_features(input_ids, attention_mask)?)
    })?;
    let rows: Vec<Tensor> = batches.into_iter().map(|(rows, _)| rows).collect();
    Ok(Tensor::cat(&rows, 0))
}

/// Tokenizes `texts` in batches padded to their longest text and returns `forward`'s output
/// with the attention mask of each batch.
pub(crate) fn map_texts(
    texts: &[String],
    spec: &FeatureSpec,
    forward: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Vec<(Tensor, Tensor)>> {
    let tokenizer = TextTokenizer::from_file(
        spec.text_dir.join(TEXT_TOKENIZER_FILE),
        spec.max_tokens,
        TokenOverflow::Truncate,
    )?;
    let mut progress = Progress::new(texts.len() as u64, "texts");
    let mut batches = Vec::with_capacity(texts.len().div_ceil(TEXT_BATCH));
    for batch in texts.chunks(TEXT_BATCH) {
        let sequences = batch
            .iter()
            .map(|text| tokenizer.encode(text))
            .collect::<Result<Vec<_>, _>>()?;
        let (input_ids, attention_mask) = pad_batch(&sequences, tokenizer.pad_id());
        batches.push((forward(&input_ids, &attention_mask)?, attention_mask));
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    Ok(batches)
}

const TRAIN_IMAGES: &str = "train_images";
const TEST_IMAGES: &str = "test_images";
const TEXTS: &str = "texts";
const IMAGES: &str = "images";

/// Tensor name of test catalog `position`: `test_images` for the first, as caches
/// written before there were several catalogs name it, then `test_images_1`, ...
fn test_images_name(position: usize) -> String {
    match position {
        0 => TEST_IMAGES.to_owned(),
        position => format!("{TEST_IMAGES}_{position}"),
    }
}

fn write_cache(
    tensors_path: &Path,
    key_path: &Path,
    key: &CacheKey,
    features: &Features,
) -> Result<()> {
    let dir = tensors_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|error| TrainerError::io("failed to create", dir, error))?;

    // Write both files under temporary names and rename them, the tensors
    // last, so an interrupted run never leaves a cache that looks complete.
    let partial_tensors =
        tensors_path.with_extension(format!("safetensors.partial-{}", std::process::id()));
    let partial_key = key_path.with_extension(format!("json.partial-{}", std::process::id()));
    let mut named = vec![(
        TRAIN_IMAGES.to_owned(),
        features.train_images.shallow_clone(),
    )];
    for (position, tensor) in features.test_images.iter().enumerate() {
        named.push((test_images_name(position), tensor.shallow_clone()));
    }
    named.push((TEXTS.to_owned(), features.texts.shallow_clone()));
    Tensor::write_safetensors(&named, &partial_tensors)?;
    let json = serde_json::to_vec_pretty(key)
        .map_err(|error| TrainerError::InvalidInput(error.to_string()))?;
    std::fs::write(&partial_key, json)
        .map_err(|error| TrainerError::io("failed to write", &partial_key, error))?;
    std::fs::rename(&partial_key, key_path)
        .map_err(|error| TrainerError::io("failed to rename", &partial_key, error))?;
    std::fs::rename(&partial_tensors, tensors_path)
        .map_err(|error| TrainerError::io("failed to rename", &partial_tensors, error))?;
    tracing::info!(path = %tensors_path.display(), "wrote feature cache");
    Ok(())
}

fn read_cache(
    tensors_path: &Path,
    key_path: &Path,
    key: &CacheKey,
    benchmark: &Benchmark,
) -> Result<Features> {
    let invalid = |reason: String| TrainerError::InvalidCache {
        path: tensors_path.to_owned(),
        reason,
    };

    let stored = std::fs::read(key_path)
        .map_err(|error| TrainerError::io("failed to read", key_path, error))?;
    let stored: CacheKey = serde_json::from_slice(&stored)
        .map_err(|error| invalid(format!("{} is not valid: {error}", key_path.display())))?;
    if stored != *key {
        return Err(invalid(format!(
            "{} describes other inputs than this run",
            key_path.display()
        )));
    }

    let mut tensors = Tensor::read_safetensors(tensors_path)?;
    let mut take = |name: &str, rows: usize| -> Result<Tensor> {
        let position = tensors
            .iter()
            .position(|(stored, _)| stored == name)
            .ok_or_else(|| invalid(format!("tensor {name} is missing")))?;
        let tensor = tensors.swap_remove(position).1;
        let size = tensor.size();
        if size.len() != 2 || size[0] != rows as i64 || tensor.kind() != Kind::Float {
            return Err(invalid(format!(
                "tensor {name} is {size:?} {:?}, expected [{rows}, D] Float",
                tensor.kind()
            )));
        }
        Ok(tensor)
    };
    let train_images = take(TRAIN_IMAGES, benchmark.train_catalog.len())?;
    let test_images = benchmark
        .test_catalogs
        .iter()
        .enumerate()
        .map(|(position, catalog)| take(&test_images_name(position), catalog.len()))
        .collect::<Result<Vec<_>>>()?;
    let texts = take(TEXTS, benchmark.texts.len())?;
    if test_images
        .iter()
        .any(|test| test.size()[1] != train_images.size()[1])
    {
        return Err(invalid(
            "train and test image features differ in width".to_owned(),
        ));
    }
    Ok(Features {
        train_images,
        test_images,
        texts,
        validation_images: None,
    })
}
