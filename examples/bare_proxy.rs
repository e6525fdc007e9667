//! The floor of the gateway's stack: axum in, reqwest out, nothing checked. The benchmark
//! measures it beside the gateway, so the table shows what the frameworks cost on their
//! own and what the gateway's checks add on top.
//!
//! ```sh
//! bare_proxy <listen> <upstream-url>
//! ```

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;

#[derive(Clone)]
struct Upstream {
    client: reqwest::Client,
    base: String,
}

async fn forward(State(up): State<Upstream>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let url = format!("{}{}", up.base, parts.uri.path());
    let mut outgoing = up.client.request(parts.method, url).body(body);
    if let Some(content_type) = parts.headers.get("content-type") {
        outgoing = outgoing.header("content-type", content_type);
    }
    match outgoing.send().await {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            if let Some(content_type) = answer.headers().get("content-type") {
                response = response.header("content-type", content_type);
            }
            response
                .body(Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

// The gateway's allocator, so the floor differs from the gateway only in what it checks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8000".into());
    let upstream = Upstream {
        client: reqwest::Client::builder().tcp_nodelay(true).build()?,
        base,
    };
    let app = axum::Router::new().fallback(forward).with_state(upstream);
    // As the gateway does: answers are small, and Nagle would hold them back.
    let listener = tokio::net::TcpListener::bind(&listen).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
