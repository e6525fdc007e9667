//! The admin's pages: overview, users, keys, usage (with CSV), the call log and the audit
//! log. Each change goes through core's admin operations as this session's actor, so it
//! is in the audit log like a change made through the API.

use std::fmt::Write as _;

use crate::core::money::Money;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::html::{
    self, Nav, USAGE_HEADERS, bar_chart, csrf_field, esc, page, query_value, table, time,
    usage_cells,
};
use super::{AdminSession, ConsoleState, Form, PageError, form_body, html_response};
use crate::core::GatewayError;
use crate::core::admin::{
    CallFilter, CreatedKey, DEFAULT_ROTATION_GRACE_SECS, KeyFilter, KeyPatch, KeyView, NewKey,
    NewUser, UsageGrouping, UsageQuery, UsageReport, UsageSubject, UserPatch,
};
use crate::core::billing::NewPrice;
use crate::core::records::{CallRecord, UserRecord};
use crate::core::time::now_unix;

pub fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/console/overview", get(overview))
        .route("/console/overview.json", get(overview_json))
        .route("/console/users", get(users).post(create_user))
        .route("/console/users/{id}", get(user).post(update_user))
        .route("/console/keys", get(keys).post(create_key))
        .route("/console/keys/{id}", get(key).post(update_key))
        .route("/console/keys/{id}/revoke", post(revoke_key))
        .route("/console/keys/{id}/rotate", post(rotate_key))
        .route("/console/usage", get(usage))
        .route("/console/calls", get(calls))
        .route("/console/audit", get(audit))
        .route("/console/models", get(models).post(add_price))
        .route("/console/alerts", get(alerts).post(test_alert))
}

fn ok(title: &str, nav: &'static str, session: &AdminSession, body: &str) -> Response {
    html_response(
        StatusCode::OK,
        page(title, Nav::Admin(nav), Some(session.csrf()), body),
    )
}

// ---- overview ----

/// Calls per minute over the last half hour, from the call log (newest first), and the
/// state of the backends and the store, for the live overview.
fn overview_figures(state: &ConsoleState) -> Value {
    const MINUTES: i64 = 30;
    const PAGES: usize = 20;
    let now = now_unix();
    let first_minute = now - now.rem_euclid(60) - (MINUTES - 1) * 60;
    let mut minutes = vec![(0u64, 0u64, 0u64); usize::try_from(MINUTES).unwrap_or(30)];
    // Today's spend from the same newest-first reading: exact unless the day had more
    // calls than the pages read (then shown as "at least").
    let day_start = state.gateway().day_start(now);
    let mut spend_today = Money::ZERO;
    let mut spend_complete = false;
    let mut filter = CallFilter {
        from: Some(first_minute.min(day_start)),
        page_size: Some(1000),
        ..CallFilter::default()
    };
    for _ in 0..PAGES {
        let Ok(page) = state.gateway().list_calls(&filter) else {
            break;
        };
        for call in &page.calls {
            let at = call.at_micros / 1_000_000;
            if at >= day_start {
                spend_today = spend_today.saturating_add(call.cost);
            }
            if let Ok(i) = usize::try_from((at - first_minute) / 60)
                && let Some(m) = minutes.get_mut(i)
            {
                m.0 += 1;
                m.1 += call.usage.prompt_tokens + call.usage.completion_tokens;
                m.2 += u64::from(call.status >= 400 || call.status == 0);
            }
        }
        if page.next_page_token.is_empty() {
            spend_complete = true;
            break;
        }
        filter.page_token = Some(page.next_page_token);
    }
    let currency = state.gateway().currency().to_owned();
    let spend_today = match spend_complete {
        true => format!("{spend_today} {currency}"),
        false => format!("≥ {spend_today} {currency}"),
    };
    let last = minutes.last().copied().unwrap_or_default();
    let backends: Vec<Value> = state
        .call
        .upstream
        .status()
        .into_iter()
        .map(|b| json!({"name": b.name, "healthy": b.healthy, "in_flight": b.in_flight, "errors": b.errors}))
        .collect();
    let store = state.gateway().store_health();
    json!({
        "calls_this_minute": last.0,
        "tokens_this_minute": last.1,
        "errors_this_minute": last.2,
        "calls_30m": minutes.iter().map(|m| m.0).sum::<u64>(),
        "tokens_30m": minutes.iter().map(|m| m.1).sum::<u64>(),
        "errors_30m": minutes.iter().map(|m| m.2).sum::<u64>(),
        "spend_today": spend_today,
        "minutes": minutes.iter().enumerate().map(|(i, m)| json!({
            "start": first_minute + i64::try_from(i).unwrap_or(0) * 60,
            "calls": m.0, "tokens": m.1, "errors": m.2,
        })).collect::<Vec<_>>(),
        "backends": backends,
        "store": if store.is_available() { "ok" } else { "failing" },
        "store_backlog": state.gateway().store_figures().backlog,
    })
}

async fn overview_json(_: AdminSession, State(state): State<ConsoleState>) -> Json<Value> {
    Json(overview_figures(&state))
}

