//! The model catalogue: models with versions, aliases, a rollout and deprecations, managed
//! over REST, gRPC and the CLI, resolved on the call path of both doors. Two simulated
//! model servers stand for two versions: the stable one serves [`MODEL`], the canary
//! [`CANARY`]; what each received tells where a call went.

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::config::BackendConfig;
use step3_gateway::core::catalogue::{ModelRecord, ModelVersion};
use step3_gateway::grpc::pb;
use step3_gateway::sim::{RunningSimulator, SimulatorConfig};
use tonic::Code;

use crate::common::{
    MODEL, RestApi, TestGateway, chat_body, chat_request, expect_error, spawn_sim,
};

const CANARY: &str = "step3-vl-canary";

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// `step3` with the alias `step3-latest`, versions [`MODEL`] (the default) and [`CANARY`],
/// and `extra` members merged in.
fn step3(extra: Value) -> Value {
    let mut model = json!({
        "name": "step3",
        "aliases": ["step3-latest"],
        "versions": [{"name": MODEL}, {"name": CANARY}],
        "default_version": MODEL,
    });
    if let (Some(model), Some(extra)) = (model.as_object_mut(), extra.as_object()) {
        model.extend(extra.clone());
    }
    model
}

struct TwoVersions {
    gw: TestGateway,
    canary: RunningSimulator,
}

/// A gateway in front of two model servers, one per version.
async fn two_versions(
    configure: impl FnOnce(&mut step3_gateway::config::GatewayConfig) + 'static,
) -> TwoVersions {
    let canary = spawn_sim(SimulatorConfig {
        model: CANARY.into(),
        ..SimulatorConfig::default()
    })
    .await;
    let canary_url = canary.url();
    let gw = TestGateway::builder()
        .config(move |c| {
            c.upstream.backends = vec![
                BackendConfig::serving("stable", c.upstream.url.clone(), MODEL),
                BackendConfig::serving("canary", canary_url, CANARY),
            ];
            configure(c);
        })
        .start()
        .await;
    TwoVersions { gw, canary }
}

impl TwoVersions {
    async fn with_model(model: Value) -> TwoVersions {
        let t = two_versions(|_| {}).await;
        let (status, body) = t.gw.admin(Method::POST, "/models", Some(model)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        t
    }

    /// How many chat requests each server received naming each version.
    fn received(&self) -> (usize, usize) {
        let count = |requests: Vec<step3_gateway::sim::RecordedRequest>, model: &str| {
            requests
                .iter()
                .filter(|r| r.path == "/v1/chat/completions" && r.body["model"] == model)
                .count()
        };
        (
            count(self.gw.sim.simulator.requests(), MODEL),
            count(self.canary.simulator.requests(), CANARY),
        )
    }
}

fn chat_with(model: &str) -> Value {
    let mut body = chat_body("hello");
    body["model"] = json!(model);
    body
}

#[tokio::test]
async fn models_are_created_listed_changed_and_deleted_over_rest() {
    let t = two_versions(|_| {}).await;
    let gw = &t.gw;
    let (status, created) = gw
        .admin(Method::POST, "/models", Some(step3(json!({}))))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["default_version"], MODEL);
    assert!(created["created_at"].as_i64().unwrap() > 0);

    let (status, again) = gw
        .admin(Method::POST, "/models", Some(step3(json!({}))))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{again}");

