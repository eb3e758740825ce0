//! Tests of encoder-svc as a separate process serving the trained model:
//! admission, deadlines, cancellation, mixed batches and bad input.
//!
//! Each test starts its own encoder-svc on free 127.0.0.1 ports with one
//! libtorch thread, and reads its Prometheus endpoint to see what happened
//! inside.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use densebert4ret_proto::v1::encoder_client::EncoderClient;
use densebert4ret_proto::v1::{embed_query_request, EmbedImagesRequest, EmbedQueryRequest};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A running encoder-svc, killed on drop.
struct Encoder {
    child: Child,
    address: String,
    metrics_address: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Encoder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns the trained model to serve: `ENCODER__MODEL_DIR`, else
/// `DB4R_MODEL_DIR` (which the test script sets to the model it trained),
/// else the default model of the set-up script.
fn model_dir() -> PathBuf {
    for variable in ["ENCODER__MODEL_DIR", "DB4R_MODEL_DIR"] {
        if let Ok(dir) = std::env::var(variable) {
            return PathBuf::from(dir);
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../artifacts/models/fmnist-colours")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local address").port()
}

impl Encoder {
    /// Starts encoder-svc with `settings` (`ENCODER__*` names without the
    /// prefix) on top of test defaults, and waits until it reports SERVING.
    async fn start(settings: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = dir.path().join("encoder.log");
        let port = free_port();
        let metrics_port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_encoder-svc"));
        command
            .env("ENCODER__LISTEN", format!("127.0.0.1:{port}"))
            .env("ENCODER__METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("ENCODER__MODEL_DIR", model_dir())
            .env("ENCODER__DEVICE", "cpu")
            .env("ENCODER__TORCH_THREADS", "1")
            .env("ENCODER__PREPROCESS_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (name, value) in settings {
            command.env(format!("ENCODER__{name}"), value);
        }
        let child = command.spawn().expect("spawn encoder-svc");
        let mut encoder = Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
            metrics_address: format!("127.0.0.1:{metrics_port}"),
            log,
            _dir: dir,
        };
        encoder.wait_serving().await;
        encoder
    }

    async fn wait_serving(&mut self) {
        for _ in 0..600 {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("encoder-svc exited with {status} before reporting SERVING; its log:\n{log}");
            }
            if let Ok(channel) = Endpoint::from_shared(self.address.clone()).expect("endpoint").connect().await {
                let response = HealthClient::new(channel)
                    .check(HealthCheckRequest { service: "densebert4ret.v1.Encoder".into() })
                    .await;
                if response.is_ok_and(|response| response.get_ref().status == ServingStatus::Serving as i32) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!("encoder-svc did not report SERVING; its log:\n{log}");
    }

    async fn client(&self) -> EncoderClient<Channel> {
        let channel = Endpoint::from_shared(self.address.clone()).expect("endpoint").connect().await.expect("connect");
        EncoderClient::new(channel).max_encoding_message_size(usize::MAX).max_decoding_message_size(usize::MAX)
    }

    /// Returns the Prometheus text of the metrics endpoint.
    fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(&self.metrics_address).expect("connect to the metrics endpoint");
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.metrics_address)
            .expect("send the metrics request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read the metrics response");
        text
    }

    /// Sum of the samples of `name` whose labels contain every `labels` pair.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_metric(&self.metrics(), name, labels)
    }
}

fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let matches = labels.iter().all(|(key, expected)| label_text.contains(&format!("{key}=\"{expected}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Encodes a 40x40 PNG whose colours depend on `seed`.
fn png(seed: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([seed.wrapping_mul(37).wrapping_add(x as u8 * 5), (y as u8).wrapping_mul(6), seed.wrapping_mul(91)])
    });
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).expect("encode PNG");
    bytes
}

/// A small PNG whose header declares `width` x `height` pixels while its
/// data contains 40x40: a decompression bomb as far as the header goes.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png(0);
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn query(image: Vec<u8>, texts: &[&str]) -> EmbedQueryRequest {
    EmbedQueryRequest {
        reference: Some(embed_query_request::Reference::Image(image)),
        texts: texts.iter().map(|text| text.to_string()).collect(),
    }
}

