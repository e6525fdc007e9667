//! `/admin/v1`: users, keys, usage and calls over REST, authorised by the admin token.
//! Each handler is a thin adapter over a core admin function.

use axum::extract::{FromRequest, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{AppState, parse_json, read_body};
use crate::core::GatewayError;
use crate::core::admin::{
    CallFilter, DEFAULT_ROTATION_GRACE_SECS, KeyFilter, KeyPatch, NewKey, NewUser, UsageGrouping,
    UsageQuery, UsageSubject, UserPatch,
};
use crate::core::audit::Actor;
use crate::core::billing::NewPrice;
use crate::core::catalogue::ModelRecord;
use crate::core::model_admin::ModelPatch;
use crate::core::request::field_error;
use crate::core::time::UnixTime;
use crate::edge::bearer;
use crate::edge::client_addr::client_addr;

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
        .route("/keys/{id}/rotate", post(rotate_key))
        .route("/keys/{id}/usage", get(key_usage))
        .route("/keys/{id}/calls", get(key_calls))
        .route("/users/{id}/usage", get(user_usage))
        .route("/calls", get(list_calls))
        .route("/alerts/test", post(test_alert))
        .route("/prices", get(list_prices).post(add_price))
        .route("/users/{id}/invoice", get(user_invoice))
        .route("/backup", get(backup))
        .route("/models", get(list_models).post(create_model))
        // Model names may hold slashes (`stepfun-ai/Step3-VL-10B`).
        .route(
            "/models/{*name}",
            get(get_model)
                .put(put_model)
                .patch(update_model)
                .delete(delete_model),
        )
        .route("/audit", get(list_audit))
}

/// Proof that the request carries the admin token; every admin handler takes one. It
/// names the actor of the changes the request makes (for the audit log).
struct Admin(Actor);

impl FromRequestParts<AppState> for Admin {
    type Rejection = GatewayError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let client = client_addr(&parts.extensions);
        state
            .gateway()
            .authenticate_admin(bearer(&parts.headers), client)?;
        let who = client.map_or_else(
            || "admin token".to_owned(),
            |a| format!("admin token from {a}"),
        );
        Ok(Admin(Actor::new("rest", who)))
    }
}

/// The largest admin request body (real ones are a few hundred bytes).
const MAX_ADMIN_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A JSON body, read whatever its `Content-Type` says (as the chat route reads its body:
/// `curl -d` labels JSON as a form), whose mistakes answer in the OpenAI error shape with
/// `param` naming the field.
struct AdminJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AdminJson<T> {
    type Rejection = GatewayError;

    async fn from_request(request: axum::extract::Request, _: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(request.into_body(), MAX_ADMIN_BODY_BYTES).await?;
        parse_json(&body).map(AdminJson)
    }
}

/// The query string's parameters, whose mistakes name the parameter in `param`.
struct AdminQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for AdminQuery<T> {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(AdminQuery)
            .map_err(|e| field_error(&e.path().to_string(), &e.into_inner().to_string()))
    }
}

/// What serde said about the input at `path` (`.` is the whole input), as an invalid
/// request whose `param` names the field: serde reports a missing field at its parent.
async fn list_models(_: Admin, State(state): State<AppState>) -> Json<Value> {
    Json(json!({"models": state.gateway().list_models()}))
}

async fn create_model(
    Admin(actor): Admin,
    State(state): State<AppState>,
    AdminJson(model): AdminJson<ModelRecord>,
) -> Result<Response, GatewayError> {
    let model = state.gateway().acting(actor).create_model(model)?;
    Ok((StatusCode::CREATED, Json(model)).into_response())
}

async fn get_model(
    _: Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().get_model(&name)?).into_response())
}

/// Creates or replaces the model whole; the path names it (a `name` in the body must agree).
async fn put_model(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    AdminJson(mut body): AdminJson<Value>,
) -> Result<Response, GatewayError> {
    if let Some(object) = body.as_object_mut() {
        match object.get("name").and_then(Value::as_str) {
            Some(given) if given != name => {
                return Err(GatewayError::invalid_request(
                    format!("the body names model `{given}`, the path `{name}`"),
                    Some("name"),
                ));
            }
            _ => {
                object.insert("name".into(), Value::String(name));
            }
        }
    }
    let model: ModelRecord = serde_path_to_error::deserialize(body)
        .map_err(|e| field_error(&e.path().to_string(), &e.into_inner().to_string()))?;
    Ok(Json(state.gateway().acting(actor).put_model(model)?).into_response())
}

