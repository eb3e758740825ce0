//! Every index family on real FAISS: recall against brute force, replace,
//! delete, the effect of nprobe and efSearch, the training threshold, the
//! exact search before training, and tombstone rebuilds.

mod common;

use std::collections::{HashMap, HashSet};

use index_svc::error::{IndexError, ShardError};
use index_svc::{Metric, SearchParams, Settings, Shard};

const DIMENSION: usize = 32;
const K: usize = 10;

struct Fixture {
    shard: Shard,
    stored: HashMap<String, Vec<f32>>,
    metric: Metric,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Opens a shard with `factory` and upserts `count` seeded unit vectors
    /// in batches of 500.
    fn new(factory: &str, metric: Metric, count: usize, tune: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            index_factory: factory.to_owned(),
            metric,
            dimension: Some(DIMENSION as u32),
            fsync: false,
            ..common::settings(dir.path())
        };
        tune(&mut settings);
        let (shard, _) = Shard::open(settings).unwrap();
        let mut fixture = Self {
            shard,
            stored: HashMap::new(),
            metric,
            _dir: dir,
        };
        fixture.add(0, count, 1);
        fixture
    }

    fn add(&mut self, first: usize, count: usize, seed: u64) {
        let mut rng = common::rng(seed * 1_000_003 + first as u64);
        let ids: Vec<usize> = (first..first + count).collect();
        for chunk in ids.chunks(500) {
            let items: Vec<_> = chunk
                .iter()
                .map(|i| {
                    let id = format!("item-{i}");
                    let vector = common::random_unit_vector(&mut rng, DIMENSION);
                    self.stored.insert(id.clone(), vector.clone());
                    common::item(&id, vector)
                })
                .collect();
            self.shard.upsert(items, String::new()).unwrap();
        }
    }

    fn queries(&self) -> Vec<Vec<f32>> {
        let mut rng = common::rng(99);
        (0..50)
            .map(|_| common::random_unit_vector(&mut rng, DIMENSION))
            .collect()
    }

    /// Mean recall@10 of the shard against brute force over 50 queries.
    fn recall(&self, params: SearchParams) -> f64 {
        let queries = self.queries();
        let results = self
            .shard
            .search(&queries, K as u32, "", &[], params)
            .unwrap();
        let mut found = 0;
        for (query, hits) in queries.iter().zip(&results) {
            assert_eq!(hits.len(), K.min(self.stored.len()), "k results");
            let exact: HashSet<String> =
                common::brute_force_top_k(&self.stored, query, K, self.metric, &[])
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
            found += hits.iter().filter(|hit| exact.contains(&hit.id)).count();
        }
        found as f64 / (queries.len() * K) as f64
    }

    fn search_one(&self, query: &[f32], k: u32, params: SearchParams) -> Vec<String> {
        self.shard
            .search(&[query.to_vec()], k, "", &[], params)
            .unwrap()
            .remove(0)
            .into_iter()
            .map(|hit| hit.id)
            .collect()
    }
}

fn params(nprobe: u32, ef_search: u32) -> SearchParams {
    SearchParams { nprobe, ef_search }
}

/// Replaces item-0's vector, deletes item-1 and item-2, and checks search and
/// get afterwards.
fn check_replace_and_delete(fixture: &mut Fixture, search_params: SearchParams) {
    let replacement = vec![1.0 / (DIMENSION as f32).sqrt(); DIMENSION];
    let outcome = fixture
        .shard
        .upsert(vec![common::item("item-0", replacement.clone())], String::new())
        .unwrap();
    assert_eq!(outcome.replaced, 1);
    fixture.stored.insert("item-0".into(), replacement.clone());
    assert_eq!(fixture.search_one(&replacement, 1, search_params), ["item-0"]);
    assert_eq!(
        fixture.shard.get(&["item-0".into()]).unwrap()[0].vector,
        replacement
    );

    let deleted = ["item-1".to_owned(), "item-2".to_owned()];
    let removed_vectors: Vec<Vec<f32>> = deleted
        .iter()
        .map(|id| fixture.stored.remove(id).unwrap())
        .collect();
    let outcome = fixture.shard.delete(deleted.to_vec()).unwrap();
    assert_eq!(outcome.deleted, 2);
    for vector in &removed_vectors {
        let hits = fixture.search_one(vector, K as u32, search_params);
        assert_eq!(hits.len(), K);
        for id in &deleted {
            assert!(!hits.contains(id), "deleted {id} returned");
        }
    }
    assert!(matches!(
        fixture.shard.get(&deleted[..1]),
        Err(ShardError::NotFound { .. })
    ));
}

