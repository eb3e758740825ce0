//! Shard semantics on a real FAISS index: upsert, replace, delete, search
//! against a brute-force reference, validation and fingerprint fencing.

mod common;

use std::collections::HashMap;

use index_svc::error::{IndexError, ShardError};
use index_svc::{SearchParams, Metric, SearchHit, Settings, Shard};

const DIMENSION: usize = 32;
/// Allowed difference between FAISS float32 scores and the f64 reference.
const SCORE_TOLERANCE: f32 = 1e-4;

/// Checks `hits` against the exact top-k: same scores rank by rank, each
/// hit's score is its exact score, and no id appears twice.
fn assert_matches_reference(
    hits: &[SearchHit],
    reference: &[(String, f32)],
    stored: &HashMap<String, Vec<f32>>,
    query: &[f32],
    metric: Metric,
) {
    assert_eq!(hits.len(), reference.len(), "hit count");
    for (rank, (hit, (_, expected_score))) in hits.iter().zip(reference).enumerate() {
        assert!(
            (hit.score - expected_score).abs() <= SCORE_TOLERANCE,
            "rank {rank}: score {} but the exact top-k has {expected_score}",
            hit.score
        );
        let vector = stored
            .get(&hit.id)
            .unwrap_or_else(|| panic!("hit {} is not stored", hit.id));
        let exact = common::exact_score(vector, query, metric) as f32;
        assert!(
            (hit.score - exact).abs() <= SCORE_TOLERANCE,
            "hit {} scored {} but is {exact}",
            hit.id,
            hit.score
        );
        assert_eq!(hit.metadata["name"], format!("name of {}", hit.id));
    }
    let mut ids: Vec<&str> = hits.iter().map(|hit| hit.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), hits.len(), "duplicate ids in {hits:?}");
}

#[test]
fn search_matches_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    let mut rng = common::rng(7);
    let mut stored: HashMap<String, Vec<f32>> = HashMap::new();

    for batch in 0..4 {
        let items: Vec<_> = (0..500)
            .map(|i| {
                let id = format!("item-{}", batch * 500 + i);
                let vector = common::random_unit_vector(&mut rng, DIMENSION);
                stored.insert(id.clone(), vector.clone());
                common::item(&id, vector)
            })
            .collect();
        let outcome = shard.upsert(items, String::new()).unwrap();
        assert_eq!(outcome.upserted, 500);
        assert_eq!(outcome.replaced, 0);
    }
    let queries: Vec<Vec<f32>> = (0..25)
        .map(|_| common::random_unit_vector(&mut rng, DIMENSION))
        .collect();

    let results = shard.search(&queries, 10, "", &[], SearchParams::default()).unwrap();
    assert_eq!(results.len(), queries.len());
    for (query, hits) in queries.iter().zip(&results) {
        let reference = common::brute_force_top_k(&stored, query, 10, Metric::InnerProduct, &[]);
        assert_matches_reference(hits, &reference, &stored, query, Metric::InnerProduct);
    }

    // Replace 200 vectors and delete 300 items, then search again.
    let replacements: Vec<_> = (0..200)
        .map(|i| {
            let id = format!("item-{}", i * 7);
            let vector = common::random_unit_vector(&mut rng, DIMENSION);
            stored.insert(id.clone(), vector.clone());
            common::item(&id, vector)
        })
        .collect();
    let outcome = shard.upsert(replacements, String::new()).unwrap();
    assert_eq!(outcome.replaced, 200);
    let deleted: Vec<String> = (0..300).map(|i| format!("item-{}", 1000 + i * 3)).collect();
    for id in &deleted {
        stored.remove(id);
    }
    let outcome = shard.delete(deleted.clone()).unwrap();
    assert_eq!(outcome.deleted, 300);
    assert!(outcome.not_found.is_empty());
    assert_eq!(shard.stats().vector_count, 1700);

    let results = shard.search(&queries, 50, "", &[], SearchParams::default()).unwrap();
    for (query, hits) in queries.iter().zip(&results) {
        let reference = common::brute_force_top_k(&stored, query, 50, Metric::InnerProduct, &[]);
        assert_matches_reference(hits, &reference, &stored, query, Metric::InnerProduct);
        assert!(
            hits.iter().all(|hit| !deleted.contains(&hit.id)),
            "a deleted id was returned"
        );
    }
}

