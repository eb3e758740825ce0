//! Crash and restart tests against the `index-svc` binary: SIGKILL during
//! acknowledged writes, deletes that must stay deleted for every index
//! family, damaged log tails, and configuration errors.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use common::process::ShardProcess;
use densebert4ret_proto::v1::index_client::IndexClient;
use densebert4ret_proto::v1::{
    IndexDeleteRequest, IndexGetRequest, IndexItem, IndexSearchRequest, IndexSnapshotRequest,
    IndexStatsRequest, IndexTrainRequest, IndexUpsertRequest, QueryVector, SearchParams,
};
use index_svc::wal::WAL_FILE_NAME;
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::Code;

const DIMENSION: usize = 16;

fn index_item(id: &str, vector: Vec<f32>) -> IndexItem {
    IndexItem {
        id: id.to_owned(),
        vector,
        metadata: HashMap::from([("id".to_owned(), id.to_owned())]),
        image_features: Vec::new(),
    }
}

async fn upsert(client: &mut IndexClient<Channel>, items: Vec<IndexItem>) {
    client
        .upsert(IndexUpsertRequest {
            items,
            model_fingerprint: "model-a".into(),
        })
        .await
        .expect("upsert is acknowledged");
}

async fn search_ids(
    client: &mut IndexClient<Channel>,
    query: &[f32],
    k: u32,
    params: Option<SearchParams>,
) -> Vec<String> {
    let response = client
        .search(IndexSearchRequest {
            queries: vec![QueryVector {
                values: query.to_vec(),
            }],
            k,
            model_fingerprint: "model-a".into(),
            exclude_ids: Vec::new(),
            params,
        })
        .await
        .expect("search succeeds")
        .into_inner();
    response.results[0]
        .items
        .iter()
        .map(|item| item.id.clone())
        .collect()
}

/// Returns the stored vector of each id, or `None` for an id not found.
async fn get_vectors(
    client: &mut IndexClient<Channel>,
    ids: &[String],
) -> HashMap<String, Option<Vec<f32>>> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(500) {
        match client
            .get(IndexGetRequest {
                ids: chunk.to_vec(),
            })
            .await
        {
            Ok(response) => {
                for item in response.into_inner().items {
                    found.insert(item.id, Some(item.vector));
                }
            }
            Err(status) => {
                assert_eq!(status.code(), Code::NotFound, "{status:?}");
                // Fetch one by one to tell present ids from missing ones.
                for id in chunk {
                    let response = client
                        .get(IndexGetRequest {
                            ids: vec![id.clone()],
                        })
                        .await;
                    let vector = response
                        .ok()
                        .map(|response| response.into_inner().items[0].vector.clone());
                    found.insert(id.clone(), vector);
                }
            }
        }
    }
    found
}

fn random_vectors(seed: u64, count: usize) -> Vec<Vec<f32>> {
    let mut rng = common::rng(seed);
    (0..count)
        .map(|_| common::random_unit_vector(&mut rng, DIMENSION))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_every_acknowledged_upsert() {
    let dir = tempfile::tempdir().unwrap();
    let dimension = DIMENSION.to_string();
    let settings = [("dimension", dimension.as_str()), ("fsync", "true")];
    let process = ShardProcess::start(dir.path(), &settings);

    const WRITERS: usize = 4;
    const TARGET_ACKNOWLEDGED: usize = 1000;
    let acknowledged: Arc<Mutex<HashMap<String, Vec<f32>>>> = Arc::default();
    let (reached, mut reached_receiver) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let mut client = process.client().await;
        let acknowledged = Arc::clone(&acknowledged);
        let reached = reached.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = common::rng(100 + writer as u64);
            // Bounded: the writer stops at its first failure, which the kill
            // causes, or after 2,000 writes.
            for sequence in 0..2000 {
                let id = format!("w{writer}-{sequence}");
                let vector = common::random_unit_vector(&mut rng, DIMENSION);
                let result = client
                    .upsert(IndexUpsertRequest {
                        items: vec![index_item(&id, vector.clone())],
                        model_fingerprint: "model-a".into(),
                    })
                    .await;
                if result.is_err() {
                    return;
                }
                let mut acknowledged = acknowledged.lock().await;
                acknowledged.insert(id, vector);
                if acknowledged.len() >= TARGET_ACKNOWLEDGED {
                    let _ = reached.send(true);
                }
            }
        }));
    }
    reached_receiver
        .wait_for(|reached| *reached)
        .await
        .expect("writers reach the target");
    // The writers are still sending while the process dies.
    process.kill();
    for writer in writers {
        writer.await.unwrap();
    }

    let acknowledged = acknowledged.lock().await.clone();
    assert!(acknowledged.len() >= TARGET_ACKNOWLEDGED);
    let restarted = ShardProcess::start(dir.path(), &settings);
    let mut client = restarted.client().await;
    let ids: Vec<String> = acknowledged.keys().cloned().collect();
    let stored = get_vectors(&mut client, &ids).await;
    for (id, vector) in &acknowledged {
        let found = stored.get(id).cloned().flatten();
        assert_eq!(found.as_ref(), Some(vector), "acknowledged id {id}");
    }
    let stats = client
        .stats(IndexStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.vector_count >= acknowledged.len() as u64);
}

