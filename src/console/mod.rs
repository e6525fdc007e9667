//! The web console at `/console`: server-rendered pages for the admin (users, keys, usage,
//! the call log, the audit log, a live overview) and for a key's holder (their own key),
//! over the same core admin functions as the other doors. One small script of our own
//! (copy button, live figures); no inline script; assets are in the binary.

mod admin;
mod holder;
pub mod html;
pub mod session;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::call::CallPath;
use crate::core::audit::Actor;
use crate::core::{Gateway, GatewayError};
use crate::edge::client_addr::client_addr;
use html::{Nav, esc, page};
use session::{Role, Session, Sessions};

/// How the console is served.
#[derive(Clone, Debug)]
pub struct ConsoleSettings {
    /// Marks the session cookie `Secure`: the port has TLS.
    pub secure_cookie: bool,
    pub session_ttl: Duration,
    pub sign_in_attempts_per_minute: u32,
}

#[derive(Clone)]
pub struct ConsoleState {
    call: CallPath,
    sessions: Arc<Sessions>,
    settings: Arc<ConsoleSettings>,
}

impl ConsoleState {
    fn gateway(&self) -> &Gateway {
        &self.call.gateway
    }
}

/// The console's routes under `/console`.
pub fn routes(call: CallPath, settings: ConsoleSettings) -> Router {
    let state = ConsoleState {
        call,
        sessions: Arc::new(Sessions::new(
            settings.session_ttl,
            settings.sign_in_attempts_per_minute,
        )),
        settings: Arc::new(settings),
    };
    Router::new()
        .route("/console", get(home))
        .route("/console/", get(home))
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/assets/console.js", get(script))
        .route("/console/assets/console.css", get(style))
        .merge(admin::routes())
        .merge(holder::routes())
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(state)
}

/// What every console answer carries: no inline script may run, nothing is framed,
/// cached or sent elsewhere.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

async fn style() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// An HTML page answer.
fn html_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// What a console page says when it cannot do what was asked.
#[derive(Debug)]
pub enum PageError {
    /// No session: sign in first.
    SignIn,
    /// A change without the session's CSRF token.
    Csrf,
    Gateway(GatewayError),
}

impl From<GatewayError> for PageError {
    fn from(e: GatewayError) -> Self {
        PageError::Gateway(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn => Redirect::to("/console/sign-in").into_response(),
            PageError::Csrf => html_response(
                StatusCode::FORBIDDEN,
                page(
                    "Refused",
                    Nav::None,
                    None,
                    "<p role=\"alert\">This change did not carry the form's security token \
                     (CSRF), so it was refused. Go back, reload the page and try again.</p>",
                ),
            ),
            PageError::Gateway(e) => {
                let status =
                    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
                let body = format!(
                    "<p role=\"alert\">{}</p><p><a href=\"/console\">Back to the console</a></p>",
                    esc(&e.to_string())
                );
                html_response(status, page("Not done", Nav::None, None, &body))
            }
        }
    }
}

/// The session a request's cookie names, if any, with the cookie's value.
fn session_of(headers: &HeaderMap, state: &ConsoleState) -> Option<(String, Session)> {
    let cookie = headers.get(header::COOKIE)?.to_str().ok()?;
    let id = session::cookie_value(cookie)?;
    state.sessions.get(id).map(|s| (id.to_owned(), s))
}

/// A signed-in admin.
pub struct AdminSession(Session);

impl AdminSession {
    fn actor(&self) -> Actor {
        let from = self
            .0
            .client
            .map(|a| format!(" from {a}"))
            .unwrap_or_default();
        Actor::new("console", format!("session {}{from}", self.0.public_id))
    }

    fn csrf(&self) -> &str {
        &self.0.csrf
    }

    /// The form of a change, once its CSRF token is checked.
    fn form(&self, body: &Bytes) -> Result<Form, PageError> {
        Form::checked(body, &self.0)
    }
}

impl FromRequestParts<ConsoleState> for AdminSession {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        match session_of(&parts.headers, state) {
            Some((_, session)) if session.role == Role::Admin => Ok(AdminSession(session)),
            _ => Err(PageError::SignIn),
        }
    }
}

/// A signed-in key holder.
pub struct HolderSession {
    id: String,
    session: Session,
    key_id: String,
}

impl FromRequestParts<ConsoleState> for HolderSession {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        match session_of(&parts.headers, state) {
            Some((id, session)) => match &session.role {
                Role::KeyHolder(key_id) => Ok(HolderSession {
                    key_id: key_id.clone(),
                    id,
                    session,
                }),
                Role::Admin => Err(PageError::SignIn),
            },
            None => Err(PageError::SignIn),
        }
    }
}