async fn update_model(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    AdminJson(patch): AdminJson<ModelPatch>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().acting(actor).update_model(&name, patch)?).into_response())
}

async fn delete_model(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().acting(actor).delete_model(&name)?).into_response())
}

async fn list_users(_: Admin, State(state): State<AppState>) -> Json<Value> {
    Json(json!({"users": state.gateway().list_users()}))
}

async fn create_user(
    Admin(actor): Admin,
    State(state): State<AppState>,
    AdminJson(new): AdminJson<NewUser>,
) -> Result<Response, GatewayError> {
    let user = state.gateway().acting(actor).create_user(new)?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

async fn get_user(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().get_user(&id)?).into_response())
}

async fn update_user(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminJson(patch): AdminJson<UserPatch>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().acting(actor).update_user(&id, patch)?).into_response())
}

async fn deactivate_user(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().acting(actor).deactivate_user(&id)?).into_response())
}

#[derive(Deserialize)]
struct KeyListParams {
    user_id: Option<String>,
    limit: Option<usize>,
    page_token: Option<String>,
}

async fn list_keys(
    _: Admin,
    State(state): State<AppState>,
    AdminQuery(params): AdminQuery<KeyListParams>,
) -> Result<Response, GatewayError> {
    let filter = KeyFilter {
        user_id: params.user_id,
    };
    let page =
        state
            .gateway()
            .list_keys_page(&filter, params.page_token.as_deref(), params.limit)?;
    Ok(Json(page).into_response())
}

async fn create_key(
    Admin(actor): Admin,
    State(state): State<AppState>,
    AdminJson(new): AdminJson<NewKey>,
) -> Result<Response, GatewayError> {
    let created = state.gateway().acting(actor).create_key(new)?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn get_key(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().get_key(&id)?).into_response())
}

async fn update_key(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminJson(patch): AdminJson<KeyPatch>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().acting(actor).update_key(&id, patch)?).into_response())
}

async fn revoke_key(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().acting(actor).revoke_key(&id)?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old secret keeps working.
    grace_seconds: Option<u64>,
}

async fn rotate_key(
    Admin(actor): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, GatewayError> {
    let body = read_body(body, MAX_ADMIN_BODY_BYTES).await?;
    // The body is optional: an empty one takes the default grace period.
    let body: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody {
            grace_seconds: None,
        }
    } else {
        parse_json(&body)?
    };
    let grace = body.grace_seconds.unwrap_or(DEFAULT_ROTATION_GRACE_SECS);
    Ok(Json(state.gateway().acting(actor).rotate_key(&id, grace)?).into_response())
}

#[derive(Deserialize)]
struct UsageParams {
    from: Option<UnixTime>,
    to: Option<UnixTime>,
    #[serde(default)]
    group_by: UsageGrouping,
    #[serde(default)]
    by_model: bool,
    #[serde(default)]
    by_key: bool,
}

impl UsageParams {
    fn query(self, subject: UsageSubject) -> UsageQuery {
        UsageQuery {
            subject,
            from: self.from,
            to: self.to,
            group_by: self.group_by,
            by_model: self.by_model,
            by_key: self.by_key,
        }
    }
}

async fn key_usage(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminQuery(params): AdminQuery<UsageParams>,
) -> Result<Response, GatewayError> {
    let report = state
        .gateway()
        .usage_report(&params.query(UsageSubject::Key(id)))?;
    Ok(Json(report).into_response())
}

async fn user_usage(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminQuery(params): AdminQuery<UsageParams>,
) -> Result<Response, GatewayError> {
    let report = state
        .gateway()
        .usage_report(&params.query(UsageSubject::User(id)))?;
    Ok(Json(report).into_response())
}

#[derive(Deserialize)]
struct PriceParams {
    model: Option<String>,
}

async fn list_prices(
    _: Admin,
    State(state): State<AppState>,
    AdminQuery(params): AdminQuery<PriceParams>,
) -> Result<Response, GatewayError> {
    let gateway = state.gateway();
    Ok(Json(json!({
        "object": "list",
        "currency": gateway.currency(),
        "data": gateway.list_prices(params.model.as_deref()),
    }))
    .into_response())
}

async fn add_price(
    Admin(actor): Admin,
    State(state): State<AppState>,
    AdminJson(new): AdminJson<NewPrice>,
) -> Result<Response, GatewayError> {
    let price = state.gateway().acting(actor).add_price(new)?;
    Ok((StatusCode::CREATED, Json(price)).into_response())
}

