//! The README's grpcurl examples, run as written (grpcurl from the virtualenv that
//! `scripts/test.sh` makes) against a live gateway, in order: the gRPC documentation is
//! proven, and every gRPC method has an example.
//!
//! An example is a ```sh block of the section `## Using it (gRPC)`. It runs in `sh -e` with
//! `localhost:8080` replaced by the gateway's address and the shell variables the README
//! promises: `$ADMIN_TOKEN`, and `$KEY`, `$USER_ID`, `$KEY_ID` (first a key made by the
//! harness, then whatever the examples create), and `$PAGE_TOKEN` (the `nextPageToken` of
//! the answer just before).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::{ADMIN_TOKEN, RestApi, TestGateway, venv_program};

const SECTION: &str = "## Using it (gRPC)";
const README_ADDR: &str = "localhost:8080";
const VARIABLES: [&str; 5] = ["ADMIN_TOKEN", "KEY", "USER_ID", "KEY_ID", "PAGE_TOKEN"];

fn readme() -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The ```sh blocks of the README's gRPC section, in order.
fn examples(readme: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n{SECTION}\n"))
        .unwrap_or_else(|| panic!("README.md has no `{SECTION}` section"));
    let section = &readme[start + SECTION.len() + 2..];
    let section = section.split("\n## ").next().unwrap();
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("\n```").next().unwrap().to_owned())
        .collect()
}

/// Whether `text` holds `name` as a whole name (`$KEY` is not in `$KEY_ID`, nor
/// `Chat/Get` in `Chat/GetUsage`).
fn names(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(at, _)| {
        text[at + name.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    })
}

/// The rpc names of one service in its proto file.
fn rpcs(proto: &str, service: &str) -> Vec<String> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("proto/step3/gateway/v1/{proto}"));
    let text = std::fs::read_to_string(path).unwrap();
    let body = text
        .split(&format!("service {service} {{"))
        .nth(1)
        .unwrap()
        .split("\n}")
        .next()
        .unwrap();
    body.lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .map(|rest| rest.split('(').next().unwrap().trim().to_owned())
        .collect()
}

#[test]
fn the_readme_has_a_grpcurl_example_for_every_grpc_method() {
    let examples = examples(&readme()).join("\n");
    let mut methods: Vec<String> = Vec::new();
    for (proto, service) in [("chat.proto", "Chat"), ("admin.proto", "Admin")] {
        let names = rpcs(proto, service);
        assert!(names.len() >= 4, "{service}: {names:?}");
        methods.extend(
            names
                .iter()
                .map(|name| format!("step3.gateway.v1.{service}/{name}")),
        );
    }
    methods.push("grpc.health.v1.Health/Check".into());
    let missing: Vec<&String> = methods.iter().filter(|m| !names(&examples, m)).collect();
    assert!(
        missing.is_empty(),
        "README.md has no grpcurl example for {missing:?}"
    );
}

fn run(script: &str, vars: &BTreeMap<&str, String>) -> Output {
    let grpcurl = venv_program("grpcurl");
    let bin = grpcurl.parent().unwrap();
    let path = match std::env::var_os("PATH") {
        Some(path) => {
            let mut dirs = vec![bin.to_path_buf()];
            dirs.extend(std::env::split_paths(&path));
            std::env::join_paths(dirs).unwrap()
        }
        None => bin.as_os_str().to_owned(),
    };
    let mut command = Command::new("sh");
    command.arg("-ec").arg(script).env("PATH", path);
    // The variables are the child's alone; one the examples have not set yet is unset.
    for name in VARIABLES {
        match vars.get(name) {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command.output().unwrap()
}

/// The JSON messages grpcurl printed (several for a stream), none for `list`/`describe`.
fn messages(stdout: &str) -> Vec<Value> {
    if !stdout.trim_start().starts_with('{') {
        return Vec::new();
    }
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}):\n{stdout}"))
}

