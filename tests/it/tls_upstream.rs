//! An https model server: the gateway's own client reaches it over TLS (rustls, the
//! platform's trust store, which `SSL_CERT_FILE` replaces) with HTTP/1.1 or HTTP/2 as
//! ALPN decides, and refuses a certificate it does not trust without naming the server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::StatusCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use step3_gateway::sim::RunningSimulator;

use crate::common::binary::{ConfigFile, GatewayProcess, serve_command, upstream};
use crate::common::{RestApi, chat_body, expect_error, read_rest, sse_payloads, stream_body};

/// A certificate authority of the test and a certificate it signed for `localhost`.
struct TestPki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn test_pki() -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// The simulator's routes served over TLS on a port of its own, offering `alpn`; returns
/// the address and the protocol each connection agreed on.
async fn serve_tls(
    sim: &RunningSimulator,
    pki: &TestPki,
    alpn: &[&[u8]],
) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
        .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agreed = Arc::new(Mutex::new(Vec::new()));
    let router = sim.simulator.router();
    let seen = agreed.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, router, seen) = (acceptor.clone(), router.clone(), seen.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate gives up here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let protocol = tls.get_ref().1.alpn_protocol().unwrap_or_default();
                seen.lock().unwrap().push(protocol.to_vec());
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, agreed)
}

/// The binary in front of `https://localhost:<port>`, trusting the CA in `ca_file` only.
async fn gateway_trusting(dir: &Path, port: u16, ca_file: &Path) -> GatewayProcess {
    let config = ConfigFile::new(&format!("https://localhost:{port}")).write(dir);
    let mut command = serve_command(&config, "info");
    command.env("SSL_CERT_FILE", ca_file);
    GatewayProcess::start_command(command).await
}

#[tokio::test]
async fn an_https_model_server_is_reached_over_http1_and_http2_as_alpn_agrees() {
    let pki = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    for (offered, expected) in [
        (&[b"http/1.1".as_slice()][..], b"http/1.1".as_slice()),
        (
            &[b"h2".as_slice(), b"http/1.1".as_slice()][..],
            b"h2".as_slice(),
        ),
    ] {
        let sim = upstream(0).await;
        let (addr, agreed) = serve_tls(&sim, &pki, offered).await;
        let gw_dir = tempfile::tempdir().unwrap();
        let gw = gateway_trusting(gw_dir.path(), addr.port(), &ca_file).await;
        let secret = gw.create_key(json!({})).await.secret;

        let response = gw.chat(&secret, &chat_body("over TLS")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let answer: Value = response.json().await.unwrap();
        assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);

        let mut stream = gw
            .chat(&secret, &stream_body("streamed over TLS"))
            .await
            .bytes_stream();
        let first = stream.next().await.unwrap().unwrap();
        let rest = read_rest(&mut stream).await;
        let payloads = sse_payloads(&format!("{}{rest}", String::from_utf8_lossy(&first)));
        assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));

        // The calls went through the TLS server with the backend's key.
        let seen = sim.simulator.requests();
        assert_eq!(seen.len(), 2);
        assert!(
            seen.iter()
                .all(|r| r.headers["authorization"] == "Bearer upstream-secret-key-9876")
        );
        let agreed = agreed.lock().unwrap().clone();
        assert!(!agreed.is_empty());
        assert!(
            agreed.iter().all(|p| p == expected),
            "offered {offered:?}, agreed {agreed:?}"
        );
    }
}

#[tokio::test]
async fn a_model_server_whose_certificate_is_not_trusted_is_refused_without_its_address() {
    let pki = test_pki();
    let sim = upstream(0).await;
    let (addr, _) = serve_tls(&sim, &pki, &[b"http/1.1"]).await;
    // The gateway trusts another authority only.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, test_pki().ca_pem).unwrap();
    let gw = gateway_trusting(dir.path(), addr.port(), &ca_file).await;
    let secret = gw.create_key(json!({})).await.secret;

    let response = gw.chat(&secret, &chat_body("not trusted")).await;
    let error = expect_error(response, StatusCode::SERVICE_UNAVAILABLE).await;
    let message = error["message"].as_str().unwrap();
    assert!(!message.contains(&addr.port().to_string()), "{message}");
    assert!(!message.contains("localhost"), "{message}");
    assert_eq!(sim.simulator.stats().chat_requests, 0);
}
