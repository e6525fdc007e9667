//! Tokens from an identity provider instead of keys: a JWKS served from inside the test,
//! tokens signed with keys made here, on both doors; every failed check is a 401 that says
//! which check failed, and nothing is charged for it.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::config::UnknownSubjects;
use step3_gateway::core::identity::identity_key_id;
use step3_gateway::grpc::pb;
use tonic::Code;

use crate::common::{RestApi, TestGateway, chat_body, chat_request, expect_error};

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "step3-gateway";
const HS_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

/// A signing key of the provider and its public half as a JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Jwk,
}

fn signing_key(kid: &str, alg: Algorithm) -> SigningKey {
    let (pair, key) = match alg {
        Algorithm::ES256 => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
            (pair, key)
        }
        Algorithm::EdDSA => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let key = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
            (pair, key)
        }
        other => panic!("no test key for {other:?}"),
    };
    let mut jwk = match alg {
        // jsonwebtoken makes no JWK of an Ed25519 key: its public half, written out.
        Algorithm::EdDSA => {
            use base64::Engine as _;
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
            serde_json::from_value(json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA"}))
                .unwrap()
        }
        _ => Jwk::from_encoding_key(&key, alg).unwrap(),
    };
    jwk.common.key_id = Some(kid.to_owned());
    SigningKey {
        kid: kid.to_owned(),
        alg,
        key,
        jwk,
    }
}

/// The provider's JWKS endpoint, on a port of its own; `publish` changes what it serves.
struct Provider {
    url: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<Mutex<u32>>,
}

impl Provider {
    async fn start(keys: Vec<Jwk>) -> Provider {
        let keys = Arc::new(Mutex::new(keys));
        let fetches = Arc::new(Mutex::new(0));
        let (served, counted) = (keys.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let served = served.clone();
                let counted = counted.clone();
                async move {
                    *counted.lock().unwrap() += 1;
                    let set = JwkSet {
                        keys: served.lock().unwrap().clone(),
                    };
                    axum::Json(serde_json::to_value(set).unwrap())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Provider { url, keys, fetches }
    }

    fn publish(&self, keys: Vec<Jwk>) {
        *self.keys.lock().unwrap() = keys;
    }

    fn fetches(&self) -> u32 {
        *self.fetches.lock().unwrap()
    }
}

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Claims a good token carries, for `sub`; tests change what they test.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "iat": now()})
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    encode(&header, claims, &key.key).unwrap()
}

async fn gateway(provider: &Provider, unknown: UnknownSubjects) -> TestGateway {
    let url = provider.url.clone();
    TestGateway::builder()
        .config(move |c| {
            c.jwt.jwks_url = Some(url);
            c.jwt.hs256_secret = Some(HS_SECRET.into());
            c.jwt.issuer = Some(ISSUER.into());
            c.jwt.audience = vec![AUDIENCE.into()];
            c.jwt.unknown_subjects = unknown;
            c.jwt.jwks_min_refresh_secs = 0;
            c.jwt.key_limits.request_quota = Some(3);
        })
        .start()
        .await
}

