//! In-memory shard contents: the items, the id-to-label map, and the FAISS
//! index built from them.

use std::collections::HashMap;

use crate::error::{IndexError, ShardError};
use crate::item::StoredItem;
use crate::settings::Settings;
use crate::vector_index::{self, VectorIndex};
use crate::wal::WalRecord;

/// Vectors added to a fresh index per FAISS call during a rebuild, which
/// bounds the temporary copy of the vectors.
const REBUILD_CHUNK_VECTORS: usize = 65_536;

/// Factory string of the exact index that serves searches while the
/// configured index waits for training.
const EXACT_FACTORY: &str = "Flat";

/// Items and index of one shard.
///
/// Every item gets a fresh 64-bit label when it is stored; the FAISS index
/// stores vectors under labels, and `labels` maps catalog ids to them. Labels
/// only grow, so a label above the largest one copied for a background
/// rebuild belongs to a later write. Labels live only in memory, because the
/// index is rebuilt from the stored vectors on every start.
#[derive(Debug, Default)]
pub(crate) struct ShardState {
    /// Dimension fixed by the first upsert; `None` while no write fixed it.
    pub(crate) dimension: Option<u32>,
    /// Fingerprint fixed by the first upsert that carried one.
    pub(crate) model_fingerprint: String,
    pub(crate) labels: HashMap<String, u64>,
    pub(crate) items: HashMap<u64, StoredItem>,
    next_label: u64,
    /// Sum of `StoredItem::payload_bytes` over all items.
    pub(crate) payload_bytes: u64,
    /// Index serving searches. `None` until the dimension is known, or after
    /// an index update failed and the rebuild failed too.
    pub(crate) index: Option<VectorIndex>,
    /// Reason `index` is missing after a failure.
    pub(crate) index_failure: Option<String>,
    /// True while `index` is an exact flat stand-in for a configured index
    /// that waits for training.
    pub(crate) awaiting_training: bool,
    /// Stored vector count at which the configured index is trained.
    pub(crate) train_threshold: u64,
    /// Vectors the configured index was trained on; 0 when it was not
    /// trained or needs no training.
    pub(crate) trained_on: u64,
    /// Labels in `index` whose item was deleted or replaced, left there
    /// because the index cannot remove vectors.
    pub(crate) tombstones: u64,
}

/// Labels a write removed from and added to the index.
#[derive(Debug, Default)]
pub(crate) struct LabelChanges {
    removed: Vec<u64>,
    added: Vec<u64>,
}

/// Copy of the stored vectors from which an index is built off the locks.
#[derive(Debug)]
pub(crate) struct BuildInput {
    dimension: u32,
    labels: Vec<u64>,
    vectors: Vec<f32>,
    /// Every label below this existed when the copy was taken.
    label_limit: u64,
}

impl BuildInput {
    /// Number of vectors copied.
    pub(crate) fn len(&self) -> u64 {
        self.labels.len() as u64
    }
}

/// An index built from a [`BuildInput`], ready for [`ShardState::install`].
#[derive(Debug)]
pub(crate) struct BuiltIndex {
    index: VectorIndex,
    labels: Vec<u64>,
    label_limit: u64,
    trained_on: u64,
}

impl BuiltIndex {
    /// Number of vectors the index was trained on; 0 when it needed no
    /// training.
    pub(crate) fn trained_on(&self) -> u64 {
        self.trained_on
    }
}

impl ShardState {
    /// Stores `item` under a new label, replacing an item with the same id,
    /// and records both labels in `changes`.
    pub(crate) fn insert_item(&mut self, item: StoredItem, changes: &mut LabelChanges) {
        if let Some(old_label) = self.labels.remove(&item.id) {
            self.remove_label(old_label);
            changes.removed.push(old_label);
        }
        let label = self.next_label;
        self.next_label += 1;
        self.payload_bytes += item.payload_bytes() as u64;
        self.labels.insert(item.id.clone(), label);
        self.items.insert(label, item);
        changes.added.push(label);
    }

    fn remove_label(&mut self, label: u64) {
        if let Some(old) = self.items.remove(&label) {
            self.payload_bytes -= old.payload_bytes() as u64;
        }
    }

