//! HTTP routes of the simulator: health, the model list, and the four POST APIs, each
//! going through the same steps — record, check the key, take the next fault, validate,
//! answer as JSON or as a stream.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::chat::ChatRequest;
use super::completions::CompletionRequest;
use super::config::SimulatorConfig;
use super::embeddings::EmbeddingRequest;
use super::fault::Fault;
use super::models;
use super::raw::{self, Shape, Tail};
use super::responses::ResponsesRequest;
use super::state::{AppState, CHAT_PATH, SimState};
use super::stream::{StreamFault, StreamFormat, StreamPlan};
use super::wire::{ApiError, random_id};

/// vLLM has no body limit of its own and base64 images are large, so allow plenty.
const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

pub(super) fn router(sim: Arc<SimState>, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(list_models))
        .route(CHAT_PATH, post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState { sim, shutdown })
}

async fn health() -> StatusCode {
    StatusCode::OK
}

/// FastAPI's answer for a path it has no route for.
async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response()
}

async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let config = &state.sim.config;
    if let Err(err) = authorize(config, &headers) {
        return err.into_response();
    }
    Json(models::list(config)).into_response()
}

async fn chat_completions(state: State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(state, headers, body, Route::ChatCompletions).await
}

async fn completions(state: State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(state, headers, body, Route::Completions).await
}

async fn embeddings(state: State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(state, headers, body, Route::Embeddings).await
}

async fn responses(state: State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    serve(state, headers, body, Route::Responses).await
}

/// The POST routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => CHAT_PATH,
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
        }
    }
}

/// What a popped [`Fault`] leaves for the rest of the request to do.
#[derive(Default)]
struct Armed {
    delay: Duration,
    no_usage: bool,
    stream: Option<StreamFault>,
    inject: Option<Bytes>,
    body: Option<BodyFault>,
}

/// A non-streaming fault that shapes the body's bytes.
#[derive(Clone, Copy, Debug)]
enum BodyFault {
    StallHalfway,
    CutAfter(usize),
    Oversized(u64),
    Trickle(Duration),
}

/// Splits a fault into what answers at once and what shapes the answer later.
fn arm(fault: Option<Fault>) -> Result<Armed, Fault> {
    let mut armed = Armed::default();
    match fault {
        None => {}
        Some(
            fault @ (Fault::Status { .. }
            | Fault::Raw { .. }
            | Fault::TrickleErrorPage(_)
            | Fault::DropConnection),
        ) => return Err(fault),
        Some(Fault::Delay(delay)) => armed.delay = delay,
        Some(Fault::NoUsage) => armed.no_usage = true,
        Some(Fault::StreamCutAfter(n)) => armed.stream = Some(StreamFault::Cut(n)),
        Some(Fault::StreamErrorAfter(n)) => armed.stream = Some(StreamFault::Error(n)),
        Some(Fault::StreamEndAfter(n)) => armed.stream = Some(StreamFault::End(n)),
        Some(Fault::StreamStallAfter(n)) => {
            armed.stream = Some(StreamFault::Stall(n));
            armed.body = Some(BodyFault::StallHalfway);
        }
        Some(Fault::JsonCutAfter(n)) => armed.body = Some(BodyFault::CutAfter(n)),
        Some(Fault::StreamInject { after, raw }) => {
            armed.stream = Some(StreamFault::Inject(after));
            armed.inject = Some(Bytes::from(raw));
        }
        Some(Fault::Oversized(total)) => armed.body = Some(BodyFault::Oversized(total)),
        Some(Fault::Trickle(every)) => armed.body = Some(BodyFault::Trickle(every)),
    }
    Ok(armed)
}

/// A fault that replaces the answer entirely.
fn answer_with(fault: Fault, state: AppState) -> Response {
    match fault {
        Fault::Status { status, body } => status_response(status, body),
        Fault::Raw {
            status,
            content_type,
            body,
        } => raw::exact(status, &content_type, body),
        Fault::TrickleErrorPage(every) => raw::trickle_error_page(state, every),
        _ => drop_connection(),
    }
}

async fn serve(
    State(state): State<AppState>,
    headers: HeaderMap,
    raw_body: Bytes,
    route: Route,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&raw_body);
    state
        .sim
        .record(route.path(), &headers, parsed.as_ref().ok(), &raw_body);
    // vLLM's API-key check is middleware, so it runs before anything else.
    if let Err(err) = authorize(&state.sim.config, &headers) {
        return err.into_response();
    }
    let armed = match arm(state.sim.pop_fault()) {
        Ok(armed) => armed,
        Err(fault) => return answer_with(fault, state),
    };
    if !state.pause(armed.delay).await {
        return drop_connection();
    }
    let body = match parsed {
        Ok(body) => body,
        Err(err) => {
            return ApiError::bad_request(format!("Invalid JSON body: {err}"), None)
                .into_response();
        }
    };
    let config = &state.sim.config;
    let request = match route {
        Route::ChatCompletions => ChatRequest::parse(&body, config).map(Request::Chat),
        Route::Completions => CompletionRequest::parse(&body, config).map(Request::Completion),
        Route::Embeddings => EmbeddingRequest::parse(&body, config).map(Request::Embedding),
        Route::Responses => ResponsesRequest::parse(&body, config).map(Request::Response),
    };
    let request = match request {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    request.answer(state, armed).await
}

