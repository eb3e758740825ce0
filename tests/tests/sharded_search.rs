//! Exact search over four index-svc shards, through the gateway's own
//! routing, fan-out and merge, against one index-svc process holding the
//! same vectors: the global top-k must be identical.

use std::time::Duration;

use densebert4ret_proto::v1::index_client::IndexClient;
use densebert4ret_proto::v1::{IndexItem, IndexSearchRequest, IndexUpsertRequest, QueryVector, ScoredItem};
use densebert4ret_tests::IndexProcesses;
use gateway::routing::shard_for_id;
use gateway::{connect_shards, fan_out, FanOutOptions, GatewaySettings, ShardReplicas};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::transport::Channel;

const VECTORS: usize = 100_000;
const DIMENSION: usize = 64;
const SHARDS: usize = 4;
const QUERIES: usize = 40;
const K: u32 = 20;
const UPSERT_BATCH: usize = 2_000;
const FINGERPRINT: &str = "sharded-search-test";

fn unit_vector(random: &mut ChaCha8Rng) -> Vec<f32> {
    let mut vector: Vec<f32> = (0..DIMENSION).map(|_| random.gen_range(-1.0f32..1.0)).collect();
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    for value in &mut vector {
        *value /= norm;
    }
    vector
}

async fn client(address: &str) -> IndexClient<Channel> {
    IndexClient::connect(format!("http://{address}"))
        .await
        .expect("index-svc connection")
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
}

async fn upsert_all(client: &mut IndexClient<Channel>, items: Vec<IndexItem>) {
    for chunk in items.chunks(UPSERT_BATCH) {
        let request = IndexUpsertRequest { items: chunk.to_vec(), model_fingerprint: FINGERPRINT.into() };
        client.upsert(request).await.expect("upsert");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_exact_search_matches_unsharded() {
    // Process 0 stores every vector; processes 1..=4 are the shards.
    let settings = [("INDEX__FSYNC", "false".to_string()), ("INDEX__INDEX_FACTORY", "Flat".to_string())];
    let processes = IndexProcesses::start(1 + SHARDS, &settings).await.expect("index-svc processes start");

    let mut random = ChaCha8Rng::seed_from_u64(7);
    let items: Vec<IndexItem> = (0..VECTORS)
        .map(|index| IndexItem { id: format!("vector-{index:06}"), vector: unit_vector(&mut random), ..Default::default() })
        .collect();
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|_| unit_vector(&mut random)).collect();

    let mut per_shard: Vec<Vec<IndexItem>> = vec![Vec::new(); SHARDS];
    for item in &items {
        per_shard[shard_for_id(&item.id, SHARDS)].push(item.clone());
    }
    assert!(per_shard.iter().all(|shard| shard.len() > VECTORS / SHARDS / 2), "routing spreads the ids");
    let mut unsharded = client(&processes.addresses[0]).await;
    upsert_all(&mut unsharded, items).await;
    for (shard, shard_items) in per_shard.into_iter().enumerate() {
        upsert_all(&mut client(&processes.addresses[1 + shard]).await, shard_items).await;
    }

    let gateway_settings = GatewaySettings {
        shards: processes.addresses[1..].iter().map(|address| ShardReplicas::parse(&format!("http://{address}"))).collect(),
        shard_timeout_ms: 30_000,
        read_attempt_timeout_ms: 30_000,
        ..GatewaySettings::default()
    };
    let shards = connect_shards(&gateway_settings).expect("shard clients");

    for (number, query) in queries.into_iter().enumerate() {
        let request = IndexSearchRequest {
            queries: vec![QueryVector { values: query }],
            k: K,
            model_fingerprint: FINGERPRINT.into(),
            ..Default::default()
        };
        let expected: Vec<ScoredItem> = unsharded
            .search(request.clone())
            .await
            .expect("unsharded search")
            .into_inner()
            .results
            .remove(0)
            .items;
        let options = FanOutOptions {
            deadline: tokio::time::Instant::now() + Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(30),
            allow_partial: false,
        };
        let merged = fan_out(&shards, request, K as usize, options).await.expect("fan-out search");

        assert!(merged.missing.is_empty(), "query {number}: missing shards {:?}", merged.missing);
        assert_eq!(expected.len(), K as usize, "query {number}: unsharded result size");
        let expected_ids: Vec<&str> = expected.iter().map(|item| item.id.as_str()).collect();
        let merged_ids: Vec<&str> = merged.items.iter().map(|item| item.id.as_str()).collect();
        assert_eq!(merged_ids, expected_ids, "query {number}: ids or order differ");
        for (found, wanted) in merged.items.iter().zip(&expected) {
            assert!(
                (found.score - wanted.score).abs() <= 1e-5,
                "query {number}: {} scored {} sharded and {} unsharded",
                found.id,
                found.score,
                wanted.score
            );
            assert_eq!(found.shard as usize, shard_for_id(&found.id, SHARDS), "query {number}: {} came from the wrong shard", found.id);
        }
    }
}