async fn overview(session: AdminSession, State(state): State<ConsoleState>) -> Response {
    let figures = overview_figures(&state);
    let figure = |name: &str, label: &str| {
        format!(
            "<div class=\"figure\"><span class=\"label\">{label}</span><span class=\"value\" data-figure=\"{name}\" id=\"fig-{name}\">{}</span></div>",
            // Text as it is (not as a JSON string), like the live updates write it.
            esc(&figures[name]
                .as_str()
                .map_or_else(|| figures[name].to_string(), str::to_owned))
        )
    };
    let mut body = String::from(
        "<section id=\"live\" data-src=\"/console/overview.json\" aria-live=\"polite\"><div class=\"figures\">",
    );
    for (name, label) in [
        ("calls_this_minute", "Calls this minute"),
        ("tokens_this_minute", "Tokens this minute"),
        ("errors_this_minute", "Errors this minute"),
        ("calls_30m", "Calls, last 30 min"),
        ("tokens_30m", "Tokens, last 30 min"),
        ("errors_30m", "Errors, last 30 min"),
        ("spend_today", "Spend today"),
        ("store", "Store"),
    ] {
        body.push_str(&figure(name, label));
    }
    body.push_str("</div><figure class=\"chart\"><svg id=\"live-chart\" role=\"img\" aria-label=\"Calls per minute, last 30 minutes\" viewBox=\"0 0 600 160\" preserveAspectRatio=\"none\"></svg><figcaption>Calls per minute, last 30 minutes (updates live)</figcaption></figure>");
    let rows = figures["backends"].as_array().cloned().unwrap_or_default();
    body.push_str(&table(
        "Model servers",
        &["Name", "Health", "In flight", "Errors"],
        rows.iter().map(|b| {
            vec![
                b["name"].as_str().unwrap_or_default().to_owned(),
                if b["healthy"] == true {
                    "healthy"
                } else {
                    "DOWN"
                }
                .to_owned(),
                b["in_flight"].to_string(),
                b["errors"].to_string(),
            ]
        }),
    ));
    body.push_str("</section>");
    ok("Overview", "overview", &session, &body)
}

// ---- users ----

#[derive(Deserialize, Default)]
struct ListParams {
    #[serde(default)]
    q: String,
    #[serde(default)]
    page: usize,
}

const USERS_PER_PAGE: usize = 100;

async fn users(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Query(params): Query<ListParams>,
) -> Response {
    let q = params.q.trim().to_lowercase();
    let all: Vec<UserRecord> = state
        .gateway()
        .list_users()
        .into_iter()
        .filter(|u| {
            q.is_empty()
                || u.id.to_lowercase().contains(&q)
                || u.name.to_lowercase().contains(&q)
                || u.email
                    .as_deref()
                    .is_some_and(|e| e.to_lowercase().contains(&q))
        })
        .collect();
    let mut body = format!(
        "<form method=\"get\" class=\"search\" role=\"search\"><label for=\"q\">Search users</label>\
         <input id=\"q\" name=\"q\" value=\"{}\"><button type=\"submit\">Search</button></form>",
        esc(&params.q)
    );
    body.push_str("<div class=\"scroll\"><table><caption>Users</caption><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Email</th><th scope=\"col\">Id</th><th scope=\"col\">State</th></tr></thead><tbody>");
    let shown = all
        .iter()
        .skip(params.page * USERS_PER_PAGE)
        .take(USERS_PER_PAGE);
    for u in shown {
        let _ = write!(
            body,
            "<tr><td><a href=\"/console/users/{}\">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(&query_value(&u.id)),
            esc(&u.name),
            esc(u.email.as_deref().unwrap_or("")),
            esc(&u.id),
            if u.active { "active" } else { "deactivated" }
        );
    }
    body.push_str("</tbody></table></div>");
    if all.len() > (params.page + 1) * USERS_PER_PAGE {
        let _ = write!(
            body,
            "<p><a href=\"/console/users?q={}&amp;page={}\" rel=\"next\">Next page</a></p>",
            esc(&query_value(&params.q)),
            params.page + 1
        );
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/users\" class=\"card\"><h2>New user</h2>{}\
         <label for=\"new-user-name\">Name</label><input id=\"new-user-name\" name=\"name\" required maxlength=\"200\">\
         <label for=\"new-user-email\">Email (optional)</label><input id=\"new-user-email\" name=\"email\" type=\"email\">\
         <button type=\"submit\" id=\"create-user\">Create user</button></form>",
        csrf_field(session.csrf())
    );
    ok("Users", "users", &session, &body)
}

async fn create_user(
    session: AdminSession,
    State(state): State<ConsoleState>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let form = session.form(&form_body(body).await?)?;
    let user = state
        .gateway()
        .acting(session.actor())
        .create_user(NewUser {
            name: form.get("name").to_owned(),
            email: Some(form.get("email").to_owned()).filter(|e| !e.is_empty()),
            ..NewUser::default()
        })?;
    Ok(
        axum::response::Redirect::to(&format!("/console/users/{}", query_value(&user.id)))
            .into_response(),
    )
}

