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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::error::{IndexError, ShardError};
use crate::item::StoredItem;
use crate::settings::{Settings, MAX_DIMENSION, MAX_EF_SEARCH, MAX_NPROBE};
use crate::vector_index::QueryParams;
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
    /// False while an index that needs training waits for enough vectors;
    /// searches are exact meanwhile.
    pub trained: bool,
    /// Deleted or replaced vectors still inside the index, filtered at
    /// search time until the next rebuild.
    pub tombstones: u64,
    /// Metric name: `inner_product` or `l2`.
    pub metric: &'static str,
}

/// Query-time search parameters; 0 selects the shard's configured default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SearchParams {
    /// Inverted lists visited by an IVF index.
    pub nprobe: u32,
    /// Candidate list size of an HNSW index.
    pub ef_search: u32,
}

/// Result of [`Shard::train`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainOutcome {
    /// Vectors the index was trained on; 0 for an index that needs no
    /// training.
    pub trained_on: u64,
    /// True when the index needed no training or was trained already.
    pub already_trained: bool,
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
///
/// Dropping the shard waits for a background index build to finish, so the
/// data directory is unlocked once the drop returns.
pub struct Shard {
    inner: Arc<ShardInner>,
    /// Thread running a background index build; joined before the next one
    /// starts and on drop.
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// Shard contents shared with the background index build.
struct ShardInner {
    settings: Settings,
    state: RwLock<ShardState>,
    writer: Mutex<Writer>,
    /// Copy of the log record count, readable without the writer mutex.
    wal_records: AtomicU64,
    last_snapshot_unix_ms: AtomicU64,
    /// True while an index build (background or `Train`) runs.
    building: AtomicBool,
    /// Set when a background build failed, so that writes do not start the
    /// same failing build again; `Train` and restarts clear it.
    background_failed: AtomicBool,
    /// Held open for its lock on the data directory.
    _lock_file: File,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Shard")
            .field("shard_id", &self.inner.settings.shard_id)
            .field("data_dir", &self.inner.settings.data_dir)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// Opens the shard in `settings.data_dir`: loads the snapshot, replays
    /// the write-ahead log, and builds the FAISS index from the stored
    /// vectors. Creates the directory when missing.
    pub fn open(settings: Settings) -> Result<(Self, RecoveryReport), ShardError> {
        settings.validate()?;
        crate::vector_index::set_openmp_threads(settings.openmp_threads);
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
                state.install_empty_index(&settings, configured)?;
            }
        }
        let trained_before = snapshot_meta.as_ref().is_some_and(|meta| meta.trained);
        state.rebuild_index(&settings, trained_before)?;
        report.items = state.items.len() as u64;

