//! Restart recovery from the snapshot and the write-ahead log.

mod common;

use std::collections::HashMap;
use std::fs::{self, OpenOptions};

use index_svc::error::ShardError;
use index_svc::snapshot::SNAPSHOT_FILE_NAME;
use index_svc::wal::WAL_FILE_NAME;
use index_svc::{SearchParams, SearchHit, Settings, Shard, StoredItem};

const DIMENSION: usize = 16;

/// Applies a fixed mix of upserts, replacements and deletes, and returns
/// the ids that should remain, with their vectors, and the deleted ids.
fn write_history(shard: &Shard) -> (HashMap<String, Vec<f32>>, Vec<String>) {
    let mut rng = common::rng(3);
    let mut stored = HashMap::new();
    let mut deleted = Vec::new();
    for batch in 0..6 {
        let items: Vec<StoredItem> = (0..50)
            .map(|i| {
                let id = format!("item-{}", batch * 40 + i);
                let vector = common::random_unit_vector(&mut rng, DIMENSION);
                stored.insert(id.clone(), vector.clone());
                common::item(&id, vector)
            })
            .collect();
        shard.upsert(items, "model-a".into()).unwrap();
        let ids: Vec<String> = (0..5)
            .map(|i| format!("item-{}", batch * 40 + i * 3))
            .collect();
        for id in &ids {
            stored.remove(id);
        }
        deleted.extend(ids.iter().cloned());
        shard.delete(ids).unwrap();
    }
    // A later upsert may have brought a deleted id back.
    deleted.retain(|id| !stored.contains_key(id));
    (stored, deleted)
}

fn search_all(shard: &Shard, queries: &[Vec<f32>]) -> Vec<Vec<SearchHit>> {
    shard.search(queries, 20, "model-a", &[], SearchParams::default()).unwrap()
}

fn queries() -> Vec<Vec<f32>> {
    let mut rng = common::rng(99);
    (0..10)
        .map(|_| common::random_unit_vector(&mut rng, DIMENSION))
        .collect()
}

/// Checks that `shard` contains exactly `stored` and none of `deleted`.
fn assert_contents(shard: &Shard, stored: &HashMap<String, Vec<f32>>, deleted: &[String]) {
    assert_eq!(shard.stats().vector_count, stored.len() as u64);
    let ids: Vec<String> = stored.keys().cloned().collect();
    let items = shard.get(&ids).unwrap();
    for item in &items {
        assert_eq!(&item.vector, &stored[&item.id], "vector of {}", item.id);
        assert_eq!(item.metadata["name"], format!("name of {}", item.id));
        assert_eq!(item.image_features.len(), 8);
    }
    for id in deleted {
        let error = shard.get(std::slice::from_ref(id)).unwrap_err();
        assert!(
            matches!(error, ShardError::NotFound { .. }),
            "deleted id {id} came back"
        );
    }
}

fn settings_with_snapshots(dir: &std::path::Path, snapshot_every: u64) -> Settings {
    Settings {
        snapshot_every,
        ..common::settings(dir)
    }
}

#[test]
fn restart_recovers_from_wal_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    let (stored, deleted) = write_history(&shard);
    let before = search_all(&shard, &queries());
    drop(shard);

    let (shard, report) = Shard::open(common::settings(dir.path())).unwrap();

    assert_eq!(report.snapshot_items, 0);
    assert_eq!(report.wal_records_replayed, 12);
    assert_eq!(report.items, stored.len() as u64);
    assert!(!dir.path().join(SNAPSHOT_FILE_NAME).exists());
    assert_contents(&shard, &stored, &deleted);
    assert_eq!(search_all(&shard, &queries()), before);
    assert_eq!(shard.stats().model_fingerprint, "model-a");
}

