//! The web console: the admin's and the key holder's pages in a real (headless) browser,
//! and its defences over plain HTTP (CSRF, sign-in throttling, headers, escaping).

use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

use crate::common::browser::Browser;
use crate::common::{ADMIN_TOKEN, RestApi, TestGateway, chat_body};

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `pairs` as a form body.
fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Signs in over plain HTTP: the answer's status and the session cookie (`name=value`).
async fn sign_in(gw: &TestGateway, role: &str, secret: &str) -> (StatusCode, Option<String>) {
    let response = client()
        .post(gw.url("/console/sign-in"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("role", role), ("secret", secret)]))
        .send()
        .await
        .unwrap();
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    (response.status(), cookie)
}

async fn get_page(gw: &TestGateway, cookie: &str, path: &str) -> (StatusCode, String) {
    let response = client()
        .get(gw.url(path))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (response.status(), response.text().await.unwrap())
}

/// The CSRF token a page's forms carry.
fn csrf_of(page: &str) -> String {
    let start = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    page[start..].split('"').next().unwrap().to_owned()
}

const SCRIPT_USER: &str = "<script>window.pwned=1</script>Ada";
const SCRIPT_KEY: &str = "<img src=x onerror=\"window.pwned=2\">prod key";

#[tokio::test]
async fn console_in_a_browser_admin_and_key_holder() {
    let gw = TestGateway::start().await;
    // Someone else's key, which the key holder must never see.
    let other = gw.create_key(json!({"name": "someone else's key"})).await;
    let browser = Browser::start(1280, 900).await;

    // Not signed in: the console sends the browser to the sign-in page.
    browser.goto(&gw.url("/console")).await;
    browser.wait_for_url("/console/sign-in").await;
    browser.screenshot("sign-in").await;
    browser
        .find("#admin-token")
        .await
        .fill("wrong-token-123")
        .await;
    browser.find("#admin-sign-in").await.click().await;
    assert!(
        browser
            .find("[role=alert]")
            .await
            .text()
            .await
            .contains("not valid")
    );
    browser.find("#admin-token").await.fill(ADMIN_TOKEN).await;
    browser.find("#admin-sign-in").await.click().await;
    browser.wait_for_url("/console/overview").await;

    // The browser holds an opaque HttpOnly, SameSite=Strict cookie, and nothing else.
    let cookies = browser.cookies().await;
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert_eq!(cookies[0]["name"], "step3_console");
    assert_eq!(cookies[0]["httpOnly"], true);
    assert_eq!(cookies[0]["sameSite"], "Strict");
    assert!(!cookies[0]["value"].as_str().unwrap().contains(ADMIN_TOKEN));
    let storage = browser
        .execute("return [localStorage.length, sessionStorage.length, document.cookie];")
        .await;
    assert_eq!(storage, json!([0, 0, ""]));

    // A user whose name is a script: it stays text.
    browser.goto(&gw.url("/console/users")).await;
    browser.find("#new-user-name").await.fill(SCRIPT_USER).await;
    browser
        .find("#new-user-email")
        .await
        .fill("ada@example.com")
        .await;
    browser.find("#create-user").await.click().await;
    assert_eq!(browser.find("#user-name").await.text().await, SCRIPT_USER);
    assert_eq!(
        browser.execute("return window.pwned === undefined;").await,
        true
    );

    // A key for that user, whose name is markup too; its secret is shown once.
    browser.find("#new-key-name").await.fill(SCRIPT_KEY).await;
    browser.find("#rpm_limit").await.fill("100").await;
    browser.find("#create-key").await.click().await;
    let secret = browser.find("#new-secret").await.text().await;
    assert!(secret.len() > 20, "{secret}");
    browser.find("#copy-secret").await.click().await;
    browser
        .wait_for_text("[data-copied-for=new-secret]", |t| !t.is_empty())
        .await;
    browser.screenshot("secret-shown-once").await;
    browser.find("#to-key").await.click().await;
    assert_eq!(browser.find("#key-name").await.text().await, SCRIPT_KEY);
    assert_eq!(
        browser.execute("return window.pwned === undefined;").await,
        true
    );
    assert!(
        !browser.source().await.contains(&secret),
        "the secret is shown once only"
    );
    let key_url = browser.url().await;
    let key_id = key_url.rsplit('/').next().unwrap().to_owned();
    assert_eq!(browser.find("#key-requests").await.text().await, "0");

    // The overview counts the calls made with the key, live, without a reload.
    browser.goto(&gw.url("/console/overview")).await;
    let before: u64 = browser
        .find("#fig-calls_30m")
        .await
        .text()
        .await
        .parse()
        .unwrap();
    for _ in 0..3 {
        let response = gw.chat(&secret, &chat_body("hello")).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    browser
        .wait_for_text("#fig-calls_30m", |t| {
            t.parse::<u64>().is_ok_and(|n| n >= before + 3)
        })
        .await;
    assert!(
        browser
            .count("#live-chart rect.bar[height]:not([height='0'])")
            .await
            >= 1
    );
    browser.screenshot("overview").await;

    // The key's page shows the calls in its figures and its chart.
    browser.goto(&key_url).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while browser.find("#key-requests").await.text().await != "3" {
        assert!(
            std::time::Instant::now() < deadline,
            "the key page never showed 3 requests"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        browser.goto(&key_url).await;
    }
    assert!(browser.count(".chart rect.bar:not([height='0'])").await >= 1);
    browser.screenshot("key").await;

    // The call log, filtered by the key; and the usage page.
    browser
        .goto(&gw.url(&format!("/console/calls?key={key_id}")))
        .await;
    assert_eq!(browser.count("tbody tr").await, 3);
    browser.screenshot("calls").await;
    browser
        .goto(&gw.url(&format!("/console/usage?subject={key_id}")))
        .await;
    assert_eq!(
        browser.find("[data-total=requests]").await.text().await,
        "3"
    );
    browser.screenshot("usage").await;

    // The audit log names the console session as the actor.
    browser.goto(&gw.url("/console/audit")).await;
    browser.wait_for_url("/console/audit").await;
    let source = browser.source().await;
    assert!(
        source.contains("key.create") && source.contains("console"),
        "{source}"
    );
    assert_eq!(
        browser.execute("return window.pwned === undefined;").await,
        true
    );
    browser.screenshot("audit").await;

    // At phone width, the page fits the screen (no sideways scrolling of the page).
    browser.set_size(390, 844).await;
    browser.goto(&gw.url("/console/overview")).await;
    let overflow = browser
        .execute("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
        .await;
    assert_eq!(overflow, true);
    browser.screenshot("overview-phone").await;
    browser.set_size(1280, 900).await;

    // Signed out, the key holder signs in with the key and sees only that key.
    browser.find(".sign-out button").await.click().await;
    browser.wait_for_url("/console/sign-in").await;
    browser.goto(&gw.url("/console/overview")).await;
    browser.wait_for_url("/console/sign-in").await;
    browser.find("#api-key").await.fill(&secret).await;
    browser.find("#key-sign-in").await.click().await;
    browser.wait_for_url("/console/me").await;
    assert_eq!(browser.find("#my-key-name").await.text().await, SCRIPT_KEY);
    let source = browser.source().await;
    assert!(source.contains(&key_id));
    assert!(!source.contains(&other.id) && !source.contains("someone else"));
    assert!(
        browser.count("tbody tr").await >= 3 + 3 + 3,
        "quotas, limits and 3 calls"
    );
    browser.screenshot("key-holder").await;
    // A short-lived token made from the key, shown once, works like the key.
    browser.find("#make-token").await.click().await;
    let token = browser.find("#new-token").await.text().await;
    let response = gw.chat(&token, &chat_body("hello")).await;
    assert_eq!(response.status(), StatusCode::OK);
    browser.screenshot("key-holder-token").await;
    // The admin's pages are not the key holder's.
    browser
        .goto(&gw.url(&format!("/console/keys/{}", other.id)))
        .await;
    browser.wait_for_url("/console/sign-in").await;

    // The admin revokes the key; the next call with it is refused, and its holder's
    // session ends.
    browser.goto(&gw.url("/console/sign-in")).await;
    browser.find("#admin-token").await.fill(ADMIN_TOKEN).await;
    browser.find("#admin-sign-in").await.click().await;
    browser.wait_for_url("/console/overview").await;
    browser.goto(&key_url).await;
    browser.find("#revoke-key").await.click().await;
    browser
        .wait_for_text("#key-state", |t| t == "revoked")
        .await;
    let response = gw.chat(&secret, &chat_body("hello")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    browser.quit().await;
}

#[tokio::test]
async fn a_change_without_its_csrf_token_is_refused() {
    let gw = TestGateway::start().await;
    let (status, cookie) = sign_in(&gw, "admin", ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = cookie.unwrap();
    let (_, page) = get_page(&gw, &cookie, "/console/users").await;
    let csrf = csrf_of(&page);
    for fields in [
        vec![("name", "no token")],
        vec![("name", "wrong token"), ("csrf", "0123")],
        vec![("name", "empty token"), ("csrf", "")],
    ] {
        let response = client()
            .post(gw.url("/console/users"))
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form(&fields))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{fields:?}");
    }
    let (_, users) = gw.admin(Method::GET, "/users", None).await;
    assert_eq!(users["users"].as_array().unwrap().len(), 0, "{users}");
    // With the token, the same change is made, and audited as the console's.
    let response = client()
        .post(gw.url("/console/users"))
        .header(header::COOKIE, &cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("name", "with token"), ("csrf", csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (_, audit) = gw.admin(Method::GET, "/audit", None).await;
    assert_eq!(audit["entries"][0]["action"], "user.create");
    assert_eq!(audit["entries"][0]["actor"]["door"], "console");
    // Another session's token does not do either.
    let (_, second) = sign_in(&gw, "admin", ADMIN_TOKEN).await;
    let response = client()
        .post(gw.url("/console/users"))
        .header(header::COOKIE, second.unwrap())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("name", "foreign token"), ("csrf", csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Signing out needs it too; after it the session is gone.
    let response = client()
        .post(gw.url("/console/sign-out"))
        .header(header::COOKIE, &cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("csrf", "")]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = client()
        .post(gw.url("/console/sign-out"))
        .header(header::COOKIE, &cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("csrf", csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let (status, _) = get_page(&gw, &cookie, "/console/users").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn sign_in_attempts_are_throttled_per_address() {
    let gw = TestGateway::builder()
        .config(|c| c.console.sign_in_attempts_per_minute = 3)
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(
            sign_in(&gw, "admin", "wrong-token").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    // Now even the right token waits.
    let (status, cookie) = sign_in(&gw, "admin", ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(cookie.is_none());
}

#[tokio::test]
async fn pages_carry_a_strict_policy_and_escape_what_users_typed() {
    let gw = TestGateway::start().await;
    let user = gw
        .create_user(json!({"name": SCRIPT_USER, "email": "\"><script>x()</script>@e.com"}))
        .await;
    gw.create_key_for(&user, json!({"name": SCRIPT_KEY})).await;
    let (_, cookie) = sign_in(&gw, "admin", ADMIN_TOKEN).await;
    let cookie = cookie.unwrap();
    for path in [
        "/console/overview".to_owned(),
        "/console/users".to_owned(),
        format!("/console/users/{user}"),
        "/console/keys".to_owned(),
        "/console/keys?q=prod".to_owned(),
        "/console/calls".to_owned(),
        "/console/audit".to_owned(),
        "/console/sign-in".to_owned(),
    ] {
        let response = client()
            .get(gw.url(&path))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let csp = response.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(response.headers()[header::X_FRAME_OPTIONS], "DENY");
        let page = response.text().await.unwrap();
        // The only script is the console's own file; nothing typed became markup.
        assert_eq!(page.matches("<script").count(), 1, "{path}: {page}");
        assert!(page.contains("<script src=\"/console/assets/console.js\""));
        assert!(!page.contains("<img src=x"), "{path}");
    }
    let (_, page) = get_page(&gw, &cookie, &format!("/console/users/{user}")).await;
    assert!(page.contains("&lt;script&gt;window.pwned=1&lt;/script&gt;Ada"));
}

#[tokio::test]
async fn the_usage_page_exports_csv() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"name": "=cmd"})).await;
    for _ in 0..2 {
        assert_eq!(
            gw.chat(&key.secret, &chat_body("hi")).await.status(),
            StatusCode::OK
        );
    }
    let (_, cookie) = sign_in(&gw, "admin", ADMIN_TOKEN).await;
    let cookie = cookie.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let response = client()
            .get(gw.url(&format!("/console/usage?subject={}&format=csv", key.id)))
            .header(header::COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/csv; charset=utf-8"
        );
        let csv = response.text().await.unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "Period,Model,Version,Requests,Errors,Prompt tokens,Completion tokens,Images,Cost"
        );
        let requests: u64 = lines[1..]
            .iter()
            .map(|l| l.split(',').nth(3).unwrap().parse::<u64>().unwrap())
            .sum();
        if requests == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{csv}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_console_can_be_turned_off() {
    let gw = TestGateway::builder()
        .config(|c| c.console.enabled = false)
        .start()
        .await;
    let response = client()
        .get(gw.url("/console/sign-in"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_url");
}

#[tokio::test]
async fn a_key_holders_session_ends_with_the_key() {
    let gw = TestGateway::start().await;
    let key = gw.create_key(json!({"request_quota": 5})).await;
    let (status, cookie) = sign_in(&gw, "key", &key.secret).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = cookie.unwrap();
    let (status, page) = get_page(&gw, &cookie, "/console/me").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&key.id) && !page.contains(&key.secret));
    // The admin's pages stay shut to a key holder.
    let (status, _) = get_page(&gw, &cookie, "/console/keys").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, page) = get_page(&gw, &cookie, "/console/me").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("revoked"), "{page}");
    let (status, _) = get_page(&gw, &cookie, "/console/me").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "the session is gone");
}

#[tokio::test]
async fn models_prices_and_alerts_are_shown_and_a_price_is_added_with_its_csrf_token() {
    let gw = TestGateway::start().await;
    let (_, cookie) = sign_in(&gw, "admin", ADMIN_TOKEN).await;
    let cookie = cookie.unwrap();
    let (status, page) = get_page(&gw, &cookie, "/console/models").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Add a price"), "{page}");
    let add = |fields: Vec<(&'static str, String)>| {
        let cookie = cookie.clone();
        let url = gw.url("/console/models");
        async move {
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            client()
                .post(url)
                .header(header::COOKIE, &cookie)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form(&pairs))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let model = "<script>window.pwned=3</script>m";
    let no_token = add(vec![
        ("model", model.into()),
        ("prompt_per_million", "2".into()),
    ])
    .await;
    assert_eq!(no_token, StatusCode::FORBIDDEN);
    let (_, prices) = gw.admin(Method::GET, "/prices", None).await;
    assert!(prices["data"].as_array().unwrap().is_empty(), "{prices}");
    let added = add(vec![
        ("model", model.into()),
        ("prompt_per_million", "2.5".into()),
        ("csrf", csrf_of(&page)),
    ])
    .await;
    assert_eq!(added, StatusCode::SEE_OTHER);
    let (_, prices) = gw.admin(Method::GET, "/prices", None).await;
    assert_eq!(prices["data"][0]["prompt_per_million"], "2.50", "{prices}");
    let (_, page) = get_page(&gw, &cookie, "/console/models").await;
    assert!(
        !page.contains("<script>window.pwned"),
        "the name stays text"
    );
    assert!(page.contains("&lt;script&gt;window.pwned=3"), "{page}");
    // The change is in the audit log as the console's.
    let (_, audit) = gw.admin(Method::GET, "/audit", None).await;
    let entry = &audit["entries"][0];
    assert_eq!(entry["action"], "price.add", "{audit}");
    assert_eq!(entry["actor"]["door"], "console");

    // No channels: the alerts page says so, and a test is refused with the reason.
    let (status, page) = get_page(&gw, &cookie, "/console/alerts").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("No alert channels are configured"), "{page}");
    let response = client()
        .post(gw.url("/console/alerts"))
        .header(header::COOKIE, &cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form(&[("csrf", csrf_of(&page).as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("no alert channels"));
}
