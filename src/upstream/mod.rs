//! The model server: one pooled HTTP client, forwarding, error normalisation and health.

pub mod sse;

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Serialize;

use crate::core::error::GatewayError;

/// The header that carries the request id to the upstream and back to the client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Largest error or JSON body read from the upstream; a real answer is far smaller.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// How to reach the model server.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub url: String,
    /// Sent as the upstream's own Bearer token (vLLM `--api-key`); never the client's key.
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    /// For a whole JSON answer, and for the longest silence within a stream.
    pub request_timeout: Duration,
}

/// The one HTTP client to the model server, built at start and shared by every call.
pub struct Upstream {
    client: reqwest::Client,
    chat_url: String,
    models_url: String,
    health_url: String,
    base_url: String,
    request_timeout: Duration,
}

/// What `/health` reports of the upstream.
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamHealth {
    pub url: String,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Upstream {
    pub fn new(settings: &UpstreamSettings) -> Result<Self, GatewayError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &settings.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                GatewayError::UpstreamUnavailable(
                    "the upstream API key is not a valid header value".into(),
                )
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.request_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| {
                GatewayError::UpstreamUnavailable(format!("cannot build HTTP client: {e}"))
            })?;
        let base = settings.url.trim_end_matches('/');
        // Accept both `http://host:8000` and `http://host:8000/v1`.
        let api = if base.ends_with("/v1") {
            base.to_owned()
        } else {
            format!("{base}/v1")
        };
        let root = api.trim_end_matches("/v1");
        Ok(Upstream {
            client,
            chat_url: format!("{api}/chat/completions"),
            models_url: format!("{api}/models"),
            health_url: format!("{root}/health"),
            base_url: base.to_owned(),
            request_timeout: settings.request_timeout,
        })
    }

    /// Sends a chat completion; a non-2xx answer becomes [`GatewayError::Upstream`].
    pub async fn chat(
        &self,
        body: Bytes,
        request_id: &str,
        stream: bool,
    ) -> Result<reqwest::Response, GatewayError> {
        let mut request = self
            .client
            .post(&self.chat_url)
            .header(CONTENT_TYPE, "application/json")
            .header(REQUEST_ID_HEADER, request_id)
            .body(body);
        if !stream {
            request = request.timeout(self.request_timeout);
        }
        let response = request.send().await.map_err(transport_error)?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_from_response(response).await)
        }
    }

    /// Reads a whole (JSON) answer, bounded in size.
    pub async fn read_body(response: reqwest::Response) -> Result<Bytes, GatewayError> {
        read_bounded(response).await
    }

    /// The upstream's model list, as JSON.
    pub async fn models(&self, request_id: &str) -> Result<serde_json::Value, GatewayError> {
        let response = self
            .client
            .get(&self.models_url)
            .header(REQUEST_ID_HEADER, request_id)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(transport_error)?;
        if !response.status().is_success() {
            return Err(error_from_response(response).await);
        }
        let body = read_bounded(response).await?;
        serde_json::from_slice(&body).map_err(|e| GatewayError::Upstream {
            status: 502,
            message: format!("the model server sent an unreadable model list: {e}"),
            kind: Some("upstream_error".into()),
            param: None,
            code: None,
        })
    }

    /// Probes the upstream's `/health`, within `timeout`.
    pub async fn health(&self, timeout: Duration) -> UpstreamHealth {
        let started = Instant::now();
        let result = self
            .client
            .get(&self.health_url)
            .timeout(timeout)
            .send()
            .await;
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match result {
            Ok(response) => UpstreamHealth {
                url: self.base_url.clone(),
                reachable: response.status().is_success(),
                status: Some(response.status().as_u16()),
                latency_ms,
                error: None,
            },
            Err(e) => UpstreamHealth {
                url: self.base_url.clone(),
                reachable: false,
                status: None,
                latency_ms,
                error: Some(transport_error(e).to_string()),
            },
        }
    }
}

/// A failure to talk to the upstream at all.
pub fn transport_error(e: reqwest::Error) -> GatewayError {
    if e.is_timeout() {
        GatewayError::UpstreamTimeout
    } else if e.is_connect() {
        GatewayError::UpstreamUnavailable("cannot connect to the model server".into())
    } else {
        GatewayError::UpstreamUnavailable(format!(
            "the connection to the model server failed: {}",
            error_chain(&e)
        ))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Bytes, GatewayError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_UPSTREAM_BODY {
            return Err(GatewayError::Upstream {
                status: 502,
                message: "the model server sent an answer larger than the gateway accepts".into(),
                kind: Some("upstream_error".into()),
                param: None,
                code: None,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// Turns an upstream error answer into the client's error, keeping status and message.
///
/// vLLM answers `{"error": {...}}` in recent versions and a flat `{"object":"error",
/// "message":...}` in older ones; anything else (an HTML proxy page) keeps only its status.
async fn error_from_response(response: reqwest::Response) -> GatewayError {
    let status = response.status().as_u16();
    let body = read_bounded(response).await.unwrap_or_default();
    parse_error_body(status, &body)
}

pub fn parse_error_body(status: u16, body: &[u8]) -> GatewayError {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let object = value
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or(&value);
    let text = |field: &str| match object.get(field) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let message = text("message").unwrap_or_else(|| {
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error");
        format!("the model server answered HTTP {status} ({reason})")
    });
    GatewayError::Upstream {
        status,
        message,
        kind: text("type"),
        param: text("param"),
        code: text("code"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(e: GatewayError) -> (u16, String, Option<String>, Option<String>) {
        match e {
            GatewayError::Upstream {
                status,
                message,
                kind,
                code,
                ..
            } => (status, message, kind, code),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn nested_flat_and_html_errors_are_normalised() {
        let nested =
            br#"{"error":{"message":"too long","type":"BadRequestError","param":null,"code":400}}"#;
        assert_eq!(
            fields(parse_error_body(400, nested)),
            (
                400,
                "too long".into(),
                Some("BadRequestError".into()),
                Some("400".into())
            )
        );
        let flat = br#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#;
        assert_eq!(
            fields(parse_error_body(404, flat)).1,
            "The model `x` does not exist."
        );
        let html = b"<html><body>502 Bad Gateway</body></html>";
        let (status, message, kind, _) = fields(parse_error_body(502, html));
        assert_eq!(status, 502);
        assert!(message.contains("502 (Bad Gateway)"), "{message}");
        assert_eq!(kind, None);
    }
}