async fn user(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let user = state.gateway().get_user(&id)?;
    let keys = state.gateway().list_keys_page(
        &KeyFilter {
            user_id: Some(id.clone()),
        },
        None,
        Some(1000),
    )?;
    let mut body = format!(
        "<dl class=\"facts\"><dt>Id</dt><dd><code>{}</code></dd><dt>Name</dt><dd id=\"user-name\">{}</dd>\
         <dt>Email</dt><dd>{}</dd><dt>State</dt><dd>{}</dd><dt>Created</dt><dd>{}</dd></dl>\
         <p><a href=\"/console/usage?subject={}\">Usage of all of this user's keys</a> · \
         <a href=\"/console/calls?user={}\">Calls</a></p>",
        esc(&user.id),
        esc(&user.name),
        esc(user.email.as_deref().unwrap_or("—")),
        if user.active { "active" } else { "deactivated" },
        time(user.created_at),
        esc(&query_value(&user.id)),
        esc(&query_value(&user.id)),
    );
    body.push_str(&key_table("Keys of this user", &keys.keys));
    let _ = write!(
        body,
        "<div class=\"cards\">{}<form method=\"post\" action=\"/console/users/{}\" class=\"card\"><h2>Edit user</h2>{}\
         <label for=\"user-name-input\">Name</label><input id=\"user-name-input\" name=\"name\" value=\"{}\" required maxlength=\"200\">\
         <label for=\"user-email-input\">Email</label><input id=\"user-email-input\" name=\"email\" type=\"email\" value=\"{}\">\
         <label><input type=\"checkbox\" name=\"active\" value=\"on\"{}> Active (unticked: all of the user's keys stop working)</label>\
         <button type=\"submit\">Save user</button></form></div>",
        new_key_form(session.csrf(), &user.id),
        esc(&query_value(&user.id)),
        csrf_field(session.csrf()),
        esc(&user.name),
        esc(user.email.as_deref().unwrap_or("")),
        if user.active { " checked" } else { "" },
    );
    Ok(ok(&format!("User {}", user.name), "users", &session, &body))
}

async fn update_user(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let form = session.form(&form_body(body).await?)?;
    state.gateway().acting(session.actor()).update_user(
        &id,
        UserPatch {
            name: Some(form.get("name").to_owned()),
            email: Some(Some(form.get("email").to_owned()).filter(|e| !e.is_empty())),
            active: Some(form.get("active") == "on"),
            ..UserPatch::default()
        },
    )?;
    Ok(
        axum::response::Redirect::to(&format!("/console/users/{}", query_value(&id)))
            .into_response(),
    )
}

// ---- keys ----

/// The limits a key form edits: the field names core reads, and their labels.
const KEY_LIMITS: [(&str, &str); 7] = [
    ("rpm_limit", "Requests per minute"),
    ("tpm_limit", "Tokens per minute"),
    ("max_concurrent", "Calls at once"),
    ("request_quota", "Request quota (total)"),
    ("token_quota", "Token quota (total)"),
    ("image_quota", "Image quota (total)"),
    ("max_images_per_request", "Images per request"),
];

fn key_limit(view: &KeyView, field: &str) -> Option<u64> {
    serde_json::to_value(view)
        .ok()
        .and_then(|v| v.get(field).and_then(Value::as_u64))
}

fn limit_inputs(values: Option<&KeyView>) -> String {
    let mut out =
        String::from("<fieldset><legend>Limits (empty: none)</legend><div class=\"grid\">");
    for (field, label) in KEY_LIMITS {
        let value = values
            .and_then(|v| key_limit(v, field))
            .map(|v| v.to_string())
            .unwrap_or_default();
        let _ = write!(
            out,
            "<label for=\"{field}\">{label}</label><input id=\"{field}\" name=\"{field}\" inputmode=\"numeric\" pattern=\"[0-9]*\" value=\"{value}\">"
        );
    }
    out.push_str("</div></fieldset>");
    out
}

fn new_key_form(csrf: &str, user_id: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/console/keys\" class=\"card\"><h2>New key</h2>{}\
         <label for=\"new-key-user\">User id</label><input id=\"new-key-user\" name=\"user_id\" value=\"{}\" required>\
         <label for=\"new-key-name\">Key name</label><input id=\"new-key-name\" name=\"name\" required maxlength=\"200\">\
         <label for=\"new-key-expires\">Expires in (e.g. 30d; empty: never)</label><input id=\"new-key-expires\" name=\"expires_in\">\
         <label for=\"new-key-models\">Models (comma-separated; empty: all)</label><input id=\"new-key-models\" name=\"models\">\
         {}<button type=\"submit\" id=\"create-key\">Create key</button></form>",
        csrf_field(csrf),
        esc(user_id),
        limit_inputs(None)
    )
}

fn key_state(k: &KeyView) -> &'static str {
    if k.revoked_at.is_some() {
        "revoked"
    } else if !k.active {
        "inactive"
    } else if k.expires_at.is_some_and(|e| e <= now_unix()) {
        "expired"
    } else {
        "active"
    }
}

