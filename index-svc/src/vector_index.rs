//! The FAISS index of one shard, built from a factory string through the
//! FAISS C API, with caller-chosen 64-bit labels on every vector.
//!
//! # Labels
//!
//! IVF indexes store labels natively, so they are used as built. Every other
//! index is wrapped in an `IndexIDMap` (factory prefix `IDMap,`) unless the
//! factory string already starts with `IDMap`.
//!
//! # Removal
//!
//! FAISS removes vectors natively from flat, scalar-quantizer, PQ and IVF
//! indexes. HNSW graphs cannot remove vectors, and an `IndexIDMap` over an
//! IVF index (`IDMap,IVF…` or a transform in front of an IVF index) keeps a
//! stale label table after a removal in FAISS 1.12. For those indexes
//! [`VectorIndex::supports_remove`] is false and the shard keeps removed
//! vectors as tombstones, filtered at search time.
//!
//! # Query-time parameters
//!
//! IVF searches pass `nprobe` in a `SearchParametersIVF` per call
//! (`faiss_Index_search_with_params`), so concurrent searches with different
//! values share the index without touching its state. The C API of FAISS
//! 1.12 has no `SearchParametersHNSW`, so `efSearch` is set on the index
//! through `ParameterSpace` under a reader-writer lock. Searches with the
//! current value run in parallel. A search with another value waits for
//! them, sets it, and then runs in parallel with searches of the new value.

use std::ffi::{c_int, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

use faiss_sys::{idx_t, FaissIndex};
use parking_lot::{RwLock, RwLockWriteGuard};

use crate::error::IndexError;
use crate::settings::Metric;

/// OpenMP threads each FAISS call may use; see [`set_openmp_threads`].
static OPENMP_THREADS: AtomicI32 = AtomicI32::new(1);

extern "C" {
    /// OpenMP runtime (libgomp, which faiss-sys links). Sets the team size
    /// of parallel regions that the calling thread starts.
    fn omp_set_num_threads(threads: c_int);
}

/// Sets how many OpenMP threads each FAISS call of this process may use.
///
/// The shard runs FAISS calls from many threads at once. When each of them
/// starts an OpenMP team of all cores, the teams together oversubscribe the
/// machine. One thread per call lets concurrency come from the requests.
pub fn set_openmp_threads(threads: u32) {
    let threads = i32::try_from(threads.max(1)).unwrap_or(i32::MAX);
    OPENMP_THREADS.store(threads, Ordering::Relaxed);
}

/// Applies the process-wide OpenMP team size to the calling thread, whose
/// own setting OpenMP keeps per thread.
fn apply_openmp_threads() {
    // SAFETY: omp_set_num_threads only sets a per-thread control variable.
    unsafe { omp_set_num_threads(OPENMP_THREADS.load(Ordering::Relaxed)) }
}

/// Index families with query-time parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexFamily {
    /// Inverted-file index; `nprobe` applies.
    Ivf,
    /// HNSW graph; `efSearch` applies.
    Hnsw,
    /// Anything else (flat, scalar quantizer, PQ, LSH): no query parameter.
    Other,
}

/// Query-time parameters of one search, already resolved to concrete values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryParams {
    /// Inverted lists visited by an IVF index.
    pub nprobe: usize,
    /// Candidate list size of an HNSW index.
    pub ef_search: usize,
}

/// Owned pointer to a FAISS index, freed on drop.
struct RawIndex(*mut FaissIndex);

impl Drop for RawIndex {
    fn drop(&mut self) {
        // SAFETY: the pointer came from faiss_index_factory, is owned by this
        // value alone and is freed once.
        unsafe { faiss_sys::faiss_Index_free(self.0) }
    }
}

/// A FAISS index whose vectors are addressed by caller-chosen labels.
pub struct VectorIndex {
    raw: RawIndex,
    factory: String,
    dimension: u32,
    family: IndexFamily,
    supports_remove: bool,
    /// Number of IVF lists; 0 for other families.
    nlist: usize,
    /// `efSearch` currently set on an HNSW index. Searches hold the read lock
    /// while they run, and a change of value takes the write lock.
    ef_search: RwLock<usize>,
}

