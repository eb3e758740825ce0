//! The FAISS index of one shard: an index built from a factory string,
//! wrapped in an `IndexIDMap` so that each vector carries a 64-bit label.

use std::ffi::CStr;

use faiss::index::NativeIndex;
use faiss::selector::IdSelector;
use faiss::{IdMap, Idx, Index, MetricType};

use crate::error::IndexError;
use crate::settings::Metric;

/// A FAISS index whose vectors are addressed by caller-chosen labels.
pub struct VectorIndex {
    index: IdMap<faiss::index::IndexImpl>,
    dimension: u32,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VectorIndex")
            .field("dimension", &self.dimension)
            .field("vectors", &self.index.ntotal())
            .finish()
    }
}

impl VectorIndex {
    /// Builds an empty index from a FAISS factory string.
    ///
    /// Fails when the factory string is invalid for `dimension`, when the
    /// index needs training (an IVF or PQ index, for example), or when it
    /// cannot add or remove vectors by label (HNSW, for example). The shard
    /// needs all three, because it rebuilds the index from stored vectors and
    /// removes replaced vectors.
    pub fn new(factory: &str, dimension: u32, metric: Metric) -> Result<Self, IndexError> {
        let metric_type = match metric {
            Metric::InnerProduct => MetricType::InnerProduct,
            Metric::L2 => MetricType::L2,
        };
        let inner = faiss::index_factory(dimension, factory, metric_type).map_err(|error| {
            IndexError::Build {
                factory: factory.to_owned(),
                dimension,
                metric: metric.as_str(),
                message: error.to_string(),
            }
        })?;
        // NOTE: indexes that need training are rejected rather than trained
        // on the first batch, because a small first batch would give a poor
        // or failing training run.
        if !inner.is_trained() {
            return Err(IndexError::Unsupported {
                factory: factory.to_owned(),
                reason: "the index needs training before vectors can be added".to_owned(),
            });
        }
        let index = IdMap::new(inner).map_err(|error| IndexError::Faiss {
            operation: "wrap the index in an IndexIDMap",
            message: error.to_string(),
        })?;
        let mut vector_index = Self { index, dimension };

        // Adding and removing nothing runs the same checks FAISS runs for a
        // real batch, so unsupported operations fail here, before any data
        // reaches the write-ahead log.
        vector_index
            .add(&[], &[])
            .map_err(|error| IndexError::Unsupported {
                factory: factory.to_owned(),
                reason: format!("adding vectors with labels failed: {error}"),
            })?;
        vector_index
            .remove(&[])
            .map_err(|error| IndexError::Unsupported {
                factory: factory.to_owned(),
                reason: format!("removing vectors failed: {error}"),
            })?;
        Ok(vector_index)
    }

    /// Vector dimension.
    pub fn dimension(&self) -> u32 {
        self.dimension
    }

    /// Number of vectors in the index.
    pub fn len(&self) -> u64 {
        self.index.ntotal()
    }

    /// Returns true when the index contains no vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `labels.len()` vectors stored back to back in `vectors`.
    pub fn add(&mut self, vectors: &[f32], labels: &[u64]) -> Result<(), IndexError> {
        debug_assert_eq!(vectors.len(), labels.len() * self.dimension as usize);
        let labels: Vec<Idx> = labels.iter().map(|&label| Idx::new(label)).collect();
        self.index
            .add_with_ids(vectors, &labels)
            .map_err(|error| IndexError::Faiss {
                operation: "add",
                message: error.to_string(),
            })
    }

    /// Removes the vectors with the given labels. Returns how many were
    /// removed.
    pub fn remove(&mut self, labels: &[u64]) -> Result<usize, IndexError> {
        let labels: Vec<Idx> = labels.iter().map(|&label| Idx::new(label)).collect();
        let selector = IdSelector::batch(&labels).map_err(|error| IndexError::Faiss {
            operation: "build an id selector",
            message: error.to_string(),
        })?;
        self.index
            .remove_ids(&selector)
            .map_err(|error| IndexError::Faiss {
                operation: "remove",
                message: error.to_string(),
            })
    }

