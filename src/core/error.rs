//! The one error type a caller can be told about; each door maps it exhaustively.

use super::rate_limit::Refusal;

/// Everything that can go wrong in a call, in terms of the domain, not of a protocol.
///
/// `rest/` maps each variant to an HTTP status and an OpenAI error body; the gRPC door maps
/// each to a `tonic::Status`. Messages never contain a secret.
/// `Clone` so that callers sharing one model call (the cache's in-flight deduplication)
/// can each be told its failure.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GatewayError {
    /// Missing, unknown, inactive, revoked or expired key, or a key of an inactive user.
    #[error("{0}")]
    InvalidApiKey(&'static str),
    /// A bearer token from the identity provider that does not verify; says which check
    /// failed.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The admin token was missing or wrong (a client key never opens admin routes).
    #[error("invalid or missing admin token")]
    InvalidAdminToken,
    /// The caller's address is not on an allowlist (the key's, its user's, or the admin
    /// API's); `whose` says which.
    #[error("this {whose} may not be used from {client}")]
    IpNotAllowed { whose: &'static str, client: String },
    /// The key may not use this model.
    #[error("the model `{model}` does not exist or this key may not use it")]
    ModelNotAllowed { model: String },
    /// The version the call resolved to is past its sunset (`core::catalogue`); `instead`
    /// names what to call now.
    #[error("{}", describe_retired(version, *.sunset, instead.as_deref()))]
    ModelRetired {
        version: String,
        sunset: super::time::UnixTime,
        instead: Option<String>,
    },
    /// A per-minute limit or a concurrency cap refused the call.
    #[error("{}", describe_refusal(.0))]
    RateLimited(Refusal),
    /// A total quota of the key is used up; `what` is `requests`, `tokens` or `images`.
    #[error("{}", describe_quota(what, *.limit))]
    QuotaExceeded { what: &'static str, limit: u64 },
    /// The budget of the key or of its user (`whose`) is spent, for this period if it has
    /// one, or what is left does not pay for the call.
    #[error("{}", describe_budget(whose, *.budget, *.period))]
    BudgetExceeded {
        whose: &'static str,
        budget: super::money::Money,
        period: Option<super::period::Period>,
    },
    /// The request is malformed; `param` names the offending field when known.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The request body is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The client did not send its request body in time.
    #[error("the request body did not arrive within {secs} s")]
    RequestTimeout { secs: u64 },
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
    /// No healthy backend serves the model: answered at once, not after a timeout.
    #[error("no healthy model server serves `{model}` right now; retry shortly")]
    NoHealthyBackend { model: String },
    /// The upstream did not answer in time.
    #[error("the model server did not answer in time")]
    UpstreamTimeout,
    /// The gateway is shutting down and no longer takes calls.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The store failed; the call cannot be recorded.
    #[error("storage error: {0}")]
    Store(String),
    /// The store does not take writes (a full disk): a call could not be recorded, so none
    /// is admitted until it recovers.
    #[error(
        "the gateway cannot record usage right now (its store fails); the call was not made. Retry later"
    )]
    StoreUnavailable,
}

fn describe_refusal(r: &Refusal) -> String {
    let what = r.kind.describe();
    let scope = r.scope.describe();
    match r.retry_after {
        Some(wait) => format!(
            "Rate limit reached for {what} on this {scope}: limit {}, this request needs {}. Retry after {:.1}s.",
            r.limit,
            r.requested,
            wait.as_secs_f64()
        ),
        None => format!(
            "Request too large for the {what} limit of this {scope}: it needs {} and the limit is {}. \
             Lower `max_tokens` or the prompt.",
            r.requested, r.limit
        ),
    }
}

fn describe_retired(version: &str, sunset: super::time::UnixTime, instead: Option<&str>) -> String {
    let when = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(sunset).unwrap_or_default());
    let date = humantime::format_rfc3339_seconds(when);
    match instead {
        Some(instead) => format!(
            "the model version `{version}` was retired at its sunset, {date}; use `{instead}` instead"
        ),
        None => format!("the model version `{version}` was retired at its sunset, {date}"),
    }
}

