//! Errors of the training library.

use std::path::PathBuf;

/// Error type of the training library.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// Reading the benchmark failed.
    #[error(transparent)]
    Dataset(#[from] densebert4ret_datasets::DatasetError),

    /// Loading or writing a model failed.
    #[error(transparent)]
    Model(#[from] densebert4ret_model::ModelError),

    /// libtorch raised an error.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),

    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// Action that failed, for example "failed to write".
        action: &'static str,
        /// File or directory involved.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A feature cache file exists but does not match the run.
    #[error("invalid feature cache {path}: {reason}; delete the file to rebuild it")]
    InvalidCache {
        /// Cache file.
        path: PathBuf,
        /// Mismatch found.
        reason: String,
    },

    /// Drawing a plot failed.
    #[error("plot failed: {0}")]
    Plot(String),

    /// A setting or input has a value the trainer cannot use.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl TrainerError {
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
}

/// Result alias of the training library.
pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