fn key_table(caption: &str, keys: &[KeyView]) -> String {
    let mut out = format!(
        "<div class=\"scroll\"><table><caption>{}</caption><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Id</th><th scope=\"col\">Prefix</th><th scope=\"col\">User</th><th scope=\"col\">State</th><th scope=\"col\">Requests</th><th scope=\"col\">Tokens</th></tr></thead><tbody>",
        esc(caption)
    );
    for k in keys {
        let _ = write!(
            out,
            "<tr><td><a href=\"/console/keys/{}\">{}</a></td><td><code>{}</code></td><td><code>{}</code></td><td><a href=\"/console/users/{}\"><code>{}</code></a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&query_value(&k.id)),
            esc(&k.name),
            esc(&k.id),
            esc(&k.prefix),
            esc(&query_value(&k.user_id)),
            esc(&k.user_id),
            key_state(k),
            k.used.requests,
            k.used.prompt_tokens + k.used.completion_tokens,
        );
    }
    if keys.is_empty() {
        out.push_str("<tr><td colspan=\"7\">No keys.</td></tr>");
    }
    out.push_str("</tbody></table></div>");
    out
}

#[derive(Deserialize, Default)]
struct KeyListParams {
    #[serde(default)]
    q: String,
    #[serde(default)]
    page_token: String,
}

/// Pages of keys scanned at most by one name search (of 1000 keys each).
const SEARCH_PAGES: usize = 20;

async fn keys(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Query(params): Query<KeyListParams>,
) -> Result<Response, PageError> {
    let q = params.q.trim();
    let gateway = state.gateway();
    let mut note = String::new();
    let (keys, next) = if q.starts_with("key_") {
        (
            gateway.get_key(q).map(|k| vec![k]).unwrap_or_default(),
            String::new(),
        )
    } else if q.starts_with("usr_") {
        let page = gateway.list_keys_page(
            &KeyFilter {
                user_id: Some(q.to_owned()),
            },
            Some(params.page_token.as_str()),
            Some(100),
        )?;
        (page.keys, page.next_page_token)
    } else if !q.is_empty() {
        // A name search reads the keys in order, a bounded number of them per page.
        let needle = q.to_lowercase();
        let mut found = Vec::new();
        let mut token = params.page_token.clone();
        for _ in 0..SEARCH_PAGES {
            let page =
                gateway.list_keys_page(&KeyFilter::default(), Some(token.as_str()), Some(1000))?;
            found.extend(
                page.keys
                    .into_iter()
                    .filter(|k| k.name.to_lowercase().contains(&needle)),
            );
            token = page.next_page_token;
            if token.is_empty() || found.len() >= 100 {
                break;
            }
        }
        if !token.is_empty() {
            note =
                "<p class=\"note\">More keys remain to be searched: follow “Next page”.</p>".into();
        }
        (found, token)
    } else {
        let page = gateway.list_keys_page(
            &KeyFilter::default(),
            Some(params.page_token.as_str()),
            Some(100),
        )?;
        (page.keys, page.next_page_token)
    };
    let mut body = format!(
        "<form method=\"get\" class=\"search\" role=\"search\"><label for=\"q\">Search keys (name, key id or user id)</label>\
         <input id=\"q\" name=\"q\" value=\"{}\"><button type=\"submit\">Search</button></form>",
        esc(&params.q)
    );
    body.push_str(&key_table("Keys", &keys));
    body.push_str(&note);
    if !next.is_empty() {
        let _ = write!(
            body,
            "<p><a href=\"/console/keys?q={}&amp;page_token={}\" rel=\"next\">Next page</a></p>",
            esc(&query_value(&params.q)),
            esc(&query_value(&next))
        );
    }
    body.push_str(&new_key_form(session.csrf(), ""));
    Ok(ok("Keys", "keys", &session, &body))
}

/// Limits from a key form as core's JSON input: an empty field is absent on creation and
/// removes the limit on an edit (`null`).
fn limits_of(form: &Form, edit: bool) -> Result<Map<String, Value>, GatewayError> {
    let mut out = Map::new();
    for (field, label) in KEY_LIMITS {
        let text = form.get(field);
        if text.is_empty() {
            if edit {
                out.insert(field.to_owned(), Value::Null);
            }
            continue;
        }
        let n: u64 = text.parse().map_err(|_| {
            GatewayError::invalid_request(
                format!("{label}: `{text}` is not a whole number"),
                Some(field),
            )
        })?;
        out.insert(field.to_owned(), json!(n));
    }
    Ok(out)
}

fn models_of(form: &Form) -> Option<Vec<String>> {
    let models: Vec<String> = form
        .get("models")
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    (!models.is_empty()).then_some(models)
}

fn invalid_form(e: serde_json::Error) -> PageError {
    PageError::Gateway(GatewayError::invalid_request(e.to_string(), None))
}

