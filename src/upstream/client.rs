//! The one HTTP client to every model server. `http://` addresses, what a vLLM server
//! speaks, go over our own HTTP/1.1 connections ([`super::h1`]): they hold the least an
//! open stream can hold. `https://` ones go over hyper-util's pooled client with rustls
//! (HTTP/2 when ALPN chooses it). Both follow no redirects and no proxy.
//!
//! It replaced reqwest (STACK.md's choice) because every open stream holds an HTTP/1.1
//! connection of its own to a vLLM server, and reqwest gives no hold on what such a
//! connection keeps (BENCHMARKS.md, point 12). What reqwest did for us is done here:
//! connect timeout (TLS included), TCP_NODELAY, idle pool with a 90 s timeout, the
//! platform's trust store, HTTP/2 by ALPN on https, and the retry of requests an HTTP/2
//! server refused unprocessed.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::h1::{H1Body, H1Client, H1Error};

pub(super) type BoxError = Box<dyn StdError + Send + Sync>;

/// The read buffer of hyper's HTTP/1.1 connections (https), reserved again before every
/// read while the connection lives (hyper's default: 8 KiB, growing). Measured with 10,000
/// open streams: 8 KiB → 2 KiB saved 20 MiB, 1 KiB another 9 MiB. It also bounds an
/// answer's head (status line and headers): vLLM sends a few hundred bytes, and 2 KiB
/// leaves room for what a proxy in front of it adds. Bodies are read in as many reads as
/// they need.
pub(super) const READ_BUFFER_BYTES: usize = 2048;

/// How long an unused connection is kept in the pool (reqwest's default, kept).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Sends of a request that an HTTP/2 server refused before processing it, on top of the
/// first (reqwest's default policy for such refusals, kept).
const REFUSED_RETRIES: u32 = 2;

/// The request body: the bytes of a call, or nothing.
pub(super) type RequestBody = Bytes;

/// An answer whose head has arrived; its body is read as it comes.
pub(super) type UpstreamResponse = Response<UpstreamBody>;

/// A failure to get an answer's head: connect, TLS, write or read failed.
#[derive(Debug)]
pub(super) enum SendError {
    Plain(H1Error),
    Hyper(hyper_util::client::legacy::Error),
}

impl SendError {
    /// No connection could be made.
    pub(super) fn is_connect(&self) -> bool {
        match self {
            SendError::Plain(e) => e.is_connect(),
            SendError::Hyper(e) => e.is_connect(),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Plain(e) => e.fmt(f),
            SendError::Hyper(e) => e.fmt(f),
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            SendError::Plain(e) => e.source(),
            SendError::Hyper(e) => e.source(),
        }
    }
}

/// An answer's body from either connection.
pub(super) enum UpstreamBody {
    Plain(H1Body),
    Hyper(Incoming),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Plain(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BoxError::from))),
            UpstreamBody::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain(body) => body.is_end_stream(),
            UpstreamBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain(body) => body.size_hint(),
            UpstreamBody::Hyper(body) => body.size_hint(),
        }
    }
}

/// A pooled HTTP client to the model servers; cheap to clone (clones share the pools).
#[derive(Clone)]
pub(super) struct HttpClient {
    /// `http://`, unless the client is for documents.
    plain: Option<H1Client>,
    client: Client<UpstreamConnector, Full<Bytes>>,
}

impl HttpClient {
    /// A client whose connections (TCP and TLS handshake) must be made within
    /// `connect_timeout`. Fails when the platform's trust store cannot be loaded.
    pub(super) fn new(connect_timeout: Duration) -> Result<Self, String> {
        let mut client = Self::build(connect_timeout, Some(READ_BUFFER_BYTES))?;
        client.plain = Some(H1Client::new(connect_timeout, POOL_IDLE_TIMEOUT));
        Ok(client)
    }

