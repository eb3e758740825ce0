//! Encoder errors and their gRPC status codes.

use tonic::{Code, Status};

/// Failure of an encoder request.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// The request itself is malformed (bad image, empty text, wrong feature
    /// length, ...); the message names the value and the fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// A value of the request exceeds a configured limit (image bytes or
    /// pixels, text tokens); the message names the value, the limit and the
    /// fix.
    #[error("{0}")]
    OutOfRange(String),
    /// The batching queue cannot take the request's items now.
    #[error(
        "the encoder queue is full ({queued} of {capacity} slots taken, this request needs {requested}); \
         retry with backoff, send fewer images per request, or add encoder replicas"
    )]
    QueueFull {
        /// Slots of the queue (`batching.queue_capacity`).
        capacity: usize,
        /// Slots taken when the request arrived.
        queued: usize,
        /// Slots the request needs (1 per query, 1 per image).
        requested: usize,
    },
    /// The request's deadline passed before its batch ran.
    #[error("the request deadline passed after {waited_ms} ms in the encoder ({stage}); send a longer grpc-timeout or retry later")]
    DeadlineExceeded {
        /// Time from arrival until the deadline was found to have passed.
        waited_ms: u64,
        /// Stage the request was in: `arrival or preprocessing`,
        /// `preprocessing or queue`, or `queue`.
        stage: &'static str,
    },
    /// The model worker stopped; the process is shutting down or crashed.
    #[error("the model worker is not running; the encoder is shutting down or failed to start")]
    WorkerStopped,
    /// The forward pass failed.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl EncoderError {
    /// Builds an [`EncoderError::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// Builds an [`EncoderError::OutOfRange`].
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::OutOfRange(message.into())
    }

    /// Returns the gRPC status code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::QueueFull { .. } => Code::ResourceExhausted,
            Self::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Self::WorkerStopped => Code::Unavailable,
            Self::Inference(_) => Code::Internal,
        }
    }

    /// Adds a prefix naming the part of the request the error concerns,
    /// keeping the status code.
    pub fn context(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument(message) => Self::InvalidArgument(format!("{prefix}: {message}")),
            Self::OutOfRange(message) => Self::OutOfRange(format!("{prefix}: {message}")),
            other => other,
        }
    }
}

impl From<EncoderError> for Status {
    fn from(error: EncoderError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}
