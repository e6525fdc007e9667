//! Money: prices, a cost on every call, budgets and periods, the invoice of a period.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::config::PriceSeed;
use step3_gateway::core::money::Money;
use step3_gateway::core::time::Clock;

use crate::common::{
    MODEL, RestApi, TestGateway, chat_body, chat_request, expect_error, sse_payloads, stream_body,
};

fn money(text: &str) -> Money {
    Money::parse(text).unwrap()
}

fn amount(value: &Value) -> Money {
    money(
        value
            .as_str()
            .unwrap_or_else(|| panic!("not an amount: {value}")),
    )
}

/// A gateway whose model has `seed`'s price, on `clock`.
async fn priced(seed: PriceSeed, clock: Clock) -> TestGateway {
    TestGateway::builder()
        .config(move |c| {
            c.billing.prices = vec![seed];
            c.billing.clock = clock;
        })
        .start()
        .await
}

fn text_price() -> PriceSeed {
    PriceSeed {
        model: MODEL.into(),
        prompt_per_million: money("0.50"),
        completion_per_million: money("1.50"),
        ..PriceSeed::default()
    }
}

/// `prompt × p + completion × c` per million, rounded up to the nano-unit.
fn text_cost(call: &Value, prompt: Money, completion: Money) -> Money {
    let parts = u128::from(call["usage"]["prompt_tokens"].as_u64().unwrap())
        * u128::from(prompt.nanos())
        + u128::from(call["usage"]["completion_tokens"].as_u64().unwrap())
            * u128::from(completion.nanos());
    Money(u64::try_from(parts.div_ceil(1_000_000)).unwrap())
}

