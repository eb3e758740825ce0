//! Gateway errors and their gRPC status codes.

use tonic::{Code, Status};

/// Failure of a gateway request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed; the message names the value and the fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// A referenced catalog item does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A stored item cannot serve the request as it is.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A downstream service (encoder or shard) returned an error; its code is
    /// kept so that, for example, an undecodable image stays INVALID_ARGUMENT.
    #[error("{component}: {message}")]
    Upstream { component: String, code: Code, message: String },
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// Wraps a status returned by `component` (for example "encoder" or
    /// "shard 1 (http://127.0.0.1:50062)").
    pub fn upstream(component: impl Into<String>, status: Status) -> Self {
        let code = match status.code() {
            // The caller's request was fine as far as the gateway is concerned,
            // so transport-level failures of a downstream service surface as
            // UNAVAILABLE.
            Code::Unknown | Code::Cancelled => Code::Unavailable,
            code => code,
        };
        Self::Upstream { component: component.into(), code, message: status.message().to_string() }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Upstream { code, .. } => *code,
        }
    }
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}