    /// Applies a logged write to the items, without touching the index.
    ///
    /// Replay calls this for records read back from disk, so it checks that
    /// the record agrees with the state. A disagreement means that the data
    /// directory mixes files of different shards.
    pub(crate) fn apply_record(&mut self, record: WalRecord) -> Result<LabelChanges, ShardError> {
        let mut changes = LabelChanges::default();
        match record {
            WalRecord::Upsert {
                model_fingerprint,
                dimension,
                items,
                ..
            } => {
                if let Some(stored) = self.dimension {
                    if stored != dimension {
                        return Err(ShardError::DimensionMismatch {
                            what: "a logged upsert".to_owned(),
                            expected: stored,
                            given: dimension as usize,
                        });
                    }
                }
                crate::validate::check_fingerprint(&self.model_fingerprint, &model_fingerprint)?;
                self.dimension = Some(dimension);
                if self.model_fingerprint.is_empty() && !model_fingerprint.is_empty() {
                    self.model_fingerprint = model_fingerprint;
                }
                for item in items {
                    self.insert_item(item, &mut changes);
                }
            }
            WalRecord::Delete { ids, .. } => {
                for id in ids {
                    if let Some(label) = self.labels.remove(&id) {
                        self.remove_label(label);
                        changes.removed.push(label);
                    }
                }
            }
        }
        Ok(changes)
    }

    /// Installs a fresh serving index for `dimension`: the configured index,
    /// or an exact stand-in when the configured index needs training.
    pub(crate) fn install_empty_index(
        &mut self,
        settings: &Settings,
        dimension: u32,
    ) -> Result<(), IndexError> {
        let (index, awaiting_training, threshold) = new_serving_index(settings, dimension)?;
        self.index = Some(index);
        self.index_failure = None;
        self.awaiting_training = awaiting_training;
        self.train_threshold = threshold;
        self.trained_on = 0;
        self.tombstones = 0;
        Ok(())
    }

    /// Applies `changes`, made by [`ShardState::apply_record`], to the index.
    ///
    /// When FAISS fails, the index is rebuilt from the items. When the
    /// rebuild fails as well, searches fail with
    /// [`ShardError::IndexUnavailable`] until a later write rebuilds it.
    pub(crate) fn update_index(
        &mut self,
        changes: &LabelChanges,
        settings: &Settings,
    ) -> Result<(), ShardError> {
        let result = match self.index.as_mut() {
            Some(index) => apply_changes(index, changes, &self.items, &mut self.tombstones),
            None => Err(IndexError::Faiss {
                operation: "update",
                message: self
                    .index_failure
                    .clone()
                    .unwrap_or_else(|| "the index does not exist".to_owned()),
            }),
        };
        let Err(error) = result else {
            return Ok(());
        };

        tracing::error!(%error, "failed to update the vector index; rebuilding it from the stored items");
        let train = !self.awaiting_training;
        match self.rebuild_index(settings, train) {
            Ok(()) => Ok(()),
            Err(rebuild_error) => {
                tracing::error!(error = %rebuild_error, "failed to rebuild the vector index; searches fail until a later write rebuilds it");
                let reason = rebuild_error.to_string();
                self.index = None;
                self.index_failure = Some(reason.clone());
                Err(ShardError::IndexUnavailable { reason })
            }
        }
    }

    /// Replaces the index with a new one holding every stored vector, on the
    /// calling thread. An index that needs training is trained when `train`
    /// is set or the stored vectors reach the training threshold, provided
    /// FAISS has enough vectors. Otherwise the exact stand-in serves. Does nothing while
    /// the dimension is unknown.
    pub(crate) fn rebuild_index(&mut self, settings: &Settings, train: bool) -> Result<(), IndexError> {
        let Some(dimension) = self.dimension else {
            return Ok(());
        };
        self.index = None;
        let (probe, awaiting_training, threshold) = new_serving_index(settings, dimension)?;
        let count = self.items.len() as u64;
        if awaiting_training {
            let configured = VectorIndex::new(&settings.index_factory, dimension, settings.metric)?;
            let requested = train || count >= threshold;
            if requested && count >= configured.min_training_vectors() {
                let built = self.build_input().build(settings)?;
                self.index = Some(built.index);
                self.awaiting_training = false;
                self.train_threshold = threshold;
                self.trained_on = built.trained_on;
                self.tombstones = 0;
                self.index_failure = None;
                return Ok(());
            }
        }
        let mut index = probe;
        add_items_in_chunks(&mut index, &self.items)?;
        self.index = Some(index);
        self.awaiting_training = awaiting_training;
        self.train_threshold = threshold;
        self.trained_on = 0;
        self.tombstones = 0;
        self.index_failure = None;
        Ok(())
    }

