//! The `densebert4ret.v1.Encoder` gRPC service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use densebert4ret_proto::v1::encoder_server::Encoder;
use densebert4ret_proto::v1::{
    embed_query_request, EmbedImagesRequest, EmbedImagesResponse, EmbedQueryRequest,
    EmbedQueryResponse, EncodeTiming, ImageEmbedding, ModelInfoRequest, ModelInfoResponse,
};
use densebert4ret_proto::{features_from_bytes, features_to_bytes};
use futures::future::join_all;
use tonic::{Request, Response, Status};

use crate::batcher::{BatchTiming, Batcher, Embedded, LoadedModel, Reference, Work};
use crate::error::EncoderError;
use crate::preprocess::Preprocessor;

/// gRPC front end of the batcher.
pub struct EncoderService {
    batcher: Batcher,
    preprocessor: Arc<Preprocessor>,
    model: LoadedModel,
    max_batch_size: usize,
}

impl EncoderService {
    pub fn new(batcher: Batcher, preprocessor: Arc<Preprocessor>, model: LoadedModel, max_batch_size: usize) -> Self {
        Self { batcher, preprocessor, model, max_batch_size }
    }

    fn timing(preprocess_us: u64, batch: BatchTiming) -> EncodeTiming {
        EncodeTiming {
            preprocess_us,
            queue_us: batch.queue_us,
            inference_us: batch.inference_us,
            batch_size: batch.batch_size,
        }
    }
}

#[tonic::async_trait]
impl Encoder for EncoderService {
    #[tracing::instrument(skip_all)]
    async fn embed_query(&self, request: Request<EmbedQueryRequest>) -> Result<Response<EmbedQueryResponse>, Status> {
        let deadline = request_deadline(&request);
        let request = request.into_inner();

        let (reference, image_us) = match request.reference {
            Some(embed_query_request::Reference::Image(bytes)) => {
                let (mut results, elapsed) = self.preprocessor.images(vec![bytes]).await?;
                let pixels = results
                    .pop()
                    .ok_or_else(|| EncoderError::Inference("no preprocessing result".into()))?
                    .map_err(|error| EncoderError::invalid(format!("reference image: {error}")))?;
                (Reference::Pixels(pixels), elapsed)
            }
            Some(embed_query_request::Reference::ImageFeatures(bytes)) => {
                let expected = self.model.image_feature_dim as usize;
                let features = features_from_bytes(&bytes)
                    .filter(|features| features.len() == expected)
                    .ok_or_else(|| {
                        EncoderError::invalid(format!(
                            "image_features has {} bytes; expected {} (little-endian f32 x {expected}) as returned by EmbedImages of this model",
                            bytes.len(),
                            expected * 4
                        ))
                    })?;
                if features.iter().any(|value| !value.is_finite()) {
                    return Err(EncoderError::invalid("image_features contains NaN or infinite values").into());
                }
                (Reference::Features(features), 0)
            }
            None => {
                return Err(EncoderError::invalid(
                    "the query has no reference; set `image` (encoded bytes) or `image_features`",
                )
                .into())
            }
        };
        let (tokens, text_us) = self.preprocessor.texts(request.texts).await?;

        let (embedded, batch) = self.batcher.submit(Work::Query { reference, tokens }, deadline).await?;
        let Embedded::Query { embedding } = embedded else {
            return Err(EncoderError::Inference("the worker returned an image result for a query".into()).into());
        };
        Ok(Response::new(EmbedQueryResponse {
            embedding,
            model_fingerprint: self.model.fingerprint.clone(),
            timing: Some(Self::timing(image_us + text_us, batch)),
        }))
    }

    #[tracing::instrument(skip_all, fields(images = request.get_ref().images.len()))]
    async fn embed_images(&self, request: Request<EmbedImagesRequest>) -> Result<Response<EmbedImagesResponse>, Status> {
        let deadline = request_deadline(&request);
        let images = request.into_inner().images;
        let limit = self.preprocessor.limits().max_images_per_request;
        if images.is_empty() {
            return Err(EncoderError::invalid("the request has no images; send at least one").into());
        }
        if images.len() > limit {
            return Err(Status::invalid_argument(format!(
                "the request has {} images, more than the limit of {limit}; split it into smaller requests",
                images.len()
            )));
        }

        let (prepared, preprocess_us) = self.preprocessor.images(images).await?;
        let submissions = prepared.into_iter().map(|result| async move {
            match result {
                Ok(pixels) => self.batcher.submit(Work::Image { pixels }, deadline).await,
                Err(error) => Err(error),
            }
        });

        let mut embeddings = Vec::new();
        for outcome in join_all(submissions).await {
            let embedding = match outcome {
                Ok((Embedded::Image { embedding, features }, batch)) => ImageEmbedding {
                    embedding,
                    image_features: features_to_bytes(&features),
                    timing: Some(Self::timing(preprocess_us, batch)),
                    error: String::new(),
                },
                Ok((Embedded::Query { .. }, _)) => {
                    return Err(EncoderError::Inference("the worker returned a query result for an image".into()).into())
                }
                // Queue and worker failures concern the whole request, not one image.
                Err(error @ (EncoderError::QueueFull { .. } | EncoderError::WorkerStopped | EncoderError::DeadlineExceeded { .. })) => {
                    return Err(error.into())
                }
                Err(error) => ImageEmbedding { error: error.to_string(), ..Default::default() },
            };
            embeddings.push(embedding);
        }
        Ok(Response::new(EmbedImagesResponse { embeddings, model_fingerprint: self.model.fingerprint.clone() }))
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
        }))
    }
}

/// Reads the client's deadline from the `grpc-timeout` header.
pub fn request_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value).map(|timeout| Instant::now() + timeout)
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
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }
}