#[test]
fn restart_recovers_from_snapshot_and_wal() {
    let dir = tempfile::tempdir().unwrap();
    // 12 records with a snapshot every 5: snapshots after records 5 and 10,
    // two records left in the log.
    let (shard, _) = Shard::open(settings_with_snapshots(dir.path(), 5)).unwrap();
    let (stored, deleted) = write_history(&shard);
    let before = search_all(&shard, &queries());
    let stats_before = shard.stats();
    assert_eq!(stats_before.wal_records, 2);
    assert!(stats_before.last_snapshot_unix_ms > 0);
    drop(shard);

    let (shard, report) = Shard::open(settings_with_snapshots(dir.path(), 5)).unwrap();

    assert!(report.snapshot_items > 0);
    assert_eq!(report.wal_records_replayed, 2);
    assert_eq!(report.wal_records_skipped, 0);
    assert_eq!(report.snapshot_unix_ms, stats_before.last_snapshot_unix_ms);
    assert_contents(&shard, &stored, &deleted);
    assert_eq!(search_all(&shard, &queries()), before);
    let stats = shard.stats();
    assert_eq!(stats.wal_records, 2);
    assert_eq!(
        stats.last_snapshot_unix_ms,
        stats_before.last_snapshot_unix_ms
    );
    assert_eq!(stats.memory_bytes, stats_before.memory_bytes);
}

#[test]
fn checkpoint_empties_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    let (stored, deleted) = write_history(&shard);

    let summary = shard.checkpoint().unwrap().expect("the log held records");
    assert_eq!(summary.items, stored.len() as u64);
    assert_eq!(shard.stats().wal_records, 0);
    assert!(
        shard.checkpoint().unwrap().is_none(),
        "nothing to snapshot after a snapshot"
    );
    drop(shard);

    let (shard, report) = Shard::open(common::settings(dir.path())).unwrap();
    assert_eq!(report.snapshot_items, stored.len() as u64);
    assert_eq!(report.wal_records_replayed, 0);
    assert_contents(&shard, &stored, &deleted);
}

#[test]
fn writes_after_restart_continue_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    shard
        .upsert(vec![common::item("a", vec![1.0, 0.0])], String::new())
        .unwrap();
    shard.snapshot().unwrap();
    shard
        .upsert(vec![common::item("b", vec![0.0, 1.0])], String::new())
        .unwrap();
    drop(shard);

    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    shard.delete(vec!["a".into()]).unwrap();
    shard
        .upsert(vec![common::item("c", vec![0.5, 0.5])], String::new())
        .unwrap();
    drop(shard);

    let (shard, report) = Shard::open(common::settings(dir.path())).unwrap();
    assert_eq!(report.wal_records_replayed, 3);
    let hits = shard
        .search(&[vec![1.0, 0.0]], 5, "", &[], SearchParams::default())
        .unwrap()
        .remove(0);
    let ids: Vec<&str> = hits.iter().map(|hit| hit.id.as_str()).collect();
    assert_eq!(ids, vec!["c", "b"]);
}

#[test]
fn torn_wal_tail_loses_only_the_last_write() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    shard
        .upsert(vec![common::item("a", vec![1.0, 0.0])], String::new())
        .unwrap();
    shard
        .upsert(vec![common::item("b", vec![0.0, 1.0])], String::new())
        .unwrap();
    shard
        .upsert(vec![common::item("c", vec![0.5, 0.5])], String::new())
        .unwrap();
    drop(shard);
    let wal_path = dir.path().join(WAL_FILE_NAME);
    let length = fs::metadata(&wal_path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&wal_path)
        .unwrap()
        .set_len(length - 7)
        .unwrap();

    let (shard, report) = Shard::open(common::settings(dir.path())).unwrap();

    assert_eq!(report.wal_records_replayed, 2);
    assert!(report.wal_discarded_bytes > 0);
    assert_eq!(shard.get(&["a".into(), "b".into()]).unwrap().len(), 2);
    assert!(matches!(
        shard.get(&["c".into()]).unwrap_err(),
        ShardError::NotFound { .. }
    ));
    // The shard keeps accepting writes after the repair.
    shard
        .upsert(vec![common::item("c", vec![0.5, 0.5])], String::new())
        .unwrap();
    drop(shard);
    let (shard, report) = Shard::open(common::settings(dir.path())).unwrap();
    assert_eq!(report.wal_discarded_bytes, 0);
    assert_eq!(shard.stats().vector_count, 3);
}