// SAFETY: the index is owned by this value. FAISS CPU indexes allow
// concurrent const searches as long as no thread modifies the index ("Threads
// and asynchronous calls" page of the FAISS wiki). Every mutating method here
// takes `&mut self`, and the one mutation reachable through `&self` (setting
// efSearch) runs under the `ef_search` write lock, which excludes every
// search of this index.
unsafe impl Send for VectorIndex {}
unsafe impl Sync for VectorIndex {}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VectorIndex")
            .field("factory", &self.factory)
            .field("dimension", &self.dimension)
            .field("family", &self.family)
            .field("vectors", &self.len())
            .field("trained", &self.is_trained())
            .finish()
    }
}

impl VectorIndex {
    /// Builds an empty index from a FAISS factory string such as `Flat`,
    /// `IVF256,Flat`, `IVF256,PQ16`, `HNSW32` or `SQfp16`.
    ///
    /// Fails when FAISS rejects the factory string for `dimension`.
    pub fn new(factory: &str, dimension: u32, metric: Metric) -> Result<Self, IndexError> {
        let build_error = |message: String| IndexError::Build {
            factory: factory.to_owned(),
            dimension,
            metric: metric.as_str(),
            message,
        };
        let trimmed = factory.trim();
        let family = family_of(trimmed);
        let native_labels = family == IndexFamily::Ivf && ivf_is_outermost(trimmed);
        let wrapped = if native_labels || trimmed.starts_with("IDMap") {
            trimmed.to_owned()
        } else {
            format!("IDMap,{trimmed}")
        };
        let description = CString::new(wrapped.as_str())
            .map_err(|_| build_error("the factory string contains a NUL byte".to_owned()))?;
        let dimension_c = i32::try_from(dimension)
            .map_err(|_| build_error(format!("dimension {dimension} is too large")))?;
        let metric_type = match metric {
            Metric::InnerProduct => faiss_sys::FaissMetricType_METRIC_INNER_PRODUCT,
            Metric::L2 => faiss_sys::FaissMetricType_METRIC_L2,
        };

        let mut pointer: *mut FaissIndex = ptr::null_mut();
        // SAFETY: `pointer` receives a new index on success; `description`
        // is a valid NUL-terminated string for the duration of the call.
        let code = unsafe {
            faiss_sys::faiss_index_factory(
                &mut pointer,
                dimension_c,
                description.as_ptr(),
                metric_type,
            )
        };
        if code != 0 || pointer.is_null() {
            return Err(build_error(last_faiss_error()));
        }
        let raw = RawIndex(pointer);

        let nlist = if family == IndexFamily::Ivf {
            ivf_nlist(&raw).unwrap_or_else(|| parse_nlist(trimmed).unwrap_or(0))
        } else {
            0
        };
        // An IDMap over an IVF index would keep a stale label table after a
        // removal (see the module documentation), so such indexes use
        // tombstones, as HNSW does.
        let supports_remove = match family {
            IndexFamily::Hnsw => false,
            IndexFamily::Ivf => ivf_is_outermost(trimmed),
            IndexFamily::Other => true,
        };
        let index = Self {
            raw,
            factory: trimmed.to_owned(),
            dimension,
            family,
            supports_remove,
            nlist,
            ef_search: RwLock::new(0),
        };
        if index.supports_remove && index.is_trained() {
            // Removing nothing runs the checks FAISS runs for a real removal,
            // so an index type without removal is found here.
            if let Err(error) = index.probe_remove() {
                tracing::info!(factory = %index.factory, %error, "index does not remove vectors; removed vectors become tombstones");
                return Ok(Self {
                    supports_remove: false,
                    ..index
                });
            }
        }
        Ok(index)
    }

    fn probe_remove(&self) -> Result<(), IndexError> {
        remove_raw(&self.raw, &[]).map(|_| ())
    }

    /// FAISS factory string the index was built from.
    pub fn factory(&self) -> &str {
        &self.factory
    }

    /// Vector dimension.
    pub fn dimension(&self) -> u32 {
        self.dimension
    }

    /// Family of the index, which decides the query-time parameters.
    pub fn family(&self) -> IndexFamily {
        self.family
    }

    /// Number of IVF lists; 0 for other families.
    pub fn nlist(&self) -> usize {
        self.nlist
    }