#[test]
fn search_excludes_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    let mut rng = common::rng(11);
    let stored: HashMap<String, Vec<f32>> = (0..300)
        .map(|i| {
            (
                format!("item-{i}"),
                common::random_unit_vector(&mut rng, DIMENSION),
            )
        })
        .collect();
    let items = stored
        .iter()
        .map(|(id, vector)| common::item(id, vector.clone()))
        .collect();
    shard.upsert(items, String::new()).unwrap();
    let query = common::random_unit_vector(&mut rng, DIMENSION);
    let top = common::brute_force_top_k(&stored, &query, 5, Metric::InnerProduct, &[]);

    // Exclude the three best items plus ids the shard does not store.
    let exclude: Vec<String> = top[..3]
        .iter()
        .map(|(id, _)| id.clone())
        .chain(["unknown-1".to_owned(), String::new()])
        .collect();
    let hits = shard
        .search(std::slice::from_ref(&query), 5, "", &exclude, SearchParams::default())
        .unwrap()
        .remove(0);

    let exclude_refs: Vec<&str> = exclude.iter().map(String::as_str).collect();
    let reference =
        common::brute_force_top_k(&stored, &query, 5, Metric::InnerProduct, &exclude_refs);
    assert_matches_reference(&hits, &reference, &stored, &query, Metric::InnerProduct);
    assert_eq!(hits[0].id, top[3].0);
}

#[test]
fn search_with_fewer_items_than_k() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    shard
        .upsert(
            vec![
                common::item("a", vec![1.0, 0.0]),
                common::item("b", vec![0.0, 1.0]),
                common::item("c", vec![0.7, 0.7]),
            ],
            String::new(),
        )
        .unwrap();

    let hits = shard
        .search(&[vec![1.0, 0.0]], 10, "", &["c".to_owned()], SearchParams::default())
        .unwrap()
        .remove(0);

    let ids: Vec<&str> = hits.iter().map(|hit| hit.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b"]);
    assert_eq!(hits[0].score, 1.0);
    assert_eq!(hits[1].score, 0.0);
}

#[test]
fn l2_scores_are_negated_squared_distances() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        metric: Metric::L2,
        ..common::settings(dir.path())
    };
    let (shard, _) = Shard::open(settings).unwrap();
    let mut rng = common::rng(5);
    let stored: HashMap<String, Vec<f32>> = (0..400)
        .map(|i| (format!("item-{i}"), common::random_unit_vector(&mut rng, 8)))
        .collect();
    shard
        .upsert(
            stored
                .iter()
                .map(|(id, vector)| common::item(id, vector.clone()))
                .collect(),
            String::new(),
        )
        .unwrap();
    let query = common::random_unit_vector(&mut rng, 8);

    let hits = shard
        .search(std::slice::from_ref(&query), 20, "", &[], SearchParams::default())
        .unwrap()
        .remove(0);

    let reference = common::brute_force_top_k(&stored, &query, 20, Metric::L2, &[]);
    assert_matches_reference(&hits, &reference, &stored, &query, Metric::L2);
    assert!(hits.iter().all(|hit| hit.score <= 0.0));
}

#[test]
fn empty_shard_search_returns_empty_results() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();

    let results = shard
        .search(&[vec![1.0, 2.0], vec![3.0, 4.0]], 5, "model-a", &[], SearchParams::default())
        .unwrap();

    assert_eq!(results, vec![Vec::new(), Vec::new()]);
    assert_eq!(shard.stats().dimension, 0);
}

#[test]
fn emptied_shard_search_returns_empty_results() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    shard
        .upsert(vec![common::item("a", vec![1.0, 0.0])], String::new())
        .unwrap();
    shard.delete(vec!["a".into()]).unwrap();

    let results = shard.search(&[vec![1.0, 0.0]], 5, "", &[], SearchParams::default()).unwrap();

    assert_eq!(results, vec![Vec::new()]);
    let error = shard
        .search(&[vec![1.0, 0.0, 0.0]], 5, "", &[], SearchParams::default())
        .unwrap_err();
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
fn upsert_get_and_delete_report_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    let first = common::item("a", vec![1.0, 0.0]);
    shard
        .upsert(
            vec![first, common::item("b", vec![0.0, 1.0])],
            String::new(),
        )
        .unwrap();
    let mut replacement = common::item("a", vec![0.6, 0.8]);
    replacement.metadata.insert("color".into(), "blue".into());

    let outcome = shard
        .upsert(
            vec![replacement.clone(), common::item("c", vec![1.0, 1.0])],
            String::new(),
        )
        .unwrap();
    assert_eq!(outcome.upserted, 2);
    assert_eq!(outcome.replaced, 1);

    let items = shard.get(&["a".into(), "c".into()]).unwrap();
    assert_eq!(items[0], replacement);
    assert_eq!(items[1].id, "c");

    let outcome = shard
        .delete(vec!["b".into(), "x".into(), "y".into()])
        .unwrap();
    assert_eq!(outcome.deleted, 1);
    assert_eq!(outcome.not_found, vec!["x".to_owned(), "y".to_owned()]);

    let error = shard
        .get(&["a".into(), "b".into(), "z".into()])
        .unwrap_err();
    assert!(
        matches!(&error, ShardError::NotFound { ids } if ids == &["b", "z"]),
        "{error}"
    );
    assert_eq!(error.to_string(), "ids not found: \"b\", \"z\"");

    let outcome = shard.delete(vec!["b".into()]).unwrap();
    assert_eq!(outcome.deleted, 0);
    assert_eq!(outcome.not_found, vec!["b".to_owned()]);
    assert_eq!(
        shard.stats().wal_records,
        3,
        "a delete of only unknown ids writes no record"
    );
}