        let inner = ShardInner {
            wal_records: AtomicU64::new(wal.records()),
            last_snapshot_unix_ms: AtomicU64::new(report.snapshot_unix_ms),
            writer: Mutex::new(Writer {
                wal,
                next_sequence: last_sequence + 1,
            }),
            state: RwLock::new(state),
            settings,
            building: AtomicBool::new(false),
            background_failed: AtomicBool::new(false),
            _lock_file: lock_file,
        };
        let shard = Self {
            inner: Arc::new(inner),
            worker: Mutex::new(None),
        };
        tracing::info!(
            shard_id = shard.inner.settings.shard_id,
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
        &self.inner.settings
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
        validate::check_upsert_items(&items, &self.inner.settings)?;

        let mut writer = self.inner.writer.lock();
        let (dimension, new_index, replaced) = {
            let state = self.inner.state.read();
            validate::check_fingerprint(&state.model_fingerprint, &model_fingerprint)?;
            let dimension = match state.dimension.or(self.inner.settings.dimension) {
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
            let new_index = state.index.is_none() && state.index_failure.is_none();
            if new_index {
                crate::vector_index::VectorIndex::new(
                    &self.inner.settings.index_factory,
                    dimension,
                    self.inner.settings.metric,
                )?;
            }
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
            let mut state = self.inner.state.write();
            let installed = if new_index {
                state.install_empty_index(&self.inner.settings, dimension)
            } else {
                Ok(())
            };
            match installed {
                Ok(()) => self.apply(&mut state, record),
                Err(error) => {
                    // The record is logged, so the items are applied; a later
                    // write or a restart builds the index.
                    let reason = error.to_string();
                    state.index_failure = Some(reason.clone());
                    state
                        .apply_record(record)
                        .and(Err(ShardError::IndexUnavailable { reason }))
                }
            }
        };
        self.snapshot_if_due(&mut writer);
        drop(writer);
        self.maybe_start_build();
        applied?;
        Ok(UpsertOutcome { upserted, replaced })
    }

    /// Removes the stored items among `ids` and reports the others.
    pub fn delete(&self, ids: Vec<String>) -> Result<DeleteOutcome, ShardError> {
        if ids.is_empty() {
            return Ok(DeleteOutcome::default());
        }
        validate::check_count("ids", ids.len(), self.inner.settings.max_batch_items)?;
        validate::check_ids("ids", ids.iter().map(String::as_str))?;

        let mut writer = self.inner.writer.lock();
        let (found, not_found): (Vec<String>, Vec<String>) = {
            let state = self.inner.state.read();
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
            let mut state = self.inner.state.write();
            self.apply(&mut state, record)
        };
        self.snapshot_if_due(&mut writer);
        drop(writer);
        self.maybe_start_build();
        applied?;
        Ok(DeleteOutcome { deleted, not_found })
    }

    /// Returns the `k` best items for each query, best first, leaving out
    /// `exclude_ids`. A shard without items returns an empty list per query.
    /// `params` sets nprobe (IVF) and efSearch (HNSW) for this search only.
    ///
    /// NOTE: over gRPC this serves 0.2x to 0.5x of faiss-cpu's QPS at equal
    /// recall (index-bench in docs/BENCHMARKS.md). The cost around the FAISS
    /// call has not been profiled.
    pub fn search(
        &self,
        queries: &[Vec<f32>],
        k: u32,
        model_fingerprint: &str,
        exclude_ids: &[String],
        params: SearchParams,
    ) -> Result<Vec<Vec<SearchHit>>, ShardError> {
        let settings = &self.inner.settings;
        if k == 0 || k > settings.max_k {
            return Err(ShardError::InvalidK {
                k,
                max_k: settings.max_k,
            });
        }
        validate::check_count("queries", queries.len(), settings.max_search_queries)?;
        validate::check_count("exclude_ids", exclude_ids.len(), settings.max_batch_items)?;
        let query_params = resolve_params(params, settings)?;

        let state = self.inner.state.read();
        validate::check_fingerprint(&state.model_fingerprint, model_fingerprint)?;
        let dimension = state.dimension.or(settings.dimension);
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

        let excluded: HashSet<&str> = exclude_ids.iter().map(String::as_str).collect();
        let excluded_stored = excluded
            .iter()
            .filter(|id| state.labels.contains_key(**id))
            .count();
        let k = k as usize;
        let indexed = usize::try_from(index.len()).unwrap_or(usize::MAX);
        // Excluded items can all rank first, so fetch that many extra. Each
        // tombstone hides one result, so fetch extra in proportion to the
        // tombstone share too, and fetch more below when that was not
        // enough.
        let wanted = k + excluded_stored;
        let tombstones = state.tombstones as usize;
        let live = indexed.saturating_sub(tombstones).max(1);
        let mut fetch = (wanted + wanted * tombstones / live + tombstones.min(wanted))
            .min(indexed)
            .max(1);

        let flat: Vec<f32> = queries.iter().flatten().copied().collect();
        loop {
            let (distances, labels) = index.search(&flat, fetch, query_params)?;
            let results: Vec<Vec<SearchHit>> = distances
                .chunks_exact(fetch)
                .zip(labels.chunks_exact(fetch))
                .map(|(distances, labels)| self.collect_hits(&state, &excluded, distances, labels, k))
                .collect();
            let short = results.iter().any(|hits| hits.len() < k);
            if !short || fetch >= indexed || tombstones == 0 {
                return Ok(results);
            }
            fetch = (fetch * 2).min(indexed);
        }
    }

    /// Turns one query's FAISS results into at most `k` hits, skipping
    /// tombstones (labels without an item) and excluded ids.
    fn collect_hits(
        &self,
        state: &ShardState,
        excluded: &HashSet<&str>,
        distances: &[f32],
        labels: &[i64],
        k: usize,
    ) -> Vec<SearchHit> {
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
    }

    /// Trains an index that needs training on every stored vector now,
    /// without waiting for the training threshold, then takes a snapshot so
    /// that a restart trains again. Writes and searches continue during the
    /// training; a background build in progress is waited for first.
    pub fn train(&self) -> Result<TrainOutcome, ShardError> {
        loop {
            self.wait_for_background_build();
            {
                let state = self.inner.state.read();
                if state.index.is_some() && !state.awaiting_training {
                    return Ok(TrainOutcome {
                        trained_on: state.trained_on,
                        already_trained: true,
                    });
                }
            }
            if self
                .inner
                .building
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break;
            }
        }
        self.inner.background_failed.store(false, Ordering::Release);
        let result = self.inner.build_and_install("Train request");
        self.inner.building.store(false, Ordering::Release);
        let trained_on = result?;
        self.snapshot()?;
        Ok(TrainOutcome {
            trained_on,
            already_trained: false,
        })
    }