    /// Returns true when FAISS can remove vectors from this index. When
    /// false, removed vectors stay in the index until it is rebuilt.
    pub fn supports_remove(&self) -> bool {
        self.supports_remove
    }

    /// Number of vectors in the index, tombstones included.
    pub fn len(&self) -> u64 {
        // SAFETY: the pointer is valid for the lifetime of `self`.
        let total = unsafe { faiss_sys::faiss_Index_ntotal(self.raw.0) };
        u64::try_from(total).unwrap_or(0)
    }

    /// Returns true when the index contains no vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns true when the index can take vectors: it needs no training or
    /// has been trained.
    pub fn is_trained(&self) -> bool {
        // SAFETY: the pointer is valid for the lifetime of `self`.
        unsafe { faiss_sys::faiss_Index_is_trained(self.raw.0) != 0 }
    }

    /// Fewest training vectors FAISS accepts for this index: one per IVF list
    /// and 256 for PQ codes of 8 bits. FAISS clustering works best with at
    /// least 39 vectors per centroid; see [`default_train_threshold`].
    pub fn min_training_vectors(&self) -> u64 {
        let mut minimum = (self.nlist as u64).max(1);
        if self.factory.contains("PQ") {
            minimum = minimum.max(256);
        }
        minimum
    }

    /// Trains the index on `vectors` (stored back to back).
    pub fn train(&mut self, vectors: &[f32]) -> Result<(), IndexError> {
        let count = vectors.len() / self.dimension as usize;
        let minimum = self.min_training_vectors();
        if (count as u64) < minimum {
            return Err(IndexError::TooFewTrainingVectors {
                factory: self.factory.clone(),
                given: count as u64,
                minimum,
            });
        }
        apply_openmp_threads();
        // SAFETY: `vectors` contains `count * dimension` floats, and `&mut
        // self` excludes concurrent searches.
        let code = unsafe {
            faiss_sys::faiss_Index_train(self.raw.0, count as idx_t, vectors.as_ptr())
        };
        if code != 0 {
            return Err(IndexError::Faiss {
                operation: "train",
                message: last_faiss_error(),
            });
        }
        Ok(())
    }

    /// Adds `labels.len()` vectors stored back to back in `vectors`.
    pub fn add(&mut self, vectors: &[f32], labels: &[u64]) -> Result<(), IndexError> {
        debug_assert_eq!(vectors.len(), labels.len() * self.dimension as usize);
        if labels.is_empty() {
            return Ok(());
        }
        let labels = to_idx(labels)?;
        apply_openmp_threads();
        // SAFETY: `vectors` contains `labels.len() * dimension` floats, and
        // `&mut self` excludes concurrent searches.
        let code = unsafe {
            faiss_sys::faiss_Index_add_with_ids(
                self.raw.0,
                labels.len() as idx_t,
                vectors.as_ptr(),
                labels.as_ptr(),
            )
        };
        if code != 0 {
            return Err(IndexError::Faiss {
                operation: "add",
                message: last_faiss_error(),
            });
        }
        Ok(())
    }

    /// Removes the vectors with the given labels. Returns how many were
    /// removed. Fails for an index without removal support.
    pub fn remove(&mut self, labels: &[u64]) -> Result<usize, IndexError> {
        if !self.supports_remove {
            return Err(IndexError::Faiss {
                operation: "remove",
                message: format!("index {:?} does not support removal", self.factory),
            });
        }
        remove_raw(&self.raw, labels)
    }

