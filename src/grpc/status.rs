//! `GatewayError` as a gRPC `Status`, with retry figures in the trailing metadata.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::core::GatewayError;

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        let message = e.to_string();
        let mut metadata = MetadataMap::new();
        let code = match &e {
            GatewayError::InvalidApiKey(_)
            | GatewayError::InvalidToken(_)
            | GatewayError::InvalidAdminToken => Code::Unauthenticated,
            GatewayError::ModelNotAllowed { .. } | GatewayError::IpNotAllowed { .. } => {
                Code::PermissionDenied
            }
            GatewayError::ModelRetired { .. } => Code::FailedPrecondition,
            GatewayError::RateLimited(refusal) => {
                for (name, value) in refusal.pairs() {
                    if let Ok(value) = value.parse() {
                        metadata.insert(tonic::metadata::MetadataKey::from_static(name), value);
                    }
                }
                Code::ResourceExhausted
            }
            GatewayError::QuotaExceeded { what, limit } => {
                if let Ok(value) = what.parse() {
                    metadata.insert("x-quota-exceeded", value);
                }
                metadata.insert("x-quota-limit", MetadataValue::from(*limit));
                Code::ResourceExhausted
            }
            GatewayError::BudgetExceeded { whose, budget, .. } => {
                let what = if *whose == "user" {
                    "user_budget"
                } else {
                    "budget"
                };
                metadata.insert("x-quota-exceeded", MetadataValue::from_static(what));
                if let Ok(value) = budget.to_string().parse() {
                    metadata.insert("x-quota-limit", value);
                }
                Code::ResourceExhausted
            }
            GatewayError::InvalidRequest { param, .. } => {
                if let Some(value) = param.as_deref().and_then(|p| p.parse().ok()) {
                    metadata.insert("x-error-param", value);
                }
                Code::InvalidArgument
            }
            GatewayError::BodyTooLarge { .. } => Code::InvalidArgument,
            GatewayError::RequestTimeout { .. } => Code::DeadlineExceeded,
            GatewayError::NotFound { .. } => Code::NotFound,
            GatewayError::Upstream { status, .. } => {
                metadata.insert("x-upstream-status", MetadataValue::from(*status));
                upstream_code(*status)
            }
            GatewayError::UpstreamUnavailable(_)
            | GatewayError::NoHealthyBackend { .. }
            | GatewayError::ShuttingDown
            | GatewayError::StoreUnavailable => Code::Unavailable,
            GatewayError::UpstreamTimeout => Code::DeadlineExceeded,
            GatewayError::Store(_) => Code::Internal,
        };
        Status::with_metadata(code, message, metadata)
    }
}

/// What an upstream HTTP error means to a gRPC caller.
fn upstream_code(status: u16) -> Code {
    match status {
        400 | 413 | 422 => Code::InvalidArgument,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        429 => Code::ResourceExhausted,
        // The model server refusing the gateway's own key is the gateway's problem.
        401 | 403 => Code::Internal,
        502 | 503 => Code::Unavailable,
        _ => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::rate_limit::{LimitKind, LimitScope, Refusal};

    #[test]
    fn each_error_gets_its_code_and_retry_figures() {
        let status = Status::from(GatewayError::RateLimited(Refusal {
            scope: LimitScope::Key,
            kind: LimitKind::Requests,
            limit: 5,
            requested: 1,
            retry_after: Some(Duration::from_millis(1500)),
        }));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get("retry-after").unwrap(), "2");
        assert_eq!(
            status.metadata().get("x-ratelimit-limit-requests").unwrap(),
            "5"
        );
        let status = Status::from(GatewayError::invalid_request("bad", Some("messages")));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.metadata().get("x-error-param").unwrap(), "messages");
        assert_eq!(
            Status::from(GatewayError::UpstreamTimeout).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            Status::from(GatewayError::ModelNotAllowed { model: "m".into() }).code(),
            Code::PermissionDenied
        );
        assert_eq!(
            Status::from(GatewayError::InvalidAdminToken).code(),
            Code::Unauthenticated
        );
    }
}
