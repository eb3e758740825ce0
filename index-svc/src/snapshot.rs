//! Snapshots: the full shard state in one file, replaced atomically, so that
//! the write-ahead log can be truncated.
//!
//! # Format (version 2)
//!
//! All integers are little-endian; strings are a `u32` length followed by
//! UTF-8 bytes (see [`crate::codec`]).
//!
//! ```text
//! file = magic "DB4RSNP\0" (8 bytes), u32 format version,
//!        u64 creation time (Unix milliseconds),
//!        u64 last write-ahead log sequence contained,
//!        u32 dimension (0 while no write has fixed it),
//!        string model fingerprint, string index factory, string metric,
//!        u8 trained (1 when the index had been trained; absent in version 1),
//!        u64 item count,
//!        item count x (u32 item length, item (see `StoredItem::encode`)),
//!        u32 CRC-32 (IEEE) of every byte before it
//! ```
//!
//! The FAISS index itself is not stored: opening a shard rebuilds it from the
//! stored vectors, training it again when it was trained before.
//!
//! # Atomic replacement
//!
//! [`write_snapshot`] writes `snapshot.bin.tmp`, syncs it, renames it over
//! `snapshot.bin` and syncs the directory. A crash at any point leaves either
//! the old snapshot or the new one, never a mix. The next open deletes a
//! leftover temporary file.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::codec::{self, Decoder};
use crate::error::{DecodeError, SnapshotError};
use crate::fs_util;
use crate::item::StoredItem;

/// Name of the snapshot file inside the data directory.
pub const SNAPSHOT_FILE_NAME: &str = "snapshot.bin";
/// Format version written into new snapshots.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;
/// Oldest format version this build reads.
const OLDEST_READABLE_VERSION: u32 = 1;

const TEMP_FILE_NAME: &str = "snapshot.bin.tmp";
const MAGIC: &[u8; 8] = b"DB4RSNP\0";

/// Everything in a snapshot besides the items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
    /// Sequence of the last write-ahead log record the snapshot contains;
    /// 0 when it contains none.
    pub last_sequence: u64,
    /// Vector dimension; `None` while no write has fixed it.
    pub dimension: Option<u32>,
    /// Model fingerprint the shard is fenced to; empty when unfenced.
    pub model_fingerprint: String,
    /// FAISS factory string the shard used when the snapshot was taken.
    pub index_factory: String,
    /// Metric name the shard used when the snapshot was taken.
    pub metric: String,
    /// Whether the index had been trained, so that a reopened shard trains
    /// it again even below the training threshold.
    pub trained: bool,
    /// Number of items.
    pub items: u64,
}

/// Writes a snapshot of `items` into `dir`, replacing the previous one
/// atomically. `meta.items` is ignored and the iterator length is written
/// instead. Returns the size of the new file in bytes.
pub fn write_snapshot<'a, I>(
    dir: &Path,
    meta: &SnapshotMeta,
    items: I,
) -> Result<u64, SnapshotError>
where
    I: ExactSizeIterator<Item = &'a StoredItem>,
{
    let temp_path = dir.join(TEMP_FILE_NAME);
    let final_path = dir.join(SNAPSHOT_FILE_NAME);
    let io_error = |operation: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| SnapshotError::Io {
            operation,
            path,
            source,
        }
    };

    let file = File::create(&temp_path).map_err(io_error("create", &temp_path))?;
    let mut writer = ChecksumWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
    };
    let dimension = meta.dimension.unwrap_or(0);

    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    codec::put_u32(&mut header, SNAPSHOT_FORMAT_VERSION);
    codec::put_u64(&mut header, meta.created_unix_ms);
    codec::put_u64(&mut header, meta.last_sequence);
    codec::put_u32(&mut header, dimension);
    codec::put_str(&mut header, &meta.model_fingerprint);
    codec::put_str(&mut header, &meta.index_factory);
    codec::put_str(&mut header, &meta.metric);
    header.push(u8::from(meta.trained));
    codec::put_u64(&mut header, items.len() as u64);
    writer
        .write_all(&header)
        .map_err(io_error("write", &temp_path))?;

    let mut buffer = Vec::new();
    for item in items {
        debug_assert_eq!(item.vector.len(), dimension as usize);
        buffer.clear();
        codec::put_u32(&mut buffer, 0);
        item.encode(&mut buffer);
        let item_len = (buffer.len() - 4) as u32;
        buffer[..4].copy_from_slice(&item_len.to_le_bytes());
        writer
            .write_all(&buffer)
            .map_err(io_error("write", &temp_path))?;
    }

    let checksum = writer.hasher.clone().finalize();
    let mut inner = writer.inner;
    inner
        .write_all(&checksum.to_le_bytes())
        .map_err(io_error("write", &temp_path))?;
    let file = inner
        .into_inner()
        .map_err(|error| io_error("write", &temp_path)(error.into_error()))?;
    file.sync_all().map_err(io_error("sync", &temp_path))?;
    let bytes = file
        .metadata()
        .map_err(io_error("inspect", &temp_path))?
        .len();
    drop(file);

    fs::rename(&temp_path, &final_path).map_err(io_error("rename into place", &final_path))?;
    fs_util::sync_directory(dir).map_err(io_error("sync the directory of", &final_path))?;
    Ok(bytes)
}