    /// Searches the `k` nearest vectors of each query in `queries` (stored
    /// back to back). Returns `k` distances and labels per query, best first;
    /// a label of -1 fills slots beyond the vectors found.
    ///
    /// Takes `&self`, so that searches run in parallel under a shared lock.
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: QueryParams,
    ) -> Result<(Vec<f32>, Vec<i64>), IndexError> {
        let dimension = self.dimension as usize;
        debug_assert_eq!(queries.len() % dimension, 0);
        let query_count = queries.len() / dimension;
        if query_count == 0 || k == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut distances = vec![0f32; query_count * k];
        let mut labels = vec![-1i64; query_count * k];
        apply_openmp_threads();
        let mut output = SearchOutput {
            query_count,
            k,
            distances: &mut distances,
            labels: &mut labels,
        };
        match self.family {
            IndexFamily::Ivf => self.search_ivf(queries, &mut output, params.nprobe)?,
            IndexFamily::Hnsw => self.search_hnsw(queries, &mut output, params.ef_search)?,
            IndexFamily::Other => self.search_plain(queries, &mut output)?,
        }
        Ok((distances, labels))
    }

    fn search_plain(&self, queries: &[f32], output: &mut SearchOutput<'_>) -> Result<(), IndexError> {
        // SAFETY: `queries` contains `query_count * dimension` floats, both
        // output buffers have room for `query_count * k` entries, and no
        // thread modifies the index while `&self` is shared (see the Sync
        // impl).
        let code = unsafe {
            faiss_sys::faiss_Index_search(
                self.raw.0,
                output.query_count as idx_t,
                queries.as_ptr(),
                output.k as idx_t,
                output.distances.as_mut_ptr(),
                output.labels.as_mut_ptr(),
            )
        };
        check_search(code)
    }

    fn search_ivf(
        &self,
        queries: &[f32],
        output: &mut SearchOutput<'_>,
        nprobe: usize,
    ) -> Result<(), IndexError> {
        let mut params: *mut faiss_sys::FaissSearchParametersIVF = ptr::null_mut();
        // SAFETY: `params` receives a new parameter object, freed below. A
        // null selector means no filtering, and max_codes 0 means no limit.
        let code = unsafe {
            faiss_sys::faiss_SearchParametersIVF_new_with(
                &mut params,
                ptr::null_mut(),
                nprobe.max(1),
                0,
            )
        };
        if code != 0 || params.is_null() {
            return Err(IndexError::Faiss {
                operation: "build IVF search parameters",
                message: last_faiss_error(),
            });
        }
        // SAFETY: as in `search_plain`; `params` is valid until it is freed
        // right after the call, and FAISS only reads it.
        let code = unsafe {
            let code = faiss_sys::faiss_Index_search_with_params(
                self.raw.0,
                output.query_count as idx_t,
                queries.as_ptr(),
                output.k as idx_t,
                params as *const faiss_sys::FaissSearchParameters,
                output.distances.as_mut_ptr(),
                output.labels.as_mut_ptr(),
            );
            faiss_sys::faiss_SearchParametersIVF_free(params);
            code
        };
        check_search(code)
    }

    fn search_hnsw(
        &self,
        queries: &[f32],
        output: &mut SearchOutput<'_>,
        ef_search: usize,
    ) -> Result<(), IndexError> {
        let ef_search = ef_search.max(1);
        {
            let current = self.ef_search.read();
            if *current == ef_search {
                return self.search_plain(queries, output);
            }
        }
        let mut current = self.ef_search.write();
        if *current != ef_search {
            self.set_ef_search(ef_search)?;
            *current = ef_search;
        }
        let _current = RwLockWriteGuard::downgrade(current);
        self.search_plain(queries, output)
    }

    /// Sets efSearch on the HNSW index. The caller holds the `ef_search`
    /// write lock, so no search of this index runs meanwhile.
    fn set_ef_search(&self, ef_search: usize) -> Result<(), IndexError> {
        let mut space: *mut faiss_sys::FaissParameterSpace = ptr::null_mut();
        // SAFETY: `space` receives a new object, freed below. The index
        // pointer is valid, and the caller's write lock excludes searches
        // while FAISS writes the field (see the Sync impl).
        let code = unsafe {
            let code = faiss_sys::faiss_ParameterSpace_new(&mut space);
            if code != 0 || space.is_null() {
                code.min(-1)
            } else {
                let code = faiss_sys::faiss_ParameterSpace_set_index_parameter(
                    space,
                    self.raw.0,
                    c"efSearch".as_ptr(),
                    ef_search as f64,
                );
                faiss_sys::faiss_ParameterSpace_free(space);
                code
            }
        };
        if code != 0 {
            return Err(IndexError::Faiss {
                operation: "set efSearch",
                message: last_faiss_error(),
            });
        }
        Ok(())
    }
}

/// Output buffers of one search call.
struct SearchOutput<'a> {
    query_count: usize,
    k: usize,
    distances: &'a mut [f32],
    labels: &'a mut [i64],
}

