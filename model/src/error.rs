//! Error type of the model crate.

use std::path::PathBuf;

/// Errors raised while loading, writing or running a DenseBert4Ret model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// Action that failed, for example "failed to read".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A configuration file is malformed or contains values the model cannot use.
    #[error("invalid configuration {path}: {reason}")]
    InvalidConfig {
        /// The configuration file, or the model directory when no file is involved.
        path: PathBuf,
        /// Description of the problem and its fix.
        reason: String,
    },

    /// A weights file lacks tensors the network needs, or contains them with the wrong shape.
    #[error("invalid weights file {path}: {reason}")]
    InvalidWeights {
        /// The safetensors file.
        path: PathBuf,
        /// The missing or mismatched tensors and how to fix them.
        reason: String,
    },

    /// The tokenizer file could not be loaded or a text could not be tokenized.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// A text produced more tokens than the configured maximum and overflow is set to reject.
    #[error(
        "text has {count} tokens, more than the maximum of {max_tokens}; \
         shorten the text or raise text_encoder.max_tokens"
    )]
    TooManyTokens {
        /// Number of tokens including the special tokens the tokenizer adds.
        count: usize,
        /// The configured maximum.
        max_tokens: usize,
    },

    /// Image bytes could not be decoded.
    #[error("invalid image: {0}")]
    InvalidImage(String),

    /// The image header declares more pixels than allowed, so it was not decoded.
    #[error(
        "image of {width}x{height} has {pixels} pixels, more than the maximum of {max_pixels}; \
         downscale the image before sending it"
    )]
    ImageTooLarge {
        /// Declared width in pixels.
        width: u32,
        /// Declared height in pixels.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// The configured maximum.
        max_pixels: u64,
    },

    /// A tensor passed to the model has the wrong shape, type or values.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// libtorch raised an error.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),

    /// A forward pass failed inside libtorch, for example because device memory ran out.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl ModelError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Runs a forward pass and turns a libtorch failure into [`ModelError::Inference`].
///
/// The infallible tch operations panic when libtorch raises an error (for example CUDA out of
/// memory). The libtorch exception has already been converted to a Rust error at that point, so
/// the unwind crosses only Rust frames and catching it is sound. The panic hook still runs and
/// prints the panic message.
pub(crate) fn catch_inference_panic<T>(forward: impl FnOnce() -> T) -> Result<T, ModelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(forward)).map_err(|payload| {
        let message = if let Some(text) = payload.downcast_ref::<&str>() {
            (*text).to_owned()
        } else if let Some(text) = payload.downcast_ref::<String>() {
            text.clone()
        } else {
            "libtorch raised an error without a message".to_owned()
        };
        ModelError::Inference(message)
    })
}
