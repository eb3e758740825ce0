//! One durable shard. Validated writes go to the write-ahead log, then to
//! memory and the FAISS index. Snapshots bound the log, and searches run in
//! parallel under a shared lock.
//!
//! # Locking
//!
//! Writers (upsert, delete, snapshot) take the `writer` mutex for their
//! whole run, so one writer runs at a time. A writer checks the request
//! against the state under the shared state lock, appends and syncs the log
//! record while searches continue, then takes the exclusive state lock only
//! to apply the record. Because no other writer runs in between, what it
//! checked remains true when it applies.
//!
//! Every method blocks (FAISS work, file syncs); async callers run them on
//! a blocking thread.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::error::ShardError;
use crate::item::StoredItem;
use crate::settings::{Settings, MAX_DIMENSION};
use crate::snapshot::{self, SnapshotMeta, SNAPSHOT_FILE_NAME};
use crate::state::ShardState;
use crate::validate;
use crate::wal::{Wal, WalRecord, WAL_FILE_NAME};

/// Name of the lock file that keeps a second process off the data directory.
const LOCK_FILE_NAME: &str = "LOCK";

/// Heap bytes per item besides vectors, ids, metadata and features: hash map
/// entries, the FAISS id map slot and struct headers. A rough estimate.
const ITEM_OVERHEAD_BYTES: u64 = 128;

/// Result of an upsert.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpsertOutcome {
    /// Items written, inserted or replaced.
    pub upserted: usize,
    /// Items that replaced an item with the same id.
    pub replaced: usize,
}

/// Result of a delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Ids that were stored and are now removed.
    pub deleted: usize,
    /// Ids that were not stored, in request order.
    pub not_found: Vec<String>,
}

/// One ranked search result.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    /// Catalog id.
    pub id: String,
    /// Higher is closer: the inner product, or the negated squared L2
    /// distance.
    pub score: f32,
    /// Metadata stored with the item.
    pub metadata: HashMap<String, String>,
}

/// Shard statistics, as returned by `Stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStats {
    /// Number of stored items.
    pub vector_count: u64,
    /// Vector dimension; 0 while unknown.
    pub dimension: u32,
    /// FAISS factory string of the index.
    pub index_type: String,
    /// Fingerprint the shard is fenced to; empty when unfenced.
    pub model_fingerprint: String,
    /// Shard number within the cluster.
    pub shard_id: u32,
    /// Estimated memory held by vectors, ids, metadata and features.
    pub memory_bytes: u64,
    /// Unix time of the last snapshot in milliseconds; 0 when none exists.
    pub last_snapshot_unix_ms: u64,
    /// Records in the write-ahead log.
    pub wal_records: u64,
}

/// Counts of the data [`Shard::open`] recovered from the data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Items loaded from the snapshot.
    pub snapshot_items: u64,
    /// Creation time of the snapshot, Unix milliseconds; 0 when none exists.
    pub snapshot_unix_ms: u64,
    /// Log records applied on top of the snapshot.
    pub wal_records_replayed: u64,
    /// Log records skipped because the snapshot already contained them.
    pub wal_records_skipped: u64,
    /// Bytes of a torn final log record that were discarded.
    pub wal_discarded_bytes: u64,
    /// Items stored after recovery.
    pub items: u64,
}

/// Result of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Items written.
    pub items: u64,
    /// Size of the snapshot file.
    pub bytes: u64,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
}

/// State that only the running writer touches.
struct Writer {
    wal: Wal,
    /// Sequence number of the next log record.
    next_sequence: u64,
}