/// Default number of stored vectors at which an index that needs training is
/// trained: 39 vectors per IVF list (below that FAISS k-means warns that the
/// centroids are poorly estimated), 39 per PQ centroid (256 of them for
/// 8-bit codes), and at least 1000.
pub fn default_train_threshold(index: &VectorIndex) -> u64 {
    let mut threshold = 1000u64.max(39 * index.nlist() as u64);
    if index.factory().contains("PQ") {
        threshold = threshold.max(39 * 256);
    }
    threshold
}

fn family_of(factory: &str) -> IndexFamily {
    if factory.contains("IVF") {
        IndexFamily::Ivf
    } else if factory.contains("HNSW") {
        IndexFamily::Hnsw
    } else {
        IndexFamily::Other
    }
}

/// Returns true when the IVF index is the outermost one, which stores labels
/// natively and removes vectors correctly.
fn ivf_is_outermost(factory: &str) -> bool {
    factory.starts_with("IVF")
}

/// Number of lists of an outermost IVF index, read from FAISS.
fn ivf_nlist(raw: &RawIndex) -> Option<usize> {
    // SAFETY: faiss_IndexIVF_cast returns null unless the index is an
    // IndexIVF, and the pointer is valid for the lifetime of `raw`.
    unsafe {
        let ivf = faiss_sys::faiss_IndexIVF_cast(raw.0);
        if ivf.is_null() {
            None
        } else {
            Some(faiss_sys::faiss_IndexIVF_nlist(ivf))
        }
    }
}