#[test]
fn invalid_requests_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        max_k: 10,
        max_batch_items: 3,
        max_metadata_bytes: 64,
        ..common::settings(dir.path())
    };
    let (shard, _) = Shard::open(settings).unwrap();
    shard
        .upsert(vec![common::item("a", vec![1.0, 0.0])], String::new())
        .unwrap();
    let query = vec![vec![1.0, 0.0]];

    let error = shard.search(&query, 0, "", &[], SearchParams::default()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "k = 0 is out of range; request a k from 1 to 10"
    );
    let error = shard.search(&query, 11, "", &[], SearchParams::default()).unwrap_err();
    assert!(
        matches!(error, ShardError::InvalidK { k: 11, max_k: 10 }),
        "{error}"
    );

    let error = shard
        .search(&[vec![1.0, 0.0, 0.0]], 1, "", &[], SearchParams::default())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "query 0 has dimension 3, but the shard dimension is 2; send vectors of length 2"
    );
    let error = shard
        .search(&[vec![1.0, 0.0], vec![f32::NAN, 0.0]], 1, "", &[], SearchParams::default())
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("query 1 contains the non-finite value NaN at position 0"),
        "{error}"
    );

    let error = shard
        .upsert(
            vec![common::item("b", vec![1.0, f32::INFINITY])],
            String::new(),
        )
        .unwrap_err();
    assert!(
        matches!(error, ShardError::NonFinite { position: 1, .. }),
        "{error}"
    );
    let error = shard
        .upsert(vec![common::item("b", vec![1.0, 0.0, 0.0])], String::new())
        .unwrap_err();
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
    assert!(error.to_string().contains("item \"b\""), "{error}");
    let error = shard
        .upsert(vec![common::item("", vec![1.0, 0.0])], String::new())
        .unwrap_err();
    assert!(
        matches!(error, ShardError::EmptyId { position: 0, .. }),
        "{error}"
    );
    let duplicate = vec![
        common::item("b", vec![1.0, 0.0]),
        common::item("b", vec![0.0, 1.0]),
    ];
    let error = shard.upsert(duplicate, String::new()).unwrap_err();
    assert!(
        matches!(&error, ShardError::DuplicateId { id, .. } if id == "b"),
        "{error}"
    );
    let too_many = (0..4)
        .map(|i| common::item(&format!("n{i}"), vec![1.0, 0.0]))
        .collect();
    let error = shard.upsert(too_many, String::new()).unwrap_err();
    assert!(
        matches!(
            error,
            ShardError::TooManyEntries {
                field: "items",
                count: 4,
                limit: 3
            }
        ),
        "{error}"
    );
    let mut large = common::item("b", vec![1.0, 0.0]);
    large.metadata.insert("description".into(), "x".repeat(100));
    let error = shard.upsert(vec![large], String::new()).unwrap_err();
    assert!(
        matches!(error, ShardError::MetadataTooLarge { limit: 64, .. }),
        "{error}"
    );

    let error = shard.delete(vec!["a".into(), "a".into()]).unwrap_err();
    assert!(
        matches!(error, ShardError::DuplicateId { field: "ids", .. }),
        "{error}"
    );
    let error = shard.get(&[String::new()]).unwrap_err();
    assert!(
        matches!(
            error,
            ShardError::EmptyId {
                field: "ids",
                position: 0
            }
        ),
        "{error}"
    );

    // None of the rejected writes reached the log or the index.
    assert_eq!(shard.stats().wal_records, 1);
    assert_eq!(shard.stats().vector_count, 1);
}

