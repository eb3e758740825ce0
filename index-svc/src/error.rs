//! Error types of the crate. Shard operations return [`ShardError`], and the
//! gRPC layer maps it to a status code in one place
//! (`service::status_from_error`).

use std::io;
use std::path::PathBuf;

/// An invalid setting, found before the shard opens.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {key} = {value}: {fix}")]
pub struct SettingsError {
    key: &'static str,
    value: String,
    fix: String,
}

impl SettingsError {
    pub(crate) fn invalid(key: &'static str, value: impl std::fmt::Display, fix: &str) -> Self {
        Self {
            key,
            value: value.to_string(),
            fix: fix.to_owned(),
        }
    }
}

/// A binary record or snapshot entry that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The data ends before a field does.
    #[error("data ends early: {needed} bytes needed at byte {position}, {remaining} left")]
    UnexpectedEnd {
        position: usize,
        needed: usize,
        remaining: usize,
    },
    /// A string field contains bytes that are not UTF-8.
    #[error("string at byte {position} is not valid UTF-8")]
    InvalidUtf8 { position: usize },
    /// A record starts with a kind byte this version does not define.
    #[error("unknown record kind {kind}")]
    UnknownRecordKind { kind: u8 },
    /// Bytes remain after the last field of a record.
    #[error("{extra} unexpected bytes after the end of the record")]
    TrailingBytes { extra: usize },
    /// A field contains a value that is out of range.
    #[error("invalid field {field}: {value}")]
    InvalidField { field: &'static str, value: String },
}

/// A write-ahead log failure.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file operation failed.
    #[error("failed to {operation} write-ahead log {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not start with the log's magic bytes.
    #[error("{path} is not a write-ahead log of this service (bad magic bytes); move it away to start with an empty log")]
    BadMagic { path: PathBuf },
    /// The file was written by an unknown format version.
    #[error("write-ahead log {path} has format version {found}, but this build reads version {supported}; run a build that supports version {found}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A record before the end of the log fails its checksum, so the damage
    /// is not a torn final write.
    #[error("write-ahead log {path} is corrupt at byte {offset} ({reason}) and more records follow; restore the data directory from a backup, or truncate the file to {offset} bytes to drop every record from there on")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A record passes its checksum but does not decode.
    #[error("write-ahead log {path} contains an undecodable record at byte {offset}: {source}")]
    Decode {
        path: PathBuf,
        offset: u64,
        #[source]
        source: DecodeError,
    },
    /// A record is larger than the format allows.
    #[error("write-ahead log record of {bytes} bytes exceeds the limit of {limit} bytes; send smaller batches")]
    RecordTooLarge { bytes: usize, limit: usize },
    /// Applying a replayed record failed.
    #[error(
        "failed to replay write-ahead log {path} record {sequence} at byte {offset}: {message}"
    )]
    Replay {
        path: PathBuf,
        offset: u64,
        sequence: u64,
        message: String,
    },
    /// An append failed and the partial record could not be removed, so
    /// further appends would land after garbage.
    #[error("write-ahead log {path} is unusable after a failed append; restart the service to recover it")]
    Poisoned { path: PathBuf },
}

/// A snapshot failure.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("failed to {operation} snapshot {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not start with the snapshot magic bytes.
    #[error("{path} is not a snapshot of this service (bad magic bytes)")]
    BadMagic { path: PathBuf },
    /// The file was written by an unknown format version.
    #[error("snapshot {path} has format version {found}, but this build reads version {supported}; run a build that supports version {found}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// The stored checksum does not match the contents.
    #[error("snapshot {path} is corrupt: checksum {stored:#010x} stored, {computed:#010x} computed; restore the data directory from a backup")]
    Checksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    /// A field does not decode.
    #[error("snapshot {path} is corrupt: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
}

/// A FAISS index failure.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The factory string does not build an index.
    #[error("FAISS could not build index {factory:?} for dimension {dimension} with metric {metric}: {message}; set index_factory to a valid factory string such as Flat")]
    Build {
        factory: String,
        dimension: u32,
        metric: &'static str,
        message: String,
    },
    /// Training was requested with fewer vectors than FAISS needs.
    #[error("index {factory:?} needs at least {minimum} training vectors, but the shard stores {given}; upsert more vectors before training")]
    TooFewTrainingVectors {
        factory: String,
        given: u64,
        minimum: u64,
    },
    /// A FAISS call failed.
    #[error("FAISS {operation} failed: {message}")]
    Faiss {
        operation: &'static str,
        message: String,
    },
}

