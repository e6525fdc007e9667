//! The `Chat` service: a thin adapter from proto to the shared chat path.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::convert::{self, ChunkMerger};
use super::pb;
use super::{bearer, caller_deadline, request_id};
use crate::call::key_tokens::TokenRequest;
use crate::call::trace::{self, Stage};
use crate::call::{CacheChoice, CacheStatus, CallPath, Origin, Relay, RelayEvent, UsageView};
use crate::core::catalogue::Deprecation;
use crate::core::events::Door;
use crate::core::rate_limit::RateFigures;
use crate::core::request::Endpoint;
use crate::core::{Caller, GatewayError, Remaining};
use crate::edge::client_addr::{certificate_subject, client_addr};
use crate::edge::{ModelLabel, add_deprecation_headers, add_limit_headers};

pub struct ChatService {
    chat: CallPath,
}

impl ChatService {
    pub fn new(chat: CallPath) -> Self {
        ChatService { chat }
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let client = client_addr(request.extensions());
        Ok(self
            .chat
            .authenticate(
                bearer(request.metadata()),
                client,
                certificate_subject(request.extensions()),
            )
            .await?)
    }

    /// A unary model call: the request as the JSON the REST door would have received
    /// (`to_json`, once the caller is known) through the shared call path, the answer read
    /// into its proto by `read` before the call settles, within the caller's deadline.
    async fn unary<T, A>(
        &self,
        request: &Request<T>,
        endpoint: Endpoint,
        to_json: impl FnOnce(&T) -> Result<bytes::Bytes, GatewayError>,
        read: impl FnOnce(&bytes::Bytes) -> Result<A, GatewayError>,
    ) -> Result<Response<A>, Status> {
        let origin = origin(request, endpoint);
        let answer = async {
            let caller = self
                .authenticate(request)
                .instrument(trace::stage(&origin.span, Stage::Authenticate))
                .await?;
            let deadline = caller_deadline(request.metadata());
            cache_choice(request)?;
            let call = self.chat.prepare(endpoint, to_json(request.get_ref())?)?;
            let label = self.chat.metric_model(&call.model);
            let completion = self.chat.complete(&caller, call, &origin, read);
            let completion = match deadline {
                // Dropping the call at the deadline cancels the upstream request and settles it.
                Some(deadline) => tokio::time::timeout(deadline, completion)
                    .await
                    .map_err(|_| Status::deadline_exceeded("the call's deadline passed"))??,
                None => completion.await?,
            };
            let mut response = Response::new(completion.answer);
            response.extensions_mut().insert(ModelLabel(label));
            *response.metadata_mut() = limit_metadata(
                &completion.figures,
                &completion.remaining,
                completion.deprecation,
            );
            add_cache_metadata(response.metadata_mut(), completion.cache);
            Ok(response)
        }
        .await;
        record_status(&origin.span, &answer);
        answer
    }
}

/// A failed call's gRPC code on its span (a settled call has its outcome there already).
fn record_status<T>(span: &tracing::Span, answer: &Result<T, Status>) {
    if let Err(status) = answer {
        let code = status.code();
        trace::record_error(span, tracing::field::debug(code), server_fault(code));
    }
}