/// A validated request of one of the POST APIs, borrowing from its body.
enum Request<'a> {
    Chat(ChatRequest<'a>),
    Completion(CompletionRequest<'a>),
    Embedding(EmbeddingRequest<'a>),
    Response(ResponsesRequest<'a>),
}

impl Request<'_> {
    fn stream(&self) -> bool {
        match self {
            Self::Chat(r) => r.stream,
            Self::Completion(r) => r.stream,
            Self::Embedding(_) => false,
            Self::Response(r) => r.stream,
        }
    }

    fn shape(&self) -> Shape {
        match self {
            Self::Chat(_) => Shape::Chat,
            Self::Completion(_) => Shape::Completion,
            Self::Embedding(_) => Shape::Embedding,
            Self::Response(_) => Shape::Response,
        }
    }

    /// `(tokens one choice takes to generate, completion tokens of the whole answer)`.
    fn tokens(&self) -> (u32, u32) {
        match self {
            Self::Chat(r) => (r.reply.completion_tokens, r.reply.total_completion_tokens()),
            Self::Completion(r) => (r.tokens_per_choice(), r.completion_tokens()),
            Self::Embedding(_) => (0, 0),
            Self::Response(r) => (r.completion_tokens(), r.completion_tokens()),
        }
    }

    /// The JSON answer, serialised.
    fn json(&self, model: &str, config: &SimulatorConfig, with_usage: bool) -> Bytes {
        let value = match self {
            Self::Chat(r) => r.json(&random_id("chatcmpl-"), model, with_usage),
            Self::Completion(r) => r.json(&random_id("cmpl-"), model, with_usage),
            Self::Response(r) => r.json(&random_id("resp_"), model, with_usage),
            Self::Embedding(r) => {
                let id = random_id("embd-");
                return Bytes::from(r.json(&id, model, config.embedding_dimensions, with_usage));
            }
        };
        // Serialising a `Value` cannot fail.
        Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
    }

    fn into_stream(self, model: String, with_usage: bool) -> Option<Box<dyn StreamFormat>> {
        Some(match self {
            Self::Chat(r) => Box::new(r.into_stream(random_id("chatcmpl-"), model, with_usage)),
            Self::Completion(r) => Box::new(r.into_stream(random_id("cmpl-"), model, with_usage)),
            Self::Response(r) => Box::new(r.into_stream(random_id("resp_"), model, with_usage)),
            Self::Embedding(_) => return None,
        })
    }

    /// Answers as JSON or as a stream, with what the armed fault still does.
    async fn answer(self, state: AppState, armed: Armed) -> Response {
        let stream = self.stream();
        match armed.body {
            Some(BodyFault::Oversized(total)) => {
                return raw::oversized(state, self.shape(), stream, total);
            }
            Some(BodyFault::Trickle(every)) => {
                return raw::trickle(state, self.shape(), stream, every);
            }
            _ => {}
        }
        let config = &state.sim.config;
        let model = match self {
            Self::Embedding(_) => config.embedding_model.clone().unwrap_or_default(),
            _ => config.model.clone(),
        };
        let (per_choice, total) = self.tokens();
        let with_usage = !armed.no_usage;
        if stream {
            let token_latency = config.token_latency;
            // Only embeddings have no stream, and `stream()` is false for them.
            let Some(format) = self.into_stream(model, with_usage) else {
                return drop_connection();
            };
            let plan = StreamPlan {
                format,
                fault: armed.stream,
                inject: armed.inject,
                token_latency,
            };
            return plan.into_response(state);
        }

        // The choices are generated side by side, so the wait is one choice's length.
        let generation = config.token_latency.saturating_mul(per_choice);
        if !state.pause(generation).await {
            return drop_connection();
        }
        let json = self.json(&model, config, with_usage);
        match armed.body {
            Some(BodyFault::StallHalfway) => {
                let half = json.len() / 2;
                return raw::partial(state, "application/json", json.slice(..half), Tail::Stall);
            }
            Some(BodyFault::CutAfter(n)) => {
                let head = json.slice(..n.min(json.len()));
                return raw::partial(state, "application/json", head, Tail::Abort);
            }
            _ => {}
        }
        state.sim.add_tokens_sent(total);
        json_response(json)
    }
}

fn json_response(json: Bytes) -> Response {
    let mut response = Response::new(Body::from(json));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn authorize(config: &SimulatorConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &config.api_key else {
        return Ok(());
    };
    // vLLM compares the whole header value, so the scheme is case-sensitive too.
    let presented = headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
    let expected = format!("Bearer {key}");
    if presented == Some(expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            None,
        ))
    }
}

fn status_response(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or_else(|_| {
        tracing::warn!(status, "simulator: invalid fault status, using 500");
        StatusCode::INTERNAL_SERVER_ERROR
    });
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A response whose body fails before its first byte.
///
/// hyper buffers the status line and headers until the first body frame, so a body that
/// errors immediately makes it close the connection with nothing written: the client sees
/// a connection error rather than a status (see the `drop_connection_*` tests).
fn drop_connection() -> Response {
    let body = futures_util::stream::once(async {
        Err::<Bytes, _>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "simulated dropped connection",
        ))
    });
    Response::new(Body::from_stream(body))
}
