//! The key holder's page: their own key only (the session names it), its usage, what
//! remains of its quotas, its limits and expiry, its recent calls, and short-lived tokens
//! made from it.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::admin::{CALL_HEADERS, call_rows, period_secs, usage_section};
use super::html::{Nav, csrf_field, esc, limit, page, table, time};
use super::{
    ClientIp, ConsoleState, Form, HolderSession, PageError, form_body, html_response, session,
};
use crate::call::key_tokens::TokenRequest;
use crate::core::admin::{CallFilter, UsageGrouping, UsageQuery, UsageSubject};
use crate::core::{Caller, GatewayError};

pub fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/console/me", get(me))
        .route("/console/me/token", post(token))
}

fn remaining(value: Option<u64>) -> String {
    value.map_or_else(|| "unlimited".to_owned(), |v| v.to_string())
}

/// The caller the session's key makes now; a key that no longer works ends the session.
fn caller_of(
    holder: &HolderSession,
    state: &ConsoleState,
    client: Option<std::net::IpAddr>,
) -> Result<Caller, Box<Response>> {
    state
        .gateway()
        .caller_by_key_id(&holder.key_id, client)
        .map_err(|e| {
            state.sessions.end(&holder.id);
            let body = format!(
                "<p role=\"alert\">This key no longer opens the console: {}. You have been \
                 signed out.</p><p><a href=\"/console/sign-in\">Sign in</a></p>",
                esc(&e.to_string())
            );
            Box::new(
                (
                    [(
                        header::SET_COOKIE,
                        session::clear_cookie(state.settings.secure_cookie),
                    )],
                    html_response(
                        StatusCode::FORBIDDEN,
                        page("Key ended", Nav::None, None, &body),
                    ),
                )
                    .into_response(),
            )
        })
}

