//! The gRPC server on loopback: the in-process server for the service
//! contract, and the built binary for start-up, shutdown and the final
//! snapshot.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use densebert4ret_proto::v1::index_client::IndexClient;
use densebert4ret_proto::v1::{
    IndexDeleteRequest, IndexGetRequest, IndexItem, IndexSearchRequest, IndexStatsRequest,
    IndexUpsertRequest, QueryVector,
};
use index_svc::server::INDEX_SERVICE_NAME;
use index_svc::Shard;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// In-process server on an ephemeral loopback port.
struct TestServer {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), index_svc::ServeError>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let settings = common::settings(dir.path());
        let max_message_bytes = settings.max_message_bytes;
        let (shard, _) = Shard::open(settings).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(index_svc::serve(
            Arc::new(shard),
            listener,
            max_message_bytes,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            address,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        result.expect("server stops within 10 s").unwrap().unwrap();
    }
}

fn index_item(id: &str, vector: Vec<f32>) -> IndexItem {
    IndexItem {
        id: id.to_owned(),
        vector,
        metadata: HashMap::from([("title".to_owned(), format!("title {id}"))]),
        image_features: densebert4ret_proto::features_to_bytes(&[0.25, 0.5]),
    }
}

fn search_request(query: Vec<f32>, k: u32, fingerprint: &str) -> IndexSearchRequest {
    IndexSearchRequest {
        queries: vec![QueryVector { values: query }],
        k,
        model_fingerprint: fingerprint.to_owned(),
        exclude_ids: Vec::new(),
        params: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_upsert_search_get_delete_stats() {
    let server = TestServer::start().await;
    let mut client = IndexClient::new(server.channel().await);

    let response = client
        .upsert(IndexUpsertRequest {
            items: vec![
                index_item("a", vec![1.0, 0.0]),
                index_item("b", vec![0.0, 1.0]),
                index_item("c", vec![0.6, 0.8]),
            ],
            model_fingerprint: "model-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.upserted, 3);
    assert_eq!(response.replaced, 0);

    let mut request = search_request(vec![1.0, 0.0], 2, "model-a");
    request.exclude_ids = vec!["a".into()];
    let response = client.search(request).await.unwrap().into_inner();
    assert_eq!(response.results.len(), 1);
    let hits = &response.results[0].items;
    let ids: Vec<&str> = hits.iter().map(|hit| hit.id.as_str()).collect();
    assert_eq!(ids, vec!["c", "b"]);
    assert!((hits[0].score - 0.6).abs() < 1e-6);
    assert_eq!(hits[0].shard, 3);
    assert_eq!(hits[0].metadata["title"], "title c");

    let items = client
        .get(IndexGetRequest {
            ids: vec!["c".into(), "a".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(
        items,
        vec![
            index_item("c", vec![0.6, 0.8]),
            index_item("a", vec![1.0, 0.0])
        ]
    );

    let response = client
        .delete(IndexDeleteRequest {
            ids: vec!["a".into(), "zzz".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.deleted, 1);
    assert_eq!(response.not_found, vec!["zzz".to_owned()]);

    let stats = client
        .stats(IndexStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.vector_count, 2);
    assert_eq!(stats.dimension, 2);
    assert_eq!(stats.index_type, "Flat");
    assert_eq!(stats.model_fingerprint, "model-a");
    assert_eq!(stats.shard_id, 3);
    assert_eq!(stats.wal_records, 2);
    assert_eq!(stats.last_snapshot_unix_ms, 0);
    assert!(stats.memory_bytes > 0);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_carry_codes_and_values() {
    let server = TestServer::start().await;
    let mut client = IndexClient::new(server.channel().await);
    client
        .upsert(IndexUpsertRequest {
            items: vec![index_item("a", vec![1.0, 0.0])],
            model_fingerprint: "model-a".into(),
        })
        .await
        .unwrap();

    let status = client
        .search(search_request(vec![1.0, 0.0], 0, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("k = 0"), "{}", status.message());
    assert!(
        status.message().contains("1 to 100"),
        "{}",
        status.message()
    );

    let status = client
        .search(search_request(vec![1.0, 0.0], 101, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let status = client
        .search(search_request(vec![1.0, 0.0, 0.0], 1, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("dimension 3"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("dimension is 2"),
        "{}",
        status.message()
    );

    let status = client
        .search(search_request(vec![f32::NAN, 0.0], 1, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("NaN"), "{}", status.message());

    let duplicate = IndexUpsertRequest {
        items: vec![
            index_item("b", vec![1.0, 0.0]),
            index_item("b", vec![0.0, 1.0]),
        ],
        model_fingerprint: String::new(),
    };
    let status = client.upsert(duplicate).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("\"b\""), "{}", status.message());

    let status = client
        .get(IndexGetRequest {
            ids: vec!["missing-id".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("missing-id"),
        "{}",
        status.message()
    );

    let status = client
        .search(search_request(vec![1.0, 0.0], 1, "model-b"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("\"model-a\""),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("\"model-b\""),
        "{}",
        status.message()
    );
    let fenced_write = IndexUpsertRequest {
        items: vec![index_item("b", vec![1.0, 0.0])],
        model_fingerprint: "model-b".into(),
    };
    assert_eq!(
        client.upsert(fenced_write).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection() {
    let server = TestServer::start().await;
    let channel = server.channel().await;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", INDEX_SERVICE_NAME] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "health of {service:?}"
        );
    }
    assert_eq!(INDEX_SERVICE_NAME, "densebert4ret.v1.Index");

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses
        .message()
        .await
        .unwrap()
        .expect("one reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!(
            "expected a service list, got {:?}",
            response.message_response
        );
    };
    let names: Vec<&str> = list
        .service
        .iter()
        .map(|service| service.name.as_str())
        .collect();
    assert!(names.contains(&"densebert4ret.v1.Index"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    server.stop().await;
}

/// Kills the child process on drop, so that a failing test leaves no server
/// running.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads JSON log lines from the binary until it logs its address.
fn wait_for_address(child: &mut Child) -> SocketAddr {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("serving gRPC") {
                let address = line
                    .split("\"address\":\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .map(str::to_owned);
                let _ = sender.send(address);
            }
        }
    });
    let address = receiver
        .recv_timeout(Duration::from_secs(60))
        .expect("the binary logs its address within 60 s");
    address
        .expect("the serving line has an address field")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_snapshots_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("shard");
    let child = Command::new(env!("CARGO_BIN_EXE_index-svc"))
        .env("INDEX__LISTEN", "127.0.0.1:0")
        .env("INDEX__DATA_DIR", &data_dir)
        .env("INDEX__SHARD_ID", "5")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let address = wait_for_address(&mut child.0);

    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = IndexClient::new(channel);
    client
        .upsert(IndexUpsertRequest {
            items: vec![index_item("a", vec![0.0, 1.0])],
            model_fingerprint: "m".into(),
        })
        .await
        .unwrap();
    let stats = client
        .stats(IndexStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.shard_id, 5);
    assert_eq!(stats.vector_count, 1);
    assert_eq!(stats.wal_records, 1);

    let pid = child.0.id().to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(signalled.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the binary did not stop within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");

    // The final snapshot contains the write, and the log is empty.
    let (shard, report) = Shard::open(common::settings(&data_dir)).unwrap();
    assert_eq!(report.snapshot_items, 1);
    assert_eq!(report.wal_records_replayed, 0);
    assert_eq!(shard.get(&["a".into()]).unwrap()[0].vector, vec![0.0, 1.0]);
}
