//! The `densebert4ret.v1.Encoder` gRPC service.
//!
//! Each request takes its queue slots first, so an overloaded encoder
//! rejects it before spending any work on it. Preprocessing runs on the
//! [`Preprocessor`] pool and the forward pass on a model worker, and the
//! handler only awaits them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use densebert4ret_proto::v1::encoder_server::Encoder;
use densebert4ret_proto::v1::{
    embed_query_request, EmbedImagesRequest, EmbedImagesResponse, EmbedQueryRequest, EmbedQueryResponse, EncodeTiming,
    ImageEmbedding, ModelInfoRequest, ModelInfoResponse,
};
use densebert4ret_proto::{features_from_bytes, features_to_bytes};
use futures::future::join_all;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::batcher::{BatchTiming, Batcher, Embedded, LoadedModel, Reference, Work};
use crate::error::EncoderError;
use crate::metrics;
use crate::preprocess::Preprocessor;

/// Time by which the handler returns DEADLINE_EXCEEDED ahead of the client's
/// deadline. tonic's server enforces `grpc-timeout` too, from a timer started
/// slightly earlier, and returns CANCELLED when that timer fires first. The
/// margin lets the handler's own DEADLINE_EXCEEDED arrive before it.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// gRPC front end of the batcher.
pub struct EncoderService {
    batcher: Batcher,
    preprocessor: Arc<Preprocessor>,
    model: LoadedModel,
    max_batch_size: usize,
}

/// Counts a request in the metrics when it ends, including when tonic drops
/// the handler because the client went away.
struct RequestGuard {
    method: &'static str,
    started: Instant,
    items: usize,
    /// Set once every item was handed to the batcher, which then counts drops.
    submitted: AtomicBool,
    code: Option<Code>,
}

impl RequestGuard {
    fn new(method: &'static str, items: usize) -> Self {
        Self { method, started: Instant::now(), items, submitted: AtomicBool::new(false), code: None }
    }

    fn finish<T>(mut self, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.code = Some(code);
        if code == Code::DeadlineExceeded && !self.submitted.load(Ordering::Relaxed) {
            metrics::record_dropped("deadline", self.items);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        if self.code.is_none() {
            tracing::debug!(method = self.method, "the client went away before the response");
            if !self.submitted.load(Ordering::Relaxed) {
                metrics::record_dropped("cancelled", self.items);
            }
        }
        metrics::record_request(self.method, code, self.started.elapsed());
    }
}

impl EncoderService {
    /// Creates the service over a started batcher.
    pub fn new(batcher: Batcher, preprocessor: Arc<Preprocessor>, model: LoadedModel, max_batch_size: usize) -> Self {
        Self { batcher, preprocessor, model, max_batch_size }
    }

    fn timing(preprocess_us: u64, batch: BatchTiming) -> EncodeTiming {
        EncodeTiming { preprocess_us, queue_us: batch.queue_us, inference_us: batch.inference_us, batch_size: batch.batch_size }
    }

    async fn embed_query_inner(
        &self,
        request: EmbedQueryRequest,
        deadline: Option<Instant>,
        guard: &RequestGuard,
    ) -> Result<EmbedQueryResponse, EncoderError> {
        let slot = self.batcher.admit(1)?;

        let (reference, image_us) = match request.reference {
            Some(embed_query_request::Reference::Image(bytes)) => {
                let (mut results, elapsed) = self.preprocessor.images(vec![bytes]).await?;
                let pixels = results
                    .pop()
                    .ok_or_else(|| EncoderError::Inference("no preprocessing result".into()))?
                    .map_err(|error| error.context("reference image"))?;
                (Reference::Pixels(pixels), elapsed)
            }
            Some(embed_query_request::Reference::ImageFeatures(bytes)) => {
                (Reference::Features(self.parse_features(&bytes)?), 0)
            }
            None => {
                return Err(EncoderError::invalid(
                    "the query has no reference; set `image` (encoded bytes) or `image_features`",
                ))
            }
        };
        let (tokens, text_us) = self.preprocessor.texts(request.texts).await?;
        let preprocess_us = image_us + text_us;
        metrics::record_stage("preprocess", Duration::from_micros(preprocess_us));
        tracing::Span::current().record("preprocess_us", preprocess_us);
        check_deadline(deadline, guard.started)?;

        guard.submitted.store(true, Ordering::Relaxed);
        let (embedded, batch) = self.batcher.submit(Work::Query { reference, tokens }, slot, deadline).await?;
        let Embedded::Query { embedding } = embedded else {
            return Err(EncoderError::Inference("the worker returned an image result for a query".into()));
        };
        record_batch_fields(&batch);
        Ok(EmbedQueryResponse {
            embedding,
            model_fingerprint: self.model.fingerprint.clone(),
            timing: Some(Self::timing(preprocess_us, batch)),
        })
    }