/// The page that shows a new secret, once: it is not kept anywhere to be shown again.
fn secret_page(session: &AdminSession, title: &str, created: &CreatedKey) -> Response {
    let body = format!(
        "<div class=\"secret card\" role=\"status\"><p><strong>Copy this secret now.</strong> It is shown only once; \
         the gateway keeps only its hash.</p><p><code id=\"new-secret\">{}</code></p>\
         <button type=\"button\" data-copy=\"new-secret\" id=\"copy-secret\">Copy secret</button> <span data-copied-for=\"new-secret\" aria-live=\"polite\"></span></div>\
         <p><a href=\"/console/keys/{}\" id=\"to-key\">Go to the key {}</a></p>",
        esc(&created.secret),
        esc(&query_value(&created.key.id)),
        esc(&created.key.name),
    );
    let mut response = ok(title, "keys", session, &body);
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

async fn create_key(
    session: AdminSession,
    State(state): State<ConsoleState>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let form = session.form(&form_body(body).await?)?;
    let mut input = limits_of(&form, false)?;
    input.insert("user_id".into(), json!(form.get("user_id")));
    input.insert("name".into(), json!(form.get("name")));
    if !form.get("expires_in").is_empty() {
        input.insert("expires_in".into(), json!(form.get("expires_in")));
    }
    if let Some(models) = models_of(&form) {
        input.insert("models".into(), json!(models));
    }
    let new: NewKey = serde_json::from_value(Value::Object(input)).map_err(invalid_form)?;
    let created = state.gateway().acting(session.actor()).create_key(new)?;
    Ok(secret_page(&session, "Key created", &created))
}

async fn key(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let gateway = state.gateway();
    let k = gateway.get_key(&id)?;
    let report = gateway.usage_report(&UsageQuery {
        subject: UsageSubject::Key(id.clone()),
        from: None,
        to: None,
        group_by: UsageGrouping::Hour,
        by_model: false,
        by_key: false,
    })?;
    let mut body = format!(
        "<dl class=\"facts\"><dt>Id</dt><dd><code>{}</code></dd><dt>Name</dt><dd id=\"key-name\">{}</dd>\
         <dt>Prefix</dt><dd><code>{}</code></dd><dt>User</dt><dd><a href=\"/console/users/{}\"><code>{}</code></a></dd>\
         <dt>State</dt><dd id=\"key-state\">{}</dd><dt>Expires</dt><dd>{}</dd><dt>Models</dt><dd>{}</dd>\
         <dt>Requests used</dt><dd id=\"key-requests\">{}</dd><dt>Tokens used</dt><dd id=\"key-tokens\">{}</dd>\
         <dt>Created</dt><dd>{}</dd></dl>\
         <p><a href=\"/console/usage?subject={}\">Usage</a> · <a href=\"/console/calls?key={}\">Calls</a></p>",
        esc(&k.id),
        esc(&k.name),
        esc(&k.prefix),
        esc(&query_value(&k.user_id)),
        esc(&k.user_id),
        key_state(&k),
        k.expires_at.map_or_else(|| "never".to_owned(), time),
        esc(&k
            .models
            .as_ref()
            .map_or_else(|| "all".to_owned(), |m| m.join(", "))),
        k.used.requests,
        k.used.prompt_tokens + k.used.completion_tokens,
        time(k.created_at),
        esc(&query_value(&k.id)),
        esc(&query_value(&k.id)),
    );
    body.push_str(&usage_section(
        "Requests per hour, last 30 days",
        &report,
        period_secs(UsageGrouping::Hour),
    ));
    if k.revoked_at.is_none() {
        let _ = write!(
            body,
            "<div class=\"cards\"><form method=\"post\" action=\"/console/keys/{id}\" class=\"card\"><h2>Edit key</h2>{csrf}\
             <label for=\"key-name-input\">Name</label><input id=\"key-name-input\" name=\"name\" value=\"{name}\" required maxlength=\"200\">\
             <label for=\"key-models-input\">Models (comma-separated; empty: all)</label><input id=\"key-models-input\" name=\"models\" value=\"{models}\">\
             {limits}<button type=\"submit\" id=\"save-key\">Save key</button></form>\
             <div class=\"card\"><h2>Rotate or revoke</h2>\
             <form method=\"post\" action=\"/console/keys/{id}/rotate\">{csrf}\
             <label for=\"grace\">The old secret keeps working for (seconds)</label><input id=\"grace\" name=\"grace_seconds\" inputmode=\"numeric\" value=\"{grace}\">\
             <button type=\"submit\" id=\"rotate-key\">Rotate secret</button></form>\
             <form method=\"post\" action=\"/console/keys/{id}/revoke\">{csrf}\
             <p>Revoking stops the key for good; its usage history stays.</p>\
             <button type=\"submit\" class=\"danger\" id=\"revoke-key\">Revoke key</button></form></div></div>",
            id = esc(&query_value(&k.id)),
            csrf = csrf_field(session.csrf()),
            name = esc(&k.name),
            models = esc(&k.models.as_ref().map(|m| m.join(", ")).unwrap_or_default()),
            limits = limit_inputs(Some(&k)),
            grace = DEFAULT_ROTATION_GRACE_SECS,
        );
    }
    Ok(ok(&format!("Key {}", k.name), "keys", &session, &body))
}

async fn update_key(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let form = session.form(&form_body(body).await?)?;
    let mut input = limits_of(&form, true)?;
    input.insert("name".into(), json!(form.get("name")));
    input.insert("models".into(), json!(models_of(&form)));
    let patch: KeyPatch = serde_json::from_value(Value::Object(input)).map_err(invalid_form)?;
    state
        .gateway()
        .acting(session.actor())
        .update_key(&id, patch)?;
    Ok(
        axum::response::Redirect::to(&format!("/console/keys/{}", query_value(&id)))
            .into_response(),
    )
}

async fn revoke_key(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    session.form(&form_body(body).await?)?;
    state.gateway().acting(session.actor()).revoke_key(&id)?;
    Ok(
        axum::response::Redirect::to(&format!("/console/keys/{}", query_value(&id)))
            .into_response(),
    )
}

async fn rotate_key(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let form = session.form(&form_body(body).await?)?;
    let grace = match form.get("grace_seconds") {
        "" => DEFAULT_ROTATION_GRACE_SECS,
        text => text.parse().map_err(|_| {
            GatewayError::invalid_request(
                "the grace period is a whole number of seconds",
                Some("grace_seconds"),
            )
        })?,
    };
    let created = state
        .gateway()
        .acting(session.actor())
        .rotate_key(&id, grace)?;
    Ok(secret_page(&session, "Key rotated", &created))
}

// ---- usage ----

/// A usage report as a chart of requests per period (every period from `from` to `to`,
/// `period` seconds each, empty ones too, so the chart reads as a time axis) and the table
/// of its rows.
pub(super) fn usage_section(caption: &str, report: &UsageReport, period: i64) -> String {
    let first = report.from - report.from.rem_euclid(period);
    let periods = usize::try_from((report.to - first) / period + 1)
        .unwrap_or(1)
        .clamp(1, 2000);
    let mut requests = vec![0u64; periods];
    for row in &report.buckets {
        if let Some(n) = usize::try_from((row.start - first) / period)
            .ok()
            .and_then(|i| requests.get_mut(i))
        {
            *n += row.requests;
        }
    }
    let points: Vec<(String, u64)> = requests
        .iter()
        .enumerate()
        .map(|(i, n)| (time(first + i64::try_from(i).unwrap_or(0) * period), *n))
        .collect();
    let mut out = format!(
        "<p class=\"totals\">Requests <strong data-total=\"requests\">{}</strong> · prompt tokens <strong>{}</strong> · completion tokens <strong>{}</strong> · images <strong>{}</strong></p>",
        report.requests, report.prompt_tokens, report.completion_tokens, report.images
    );
    out.push_str(&bar_chart(
        &format!("{caption}: {} to {}", time(first), time(report.to)),
        &points,
    ));
    out.push_str(&table(
        caption,
        &USAGE_HEADERS,
        report.buckets.iter().map(|r| usage_cells(r).to_vec()),
    ));
    out
}

/// Seconds in a period of `grouping`.
pub(super) fn period_secs(grouping: UsageGrouping) -> i64 {
    match grouping {
        UsageGrouping::Hour => 3600,
        UsageGrouping::Day => 86_400,
        // A chart's step; months are drawn as 30 days.
        UsageGrouping::Month => 30 * 86_400,
    }
}

#[derive(Deserialize, Default)]
struct UsageParams {
    #[serde(default)]
    subject: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    by_model: String,
    #[serde(default)]
    days: Option<i64>,
    #[serde(default)]
    format: String,
}

async fn usage(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Query(params): Query<UsageParams>,
) -> Result<Response, PageError> {
    let subject = params.subject.trim();
    let group_by = if params.group == "day" {
        UsageGrouping::Day
    } else {
        UsageGrouping::Hour
    };
    let by_model = params.by_model == "on";
    let days = params.days.unwrap_or(30).clamp(1, 366);
    let mut body = format!(
        "<form method=\"get\" class=\"search\"><label for=\"subject\">Key or user id</label>\
         <input id=\"subject\" name=\"subject\" value=\"{}\" required>\
         <label for=\"group\">Per</label><select id=\"group\" name=\"group\"><option value=\"hour\"{}>hour</option><option value=\"day\"{}>day</option></select>\
         <label for=\"days\">Days</label><input id=\"days\" name=\"days\" inputmode=\"numeric\" value=\"{days}\">\
         <label><input type=\"checkbox\" name=\"by_model\" value=\"on\"{}> By model</label>\
         <button type=\"submit\">Show</button></form>",
        esc(subject),
        if group_by == UsageGrouping::Hour {
            " selected"
        } else {
            ""
        },
        if group_by == UsageGrouping::Day {
            " selected"
        } else {
            ""
        },
        if by_model { " checked" } else { "" },
    );
    if subject.is_empty() {
        body.push_str("<p>Give a key id (<code>key_…</code>) or a user id (<code>usr_…</code>); the key and user pages link here.</p>");
        return Ok(ok("Usage", "usage", &session, &body));
    }
    let subject_of = if subject.starts_with("usr_") {
        UsageSubject::User(subject.to_owned())
    } else {
        UsageSubject::Key(subject.to_owned())
    };
    let to = now_unix() + 1;
    let report = state.gateway().usage_report(&UsageQuery {
        subject: subject_of,
        from: Some(to - days * 86_400),
        to: Some(to),
        group_by,
        by_model,
        by_key: false,
    })?;
    if params.format == "csv" {
        let mut csv = USAGE_HEADERS.join(",");
        csv.push('\n');
        for row in &report.buckets {
            let cells: Vec<String> = usage_cells(row)
                .iter()
                .map(|c| html::csv_field(c))
                .collect();
            csv.push_str(&cells.join(","));
            csv.push('\n');
        }
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"usage.csv\"".to_owned(),
                ),
            ],
            csv,
        )
            .into_response());
    }
    let _ = write!(
        body,
        "<p><a href=\"/console/usage?subject={}&amp;group={}&amp;days={days}&amp;by_model={}&amp;format=csv\" download>Download CSV</a></p>",
        esc(&query_value(subject)),
        if group_by == UsageGrouping::Day {
            "day"
        } else {
            "hour"
        },
        if by_model { "on" } else { "" },
    );
    body.push_str(&usage_section(
        "Requests per period",
        &report,
        period_secs(group_by),
    ));
    Ok(ok("Usage", "usage", &session, &body))
}

