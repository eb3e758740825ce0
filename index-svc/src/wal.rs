//! Write-ahead log: every upsert or delete request becomes one record, synced
//! to disk before the request is acknowledged, and replayed on start.
//!
//! # Format (version 1)
//!
//! All integers are little-endian; strings and byte strings are a `u32`
//! length followed by the bytes (see [`crate::codec`]).
//!
//! ```text
//! file    = magic "DB4RWAL\0" (8 bytes), u32 format version, record*
//! record  = u32 payload length, u32 CRC-32 (IEEE) of the payload, payload
//! payload = u64 sequence, u8 kind, body
//! kind 1, upsert: string model fingerprint, u32 dimension, u32 item count,
//!                 items (see `StoredItem::encode`)
//! kind 2, delete: u32 id count, string ids
//! ```
//!
//! Sequence numbers grow by one per record and continue across snapshots.
//! A snapshot stores the last sequence it contains. Replay skips records up
//! to that sequence, which the log still contains when a crash came between
//! the snapshot rename and the log truncation.
//!
//! # Recovery
//!
//! A crash during an append leaves a torn final record: a short frame header,
//! a length that runs past the end of the file, or a payload whose checksum
//! fails. [`Wal::open`] logs such a record, truncates the file where it starts
//! and replays only the complete records before it. A checksum failure with
//! more records after it is not a torn write, so opening fails instead of
//! silently dropping acknowledged writes.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::codec::{self, Decoder};
use crate::error::{DecodeError, WalError};
use crate::fs_util;
use crate::item::StoredItem;

/// Name of the log file inside the data directory.
pub const WAL_FILE_NAME: &str = "wal.log";
/// Format version written into new logs.
pub const WAL_FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"DB4RWAL\0";
/// Bytes before the first record: magic and format version.
const HEADER_BYTES: u64 = 12;
/// Bytes before each payload: length and checksum.
const FRAME_HEADER_BYTES: u64 = 8;
/// Largest payload an append accepts. Requests are bounded by the gRPC
/// message limit long before this.
pub const MAX_RECORD_BYTES: usize = 1 << 30;

const KIND_UPSERT: u8 = 1;
const KIND_DELETE: u8 = 2;

/// One logged write request.
#[derive(Debug, Clone, PartialEq)]
pub enum WalRecord {
    /// Items inserted or replaced.
    Upsert {
        /// Position of the record in the shard's history.
        sequence: u64,
        /// Model fingerprint sent with the request; may be empty.
        model_fingerprint: String,
        /// Length of every vector in `items`.
        dimension: u32,
        /// Items in request order.
        items: Vec<StoredItem>,
    },
    /// Ids removed; each one was stored when the record was written.
    Delete {
        /// Position of the record in the shard's history.
        sequence: u64,
        /// Removed ids.
        ids: Vec<String>,
    },
}

impl WalRecord {
    /// Position of the record in the shard's history.
    pub fn sequence(&self) -> u64 {
        match self {
            WalRecord::Upsert { sequence, .. } | WalRecord::Delete { sequence, .. } => *sequence,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        match self {
            WalRecord::Upsert {
                sequence,
                model_fingerprint,
                dimension,
                items,
            } => {
                codec::put_u64(&mut payload, *sequence);
                codec::put_u8(&mut payload, KIND_UPSERT);
                codec::put_str(&mut payload, model_fingerprint);
                codec::put_u32(&mut payload, *dimension);
                codec::put_u32(&mut payload, items.len() as u32);
                for item in items {
                    item.encode(&mut payload);
                }
            }
            WalRecord::Delete { sequence, ids } => {
                codec::put_u64(&mut payload, *sequence);
                codec::put_u8(&mut payload, KIND_DELETE);
                codec::put_u32(&mut payload, ids.len() as u32);
                for id in ids {
                    codec::put_str(&mut payload, id);
                }
            }
        }
        payload
    }

    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(payload);
        let sequence = decoder.u64()?;
        let record = match decoder.u8()? {
            KIND_UPSERT => {
                let model_fingerprint = decoder.string()?;
                let dimension = decoder.u32()?;
                // An item is at least an empty id, the vector, an entry count
                // and an empty feature string.
                let min_item_bytes = 12 + 4 * dimension as usize;
                let count = decoder.count("items", min_item_bytes)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(StoredItem::decode(&mut decoder, dimension)?);
                }
                WalRecord::Upsert {
                    sequence,
                    model_fingerprint,
                    dimension,
                    items,
                }
            }
            KIND_DELETE => {
                let count = decoder.count("ids", 4)?;
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    ids.push(decoder.string()?);
                }
                WalRecord::Delete { sequence, ids }
            }
            kind => return Err(DecodeError::UnknownRecordKind { kind }),
        };
        decoder.finish()?;
        Ok(record)
    }
}

/// Outcome of reading an existing log in [`Wal::open`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalRecovery {
    /// Complete records read and passed to the replay callback.
    pub records: u64,
    /// Bytes of a torn final record that were truncated away.
    pub discarded_bytes: u64,
    /// Reason those bytes were discarded, or `None` when nothing was.
    pub discard_reason: Option<String>,
}