    /// Waits until a background index build (training, or a rebuild that
    /// drops tombstones) has finished. Returns at once when none runs.
    pub fn wait_for_background_build(&self) {
        let handle = self.worker.lock().take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!(
                    shard_id = self.inner.settings.shard_id,
                    "background index build panicked"
                );
            }
        }
    }

    /// Starts a background build when the stored vectors reached the
    /// training threshold or tombstones reached their rebuild fraction.
    fn maybe_start_build(&self) {
        if self.inner.background_failed.load(Ordering::Acquire) {
            return;
        }
        let reason = {
            let state = self.inner.state.read();
            if state.training_due() {
                "training threshold reached"
            } else if state.tombstone_rebuild_due(self.inner.settings.tombstone_rebuild_fraction) {
                "tombstone rebuild fraction reached"
            } else {
                return;
            }
        };
        if self
            .inner
            .building
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let mut worker = self.worker.lock();
        if let Some(finished) = worker.take() {
            // `building` was false, so that thread has finished its work.
            let _ = finished.join();
        }
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name(format!("index-build-{}", self.inner.settings.shard_id))
            .spawn(move || {
                if let Err(error) = inner.build_and_install(reason) {
                    inner.background_failed.store(true, Ordering::Release);
                    tracing::error!(
                        shard_id = inner.settings.shard_id,
                        reason,
                        %error,
                        "background index build failed; the current index keeps serving, and a Train request or a restart retries"
                    );
                }
                inner.building.store(false, Ordering::Release);
            });
        match spawned {
            Ok(handle) => *worker = Some(handle),
            Err(error) => {
                self.inner.building.store(false, Ordering::Release);
                tracing::error!(shard_id = self.inner.settings.shard_id, %error, "failed to start the background index build thread");
            }
        }
    }

    /// Returns the stored items with the given ids, in request order. Fails
    /// with [`ShardError::NotFound`] naming every missing id.
    pub fn get(&self, ids: &[String]) -> Result<Vec<StoredItem>, ShardError> {
        validate::check_count("ids", ids.len(), self.inner.settings.max_batch_items)?;
        if let Some(position) = ids.iter().position(String::is_empty) {
            return Err(ShardError::EmptyId {
                field: "ids",
                position,
            });
        }

        let state = self.inner.state.read();
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
        let state = self.inner.state.read();
        let count = state.items.len() as u64;
        let dimension = state.dimension.or(self.inner.settings.dimension).unwrap_or(0);
        // The service keeps one f32 copy of each vector for snapshots and
        // Get, and a flat index keeps another. Compressed indexes keep less,
        // so for them this overestimates.
        let vector_bytes = 2 * 4 * u64::from(dimension);
        ShardStats {
            vector_count: count,
            dimension,
            index_type: self.inner.settings.index_factory.clone(),
            model_fingerprint: state.model_fingerprint.clone(),
            shard_id: self.inner.settings.shard_id,
            memory_bytes: count * (vector_bytes + ITEM_OVERHEAD_BYTES) + state.payload_bytes,
            last_snapshot_unix_ms: self.inner.last_snapshot_unix_ms.load(Ordering::Relaxed),
            wal_records: self.inner.wal_records.load(Ordering::Relaxed),
            trained: state.index.is_some() && !state.awaiting_training,
            tombstones: state.tombstones,
            metric: self.inner.settings.metric.as_str(),
        }
    }

    /// Writes a snapshot of every item and truncates the write-ahead log.
    pub fn snapshot(&self) -> Result<SnapshotSummary, ShardError> {
        let mut writer = self.inner.writer.lock();
        self.snapshot_locked(&mut writer)
    }

    /// Takes a snapshot when the write-ahead log contains records, as on a clean
    /// stop. Returns `None` when the log is empty.
    pub fn checkpoint(&self) -> Result<Option<SnapshotSummary>, ShardError> {
        let mut writer = self.inner.writer.lock();
        if writer.wal.records() == 0 {
            return Ok(None);
        }
        self.snapshot_locked(&mut writer).map(Some)
    }

    fn append(&self, writer: &mut Writer, record: &WalRecord) -> Result<(), ShardError> {
        writer.wal.append(record)?;
        writer.next_sequence += 1;
        self.inner.wal_records
            .store(writer.wal.records(), Ordering::Relaxed);
        Ok(())
    }

    fn apply(&self, state: &mut ShardState, record: WalRecord) -> Result<(), ShardError> {
        let changes = state.apply_record(record)?;
        state.update_index(&changes, &self.inner.settings)
    }

    fn score(&self, distance: f32) -> f32 {
        match self.inner.settings.metric {
            crate::settings::Metric::InnerProduct => distance,
            crate::settings::Metric::L2 => -distance,
        }
    }

    /// Takes a snapshot when the log has reached `snapshot_every` records or
    /// `snapshot_wal_bytes` bytes. A failure is logged, not returned,
    /// because the write that triggered it is already durable in the log.
    fn snapshot_if_due(&self, writer: &mut Writer) {
        let due = writer.wal.records() >= self.inner.settings.snapshot_every
            || writer.wal.len_bytes() >= self.inner.settings.snapshot_wal_bytes;
        if !due {
            return;
        }
        if let Err(error) = self.snapshot_locked(writer) {
            tracing::error!(
                shard_id = self.inner.settings.shard_id,
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
            let state = self.inner.state.read();
            let meta = SnapshotMeta {
                created_unix_ms,
                last_sequence: writer.next_sequence - 1,
                dimension: state.dimension,
                model_fingerprint: state.model_fingerprint.clone(),
                index_factory: self.inner.settings.index_factory.clone(),
                metric: self.inner.settings.metric.as_str().to_owned(),
                trained: !state.awaiting_training && state.trained_on > 0,
                items: state.items.len() as u64,
            };
            let bytes =
                snapshot::write_snapshot(&self.inner.settings.data_dir, &meta, state.items.values())?;
            (meta.items, bytes)
        };
        // The snapshot is durable, so the records it contains can go. Should
        // the truncation fail, replay skips them by sequence number.
        writer.wal.reset()?;
        self.inner.wal_records.store(0, Ordering::Relaxed);
        self.inner.last_snapshot_unix_ms
            .store(created_unix_ms, Ordering::Relaxed);
        tracing::info!(
            shard_id = self.inner.settings.shard_id,
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

impl ShardInner {
    /// Builds the configured index from a copy of the stored vectors without
    /// holding a lock, then installs it, catching up with the writes applied
    /// meanwhile. Returns the number of training vectors. The caller has set
    /// `building`.
    fn build_and_install(&self, reason: &'static str) -> Result<u64, ShardError> {
        let started = Instant::now();
        let input = {
            let state = self.state.read();
            let Some(dimension) = state.dimension else {
                return Err(IndexError::TooFewTrainingVectors {
                    factory: self.settings.index_factory.clone(),
                    given: 0,
                    minimum: 1,
                }
                .into());
            };
            let configured = crate::vector_index::VectorIndex::new(
                &self.settings.index_factory,
                dimension,
                self.settings.metric,
            )?;
            let stored = state.items.len() as u64;
            if !configured.is_trained() && stored < configured.min_training_vectors() {
                return Err(IndexError::TooFewTrainingVectors {
                    factory: self.settings.index_factory.clone(),
                    given: stored,
                    minimum: configured.min_training_vectors(),
                }
                .into());
            }
            state.build_input()
        };
        let vectors = input.len();
        tracing::info!(shard_id = self.settings.shard_id, reason, vectors, "building the vector index");
        let built = input.build(&self.settings)?;
        let trained_on = built.trained_on();
        self.state.write().install(built)?;
        tracing::info!(
            shard_id = self.settings.shard_id,
            reason,
            vectors,
            trained_on,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built the vector index"
        );
        Ok(trained_on)
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.wait_for_background_build();
    }
}

/// Replaces zero query parameters with the configured defaults and checks
/// the others.
fn resolve_params(params: SearchParams, settings: &Settings) -> Result<QueryParams, ShardError> {
    if params.nprobe > MAX_NPROBE {
        return Err(ShardError::InvalidSearchParam {
            field: "params.nprobe",
            value: params.nprobe,
            max: MAX_NPROBE,
        });
    }
    if params.ef_search > MAX_EF_SEARCH {
        return Err(ShardError::InvalidSearchParam {
            field: "params.ef_search",
            value: params.ef_search,
            max: MAX_EF_SEARCH,
        });
    }
    let pick = |requested: u32, default: u32| if requested == 0 { default } else { requested };
    Ok(QueryParams {
        nprobe: pick(params.nprobe, settings.nprobe) as usize,
        ef_search: pick(params.ef_search, settings.ef_search) as usize,
    })
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