// ---- the call log ----

#[derive(Deserialize, Default)]
struct CallParams {
    #[serde(default)]
    key: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    status: String,
    /// `YYYY-MM-DDTHH:MM` (UTC), as a `datetime-local` input sends it.
    #[serde(default)]
    from: String,
    #[serde(default)]
    page_token: String,
}

fn parse_from(text: &str) -> Result<Option<i64>, GatewayError> {
    if text.is_empty() {
        return Ok(None);
    }
    let full = if text.len() == 16 {
        format!("{text}:00")
    } else {
        text.to_owned()
    };
    humantime::parse_rfc3339_weak(&full)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .map(Some)
        .ok_or_else(|| {
            GatewayError::invalid_request(
                "`from` is a date and time such as 2026-12-05T07:00 (UTC)",
                Some("from"),
            )
        })
}

pub(super) fn call_rows(calls: &[CallRecord]) -> impl Iterator<Item = Vec<String>> + '_ {
    calls.iter().map(|c| {
        vec![
            time(c.at_micros / 1_000_000),
            c.key_id.clone(),
            c.user_id.clone(),
            c.model.clone(),
            c.status.to_string(),
            serde_json::to_value(c.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            c.usage.prompt_tokens.to_string(),
            c.usage.completion_tokens.to_string(),
            c.latency_ms.to_string(),
        ]
    })
}