/// Reads the snapshot at `path`, passing each item to `on_item`. Returns
/// `None` when no snapshot exists.
///
/// The checksum covers the whole file and is checked after the last item, so
/// on an error the caller must discard the items it received.
pub fn read_snapshot<F>(path: &Path, mut on_item: F) -> Result<Option<SnapshotMeta>, SnapshotError>
where
    F: FnMut(StoredItem),
{
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SnapshotError::Io {
                operation: "open",
                path: path.to_owned(),
                source,
            })
        }
    };
    let file_len = file
        .metadata()
        .map_err(|source| SnapshotError::Io {
            operation: "inspect",
            path: path.to_owned(),
            source,
        })?
        .len();
    let mut reader = SnapshotReader {
        path: path.to_owned(),
        inner: BufReader::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
        position: 0,
        file_len,
    };

    let magic = reader.read_vec(MAGIC.len())?;
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_owned(),
        });
    }
    let version = reader.read_u32()?;
    if !(OLDEST_READABLE_VERSION..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: SNAPSHOT_FORMAT_VERSION,
        });
    }
    let created_unix_ms = reader.read_u64()?;
    let last_sequence = reader.read_u64()?;
    let dimension = reader.read_u32()?;
    let model_fingerprint = reader.read_string()?;
    let index_factory = reader.read_string()?;
    let metric = reader.read_string()?;
    let trained = if version >= 2 {
        reader.read_vec(1)?[0] != 0
    } else {
        false
    };
    let items = reader.read_u64()?;

    for _ in 0..items {
        let item_len = reader.read_u32()? as usize;
        let bytes = reader.read_vec(item_len)?;
        let mut decoder = Decoder::new(&bytes);
        let item = StoredItem::decode(&mut decoder, dimension)
            .and_then(|item| decoder.finish().map(|()| item))
            .map_err(|source| reader.decode_error(source))?;
        on_item(item);
    }

    let computed = reader.hasher.clone().finalize();
    let stored = reader.read_u32()?;
    if stored != computed {
        return Err(SnapshotError::Checksum {
            path: path.to_owned(),
            stored,
            computed,
        });
    }
    if reader.position != file_len {
        return Err(reader.decode_error(DecodeError::TrailingBytes {
            extra: (file_len - reader.position) as usize,
        }));
    }

    Ok(Some(SnapshotMeta {
        created_unix_ms,
        last_sequence,
        dimension: (dimension != 0).then_some(dimension),
        model_fingerprint,
        index_factory,
        metric,
        trained,
        items,
    }))
}

