//! The gRPC door (tonic): `Chat` and `Admin` services, health and reflection, served on
//! the REST port (routed by path) or a port of their own.

mod admin;
pub use admin::ADMIN_CLIENT_HEADER;
mod chat;
pub mod codec;
pub mod convert;
mod status;

use std::time::Duration;

use axum::response::Response;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic_health::ServingStatus;

use crate::call::CallPath;
use crate::edge::{RequestId, bearer_token, grpc_status_response};

pub use admin::AdminService;
pub use chat::ChatService;

pub mod pb {
    //! Code generated from `proto/step3/gateway/v1`.
    #![allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
    tonic::include_proto!("step3.gateway.v1");

    /// The encoded descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("step3_gateway_descriptor");
}

/// The gRPC health names of the store's parts: `SERVING` while the books take writes, and
/// (several replicas only) while the shared limits answer.
pub const BOOKS_SERVICE: &str = "step3gw.store.books";
pub const LIMITS_SERVICE: &str = "step3gw.store.limits";

fn serving(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Every gRPC service as axum routes (no fallback of its own), and the task that keeps the
/// health service in step with the model server until `stop`.
/// `max_message_bytes` bounds a request as `server.max_body_bytes` bounds a REST body
/// (tonic's own default, 4 MiB, would refuse inline images REST accepts).
pub fn routes(
    call: CallPath,
    stop: CancellationToken,
    max_message_bytes: usize,
) -> Result<axum::Router, tonic_reflection::server::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let upstream = call.upstream.clone();
    let gateway = call.gateway.clone();
    let store_gateway = gateway.clone();
    tokio::spawn(async move {
        let chat_name =
            <pb::chat_server::ChatServer<ChatService> as tonic::server::NamedService>::NAME;
        let admin_name =
            <pb::admin_server::AdminServer<AdminService> as tonic::server::NamedService>::NAME;
        health
            .set_service_status(admin_name, ServingStatus::Serving)
            .await;
        let mut reported = None;
        let mut reported_parts = (None, None);
        loop {
            let books = serving(store_gateway.store_health().is_available());
            let limits = store_gateway
                .shared_limits_health()
                .map(|limits| serving(limits.is_available()));
            let status = if upstream.any_healthy() && books == ServingStatus::Serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            // Every set sends a message to each `Watch` stream, even with the status
            // unchanged: set only on a change, so that a watcher hears of changes alone.
            if reported != Some(status) {
                // Without a model server, or with a store that fails, the gateway cannot
                // answer chats: report it overall too.
                health.set_service_status("", status).await;
                health.set_service_status(chat_name, status).await;
                reported = Some(status);
            }
            // The parts of the store, by name: the books, and with several replicas the
            // shared limits (their failure refuses only keys with a quota).
            if reported_parts.0 != Some(books) {
                health.set_service_status(BOOKS_SERVICE, books).await;
                reported_parts.0 = Some(books);
            }
            if let Some(limits) = limits
                && reported_parts.1 != Some(limits)
            {
                health.set_service_status(LIMITS_SERVICE, limits).await;
                reported_parts.1 = Some(limits);
            }
            tokio::select! {
                // Reads the pool's last checks (no network): cheap enough to follow closely.
                () = tokio::time::sleep(upstream.settings().health_interval.min(Duration::from_secs(1))) => {}
                () = stop.cancelled() => break,
            }
        }
    });
    Ok(tonic::service::Routes::from(axum::Router::new())
        .add_service(
            pb::chat_server::ChatServer::new(ChatService::new(call))
                .max_decoding_message_size(max_message_bytes),
        )
        .add_service(pb::admin_server::AdminServer::new(AdminService::new(
            gateway,
        )))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router()
        // A panic in a gRPC handler answers as gRPC (INTERNAL), not with the REST error body.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_status,
        )))
}

fn panic_status(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    grpc_status_response(tonic::Status::internal(
        "the gateway hit an internal error; the call was not completed",
    ))
}

/// The token of `authorization: Bearer <token>` metadata.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    bearer_token(metadata.get("authorization")?.to_str().ok()?)
}

/// The request id the port's middleware gave this call (a new one if none did).
fn request_id<T>(request: &tonic::Request<T>) -> String {
    match request.extensions().get::<RequestId>() {
        Some(RequestId(id)) => id.clone(),
        None => RequestId::generate().0,
    }
}

/// How long the gateway may work on a call with a `grpc-timeout`: a little less than the
/// caller's deadline, so that DEADLINE_EXCEEDED reaches the caller before its own timer
/// turns the call into a local CANCELLED.
fn caller_deadline(metadata: &MetadataMap) -> Option<Duration> {
    let deadline = grpc_timeout(metadata)?;
    let margin = (deadline / 20)
        .max(Duration::from_millis(50))
        .min(deadline / 2);
    Some(deadline - margin)
}

/// `grpc-timeout` (e.g. `500m`, `30S`), as gRPC defines it.
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    // The spec allows at most eight digits; more would overflow a deadline.
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let deadline = |v: &str| {
            let mut metadata = MetadataMap::new();
            metadata.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&metadata)
        };
        assert_eq!(deadline("2S"), Some(Duration::from_secs(2)));
        assert_eq!(deadline("500m"), Some(Duration::from_millis(500)));
        assert_eq!(deadline("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(deadline("7u"), Some(Duration::from_micros(7)));
        assert_eq!(deadline("x"), None);
        assert_eq!(deadline("5"), None);
        assert_eq!(deadline("18446744073709551615S"), None);
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(
            caller_deadline(&metadata),
            Some(Duration::from_millis(1900))
        );
    }
}
