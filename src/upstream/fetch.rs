//! Documents the gateway fetches for itself (an identity provider's JWKS; images, in
//! fetch mode, from an address checked beforehand), with the model servers' TLS and
//! connect rules, a deadline and a size cap.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;

use super::client::{HttpClient, tls_config};

/// `GET url`: the body of a 200 answer, at most `max_bytes`, all within `timeout`.
pub async fn get(url: &str, timeout: Duration, max_bytes: usize) -> Result<Bytes, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let client = HttpClient::for_documents(timeout)?;
    let fetch = async {
        let response = client
            .send(|| {
                let mut request = Request::new(Bytes::new());
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

/// `GET`s to an address chosen before the connection is made: the URL's host names the
/// TLS server and the `Host` header, but is not resolved again, so the connection goes
/// where the caller checked (a name whose answer changes in between changes nothing).
#[derive(Clone)]
pub struct PinnedGet {
    tls: Arc<rustls::ClientConfig>,
}

/// What one `GET` answered.
#[derive(Debug, PartialEq, Eq)]
pub enum PinnedAnswer {
    /// A redirect: its `Location`, as sent (absolute or relative).
    Redirect(String),
    /// A 2xx answer's body.
    Body(Bytes),
}

impl PinnedGet {
    /// Fails when the platform's trust store cannot be loaded.
    pub fn new() -> Result<Self, String> {
        Ok(PinnedGet {
            tls: Arc::new(tls_config()?),
        })
    }

    /// `GET url` over a new connection to one of `addrs` (the port is the URL's), taking no
    /// more than `max_bytes` of the body; a redirect is returned, not followed. An address
    /// literal in the URL is connected to as it is (there is nothing to resolve).
    pub async fn get(
        &self,
        url: &str,
        addrs: &[IpAddr],
        max_bytes: u64,
        accept: &'static str,
    ) -> Result<PinnedAnswer, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
        let mut tcp = HttpConnector::new_with_resolver(PinnedResolver(addrs.to_vec()));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        request
            .headers_mut()
            .insert(header::ACCEPT, http::HeaderValue::from_static(accept));
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("cannot reach it: {}", super::error_chain(&e)))?;
        let status = response.status();
        if status.is_redirection() && status != http::StatusCode::NOT_MODIFIED {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("it answered {status} without a usable Location"))?;
            return Ok(PinnedAnswer::Redirect(location.to_owned()));
        }
        if !status.is_success() {
            return Err(format!("it answered {status}"));
        }
        let too_large = || format!("it is larger than {max_bytes} bytes");
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|l| l.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max_bytes) {
            return Err(too_large());
        }
        let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        match Limited::new(response.into_body(), limit).collect().await {
            Ok(body) => Ok(PinnedAnswer::Body(body.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Err(e) => Err(format!("cannot read its answer: {e}")),
        }
    }
}

/// The resolver of a pinned connection: the addresses it was made with, whatever the name.
#[derive(Clone)]
struct PinnedResolver(Vec<IpAddr>);

impl tower::Service<Name> for PinnedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        // Port 0: the connector puts the URL's port in.
        let addrs: Vec<SocketAddr> = self.0.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
        std::future::ready(if addrs.is_empty() {
            Err(std::io::Error::other("no address to connect to"))
        } else {
            Ok(addrs.into_iter())
        })
    }
}