/// Deletes a temporary file left by a snapshot that did not finish.
pub(crate) fn remove_stale_temp_file(dir: &Path) -> io::Result<bool> {
    match fs::remove_file(dir.join(TEMP_FILE_NAME)) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Writer that feeds every byte written into a CRC-32 hasher.
struct ChecksumWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for ChecksumWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(data)?;
        self.hasher.update(&data[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reader that hashes what it reads and checks each length against the bytes
/// left in the file before allocating.
struct SnapshotReader {
    path: PathBuf,
    inner: BufReader<File>,
    hasher: crc32fast::Hasher,
    position: u64,
    file_len: u64,
}

impl SnapshotReader {
    fn read_vec(&mut self, length: usize) -> Result<Vec<u8>, SnapshotError> {
        let remaining = self.file_len - self.position;
        if length as u64 > remaining {
            return Err(self.decode_error(DecodeError::UnexpectedEnd {
                position: self.position as usize,
                needed: length,
                remaining: remaining as usize,
            }));
        }
        let mut bytes = vec![0u8; length];
        self.inner
            .read_exact(&mut bytes)
            .map_err(|source| SnapshotError::Io {
                operation: "read",
                path: self.path.clone(),
                source,
            })?;
        self.hasher.update(&bytes);
        self.position += length as u64;
        Ok(bytes)
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut array = [0u8; N];
        array.copy_from_slice(&self.read_vec(N)?);
        Ok(array)
    }

    fn read_u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.read_array()?))
    }

    fn read_u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.read_array()?))
    }

    fn read_string(&mut self) -> Result<String, SnapshotError> {
        let position = self.position as usize;
        let length = self.read_u32()? as usize;
        let bytes = self.read_vec(length)?;
        String::from_utf8(bytes)
            .map_err(|_| self.decode_error(DecodeError::InvalidUtf8 { position }))
    }

    fn decode_error(&self, source: DecodeError) -> SnapshotError {
        SnapshotError::Decode {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            created_unix_ms: 1_700_000_000_000,
            last_sequence: 42,
            dimension: Some(3),
            model_fingerprint: "model-a".into(),
            index_factory: "Flat".into(),
            metric: "inner_product".into(),
            trained: true,
            items: 2,
        }
    }

    fn items() -> Vec<StoredItem> {
        (0..2)
            .map(|i| StoredItem {
                id: format!("item-{i}"),
                vector: vec![i as f32, 0.5, -1.0],
                metadata: HashMap::from([("shard".into(), "0".into())]),
                image_features: vec![i as u8; 8],
            })
            .collect()
    }

    #[test]
    fn snapshot_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let items = items();
        write_snapshot(dir.path(), &meta(), items.iter()).unwrap();

        let mut loaded = Vec::new();
        let read = read_snapshot(&dir.path().join(SNAPSHOT_FILE_NAME), |item| {
            loaded.push(item)
        })
        .unwrap()
        .expect("snapshot exists");

        assert_eq!(read, meta());
        assert_eq!(loaded, items);
        assert!(!dir.path().join(TEMP_FILE_NAME).exists());
    }

    #[test]
    fn missing_snapshot_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();

        let read = read_snapshot(&dir.path().join(SNAPSHOT_FILE_NAME), |_| {}).unwrap();

        assert!(read.is_none());
    }

    #[test]
    fn flipped_byte_fails_checksum() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot(dir.path(), &meta(), items().iter()).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        // The last item's image features end 4 bytes before the checksum.
        let target = bytes.len() - 6;
        bytes[target] ^= 0xFF;
        fs::write(&path, bytes).unwrap();

        let error = read_snapshot(&path, |_| {}).unwrap_err();

        assert!(matches!(error, SnapshotError::Checksum { .. }), "{error}");
    }

    #[test]
    fn truncated_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot(dir.path(), &meta(), items().iter()).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE_NAME);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();

        let error = read_snapshot(&path, |_| {}).unwrap_err();

        assert!(matches!(error, SnapshotError::Decode { .. }), "{error}");
    }

    #[test]
    fn unknown_version_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot(dir.path(), &meta(), items().iter()).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        fs::write(&path, bytes).unwrap();

        let error = read_snapshot(&path, |_| {}).unwrap_err();

        assert!(
            matches!(error, SnapshotError::UnsupportedVersion { found: 7, .. }),
            "{error}"
        );
    }
}