/// One shard of the catalog, durable in its data directory.
pub struct Shard {
    settings: Settings,
    state: RwLock<ShardState>,
    writer: Mutex<Writer>,
    /// Copy of the log record count, readable without the writer mutex.
    wal_records: AtomicU64,
    last_snapshot_unix_ms: AtomicU64,
    /// Held open for its lock on the data directory.
    _lock_file: File,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Shard")
            .field("shard_id", &self.settings.shard_id)
            .field("data_dir", &self.settings.data_dir)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// Opens the shard in `settings.data_dir`: loads the snapshot, replays
    /// the write-ahead log, and builds the FAISS index from the stored
    /// vectors. Creates the directory when missing.
    pub fn open(settings: Settings) -> Result<(Self, RecoveryReport), ShardError> {
        settings.validate()?;
        let data_dir = settings.data_dir.clone();
        let started = Instant::now();
        tracing::info!(shard_id = settings.shard_id, data_dir = %data_dir.display(), "opening shard");

        fs::create_dir_all(&data_dir).map_err(|source| io_error("create", &data_dir, source))?;
        let lock_file = lock_data_dir(&data_dir)?;
        if snapshot::remove_stale_temp_file(&data_dir)
            .map_err(|source| io_error("remove the temporary snapshot in", &data_dir, source))?
        {
            tracing::warn!(data_dir = %data_dir.display(), "removed a temporary snapshot left by an interrupted snapshot");
        }

        let mut state = ShardState::default();
        let mut report = RecoveryReport::default();
        let snapshot_meta = load_snapshot(&data_dir, &mut state)?;
        let mut last_sequence = 0;
        if let Some(meta) = &snapshot_meta {
            report.snapshot_items = meta.items;
            report.snapshot_unix_ms = meta.created_unix_ms;
            last_sequence = meta.last_sequence;
            log_setting_changes(meta, &settings);
        }

        let snapshot_sequence = last_sequence;
        let wal_path = data_dir.join(WAL_FILE_NAME);
        let (wal, wal_recovery) = Wal::open(&wal_path, settings.fsync, |record| {
            let sequence = record.sequence();
            if sequence <= snapshot_sequence {
                report.wal_records_skipped += 1;
                return Ok(());
            }
            if sequence != last_sequence + 1 {
                return Err(format!(
                    "sequence {sequence} follows {last_sequence}, so records are missing; the log and the snapshot come from different histories"
                ));
            }
            state
                .apply_record(record)
                .map_err(|error| error.to_string())?;
            last_sequence = sequence;
            report.wal_records_replayed += 1;
            Ok(())
        })?;
        if let Some(reason) = &wal_recovery.discard_reason {
            tracing::warn!(
                path = %wal_path.display(),
                discarded_bytes = wal_recovery.discarded_bytes,
                reason = %reason,
                "discarded a torn final write-ahead log record; it was never acknowledged"
            );
        }
        report.wal_discarded_bytes = wal_recovery.discarded_bytes;

        if let (Some(configured), Some(stored)) = (settings.dimension, state.dimension) {
            if configured != stored {
                return Err(ShardError::DimensionConflict {
                    configured,
                    stored,
                    data_dir,
                });
            }
        }
        if state.dimension.is_none() {
            if let Some(configured) = settings.dimension {
                state.index = Some(crate::vector_index::VectorIndex::new(
                    &settings.index_factory,
                    configured,
                    settings.metric,
                )?);
            }
        }
        state.rebuild_index(&settings.index_factory, settings.metric)?;
        report.items = state.items.len() as u64;

        let shard = Self {
            wal_records: AtomicU64::new(wal.records()),
            last_snapshot_unix_ms: AtomicU64::new(report.snapshot_unix_ms),
            writer: Mutex::new(Writer {
                wal,
                next_sequence: last_sequence + 1,
            }),
            state: RwLock::new(state),
            settings,
            _lock_file: lock_file,
        };
        tracing::info!(
            shard_id = shard.settings.shard_id,
            items = report.items,
            snapshot_items = report.snapshot_items,
            wal_records_replayed = report.wal_records_replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard opened"
        );
        Ok((shard, report))
    }

