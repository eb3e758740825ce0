//! Shard and replica faults seen through the gateway: the services run as
//! separate processes on loopback, and single index-svc processes are killed
//! or stopped with SIGSTOP while the gateway serves.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use densebert4ret_datasets::{catalog_items, default_data_dir, png_bytes, tinted_image, CatalogItem, Split, SplitData};
use densebert4ret_proto::v1::gateway_client::GatewayClient;
use densebert4ret_proto::v1::index_client::IndexClient;
use densebert4ret_proto::v1::{
    search_request, DeleteRequest, IndexGetRequest, SearchRequest, SearchResponse, StatsRequest, UpsertRequest,
    UpsertResponse,
};
use densebert4ret_tests::{replica_name, ClusterOptions, LocalCluster};
use gateway::routing::shard_for_id;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Upper bound on any single call in these tests, so that a hang fails the
/// test instead of blocking it.
const CALL_LIMIT: Duration = Duration::from_secs(60);

fn upsert_request(data: &SplitData, item: &CatalogItem, skip_existing: bool) -> UpsertRequest {
    UpsertRequest {
        id: item.id.clone(),
        image: png_bytes(&tinted_image(data, item.index).unwrap()).unwrap(),
        metadata: item.metadata().into_iter().collect(),
        skip_existing,
    }
}

async fn upsert(gateway: &mut GatewayClient<Channel>, requests: Vec<UpsertRequest>) -> UpsertResponse {
    tokio::time::timeout(CALL_LIMIT, gateway.upsert(tokio_stream::iter(requests)))
        .await
        .expect("upsert finished in time")
        .expect("upsert stream")
        .into_inner()
}

