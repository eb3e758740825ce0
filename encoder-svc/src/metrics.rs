//! Prometheus metrics of the encoder, recorded through the `metrics` crate
//! and served as text by `metrics-exporter-prometheus`.
//!
//! Names follow the Prometheus conventions: seconds for durations, `_total`
//! for counters.

use std::net::SocketAddr;
use std::time::Duration;

use densebert4ret_common::code_name;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Gauge: items admitted and not yet taken into a batch (preprocessing or
/// waiting in the queue).
pub const QUEUE_DEPTH: &str = "encoder_queue_depth";
/// Histogram: items per forward pass.
pub const BATCH_SIZE: &str = "encoder_batch_size";
/// Histogram with label `stage` (`preprocess`, `queue`, `inference`): time
/// one request spent in each stage, in seconds.
pub const STAGE_SECONDS: &str = "encoder_stage_seconds";
/// Histogram with label `method`: time from arrival to response, in seconds.
pub const REQUEST_SECONDS: &str = "encoder_request_seconds";
/// Counter with labels `method` and `code` (gRPC status name).
pub const REQUESTS_TOTAL: &str = "encoder_requests_total";
/// Counter with label `reason` (`deadline`, `cancelled`): items removed
/// before the forward pass.
pub const DROPPED_TOTAL: &str = "encoder_dropped_total";
/// Counter with label `kind` (`query`, `image`): items that went through a
/// forward pass.
pub const INFERRED_TOTAL: &str = "encoder_inferred_total";
/// Counter: forward passes run.
pub const BATCHES_TOTAL: &str = "encoder_batches_total";

/// Bucket bounds of the latency histograms, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of the batch-size histogram.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the global recorder and starts the HTTP endpoint on `address`
/// (served on a thread of its own). Call once, inside a Tokio runtime.
pub fn install(address: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.into()),
            BATCH_BUCKETS,
        )?
        .set_buckets(LATENCY_BUCKETS)?
        .install()
        .map_err(|error| anyhow::anyhow!("failed to start the metrics endpoint on {address}: {error}"))?;
    describe();
    Ok(())
}

fn describe() {
    describe_gauge!(QUEUE_DEPTH, "Items admitted and not yet taken into a batch.");
    describe_histogram!(BATCH_SIZE, "Items per forward pass.");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Time a request spent in each stage.");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Time from request arrival to response.");
    describe_counter!(REQUESTS_TOTAL, "Requests by method and gRPC status code.");
    describe_counter!(DROPPED_TOTAL, "Items removed before the forward pass, by reason.");
    describe_counter!(INFERRED_TOTAL, "Items that went through a forward pass, by kind.");
    describe_counter!(BATCHES_TOTAL, "Forward passes run.");
}

/// Sets the queue depth gauge.
pub fn set_queue_depth(depth: usize) {
    gauge!(QUEUE_DEPTH).set(depth as f64);
}

/// Records the time one request spent in `stage`.
pub fn record_stage(stage: &'static str, elapsed: Duration) {
    histogram!(STAGE_SECONDS, "stage" => stage).record(elapsed.as_secs_f64());
}

/// Records one finished request.
pub fn record_request(method: &'static str, code: tonic::Code, elapsed: Duration) {
    counter!(REQUESTS_TOTAL, "method" => method, "code" => code_name(code)).increment(1);
    histogram!(REQUEST_SECONDS, "method" => method).record(elapsed.as_secs_f64());
}

/// Counts items removed before the forward pass.
pub fn record_dropped(reason: &'static str, count: usize) {
    counter!(DROPPED_TOTAL, "reason" => reason).increment(count as u64);
}

/// Records one forward pass over `queries` queries and `images` images.
pub fn record_batch(queries: usize, images: usize, inference: Duration) {
    counter!(BATCHES_TOTAL).increment(1);
    histogram!(BATCH_SIZE).record((queries + images) as f64);
    if queries > 0 {
        counter!(INFERRED_TOTAL, "kind" => "query").increment(queries as u64);
    }
    if images > 0 {
        counter!(INFERRED_TOTAL, "kind" => "image").increment(images as u64);
    }
    histogram!(STAGE_SECONDS, "stage" => "batch_inference").record(inference.as_secs_f64());
}

