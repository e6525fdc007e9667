//! The key holder's page: their own key only (the session names it), its usage, what
//! remains of its quotas, its limits and expiry, and its recent calls.

use std::fmt::Write as _;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::admin::{CALL_HEADERS, call_rows, usage_section};
use super::html::{Nav, esc, limit, page, table, time};
use super::{ConsoleState, HolderSession, PageError, html_response, session};
use crate::core::admin::{CallFilter, UsageGrouping, UsageQuery, UsageSubject};
use crate::core::time::now_unix;

pub fn routes() -> Router<ConsoleState> {
    Router::new().route("/console/me", get(me))
}

fn remaining(quota: Option<u64>, used: u64) -> String {
    quota.map_or_else(
        || "unlimited".to_owned(),
        |q| q.saturating_sub(used).to_string(),
    )
}

async fn me(
    holder: HolderSession,
    State(state): State<ConsoleState>,
) -> Result<Response, PageError> {
    let gateway = state.gateway();
    let key = gateway.get_key(&holder.key_id)?;
    let usable =
        key.active && key.revoked_at.is_none() && key.expires_at.is_none_or(|e| e > now_unix());
    if !usable {
        // A key that no longer works ends its holder's session.
        state.sessions.end(&holder.id);
        let body = "<p role=\"alert\">This key no longer works (revoked, deactivated or expired). \
                    You have been signed out.</p><p><a href=\"/console/sign-in\">Sign in</a></p>";
        return Ok((
            [(
                header::SET_COOKIE,
                session::clear_cookie(state.settings.secure_cookie),
            )],
            html_response(
                StatusCode::FORBIDDEN,
                page("Key ended", Nav::None, None, body),
            ),
        )
            .into_response());
    }
    let user = gateway.get_user(&key.user_id)?;
    let used = &key.used;
    let tokens = used.prompt_tokens + used.completion_tokens;
    let l = &key.limits;
    let mut body = format!(
        "<dl class=\"facts\"><dt>Key</dt><dd id=\"my-key-name\">{}</dd><dt>Prefix</dt><dd><code>{}</code></dd>\
         <dt>Id</dt><dd><code>{}</code></dd><dt>Owner</dt><dd>{}</dd><dt>Expires</dt><dd>{}</dd>\
         <dt>Models</dt><dd>{}</dd><dt>Created</dt><dd>{}</dd></dl>",
        esc(&key.name),
        esc(&key.prefix),
        esc(&key.id),
        esc(&user.name),
        key.expires_at.map_or_else(|| "never".to_owned(), time),
        esc(&key
            .models
            .as_ref()
            .map_or_else(|| "all".to_owned(), |m| m.join(", "))),
        time(key.created_at),
    );
    body.push_str(&table(
        "Quotas",
        &["", "Used", "Quota", "Remaining"],
        [
            vec![
                "Requests".to_owned(),
                used.requests.to_string(),
                limit(l.request_quota),
                remaining(l.request_quota, used.requests),
            ],
            vec![
                "Tokens".to_owned(),
                tokens.to_string(),
                limit(l.token_quota),
                remaining(l.token_quota, tokens),
            ],
            vec![
                "Images".to_owned(),
                used.images.to_string(),
                limit(l.image_quota),
                remaining(l.image_quota, used.images),
            ],
        ]
        .into_iter(),
    ));
    body.push_str(&table(
        "Rate limits",
        &["Limit", "Value"],
        [
            vec![
                "Requests per minute".to_owned(),
                limit(l.rpm_limit.map(u64::from)),
            ],
            vec!["Tokens per minute".to_owned(), limit(l.tpm_limit)],
            vec![
                "Calls at once".to_owned(),
                limit(l.max_concurrent.map(u64::from)),
            ],
        ]
        .into_iter(),
    ));
    let report = gateway.usage_report(&UsageQuery {
        subject: UsageSubject::Key(key.id.clone()),
        from: None,
        to: None,
        group_by: UsageGrouping::Hour,
        by_model: false,
    })?;
    body.push_str("<h2>Usage, last 30 days</h2>");
    body.push_str(&usage_section("Requests per hour", &report));
    let calls = gateway.list_calls(&CallFilter {
        key_id: Some(key.id.clone()),
        page_size: Some(20),
        ..CallFilter::default()
    })?;
    let _ = write!(body, "<h2>Recent calls</h2>");
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