/// Number of lists in a factory string such as `PCA64,IVF1024,Flat`.
fn parse_nlist(factory: &str) -> Option<usize> {
    let start = factory.find("IVF")? + 3;
    let digits: String = factory[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Removes `labels` from the index behind `raw`. The caller guarantees that
/// no search of this index runs meanwhile.
fn remove_raw(raw: &RawIndex, labels: &[u64]) -> Result<usize, IndexError> {
    let labels = to_idx(labels)?;
    let mut selector: *mut faiss_sys::FaissIDSelectorBatch = ptr::null_mut();
    // SAFETY: `labels` is valid for the call, and FAISS copies it.
    let code = unsafe {
        faiss_sys::faiss_IDSelectorBatch_new(&mut selector, labels.len(), labels.as_ptr())
    };
    if code != 0 || selector.is_null() {
        return Err(IndexError::Faiss {
            operation: "build an id selector",
            message: last_faiss_error(),
        });
    }
    let mut removed = 0usize;
    apply_openmp_threads();
    // SAFETY: the selector is valid until it is freed below, and the caller
    // excludes concurrent searches.
    let code = unsafe {
        let code = faiss_sys::faiss_Index_remove_ids(
            raw.0,
            selector as *const faiss_sys::FaissIDSelector,
            &mut removed,
        );
        faiss_sys::faiss_IDSelector_free(selector as *mut faiss_sys::FaissIDSelector);
        code
    };
    if code != 0 {
        return Err(IndexError::Faiss {
            operation: "remove",
            message: last_faiss_error(),
        });
    }
    Ok(removed)
}

fn to_idx(labels: &[u64]) -> Result<Vec<idx_t>, IndexError> {
    labels
        .iter()
        .map(|&label| {
            idx_t::try_from(label).map_err(|_| IndexError::Faiss {
                operation: "convert a label",
                message: format!("label {label} does not fit in a FAISS id"),
            })
        })
        .collect()
}

fn check_search(code: i32) -> Result<(), IndexError> {
    if code != 0 {
        return Err(IndexError::Faiss {
            operation: "search",
            message: last_faiss_error(),
        });
    }
    Ok(())
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

    const DEFAULT_PARAMS: QueryParams = QueryParams {
        nprobe: 1,
        ef_search: 16,
    };

    fn grid_vectors(count: usize, dimension: usize) -> Vec<f32> {
        (0..count * dimension)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    #[test]
    fn flat_index_adds_searches_and_removes() {
        let mut index = VectorIndex::new("Flat", 2, Metric::InnerProduct).unwrap();
        index
            .add(&[1.0, 0.0, 0.0, 1.0, 0.6, 0.8], &[10, 20, 30])
            .unwrap();

        let (distances, labels) = index.search(&[1.0, 0.0], 2, DEFAULT_PARAMS).unwrap();
        assert_eq!(labels, vec![10, 30]);
        assert_eq!(distances, vec![1.0, 0.6]);

        assert_eq!(index.remove(&[10]).unwrap(), 1);
        let (_, labels) = index.search(&[1.0, 0.0], 3, DEFAULT_PARAMS).unwrap();
        assert_eq!(labels, vec![30, 20, -1]);
    }

    #[test]
    fn l2_returns_squared_distances() {
        let mut index = VectorIndex::new("Flat", 2, Metric::L2).unwrap();
        index.add(&[0.0, 0.0, 3.0, 4.0], &[1, 2]).unwrap();

        let (distances, labels) = index.search(&[0.0, 0.0], 2, DEFAULT_PARAMS).unwrap();

        assert_eq!(labels, vec![1, 2]);
        assert_eq!(distances, vec![0.0, 25.0]);
    }

    #[test]
    fn invalid_factory_is_a_build_error() {
        let error = VectorIndex::new("NoSuchIndex", 8, Metric::InnerProduct).unwrap_err();

        assert!(matches!(error, IndexError::Build { .. }), "{error}");
    }

    #[test]
    fn ivf_trains_adds_and_removes_natively() {
        let dimension = 8;
        let mut index = VectorIndex::new("IVF4,Flat", dimension, Metric::L2).unwrap();
        assert_eq!(index.family(), IndexFamily::Ivf);
        assert_eq!(index.nlist(), 4);
        assert!(!index.is_trained());
        assert!(index.supports_remove());

        let vectors = grid_vectors(200, dimension as usize);
        index.train(&vectors).unwrap();
        let labels: Vec<u64> = (1000..1200).collect();
        index.add(&vectors, &labels).unwrap();
        assert_eq!(index.remove(&[1000, 1001]).unwrap(), 2);
        assert_eq!(index.len(), 198);

        let all_lists = QueryParams {
            nprobe: 4,
            ef_search: 16,
        };
        let (_, found) = index
            .search(&vectors[2 * 8..3 * 8], 1, all_lists)
            .unwrap();
        assert_eq!(found, vec![1002]);
    }

    #[test]
    fn ivf_rejects_too_few_training_vectors() {
        let mut index = VectorIndex::new("IVF16,Flat", 4, Metric::L2).unwrap();

        let error = index.train(&grid_vectors(3, 4)).unwrap_err();

        assert!(
            matches!(error, IndexError::TooFewTrainingVectors { given: 3, minimum: 16, .. }),
            "{error}"
        );
    }

    #[test]
    fn hnsw_uses_tombstones_and_honours_ef_search() {
        let dimension = 8;
        let mut index = VectorIndex::new("HNSW8", dimension, Metric::L2).unwrap();
        assert_eq!(index.family(), IndexFamily::Hnsw);
        assert!(!index.supports_remove());
        assert!(index.remove(&[1]).is_err());

        let vectors = grid_vectors(100, dimension as usize);
        let labels: Vec<u64> = (0..100).collect();
        index.add(&vectors, &labels).unwrap();
        for ef_search in [4, 64, 4] {
            let params = QueryParams {
                nprobe: 1,
                ef_search,
            };
            let (_, found) = index.search(&vectors[5 * 8..6 * 8], 1, params).unwrap();
            assert_eq!(found, vec![5], "efSearch {ef_search}");
            assert_eq!(*index.ef_search.read(), ef_search);
        }
    }

    #[test]
    fn idmap_over_ivf_uses_tombstones() {
        let index = VectorIndex::new("IDMap,IVF4,Flat", 4, Metric::L2).unwrap();

        assert!(!index.supports_remove());
    }

    #[test]
    fn train_threshold_follows_nlist_and_pq() {
        let ivf = VectorIndex::new("IVF100,Flat", 16, Metric::L2).unwrap();
        let ivfpq = VectorIndex::new("IVF8,PQ4", 16, Metric::L2).unwrap();
        let flat = VectorIndex::new("Flat", 16, Metric::L2).unwrap();

        assert_eq!(default_train_threshold(&ivf), 3900);
        assert_eq!(default_train_threshold(&ivfpq), 39 * 256);
        assert_eq!(default_train_threshold(&flat), 1000);
        assert_eq!(ivfpq.min_training_vectors(), 256);
    }
}
