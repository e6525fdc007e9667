//! The official Python `openai` package against the simulator
//! (`tests/python/simulator_sdk.py`): every API's answers and streams must parse into the
//! SDK's types. Like the gateway's SDK test it needs the virtualenv `scripts/test.sh`
//! makes (or `STEP3_TEST_PYTHON`), and fails without it rather than passing unchecked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use super::{DEFAULT_EMBEDDING_MODEL, Simulator, SimulatorConfig};

fn python() -> PathBuf {
    let python = std::env::var_os("STEP3_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run scripts/test.sh, which creates the virtualenv with the pinned \
         packages of tests/python/requirements.txt",
        python.display()
    );
    python
}

#[tokio::test]
async fn the_official_openai_sdk_parses_every_api() {
    let sim = Simulator::new(SimulatorConfig {
        embedding_model: Some(DEFAULT_EMBEDDING_MODEL.to_owned()),
        ..SimulatorConfig::default()
    })
    .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
    .await
    .unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/simulator_sdk.py");
    let python = python();
    let base_url = format!("{}/v1", sim.url());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("STEP3SIM_BASE_URL", base_url)
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
    for api in [
        "chat n",
        "chat tools",
        "chat stream tools",
        "chat stream",
        "completions",
        "embeddings",
        "responses",
    ] {
        assert!(
            stdout.contains(&format!("{api}: ok")),
            "missing `{api}: ok` in:\n{stdout}\n{stderr}"
        );
    }
    sim.shutdown().await;
}