    /// Copies the stored vectors for a build off the locks.
    pub(crate) fn build_input(&self) -> BuildInput {
        let dimension = self.dimension.unwrap_or(0);
        let mut labels = Vec::with_capacity(self.items.len());
        let mut vectors = Vec::with_capacity(self.items.len() * dimension as usize);
        for (label, item) in &self.items {
            labels.push(*label);
            vectors.extend_from_slice(&item.vector);
        }
        BuildInput {
            dimension,
            labels,
            vectors,
            label_limit: self.next_label,
        }
    }

    /// Swaps in an index built off the locks, after bringing it up to date
    /// with the writes applied since its input was copied: labels deleted
    /// meanwhile are removed (or become tombstones), labels added meanwhile
    /// are added.
    pub(crate) fn install(&mut self, built: BuiltIndex) -> Result<(), IndexError> {
        let BuiltIndex {
            mut index,
            labels,
            label_limit,
            trained_on,
        } = built;
        let removed: Vec<u64> = labels
            .into_iter()
            .filter(|label| !self.items.contains_key(label))
            .collect();
        let added: Vec<u64> = self
            .items
            .keys()
            .copied()
            .filter(|label| *label >= label_limit)
            .collect();
        let mut tombstones = 0;
        let changes = LabelChanges { removed, added };
        apply_changes(&mut index, &changes, &self.items, &mut tombstones)?;
        tracing::info!(
            factory = index.factory(),
            vectors = index.len(),
            caught_up_removed = changes.removed.len(),
            caught_up_added = changes.added.len(),
            "installed the rebuilt vector index"
        );
        self.index = Some(index);
        self.index_failure = None;
        self.awaiting_training = false;
        self.trained_on = trained_on;
        self.tombstones = tombstones;
        Ok(())
    }

    /// Returns true when the exact stand-in serves and the stored vectors
    /// have reached the training threshold.
    pub(crate) fn training_due(&self) -> bool {
        self.awaiting_training
            && self.index.is_some()
            && self.items.len() as u64 >= self.train_threshold
    }

    /// Returns true when tombstones make up at least `fraction` of the index.
    pub(crate) fn tombstone_rebuild_due(&self, fraction: f64) -> bool {
        let Some(index) = &self.index else {
            return false;
        };
        self.tombstones > 0 && self.tombstones as f64 >= fraction * index.len() as f64
    }
}

impl BuildInput {
    /// Builds the configured index from the copied vectors, training it
    /// first when it needs training. Runs without any shard lock.
    pub(crate) fn build(self, settings: &Settings) -> Result<BuiltIndex, IndexError> {
        let mut index = VectorIndex::new(&settings.index_factory, self.dimension, settings.metric)?;
        let mut trained_on = 0;
        if !index.is_trained() {
            index.train(&self.vectors)?;
            trained_on = self.len();
        }
        let chunk = REBUILD_CHUNK_VECTORS * self.dimension as usize;
        for (vectors, labels) in self
            .vectors
            .chunks(chunk.max(1))
            .zip(self.labels.chunks(REBUILD_CHUNK_VECTORS))
        {
            index.add(vectors, labels)?;
        }
        Ok(BuiltIndex {
            index,
            labels: self.labels,
            label_limit: self.label_limit,
            trained_on,
        })
    }
}

/// Builds the serving index for an empty shard: the configured index, or an
/// exact stand-in when the configured one needs training. Returns the index,
/// whether it is the stand-in, and the training threshold.
fn new_serving_index(
    settings: &Settings,
    dimension: u32,
) -> Result<(VectorIndex, bool, u64), IndexError> {
    let configured = VectorIndex::new(&settings.index_factory, dimension, settings.metric)?;
    let threshold = settings
        .train_threshold
        .unwrap_or_else(|| vector_index::default_train_threshold(&configured));
    if configured.is_trained() {
        return Ok((configured, false, threshold));
    }
    let exact = VectorIndex::new(EXACT_FACTORY, dimension, settings.metric)?;
    Ok((exact, true, threshold))
}

