//! The one error type a caller can be told about; each door maps it exhaustively.

use std::time::Duration;

/// Everything that can go wrong in a call, in terms of the domain, not of a protocol.
///
/// `rest/` maps each variant to an HTTP status and an OpenAI error body; the gRPC door maps
/// each to a `tonic::Status`. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Missing, unknown, inactive, revoked or expired key, or a key of an inactive user.
    #[error("{0}")]
    InvalidApiKey(&'static str),
    /// The admin token was missing or wrong (a client key never opens admin routes).
    #[error("invalid or missing admin token")]
    InvalidAdminToken,
    /// The key may not use this model.
    #[error("the model `{model}` does not exist or this key may not use it")]
    ModelNotAllowed { model: String },
    /// A per-minute limit refused the call.
    #[error("rate limit reached: {limit} requests per minute; retry after {}s", retry_after.as_secs().max(1))]
    RateLimited { limit: u32, retry_after: Duration },
    /// A total quota of the key is used up.
    #[error("this key's {what} quota is used up ({limit} {what})")]
    QuotaExceeded { what: &'static str, limit: u64 },
    /// The request is malformed; `param` names the offending field when known.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The request body is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// An admin object (user, key) does not exist.
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    /// The upstream answered with an error; status and message are passed on to the client.
    #[error("{message}")]
    Upstream {
        status: u16,
        message: String,
        kind: Option<String>,
        param: Option<String>,
        code: Option<String>,
    },
    /// The upstream could not be reached (connection refused, reset, DNS).
    #[error("the model server is unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The upstream did not answer in time.
    #[error("the model server did not answer in time")]
    UpstreamTimeout,
    /// The gateway is shutting down and no longer takes calls.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The store failed; the call cannot be recorded.
    #[error("storage error: {0}")]
    Store(String),
}

impl GatewayError {
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }
}

impl From<crate::store::StoreError> for GatewayError {
    fn from(e: crate::store::StoreError) -> Self {
        GatewayError::Store(e.to_string())
    }
}
