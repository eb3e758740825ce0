//! Service settings, read from defaults, an optional TOML file and `INDEX__*`
//! environment variables through [`densebert4ret_common::load_settings`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::SettingsError;

/// Largest vector dimension a shard accepts. Larger vectors are almost
/// certainly a client bug, and rejecting them keeps one request from
/// allocating gigabytes.
pub const MAX_DIMENSION: u32 = 65_536;

/// Largest `nprobe` a search may request.
pub const MAX_NPROBE: u32 = 1 << 20;
/// Largest `ef_search` a search may request.
pub const MAX_EF_SEARCH: u32 = 1 << 16;

/// Similarity measure of the FAISS index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Inner product; the score is the inner product itself, so with unit
    /// vectors it is the cosine similarity.
    InnerProduct,
    /// Euclidean distance; the score is the negated squared L2 distance, so
    /// that a higher score is closer for both metrics.
    L2,
}

impl Metric {
    /// Name used in settings, snapshots and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::InnerProduct => "inner_product",
            Metric::L2 => "l2",
        }
    }

    /// Parses a name written by [`Metric::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "inner_product" => Some(Metric::InnerProduct),
            "l2" => Some(Metric::L2),
            _ => None,
        }
    }
}

/// Settings of one `index-svc` process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the gRPC server binds, `host:port`.
    pub listen: String,
    /// Number of this shard within the cluster, returned in every search hit.
    pub shard_id: u32,
    /// Directory holding the snapshot and the write-ahead log; created when
    /// missing. One process at a time may use it.
    pub data_dir: PathBuf,
    /// Vector dimension. When unset, the first upsert fixes it, and the
    /// dimension is persisted with the data from then on.
    pub dimension: Option<u32>,
    /// FAISS index factory string, for example `Flat`, `SQfp16`,
    /// `IVF256,Flat`, `IVF256,PQ16` or `HNSW32`. Indexes other than IVF get
    /// an `IDMap,` prefix unless the string starts with `IDMap`. The shard
    /// checks the string on open when the dimension is known, otherwise on
    /// the first upsert. FAISS trains `IVF…,PQ…` factory strings with
    /// polysemous training, which is slow; the suffix `np` (`IVF256,PQ16np`)
    /// skips it.
    pub index_factory: String,
    /// Number of stored vectors at which an index that needs training (IVF,
    /// PQ) is trained in the background. Unset: 39 per IVF list, 39 x 256
    /// with PQ, and at least 1000. Until then searches are exact.
    pub train_threshold: Option<u64>,
    /// Default inverted lists visited per IVF search, used when a request
    /// sets no `nprobe`.
    pub nprobe: u32,
    /// Default HNSW candidate list size, used when a request sets no
    /// `ef_search`.
    pub ef_search: u32,
    /// Fraction of the index made of tombstones (deleted or replaced vectors
    /// of an index without removal, such as HNSW) at which the index is
    /// rebuilt in the background without them.
    pub tombstone_rebuild_fraction: f64,
    /// OpenMP threads per FAISS call (search, add, training). Concurrent
    /// requests already run in parallel, so 1 avoids oversubscribing the
    /// cores; raise it for a shard that serves few large batches.
    pub openmp_threads: u32,
    /// Similarity measure: `inner_product` or `l2`.
    pub metric: Metric,
    /// Largest `k` a search may request.
    pub max_k: u32,
    /// Largest number of items in one upsert, or of ids in one delete, get or
    /// search exclusion list.
    pub max_batch_items: u32,
    /// Largest number of query vectors in one search.
    pub max_search_queries: u32,
    /// Largest metadata size of one item, in bytes (keys plus values).
    pub max_metadata_bytes: u32,
    /// Largest `image_features` payload of one item, in bytes.
    pub max_image_features_bytes: u32,
    /// Number of write-ahead log records (one per upsert or delete request)
    /// after which a snapshot is taken and the log truncated. The snapshot
    /// runs inside the write that reaches the limit, which delays that write
    /// and the writes queued behind it. Searches continue meanwhile.
    pub snapshot_every: u64,
    /// Write-ahead log size in bytes after which a snapshot is taken, whatever
    /// the record count.
    pub snapshot_wal_bytes: u64,
    /// Whether every write-ahead log append is synced to disk before the
    /// request is acknowledged. When false, a process crash still loses
    /// nothing, but a power loss or kernel crash can lose recent writes.
    pub fsync: bool,
    /// Largest gRPC message the server decodes or encodes, in bytes.
    pub max_message_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50061".to_owned(),
            shard_id: 0,
            data_dir: PathBuf::from("data/index-0"),
            dimension: None,
            index_factory: "Flat".to_owned(),
            train_threshold: None,
            nprobe: 16,
            ef_search: 64,
            tombstone_rebuild_fraction: 0.2,
            openmp_threads: 1,
            metric: Metric::InnerProduct,
            max_k: 1000,
            max_batch_items: 4096,
            max_search_queries: 1024,
            max_metadata_bytes: 16 * 1024,
            max_image_features_bytes: 4 * 1024 * 1024,
            snapshot_every: 50_000,
            snapshot_wal_bytes: 1024 * 1024 * 1024,
            fsync: true,
            max_message_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Settings {
    /// Checks the values that no later step would reject with a clear
    /// message.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.listen.parse::<SocketAddr>().is_err() {
            return Err(SettingsError::invalid(
                "listen",
                &self.listen,
                "use an IP address and port such as 127.0.0.1:50061",
            ));
        }
        if let Some(dimension) = self.dimension {
            if dimension == 0 || dimension > MAX_DIMENSION {
                return Err(SettingsError::invalid(
                    "dimension",
                    dimension,
                    &format!("use a value from 1 to {MAX_DIMENSION}, or leave it unset"),
                ));
            }
        }
        if self.index_factory.trim().is_empty() {
            return Err(SettingsError::invalid(
                "index_factory",
                &self.index_factory,
                "use a FAISS index factory string such as Flat",
            ));
        }
        if !(self.tombstone_rebuild_fraction > 0.0 && self.tombstone_rebuild_fraction <= 1.0) {
            return Err(SettingsError::invalid(
                "tombstone_rebuild_fraction",
                self.tombstone_rebuild_fraction,
                "use a fraction above 0 and at most 1",
            ));
        }
        if self.nprobe == 0 || self.nprobe > MAX_NPROBE {
            return Err(SettingsError::invalid(
                "nprobe",
                self.nprobe,
                &format!("use a value from 1 to {MAX_NPROBE}"),
            ));
        }
        if self.ef_search == 0 || self.ef_search > MAX_EF_SEARCH {
            return Err(SettingsError::invalid(
                "ef_search",
                self.ef_search,
                &format!("use a value from 1 to {MAX_EF_SEARCH}"),
            ));
        }
        if self.train_threshold == Some(0) {
            return Err(SettingsError::invalid(
                "train_threshold",
                0,
                "use a value of at least 1, or leave it unset for the default",
            ));
        }
        let positive = [
            ("max_k", u64::from(self.max_k)),
            ("openmp_threads", u64::from(self.openmp_threads)),
            ("max_batch_items", u64::from(self.max_batch_items)),
            ("max_search_queries", u64::from(self.max_search_queries)),
            ("snapshot_every", self.snapshot_every),
            ("snapshot_wal_bytes", self.snapshot_wal_bytes),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(SettingsError::invalid(
                    key,
                    value,
                    "use a value of at least 1",
                ));
            }
        }
        const MIN_MESSAGE_BYTES: usize = 1024 * 1024;
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(SettingsError::invalid(
                "max_message_bytes",
                self.max_message_bytes,
                &format!("use at least {MIN_MESSAGE_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Settings::default()
            .validate()
            .expect("default settings must validate");
    }

    #[test]
    fn metric_names_round_trip() {
        for metric in [Metric::InnerProduct, Metric::L2] {
            assert_eq!(Metric::from_name(metric.as_str()), Some(metric));
        }
        assert_eq!(Metric::from_name("cosine"), None);
    }

    #[test]
    fn settings_load_from_toml_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.toml");
        std::fs::write(
            &path,
            "shard_id = 2\nindex_factory = \"SQfp16\"\nmax_k = 50\n",
        )
        .unwrap();
        std::env::set_var("INDEX_SETTINGS_TEST__DIMENSION", "768");
        std::env::set_var("INDEX_SETTINGS_TEST__METRIC", "l2");
        std::env::set_var("INDEX_SETTINGS_TEST__MAX_K", "70");

        let settings: Settings =
            densebert4ret_common::load_settings(Some(&path), "INDEX_SETTINGS_TEST").unwrap();

        assert_eq!(settings.shard_id, 2);
        assert_eq!(settings.index_factory, "SQfp16");
        assert_eq!(settings.dimension, Some(768));
        assert_eq!(settings.metric, Metric::L2);
        assert_eq!(settings.max_k, 70);
        assert_eq!(settings.listen, Settings::default().listen);
        settings.validate().unwrap();
    }

    #[test]
    fn unknown_setting_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.toml");
        std::fs::write(&path, "max_kk = 5\n").unwrap();

        let error = densebert4ret_common::load_settings::<Settings>(
            Some(&path),
            "INDEX_SETTINGS_TEST_UNKNOWN",
        )
        .unwrap_err();

        assert!(format!("{error:#}").contains("max_kk"), "{error:#}");
    }

    #[test]
    fn validate_rejects_bad_values() {
        let cases: Vec<(&str, Settings)> = vec![
            (
                "listen",
                Settings {
                    listen: "localhost".into(),
                    ..Settings::default()
                },
            ),
            (
                "dimension",
                Settings {
                    dimension: Some(0),
                    ..Settings::default()
                },
            ),
            (
                "dimension",
                Settings {
                    dimension: Some(MAX_DIMENSION + 1),
                    ..Settings::default()
                },
            ),
            (
                "index_factory",
                Settings {
                    index_factory: " ".into(),
                    ..Settings::default()
                },
            ),
            (
                "max_k",
                Settings {
                    max_k: 0,
                    ..Settings::default()
                },
            ),
            (
                "snapshot_every",
                Settings {
                    snapshot_every: 0,
                    ..Settings::default()
                },
            ),
            (
                "nprobe",
                Settings {
                    nprobe: 0,
                    ..Settings::default()
                },
            ),
            (
                "ef_search",
                Settings {
                    ef_search: MAX_EF_SEARCH + 1,
                    ..Settings::default()
                },
            ),
            (
                "tombstone_rebuild_fraction",
                Settings {
                    tombstone_rebuild_fraction: 0.0,
                    ..Settings::default()
                },
            ),
            (
                "max_message_bytes",
                Settings {
                    max_message_bytes: 10,
                    ..Settings::default()
                },
            ),
        ];
        for (key, settings) in cases {
            let error = settings.validate().expect_err(key);
            assert!(error.to_string().contains(key), "{error} should name {key}");
        }
    }
}