    // A name another model has is refused, naming it.
    let (status, clash) = gw
        .admin(
            Method::POST,
            "/models",
            Some(
                json!({"name": "other", "versions": [{"name": CANARY}], "default_version": CANARY}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{clash}");
    assert!(
        clash["error"]["message"].as_str().unwrap().contains(CANARY),
        "{clash}"
    );

    let (status, list) = gw.admin(Method::GET, "/models", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["models"].as_array().unwrap().len(), 1);

    let (status, patched) = gw
        .admin(
            Method::PATCH,
            "/models/step3",
            Some(json!({"rollout": {"version": CANARY, "weight": 10}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["rollout"], json!({"version": CANARY, "weight": 10}));
    assert_eq!(patched["aliases"], json!(["step3-latest"]));

    for bad in [
        json!({"default_version": "nope"}),
        json!({"rollout": {"version": CANARY, "weight": 101}}),
        json!({"rollout": {"version": MODEL, "weight": 5}}),
        json!({"defualt_version": MODEL}),
    ] {
        let (status, body) = gw
            .admin(Method::PATCH, "/models/step3", Some(bad.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    let (status, cleared) = gw
        .admin(
            Method::PATCH,
            "/models/step3",
            Some(json!({"rollout": null})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{cleared}");
    assert!(cleared.get("rollout").is_none(), "{cleared}");

    let (status, replaced) = gw
        .admin(
            Method::PUT,
            "/models/step3",
            Some(json!({"versions": [{"name": MODEL}], "default_version": MODEL})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["aliases"], json!([]));
    assert_eq!(replaced["created_at"], created["created_at"]);

    let (status, _) = gw.admin(Method::DELETE, "/models/step3", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = gw.admin(Method::GET, "/models/step3", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn models_are_managed_over_grpc() {
    let t = two_versions(|_| {}).await;
    let mut admin = t.gw.grpc_admin().await;
    let model = pb::CatalogueModel {
        name: "step3".into(),
        aliases: vec!["step3-latest".into()],
        versions: vec![
            pb::ModelVersion {
                name: MODEL.into(),
                ..Default::default()
            },
            pb::ModelVersion {
                name: CANARY.into(),
                deprecated_at: Some(now() - 10),
                sunset_at: Some(now() + 3600),
                ..Default::default()
            },
        ],
        default_version: MODEL.into(),
        rollout: Some(pb::ModelRollout {
            version: CANARY.into(),
            weight: 25,
        }),
        ..Default::default()
    };
    let put = admin.put_model(model.clone()).await.unwrap().into_inner();
    assert_eq!(put.versions.len(), 2);
    assert!(put.versions[0].default);
    assert_eq!(put.versions[1].rollout_weight, Some(25));

    let listed = admin
        .list_models(pb::ListCatalogueRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.models.len(), 1);
    // The REST door sees what gRPC wrote.
    let (_, rest) = t.gw.admin(Method::GET, "/models/step3", None).await;
    assert_eq!(
        rest["versions"][1]["sunset_at"],
        json!(model.versions[1].sunset_at)
    );

    let bad = pb::CatalogueModel {
        default_version: "nope".into(),
        ..model.clone()
    };
    let status = admin.put_model(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let got = admin
        .get_model(pb::GetModelRequest {
            name: "step3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.aliases, vec!["step3-latest".to_owned()]);
    admin
        .delete_model(pb::DeleteModelRequest {
            name: "step3".into(),
        })
        .await
        .unwrap();
    let status = admin
        .get_model(pb::GetModelRequest {
            name: "step3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn a_pinned_version_reaches_its_server_under_its_name_and_an_alias_gets_the_default() {
    let t = TwoVersions::with_model(step3(json!({}))).await;
    let key = t.gw.create_key(json!({})).await;

    for model in ["step3", "step3-latest", MODEL] {
        let response = t.gw.chat(&key.secret, &chat_with(model)).await;
        assert_eq!(response.status(), StatusCode::OK, "{model}");
    }
    let response = t.gw.chat(&key.secret, &chat_with(CANARY)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(t.received(), (3, 1));

    // Booked under the model's name, with the version it went to.
    let calls = t.gw.wait_for_calls(&key.id, 4).await;
    assert!(calls.iter().all(|c| c["model"] == "step3"), "{calls:?}");
    let versions: Vec<&str> = calls
        .iter()
        .map(|c| c["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, [CANARY, MODEL, MODEL, MODEL]);
    let mut admin = t.gw.grpc_admin().await;
    let logged = admin
        .list_calls(pb::ListCallsRequest {
            key_id: Some(key.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .calls;
    assert_eq!(logged[0].model, "step3");
    assert_eq!(logged[0].version.as_deref(), Some(CANARY));
}

#[tokio::test]
async fn a_deprecated_version_is_announced_on_json_streams_and_grpc() {
    let since = now() - 60;
    let sunset = now() + 30 * 86_400;
    let t = TwoVersions::with_model(step3(json!({
        "versions": [
            {"name": MODEL},
            {"name": CANARY, "deprecated_at": since, "sunset_at": sunset},
        ],
    })))
    .await;
    let key = t.gw.create_key(json!({})).await;
    let expected_sunset = step3_gateway::edge::http_date(sunset);

    let response = t.gw.chat(&key.secret, &chat_with(CANARY)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["deprecation"], format!("@{since}").as_str());
    assert_eq!(headers["sunset"], expected_sunset.as_str());

    let mut stream = chat_with(CANARY);
    stream["stream"] = json!(true);
    let response = t.gw.chat(&key.secret, &stream).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["deprecation"],
        format!("@{since}").as_str()
    );
    assert_eq!(response.headers()["sunset"], expected_sunset.as_str());
    assert!(response.text().await.unwrap().contains("[DONE]"));

    // The default version is not deprecated: no headers.
    let response = t.gw.chat(&key.secret, &chat_with("step3")).await;
    assert!(response.headers().get("deprecation").is_none());
    assert!(response.headers().get("sunset").is_none());

    let mut chat = t.gw.grpc_chat(&key.secret).await;
    let mut request = chat_request("hello");
    request.model = CANARY.into();
    let answer = chat.complete(request.clone()).await.unwrap();
    assert_eq!(
        answer.metadata().get("deprecation").unwrap(),
        format!("@{since}").as_str()
    );
    assert_eq!(
        answer.metadata().get("sunset").unwrap(),
        expected_sunset.as_str()
    );
    let streamed = chat.stream_complete(request).await.unwrap();
    assert_eq!(
        streamed.metadata().get("deprecation").unwrap(),
        format!("@{since}").as_str()
    );
    let chunks: Vec<_> = streamed.into_inner().collect().await;
    assert!(chunks.iter().all(Result::is_ok));
}

#[tokio::test]
async fn a_version_past_its_sunset_is_refused_before_anything_is_charged() {
    let sunset = now() - 10;
    let t = TwoVersions::with_model(step3(json!({
        "versions": [
            {"name": MODEL},
            {"name": CANARY, "deprecated_at": sunset - 86_400, "sunset_at": sunset},
        ],
        // Even all of the rollout never goes to a retired version.
        "rollout": {"version": CANARY, "weight": 100},
    })))
    .await;
    let key =
        t.gw.create_key(json!({"request_quota": 100, "token_quota": 100000}))
            .await;
    let before = t.gw.usage(&key.secret).await;

    let response = t.gw.chat(&key.secret, &chat_with(CANARY)).await;
    let error = expect_error(response, StatusCode::GONE).await;
    assert_eq!(error["code"], "model_version_retired");
    assert_eq!(error["param"], "model");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(CANARY) && message.contains("`step3`"),
        "{message}"
    );

    let mut chat = t.gw.grpc_chat(&key.secret).await;
    let mut request = chat_request("hello");
    request.model = CANARY.into();
    let status = chat.complete(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(CANARY));

    assert_eq!(t.received(), (0, 0));
    assert_eq!(t.gw.usage(&key.secret).await, before);

    let response = t.gw.chat(&key.secret, &chat_with("step3")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(t.received(), (1, 0));
    let calls = t.gw.wait_for_calls(&key.id, 1).await;
    assert_eq!(
        calls.len(),
        1,
        "only the call that was made is on the books"
    );
}

#[tokio::test]
async fn a_rollout_of_ten_percent_sends_about_one_call_in_ten_to_the_canary() {
    let t = TwoVersions::with_model(step3(json!({
        "rollout": {"version": CANARY, "weight": 10},
    })))
    .await;
    let key = t.gw.create_key(json!({})).await;
    const CALLS: usize = 2_000;
    let statuses: Vec<StatusCode> = futures_util::stream::iter(0..CALLS)
        .map(|_| async { t.gw.chat(&key.secret, &chat_with("step3")).await.status() })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    let (stable, canary) = t.received();
    assert_eq!(stable + canary, CALLS);
    // 10% of 2,000 is 200; ±5 points of the calls is ±100 (the binomial's standard
    // deviation is about 13, so this fails by chance essentially never).
    assert!(
        (100..=300).contains(&canary),
        "canary got {canary} of {CALLS}"
    );
}

fn seeded_model() -> ModelRecord {
    ModelRecord {
        name: "step3".into(),
        aliases: vec!["step3-latest".into()],
        versions: vec![
            ModelVersion {
                name: MODEL.into(),
                deprecated_at: None,
                sunset_at: None,
            },
            ModelVersion {
                name: CANARY.into(),
                deprecated_at: None,
                sunset_at: None,
            },
        ],
        default_version: MODEL.into(),
        rollout: None,
        created_at: 0,
        updated_at: 0,
    }
}

#[tokio::test]
async fn the_configuration_seeds_the_catalogue_once_and_runtime_changes_survive_restarts() {
    let mut t = two_versions(|c| c.models = vec![seeded_model()]).await;
    let (status, model) = t.gw.admin(Method::GET, "/models/step3", None).await;
    assert_eq!(status, StatusCode::OK, "{model}");
    assert_eq!(model["default_version"], MODEL);

    let (status, _) =
        t.gw.admin(
            Method::PATCH,
            "/models/step3",
            Some(json!({"default_version": CANARY})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    t.gw.restart().await;
    let (_, model) = t.gw.admin(Method::GET, "/models/step3", None).await;
    assert_eq!(
        model["default_version"], CANARY,
        "the configuration did not overwrite it"
    );
    let key = t.gw.create_key(json!({})).await;
    assert_eq!(
        t.gw.chat(&key.secret, &chat_with("step3-latest"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(t.received(), (0, 1));

    let (status, _) = t.gw.admin(Method::DELETE, "/models/step3", None).await;
    assert_eq!(status, StatusCode::OK);
    t.gw.restart().await;
    let (status, _) = t.gw.admin(Method::GET, "/models/step3", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a deleted model is not seeded again"
    );
}

#[tokio::test]
async fn a_key_allowed_a_model_may_use_its_names_and_versions_and_sees_them_listed() {
    let t = TwoVersions::with_model(step3(json!({}))).await;
    let allowed = t.gw.create_key(json!({"models": ["step3"]})).await;
    for model in ["step3", "step3-latest", CANARY] {
        let response = t.gw.chat(&allowed.secret, &chat_with(model)).await;
        assert_eq!(response.status(), StatusCode::OK, "{model}");
    }
    let other = t.gw.create_key(json!({"models": ["something-else"]})).await;
    let response = t.gw.chat(&other.secret, &chat_with("step3")).await;
    expect_error(response, StatusCode::NOT_FOUND).await;
    let response = t.gw.chat(&other.secret, &chat_with(CANARY)).await;
    expect_error(response, StatusCode::NOT_FOUND).await;

    let (status, list) = t.gw.get("/v1/models", Some(&allowed.secret)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], "list");
    let entry = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "step3")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(entry["object"], "model");
    assert_eq!(entry["default_version"], MODEL);
    let versions: Vec<&str> = entry["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(versions, [MODEL, CANARY]);
    let (status, one) = t.gw.get("/v1/models/step3", Some(&allowed.secret)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["versions"], entry["versions"]);
    assert!(
        !t.gw
            .models(&other.secret)
            .await
            .contains(&"step3".to_owned())
    );

    let mut chat = t.gw.grpc_chat(&allowed.secret).await;
    let models = chat
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let model = models.iter().find(|m| m.id == "step3").unwrap();
    assert_eq!(model.default_version, MODEL);
    assert_eq!(model.versions.len(), 2);
    assert!(model.versions[0].default);
}

#[tokio::test]
async fn a_model_the_catalogue_does_not_know_works_as_before() {
    let t = TwoVersions::with_model(step3(json!({}))).await;
    let key = t.gw.create_key(json!({})).await;
    let response = t.gw.chat(&key.secret, &chat_with(MODEL)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let (status, _) = t.gw.admin(Method::DELETE, "/models/step3", None).await;
    assert_eq!(status, StatusCode::OK);
    let response = t.gw.chat(&key.secret, &chat_with(MODEL)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = t.gw.chat(&key.secret, &chat_with("step3")).await;
    expect_error(response, StatusCode::NOT_FOUND).await;
    let calls = t.gw.wait_for_calls(&key.id, 2).await;
    assert_eq!(calls[0]["model"], MODEL);
    assert!(calls[0].get("version").is_none(), "{:?}", calls[0]);
    assert_eq!(calls[1]["model"], "step3");
}

#[tokio::test]
async fn the_cli_puts_lists_and_deletes_models() {
    let t = two_versions(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.json");
    std::fs::write(&file, step3(json!({})).to_string()).unwrap();
    let url = t.gw.running().grpc_url();
    let run = |args: Vec<String>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_step3-gateway"))
                    .arg("admin")
                    .args(args)
                    .env("STEP3GW_ADMIN_URL", url)
                    .env("STEP3GW_ADMIN_TOKEN", crate::common::ADMIN_TOKEN)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let put = run(vec![
        "models".into(),
        "put".into(),
        "--file".into(),
        file.display().to_string(),
    ])
    .await;
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let printed: Value = serde_json::from_slice(&put.stdout).unwrap();
    assert_eq!(printed["default_version"], MODEL);

    let list = run(vec!["models".into(), "list".into()]).await;
    let printed: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(printed["models"][0]["name"], "step3");

    let delete = run(vec!["models".into(), "delete".into(), "step3".into()]).await;
    assert!(delete.status.success());
    let (status, _) = t.gw.admin(Method::GET, "/models/step3", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A file that is not a valid model is a usage error; nothing is sent.
    std::fs::write(&file, r#"{"name":"x","versions":[],"default_version":"y"}"#).unwrap();
    let bad = run(vec![
        "models".into(),
        "put".into(),
        "--file".into(),
        file.display().to_string(),
    ])
    .await;
    assert!(!bad.status.success());
}

/// Polls `gw` with a chat naming `model` until it answers `status` (at most five seconds).
async fn wait_for_status(gw: &TestGateway, secret: &str, model: &str, status: StatusCode) {
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(5) {
        if gw.chat(secret, &chat_with(model)).await.status() == status {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("`{model}` never answered {status} on the other replica");
}

#[tokio::test]
async fn a_model_changed_on_one_replica_is_served_so_by_the_others() {
    let (url, redis) = (
        crate::common::postgres::fresh_database(),
        crate::common::redis::fresh_prefix(),
    );
    let a = TestGateway::builder()
        .shared_store(&url)
        .shared_limits(&redis)
        .start()
        .await;
    let b = TestGateway::builder()
        .shared_store(&url)
        .shared_limits(&redis)
        .start()
        .await;
    let key = a.create_key(json!({})).await;
    let model = json!({"name": "step3", "versions": [{"name": MODEL}], "default_version": MODEL});
    expect_error(
        b.chat(&key.secret, &chat_with("step3")).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let (status, _) = a.admin(Method::POST, "/models", Some(model)).await;
    assert_eq!(status, StatusCode::CREATED);
    wait_for_status(&b, &key.secret, "step3", StatusCode::OK).await;
    let (status, _) = a.admin(Method::DELETE, "/models/step3", None).await;
    assert_eq!(status, StatusCode::OK);
    wait_for_status(&b, &key.secret, "step3", StatusCode::NOT_FOUND).await;
}