/// `this key's request quota is used up (1 request)`, `… token quota … (1000 tokens)`.
fn describe_quota(what: &str, limit: u64) -> String {
    let one = what.strip_suffix('s').unwrap_or(what);
    let unit = if limit == 1 { one } else { what };
    format!("this key's {one} quota is used up ({limit} {unit})")
}

/// `this key's budget is used up (25.00 a month)`.
fn describe_budget(
    whose: &str,
    budget: super::money::Money,
    period: Option<super::period::Period>,
) -> String {
    let each = period.map(|p| format!(" {}", p.each())).unwrap_or_default();
    format!(
        "this {whose}'s budget is used up, or what is left of it does not pay for this call ({budget}{each})"
    )
}

impl From<Refusal> for GatewayError {
    fn from(refusal: Refusal) -> Self {
        GatewayError::RateLimited(refusal)
    }
}

impl GatewayError {
    /// Why the gate refused a call, as a metrics label; `None` for failures that are not
    /// refusals (the model server's errors, shutdown, the store).
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            GatewayError::InvalidApiKey(_)
            | GatewayError::InvalidToken(_)
            | GatewayError::InvalidAdminToken => Some("auth"),
            GatewayError::RateLimited(_) => Some("rate"),
            GatewayError::QuotaExceeded { .. } | GatewayError::BudgetExceeded { .. } => {
                Some("quota")
            }
            GatewayError::ModelNotAllowed { .. } | GatewayError::ModelRetired { .. } => {
                Some("policy")
            }
            GatewayError::IpNotAllowed { .. } => Some("address"),
            GatewayError::StoreUnavailable => Some("store"),
            GatewayError::InvalidRequest { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::RequestTimeout { .. } => Some("invalid"),
            GatewayError::NotFound { .. }
            | GatewayError::Upstream { .. }
            | GatewayError::UpstreamUnavailable(_)
            | GatewayError::NoHealthyBackend { .. }
            | GatewayError::UpstreamTimeout
            | GatewayError::ShuttingDown
            | GatewayError::Store(_) => None,
        }
    }

    /// The HTTP status the client is told (the REST door answers with it, and the call log
    /// records it for calls of every door, so that one call tells one story).
    pub fn http_status(&self) -> u16 {
        match self {
            GatewayError::InvalidApiKey(_)
            | GatewayError::InvalidToken(_)
            | GatewayError::InvalidAdminToken => 401,
            GatewayError::ModelNotAllowed { .. } | GatewayError::NotFound { .. } => 404,
            // Gone for good, unlike a model that is merely unknown or not allowed.
            GatewayError::ModelRetired { .. } => 410,
            GatewayError::IpNotAllowed { .. } => 403,
            GatewayError::RateLimited(_)
            | GatewayError::QuotaExceeded { .. }
            | GatewayError::BudgetExceeded { .. } => 429,
            GatewayError::InvalidRequest { .. } => 400,
            GatewayError::BodyTooLarge { .. } => 413,
            GatewayError::RequestTimeout { .. } => 408,
            // The model server's own status, when it is an error status.
            GatewayError::Upstream { status, .. } if (400..=599).contains(status) => *status,
            GatewayError::Upstream { .. } | GatewayError::UpstreamUnavailable(_) => 502,
            GatewayError::NoHealthyBackend { .. }
            | GatewayError::ShuttingDown
            | GatewayError::StoreUnavailable => 503,
            GatewayError::UpstreamTimeout => 504,
            GatewayError::Store(_) => 500,
        }
    }

    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_up_quota_is_said_in_the_singular_or_plural() {
        let message = |what, limit| GatewayError::QuotaExceeded { what, limit }.to_string();
        assert_eq!(
            message("requests", 1),
            "this key's request quota is used up (1 request)"
        );
        assert_eq!(
            message("tokens", 1000),
            "this key's token quota is used up (1000 tokens)"
        );
        assert_eq!(
            message("images", 0),
            "this key's image quota is used up (0 images)"
        );
    }
}
