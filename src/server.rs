//! Serving one listener: HTTP/1.1 and HTTP/2 (gRPC) on each connection, the deadlines that
//! keep slow or idle clients from holding connections, and graceful shutdown.
//!
//! Three deadlines bound what a client can hold without doing useful work:
//! - the request head (HTTP/1.1) must arrive within `header_read_timeout`, counted from
//!   the moment the gateway starts waiting for it (so an idle HTTP/1.1 keep-alive
//!   connection is closed after it too);
//! - a request body must arrive within `body_read_timeout` of its head, however it trickles;
//! - a connection with no request in flight is closed after `idle_timeout` (this covers a
//!   connection that never sends a byte, and idle HTTP/2 connections).

use std::convert::Infallible;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::edge::BodyReadTimeout;
use crate::edge::client_addr::ClientCertificate;
use crate::edge::client_addr::PeerAddr;
use crate::tls::{TlsAcceptor, certificate_identity};

/// How long clients may take, per connection and per request.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `shutdown`; then
/// stops accepting, asks every connection to finish what it is doing, and returns once all
/// are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    tls: Option<Arc<TlsAcceptor>>,
) {
    // Every connection task holds a receiver; `closed()` resolves when the last one ends.
    let (all_closed_tx, all_closed_rx) = watch::channel(());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, typically: wait for some to be freed.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            // Without TCP_NODELAY a response written in two pieces waits ~40 ms on Nagle.
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let (router, shutdown, open) = (router.clone(), shutdown.clone(), all_closed_rx.clone());
        match &tls {
            None => {
                tokio::spawn(serve_connection(
                    stream, peer, None, router, limits, shutdown, open,
                ));
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                tokio::spawn(async move {
                    // The handshake counts as the request head: a client that stalls in it
                    // is cut like one that stalls in its headers.
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| ClientCertificate(certificate_identity(leaf)));
                    serve_connection(stream, peer, identity, router, limits, shutdown, open).await;
                });
            }
        }
    }
    drop(listener);
    drop(all_closed_rx);
    all_closed_tx.closed().await;
}

async fn serve_connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    certificate: Option<ClientCertificate>,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    _open: watch::Receiver<()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let service = ConnectionService {
        router,
        peer: PeerAddr(peer),
        certificate,
        activity: activity.clone(),
        body_read_timeout: limits.body_read_timeout,
    };
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut idle = pin!(activity.idle_for(limits.idle_timeout));
    let mut closing = false;
    // A client that ignores the close (an HTTP/2 GOAWAY it never acknowledges) is cut.
    let cut = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
    let mut cut = pin!(cut);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                break;
            }
            () = shutdown.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut idle, if !closing => {
                tracing::debug!("closing a connection idle for {:?}", limits.idle_timeout);
                connection.as_mut().graceful_shutdown();
                closing = true;
                cut.as_mut().reset(Instant::now() + limits.header_read_timeout);
            }
            () = &mut cut => {
                tracing::debug!("cutting a connection that did not close");
                break;
            }
        }
    }
}

/// What a connection is doing: requests in flight, and since when it has had none.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` when the last request in flight ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves once the connection has had no request in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            tokio::time::sleep_until(self.started + since + limit).await;
            let idle = self.in_flight.load(Ordering::Acquire) == 0;
            let since_now = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            if idle && since_now == since {
                return;
            }
            if !idle {
                // Check again one period after the present, at the earliest.
                tokio::time::sleep(limit).await;
            }
        }
    }
}

/// One request in flight on a connection, from its head until its response body ends or
/// is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router, as the connection sees it: counts requests in flight and puts a deadline
/// on request bodies.
#[derive(Clone)]
struct ConnectionService {
    router: Router,
    peer: PeerAddr,
    /// The client certificate the connection was made with (mutual TLS).
    certificate: Option<ClientCertificate>,
    activity: Arc<Activity>,
    body_read_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    type Future = Responding<tower::util::Oneshot<Router, Request<DeadlineBody<Incoming>>>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let limit = self.body_read_timeout;
        let mut request = request.map(|body| DeadlineBody {
            inner: body,
            deadline: Instant::now() + limit,
            limit,
            sleep: None,
        });
        request.extensions_mut().insert(self.peer);
        if let Some(certificate) = &self.certificate {
            request.extensions_mut().insert(certificate.clone());
        }
        Responding {
            inner: self.router.clone().oneshot(request),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The router's answer, whose body keeps the request counted until it ends.
    struct Responding<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F> Future for Responding<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx));
        let guard = this.guard.take();
        Poll::Ready(response.map(|response| {
            response.map(|body| {
                Body::new(CountedBody {
                    inner: body,
                    _guard: guard,
                })
            })
        }))
    }
}

pin_project_lite::pin_project! {
    struct CountedBody {
        #[pin]
        inner: Body,
        _guard: Option<InFlight>,
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with [`BodyReadTimeout`] once its deadline has passed.
    struct DeadlineBody<B> {
        #[pin]
        inner: B,
        deadline: Instant,
        limit: Duration,
        // Made only when the body first has to wait, so a body that is already there
        // costs no timer.
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.is_none() {
            this.sleep
                .set(Some(tokio::time::sleep_until(*this.deadline)));
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout::new(*this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
