//! The three services as separate processes on loopback, a real Fashion-MNIST
//! catalog, the trained model: composed queries, ingest, deletes, and the
//! error statuses clients see for bad input.

use std::collections::BTreeMap;

use densebert4ret_datasets::{catalog_items, default_data_dir, png_bytes, tinted_image, CatalogItem, Colour, FashionClass, Split, SplitData};
use densebert4ret_proto::v1::gateway_client::GatewayClient;
use densebert4ret_proto::v1::{search_request, DeleteRequest, SearchRequest, SearchResponse, StatsRequest, UpsertRequest};
use densebert4ret_tests::{workspace_root, LocalCluster};
use tonic::transport::Channel;
use tonic::Code;

/// Catalog size: the first test images, about 25 per (class, colour) pair.
const CATALOG_SIZE: usize = 2_000;

async fn ingest(gateway: &mut GatewayClient<Channel>, data: &SplitData, items: &[CatalogItem]) -> u32 {
    let requests: Vec<UpsertRequest> = items
        .iter()
        .map(|item| UpsertRequest {
            id: item.id.clone(),
            image: png_bytes(&tinted_image(data, item.index).unwrap()).unwrap(),
            metadata: item.metadata().into_iter().collect(),
            skip_existing: false,
        })
        .collect();
    let response = gateway.upsert(tokio_stream::iter(requests)).await.expect("upsert stream").into_inner();
    assert_eq!(response.results.len(), items.len());
    assert!(response.results.iter().all(|result| result.ok), "failed items: {:?}",
        response.results.iter().filter(|result| !result.ok).take(3).collect::<Vec<_>>());
    response.upserted
}

fn search(reference: search_request::Reference, text: &str, k: u32) -> SearchRequest {
    SearchRequest { reference: Some(reference), text: text.into(), k, ..Default::default() }
}