#[test]
fn flat_is_exact_and_replaces_and_deletes() {
    for metric in [Metric::InnerProduct, Metric::L2] {
        let mut fixture = Fixture::new("Flat", metric, 2000, |_| {});
        assert_eq!(fixture.recall(SearchParams::default()), 1.0, "{metric:?}");
        assert!(fixture.shard.stats().trained);

        check_replace_and_delete(&mut fixture, SearchParams::default());
        assert_eq!(fixture.recall(SearchParams::default()), 1.0, "{metric:?}");
        assert_eq!(fixture.shard.stats().tombstones, 0);
    }
}

#[test]
fn ivf_flat_recall_grows_with_nprobe() {
    let mut fixture = Fixture::new("IVF32,Flat", Metric::L2, 3000, |settings| {
        settings.train_threshold = Some(2000);
        settings.nprobe = 4;
    });
    fixture.shard.wait_for_background_build();
    let stats = fixture.shard.stats();
    assert!(stats.trained);
    assert_eq!(stats.index_type, "IVF32,Flat");

    let one = fixture.recall(params(1, 0));
    let default = fixture.recall(SearchParams::default());
    let all = fixture.recall(params(32, 0));
    assert!(one < default, "nprobe 1 recall {one} vs nprobe 4 recall {default}");
    assert!(default < all, "nprobe 4 recall {default} vs nprobe 32 recall {all}");
    assert_eq!(all, 1.0, "visiting every list is exact");

    check_replace_and_delete(&mut fixture, params(32, 0));
    assert_eq!(fixture.recall(params(32, 0)), 1.0);
    assert_eq!(fixture.shard.stats().tombstones, 0, "IVF removes natively");
}

#[test]
fn ivf_pq_recall_is_sane() {
    let mut fixture = Fixture::new("IVF16,PQ8np", Metric::InnerProduct, 3000, |settings| {
        settings.train_threshold = Some(2500);
    });
    fixture.shard.wait_for_background_build();
    assert!(fixture.shard.stats().trained);

    let recall = fixture.recall(params(16, 0));
    // The `np` suffix skips FAISS polysemous training, which takes minutes
    // on this data. 8 sub-quantizers of 4 dimensions keep the neighbourhood only roughly.
    assert!(recall >= 0.3, "IVF16,PQ8np recall {recall}");
    check_replace_and_delete(&mut fixture, params(16, 0));
}

#[test]
fn hnsw_ef_search_and_tombstones() {
    let mut fixture = Fixture::new("HNSW8", Metric::L2, 3000, |settings| {
        settings.ef_search = 16;
        settings.tombstone_rebuild_fraction = 0.5;
    });
    assert!(fixture.shard.stats().trained);

    let low = fixture.recall(params(0, 10));
    let high = fixture.recall(params(0, 256));
    assert!(low < high, "efSearch 10 recall {low} vs efSearch 256 recall {high}");
    assert!(high >= 0.9, "efSearch 256 recall {high}");

    check_replace_and_delete(&mut fixture, params(0, 256));
    // One replaced and two deleted vectors stay in the graph as tombstones.
    assert_eq!(fixture.shard.stats().tombstones, 3);
    assert_eq!(fixture.shard.stats().vector_count, 2998);

    // Deleting more than half of the graph starts a rebuild without them.
    let doomed: Vec<String> = (3..1600).map(|i| format!("item-{i}")).collect();
    for id in &doomed {
        fixture.stored.remove(id);
    }
    // The second batch crosses the fraction, and no write follows it.
    for chunk in doomed.chunks(800) {
        fixture.shard.delete(chunk.to_vec()).unwrap();
    }
    fixture.shard.wait_for_background_build();
    assert_eq!(fixture.shard.stats().tombstones, 0);
    assert!(fixture.recall(params(0, 256)) >= 0.9);
}