/// An open write-ahead log, positioned for appends.
#[derive(Debug)]
pub struct Wal {
    path: PathBuf,
    file: File,
    /// Length of the valid part of the file; appends start here.
    len: u64,
    records: u64,
    fsync: bool,
    /// Set when a failed append left bytes that could not be removed.
    poisoned: bool,
}

impl Wal {
    /// Opens or creates the log at `path`, passes every complete record to
    /// `on_record` in order, and truncates a torn final record.
    ///
    /// With `fsync`, each append is synced to disk before it returns.
    pub fn open<F, E>(
        path: &Path,
        fsync: bool,
        mut on_record: F,
    ) -> Result<(Self, WalRecovery), WalError>
    where
        F: FnMut(WalRecord) -> Result<(), E>,
        E: std::fmt::Display,
    {
        let io_error = |operation: &'static str| {
            move |source: io::Error| WalError::Io {
                operation,
                path: path.to_owned(),
                source,
            }
        };

        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_error("open"))?;
        let file_len = file.metadata().map_err(io_error("inspect"))?.len();
        let mut recovery = WalRecovery::default();

        if file_len < HEADER_BYTES {
            // A file shorter than the header contains no record. It was
            // created by a process that stopped before the header was synced.
            if file_len > 0 {
                recovery.discarded_bytes = file_len;
                recovery.discard_reason =
                    Some(format!("incomplete file header of {file_len} bytes"));
            }
            write_header(&mut file).map_err(io_error("initialise"))?;
            if !existed {
                if let Some(parent) = path.parent() {
                    fs_util::sync_directory(parent).map_err(io_error("sync the directory of"))?;
                }
            }
            let wal = Self {
                path: path.to_owned(),
                file,
                len: HEADER_BYTES,
                records: 0,
                fsync,
                poisoned: false,
            };
            return Ok((wal, recovery));
        }

        read_header(&mut file, path)?;
        let valid_len = scan_records(&mut file, path, file_len, &mut recovery, &mut on_record)?;
        if valid_len < file_len {
            file.set_len(valid_len).map_err(io_error("truncate"))?;
            file.sync_all().map_err(io_error("sync"))?;
        }
        file.seek(SeekFrom::Start(valid_len))
            .map_err(io_error("seek in"))?;

        let wal = Self {
            path: path.to_owned(),
            file,
            len: valid_len,
            records: recovery.records,
            fsync,
            poisoned: false,
        };
        Ok((wal, recovery))
    }

    /// Appends `record` and, when the log was opened with `fsync`, syncs it
    /// to disk. Returns the bytes written.
    ///
    /// A failed write is rolled back. A failed sync makes the log refuse
    /// further appends until [`Wal::reset`] or a restart, because the kernel
    /// may have dropped the unsynced pages.
    pub fn append(&mut self, record: &WalRecord) -> Result<u64, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned {
                path: self.path.clone(),
            });
        }
        let payload = record.encode();
        if payload.len() > MAX_RECORD_BYTES {
            return Err(WalError::RecordTooLarge {
                bytes: payload.len(),
                limit: MAX_RECORD_BYTES,
            });
        }

        let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES as usize + payload.len());
        codec::put_u32(&mut frame, payload.len() as u32);
        codec::put_u32(&mut frame, crc32fast::hash(&payload));
        frame.extend_from_slice(&payload);

        if let Err(source) = self.file.write_all(&frame) {
            self.roll_back();
            return Err(self.io_error("append to", source));
        }
        if self.fsync {
            if let Err(source) = self.file.sync_data() {
                self.poisoned = true;
                return Err(self.io_error("sync", source));
            }
        }
        self.len += frame.len() as u64;
        self.records += 1;
        Ok(frame.len() as u64)
    }

    /// Removes every record, after a snapshot has made them redundant.
    pub fn reset(&mut self) -> Result<(), WalError> {
        self.file
            .set_len(HEADER_BYTES)
            .map_err(|source| self.io_error("truncate", source))?;
        self.file
            .seek(SeekFrom::Start(HEADER_BYTES))
            .map_err(|source| self.io_error("seek in", source))?;
        self.file
            .sync_all()
            .map_err(|source| self.io_error("sync", source))?;
        self.len = HEADER_BYTES;
        self.records = 0;
        self.poisoned = false;
        Ok(())
    }

    /// Number of records in the log.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Size of the log file in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cuts the file back to its last complete record after a failed write.
    fn roll_back(&mut self) {
        let restored = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
        if let Err(error) = restored {
            tracing::error!(path = %self.path.display(), %error, "failed to remove a partial write-ahead log record; rejecting writes until restart");
            self.poisoned = true;
        }
    }

    fn io_error(&self, operation: &'static str, source: io::Error) -> WalError {
        WalError::Io {
            operation,
            path: self.path.clone(),
            source,
        }
    }
}

