//! The official Python `openai` package runs the README's SDK examples against a live
//! gateway. `scripts/test.sh` makes the virtualenv; this test fails without it.

use std::path::PathBuf;

use serde_json::json;

use crate::common::{RestApi, TestGateway, run_python};

#[tokio::test]
async fn the_readme_sdk_examples_run_with_the_official_openai_package() {
    let gw = TestGateway::builder().embedding_backend().start().await;
    let key = gw.create_key(json!({})).await;
    let env = vec![
        ("STEP3GW_BASE_URL", gw.url("/v1")),
        ("STEP3GW_API_KEY", key.secret),
    ];
    let (stdout, stderr) = run_python("examples/python/openai_sdk.py", env).await;
    for example in [
        "plain: ok",
        "stream: ok",
        "image: ok",
        "responses: ok",
        "embeddings: ok",
        "errors: ok",
    ] {
        assert!(
            stdout.contains(example),
            "missing `{example}` in:\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn the_readme_shows_the_sdk_examples_that_are_tested() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let script = std::fs::read_to_string(root.join("examples/python/openai_sdk.py")).unwrap();
    // Each example in the script sits between `# --- example: NAME` and `# --- end`.
    let mut found = 0;
    for block in script.split("# --- example: ").skip(1) {
        let body = block.split("# --- end").next().unwrap();
        let code = body.split_once('\n').unwrap().1.trim_end();
        assert!(
            readme.contains(code),
            "README.md is missing this tested example:\n{code}"
        );
        found += 1;
    }
    assert_eq!(found, 5);
}
