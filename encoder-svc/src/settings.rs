//! Encoder configuration: defaults, then a TOML file, then `ENCODER__*`
//! environment variables.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of one encoder-svc process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EncoderSettings {
    /// Address the gRPC server listens on.
    pub listen: String,
    /// Model directory: config.json plus safetensors files.
    pub model_dir: PathBuf,
    /// `cpu`, `cuda` (first GPU), `cuda:N`, or `auto` (CUDA when available).
    pub device: String,
    /// libtorch intra-op threads; 0 keeps libtorch's default.
    pub torch_threads: usize,
    /// Threads that decode images and tokenise texts; 0 means one per core.
    pub preprocess_threads: usize,
    pub batching: BatchingSettings,
    pub limits: LimitSettings,
}

/// Dynamic batching policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchingSettings {
    /// Largest number of requests (queries or images) in one forward pass.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for others, in
    /// milliseconds, while the batch is not full.
    pub max_wait_ms: u64,
    /// Requests waiting for the model beyond which new ones are rejected with
    /// RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
}

/// Request validation limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitSettings {
    /// Largest encoded image, in bytes.
    pub max_image_bytes: usize,
    /// Largest decoded image, in pixels (width x height), read from the image
    /// header before decoding.
    pub max_image_pixels: u64,
    /// Maximum number of images in one EmbedImages request.
    pub max_images_per_request: usize,
    /// Most modification texts in one query.
    pub max_texts: usize,
    /// Maximum text length in characters, checked before tokenisation.
    pub max_text_chars: usize,
    /// `reject` texts longer than the model's token limit, or `truncate`
    /// them; unset keeps the policy in the model's config.json.
    pub token_overflow: Option<String>,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50052".into(),
            model_dir: PathBuf::from("artifacts/models/fmnist-colours"),
            device: "cpu".into(),
            torch_threads: 0,
            preprocess_threads: 0,
            batching: BatchingSettings::default(),
            limits: LimitSettings::default(),
        }
    }
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self { max_batch_size: 32, max_wait_ms: 5, queue_capacity: 1024 }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_image_bytes: 16 * 1024 * 1024,
            max_image_pixels: 40_000_000,
            max_images_per_request: 256,
            max_texts: 8,
            max_text_chars: 2_000,
            token_overflow: None,
        }
    }
}