pub(super) const CALL_HEADERS: [&str; 9] = [
    "Time",
    "Key",
    "User",
    "Model",
    "Status",
    "Outcome",
    "Prompt",
    "Completion",
    "ms",
];

async fn calls(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Query(params): Query<CallParams>,
) -> Result<Response, PageError> {
    let status = match params.status.trim() {
        "" => None,
        s => Some(s.parse::<u16>().map_err(|_| {
            GatewayError::invalid_request("`status` is an HTTP status such as 200", Some("status"))
        })?),
    };
    let filter = CallFilter {
        key_id: Some(params.key.trim().to_owned()).filter(|s| !s.is_empty()),
        user_id: Some(params.user.trim().to_owned()).filter(|s| !s.is_empty()),
        model: Some(params.model.trim().to_owned()).filter(|s| !s.is_empty()),
        status,
        from: parse_from(params.from.trim())?,
        page_token: Some(params.page_token.clone()).filter(|s| !s.is_empty()),
        page_size: Some(50),
    };
    let page = state.gateway().list_calls(&filter)?;
    let mut body = format!(
        "<form method=\"get\" class=\"search filters\"><label for=\"f-key\">Key id</label><input id=\"f-key\" name=\"key\" value=\"{}\">\
         <label for=\"f-user\">User id</label><input id=\"f-user\" name=\"user\" value=\"{}\">\
         <label for=\"f-model\">Model</label><input id=\"f-model\" name=\"model\" value=\"{}\">\
         <label for=\"f-status\">Status</label><input id=\"f-status\" name=\"status\" inputmode=\"numeric\" value=\"{}\">\
         <label for=\"f-from\">From (UTC)</label><input id=\"f-from\" name=\"from\" type=\"datetime-local\" value=\"{}\">\
         <button type=\"submit\">Filter</button> <a href=\"/console/calls\">Clear</a></form>",
        esc(&params.key),
        esc(&params.user),
        esc(&params.model),
        esc(&params.status),
        esc(&params.from),
    );
    body.push_str(&table(
        "Calls, newest first",
        &CALL_HEADERS,
        call_rows(&page.calls),
    ));
    if !page.next_page_token.is_empty() {
        let _ = write!(
            body,
            "<p><a href=\"/console/calls?key={}&amp;user={}&amp;model={}&amp;status={}&amp;from={}&amp;page_token={}\" rel=\"next\" id=\"next-page\">Older calls</a></p>",
            esc(&query_value(&params.key)),
            esc(&query_value(&params.user)),
            esc(&query_value(&params.model)),
            esc(&query_value(&params.status)),
            esc(&query_value(&params.from)),
            esc(&query_value(&page.next_page_token)),
        );
    }
    Ok(ok("Call log", "calls", &session, &body))
}

// ---- the audit log ----

#[derive(Deserialize, Default)]
struct AuditParams {
    #[serde(default)]
    page_token: String,
}

// ---- models and prices ----