#[test]
fn records_already_in_the_snapshot_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    let (stored, deleted) = write_history(&shard);
    let wal_path = dir.path().join(WAL_FILE_NAME);
    let wal_before_snapshot = fs::read(&wal_path).unwrap();
    shard.snapshot().unwrap();
    drop(shard);
    // Simulate a crash after the snapshot rename but before the log
    // truncation: the old log is back.
    fs::write(&wal_path, wal_before_snapshot).unwrap();

    let (shard, report) = Shard::open(common::settings(dir.path())).unwrap();

    assert_eq!(report.wal_records_skipped, 12);
    assert_eq!(report.wal_records_replayed, 0);
    assert_contents(&shard, &stored, &deleted);
}

#[test]
fn dimension_and_fingerprint_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    shard
        .upsert(
            vec![common::item("a", vec![1.0, 0.0, 0.0])],
            "model-a".into(),
        )
        .unwrap();
    shard.delete(vec!["a".into()]).unwrap();
    shard.snapshot().unwrap();
    drop(shard);

    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();

    let stats = shard.stats();
    assert_eq!(stats.vector_count, 0);
    assert_eq!(stats.dimension, 3);
    assert_eq!(stats.model_fingerprint, "model-a");
    let error = shard
        .upsert(vec![common::item("b", vec![1.0, 0.0])], String::new())
        .unwrap_err();
    assert!(
        matches!(error, ShardError::DimensionMismatch { expected: 3, .. }),
        "{error}"
    );
    let error = shard
        .search(&[vec![1.0, 0.0, 0.0]], 1, "model-b", &[], SearchParams::default())
        .unwrap_err();
    assert!(
        matches!(error, ShardError::FingerprintMismatch { .. }),
        "{error}"
    );
}

#[test]
fn configured_dimension_must_match_stored_data() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    shard
        .upsert(vec![common::item("a", vec![1.0, 0.0, 0.0])], String::new())
        .unwrap();
    drop(shard);

    let error = Shard::open(Settings {
        dimension: Some(4),
        ..common::settings(dir.path())
    })
    .unwrap_err();

    assert!(
        matches!(
            error,
            ShardError::DimensionConflict {
                configured: 4,
                stored: 3,
                ..
            }
        ),
        "{error}"
    );
    Shard::open(Settings {
        dimension: Some(3),
        ..common::settings(dir.path())
    })
    .unwrap();
}

#[test]
fn second_process_cannot_open_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();

    let error = Shard::open(common::settings(dir.path())).unwrap_err();
    assert!(matches!(error, ShardError::DataDirLocked { .. }), "{error}");

    drop(shard);
    Shard::open(common::settings(dir.path())).unwrap();
}

#[test]
fn corrupt_snapshot_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let (shard, _) = Shard::open(common::settings(dir.path())).unwrap();
    write_history(&shard);
    shard.snapshot().unwrap();
    drop(shard);
    let snapshot_path = dir.path().join(SNAPSHOT_FILE_NAME);
    let mut bytes = fs::read(&snapshot_path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&snapshot_path, bytes).unwrap();

    let error = Shard::open(common::settings(dir.path())).unwrap_err();

    assert!(matches!(error, ShardError::Snapshot(_)), "{error}");
}

#[test]
fn missing_data_dir_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("nested/index-7");

    let (shard, report) = Shard::open(common::settings(&data_dir)).unwrap();

    assert_eq!(report.items, 0);
    assert!(data_dir.join(WAL_FILE_NAME).exists());
    shard
        .upsert(vec![common::item("a", vec![1.0])], String::new())
        .unwrap();
}