    /// A client for the odd document from elsewhere (an identity provider's keys), whose
    /// answers' heads may be larger than a model server's: hyper's client, with its own
    /// buffer sizes, for every address.
    pub(super) fn for_documents(connect_timeout: Duration) -> Result<Self, String> {
        Self::build(connect_timeout, None)
    }

    fn build(connect_timeout: Duration, read_buffer: Option<usize>) -> Result<Self, String> {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        // https URLs are handed to the TLS layer around this connector.
        tcp.enforce_http(false);
        let tls = tls_config()?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            // ALPN offers h2 and http/1.1; plain http is HTTP/1.1.
            .enable_all_versions()
            .wrap_connector(tcp);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT);
        if let Some(size) = read_buffer {
            builder.http1_read_buf_exact_size(size);
        }
        let client = builder.build(UpstreamConnector {
            inner: connector,
            timeout: connect_timeout,
        });
        Ok(HttpClient {
            plain: None,
            client,
        })
    }

    /// Sends the request `build` makes and waits for the answer's head. A request that an
    /// HTTP/2 server refused unprocessed (REFUSED_STREAM, or a graceful GOAWAY) is made
    /// and sent again, at most [`REFUSED_RETRIES`] times.
    pub(super) async fn send(
        &self,
        build: impl Fn() -> Request<RequestBody>,
    ) -> Result<UpstreamResponse, SendError> {
        let mut request = build();
        if let Some(plain) = &self.plain
            && request.uri().scheme() == Some(&Scheme::HTTP)
        {
            return match plain.send(request).await {
                Ok(response) => Ok(response.map(UpstreamBody::Plain)),
                Err(e) => Err(SendError::Plain(e)),
            };
        }
        let mut retries = 0;
        loop {
            match self.client.request(request.map(Full::new)).await {
                Err(e) if retries < REFUSED_RETRIES && refused_unprocessed(&e) => {
                    retries += 1;
                    request = build();
                }
                Ok(response) => return Ok(response.map(UpstreamBody::Hyper)),
                Err(e) => return Err(SendError::Hyper(e)),
            }
        }
    }
}

/// The TLS of every outbound connection: rustls with aws-lc-rs and the platform's trust
/// store.
pub(super) fn tls_config() -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .map_err(|e| format!("cannot load the trust store: {e}"))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Whether an HTTP/2 server said it did not process the request, so sending it again is
/// safe: a stream refused, or the connection closed gracefully before the stream began.
fn refused_unprocessed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = e.source();
    while let Some(inner) = source {
        if let Some(h2) = inner.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return h2.is_remote()
                && ((h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM)));
        }
        source = inner.source();
    }
    false
}

/// Connects to a model server over TCP or TLS, the TLS handshake included within
/// `timeout`.
#[derive(Clone)]
pub(super) struct UpstreamConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

/// The error of a connection not made in time: an I/O timeout, as the rest of the client
/// reports one.
fn connect_timed_out() -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connect timed out",
    ))
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(MaybeHttpsStream::Http(tcp))) => Ok(UpstreamIo::Plain(tcp)),
                Ok(Ok(tls)) => Ok(UpstreamIo::Tls(Box::new(tls))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(connect_timed_out()),
            }
        })
    }
}

type Tcp = TokioIo<TcpStream>;

/// A connection to a model server. Its TLS state (over a kilobyte) is boxed, so that a
/// plain connection, what a vLLM server speaks, does not carry room for it in each of
/// thousands of open streams.
pub(super) enum UpstreamIo {
    Plain(Tcp),
    /// Always `MaybeHttpsStream::Https`.
    Tls(Box<MaybeHttpsStream<Tcp>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(io) => io.connected(),
            // Says whether ALPN chose h2.
            UpstreamIo::Tls(io) => io.connected(),
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_write_vectored(cx, bufs),
        }
    }

    /// hyper writes a request's head and body with one `writev` when this says yes.
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(&mut **io).poll_shutdown(cx),
        }
    }
}