    fn parse_features(&self, bytes: &[u8]) -> Result<Vec<f32>, EncoderError> {
        let expected = self.model.image_feature_dim as usize;
        let features = features_from_bytes(bytes).filter(|features| features.len() == expected).ok_or_else(|| {
            EncoderError::invalid(format!(
                "image_features has {} bytes; expected {} (little-endian f32 x {expected}) as returned by EmbedImages of this model",
                bytes.len(),
                expected * 4
            ))
        })?;
        if let Some(index) = features.iter().position(|value| !value.is_finite()) {
            return Err(EncoderError::invalid(format!(
                "image_features value {index} is {}; send the finite features EmbedImages returned",
                features[index]
            )));
        }
        Ok(features)
    }

    async fn embed_images_inner(
        &self,
        images: Vec<Vec<u8>>,
        deadline: Option<Instant>,
        guard: &RequestGuard,
    ) -> Result<EmbedImagesResponse, EncoderError> {
        let limit = self.preprocessor.limits().max_images_per_request;
        if images.is_empty() {
            return Err(EncoderError::invalid("the request has no images; send at least one"));
        }
        if images.len() > limit {
            return Err(EncoderError::out_of_range(format!(
                "the request has {} images, more than the limit of {limit}; split it into smaller requests",
                images.len()
            )));
        }
        let mut slots = self.batcher.admit(images.len())?;

        let (prepared, preprocess_us) = self.preprocessor.images(images).await?;
        metrics::record_stage("preprocess", Duration::from_micros(preprocess_us));
        tracing::Span::current().record("preprocess_us", preprocess_us);
        check_deadline(deadline, guard.started)?;

        let mut submissions = Vec::with_capacity(prepared.len());
        for result in prepared {
            let submission = match result {
                Ok(pixels) => {
                    let slot = slots
                        .take_one()
                        .ok_or_else(|| EncoderError::Inference("the request has fewer queue slots than images".into()))?;
                    Ok((pixels, slot))
                }
                Err(error) => Err(error),
            };
            submissions.push(submission);
        }
        // Slots of images that failed preprocessing go back at once.
        drop(slots);

        guard.submitted.store(true, Ordering::Relaxed);
        let outcomes = join_all(submissions.into_iter().map(|submission| async move {
            let (pixels, slot) = submission?;
            self.batcher.submit(Work::Image { pixels }, slot, deadline).await
        }))
        .await;

        let mut embeddings = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            let embedding = match outcome {
                Ok((Embedded::Image { embedding, features }, batch)) => {
                    record_batch_fields(&batch);
                    ImageEmbedding {
                        embedding,
                        image_features: features_to_bytes(&features),
                        timing: Some(Self::timing(preprocess_us, batch)),
                        error: String::new(),
                    }
                }
                Ok((Embedded::Query { .. }, _)) => {
                    return Err(EncoderError::Inference("the worker returned a query result for an image".into()))
                }
                // Worker failures and deadlines concern the whole request, not one image.
                Err(error @ (EncoderError::WorkerStopped | EncoderError::DeadlineExceeded { .. } | EncoderError::Inference(_))) => {
                    return Err(error)
                }
                Err(error) => ImageEmbedding { error: error.to_string(), ..Default::default() },
            };
            embeddings.push(embedding);
        }
        Ok(EmbedImagesResponse { embeddings, model_fingerprint: self.model.fingerprint.clone() })
    }
}

#[tonic::async_trait]
impl Encoder for EncoderService {
    async fn embed_query(&self, request: Request<EmbedQueryRequest>) -> Result<Response<EmbedQueryResponse>, Status> {
        let deadline = request_deadline(&request);
        let request = request.into_inner();
        let span = tracing::info_span!(
            "embed_query",
            texts = request.texts.len(),
            preprocess_us = tracing::field::Empty,
            queue_us = tracing::field::Empty,
            inference_us = tracing::field::Empty,
            batch_size = tracing::field::Empty,
            code = tracing::field::Empty,
        );
        let guard = RequestGuard::new("EmbedQuery", 1);
        let result = with_deadline(deadline, guard.started, self.embed_query_inner(request, deadline, &guard))
            .instrument(span.clone())
            .await
            .map(Response::new)
            .map_err(Status::from);
        log_outcome(&span, &result);
        guard.finish(&result);
        result
    }

    async fn embed_images(&self, request: Request<EmbedImagesRequest>) -> Result<Response<EmbedImagesResponse>, Status> {
        let deadline = request_deadline(&request);
        let images = request.into_inner().images;
        let span = tracing::info_span!(
            "embed_images",
            images = images.len(),
            preprocess_us = tracing::field::Empty,
            queue_us = tracing::field::Empty,
            inference_us = tracing::field::Empty,
            batch_size = tracing::field::Empty,
            code = tracing::field::Empty,
        );
        let guard = RequestGuard::new("EmbedImages", images.len().max(1));
        let result = with_deadline(deadline, guard.started, self.embed_images_inner(images, deadline, &guard))
            .instrument(span.clone())
            .await
            .map(Response::new)
            .map_err(Status::from);
        log_outcome(&span, &result);
        guard.finish(&result);
        result
    }

