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
    /// Address of the Prometheus text endpoint (`GET /metrics`); empty
    /// disables it.
    pub metrics_listen: String,
    /// Model directory: config.json plus safetensors files.
    pub model_dir: PathBuf,
    /// `cpu`, `cuda` (first GPU), `cuda:N`, or `auto` (CUDA when available).
    pub device: String,
    /// `fp32`, or `fp16` for half-precision matrix work on CUDA (outputs
    /// stay fp32). `fp16` on the CPU is rejected at start.
    pub precision: String,
    /// Model workers; each owns its own copy of the model and pulls batches
    /// from the shared queue. Several workers can help on a CPU with many
    /// cores; on one GPU a single worker is usually best.
    pub workers: usize,
    /// libtorch intra-op threads of each worker; 0 keeps libtorch's default
    /// (one per core), which oversubscribes the cores when `workers` > 1.
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
    /// Largest number of items (queries plus images) in one forward pass.
    pub max_batch_size: usize,
    /// How long a worker holding a partial batch waits for more items, in
    /// milliseconds. A worker that can fill the batch from the queue does
    /// not wait.
    pub max_wait_ms: u64,
    /// Items admitted (being preprocessed or waiting for a worker) beyond
    /// which new requests are rejected with RESOURCE_EXHAUSTED. An
    /// EmbedImages request takes one slot per image.
    pub queue_capacity: usize,
    /// Run composed queries and catalog images of one batch through the
    /// image backbone together (`true`), or as two forward passes (`false`).
    pub mixed_kinds: bool,
}

/// Request validation limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitSettings {
    /// Largest gRPC request message, in bytes; larger ones are rejected
    /// with OUT_OF_RANGE before they are decoded.
    pub max_message_bytes: usize,
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
            metrics_listen: String::new(),
            model_dir: PathBuf::from("artifacts/models/fmnist-colours"),
            device: "cpu".into(),
            precision: "fp32".into(),
            workers: 1,
            torch_threads: 0,
            preprocess_threads: 0,
            batching: BatchingSettings::default(),
            limits: LimitSettings::default(),
        }
    }
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self { max_batch_size: 32, max_wait_ms: 5, queue_capacity: 1024, mixed_kinds: true }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024 * 1024,
            max_image_bytes: 16 * 1024 * 1024,
            max_image_pixels: 40_000_000,
            max_images_per_request: 256,
            max_texts: 8,
            max_text_chars: 2_000,
            token_overflow: None,
        }
    }
}

impl EncoderSettings {
    /// Checks values that would otherwise fail later or silently misbehave.
    /// Returns a message that names the setting and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 {
            return Err("workers is 0; set ENCODER__WORKERS to at least 1".into());
        }
        if self.batching.max_batch_size == 0 {
            return Err("batching.max_batch_size is 0; set ENCODER__BATCHING__MAX_BATCH_SIZE to at least 1".into());
        }
        if self.batching.queue_capacity == 0 {
            return Err("batching.queue_capacity is 0; set ENCODER__BATCHING__QUEUE_CAPACITY to at least 1".into());
        }
        if self.limits.max_images_per_request > self.batching.queue_capacity {
            return Err(format!(
                "limits.max_images_per_request ({}) is larger than batching.queue_capacity ({}), so such a request could never be admitted; \
                 lower ENCODER__LIMITS__MAX_IMAGES_PER_REQUEST or raise ENCODER__BATCHING__QUEUE_CAPACITY",
                self.limits.max_images_per_request, self.batching.queue_capacity
            ));
        }
        if self.limits.max_message_bytes == 0 {
            return Err("limits.max_message_bytes is 0; set ENCODER__LIMITS__MAX_MESSAGE_BYTES to the largest request in bytes".into());
        }
        Ok(())
    }
}