async fn grpc_code(gw: &TestGateway, token: &str) -> (Code, String) {
    let mut chat = gw.grpc_chat(token).await;
    match chat.complete(chat_request("hello")).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

#[tokio::test]
async fn a_providers_token_calls_on_its_users_identity_key_on_both_doors() {
    let es = signing_key("es-1", Algorithm::ES256);
    let ed = signing_key("ed-1", Algorithm::EdDSA);
    let provider = Provider::start(vec![es.jwk.clone(), ed.jwk.clone()]).await;
    let gw = gateway(&provider, UnknownSubjects::Create).await;

    let token = sign(&es, &claims("svc-reports"));
    let answer = gw.chat(&token, &chat_body("hi")).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(grpc_code(&gw, &token).await.0, Code::Ok);
    let ed_token = sign(&ed, &claims("svc-reports"));
    assert_eq!(
        gw.chat(&ed_token, &chat_body("hi")).await.status(),
        StatusCode::OK
    );

    // One user for the subject, its calls on its identity key, with the configured quota.
    let (_, users) = gw.admin(Method::GET, "/users", None).await;
    let user = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["subject"] == "svc-reports")
        .expect("a user made for the subject")
        .clone();
    let key_id = identity_key_id(user["id"].as_str().unwrap());
    let calls = gw.wait_for_calls(&key_id, 3).await;
    assert_eq!(calls.len(), 3);
    let (_, key) = gw
        .admin(Method::GET, &format!("/keys/{key_id}"), None)
        .await;
    assert_eq!(key["requests_used"], 3, "{key}");
    assert_eq!(key["request_quota"], 3, "{key}");
    // The quota holds for token callers as for keys.
    let over = gw.chat(&token, &chat_body("one more")).await;
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);

    // The token never reaches the model server.
    for request in gw.sim.simulator.requests() {
        let auth = request
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            auth.as_deref().is_none_or(|a| !a.contains(&token[..20])),
            "{auth:?}"
        );
    }

    // Revoking the identity key ends the subject's tokens at once.
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/keys/{key_id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let refused = gw.chat(&token, &chat_body("hi")).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn every_failed_check_is_a_401_that_says_which() {
    let es = signing_key("es-1", Algorithm::ES256);
    let provider = Provider::start(vec![es.jwk.clone()]).await;
    let gw = gateway(&provider, UnknownSubjects::Create).await;
    let stranger = signing_key("es-1", Algorithm::ES256);

    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let mut expired = claims("svc");
    expired["exp"] = json!(now() - 3600);
    cases.push(("expired", sign(&es, &expired), "expired"));
    let mut early = claims("svc");
    early["nbf"] = json!(now() + 3600);
    cases.push(("not yet valid", sign(&es, &early), "not valid yet"));
    let mut audience = claims("svc");
    audience["aud"] = json!("another-service");
    cases.push(("wrong audience", sign(&es, &audience), "`aud`"));
    let mut issuer = claims("svc");
    issuer["iss"] = json!("https://evil.test/");
    cases.push(("wrong issuer", sign(&es, &issuer), "`iss`"));
    let mut no_sub = claims("svc");
    no_sub.as_object_mut().unwrap().remove("sub");
    cases.push(("no subject", sign(&es, &no_sub), "`sub`"));
    cases.push((
        "signed by another key with the same kid",
        sign(&stranger, &claims("svc")),
        "signature",
    ));
    let good = sign(&es, &claims("svc"));
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: Value = serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
    payload["sub"] = json!("admin");
    parts[1] = b64.encode(payload.to_string());
    cases.push(("tampered", parts.join("."), "signature"));
    let none_header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    cases.push((
        "alg none",
        format!("{none_header}.{}.", b64.encode(claims("svc").to_string())),
        "`none`",
    ));
    // HS/RS confusion: an HS256 token whose secret is the provider's public key.
    let public = serde_json::to_vec(&es.jwk).unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims("svc"),
        &EncodingKey::from_secret(&public).unwrap(),
    )
    .unwrap();
    cases.push(("HS256 signed with the public key", confused, "signature"));
    let mut unknown_kid = Header::new(Algorithm::ES256);
    unknown_kid.kid = Some("nobody".into());
    cases.push((
        "unknown key id",
        encode(&unknown_kid, &claims("svc"), &es.key).unwrap(),
        "`nobody`",
    ));

    for (case, token, says) in &cases {
        let error = expect_error(
            gw.chat(token, &chat_body("hi")).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(says), "{case}: {message}");
        let (code, grpc_message) = grpc_code(&gw, token).await;
        assert_eq!(code, Code::Unauthenticated, "{case}");
        assert!(grpc_message.contains(says), "{case}: {grpc_message}");
    }
    // Nothing was made or charged for any of them.
    let (_, users) = gw.admin(Method::GET, "/users", None).await;
    assert!(users["users"].as_array().unwrap().is_empty(), "{users}");
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);

    // A good HS256 token from the shared secret works.
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims("svc-hs"),
        &EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        gw.chat(&hs, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn unknown_subjects_are_refused_until_an_admin_names_a_user_for_them() {
    let es = signing_key("es-1", Algorithm::ES256);
    let provider = Provider::start(vec![es.jwk.clone()]).await;
    let gw = gateway(&provider, UnknownSubjects::Refuse).await;
    let token = sign(&es, &claims("partner-42"));
    let error = expect_error(
        gw.chat(&token, &chat_body("hi")).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(
        error["message"].as_str().unwrap().contains("not a user"),
        "{error}"
    );

    // Named over gRPC, the subject is let in, with the user's allowlist applying.
    let mut admin = gw.grpc_admin().await;
    let user = admin
        .create_user(pb::CreateUserRequest {
            name: "Partner 42".into(),
            subject: Some("partner-42".into()),
            allowed_ips: vec!["10.0.0.0/8".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.subject.as_deref(), Some("partner-42"));
    assert_eq!(
        gw.chat(&token, &chat_body("hi")).await.status(),
        StatusCode::FORBIDDEN
    );
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/users/{}", user.id),
            Some(json!({"allowed_ips": null})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        gw.chat(&token, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    // Another user cannot claim the same subject.
    let (status, error) = gw
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "impostor", "subject": "partner-42"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "subject");
}

#[tokio::test]
async fn a_new_provider_key_is_fetched_when_a_token_names_it() {
    let first = signing_key("2026-01", Algorithm::ES256);
    let provider = Provider::start(vec![first.jwk.clone()]).await;
    let gw = gateway(&provider, UnknownSubjects::Create).await;
    let fetched_at_start = provider.fetches();
    assert!(fetched_at_start >= 1);
    let token = sign(&first, &claims("svc"));
    assert_eq!(
        gw.chat(&token, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        provider.fetches(),
        fetched_at_start,
        "a known key needs no fetch"
    );

    // The provider rotates: the new key is fetched on its first token.
    let second = signing_key("2026-02", Algorithm::ES256);
    provider.publish(vec![second.jwk.clone()]);
    let token = sign(&second, &claims("svc"));
    assert_eq!(
        gw.chat(&token, &chat_body("hi")).await.status(),
        StatusCode::OK
    );
    assert_eq!(provider.fetches(), fetched_at_start + 1);
}