/// Upserts 600 vectors, deletes ids 0..40, takes a snapshot, replaces ids
/// 40..60 and deletes ids 60..100, then kills the process and restarts it.
/// Deletes before the snapshot come back from the snapshot and later ones
/// from the log.
async fn deleted_ids_stay_deleted(factory: &str, extra: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let dimension = DIMENSION.to_string();
    let mut settings = vec![
        ("dimension", dimension.as_str()),
        ("index_factory", factory),
        ("metric", "l2"),
    ];
    settings.extend_from_slice(extra);
    let vectors = random_vectors(7, 600);
    let ids: Vec<String> = (0..vectors.len()).map(|i| format!("item-{i}")).collect();
    let deleted: Vec<String> = ids[..40].iter().chain(&ids[60..100]).cloned().collect();
    let replacements = random_vectors(8, 20);

    let process = ShardProcess::start(dir.path(), &settings);
    let mut client = process.client().await;
    for chunk in (0..vectors.len()).collect::<Vec<_>>().chunks(100) {
        let items = chunk
            .iter()
            .map(|&i| index_item(&ids[i], vectors[i].clone()))
            .collect();
        upsert(&mut client, items).await;
    }
    client
        .delete(IndexDeleteRequest {
            ids: ids[..40].to_vec(),
        })
        .await
        .unwrap();
    client.snapshot(IndexSnapshotRequest {}).await.unwrap();
    let items = (40..60)
        .map(|i| index_item(&ids[i], replacements[i - 40].clone()))
        .collect();
    upsert(&mut client, items).await;
    let response = client
        .delete(IndexDeleteRequest {
            ids: ids[60..100].to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.deleted, 40);
    let stats = client
        .stats(IndexStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.wal_records, 2, "{factory}: replace and delete follow the snapshot");
    process.kill();

    let restarted = ShardProcess::start(dir.path(), &settings);
    let mut client = restarted.client().await;
    let stats = client
        .stats(IndexStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.vector_count, 520, "{factory}");
    assert_eq!(stats.index_type, factory);
    let stored = get_vectors(&mut client, &deleted).await;
    for id in &deleted {
        assert_eq!(stored[id], None, "{factory}: deleted id {id} came back");
    }
    let replaced: Vec<String> = ids[40..60].to_vec();
    let stored = get_vectors(&mut client, &replaced).await;
    for (offset, id) in replaced.iter().enumerate() {
        assert_eq!(
            stored[id].as_ref(),
            Some(&replacements[offset]),
            "{factory}: replaced id {id}"
        );
    }
    // Searching with the deleted vectors themselves never returns them.
    let deleted_positions = (0..40).chain(60..100);
    for position in deleted_positions {
        let hits = search_ids(&mut client, &vectors[position], 20, None).await;
        assert_eq!(hits.len(), 20, "{factory}: k results");
        for hit in &hits {
            assert!(!deleted.contains(hit), "{factory}: search returned deleted {hit}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ids_stay_deleted_flat() {
    deleted_ids_stay_deleted("Flat", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ids_stay_deleted_ivf() {
    deleted_ids_stay_deleted("IVF8,Flat", &[("train_threshold", "300"), ("nprobe", "8")])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ids_stay_deleted_hnsw() {
    // A fraction of 1 keeps the tombstones until the restart rebuilds.
    deleted_ids_stay_deleted("HNSW16", &[("tombstone_rebuild_fraction", "1.0")]).await;
}

/// Writes `count` single-item upserts, kills the process, and returns the
/// vectors by id.
async fn write_and_kill(dir: &Path, count: usize) -> Vec<(String, Vec<f32>)> {
    let dimension = DIMENSION.to_string();
    let process = ShardProcess::start(dir, &[("dimension", dimension.as_str())]);
    let mut client = process.client().await;
    let vectors = random_vectors(11, count);
    let mut written = Vec::new();
    for (i, vector) in vectors.into_iter().enumerate() {
        let id = format!("item-{i}");
        upsert(&mut client, vec![index_item(&id, vector.clone())]).await;
        written.push((id, vector));
    }
    process.kill();
    written
}

async fn assert_recovered(dir: &Path, written: &[(String, Vec<f32>)]) {
    let dimension = DIMENSION.to_string();
    let process = ShardProcess::start(dir, &[("dimension", dimension.as_str())]);
    let mut client = process.client().await;
    let ids: Vec<String> = written.iter().map(|(id, _)| id.clone()).collect();
    let stored = get_vectors(&mut client, &ids).await;
    let (last, kept) = written.split_last().unwrap();
    for (id, vector) in kept {
        assert_eq!(stored[id].as_ref(), Some(vector), "record of {id} before the damage");
    }
    assert_eq!(stored[&last.0], None, "the damaged final record is discarded");
    let log = process.log.lock().unwrap().join("\n");
    assert!(log.contains("discarded a torn final write-ahead log record"), "{log}");

    // The shard accepts writes after the repair.
    upsert(&mut client, vec![index_item("after", vec![0.25; DIMENSION])]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_log_tail_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_and_kill(dir.path(), 30).await;

    let path = dir.path().join(WAL_FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    assert_recovered(dir.path(), &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_log_tail_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let written = write_and_kill(dir.path(), 30).await;

    let path = dir.path().join(WAL_FILE_NAME);
    let length = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(length - 7).unwrap();
    drop(file);

    assert_recovered(dir.path(), &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_rpc_trains_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dimension = DIMENSION.to_string();
    let settings = [
        ("dimension", dimension.as_str()),
        ("index_factory", "IVF8,Flat"),
        ("train_threshold", "100000"),
    ];
    let process = ShardProcess::start(dir.path(), &settings);
    let mut client = process.client().await;
    let vectors = random_vectors(21, 400);
    let items = vectors
        .iter()
        .enumerate()
        .map(|(i, vector)| index_item(&format!("item-{i}"), vector.clone()))
        .collect();
    upsert(&mut client, items).await;
    let stats = client
        .stats(IndexStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.trained);
    assert_eq!(stats.metric, "inner_product");

    let response = client
        .train(IndexTrainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.trained_on, 400);
    assert!(!response.already_trained);
    let again = client
        .train(IndexTrainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_trained);
    let all_lists = Some(SearchParams {
        nprobe: 8,
        ef_search: 0,
    });
    assert_eq!(search_ids(&mut client, &vectors[3], 1, all_lists).await, ["item-3"]);
    process.kill();

    let restarted = ShardProcess::start(dir.path(), &settings);
    let mut client = restarted.client().await;
    let stats = client
        .stats(IndexStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.trained, "the trained state survives a restart");
    assert_eq!(stats.vector_count, 400);
    assert_eq!(search_ids(&mut client, &vectors[3], 1, all_lists).await, ["item-3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_settings_get_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();

    // An unknown factory string with a configured dimension stops start-up.
    let (status, log) = ShardProcess::try_start(
        &dir.path().join("bad"),
        &[("dimension", "16"), ("index_factory", "IVF8,Banana")],
    )
    .err()
    .expect("start-up fails");
    assert!(!status.success());
    assert!(log.contains("IVF8,Banana"), "{log}");

    // Without a dimension the first upsert reports it.
    let process = ShardProcess::start(&dir.path().join("lazy"), &[("index_factory", "Banana")]);
    let mut client = process.client().await;
    let error = client
        .upsert(IndexUpsertRequest {
            items: vec![index_item("a", vec![1.0; 4])],
            model_fingerprint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.message().contains("Banana"), "{}", error.message());
    drop(process);

    let process = ShardProcess::start(&dir.path().join("good"), &[("dimension", "4")]);
    let mut client = process.client().await;
    let error = client
        .upsert(IndexUpsertRequest {
            items: vec![index_item("a", vec![1.0; 5])],
            model_fingerprint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("dimension 5"), "{}", error.message());

    upsert(&mut client, vec![index_item("a", vec![1.0; 4])]).await;
    let request = |k: u32, params: Option<SearchParams>| IndexSearchRequest {
        queries: vec![QueryVector {
            values: vec![1.0; 4],
        }],
        k,
        model_fingerprint: String::new(),
        exclude_ids: Vec::new(),
        params,
    };
    let error = client.search(request(0, None)).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("k = 0"), "{}", error.message());

    let huge_ef = Some(SearchParams {
        nprobe: 0,
        ef_search: 1 << 20,
    });
    let error = client.search(request(1, huge_ef)).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("ef_search"), "{}", error.message());

    // A Flat index needs no training.
    let trained = client
        .train(IndexTrainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(trained.already_trained);
    assert_eq!(trained.trained_on, 0);
}