/// Picks up the ids the README's later examples use.
fn remember(answer: &Value, vars: &mut BTreeMap<&str, String>) {
    if let (Some(secret), Some(id)) = (answer["secret"].as_str(), answer["key"]["id"].as_str()) {
        vars.insert("KEY", secret.to_owned());
        vars.insert("KEY_ID", id.to_owned());
    }
    if let Some(id) = answer["id"].as_str().filter(|id| id.starts_with("usr_")) {
        vars.insert("USER_ID", id.to_owned());
    }
}

#[tokio::test]
async fn the_readme_grpcurl_examples_run_against_a_live_gateway() {
    // The README's TestAlert example names a channel `ops`; its image URL is example.com,
    // and the test machines have no DNS: the gateway would refuse it as a name it cannot
    // resolve (`image_policy.resolve_hosts`).
    let receiver = crate::alerts::Receiver::start().await;
    let ops = crate::alerts::webhook("ops", &format!("{}/ops", receiver.url));
    let gw = TestGateway::builder()
        .embedding_backend()
        .config(move |c| {
            c.alerts.channels = vec![ops];
            c.image_policy.resolve_hosts = false;
        })
        .start()
        .await;
    let key = gw.create_key(json!({})).await;
    let addr = gw
        .running()
        .grpc_url()
        .trim_start_matches("http://")
        .to_owned();
    let mut vars = BTreeMap::from([
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("KEY", key.secret.clone()),
        ("USER_ID", key.user_id.clone()),
        ("KEY_ID", key.id.clone()),
    ]);
    let examples = examples(&readme());
    assert!(examples.len() >= 20, "{} examples", examples.len());
    for example in examples {
        assert!(
            example.contains(README_ADDR),
            "an example without `{README_ADDR}`:\n{example}"
        );
        for name in VARIABLES {
            assert!(
                !names(&example, &format!("${name}")) || vars.contains_key(name),
                "`${name}` is not set by the examples before this one:\n{example}"
            );
        }
        let script = example.replace(README_ADDR, &addr);
        let env = vars.clone();
        let output = tokio::task::spawn_blocking(move || run(&script, &env))
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && !stdout.trim().is_empty(),
            "this README example failed ({}):\n{example}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
        let answers = messages(&stdout);
        for answer in &answers {
            remember(answer, &mut vars);
        }
        match answers.last().and_then(|a| a["nextPageToken"].as_str()) {
            Some(token) if !token.is_empty() => vars.insert("PAGE_TOKEN", token.to_owned()),
            _ => vars.remove("PAGE_TOKEN"),
        };
    }

    // The examples did what the README says they do.
    let user_id = &vars["USER_ID"];
    let key_id = &vars["KEY_ID"];
    assert_ne!(user_id, &key.user_id, "no example made a user");
    assert_ne!(key_id, &key.id, "no example made a key");
    let (_, user) = gw
        .admin(Method::GET, &format!("/users/{user_id}"), None)
        .await;
    assert_eq!(user["name"], "Partner Company", "{user}");
    assert!(user["email"].is_null(), "{user}");
    assert_eq!(user["active"], false, "{user}");
    let (_, made) = gw
        .admin(Method::GET, &format!("/keys/{key_id}"), None)
        .await;
    assert_eq!(made["user_id"], user_id.as_str(), "{made}");
    assert_eq!(made["rpm_limit"], 10, "{made}");
    assert!(made["token_quota"].is_null(), "{made}");
    assert_eq!(made["request_quota"], 100000, "{made}");
    assert!(made["previous_secret_valid_until"].is_i64(), "{made}");
    assert!(made["revoked_at"].is_i64(), "{made}");
    // The model examples were charged to the harness key: three answers, a stream and an
    // embedding.
    let usage = gw.usage(&key.secret).await;
    assert_eq!(usage["requests"]["used"], 5, "{usage}");
    assert_eq!(receiver.at("/ops")[0].body["event"], "test");
}