#[tokio::test]
async fn every_call_costs_its_tokens_at_the_price_and_the_books_add_up() {
    let gw = priced(text_price(), Clock::default()).await;
    let key = gw.create_key(json!({})).await;
    for i in 0..3 {
        let body = if i == 2 {
            let mut body = stream_body("a streamed one");
            body["stream_options"] = json!({"include_usage": true});
            body
        } else {
            chat_body(&format!("call {i}"))
        };
        let response = gw.chat(&key.secret, &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap();
    }
    let calls = gw.wait_for_calls(&key.id, 3).await;
    let mut total = Money::ZERO;
    for call in &calls {
        let expected = text_cost(call, money("0.50"), money("1.50"));
        assert!(expected > Money::ZERO, "{call}");
        assert_eq!(amount(&call["cost"]), expected, "{call}");
        total = total.saturating_add(expected);
    }
    // The key's own view, the admin's report and the metrics agree to the nano-unit.
    let usage = gw.usage(&key.secret).await;
    assert_eq!(amount(&usage["cost"]["used"]), total, "{usage}");
    assert_eq!(usage["cost"]["currency"], "USD");
    let (status, report) = gw
        .admin(
            Method::GET,
            &format!("/keys/{}/usage?by_model=true&group_by=month", key.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(amount(&report["cost"]), total, "{report}");
    assert_eq!(report["buckets"][0]["model"], MODEL);
    let metrics = gw.metrics().await;
    let spent: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("step3gw_spend_nanos_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(spent, total.nanos(), "{metrics}");
}

fn png(width: u32, height: u32) -> String {
    use base64::Engine;
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    png.extend(width.to_be_bytes());
    png.extend(height.to_be_bytes());
    png.extend([8, 6, 0, 0, 0, 0, 0, 0, 0]);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

#[tokio::test]
async fn images_cost_by_their_tier_and_model_time_by_the_microsecond() {
    let clock = Clock::default();
    let seed = PriceSeed {
        model: MODEL.into(),
        images: [
            ("small", "0.001"),
            ("medium", "0.01"),
            ("large", "0.1"),
            ("unknown", "1"),
        ]
        .into_iter()
        .map(|(tier, p)| (tier.to_owned(), money(p)))
        .collect(),
        ..PriceSeed::default()
    };
    let gw = priced(seed, clock).await;
    let key = gw.create_key(json!({})).await;
    // One image of each readable tier: 0.001 + 0.01 + 0.1.
    let parts: Vec<Value> = [(512, 512), (1024, 1000), (1025, 1024)]
        .into_iter()
        .map(|(w, h)| json!({"type": "image_url", "image_url": {"url": png(w, h)}}))
        .chain([json!({"type": "text", "text": "compare"})])
        .collect();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": parts}]});
    let response = gw.chat(&key.secret, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(amount(&calls[0]["cost"]), money("0.111"), "{}", calls[0]);

    // Model time alone: a second of it costs 1.00, and the call took some.
    gw.admin(
        Method::POST,
        "/prices",
        Some(json!({"model": MODEL, "per_second": "1"})),
    )
    .await;
    let response = gw.chat(&key.secret, &chat_body("take your time")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let calls = gw.wait_for_calls(&key.id, 2).await;
    let cost = amount(&calls[0]["cost"]);
    let latency_ms = calls[0]["latency_ms"].as_u64().unwrap();
    assert!(cost > Money::ZERO, "{}", calls[0]);
    // Model time is within the call's own time (whole milliseconds, rounded down).
    assert!(cost <= Money((latency_ms + 1) * 1_000_000), "{}", calls[0]);
}

#[tokio::test]
async fn a_new_price_applies_from_its_moment_and_old_calls_keep_theirs() {
    let clock = Clock::default();
    let gw = priced(text_price(), clock.clone()).await;
    let key = gw.create_key(json!({})).await;
    // A price can start later, never earlier.
    let now = clock.now_unix();
    let (status, error) = gw
        .admin(
            Method::POST,
            "/prices",
            Some(json!({"model": MODEL, "prompt_per_million": "1", "effective_from": now - 60})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "effective_from");
    let (status, price) = gw
        .admin(
            Method::POST,
            "/prices",
            Some(json!({
                "model": MODEL,
                "prompt_per_million": "5",
                "completion_per_million": "15",
                "effective_from": now + 3600,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{price}");

    gw.chat(&key.secret, &chat_body("before"))
        .await
        .text()
        .await
        .unwrap();
    clock.advance(3600);
    gw.chat(&key.secret, &chat_body("after"))
        .await
        .text()
        .await
        .unwrap();
    let calls = gw.wait_for_calls(&key.id, 2).await;
    // Newest first.
    assert_eq!(
        amount(&calls[0]["cost"]),
        text_cost(&calls[0], money("5"), money("15"))
    );
    assert_eq!(
        amount(&calls[1]["cost"]),
        text_cost(&calls[1], money("0.50"), money("1.50"))
    );
    let (_, prices) = gw
        .admin(Method::GET, &format!("/prices?model={MODEL}"), None)
        .await;
    assert_eq!(prices["data"].as_array().unwrap().len(), 2, "{prices}");
}

#[tokio::test]
async fn a_tiny_call_costs_one_nano_unit_not_nothing() {
    let seed = PriceSeed {
        model: MODEL.into(),
        prompt_per_million: Money(1),
        completion_per_million: Money(1),
        ..PriceSeed::default()
    };
    let gw = priced(seed, Clock::default()).await;
    let key = gw.create_key(json!({})).await;
    let mut body = chat_body("hi");
    body["max_tokens"] = json!(2);
    gw.chat(&key.secret, &body).await.text().await.unwrap();
    let calls = gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(calls[0]["cost"], "0.000000001", "{}", calls[0]);
}

#[tokio::test]
async fn a_daily_quota_starts_again_at_midnight_in_the_configured_zone() {
    let clock = Clock::default();
    let gw = TestGateway::builder()
        .config({
            let clock = clock.clone();
            move |c| {
                c.billing.clock = clock;
                c.billing.time_zone = "Asia/Shanghai".into();
            }
        })
        .start()
        .await;
    let key = gw
        .create_key(json!({"request_quota": 2, "period": "day"}))
        .await;
    for _ in 0..2 {
        let response = gw.chat(&key.secret, &chat_body("today")).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let error = expect_error(
        gw.chat(&key.secret, &chat_body("one more")).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(error["code"], "insufficient_quota");
    let usage = gw.usage(&key.secret).await;
    let (start, end) = (
        usage["period"]["start"].as_i64().unwrap(),
        usage["period"]["end"].as_i64().unwrap(),
    );
    assert_eq!(usage["period"]["every"], "day");
    // Midnight in Shanghai is 16:00 UTC.
    assert_eq!(start.rem_euclid(86_400), 16 * 3600, "{usage}");
    assert_eq!(end - start, 86_400);
    assert_eq!(usage["requests"]["remaining"], 0);

    // The next day.
    clock.advance(end - clock.now_unix());
    let response = gw.chat(&key.secret, &chat_body("tomorrow")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["period"]["start"], end, "{usage}");
    assert_eq!(usage["requests"]["used"], 1, "{usage}");
    assert_eq!(usage["requests"]["remaining"], 1, "{usage}");
}

#[tokio::test]
async fn a_period_survives_a_restart_counted_from_the_books() {
    let mut gw = TestGateway::start().await;
    let key = gw
        .create_key(json!({"request_quota": 3, "period": "month"}))
        .await;
    for _ in 0..2 {
        gw.chat(&key.secret, &chat_body("x"))
            .await
            .text()
            .await
            .unwrap();
    }
    gw.wait_for_calls(&key.id, 2).await;
    gw.restart().await;
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 2, "{usage}");
    assert_eq!(usage["requests"]["remaining"], 1, "{usage}");
}

#[tokio::test]
async fn concurrent_calls_never_spend_more_than_a_budget() {
    // Only output is priced: the worst cost reserved is exact, so nothing may be overspent.
    let seed = PriceSeed {
        model: MODEL.into(),
        completion_per_million: money("1000"),
        ..PriceSeed::default()
    };
    let gw = TestGateway::builder()
        .sim(|s| s.token_latency = Duration::from_millis(1))
        .config(move |c| c.billing.prices = vec![seed])
        .start()
        .await;
    // 0.50 pays for 500 output tokens.
    let key = gw.create_key(json!({"budget": "0.50"})).await;
    let calls = (0..200).map(|i| {
        let gw = &gw;
        let secret = key.secret.clone();
        async move {
            let mut body = chat_body(&format!("call {i}"));
            body["max_tokens"] = json!(8);
            let response = gw.chat(&secret, &body).await;
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }
    });
    let results = join_all(calls).await;
    let served = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(served + refused.len(), 200);
    assert!(served > 0 && !refused.is_empty(), "{served} served");
    assert!(
        refused
            .iter()
            .all(|b| b["error"]["message"].as_str().unwrap().contains("budget")),
        "{:?}",
        refused.first()
    );
    let logged = gw.wait_for_calls(&key.id, served).await;
    let spent = logged
        .iter()
        .fold(Money::ZERO, |sum, c| sum.saturating_add(amount(&c["cost"])));
    assert!(spent <= money("0.50"), "spent {spent}");
    let usage = gw.usage(&key.secret).await;
    assert_eq!(amount(&usage["cost"]["used"]), spent, "{usage}");
    assert_eq!(
        amount(&usage["cost"]["remaining"]),
        money("0.50").saturating_sub(spent)
    );
}

#[tokio::test]
async fn a_users_budget_covers_all_its_keys_and_the_refusal_says_whose() {
    let seed = PriceSeed {
        model: MODEL.into(),
        per_call_minimum: money("1"),
        ..PriceSeed::default()
    };
    let gw = priced(seed, Clock::default()).await;
    let user = gw
        .create_user(json!({"name": "team", "budget": "2", "period": "week"}))
        .await;
    let a = gw.create_key_for(&user, json!({})).await;
    let b = gw.create_key_for(&user, json!({})).await;
    assert_eq!(
        gw.chat(&a.secret, &chat_body("1")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        gw.chat(&b.secret, &chat_body("2")).await.status(),
        StatusCode::OK
    );
    let error = expect_error(
        gw.chat(&a.secret, &chat_body("3")).await,
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(error["code"], "insufficient_quota");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("user's budget") && message.contains("a week"),
        "{message}"
    );

    // gRPC says the same in its own terms.
    let mut chat = gw.grpc_chat(&b.secret).await;
    let status = chat.complete(chat_request("4")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        status.metadata().get("x-quota-exceeded").unwrap(),
        "user_budget"
    );
}

#[tokio::test]
async fn grpc_shows_spend_and_manages_prices() {
    let gw = priced(text_price(), Clock::default()).await;
    let key = gw
        .create_key(json!({"budget": "10", "period": "month"}))
        .await;
    let mut chat = gw.grpc_chat(&key.secret).await;
    chat.complete(chat_request("hello")).await.unwrap();
    gw.wait_for_calls(&key.id, 1).await;
    let usage = chat
        .get_usage(step3_gateway::grpc::pb::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    let spent = money(&usage.cost_used);
    assert!(spent > Money::ZERO);
    assert_eq!(usage.budget.as_deref(), Some("10.00"));
    assert_eq!(
        money(usage.budget_remaining.as_deref().unwrap()),
        money("10").saturating_sub(spent)
    );
    assert_eq!(usage.period.as_deref(), Some("month"));
    assert!(usage.period_start.unwrap() < usage.period_end.unwrap());

    let mut admin = gw.grpc_admin().await;
    let price = admin
        .add_price(step3_gateway::grpc::pb::AddPriceRequest {
            model: "other-model".into(),
            prompt_per_million: Some("2".into()),
            images: [("small".to_owned(), "0.01".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(price.prompt_per_million, "2.00");
    let bad = admin
        .add_price(step3_gateway::grpc::pb::AddPriceRequest {
            model: "other-model".into(),
            images: [("huge".to_owned(), "1".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let list = admin
        .list_prices(step3_gateway::grpc::pb::ListPricesRequest { model: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.prices.len(), 2);
    assert_eq!(list.currency, "USD");
}

#[tokio::test]
async fn the_invoice_of_a_period_matches_the_call_log_to_the_unit() {
    let gw = priced(text_price(), Clock::default()).await;
    let user = gw.create_user(json!({"name": "Acme, \"Inc\""})).await;
    let a = gw.create_key_for(&user, json!({})).await;
    let b = gw.create_key_for(&user, json!({})).await;
    for (i, key) in [&a, &b, &a, &a, &b].into_iter().enumerate() {
        let mut body = chat_body(&format!("line {i}"));
        if i == 3 {
            body = stream_body("streamed");
            body["stream_options"] = json!({"include_usage": true});
        }
        let text = gw.chat(&key.secret, &body).await.text().await.unwrap();
        assert!(!text.is_empty() && (i != 3 || !sse_payloads(&text).is_empty()));
    }
    let logged: Vec<Value> = [
        gw.wait_for_calls(&a.id, 3).await,
        gw.wait_for_calls(&b.id, 2).await,
    ]
    .concat();
    let logged_total = logged
        .iter()
        .fold(Money::ZERO, |sum, c| sum.saturating_add(amount(&c["cost"])));

    let (status, invoice) = gw
        .admin(Method::GET, &format!("/users/{user}/invoice"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{invoice}");
    assert_eq!(amount(&invoice["total"]), logged_total, "{invoice}");
    let lines = invoice["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2, "one line per key and model: {invoice}");
    let requests: u64 = lines.iter().map(|l| l["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 5);
    // The user's report by key says the same per key.
    let (_, report) = gw
        .admin(
            Method::GET,
            &format!("/users/{user}/usage?group_by=month&by_key=true"),
            None,
        )
        .await;
    for line in lines {
        let row = report["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["key_id"] == line["key_id"])
            .unwrap_or_else(|| panic!("{report}"));
        assert_eq!(row["cost"], line["cost"], "{report}");
    }

    let response = gw
        .http()
        .get(gw.url(&format!("/admin/v1/users/{user}/invoice?format=csv")))
        .bearer_auth(crate::common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = response.text().await.unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 1 + 2 + 1, "{csv}");
    assert!(rows[0].starts_with("user_id,key_id,"));
    let total_row = rows[3];
    assert!(total_row.contains(",total,"), "{csv}");
    assert_eq!(
        money(total_row.split(',').nth(9).unwrap()),
        logged_total,
        "{csv}"
    );
}

#[tokio::test]
async fn budgets_and_periods_are_checked_when_set() {
    let gw = TestGateway::start().await;
    let user = gw.create_user(json!({"name": "x"})).await;
    for (body, param) in [
        (json!({"budget": "-1"}), "budget"),
        (json!({"budget": "1.0000000001"}), "budget"),
        (json!({"period": "fortnight"}), "period"),
    ] {
        let mut body = body;
        body["user_id"] = json!(user);
        let (status, error) = gw.admin(Method::POST, "/keys", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    let key = gw
        .create_key_for(&user, json!({"budget": 12.5, "period": "week"}))
        .await;
    let (_, view) = gw
        .admin(Method::GET, &format!("/keys/{}", key.id), None)
        .await;
    assert_eq!(view["budget"], "12.50");
    assert_eq!(view["period"], "week");
    let (status, view) = gw
        .admin(
            Method::PATCH,
            &format!("/keys/{}", key.id),
            Some(json!({"budget": null, "period": null})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert!(
        view["budget"].is_null() && view["period"].is_null(),
        "{view}"
    );
}