/// A failed shard operation. Each variant maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// `k` is zero or above the limit.
    #[error("k = {k} is out of range; request a k from 1 to {max_k}")]
    InvalidK { k: u32, max_k: u32 },
    /// A query-time search parameter is out of range.
    #[error("{field} = {value} is out of range; use a value from 0 (the shard default) to {max}")]
    InvalidSearchParam {
        field: &'static str,
        value: u32,
        max: u32,
    },
    /// A request carries more entries than the limit.
    #[error("{field} has {count} entries, above the limit of {limit}; split the request into batches of at most {limit}")]
    TooManyEntries {
        field: &'static str,
        count: usize,
        limit: u32,
    },
    /// An item id is empty.
    #[error("{field}[{position}] is an empty id; every id must be a non-empty string")]
    EmptyId {
        field: &'static str,
        position: usize,
    },
    /// An item id is longer than the limit.
    #[error("{field}[{position}] is an id of {bytes} bytes, above the limit of {limit} bytes; use shorter ids")]
    IdTooLong {
        field: &'static str,
        position: usize,
        bytes: usize,
        limit: usize,
    },
    /// The same id appears twice in one request.
    #[error("id {id:?} appears more than once in {field}; send each id once per request")]
    DuplicateId { field: &'static str, id: String },
    /// A vector length does not match the shard dimension.
    #[error("{what} has dimension {given}, but the shard dimension is {expected}; send vectors of length {expected}")]
    DimensionMismatch {
        what: String,
        expected: u32,
        given: usize,
    },
    /// The first vector fixes a dimension outside the allowed range.
    #[error("{what} has dimension {given}; the dimension must be from 1 to {max}")]
    InvalidDimension {
        what: String,
        given: usize,
        max: u32,
    },
    /// A vector contains NaN or an infinity.
    #[error(
        "{what} contains the non-finite value {value} at position {position}; send finite floats"
    )]
    NonFinite {
        what: String,
        position: usize,
        value: f32,
    },
    /// Item metadata is larger than the limit.
    #[error("metadata of item {id:?} is {bytes} bytes, above the limit of {limit} bytes; store less metadata per item")]
    MetadataTooLarge {
        id: String,
        bytes: usize,
        limit: u32,
    },
    /// Item image features are larger than the limit.
    #[error("image_features of item {id:?} is {bytes} bytes, above the limit of {limit} bytes")]
    ImageFeaturesTooLarge {
        id: String,
        bytes: usize,
        limit: u32,
    },
    /// Item image features are not a whole number of `f32` values.
    #[error("image_features of item {id:?} is {bytes} bytes, which is not a multiple of 4; send little-endian f32 values")]
    ImageFeaturesNotF32 { id: String, bytes: usize },
    /// A request carries vectors of a model other than the shard's.
    #[error("model fingerprint {request:?} does not match the shard's fingerprint {shard:?}; send vectors of model {shard:?}, or use a shard for the new model")]
    FingerprintMismatch { shard: String, request: String },
    /// Requested ids are not stored.
    #[error("{} not found: {}", if ids.len() == 1 { "id" } else { "ids" }, format_ids(ids))]
    NotFound { ids: Vec<String> },
    /// The configured dimension differs from the dimension of stored data.
    #[error("dimension is set to {configured}, but the data in {data_dir} has dimension {stored}; set dimension to {stored}, unset it, or use another data_dir")]
    DimensionConflict {
        configured: u32,
        stored: u32,
        data_dir: PathBuf,
    },
    /// Another process has locked the data directory.
    #[error("data directory {data_dir} is in use by another index-svc process; stop it or set another data_dir")]
    DataDirLocked { data_dir: PathBuf },
    /// A data directory file operation failed.
    #[error("failed to {operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The in-memory index is out of step with the stored items.
    #[error("the vector index is unavailable after a failed update ({reason}); writes are durable, and a restart rebuilds the index")]
    IndexUnavailable { reason: String },
    /// Invalid settings.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A write-ahead log failure.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A snapshot failure.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A FAISS failure.
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Ids listed in a [`ShardError::NotFound`] message; long lists are cut.
const MAX_IDS_IN_MESSAGE: usize = 10;

fn format_ids(ids: &[String]) -> String {
    let shown: Vec<String> = ids
        .iter()
        .take(MAX_IDS_IN_MESSAGE)
        .map(|id| format!("{id:?}"))
        .collect();
    let mut text = shown.join(", ");
    if ids.len() > MAX_IDS_IN_MESSAGE {
        text.push_str(&format!(" and {} more", ids.len() - MAX_IDS_IN_MESSAGE));
    }
    text
}

/// A failure to start or run the gRPC server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service rejected a descriptor set.
    #[error("failed to build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_ids() {
        let error = ShardError::NotFound {
            ids: vec!["a".into()],
        };
        assert_eq!(error.to_string(), "id not found: \"a\"");
    }

    #[test]
    fn not_found_cuts_long_lists() {
        let ids: Vec<String> = (0..12).map(|i| format!("item-{i}")).collect();
        let message = ShardError::NotFound { ids }.to_string();
        assert!(
            message.starts_with("ids not found: \"item-0\""),
            "{message}"
        );
        assert!(message.ends_with("\"item-9\" and 2 more"), "{message}");
        assert!(!message.contains("item-10"), "{message}");
    }
}