    async fn model_info(&self, _request: Request<ModelInfoRequest>) -> Result<Response<ModelInfoResponse>, Status> {
        let model = &self.model;
        Ok(Response::new(ModelInfoResponse {
            dimension: model.joint_dim as u32,
            fingerprint: model.fingerprint.clone(),
            image_backbone: model.image_backbone.clone(),
            image_feature_dim: model.image_feature_dim as u32,
            image_size: model.image_size as u32,
            text_encoder: model.text_encoder.clone(),
            text_feature_dim: model.text_feature_dim as u32,
            max_text_tokens: model.max_text_tokens as u32,
            device: model.device.clone(),
            max_batch_size: self.max_batch_size as u32,
            precision: model.precision.to_string(),
            workers: model.workers as u32,
            queue_capacity: self.batcher.queue_capacity() as u32,
        }))
    }
}

/// Records the batch figures of the last item in the request span.
fn record_batch_fields(batch: &BatchTiming) {
    let span = tracing::Span::current();
    span.record("queue_us", batch.queue_us);
    span.record("inference_us", batch.inference_us);
    span.record("batch_size", batch.batch_size);
}

fn log_outcome<T>(span: &tracing::Span, result: &Result<T, Status>) {
    let _entered = span.enter();
    match result {
        Ok(_) => {
            span.record("code", "OK");
        }
        Err(status) => {
            span.record("code", tracing::field::debug(status.code()));
            match status.code() {
                Code::Internal | Code::Unavailable => tracing::error!(message = status.message(), "request failed"),
                _ => tracing::debug!(message = status.message(), "request rejected"),
            }
        }
    }
}

/// Runs `work` and returns DEADLINE_EXCEEDED when `deadline` passes first.
/// A job already queued stays there; the worker drops it unrun and counts
/// it, because its deadline has passed.
async fn with_deadline<T>(
    deadline: Option<Instant>,
    arrived: Instant,
    work: impl std::future::Future<Output = Result<T, EncoderError>>,
) -> Result<T, EncoderError> {
    let Some(deadline) = deadline else {
        return work.await;
    };
    check_deadline(Some(deadline), arrived)?;
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(result) => result,
        Err(_) => Err(EncoderError::DeadlineExceeded {
            waited_ms: arrived.elapsed().as_millis() as u64,
            stage: "preprocessing or queue",
        }),
    }
}

fn check_deadline(deadline: Option<Instant>, arrived: Instant) -> Result<(), EncoderError> {
    match deadline {
        Some(deadline) if deadline <= Instant::now() => Err(EncoderError::DeadlineExceeded {
            waited_ms: arrived.elapsed().as_millis() as u64,
            stage: "arrival or preprocessing",
        }),
        _ => Ok(()),
    }
}

/// Reads the client's deadline from the `grpc-timeout` header, less
/// [`DEADLINE_MARGIN`].
pub fn request_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    let now = Instant::now();
    Some(now + timeout.saturating_sub(DEADLINE_MARGIN))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_limit_status_is_explained() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("11"));
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large:%20found%202097157%20bytes,%20the%20limit%20is:%201048576%20bytes"),
        );
        explain_message_limit(&mut headers, 1_048_576);
        let message = headers["grpc-message"].to_str().expect("ASCII message");
        assert!(message.contains("has 2097157 bytes"), "{message}");
        assert!(message.contains("ENCODER__LIMITS__MAX_MESSAGE_BYTES"), "{message}");
    }

    #[test]
    fn other_statuses_are_kept() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        headers.insert("grpc-message", http::HeaderValue::from_static("bad"));
        explain_message_limit(&mut headers, 10);
        assert_eq!(headers["grpc-message"], "bad");
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }
}

/// Tower layer that rewrites tonic's OUT_OF_RANGE status for a request
/// message above `max_decoding_message_size` so it names the setting to
/// change. tonic rejects such a message before reading it into memory.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    limit: usize,
}

impl MessageLimitLayer {
    /// Creates the layer for a limit of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit { inner, limit: self.limit }
    }
}

/// Service of [`MessageLimitLayer`].
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>> for MessageLimit<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let limit = self.limit;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            explain_message_limit(response.headers_mut(), limit);
            Ok(response)
        })
    }
}

/// Decodes the `%XX` escapes of a `grpc-message` value.
fn percent_decode(bytes: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Replaces tonic's "decoded message length too large" message, which
/// arrives in the headers of a trailers-only response, with one that names
/// the setting.
fn explain_message_limit(headers: &mut http::HeaderMap, limit: usize) {
    if headers.get("grpc-status").map(http::HeaderValue::as_bytes) != Some(b"11") {
        return;
    }
    let Some(message) = headers.get("grpc-message").map(|value| percent_decode(value.as_bytes())) else {
        return;
    };
    if !message.contains("decoded message length too large") {
        return;
    }
    let found = message
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("more than the limit of");
    // The message is printable ASCII without '%', which gRPC sends as is.
    let explained = format!(
        "the request message has {found} bytes, more than the limit of {limit} bytes; send fewer or smaller images per request, \
         or raise ENCODER__LIMITS__MAX_MESSAGE_BYTES"
    );
    if let Ok(value) = http::HeaderValue::from_str(&explained) {
        headers.insert("grpc-message", value);
    }
}