fn write_header(file: &mut File) -> io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(MAGIC)?;
    file.write_all(&WAL_FORMAT_VERSION.to_le_bytes())?;
    file.sync_all()
}

fn read_header(file: &mut File, path: &Path) -> Result<(), WalError> {
    let mut header = [0u8; HEADER_BYTES as usize];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut header))
        .map_err(|source| WalError::Io {
            operation: "read",
            path: path.to_owned(),
            source,
        })?;
    if &header[..8] != MAGIC {
        return Err(WalError::BadMagic {
            path: path.to_owned(),
        });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != WAL_FORMAT_VERSION {
        return Err(WalError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: WAL_FORMAT_VERSION,
        });
    }
    Ok(())
}

/// Reads records from just after the header, passing each to `on_record`.
/// Returns the length of the valid prefix of the file; a torn final record
/// is described in `recovery` and lies beyond that length.
fn scan_records<F, E>(
    file: &mut File,
    path: &Path,
    file_len: u64,
    recovery: &mut WalRecovery,
    on_record: &mut F,
) -> Result<u64, WalError>
where
    F: FnMut(WalRecord) -> Result<(), E>,
    E: std::fmt::Display,
{
    let read_error = |source: io::Error| WalError::Io {
        operation: "read",
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::with_capacity(1 << 20, &mut *file);
    let mut offset = HEADER_BYTES;
    let mut payload = Vec::new();

    let discard = |offset: u64, reason: String, recovery: &mut WalRecovery| {
        recovery.discarded_bytes = file_len - offset;
        recovery.discard_reason = Some(reason);
        Ok(offset)
    };

    loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            return Ok(offset);
        }
        if remaining < FRAME_HEADER_BYTES {
            return discard(
                offset,
                format!("incomplete record header of {remaining} bytes"),
                recovery,
            );
        }

        let mut frame_header = [0u8; FRAME_HEADER_BYTES as usize];
        reader.read_exact(&mut frame_header).map_err(read_error)?;
        let length = u32::from_le_bytes([
            frame_header[0],
            frame_header[1],
            frame_header[2],
            frame_header[3],
        ]);
        let stored_crc = u32::from_le_bytes([
            frame_header[4],
            frame_header[5],
            frame_header[6],
            frame_header[7],
        ]);
        let record_end = offset + FRAME_HEADER_BYTES + u64::from(length);
        if record_end > file_len {
            return discard(
                offset,
                format!("record length {length} runs past the end of the file ({} payload bytes present)", remaining - FRAME_HEADER_BYTES),
                recovery,
            );
        }

        payload.resize(length as usize, 0);
        reader.read_exact(&mut payload).map_err(read_error)?;
        let computed_crc = crc32fast::hash(&payload);
        if computed_crc != stored_crc {
            let reason =
                format!("checksum {computed_crc:#010x} computed, {stored_crc:#010x} stored");
            if record_end == file_len {
                return discard(offset, reason, recovery);
            }
            return Err(WalError::Corrupt {
                path: path.to_owned(),
                offset,
                reason,
            });
        }

        let record = WalRecord::decode(&payload).map_err(|source| WalError::Decode {
            path: path.to_owned(),
            offset,
            source,
        })?;
        let sequence = record.sequence();
        on_record(record).map_err(|error| WalError::Replay {
            path: path.to_owned(),
            offset,
            sequence,
            message: error.to_string(),
        })?;
        recovery.records += 1;
        offset = record_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn upsert(sequence: u64) -> WalRecord {
        WalRecord::Upsert {
            sequence,
            model_fingerprint: "model-a".into(),
            dimension: 2,
            items: vec![StoredItem {
                id: format!("item-{sequence}"),
                vector: vec![sequence as f32, 1.0],
                metadata: HashMap::from([("k".into(), "v".into())]),
                image_features: vec![1, 2, 3, 4],
            }],
        }
    }

    #[test]
    fn records_encode_and_decode() {
        let records = [
            upsert(1),
            WalRecord::Delete {
                sequence: 2,
                ids: vec!["a".into(), "b".into()],
            },
        ];
        for record in records {
            assert_eq!(WalRecord::decode(&record.encode()).unwrap(), record);
        }
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let mut payload = Vec::new();
        codec::put_u64(&mut payload, 1);
        codec::put_u8(&mut payload, 9);

        assert_eq!(
            WalRecord::decode(&payload).unwrap_err(),
            DecodeError::UnknownRecordKind { kind: 9 }
        );
    }

    #[test]
    fn replay_error_stops_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        {
            let (mut wal, _) = Wal::open(&path, true, |_| Ok::<(), String>(())).unwrap();
            wal.append(&upsert(1)).unwrap();
        }

        let error = Wal::open(&path, true, |_| Err("dimension 2 does not match 3")).unwrap_err();

        assert!(
            matches!(
                error,
                WalError::Replay {
                    sequence: 1,
                    offset: HEADER_BYTES,
                    ..
                }
            ),
            "{error}"
        );
    }
}