fn max_abs_difference(left: &[f32], right: &[f32]) -> f32 {
    assert_eq!(left.len(), right.len(), "embedding lengths differ");
    left.iter().zip(right).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

const SHORT_TEXT: &str = "in red";
const LONG_TEXT: &str = "the same garment but as a long dress in dark navy blue with a pattern";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_matches_single_requests() {
    // A long max_wait lets concurrent requests meet in one batch.
    let encoder =
        Encoder::start(&[("BATCHING__MAX_BATCH_SIZE", "16"), ("BATCHING__MAX_WAIT_MS", "300"), ("BATCHING__MIXED_KINDS", "true")])
            .await;
    let mut client = encoder.client().await;

    // Alone: each request is a batch of one.
    let short_alone = client.embed_query(query(png(1), &[SHORT_TEXT])).await.expect("short query").into_inner();
    let long_alone = client.embed_query(query(png(2), &[LONG_TEXT])).await.expect("long query").into_inner();
    let image_alone = client.embed_images(EmbedImagesRequest { images: vec![png(3)] }).await.expect("image").into_inner();
    assert_eq!(short_alone.timing.expect("timing").batch_size, 1);
    assert_eq!(long_alone.timing.expect("timing").batch_size, 1);

    // Together: one batch with two queries of different lengths and an image.
    let (mut first, mut second, mut third) = (client.clone(), client.clone(), client.clone());
    let (short_batched, long_batched, image_batched) = tokio::join!(
        first.embed_query(query(png(1), &[SHORT_TEXT])),
        second.embed_query(query(png(2), &[LONG_TEXT])),
        third.embed_images(EmbedImagesRequest { images: vec![png(3)] }),
    );
    let short_batched = short_batched.expect("batched short query").into_inner();
    let long_batched = long_batched.expect("batched long query").into_inner();
    let image_batched = image_batched.expect("batched image").into_inner();

    let short_timing = short_batched.timing.expect("timing");
    let long_timing = long_batched.timing.expect("timing");
    let image_timing = image_batched.embeddings[0].timing.expect("timing");
    assert!(short_timing.batch_size > 1, "short query ran in a batch of {}", short_timing.batch_size);
    assert!(long_timing.batch_size > 1, "long query ran in a batch of {}", long_timing.batch_size);
    assert!(image_timing.batch_size > 1, "image ran in a batch of {}", image_timing.batch_size);
    assert!(short_timing.inference_us > 0);

    // The short text was padded to the long one's length in the batch.
    let short_difference = max_abs_difference(&short_alone.embedding, &short_batched.embedding);
    assert!(short_difference < 1e-4, "padded short query differs by {short_difference}");
    let long_difference = max_abs_difference(&long_alone.embedding, &long_batched.embedding);
    assert!(long_difference < 1e-4, "batched long query differs by {long_difference}");
    let image_difference = max_abs_difference(&image_alone.embeddings[0].embedding, &image_batched.embeddings[0].embedding);
    assert!(image_difference < 1e-4, "batched image differs by {image_difference}");

    let batch_histogram_count = encoder.metric("encoder_batch_size_count", &[]);
    assert!(batch_histogram_count >= 4.0, "batch-size histogram has {batch_histogram_count} samples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_rejects_at_once() {
    let encoder = Encoder::start(&[
        ("BATCHING__MAX_BATCH_SIZE", "1"),
        ("BATCHING__MAX_WAIT_MS", "0"),
        ("BATCHING__QUEUE_CAPACITY", "4"),
        ("LIMITS__MAX_IMAGES_PER_REQUEST", "4"),
    ])
    .await;
    let client = encoder.client().await;

    let requests = (0..32u8).map(|seed| {
        let mut client = client.clone();
        async move { client.embed_query(query(png(seed), &[SHORT_TEXT])).await }
    });
    let outcomes = futures::future::join_all(requests).await;

    let mut accepted = 0;
    let mut rejected = 0;
    for outcome in outcomes {
        match outcome {
            Ok(response) => {
                accepted += 1;
                assert_eq!(response.get_ref().embedding.len(), 256);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "unexpected status: {status:?}");
                assert!(status.message().contains("of 4 slots"), "message does not name the queue size: {}", status.message());
                assert!(status.message().contains("retry"), "message does not say what to do: {}", status.message());
                rejected += 1;
            }
        }
    }
    assert!(accepted >= 1, "no request was accepted");
    assert!(rejected >= 1, "no request was rejected although 32 arrived for 4 slots");
    let counted = encoder.metric("encoder_requests_total", &[("method", "EmbedQuery"), ("code", "RESOURCE_EXHAUSTED")]);
    assert_eq!(counted, f64::from(rejected), "rejections counted in the metrics");

    // More images than the queue can ever hold: rejected as out of range.
    let mut client = client.clone();
    let status = client
        .embed_images(EmbedImagesRequest { images: (0..5).map(png).collect() })
        .await
        .expect_err("5 images for 4 slots");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_cancelled_requests_never_run() {
    let encoder = Encoder::start(&[
        ("BATCHING__MAX_BATCH_SIZE", "1"),
        ("BATCHING__MAX_WAIT_MS", "0"),
        ("BATCHING__QUEUE_CAPACITY", "256"),
    ])
    .await;
    let client = encoder.client().await;
    let queries_before = encoder.metric("encoder_inferred_total", &[("kind", "query")]);

    // A deadline that has passed on arrival: rejected before preprocessing.
    let mut request = tonic::Request::new(query(png(1), &[SHORT_TEXT]));
    request.set_timeout(Duration::from_millis(1));
    let status = client.clone().embed_query(request).await.expect_err("1 ms deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("grpc-timeout"), "message does not say what to do: {}", status.message());
    assert_eq!(encoder.metric("encoder_dropped_total", &[("reason", "deadline")]), 1.0);

    // Keep the single worker busy with 200 one-image batches.
    let images_before = encoder.metric("encoder_inferred_total", &[("kind", "image")]);
    let mut busy_client = client.clone();
    let busy = tokio::spawn(async move {
        busy_client.embed_images(EmbedImagesRequest { images: (0..200).map(|seed| png(seed as u8)).collect() }).await
    });
    let waited = Instant::now();
    // Queue depth counts admitted items, which are still being preprocessed
    // at first. The handler submits all 200 before the worker finishes one,
    // so a finished image means every busy image is in the queue.
    while encoder.metric("encoder_inferred_total", &[("kind", "image")]) <= images_before
        || encoder.metric("encoder_queue_depth", &[]) < 50.0
    {
        assert!(waited.elapsed() < Duration::from_secs(60), "the busy request never filled the queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Queued behind the busy request, this query outlives its deadline.
    let mut request = tonic::Request::new(query(png(2), &[SHORT_TEXT]));
    request.set_timeout(Duration::from_millis(100));
    let status = client.clone().embed_query(request).await.expect_err("100 ms deadline behind 200 images");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // This client gives up: its future is dropped while the job is queued.
    let mut cancelling = client.clone();
    let gave_up = tokio::time::timeout(Duration::from_millis(100), cancelling.embed_query(query(png(3), &[SHORT_TEXT]))).await;
    assert!(gave_up.is_err(), "the query finished while 200 images were ahead of it");

    let busy = busy.await.expect("busy task").expect("busy request");
    assert_eq!(busy.get_ref().embeddings.len(), 200);

    // The worker reaches both dropped jobs after the busy request's images.
    let waited = Instant::now();
    loop {
        let expired = encoder.metric("encoder_dropped_total", &[("reason", "deadline")]);
        let cancelled = encoder.metric("encoder_dropped_total", &[("reason", "cancelled")]);
        if expired >= 2.0 && cancelled >= 1.0 {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "dropped jobs never counted: deadline {expired}, cancelled {cancelled}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queries_after = encoder.metric("encoder_inferred_total", &[("kind", "query")]);
    assert_eq!(queries_after, queries_before, "a dropped query reached the model");
    let images = encoder.metric("encoder_inferred_total", &[("kind", "image")]);
    assert!(images >= 200.0, "only {images} images reached the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_statuses() {
    let encoder = Encoder::start(&[
        ("LIMITS__MAX_IMAGE_PIXELS", "1000000"),
        ("LIMITS__MAX_MESSAGE_BYTES", "1048576"),
        ("LIMITS__TOKEN_OVERFLOW", "reject"),
    ])
    .await;
    let mut client = encoder.client().await;

    let status = client.embed_query(query(b"not an image".to_vec(), &[SHORT_TEXT])).await.expect_err("undecodable");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("unrecognised image format"), "{}", status.message());

    let bomb = png_declaring(60_000, 60_000);
    let status = client.embed_query(query(bomb.clone(), &[SHORT_TEXT])).await.expect_err("huge declared image");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("60000x60000"), "{}", status.message());
    assert!(status.message().contains("MAX_IMAGE_PIXELS"), "{}", status.message());

    let status = client.embed_query(query(png(1), &["   "])).await.expect_err("empty text");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("empty"), "{}", status.message());

    let status = client.embed_query(query(png(1), &[])).await.expect_err("no text");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let long_text = "blue ".repeat(100);
    let status = client.embed_query(query(png(1), &[&long_text])).await.expect_err("too many tokens");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("32"), "message does not name the token limit: {}", status.message());
    assert!(status.message().contains("truncate"), "message does not name the fix: {}", status.message());

    let oversized = vec![0u8; 2 * 1024 * 1024];
    let status = client.embed_images(EmbedImagesRequest { images: vec![oversized] }).await.expect_err("2 MiB message");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("1048576"), "{}", status.message());
    assert!(status.message().contains("MAX_MESSAGE_BYTES"), "{}", status.message());

    // In EmbedImages one bad image gets its own error and the others succeed.
    let response = client
        .embed_images(EmbedImagesRequest { images: vec![png(1), b"junk".to_vec(), bomb] })
        .await
        .expect("partly bad request")
        .into_inner();
    assert_eq!(response.embeddings.len(), 3);
    assert!(response.embeddings[0].error.is_empty(), "{}", response.embeddings[0].error);
    assert_eq!(response.embeddings[0].embedding.len(), 256);
    assert!(response.embeddings[1].error.contains("unrecognised image format"), "{}", response.embeddings[1].error);
    assert!(response.embeddings[2].error.contains("pixels"), "{}", response.embeddings[2].error);

    // The encoder still serves after every rejection.
    let ok = client.embed_query(query(png(1), &[SHORT_TEXT])).await.expect("valid query");
    assert_eq!(ok.get_ref().embedding.len(), 256);
    let invalid = encoder.metric("encoder_requests_total", &[("method", "EmbedQuery"), ("code", "INVALID_ARGUMENT")]);
    assert_eq!(invalid, 3.0);
}
