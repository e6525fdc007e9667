//! A client with no generated types (`tests/python/reflection_client.py`: grpcio and the
//! descriptors from the gateway's reflection service) makes a key over `Admin` and chats,
//! streams and reads its usage over `Chat`, like grpcurl would.

use crate::common::{ADMIN_TOKEN, MODEL, TestGateway, run_python};

#[tokio::test]
async fn a_client_knowing_only_reflection_makes_a_key_and_chats() {
    let gw = TestGateway::start().await;
    let target = gw
        .running()
        .grpc_url()
        .trim_start_matches("http://")
        .to_owned();
    // The variables are the child's alone: the test process's environment stays untouched.
    let env = vec![
        ("STEP3GW_GRPC_TARGET", target),
        ("STEP3GW_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("STEP3GW_MODEL", MODEL.to_owned()),
    ];
    let (stdout, stderr) = run_python("tests/python/reflection_client.py", env).await;
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