#[test]
fn first_upsert_fixes_the_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();

    let error = shard
        .upsert(vec![common::item("a", Vec::new())], String::new())
        .unwrap_err();
    assert!(
        matches!(error, ShardError::InvalidDimension { given: 0, .. }),
        "{error}"
    );

    shard
        .upsert(vec![common::item("a", vec![1.0, 0.0, 0.0])], String::new())
        .unwrap();
    assert_eq!(shard.stats().dimension, 3);
    let error = shard
        .upsert(vec![common::item("b", vec![1.0, 0.0])], String::new())
        .unwrap_err();
    assert!(
        matches!(
            error,
            ShardError::DimensionMismatch {
                expected: 3,
                given: 2,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn configured_dimension_applies_before_the_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(Settings {
        dimension: Some(4),
        ..common::settings(dir.path())
    })
    .unwrap();

    assert_eq!(shard.stats().dimension, 4);
    let error = shard.search(&[vec![1.0, 0.0]], 1, "", &[], SearchParams::default()).unwrap_err();
    assert!(
        matches!(
            error,
            ShardError::DimensionMismatch {
                expected: 4,
                given: 2,
                ..
            }
        ),
        "{error}"
    );
    let error = shard
        .upsert(vec![common::item("a", vec![1.0, 0.0])], String::new())
        .unwrap_err();
    assert!(
        matches!(error, ShardError::DimensionMismatch { expected: 4, .. }),
        "{error}"
    );
}

#[test]
fn fingerprint_fences_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();

    // A write without a fingerprint leaves the shard unfenced.
    shard
        .upsert(vec![common::item("a", vec![1.0, 0.0])], String::new())
        .unwrap();
    assert_eq!(shard.stats().model_fingerprint, "");
    shard
        .upsert(vec![common::item("b", vec![0.0, 1.0])], "model-a".into())
        .unwrap();
    assert_eq!(shard.stats().model_fingerprint, "model-a");

    let error = shard
        .upsert(vec![common::item("c", vec![1.0, 1.0])], "model-b".into())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "model fingerprint \"model-b\" does not match the shard's fingerprint \"model-a\"; send vectors of model \"model-a\", or use a shard for the new model"
    );
    let error = shard
        .search(&[vec![1.0, 0.0]], 1, "model-b", &[], SearchParams::default())
        .unwrap_err();
    assert!(
        matches!(error, ShardError::FingerprintMismatch { .. }),
        "{error}"
    );

    assert_eq!(
        shard.search(&[vec![1.0, 0.0]], 1, "model-a", &[], SearchParams::default()).unwrap()[0][0].id,
        "a"
    );
    assert_eq!(
        shard.search(&[vec![1.0, 0.0]], 1, "", &[], SearchParams::default()).unwrap()[0].len(),
        1
    );
    shard
        .upsert(vec![common::item("c", vec![1.0, 1.0])], String::new())
        .unwrap();
    assert_eq!(shard.stats().model_fingerprint, "model-a");
    assert_eq!(shard.get(&["c".into()]).unwrap().len(), 1);
}

#[test]
fn invalid_factory_rejects_the_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        index_factory: "IVF16,NoSuchCodec".into(),
        ..common::settings(dir.path())
    };
    let (shard, _) = Shard::open(settings).unwrap();

    let error = shard
        .upsert(vec![common::item("a", vec![1.0, 0.0])], String::new())
        .unwrap_err();

    assert!(
        matches!(error, ShardError::Index(IndexError::Build { .. })),
        "{error}"
    );
    assert_eq!(shard.stats().wal_records, 0);
    assert_eq!(shard.stats().vector_count, 0);
}

#[test]
fn invalid_factory_with_a_dimension_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        index_factory: "HNSW16,Banana".into(),
        dimension: Some(8),
        ..common::settings(dir.path())
    };

    let error = Shard::open(settings).unwrap_err();

    assert!(
        matches!(error, ShardError::Index(IndexError::Build { .. })),
        "{error}"
    );
}

#[test]
fn stats_report_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    let before = shard.stats();
    assert_eq!(before.memory_bytes, 0);
    assert_eq!(before.shard_id, 3);
    assert_eq!(before.index_type, "Flat");
    assert_eq!(before.last_snapshot_unix_ms, 0);

    shard
        .upsert(
            vec![
                common::item("a", vec![0.0; 16]),
                common::item("b", vec![0.0; 16]),
            ],
            "m".into(),
        )
        .unwrap();

    let stats = shard.stats();
    assert_eq!(stats.vector_count, 2);
    assert_eq!(stats.dimension, 16);
    assert_eq!(stats.wal_records, 1);
    assert_eq!(stats.model_fingerprint, "m");
    // At least the two vectors, ids, metadata and features.
    assert!(
        stats.memory_bytes
            >= 2 * 16 * 4 + 2 + 2 * ("name".len() + "name of a".len()) as u64 + 2 * 8
    );
}