/// The catalogue's models and versions, every price (oldest first), and a form that adds a
/// price from now on.
async fn models(session: AdminSession, State(state): State<ConsoleState>) -> Response {
    let gateway = state.gateway();
    let mut body = table(
        "Models",
        &["Model", "Aliases", "Versions", "Default", "Rollout"],
        gateway.list_models().iter().map(|m| {
            vec![
                m.name.clone(),
                m.aliases.join(", "),
                m.versions
                    .iter()
                    .map(|v| match v.sunset_at {
                        Some(at) => format!("{} (sunset {})", v.name, time(at)),
                        None => v.name.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                m.default_version.clone(),
                m.rollout
                    .as_ref()
                    .map(|r| format!("{}% to {}", r.weight, r.version))
                    .unwrap_or_default(),
            ]
        }),
    );
    let currency = gateway.currency();
    body.push_str(&table(
        &format!("Prices ({currency})"),
        &[
            "Model or version",
            "From",
            "Prompt / 1M",
            "Completion / 1M",
            "Per second",
            "Minimum",
            "Images",
        ],
        gateway.list_prices(None).iter().map(|p| {
            vec![
                p.model.clone(),
                time(p.effective_from),
                p.prompt_per_million.to_string(),
                p.completion_per_million.to_string(),
                p.per_second.to_string(),
                p.per_call_minimum.to_string(),
                p.images
                    .iter()
                    .map(|(tier, price)| format!("{tier} {price}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        }),
    ));
    let _ = write!(
        body,
        "<h2>Add a price</h2><p>It applies to calls from now on; past calls keep their cost.</p>\
         <form method=\"post\" class=\"edit\">{}\
         <label>Model or version <input name=\"model\" required></label>\
         <label>Prompt per 1M tokens <input name=\"prompt_per_million\" inputmode=\"decimal\" value=\"0\"></label>\
         <label>Completion per 1M tokens <input name=\"completion_per_million\" inputmode=\"decimal\" value=\"0\"></label>\
         <label>Per second of model time <input name=\"per_second\" inputmode=\"decimal\" value=\"0\"></label>\
         <label>Minimum per call <input name=\"per_call_minimum\" inputmode=\"decimal\" value=\"0\"></label>\
         <button type=\"submit\">Add price</button></form>",
        csrf_field(session.csrf())
    );
    ok("Models & prices", "models", &session, &body)
}

async fn add_price(
    session: AdminSession,
    State(state): State<ConsoleState>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    let form = session.form(&form_body(body).await?)?;
    let amount = |field: &str| -> Result<Money, GatewayError> {
        match form.get(field) {
            "" => Ok(Money::ZERO),
            text => Money::parse(text).map_err(|e| GatewayError::invalid_request(e, Some(field))),
        }
    };
    state
        .gateway()
        .acting(session.actor())
        .add_price(NewPrice {
            model: form.get("model").to_owned(),
            prompt_per_million: amount("prompt_per_million")?,
            completion_per_million: amount("completion_per_million")?,
            per_second: amount("per_second")?,
            per_call_minimum: amount("per_call_minimum")?,
            ..NewPrice::default()
        })?;
    Ok(axum::response::Redirect::to("/console/models").into_response())
}

// ---- alerts ----

/// Delivery counts by channel and a button that sends a test message to every channel.
async fn alerts(session: AdminSession, State(state): State<ConsoleState>) -> Response {
    let figures = state.gateway().delivery_figures();
    let mut body = if figures.is_empty() {
        "<p>No alert channels are configured (<code>[[alerts.channels]]</code>).</p>".to_owned()
    } else {
        table(
            "Alert channels, since the gateway started",
            &["Channel", "Sent", "Failed", "Dropped"],
            figures.iter().map(|f| {
                vec![
                    f.channel.clone(),
                    f.sent.to_string(),
                    f.failed.to_string(),
                    f.dropped.to_string(),
                ]
            }),
        )
    };
    let _ = write!(
        body,
        "<form method=\"post\">{}<button type=\"submit\">Send a test message to every channel</button></form>",
        csrf_field(session.csrf())
    );
    ok("Alerts", "alerts", &session, &body)
}

async fn test_alert(
    session: AdminSession,
    State(state): State<ConsoleState>,
    body: axum::body::Body,
) -> Result<Response, PageError> {
    session.form(&form_body(body).await?)?;
    let deliveries = state.gateway().test_alert(None).await?;
    let mut body = table(
        "Test message",
        &["Channel", "Kind", "Delivered", "Error"],
        deliveries.iter().map(|d| {
            vec![
                d.channel.clone(),
                d.kind.clone(),
                if d.delivered { "yes" } else { "NO" }.to_owned(),
                d.error.clone().unwrap_or_default(),
            ]
        }),
    );
    body.push_str("<p><a href=\"/console/alerts\">Back to alerts</a></p>");
    Ok(ok("Alerts", "alerts", &session, &body))
}

async fn audit(
    session: AdminSession,
    State(state): State<ConsoleState>,
    Query(params): Query<AuditParams>,
) -> Result<Response, PageError> {
    let page = state
        .gateway()
        .audit_log(Some(params.page_token.as_str()), Some(50))?;
    let mut body = table(
        "Admin changes, newest first",
        &["Time", "Action", "Target", "Door", "Who", "Before", "After"],
        page.entries.iter().map(|e| {
            vec![
                time(e.at_micros / 1_000_000),
                e.action.clone(),
                e.target.clone(),
                e.actor.door.clone(),
                e.actor.who.clone(),
                e.before.as_ref().map(Value::to_string).unwrap_or_default(),
                e.after.as_ref().map(Value::to_string).unwrap_or_default(),
            ]
        }),
    );
    if !page.next_page_token.is_empty() {
        let _ = write!(
            body,
            "<p><a href=\"/console/audit?page_token={}\" rel=\"next\">Older changes</a></p>",
            esc(&query_value(&page.next_page_token))
        );
    }
    Ok(ok("Audit log", "audit", &session, &body))
}