    /// Settings the shard was opened with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Inserts `items`, replacing stored items with the same ids. The write
    /// is in the log, synced when `fsync` is set, before this returns.
    ///
    /// The first upsert fixes the dimension when the settings leave it unset,
    /// and the first non-empty `model_fingerprint` fences the shard to that
    /// model.
    pub fn upsert(
        &self,
        items: Vec<StoredItem>,
        model_fingerprint: String,
    ) -> Result<UpsertOutcome, ShardError> {
        if items.is_empty() {
            return Ok(UpsertOutcome::default());
        }
        validate::check_upsert_items(&items, &self.settings)?;

        let mut writer = self.writer.lock();
        let (dimension, new_index, replaced) = {
            let state = self.state.read();
            validate::check_fingerprint(&state.model_fingerprint, &model_fingerprint)?;
            let dimension = match state.dimension.or(self.settings.dimension) {
                Some(dimension) => dimension,
                None => first_dimension(&items[0])?,
            };
            for item in &items {
                validate::check_vector(
                    || format!("vector of item {:?}", item.id),
                    &item.vector,
                    dimension,
                )?;
            }
            // The first write of a shard without a configured dimension
            // creates the index. It is built before the log append, so a bad
            // factory string rejects the write instead of logging it.
            let new_index = if state.index.is_none() && state.index_failure.is_none() {
                Some(crate::vector_index::VectorIndex::new(
                    &self.settings.index_factory,
                    dimension,
                    self.settings.metric,
                )?)
            } else {
                None
            };
            let replaced = items
                .iter()
                .filter(|item| state.labels.contains_key(&item.id))
                .count();
            (dimension, new_index, replaced)
        };

        let upserted = items.len();
        let record = WalRecord::Upsert {
            sequence: writer.next_sequence,
            model_fingerprint,
            dimension,
            items,
        };
        self.append(&mut writer, &record)?;

        let applied = {
            let mut state = self.state.write();
            if new_index.is_some() {
                state.index = new_index;
            }
            self.apply(&mut state, record)
        };
        self.snapshot_if_due(&mut writer);
        applied?;
        Ok(UpsertOutcome { upserted, replaced })
    }

    /// Removes the stored items among `ids` and reports the others.
    pub fn delete(&self, ids: Vec<String>) -> Result<DeleteOutcome, ShardError> {
        if ids.is_empty() {
            return Ok(DeleteOutcome::default());
        }
        validate::check_count("ids", ids.len(), self.settings.max_batch_items)?;
        validate::check_ids("ids", ids.iter().map(String::as_str))?;

        let mut writer = self.writer.lock();
        let (found, not_found): (Vec<String>, Vec<String>) = {
            let state = self.state.read();
            ids.into_iter()
                .partition(|id| state.labels.contains_key(id))
        };
        if found.is_empty() {
            return Ok(DeleteOutcome {
                deleted: 0,
                not_found,
            });
        }

        let deleted = found.len();
        let record = WalRecord::Delete {
            sequence: writer.next_sequence,
            ids: found,
        };
        self.append(&mut writer, &record)?;
        let applied = {
            let mut state = self.state.write();
            self.apply(&mut state, record)
        };
        self.snapshot_if_due(&mut writer);
        applied?;
        Ok(DeleteOutcome { deleted, not_found })
    }

