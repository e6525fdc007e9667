//! Documents the gateway fetches for itself (an identity provider's JWKS), with the model
//! servers' TLS and connect rules, a deadline and a size cap.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};

use super::client::HttpClient;

/// `GET url`: the body of a 200 answer, at most `max_bytes`, all within `timeout`.
pub async fn get(url: &str, timeout: Duration, max_bytes: usize) -> Result<Bytes, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let client = HttpClient::for_documents(timeout)?;
    let fetch = async {
        let response = client
            .send(|| {
                let mut request = Request::new(Full::new(Bytes::new()));
                *request.method_mut() = Method::GET;
                *request.uri_mut() = uri.clone();
                request.headers_mut().insert(
                    header::ACCEPT,
                    http::HeaderValue::from_static("application/json"),
                );
                request
            })
            .await
            .map_err(|e| format!("cannot reach it: {}", super::error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(format!("it answered {}", response.status()));
        }
        Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .map_err(|e| format!("cannot read its answer: {e}"))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
}
