//! Encoder errors and their gRPC status codes.

use tonic::{Code, Status};

/// Failure of an encoder request.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// The request itself is malformed (bad image, empty text, wrong feature
    /// length, ...); the message names the value and the fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// The batching queue is full; the client should back off and retry.
    #[error("the encoder queue is full ({capacity} requests waiting); retry with backoff or add encoder replicas")]
    QueueFull { capacity: usize },
    /// The request's deadline passed before its batch ran.
    #[error("the request deadline passed after {waited_ms} ms in the encoder queue")]
    DeadlineExceeded { waited_ms: u64 },
    /// The model worker stopped; the process is shutting down or crashed.
    #[error("the model worker is not running; the encoder is shutting down or failed to start")]
    WorkerStopped,
    /// The forward pass failed.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl EncoderError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// Returns the gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::QueueFull { .. } => Code::ResourceExhausted,
            Self::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Self::WorkerStopped => Code::Unavailable,
            Self::Inference(_) => Code::Internal,
        }
    }
}

impl From<EncoderError> for Status {
    fn from(error: EncoderError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}