    /// Returns the `k` best items for each query, best first, leaving out
    /// `exclude_ids`. A shard without items returns an empty list per query.
    pub fn search(
        &self,
        queries: &[Vec<f32>],
        k: u32,
        model_fingerprint: &str,
        exclude_ids: &[String],
    ) -> Result<Vec<Vec<SearchHit>>, ShardError> {
        if k == 0 || k > self.settings.max_k {
            return Err(ShardError::InvalidK {
                k,
                max_k: self.settings.max_k,
            });
        }
        validate::check_count("queries", queries.len(), self.settings.max_search_queries)?;
        validate::check_count(
            "exclude_ids",
            exclude_ids.len(),
            self.settings.max_batch_items,
        )?;

        let state = self.state.read();
        validate::check_fingerprint(&state.model_fingerprint, model_fingerprint)?;
        let dimension = state.dimension.or(self.settings.dimension);
        for (position, query) in queries.iter().enumerate() {
            let what = || format!("query {position}");
            match dimension {
                Some(dimension) => validate::check_vector(what, query, dimension)?,
                None => validate::check_finite(what, query)?,
            }
        }
        if queries.is_empty() || state.items.is_empty() {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        let Some(index) = state.index.as_ref() else {
            let reason = state
                .index_failure
                .clone()
                .unwrap_or_else(|| "the index was not built".to_owned());
            return Err(ShardError::IndexUnavailable { reason });
        };

        // Fetch enough extra results that k remain after dropping the
        // excluded items, which can all rank first at worst.
        let excluded: HashSet<&str> = exclude_ids.iter().map(String::as_str).collect();
        let excluded_stored = excluded
            .iter()
            .filter(|id| state.labels.contains_key(**id))
            .count();
        let k = k as usize;
        let fetch = (k + excluded_stored).min(state.items.len());

        let flat: Vec<f32> = queries.iter().flatten().copied().collect();
        let (distances, labels) = index.search(&flat, fetch)?;

        let results = distances
            .chunks_exact(fetch)
            .zip(labels.chunks_exact(fetch))
            .map(|(distances, labels)| {
                let mut hits = Vec::with_capacity(k);
                for (&distance, &label) in distances.iter().zip(labels) {
                    if hits.len() == k {
                        break;
                    }
                    let Some(item) = u64::try_from(label)
                        .ok()
                        .and_then(|label| state.items.get(&label))
                    else {
                        continue;
                    };
                    if excluded.contains(item.id.as_str()) {
                        continue;
                    }
                    hits.push(SearchHit {
                        id: item.id.clone(),
                        score: self.score(distance),
                        metadata: item.metadata.clone(),
                    });
                }
                hits
            })
            .collect();
        Ok(results)
    }

    /// Returns the stored items with the given ids, in request order. Fails
    /// with [`ShardError::NotFound`] naming every missing id.
    pub fn get(&self, ids: &[String]) -> Result<Vec<StoredItem>, ShardError> {
        validate::check_count("ids", ids.len(), self.settings.max_batch_items)?;
        if let Some(position) = ids.iter().position(String::is_empty) {
            return Err(ShardError::EmptyId {
                field: "ids",
                position,
            });
        }

        let state = self.state.read();
        let mut items = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match state
                .labels
                .get(id)
                .and_then(|label| state.items.get(label))
            {
                Some(item) => items.push(item.clone()),
                None => missing.push(id.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(ShardError::NotFound { ids: missing });
        }
        Ok(items)
    }

    /// Returns counts, sizes and identity of the shard.
    pub fn stats(&self) -> ShardStats {
        let state = self.state.read();
        let count = state.items.len() as u64;
        let dimension = state.dimension.or(self.settings.dimension).unwrap_or(0);
        // The service keeps one f32 copy of each vector for snapshots and
        // Get, and a flat index keeps another. Compressed indexes keep less,
        // so for them this overestimates.
        let vector_bytes = 2 * 4 * u64::from(dimension);
        ShardStats {
            vector_count: count,
            dimension,
            index_type: self.settings.index_factory.clone(),
            model_fingerprint: state.model_fingerprint.clone(),
            shard_id: self.settings.shard_id,
            memory_bytes: count * (vector_bytes + ITEM_OVERHEAD_BYTES) + state.payload_bytes,
            last_snapshot_unix_ms: self.last_snapshot_unix_ms.load(Ordering::Relaxed),
            wal_records: self.wal_records.load(Ordering::Relaxed),
        }
    }

    /// Writes a snapshot of every item and truncates the write-ahead log.
    pub fn snapshot(&self) -> Result<SnapshotSummary, ShardError> {
        let mut writer = self.writer.lock();
        self.snapshot_locked(&mut writer)
    }

    /// Takes a snapshot when the write-ahead log contains records, as on a clean
    /// stop. Returns `None` when the log is empty.
    pub fn checkpoint(&self) -> Result<Option<SnapshotSummary>, ShardError> {
        let mut writer = self.writer.lock();
        if writer.wal.records() == 0 {
            return Ok(None);
        }
        self.snapshot_locked(&mut writer).map(Some)
    }

    fn append(&self, writer: &mut Writer, record: &WalRecord) -> Result<(), ShardError> {
        writer.wal.append(record)?;
        writer.next_sequence += 1;
        self.wal_records
            .store(writer.wal.records(), Ordering::Relaxed);
        Ok(())
    }

    fn apply(&self, state: &mut ShardState, record: WalRecord) -> Result<(), ShardError> {
        let changes = state.apply_record(record)?;
        state.update_index(&changes, &self.settings.index_factory, self.settings.metric)
    }

    fn score(&self, distance: f32) -> f32 {
        match self.settings.metric {
            crate::settings::Metric::InnerProduct => distance,
            crate::settings::Metric::L2 => -distance,
        }
    }

    /// Takes a snapshot when the log has reached `snapshot_every` records or
    /// `snapshot_wal_bytes` bytes. A failure is logged, not returned,
    /// because the write that triggered it is already durable in the log.
    fn snapshot_if_due(&self, writer: &mut Writer) {
        let due = writer.wal.records() >= self.settings.snapshot_every
            || writer.wal.len_bytes() >= self.settings.snapshot_wal_bytes;
        if !due {
            return;
        }
        if let Err(error) = self.snapshot_locked(writer) {
            tracing::error!(
                shard_id = self.settings.shard_id,
                %error,
                wal_records = writer.wal.records(),
                "failed to take a snapshot; the write-ahead log keeps growing until one succeeds"
            );
        }
    }

    fn snapshot_locked(&self, writer: &mut Writer) -> Result<SnapshotSummary, ShardError> {
        let started = Instant::now();
        let created_unix_ms = now_unix_ms();
        let (items, bytes) = {
            let state = self.state.read();
            let meta = SnapshotMeta {
                created_unix_ms,
                last_sequence: writer.next_sequence - 1,
                dimension: state.dimension,
                model_fingerprint: state.model_fingerprint.clone(),
                index_factory: self.settings.index_factory.clone(),
                metric: self.settings.metric.as_str().to_owned(),
                items: state.items.len() as u64,
            };
            let bytes =
                snapshot::write_snapshot(&self.settings.data_dir, &meta, state.items.values())?;
            (meta.items, bytes)
        };
        // The snapshot is durable, so the records it contains can go. Should
        // the truncation fail, replay skips them by sequence number.
        writer.wal.reset()?;
        self.wal_records.store(0, Ordering::Relaxed);
        self.last_snapshot_unix_ms
            .store(created_unix_ms, Ordering::Relaxed);
        tracing::info!(
            shard_id = self.settings.shard_id,
            items,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(SnapshotSummary {
            items,
            bytes,
            created_unix_ms,
        })
    }
}

fn io_error(operation: &'static str, path: &Path, source: std::io::Error) -> ShardError {
    ShardError::Io {
        operation,
        path: path.to_owned(),
        source,
    }
}

fn lock_data_dir(data_dir: &Path) -> Result<File, ShardError> {
    let path = data_dir.join(LOCK_FILE_NAME);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| io_error("open", &path, source))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(ShardError::DataDirLocked {
            data_dir: data_dir.to_owned(),
        }),
        Err(TryLockError::Error(source)) => Err(io_error("lock", &path, source)),
    }
}

fn load_snapshot(
    data_dir: &Path,
    state: &mut ShardState,
) -> Result<Option<SnapshotMeta>, ShardError> {
    let path: PathBuf = data_dir.join(SNAPSHOT_FILE_NAME);
    let mut changes = Default::default();
    let meta = snapshot::read_snapshot(&path, |item| state.insert_item(item, &mut changes))?;
    if let Some(meta) = &meta {
        state.dimension = meta.dimension;
        state.model_fingerprint = meta.model_fingerprint.clone();
    }
    Ok(meta)
}

fn log_setting_changes(meta: &SnapshotMeta, settings: &Settings) {
    if meta.index_factory != settings.index_factory || meta.metric != settings.metric.as_str() {
        tracing::info!(
            snapshot_index_factory = %meta.index_factory,
            snapshot_metric = %meta.metric,
            index_factory = %settings.index_factory,
            metric = settings.metric.as_str(),
            "index settings differ from the snapshot; the index is rebuilt with the new settings"
        );
    }
}

/// Dimension fixed by the first vector of a shard without one.
fn first_dimension(item: &StoredItem) -> Result<u32, ShardError> {
    let given = item.vector.len();
    match u32::try_from(given) {
        Ok(dimension) if (1..=MAX_DIMENSION).contains(&dimension) => Ok(dimension),
        _ => Err(ShardError::InvalidDimension {
            what: format!("vector of item {:?}", item.id),
            given,
            max: MAX_DIMENSION,
        }),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}