fn add_items_in_chunks(
    index: &mut VectorIndex,
    items: &HashMap<u64, StoredItem>,
) -> Result<(), IndexError> {
    let dimension = index.dimension() as usize;
    let mut vectors = Vec::with_capacity(REBUILD_CHUNK_VECTORS.min(items.len()) * dimension);
    let mut labels = Vec::with_capacity(REBUILD_CHUNK_VECTORS.min(items.len()));
    for (label, item) in items {
        vectors.extend_from_slice(&item.vector);
        labels.push(*label);
        if labels.len() == REBUILD_CHUNK_VECTORS {
            index.add(&vectors, &labels)?;
            vectors.clear();
            labels.clear();
        }
    }
    index.add(&vectors, &labels)
}

fn apply_changes(
    index: &mut VectorIndex,
    changes: &LabelChanges,
    items: &HashMap<u64, StoredItem>,
    tombstones: &mut u64,
) -> Result<(), IndexError> {
    if !changes.removed.is_empty() {
        if index.supports_remove() {
            index.remove(&changes.removed)?;
        } else {
            *tombstones += changes.removed.len() as u64;
        }
    }
    // A label added and removed by the same write (an id sent twice) has no
    // item any more and is skipped.
    let mut vectors = Vec::with_capacity(changes.added.len() * index.dimension() as usize);
    let mut labels = Vec::with_capacity(changes.added.len());
    for label in &changes.added {
        if let Some(item) = items.get(label) {
            vectors.extend_from_slice(&item.vector);
            labels.push(*label);
        }
    }
    index.add(&vectors, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, vector: Vec<f32>) -> StoredItem {
        StoredItem {
            id: id.into(),
            vector,
            metadata: HashMap::new(),
            image_features: vec![0; 4],
        }
    }

    fn upsert(items: Vec<StoredItem>, fingerprint: &str) -> WalRecord {
        WalRecord::Upsert {
            sequence: 1,
            model_fingerprint: fingerprint.into(),
            dimension: 2,
            items,
        }
    }

    #[test]
    fn replace_keeps_one_label_per_id() {
        let mut state = ShardState::default();
        state
            .apply_record(upsert(vec![item("a", vec![1.0, 0.0])], ""))
            .unwrap();
        let changes = state
            .apply_record(upsert(vec![item("a", vec![0.0, 1.0])], ""))
            .unwrap();

        assert_eq!(changes.removed, vec![0]);
        assert_eq!(changes.added, vec![1]);
        assert_eq!(state.items.len(), 1);
        assert_eq!(state.labels["a"], 1);
        assert_eq!(state.items[&1].vector, vec![0.0, 1.0]);
        assert_eq!(state.payload_bytes, 1 + 4);
    }

    #[test]
    fn delete_ignores_missing_ids() {
        let mut state = ShardState::default();
        state
            .apply_record(upsert(vec![item("a", vec![1.0, 0.0])], ""))
            .unwrap();

        let changes = state
            .apply_record(WalRecord::Delete {
                sequence: 2,
                ids: vec!["a".into(), "b".into()],
            })
            .unwrap();

        assert_eq!(changes.removed, vec![0]);
        assert!(state.items.is_empty());
        assert_eq!(state.payload_bytes, 0);
    }

    #[test]
    fn replay_rejects_a_conflicting_record() {
        let mut state = ShardState::default();
        state
            .apply_record(upsert(vec![item("a", vec![1.0, 0.0])], "model-a"))
            .unwrap();

        let error = state
            .apply_record(upsert(vec![item("b", vec![1.0, 0.0])], "model-b"))
            .unwrap_err();
        assert!(
            matches!(error, ShardError::FingerprintMismatch { .. }),
            "{error}"
        );

        let wrong_dimension = WalRecord::Upsert {
            sequence: 3,
            model_fingerprint: String::new(),
            dimension: 3,
            items: Vec::new(),
        };
        let error = state.apply_record(wrong_dimension).unwrap_err();
        assert!(
            matches!(
                error,
                ShardError::DimensionMismatch {
                    expected: 2,
                    given: 3,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn rebuild_indexes_every_item() {
        let mut state = ShardState::default();
        state
            .apply_record(upsert(
                vec![item("a", vec![1.0, 0.0]), item("b", vec![0.0, 1.0])],
                "",
            ))
            .unwrap();

        state.rebuild_index(&Settings::default(), false).unwrap();

        let index = state.index.as_ref().unwrap();
        assert_eq!(index.len(), 2);
        let params = crate::vector_index::QueryParams {
            nprobe: 1,
            ef_search: 16,
        };
        let (_, labels) = index.search(&[0.0, 1.0], 1, params).unwrap();
        assert_eq!(labels, vec![state.labels["b"] as i64]);
    }
}
