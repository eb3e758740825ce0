//! Gateway configuration: defaults, then a TOML file, then `GATEWAY__*`
//! environment variables (`GATEWAY__SHARDS` takes a comma-separated list).

use serde::{Deserialize, Serialize};

/// Settings of one gateway process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewaySettings {
    /// Address the public gRPC server listens on.
    pub listen: String,
    /// encoder-svc endpoint.
    pub encoder: String,
    /// index-svc endpoints; shard `i` is the `i`-th entry. Changing the
    /// number of shards changes which shard owns an id, so the catalog must
    /// be re-ingested afterwards.
    pub shards: Vec<String>,
    /// Largest k a search may ask for.
    pub max_k: u32,
    /// Maximum modification text length, in characters.
    pub max_text_chars: usize,
    /// Most modification texts in one search (`text` plus `more_texts`).
    pub max_texts: usize,
    /// Largest reference or catalog image, in bytes.
    pub max_image_bytes: usize,
    /// Maximum catalog id length, in bytes.
    pub max_id_bytes: usize,
    /// Images sent to the encoder per EmbedImages call during ingest.
    pub ingest_batch_size: usize,
    /// Ingest batches in flight at once.
    pub ingest_concurrency: usize,
    /// Deadline of each encoder call, in milliseconds.
    pub encoder_timeout_ms: u64,
    /// Deadline of each shard call, in milliseconds.
    pub shard_timeout_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            encoder: "http://127.0.0.1:50052".into(),
            shards: vec!["http://127.0.0.1:50061".into(), "http://127.0.0.1:50062".into()],
            max_k: 100,
            max_text_chars: 2_000,
            max_texts: 8,
            max_image_bytes: 16 * 1024 * 1024,
            max_id_bytes: 256,
            ingest_batch_size: 32,
            ingest_concurrency: 4,
            encoder_timeout_ms: 30_000,
            shard_timeout_ms: 10_000,
        }
    }
}