/// The client's address, as the edge found it.
pub struct ClientIp(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_addr(&parts.extensions)))
    }
}

/// A submitted form's fields (the last value of a repeated name wins).
pub struct Form(HashMap<String, String>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        Form(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn checked(body: &[u8], session: &Session) -> Result<Form, PageError> {
        let form = Form::parse(body);
        if session.csrf_matches(form.get("csrf")) {
            Ok(form)
        } else {
            Err(PageError::Csrf)
        }
    }

    /// A field, trimmed; empty when absent.
    fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or("", |v| v.trim())
    }
}

/// The largest form the console takes.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Reads a form body up to [`MAX_FORM_BYTES`].
async fn form_body(body: axum::body::Body) -> Result<Bytes, PageError> {
    axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            PageError::Gateway(GatewayError::BodyTooLarge {
                limit: MAX_FORM_BYTES,
            })
        })
}

async fn home(headers: HeaderMap, State(state): State<ConsoleState>) -> Response {
    match session_of(&headers, &state).map(|(_, s)| s.role) {
        Some(Role::Admin) => Redirect::to("/console/overview").into_response(),
        Some(Role::KeyHolder(_)) => Redirect::to("/console/me").into_response(),
        None => Redirect::to("/console/sign-in").into_response(),
    }
}

fn sign_in_form(message: Option<&str>) -> String {
    let alert = message
        .map(|m| format!("<p role=\"alert\" class=\"error\">{}</p>", esc(m)))
        .unwrap_or_default();
    let body = format!(
        "{alert}<div class=\"cards\">\
         <form method=\"post\" action=\"/console/sign-in\" class=\"card\">\
         <h2>Administrator</h2><input type=\"hidden\" name=\"role\" value=\"admin\">\
         <label for=\"admin-token\">Admin token</label>\
         <input id=\"admin-token\" name=\"secret\" type=\"password\" autocomplete=\"off\" required>\
         <button type=\"submit\" id=\"admin-sign-in\">Sign in as administrator</button></form>\
         <form method=\"post\" action=\"/console/sign-in\" class=\"card\">\
         <h2>Key holder</h2><input type=\"hidden\" name=\"role\" value=\"key\">\
         <label for=\"api-key\">Your API key</label>\
         <input id=\"api-key\" name=\"secret\" type=\"password\" autocomplete=\"off\" required>\
         <button type=\"submit\" id=\"key-sign-in\">Sign in with a key</button></form></div>\
         <p class=\"note\">The token or key is checked once and not kept: the browser gets an \
         opaque session cookie only.</p>"
    );
    page("Sign in", Nav::None, None, &body)
}

async fn sign_in_page() -> Response {
    html_response(StatusCode::OK, sign_in_form(None))
}

async fn sign_in(
    State(state): State<ConsoleState>,
    ClientIp(client): ClientIp,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let body = form_body(body).await?;
    let form = Form::parse(&body);
    if !state.sessions.may_try(client) {
        return Ok(html_response(
            StatusCode::TOO_MANY_REQUESTS,
            sign_in_form(Some(
                "Too many failed sign-ins from your address; wait a minute and try again.",
            )),
        ));
    }
    let secret = form.get("secret");
    let gateway = state.gateway();
    let role = match form.get("role") {
        "admin" => gateway
            .authenticate_admin(Some(secret), client)
            .map(|()| Role::Admin),
        _ => gateway
            .authenticate(Some(secret), client)
            .map(|caller| Role::KeyHolder(caller.usage_summary().key_id)),
    };
    let role = match role {
        Ok(role) => role,
        Err(e) => {
            state.sessions.failed(client);
            let message = match e {
                GatewayError::IpNotAllowed { .. } => e.to_string(),
                _ => "That token or key is not valid.".to_owned(),
            };
            return Ok(html_response(
                StatusCode::UNAUTHORIZED,
                sign_in_form(Some(&message)),
            ));
        }
    };
    let to = match role {
        Role::Admin => "/console/overview",
        Role::KeyHolder(_) => "/console/me",
    };
    let id = state.sessions.start(role, client);
    let cookie = session::set_cookie(
        &id,
        state.settings.session_ttl,
        state.settings.secure_cookie,
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(to)).into_response())
}

async fn sign_out(
    headers: HeaderMap,
    State(state): State<ConsoleState>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let body = form_body(body).await?;
    let (id, session) = session_of(&headers, &state).ok_or(PageError::SignIn)?;
    Form::checked(&body, &session)?;
    state.sessions.end(&id);
    Ok((
        [(
            header::SET_COOKIE,
            session::clear_cookie(state.settings.secure_cookie),
        )],
        Redirect::to("/console/sign-in"),
    )
        .into_response())
}