#[test]
fn hnsw_returns_k_results_despite_tombstones() {
    let mut fixture = Fixture::new("HNSW16", Metric::InnerProduct, 200, |settings| {
        settings.tombstone_rebuild_fraction = 1.0;
    });
    let doomed: Vec<String> = (0..150).map(|i| format!("item-{i}")).collect();
    for id in &doomed {
        fixture.stored.remove(id);
    }
    fixture.shard.delete(doomed).unwrap();
    assert_eq!(fixture.shard.stats().tombstones, 150);

    for query in fixture.queries().iter().take(10) {
        let hits = fixture.search_one(query, 40, params(0, 64));
        assert_eq!(hits.len(), 40, "k results among 50 live vectors");
        assert!(hits.iter().all(|id| fixture.stored.contains_key(id)));
    }
}

#[test]
fn untrained_ivf_searches_exactly_until_the_threshold() {
    let mut fixture = Fixture::new("IVF16,Flat", Metric::L2, 799, |settings| {
        settings.train_threshold = Some(800);
        settings.nprobe = 1;
    });
    let stats = fixture.shard.stats();
    assert!(!stats.trained);
    // Exact although nprobe is 1: the stand-in is a flat index.
    assert_eq!(fixture.recall(params(1, 0)), 1.0);
    check_replace_and_delete(&mut fixture, SearchParams::default());

    fixture.add(1000, 3, 2);
    fixture.shard.wait_for_background_build();
    let stats = fixture.shard.stats();
    assert!(stats.trained, "800 stored vectors reach the threshold");
    assert_eq!(stats.vector_count, 800);
    assert_eq!(fixture.recall(params(16, 0)), 1.0);
    assert!(fixture.recall(params(1, 0)) < 1.0, "nprobe applies once trained");
}

#[test]
fn train_needs_enough_vectors() {
    let fixture = Fixture::new("IVF64,Flat", Metric::L2, 20, |_| {});

    let error = fixture.shard.train().unwrap_err();

    assert!(
        matches!(
            error,
            ShardError::Index(IndexError::TooFewTrainingVectors {
                given: 20,
                minimum: 64,
                ..
            })
        ),
        "{error}"
    );
    assert!(!fixture.shard.stats().trained);
}

#[test]
fn train_below_threshold_then_writes_continue() {
    let mut fixture = Fixture::new("IVF8,Flat", Metric::InnerProduct, 300, |_| {});
    assert!(!fixture.shard.stats().trained);

    let outcome = fixture.shard.train().unwrap();

    assert_eq!(outcome.trained_on, 300);
    assert!(!outcome.already_trained);
    assert!(fixture.shard.stats().trained);
    assert!(fixture.shard.stats().last_snapshot_unix_ms > 0);
    fixture.add(300, 100, 3);
    assert_eq!(fixture.recall(params(8, 0)), 1.0);
}

#[test]
fn writes_during_background_training_are_kept() {
    let mut fixture = Fixture::new("IVF32,Flat", Metric::L2, 1500, |settings| {
        settings.train_threshold = Some(1500);
    });
    // These writes race with the training that the last batch started.
    fixture.add(1500, 600, 4);
    let late: Vec<String> = (0..100).map(|i| format!("item-{i}")).collect();
    for id in &late {
        fixture.stored.remove(id);
    }
    fixture.shard.delete(late).unwrap();
    fixture.shard.wait_for_background_build();

    assert!(fixture.shard.stats().trained);
    assert_eq!(fixture.shard.stats().vector_count, 2000);
    assert_eq!(fixture.recall(params(32, 0)), 1.0);
}