fn attributes(response: &SearchResponse) -> Vec<(String, String)> {
    response
        .items
        .iter()
        .map(|item| (item.metadata["class"].clone(), item.metadata["colour"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_serves_composed_queries() {
    let data = SplitData::load(&default_data_dir(), Split::Test).expect("Fashion-MNIST test split");
    let items: Vec<CatalogItem> = catalog_items(&data).into_iter().take(CATALOG_SIZE).collect();

    let cluster = LocalCluster::start(2).await.expect("cluster starts");
    let mut gateway = cluster.gateway().await.expect("gateway connection");

    // Ingest, and every item lands on exactly one shard.
    assert_eq!(ingest(&mut gateway, &data, &items).await, CATALOG_SIZE as u32);
    let stats = gateway.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.total_vectors, CATALOG_SIZE as u64);
    assert_eq!(stats.shards.len(), 2);
    assert!(stats.shards.iter().all(|shard| shard.reachable && shard.stats.as_ref().unwrap().vector_count > 0),
        "both shards hold part of the catalog: {:?}", stats.shards);
    let model = stats.model.expect("model info");
    assert_eq!(model.fingerprint.len(), 16);

    // Red items of several classes, uploaded as image bytes, with a text
    // asking for blue: blue items of the reference's class fill the top.
    let mut exact_top1 = 0;
    let mut class_hits = 0;
    let mut references = 0;
    for class in [FashionClass::Trousers, FashionClass::Sneaker, FashionClass::Bag, FashionClass::Dress] {
        for reference in items.iter().filter(|item| item.class == class && item.colour == Colour::Red).take(2) {
            let image = png_bytes(&tinted_image(&data, reference.index).unwrap()).unwrap();
            let response = gateway
                .search(search(search_request::Reference::Image(image), "make it blue", 5))
                .await
                .expect("search by image")
                .into_inner();
            let found = attributes(&response);
            assert_eq!(found.len(), 5);
            assert!(found.iter().all(|(_, colour)| colour == "blue"), "red {} + \"make it blue\" gave other colours: {found:?}", class.name());
            assert!(response.items.windows(2).all(|pair| pair[0].score >= pair[1].score), "results sorted by score");

            references += 1;
            exact_top1 += usize::from(found[0].0 == class.name());
            class_hits += found.iter().filter(|(found_class, _)| found_class == class.name()).count();
        }
    }
    assert!(references >= 6, "the catalog slice holds red items of the checked classes");
    assert!(exact_top1 * 4 >= references * 3, "top-1 kept the class for only {exact_top1} of {references} references");
    assert!(class_hits * 10 >= references * 5 * 7, "only {class_hits} of {} top-5 results kept the class", references * 5);

    // Search by catalog id: the reference item itself is excluded.
    let reference = items.iter().find(|item| item.class == FashionClass::Sneaker && item.colour == Colour::Green).unwrap();
    let response = gateway
        .search(search(search_request::Reference::CatalogId(reference.id.clone()), "make it red", 10))
        .await
        .expect("search by id")
        .into_inner();
    assert_eq!(response.items.len(), 10);
    assert!(response.items.iter().all(|item| item.id != reference.id), "reference excluded");
    assert_eq!(attributes(&response)[0], ("sneaker".to_string(), "red".to_string()));
    let timing = response.encode_timing.expect("timing");
    assert!(timing.batch_size >= 1, "batch size {}", timing.batch_size);
    assert!(timing.inference_us > 0, "inference time missing");

    // Deleting the best hit removes it from later results.
    let deleted_id = response.items[0].id.clone();
    let deleted = gateway.delete(DeleteRequest { ids: vec![deleted_id.clone(), "no-such-item".into()] }).await.unwrap().into_inner();
    assert_eq!(deleted.deleted, 1);
    assert_eq!(deleted.not_found, vec!["no-such-item".to_string()]);
    let again = gateway
        .search(search(search_request::Reference::CatalogId(reference.id.clone()), "make it red", 10))
        .await
        .unwrap()
        .into_inner();
    assert!(again.items.iter().all(|item| item.id != deleted_id));
    let stats = gateway.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.total_vectors, CATALOG_SIZE as u64 - 1);

    drop(gateway);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clear_statuses() {
    let data = SplitData::load(&default_data_dir(), Split::Test).expect("Fashion-MNIST test split");
    let items: Vec<CatalogItem> = catalog_items(&data).into_iter().take(50).collect();
    let cluster = LocalCluster::start(2).await.expect("cluster starts");
    let mut gateway = cluster.gateway().await.unwrap();
    ingest(&mut gateway, &data, &items).await;
    let image = png_bytes(&tinted_image(&data, 0).unwrap()).unwrap();

    let cases: Vec<(&str, SearchRequest, Code, &str)> = vec![
        ("undecodable image", search(search_request::Reference::Image(b"not an image".to_vec()), "in blue", 5), Code::InvalidArgument, "reference image"),
        ("empty text", search(search_request::Reference::Image(image.clone()), "  ", 5), Code::InvalidArgument, "text is empty"),
        ("k zero", search(search_request::Reference::Image(image.clone()), "in blue", 0), Code::InvalidArgument, "k = 0"),
        ("k above maximum", search(search_request::Reference::Image(image.clone()), "in blue", 100_000), Code::InvalidArgument, "k = 100000"),
        ("unknown catalog id", search(search_request::Reference::CatalogId("fmnist-test-99999".into()), "in blue", 5), Code::NotFound, "fmnist-test-99999"),
        ("missing reference", SearchRequest { reference: None, text: "in blue".into(), k: 5, ..Default::default() }, Code::InvalidArgument, "no reference"),
    ];
    for (name, request, code, mention) in cases {
        let status = gateway.search(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(status.message().contains(mention), "{name}: message {:?} should mention {mention:?}", status.message());
    }

    // A bad item in an ingest stream fails alone; the others are stored.
    let stream = vec![
        UpsertRequest { id: "good-1".into(), image: image.clone(), metadata: Default::default(), skip_existing: false },
        UpsertRequest { id: "broken".into(), image: vec![0x89, b'P', b'N', b'G', 0, 1, 2], metadata: Default::default(), skip_existing: false },
        UpsertRequest { id: String::new(), image: image.clone(), metadata: Default::default(), skip_existing: false },
        UpsertRequest { id: "good-2".into(), image, metadata: BTreeMap::from([("k".to_string(), "v".to_string())]).into_iter().collect(), skip_existing: false },
    ];
    let response = gateway.upsert(tokio_stream::iter(stream)).await.unwrap().into_inner();
    let ok: Vec<bool> = response.results.iter().map(|result| result.ok).collect();
    assert_eq!(ok, [true, false, false, true]);
    assert!(response.results[1].error.contains("image"), "the error names the image: {}", response.results[1].error);
    assert!(response.results[2].error.contains("empty"), "{}", response.results[2].error);
    let stats = gateway.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.total_vectors, 52, "nothing stored was lost and the two good items were added");
}

#[test]
fn grpcurl_lists_services() {
    let grpcurl = std::env::var("DB4R_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".venv"))
        .join("bin/grpcurl");
    assert!(grpcurl.exists(), "{} missing; run scripts/setup.sh", grpcurl.display());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(LocalCluster::start(1)).expect("cluster starts");
    let addresses = [
        (cluster.gateway_address.clone(), "densebert4ret.v1.Gateway"),
        (cluster.encoder_address.clone(), "densebert4ret.v1.Encoder"),
        (cluster.shard_addresses[0].clone(), "densebert4ret.v1.Index"),
    ];
    for (address, service) in addresses {
        let output = std::process::Command::new(&grpcurl).args(["-plaintext", &address, "list"]).output().unwrap();
        let listed = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "grpcurl list {address}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(listed.contains(service), "{service} not listed: {listed}");
        assert!(listed.contains("grpc.health.v1.Health"), "health not listed: {listed}");
    }
    drop(cluster);
}