    /// Searches the `k` nearest vectors of each query in `queries` (stored
    /// back to back). Returns `k` distances and labels per query, best first;
    /// a label of -1 fills slots beyond the number of stored vectors.
    ///
    /// Takes `&self`, so that searches run in parallel under a shared lock.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<(Vec<f32>, Vec<i64>), IndexError> {
        let dimension = self.dimension as usize;
        debug_assert_eq!(queries.len() % dimension, 0);
        let query_count = queries.len() / dimension;
        if query_count == 0 || k == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut distances = vec![0f32; query_count * k];
        let mut labels = vec![-1i64; query_count * k];

        // The `faiss` crate exposes search only through `&mut self` for an
        // index built by the factory, so the C API is called directly.
        // SAFETY: the index pointer is valid for the lifetime of `self`.
        // `queries` contains `query_count * dimension` floats, and both output
        // buffers have room for `query_count * k` entries, as faiss_Index_search
        // requires. FAISS CPU indexes allow concurrent searches as long as no
        // thread modifies the index ("Threads and asynchronous calls" page of
        // the FAISS wiki); callers hold a shared lock here and an exclusive
        // lock for add and remove.
        let code = unsafe {
            faiss_sys::faiss_Index_search(
                self.index.inner_ptr(),
                query_count as faiss_sys::idx_t,
                queries.as_ptr(),
                k as faiss_sys::idx_t,
                distances.as_mut_ptr(),
                labels.as_mut_ptr(),
            )
        };
        if code != 0 {
            return Err(IndexError::Faiss {
                operation: "search",
                message: last_faiss_error(),
            });
        }
        Ok((distances, labels))
    }
}

/// Message of the last FAISS C API error on this thread.
fn last_faiss_error() -> String {
    // SAFETY: faiss_get_last_error returns null or a pointer to a
    // NUL-terminated string kept in thread-local storage by the FAISS C API,
    // valid until the next failing call on this thread.
    unsafe {
        let message = faiss_sys::faiss_get_last_error();
        if message.is_null() {
            "no error message".to_owned()
        } else {
            CStr::from_ptr(message).to_string_lossy().into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_index_adds_searches_and_removes() {
        let mut index = VectorIndex::new("Flat", 2, Metric::InnerProduct).unwrap();
        index
            .add(&[1.0, 0.0, 0.0, 1.0, 0.6, 0.8], &[10, 20, 30])
            .unwrap();

        let (distances, labels) = index.search(&[1.0, 0.0], 2).unwrap();
        assert_eq!(labels, vec![10, 30]);
        assert_eq!(distances, vec![1.0, 0.6]);

        assert_eq!(index.remove(&[10]).unwrap(), 1);
        let (_, labels) = index.search(&[1.0, 0.0], 3).unwrap();
        assert_eq!(labels, vec![30, 20, -1]);
    }

    #[test]
    fn l2_returns_squared_distances() {
        let mut index = VectorIndex::new("Flat", 2, Metric::L2).unwrap();
        index.add(&[0.0, 0.0, 3.0, 4.0], &[1, 2]).unwrap();

        let (distances, labels) = index.search(&[0.0, 0.0], 2).unwrap();

        assert_eq!(labels, vec![1, 2]);
        assert_eq!(distances, vec![0.0, 25.0]);
    }

    #[test]
    fn invalid_factory_is_a_build_error() {
        let error = VectorIndex::new("NoSuchIndex", 8, Metric::InnerProduct).unwrap_err();

        assert!(matches!(error, IndexError::Build { .. }), "{error}");
    }

    #[test]
    fn untrained_factory_is_unsupported() {
        let error = VectorIndex::new("IVF4,Flat", 8, Metric::InnerProduct).unwrap_err();

        assert!(matches!(error, IndexError::Unsupported { .. }), "{error}");
    }

    #[test]
    fn hnsw_is_unsupported() {
        let error = VectorIndex::new("HNSW8,Flat", 8, Metric::InnerProduct).unwrap_err();

        assert!(error.to_string().contains("removing"), "{error}");
    }
}