/// Codes that say the gateway or what is behind it failed, not the caller (OpenTelemetry's
/// rule for a gRPC server's span).
fn server_fault(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

/// A call's request id, the client's W3C `traceparent` metadata, and the call's span.
fn origin<T>(request: &Request<T>, endpoint: Endpoint) -> Origin {
    let request_id = request_id(request);
    let traceparent = request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Origin {
        span: trace::call_span(Door::Grpc, endpoint, &request_id, traceparent.as_deref()),
        request_id,
        door: Door::Grpc,
        traceparent,
        // A value the door cannot read is refused before the call (`cache_choice`).
        cache: cache_choice(request).unwrap_or_default(),
    }
}

/// The `x-cache` request metadata: `use` or `skip`.
fn cache_choice<T>(request: &Request<T>) -> Result<CacheChoice, GatewayError> {
    CacheChoice::parse(
        request
            .metadata()
            .get("x-cache")
            .and_then(|v| v.to_str().ok()),
    )
}

/// `x-cache: hit|miss` on the answers of calls the response cache could answer.
fn add_cache_metadata(metadata: &mut tonic::metadata::MetadataMap, cache: Option<CacheStatus>) {
    if let Some(status) = cache {
        metadata.insert(
            "x-cache",
            tonic::metadata::MetadataValue::from_static(status.as_str()),
        );
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ChatChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::chat_server::Chat for ChatService {
    async fn complete(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<pb::ChatResponse>, Status> {
        self.unary(
            &request,
            Endpoint::ChatCompletions,
            |r| convert::request_json(r, false),
            |answer| convert::response_proto(answer),
        )
        .await
    }

    type StreamCompleteStream = ChunkStream;

    async fn stream_complete(
        &self,
        request: Request<pb::ChatRequest>,
    ) -> Result<Response<Self::StreamCompleteStream>, Status> {
        let origin = origin(&request, Endpoint::ChatCompletions);
        let answer = async {
            let caller = self
                .authenticate(&request)
                .instrument(trace::stage(&origin.span, Stage::Authenticate))
                .await?;
            let deadline =
                caller_deadline(request.metadata()).map(|d| tokio::time::Instant::now() + d);
            cache_choice(&request)?;
            let call = self.chat.prepare(
                Endpoint::ChatCompletions,
                convert::request_json(request.get_ref(), true)?,
            )?;
            let label = self.chat.metric_model(&call.model);
            // The last message always carries the usage: the final usage chunk is wanted.
            let view = UsageView {
                final_chunk: true,
                every_chunk: false,
            };
            let start = self.chat.stream(&caller, call, &origin, view);
            let start = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, start)
                    .await
                    .map_err(|_| Status::deadline_exceeded("the call's deadline passed"))??,
                None => start.await?,
            };
            let mut response = Response::new(chunks(start.relay, deadline));
            response.extensions_mut().insert(ModelLabel(label));
            *response.metadata_mut() =
                limit_metadata(&start.figures, &start.remaining, start.deprecation);
            add_cache_metadata(response.metadata_mut(), start.cache);
            Ok(response)
        }
        .await;
        record_status(&origin.span, &answer);
        answer
    }

    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        self.unary(
            &request,
            Endpoint::Embeddings,
            convert::embed_json,
            |answer| convert::embed_proto(answer),
        )
        .await
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let list = self.chat.models(&caller, &request_id(&request)).await?;
        Ok(Response::new(convert::models_proto(&list)))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::KeyToken>, Status> {
        // The key's secret only: a token does not make tokens.
        let client = client_addr(request.extensions());
        let caller = self
            .chat
            .gateway
            .authenticate(bearer(request.metadata()), client)?;
        let r = request.into_inner();
        let issued = self.chat.key_tokens.issue(
            &caller,
            TokenRequest {
                ttl_seconds: r.ttl_seconds,
                models: (!r.models.is_empty()).then_some(r.models),
                rpm_limit: r.rpm_limit,
            },
        )?;
        Ok(Response::new(pb::KeyToken {
            token: issued.token,
            key_id: issued.key_id,
            expires_at: issued.expires_at,
        }))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::KeyUsage>, Status> {
        let caller = self.authenticate(&request).await?;
        let summary = self.chat.gateway.usage_summary(&caller)?;
        Ok(Response::new(pb::KeyUsage {
            key_id: summary.key_id,
            key_name: summary.key_name,
            key_prefix: summary.key_prefix,
            user_id: summary.user_id,
            user_name: summary.user_name,
            requests_used: summary.used.requests,
            request_quota: summary.request_quota,
            requests_remaining: summary.remaining.requests,
            prompt_tokens_used: summary.used.prompt_tokens,
            completion_tokens_used: summary.used.completion_tokens,
            tokens_used: summary.used.tokens(),
            token_quota: summary.token_quota,
            tokens_remaining: summary.remaining.tokens,
            rpm_limit: summary.limits.rpm,
            tpm_limit: summary.limits.tpm,
            max_concurrent: summary.limits.concurrent,
            requests_this_minute_remaining: summary.figures.requests.map(|r| r.remaining),
            tokens_this_minute_remaining: summary.figures.tokens.map(|r| r.remaining),
            image_quota: summary.image_quota,
            images_used: summary.used.images,
            images_remaining: summary.remaining.images,
            models: summary.models.unwrap_or_default(),
            created_at: summary.created_at,
            expires_at: summary.expires_at,
            cost_used: summary.used.cost.to_string(),
            budget: summary.budget.map(|b| b.to_string()),
            budget_remaining: summary.remaining.budget.map(|b| b.to_string()),
            period: summary.period.map(|p| p.as_str().to_owned()),
            period_start: summary.period_start,
            period_end: summary.period_end,
            currency: summary.currency,
        }))
    }
}

/// The relay's events as proto chunks. Dropping this stream (the caller cancelled) drops
/// the relay, which stops the upstream and settles the call.
fn chunks(relay: Relay, deadline: Option<tokio::time::Instant>) -> ChunkStream {
    struct State {
        relay: Relay,
        merger: ChunkMerger,
        queue: std::collections::VecDeque<Result<pb::ChatChunk, Status>>,
        ended: bool,
        deadline: Option<tokio::time::Instant>,
    }
    let state = State {
        relay,
        merger: ChunkMerger::default(),
        queue: Default::default(),
        ended: false,
        deadline,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move {
            loop {
                if let Some(item) = state.queue.pop_front() {
                    return Some((item, state));
                }
                if state.ended {
                    return None;
                }
                let next = match state.deadline {
                    Some(deadline) => {
                        match tokio::time::timeout_at(deadline, state.relay.next_events()).await {
                            Ok(next) => next,
                            Err(_) => {
                                state.ended = true;
                                state.queue.push_back(Err(Status::deadline_exceeded(
                                    "the call's deadline passed",
                                )));
                                continue;
                            }
                        }
                    }
                    None => state.relay.next_events().await,
                };
                let Some(events) = next else {
                    state.ended = true;
                    state.queue.extend(state.merger.finish().map(Ok));
                    continue;
                };
                for event in events {
                    match event {
                        RelayEvent::Chunk(data) => match convert::chunk_proto(&data) {
                            Ok(chunk) => {
                                let queue = &mut state.queue;
                                state.merger.push_to(chunk, |c| queue.push_back(Ok(c)));
                            }
                            Err(e) => {
                                // Settled here: dropping the relay would book a client that left.
                                state.relay.fail();
                                state.ended = true;
                                state.queue.push_back(Err(e.into()));
                                break;
                            }
                        },
                        RelayEvent::Done => {
                            state.queue.extend(state.merger.finish().map(Ok));
                        }
                        RelayEvent::Error(message) => {
                            state.ended = true;
                            state.queue.push_back(Err(Status::unavailable(message)));
                            break;
                        }
                    }
                }
            }
        },
    ))
}

/// The rate-limit figures and remaining quota as response metadata: written as the REST
/// door writes its headers, then taken whole as metadata (no `MetadataValue` parsed per
/// figure); the values are digits and units (`6m0s`), valid metadata. A deprecated
/// version's `deprecation` and `sunset` go with them, as the REST door's headers.
fn limit_metadata(
    figures: &RateFigures,
    remaining: &Remaining,
    deprecation: Option<Deprecation>,
) -> tonic::metadata::MetadataMap {
    let mut headers = axum::http::HeaderMap::with_capacity(11);
    add_limit_headers(&mut headers, *figures, *remaining);
    add_deprecation_headers(&mut headers, deprecation);
    tonic::metadata::MetadataMap::from_headers(headers)
}