async fn search(
    gateway: &mut GatewayClient<Channel>,
    image: &[u8],
    allow_partial: Option<bool>,
) -> Result<SearchResponse, Status> {
    let mut request = tonic::Request::new(SearchRequest {
        reference: Some(search_request::Reference::Image(image.to_vec())),
        text: "make it blue".into(),
        k: 10,
        allow_partial,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(30));
    tokio::time::timeout(CALL_LIMIT, gateway.search(request))
        .await
        .expect("search finished in time")
        .map(tonic::Response::into_inner)
}

fn missing_ids(response: &SearchResponse) -> Vec<u32> {
    response.missing_shards.iter().map(|failure| failure.shard_id).collect()
}

fn result_shards(response: &SearchResponse) -> BTreeSet<u32> {
    response.items.iter().map(|item| item.shard).collect()
}

/// Sum over shards of the item count of each shard's emptiest replica.
async fn stored_on_every_replica(gateway: &mut GatewayClient<Channel>) -> u64 {
    let stats = gateway.stats(StatsRequest {}).await.expect("stats").into_inner();
    stats
        .shards
        .iter()
        .map(|shard| shard.replicas.iter().map(|replica| replica.vector_count).min().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_shards_give_partial_results() {
    let data = SplitData::load(&default_data_dir(), Split::Test).expect("Fashion-MNIST test split");
    let items: Vec<CatalogItem> = catalog_items(&data).into_iter().take(90).collect();
    let options = ClusterOptions {
        gateway_env: vec![
            ("GATEWAY__SHARD_TIMEOUT_MS".into(), "1500".into()),
            ("GATEWAY__READ_ATTEMPT_TIMEOUT_MS".into(), "1000".into()),
        ],
        ..ClusterOptions::shards(3)
    };
    let mut cluster = LocalCluster::start_with(options).await.expect("cluster starts");
    let mut gateway = cluster.gateway().await.expect("gateway connection");

    let requests = items.iter().map(|item| upsert_request(&data, item, false)).collect();
    assert_eq!(upsert(&mut gateway, requests).await.upserted, 90);
    let image = png_bytes(&tinted_image(&data, items[0].index).unwrap()).unwrap();

    let complete = search(&mut gateway, &image, None).await.expect("search with every shard up");
    assert!(!complete.partial);
    assert!(complete.missing_shards.is_empty());
    assert_eq!(complete.items.len(), 10);

    // A stopped shard keeps its connections open but never responds, so the
    // search returns the others' results once the shard deadline passes.
    cluster.processes.pause(&replica_name(1, 0)).expect("SIGSTOP shard 1");
    let stalled = search(&mut gateway, &image, None).await;
    cluster.processes.resume(&replica_name(1, 0)).expect("SIGCONT shard 1");
    let stalled = stalled.expect("search with shard 1 stopped");
    assert!(stalled.partial, "a stopped shard makes the response partial");
    assert_eq!(missing_ids(&stalled), [1]);
    assert_eq!(stalled.missing_shards[0].code, "DEADLINE_EXCEEDED", "{:?}", stalled.missing_shards[0]);
    assert_eq!(stalled.items.len(), 10, "the other two shards hold 10 matches");
    assert!(!result_shards(&stalled).contains(&1), "no results from the stopped shard");

    let resumed = search(&mut gateway, &image, None).await.expect("search after SIGCONT");
    assert!(!resumed.partial, "shard 1 responds again: {:?}", resumed.missing_shards);
    let ids = |response: &SearchResponse| response.items.iter().map(|item| item.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&resumed), ids(&complete));

    // A killed shard refuses connections.
    cluster.processes.kill(&replica_name(2, 0)).expect("kill shard 2");
    let killed = search(&mut gateway, &image, None).await.expect("search with shard 2 killed");
    assert!(killed.partial);
    assert_eq!(missing_ids(&killed), [2]);
    assert_eq!(killed.missing_shards[0].code, "UNAVAILABLE", "{:?}", killed.missing_shards[0]);
    assert!(
        killed.missing_shards[0].message.contains(&cluster.replica_addresses[2][0]),
        "the reason names the replica: {}",
        killed.missing_shards[0].message
    );
    assert!(!result_shards(&killed).contains(&2));
    let expected: Vec<String> = complete.items.iter().filter(|item| item.shard != 2).map(|item| item.id.clone()).collect();
    assert_eq!(ids(&killed)[..expected.len()], expected[..], "the surviving shards' results keep their order");

    let strict = search(&mut gateway, &image, Some(false)).await.expect_err("allow_partial=false fails");
    assert_eq!(strict.code(), Code::Unavailable, "{}", strict.message());
    assert!(strict.message().contains("shard 2"), "{}", strict.message());

    // With no shard left the search fails instead of returning nothing.
    cluster.processes.kill(&replica_name(0, 0)).expect("kill shard 0");
    cluster.processes.kill(&replica_name(1, 0)).expect("kill shard 1");
    let none = search(&mut gateway, &image, None).await.expect_err("search with every shard down");
    assert_eq!(none.code(), Code::Unavailable, "{}", none.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_mask_a_dead_replica() {
    let data = SplitData::load(&default_data_dir(), Split::Test).expect("Fashion-MNIST test split");
    let items: Vec<CatalogItem> = catalog_items(&data).into_iter().take(120).collect();
    let options = ClusterOptions { replicas: 2, ..ClusterOptions::shards(2) };
    let mut cluster = LocalCluster::start_with(options).await.expect("cluster starts");
    let mut gateway = cluster.gateway().await.expect("gateway connection");

    // An ingest stream cut off after its first batch of 32 was stored.
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let mut streaming = gateway.clone();
    let interrupted = tokio::spawn(async move {
        streaming.upsert(tokio_stream::wrappers::ReceiverStream::new(receiver)).await
    });
    for item in &items[..48] {
        sender.send(upsert_request(&data, item, false)).await.expect("stream open");
    }
    let mut stored_before = 0;
    for _ in 0..600 {
        stored_before = stored_on_every_replica(&mut gateway).await;
        if stored_before >= 32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    interrupted.abort();
    let _ = interrupted.await;
    drop(sender);
    assert_eq!(stored_before, 32, "the first batch was stored on every replica before the cut");

    // Sending the whole catalog again with skip_existing stores the rest and
    // skips what was stored.
    let requests = items.iter().map(|item| upsert_request(&data, item, true)).collect();
    let resumed = upsert(&mut gateway, requests).await;
    assert_eq!(resumed.results.len(), items.len());
    assert!(resumed.results.iter().all(|result| result.ok), "{:?}", resumed.results.iter().find(|result| !result.ok));
    assert_eq!(resumed.skipped, 32);
    assert_eq!(resumed.upserted, items.len() as u32 - 32);
    assert_eq!(resumed.failed, 0);
    let skipped: Vec<&str> = resumed.results.iter().filter(|result| result.skipped).map(|result| result.id.as_str()).collect();
    let first_batch: Vec<&str> = items[..32].iter().map(|item| item.id.as_str()).collect();
    assert_eq!(skipped, first_batch, "exactly the stored items are skipped");
    let stats = gateway.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.total_vectors, items.len() as u64);
    for shard in &stats.shards {
        let counts: Vec<u64> = shard.replicas.iter().map(|replica| replica.vector_count).collect();
        assert_eq!(counts.len(), 2);
        assert_eq!(counts[0], counts[1], "shard {} replicas hold the same items", shard.shard_id);
    }

    // One id twice in one stream, in different batches: the later one is
    // stored on every replica.
    let mut twice = upsert_request(&data, &items[0], false);
    twice.metadata.insert("version".into(), "first".into());
    let mut stream = vec![twice.clone()];
    stream.extend(items[1..40].iter().map(|item| upsert_request(&data, item, false)));
    twice.metadata.insert("version".into(), "second".into());
    stream.push(twice);
    let response = upsert(&mut gateway, stream).await;
    assert_eq!(response.failed, 0);
    let owner = shard_for_id(&items[0].id, 2);
    for address in &cluster.replica_addresses[owner] {
        let mut index = IndexClient::connect(format!("http://{address}")).await.expect("replica connection");
        let stored = index.get(IndexGetRequest { ids: vec![items[0].id.clone()] }).await.expect("get").into_inner();
        assert_eq!(stored.items[0].metadata["version"], "second", "replica {address} holds the stream's last version");
    }

    // Reads go on through the live replica of shard 0, with no partial marker.
    let image = png_bytes(&tinted_image(&data, items[5].index).unwrap()).unwrap();
    let before = search(&mut gateway, &image, None).await.expect("search with every replica up");
    cluster.processes.kill(&replica_name(0, 0)).expect("kill replica 0 of shard 0");
    let dead = &cluster.replica_addresses[0][0];
    for attempt in 0..6 {
        let after = search(&mut gateway, &image, None).await.expect("search with a dead replica");
        assert!(!after.partial, "attempt {attempt}: {:?}", after.missing_shards);
        let ids = |response: &SearchResponse| response.items.iter().map(|item| item.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&after), ids(&before), "attempt {attempt}");
    }

    // Writes to shard 0 fail on the dead replica, and each item's result names it; writes
    // to shard 1 are acknowledged.
    let new_items: Vec<CatalogItem> = catalog_items(&data).into_iter().skip(200).take(20).collect();
    let owners: HashSet<usize> = new_items.iter().map(|item| shard_for_id(&item.id, 2)).collect();
    assert_eq!(owners.len(), 2, "the new items cover both shards");
    let requests = new_items.iter().map(|item| upsert_request(&data, item, false)).collect();
    let written = upsert(&mut gateway, requests).await;
    for (item, result) in new_items.iter().zip(&written.results) {
        assert_eq!(result.id, item.id);
        if shard_for_id(&item.id, 2) == 0 {
            assert!(!result.ok, "{} on shard 0 is not acknowledged", item.id);
            assert!(result.error.contains(dead.as_str()), "the error names the dead replica: {}", result.error);
            assert!(result.error.contains("1 of 2 replicas"), "{}", result.error);
        } else {
            assert!(result.ok, "{} on shard 1: {}", item.id, result.error);
        }
    }

    let on_shard = |shard: usize| items.iter().find(|item| shard_for_id(&item.id, 2) == shard).unwrap().id.clone();
    let deleted = gateway
        .delete(DeleteRequest { ids: vec![on_shard(0), on_shard(1)] })
        .await
        .expect("delete with a dead replica")
        .into_inner();
    assert_eq!(deleted.deleted, 1, "the shard 1 id is deleted");
    assert_eq!(deleted.failed.len(), 1);
    assert_eq!(deleted.failed[0].id, on_shard(0));
    assert!(deleted.failed[0].error.contains(dead.as_str()), "{}", deleted.failed[0].error);
}
