//! TLS on the gateway's own port, and mutual TLS: certificates made here (rcgen), REST
//! with reqwest and gRPC with grpcurl; a client certificate's SAN names a user the way a
//! JWT subject does; unknown, expired and missing client certificates are refused at the
//! handshake; the files are read again on reload.

use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use step3_gateway::core::identity::identity_key_id;

use crate::common::{RestApi, TestGateway, chat_body, venv_program};

/// A CA and what it signs, written as PEM files into `dir`.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn ca(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// A leaf for `names` (DNS SANs; `127.0.0.1` as an IP SAN), valid now unless `expired`;
    /// the paths of its certificate and key.
    fn leaf(&self, file: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap());
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

async fn chat(
    http: &reqwest::Client,
    gw: &TestGateway,
    bearer: Option<&str>,
) -> Result<reqwest::Response, reqwest::Error> {
    let url = format!(
        "https://localhost:{}/v1/chat/completions",
        gw.running().addr.port()
    );
    let mut request = http.post(url).json(&chat_body("hello over TLS"));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request.send().await
}

/// The harness's REST helpers (admin, keys, the call log) over the TLS port, as a client
/// with a certificate of the team's CA.
struct TlsApi {
    http: reqwest::Client,
    port: u16,
}

impl RestApi for TlsApi {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    pki: Pki,
    gw: TestGateway,
    api: TlsApi,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "team");
    let (cert, key) = pki.leaf("server", &["localhost", "127.0.0.1"], false);
    let ca = pki.ca("team");
    let gw = TestGateway::builder()
        .config(move |c| {
            c.server.tls.cert_file = Some(cert);
            c.server.tls.key_file = Some(key);
            c.server.tls.client_ca_file = Some(ca);
        })
        .start()
        .await;
    let (cert, key) = pki.leaf("operator", &["operator.internal"], false);
    let api = TlsApi {
        http: client(&pki.ca("team"), Some((&cert, &key))),
        port: gw.running().addr.port(),
    };
    Setup {
        _dir: dir,
        pki,
        gw,
        api,
    }
}

#[tokio::test]
async fn a_client_certificate_names_its_user_and_a_key_still_works_over_tls() {
    let Setup { _dir, pki, gw, api } = setup().await;
    let ca = pki.ca("team");
    let (cert, key) = pki.leaf("billing", &["billing.internal"], false);
    let http = client(&ca, Some((&cert, &key)));

    // Before an admin names a user for it, the certificate opens nothing.
    let refused = chat(&http, &gw, None).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let (status, user) = api
        .admin(
            Method::POST,
            "/users",
            Some(json!({"name": "Billing", "subject": "billing.internal"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let answer = chat(&http, &gw, None).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value = answer.json().await.unwrap();
    assert!(body["choices"].is_array());
    let key_id = identity_key_id(user["id"].as_str().unwrap());
    assert_eq!(api.wait_for_calls(&key_id, 1).await.len(), 1);

    // A key sent over the same connection is that key's call, not the certificate's.
    let own = api.create_key(json!({})).await;
    assert_eq!(
        chat(&http, &gw, Some(&own.secret)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(api.wait_for_calls(&own.id, 1).await.len(), 1);

    // gRPC over the same port, with grpcurl and the same client certificate.
    let grpcurl = venv_program("grpcurl");
    let addr = format!("localhost:{}", gw.running().addr.port());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(grpcurl)
            .arg("-cacert")
            .arg(&ca)
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .args([&addr, "step3.gateway.v1.Chat/GetUsage"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let usage: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(usage["keyId"], key_id.as_str(), "{usage}");
}

#[tokio::test]
async fn unknown_expired_and_missing_client_certificates_are_refused_at_the_handshake() {
    let Setup { _dir, pki, gw, api } = setup().await;
    let ca = pki.ca("team");
    let key = api.create_key(json!({})).await;
    let stranger = Pki::new(&pki.dir, "stranger");
    let (foreign_cert, foreign_key) = stranger.leaf("foreign", &["billing.internal"], false);
    let (old_cert, old_key) = pki.leaf("old", &["billing.internal"], true);
    for (case, http) in [
        ("no certificate", client(&ca, None)),
        (
            "another CA's",
            client(&ca, Some((&foreign_cert, &foreign_key))),
        ),
        ("expired", client(&ca, Some((&old_cert, &old_key)))),
    ] {
        // Even a valid key does not get past the handshake.
        let result = chat(&http, &gw, Some(&key.secret)).await;
        assert!(result.is_err(), "{case}: {result:?}");
    }
    // Plain HTTP on the TLS port is not served either.
    let plain = gw.http().post(gw.url("/v1/chat/completions")).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    drop(api);
    assert_eq!(gw.sim.simulator.stats().chat_requests, 0);
}

#[tokio::test]
async fn the_certificate_files_are_read_again_on_reload_and_a_bad_file_changes_nothing() {
    let Setup { _dir, pki, gw, api } = setup().await;
    let ca = pki.ca("team");
    let (cert, key) = pki.leaf("client", &["svc.internal"], false);
    let http = client(&ca, Some((&cert, &key)));
    let own = api.create_key(json!({})).await;
    assert!(
        chat(&http, &gw, Some(&own.secret))
            .await
            .unwrap()
            .status()
            .is_success()
    );

    // A half-written certificate: the reload fails and the old one keeps serving.
    let server_cert = pki.dir.join("server.pem");
    std::fs::write(&server_cert, "-----BEGIN CERTIFICATE-----\nnot one\n").unwrap();
    assert!(gw.running().reload_tls().is_err());
    let fresh = client(&ca, Some((&cert, &key)));
    assert!(
        chat(&fresh, &gw, Some(&own.secret))
            .await
            .unwrap()
            .status()
            .is_success()
    );

    // A renewed certificate is taken; new connections are made with it.
    pki.leaf("server", &["localhost", "127.0.0.1"], false);
    gw.running().reload_tls().unwrap();
    let renewed = client(&ca, Some((&cert, &key)));
    assert!(
        chat(&renewed, &gw, Some(&own.secret))
            .await
            .unwrap()
            .status()
            .is_success()
    );
}
