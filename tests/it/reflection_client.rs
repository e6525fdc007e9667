//! A client with no generated types (`tests/python/reflection_client.py`: grpcio and the
//! descriptors from the gateway's reflection service) makes a key over `Admin` and chats,
//! streams and reads its usage over `Chat`, like grpcurl would.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{ADMIN_TOKEN, MODEL, TestGateway, python};

#[tokio::test]
async fn a_client_knowing_only_reflection_makes_a_key_and_chats() {
    let gw = TestGateway::start().await;
    let target = gw
        .running()
        .grpc_url()
        .trim_start_matches("http://")
        .to_owned();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/reflection_client.py");
    let python = python();
    // The variables are the child's alone: the test process's environment stays untouched.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("STEP3GW_GRPC_TARGET", target)
            .env("STEP3GW_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("STEP3GW_MODEL", MODEL)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for step in [
        "reflection: ok",
        "health: ok",
        "admin: ok",
        "complete: ok",
        "stream: ok",
        "usage: ok",
    ] {
        assert!(
            stdout.lines().any(|line| line == step),
            "missing `{step}` in:\n{stdout}\n{stderr}"
        );
    }
}
