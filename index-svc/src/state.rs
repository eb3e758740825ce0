//! In-memory shard contents: the items, the id-to-label map, and the FAISS
//! index built from them.

use std::collections::HashMap;

use crate::error::{IndexError, ShardError};
use crate::item::StoredItem;
use crate::settings::Metric;
use crate::vector_index::VectorIndex;
use crate::wal::WalRecord;

/// Vectors added to a fresh index per FAISS call during a rebuild, which
/// bounds the temporary copy of the vectors.
const REBUILD_CHUNK_VECTORS: usize = 65_536;

/// Items and index of one shard.
///
/// Every item gets a fresh 64-bit label when it is stored; the FAISS index
/// stores vectors under labels, and `labels` maps catalog ids to them. Labels
/// live only in memory, because the index is rebuilt from the stored vectors
/// on every start.
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
    /// `None` until the dimension is known, or after an index update failed
    /// and the rebuild failed too.
    pub(crate) index: Option<VectorIndex>,
    /// Reason `index` is missing after a failure.
    pub(crate) index_failure: Option<String>,
}

/// Labels a write removed from and added to the index.
#[derive(Debug, Default)]
pub(crate) struct LabelChanges {
    removed: Vec<u64>,
    added: Vec<u64>,
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

    /// Applies `changes`, made by [`ShardState::apply_record`], to the index.
    ///
    /// When FAISS fails, the index is rebuilt from the items. When the
    /// rebuild fails as well, searches fail with
    /// [`ShardError::IndexUnavailable`] until a later write rebuilds it.
    pub(crate) fn update_index(
        &mut self,
        changes: &LabelChanges,
        factory: &str,
        metric: Metric,
    ) -> Result<(), ShardError> {
        let result = match self.index.as_mut() {
            Some(index) => apply_changes(index, changes, &self.items),
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
        match self.rebuild_index(factory, metric) {
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

    /// Replaces the index with a new one holding every stored vector.
    /// Does nothing while the dimension is unknown.
    pub(crate) fn rebuild_index(
        &mut self,
        factory: &str,
        metric: Metric,
    ) -> Result<(), IndexError> {
        let Some(dimension) = self.dimension else {
            return Ok(());
        };
        self.index = None;
        let mut index = VectorIndex::new(factory, dimension, metric)?;
        let mut vectors =
            Vec::with_capacity(REBUILD_CHUNK_VECTORS.min(self.items.len()) * dimension as usize);
        let mut labels = Vec::with_capacity(REBUILD_CHUNK_VECTORS.min(self.items.len()));
        for (label, item) in &self.items {
            vectors.extend_from_slice(&item.vector);
            labels.push(*label);
            if labels.len() == REBUILD_CHUNK_VECTORS {
                index.add(&vectors, &labels)?;
                vectors.clear();
                labels.clear();
            }
        }
        if !labels.is_empty() {
            index.add(&vectors, &labels)?;
        }
        self.index = Some(index);
        self.index_failure = None;
        Ok(())
    }
}

fn apply_changes(
    index: &mut VectorIndex,
    changes: &LabelChanges,
    items: &HashMap<u64, StoredItem>,
) -> Result<(), IndexError> {
    if !changes.removed.is_empty() {
        index.remove(&changes.removed)?;
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
    if !labels.is_empty() {
        index.add(&vectors, &labels)?;
    }
    Ok(())
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

        state.rebuild_index("Flat", Metric::InnerProduct).unwrap();

        let index = state.index.as_ref().unwrap();
        assert_eq!(index.len(), 2);
        let (_, labels) = index.search(&[0.0, 1.0], 1).unwrap();
        assert_eq!(labels, vec![state.labels["b"] as i64]);
    }
}
