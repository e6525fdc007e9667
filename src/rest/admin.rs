//! `/admin/v1`: users, keys, usage and calls over REST, authorised by the admin token.
//! Each handler is a thin adapter over a core admin function.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{AppState, bearer};
use crate::core::GatewayError;
use crate::core::admin::{KeyFilter, KeyPatch, NewKey, NewUser, UserPatch};
use crate::core::records::UnixTime;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", get(list_users).post(create_user))
        .route(
            "/users/{id}",
            get(get_user).patch(update_user).delete(deactivate_user),
        )
        .route("/keys", get(list_keys).post(create_key))
        .route(
            "/keys/{id}",
            get(get_key).patch(update_key).delete(revoke_key),
        )
        .route("/keys/{id}/usage", get(key_usage))
        .route("/keys/{id}/calls", get(key_calls))
}

/// Proof that the request carries the admin token; every admin handler takes one.
struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = GatewayError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        state.gateway.authenticate_admin(bearer(&parts.headers))?;
        Ok(Admin)
    }
}

/// A JSON body whose rejections answer in the OpenAI error shape.
struct AdminJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AdminJson<T> {
    type Rejection = GatewayError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(AdminJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> GatewayError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => GatewayError::invalid_request(
            "send the body as JSON with `Content-Type: application/json`",
            None,
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => GatewayError::BodyTooLarge {
            limit: 2 * 1024 * 1024,
        },
        other => GatewayError::invalid_request(other.body_text(), None),
    }
}

fn query_rejection(rejection: QueryRejection) -> GatewayError {
    GatewayError::invalid_request(rejection.body_text(), None)
}

async fn list_users(_: Admin, State(state): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": state.gateway.list_users()}))
}

async fn create_user(
    _: Admin,
    State(state): State<AppState>,
    AdminJson(new): AdminJson<NewUser>,
) -> Result<Response, GatewayError> {
    let user = state.gateway.create_user(new)?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

async fn get_user(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway.get_user(&id)?).into_response())
}

async fn update_user(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminJson(patch): AdminJson<UserPatch>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway.update_user(&id, patch)?).into_response())
}

async fn deactivate_user(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway.deactivate_user(&id)?).into_response())
}

async fn list_keys(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<KeyFilter>, QueryRejection>,
) -> Result<Response, GatewayError> {
    let Query(filter) = query.map_err(query_rejection)?;
    Ok(Json(json!({"object": "list", "data": state.gateway.list_keys(&filter)})).into_response())
}

async fn create_key(
    _: Admin,
    State(state): State<AppState>,
    AdminJson(new): AdminJson<NewKey>,
) -> Result<Response, GatewayError> {
    let created = state.gateway.create_key(new)?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn get_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway.get_key(&id)?).into_response())
}

async fn update_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminJson(patch): AdminJson<KeyPatch>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway.update_key(&id, patch)?).into_response())
}

async fn revoke_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway.revoke_key(&id)?).into_response())
}

#[derive(Deserialize)]
struct RangeQuery {
    from: Option<UnixTime>,
    to: Option<UnixTime>,
}

async fn key_usage(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Response, GatewayError> {
    let Query(range) = query.map_err(query_rejection)?;
    Ok(Json(state.gateway.key_usage(&id, range.from, range.to)?).into_response())
}

#[derive(Deserialize)]
struct CallsQuery {
    limit: Option<usize>,
    /// Only calls older than this (microseconds since the epoch): the next page.
    before: Option<i64>,
}

async fn key_calls(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<CallsQuery>, QueryRejection>,
) -> Result<Response, GatewayError> {
    let Query(page) = query.map_err(query_rejection)?;
    let calls = state
        .gateway
        .key_calls(&id, page.before, page.limit.unwrap_or(50))?;
    let next_before = calls.last().map(|c| c.at_micros);
    Ok(Json(json!({"object": "list", "data": calls, "next_before": next_before})).into_response())
}