#[derive(Deserialize)]
struct InvoiceParams {
    from: Option<UnixTime>,
    to: Option<UnixTime>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

/// A user's usage of a period (default: this calendar month) as invoice lines.
async fn user_invoice(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminQuery(params): AdminQuery<InvoiceParams>,
) -> Result<Response, GatewayError> {
    let gateway = state.gateway();
    let (month_start, month_end) = gateway.month_of(gateway.now_unix());
    let invoice = gateway.invoice(
        &id,
        params.from.unwrap_or(month_start),
        params.to.unwrap_or(month_end),
    )?;
    match params.format.as_deref() {
        None | Some("json") => Ok(Json(invoice).into_response()),
        Some("csv") => Ok((
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "text/csv; charset=utf-8".to_owned(),
                ),
                (
                    axum::http::header::CONTENT_DISPOSITION,
                    format!(
                        "attachment; filename=\"invoice-{}-{}.csv\"",
                        invoice.user_id, invoice.from
                    ),
                ),
            ],
            invoice.to_csv(),
        )
            .into_response()),
        Some(_) => Err(GatewayError::invalid_request(
            "`format` is `json` or `csv`",
            Some("format"),
        )),
    }
}

#[derive(Deserialize)]
struct CallParams {
    key_id: Option<String>,
    user_id: Option<String>,
    model: Option<String>,
    status: Option<u16>,
    from: Option<UnixTime>,
    limit: Option<usize>,
    page_token: Option<String>,
}

impl CallParams {
    fn filter(self) -> CallFilter {
        CallFilter {
            key_id: self.key_id,
            user_id: self.user_id,
            model: self.model,
            status: self.status,
            from: self.from,
            page_token: self.page_token,
            page_size: self.limit,
        }
    }
}

async fn list_calls(
    _: Admin,
    State(state): State<AppState>,
    AdminQuery(params): AdminQuery<CallParams>,
) -> Result<Response, GatewayError> {
    Ok(Json(state.gateway().list_calls(&params.filter())?).into_response())
}

async fn key_calls(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminQuery(params): AdminQuery<CallParams>,
) -> Result<Response, GatewayError> {
    let filter = CallFilter {
        key_id: Some(id),
        ..params.filter()
    };
    Ok(Json(state.gateway().list_calls(&filter)?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TestAlertBody {
    /// A channel's name; absent: every channel.
    channel: Option<String>,
}

async fn test_alert(
    _: Admin,
    State(state): State<AppState>,
    body: axum::body::Body,
) -> Result<Response, GatewayError> {
    let body = read_body(body, MAX_ADMIN_BODY_BYTES).await?;
    // The body is optional: none tests every channel.
    let body: TestAlertBody = if body.iter().all(u8::is_ascii_whitespace) {
        TestAlertBody::default()
    } else {
        parse_json(&body)?
    };
    let deliveries = state.gateway().test_alert(body.channel.as_deref()).await?;
    Ok(Json(json!({ "deliveries": deliveries })).into_response())
}

/// A consistent copy of the books (the portable export), sent as a file.
async fn backup(_: Admin, State(state): State<AppState>) -> Result<Response, GatewayError> {
    let snapshot = state.gateway().snapshot().await?;
    let name = crate::core::snapshot::file_name(snapshot.summary.created_at);
    let bytes = snapshot.summary.bytes;
    let sha256 = snapshot.summary.sha256.clone();
    let pieces = snapshot.into_chunks();
    let body = axum::body::Body::from_stream(futures_util::stream::unfold(
        pieces,
        |mut pieces| async move { pieces.recv().await.map(|piece| (piece, pieces)) },
    ));
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/x-ndjson".to_owned(),
            ),
            (axum::http::header::CONTENT_LENGTH, bytes.to_string()),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (
                axum::http::HeaderName::from_static("x-backup-sha256"),
                sha256,
            ),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
struct AuditParams {
    limit: Option<usize>,
    page_token: Option<String>,
}

/// The audit log, newest first.
async fn list_audit(
    _: Admin,
    State(state): State<AppState>,
    AdminQuery(params): AdminQuery<AuditParams>,
) -> Result<Response, GatewayError> {
    let page = state
        .gateway()
        .audit_log(params.page_token.as_deref(), params.limit)?;
    Ok(Json(page).into_response())
}