async fn me(
    holder: HolderSession,
    State(state): State<ConsoleState>,
    ClientIp(client): ClientIp,
) -> Result<Response, PageError> {
    let caller = match caller_of(&holder, &state, client) {
        Ok(caller) => caller,
        Err(ended) => return Ok(*ended),
    };
    let gateway = state.gateway();
    // The key's current period (and its user's budget period) brought up to now.
    let s = gateway
        .usage_summary(&caller)
        .unwrap_or_else(|_| caller.usage_summary());
    let tokens = s.used.prompt_tokens + s.used.completion_tokens;
    let mut body = format!(
        "<dl class=\"facts\"><dt>Key</dt><dd id=\"my-key-name\">{}</dd><dt>Prefix</dt><dd><code>{}</code></dd>\
         <dt>Id</dt><dd><code>{}</code></dd><dt>Owner</dt><dd>{}</dd><dt>Expires</dt><dd>{}</dd>\
         <dt>Models</dt><dd>{}</dd><dt>Created</dt><dd>{}</dd></dl>",
        esc(&s.key_name),
        esc(&s.key_prefix),
        esc(&s.key_id),
        esc(&s.user_name),
        s.expires_at.map_or_else(|| "never".to_owned(), time),
        esc(&s
            .models
            .as_ref()
            .map_or_else(|| "all".to_owned(), |m| m.join(", "))),
        time(s.created_at),
    );
    // What remains counts calls in flight and the user's limits too (as admission does).
    body.push_str(&table(
        "Quotas",
        &["", "Used", "Quota", "Remaining"],
        [
            vec![
                "Requests".to_owned(),
                s.used.requests.to_string(),
                limit(s.request_quota),
                remaining(s.remaining.requests),
            ],
            vec![
                "Tokens".to_owned(),
                tokens.to_string(),
                limit(s.token_quota),
                remaining(s.remaining.tokens),
            ],
            vec![
                "Images".to_owned(),
                s.used.images.to_string(),
                limit(s.image_quota),
                remaining(s.remaining.images),
            ],
            vec![
                format!("Spend ({})", s.currency),
                s.used.cost.to_string(),
                s.budget
                    .map_or_else(|| "none".to_owned(), |b| b.to_string()),
                s.remaining
                    .budget
                    .map_or_else(|| "unlimited".to_owned(), |b| b.to_string()),
            ],
        ]
        .into_iter(),
    ));
    if let (Some(period), Some(start), Some(end)) = (s.period, s.period_start, s.period_end) {
        body.push_str(&format!(
            "<p>Quotas and budget start again every {}: this one runs from {} to {}.</p>",
            period.as_str(),
            time(start),
            time(end)
        ));
    }
    body.push_str(&table(
        "Rate limits",
        &["Limit", "Value"],
        [
            vec![
                "Requests per minute".to_owned(),
                limit(s.limits.rpm.map(u64::from)),
            ],
            vec!["Tokens per minute".to_owned(), limit(s.limits.tpm)],
            vec![
                "Calls at once".to_owned(),
                limit(s.limits.concurrent.map(u64::from)),
            ],
        ]
        .into_iter(),
    ));
    body.push_str(&format!(
        "<form method=\"post\" action=\"/console/me/token\" class=\"card\"><h2>A short-lived token</h2>{}\
         <p>For a script or a colleague who should not hold the key itself: it works like the \
         key until it expires.</p>\
         <label for=\"ttl\">Lifetime (seconds, at most 86400)</label>\
         <input id=\"ttl\" name=\"ttl_seconds\" inputmode=\"numeric\" value=\"900\">\
         <button type=\"submit\" id=\"make-token\">Make a token</button></form>",
        csrf_field(&holder.session.csrf)
    ));
    let report = gateway.usage_report(&UsageQuery {
        subject: UsageSubject::Key(s.key_id.clone()),
        from: None,
        to: None,
        group_by: UsageGrouping::Hour,
        by_model: false,
        by_key: false,
    })?;
    body.push_str("<h2>Usage, last 30 days</h2>");
    body.push_str(&usage_section(
        "Requests per hour",
        &report,
        period_secs(UsageGrouping::Hour),
    ));
    let calls = gateway.list_calls(&CallFilter {
        key_id: Some(s.key_id.clone()),
        page_size: Some(20),
        ..CallFilter::default()
    })?;
    body.push_str("<h2>Recent calls</h2>");
    body.push_str(&table(
        "Your 20 latest calls",
        &CALL_HEADERS,
        call_rows(&calls.calls),
    ));
    Ok(html_response(
        StatusCode::OK,
        page("My key", Nav::Holder, Some(&holder.session.csrf), &body),
    ))
}

/// A short-lived token made from the session's key, shown once.
async fn token(
    holder: HolderSession,
    State(state): State<ConsoleState>,
    ClientIp(client): ClientIp,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let form = Form::checked(&form_body(body).await?, &holder.session)?;
    let caller = match caller_of(&holder, &state, client) {
        Ok(caller) => caller,
        Err(ended) => return Ok(*ended),
    };
    let mut request = json!({});
    if !form.get("ttl_seconds").is_empty() {
        let ttl: u64 = form.get("ttl_seconds").parse().map_err(|_| {
            GatewayError::invalid_request(
                "the lifetime is a whole number of seconds",
                Some("ttl_seconds"),
            )
        })?;
        request["ttl_seconds"] = json!(ttl);
    }
    let request: TokenRequest = serde_json::from_value(request)
        .map_err(|e| GatewayError::invalid_request(e.to_string(), None))?;
    let issued = state.call.key_tokens.issue(&caller, request)?;
    let body = format!(
        "<div class=\"secret card\" role=\"status\"><p><strong>Copy this token now.</strong> It is shown \
         only once and works until {}.</p><p><code id=\"new-token\">{}</code></p>\
         <button type=\"button\" data-copy=\"new-token\" id=\"copy-token\">Copy token</button> \
         <span data-copied-for=\"new-token\" aria-live=\"polite\"></span></div>\
         <p><a href=\"/console/me\">Back to my key</a></p>",
        time(issued.expires_at),
        esc(&issued.token),
    );
    Ok(html_response(
        StatusCode::OK,
        page("Token made", Nav::Holder, Some(&holder.session.csrf), &body),
    ))
}
