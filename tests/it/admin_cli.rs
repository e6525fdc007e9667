//! `step3-gateway admin` against a fake in-process Admin server: proves the client side
//! (requests, bearer metadata, JSON output, error lines) without the real service.

use std::process::Command;
use std::sync::{Arc, Mutex};

use clap::Parser;
use prost::Message;
use serde_json::Value;
use step3_gateway::admin_client;
use step3_gateway::cli::{Cli, Command as CliCommand};
use step3_gateway::grpc::pb::{self, admin_server::Admin, admin_server::AdminServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

const TOKEN: &str = "cli-admin-token-0123456789";

/// One call as the fake saw it.
struct Seen {
    rpc: &'static str,
    authorization: Option<String>,
    /// The request, encoded; `FakeServer::request` decodes it as the type the test expects.
    request: Vec<u8>,
}

#[derive(Clone, Default)]
struct FakeAdmin {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeAdmin {
    fn answer<Req: Message, Resp>(
        &self,
        rpc: &'static str,
        request: Request<Req>,
        answer: Result<Resp, Status>,
    ) -> Result<Response<Resp>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.seen.lock().unwrap().push(Seen {
            rpc,
            authorization,
            request: request.get_ref().encode_to_vec(),
        });
        answer.map(Response::new)
    }
}

fn user() -> pb::User {
    pb::User {
        id: "usr_1".into(),
        name: "Partner Co".into(),
        email: Some("ops@partner.example".into()),
        active: true,
        created_at: 1_767_225_600,
        updated_at: 1_767_225_600,
        ..Default::default()
    }
}

fn key() -> pb::Key {
    pb::Key {
        id: "key_1".into(),
        user_id: "usr_1".into(),
        name: "prod".into(),
        prefix: "sk-step3-ab".into(),
        rpm_limit: Some(60),
        models: vec!["stepfun-ai/Step3-VL-10B".into()],
        active: true,
        ..Default::default()
    }
}

fn created_key() -> pb::CreatedKey {
    pb::CreatedKey {
        key: Some(key()),
        secret: "sk-step3-secret".into(),
    }
}

#[tonic::async_trait]
impl Admin for FakeAdmin {
    async fn create_user(
        &self,
        r: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.answer("CreateUser", r, Ok(user()))
    }
    async fn get_user(&self, r: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        let answer = if r.get_ref().id == "usr_missing" {
            Err(Status::not_found("no user usr_missing"))
        } else {
            Ok(user())
        };
        self.answer("GetUser", r, answer)
    }
    async fn list_users(
        &self,
        r: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.answer(
            "ListUsers",
            r,
            Ok(pb::ListUsersResponse {
                users: vec![user()],
            }),
        )
    }
    async fn update_user(
        &self,
        r: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.answer("UpdateUser", r, Ok(user()))
    }
    async fn deactivate_user(
        &self,
        r: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        self.answer("DeactivateUser", r, Ok(user()))
    }
    async fn create_key(
        &self,
        r: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreatedKey>, Status> {
        self.answer("CreateKey", r, Ok(created_key()))
    }
    async fn get_key(&self, r: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        self.answer("GetKey", r, Ok(key()))
    }
    async fn list_keys(
        &self,
        r: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        // A page of 1000 is more than a pipe holds: the reader may leave mid-answer.
        let count = if r.get_ref().page_size == 1000 {
            1000
        } else {
            1
        };
        let page = pb::ListKeysResponse {
            keys: vec![key(); count],
            next_page_token: "page-2".into(),
        };
        self.answer("ListKeys", r, Ok(page))
    }
    async fn update_key(
        &self,
        r: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.answer("UpdateKey", r, Ok(key()))
    }
    async fn revoke_key(
        &self,
        r: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.answer("RevokeKey", r, Ok(key()))
    }
    async fn rotate_key(
        &self,
        r: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::CreatedKey>, Status> {
        self.answer("RotateKey", r, Ok(created_key()))
    }
    async fn get_usage(
        &self,
        r: Request<pb::GetUsageReportRequest>,
    ) -> Result<Response<pb::UsageReport>, Status> {
        let report = pb::UsageReport {
            from: 100,
            to: 200,
            requests: 3,
            ..Default::default()
        };
        self.answer("GetUsage", r, Ok(report))
    }
    async fn list_calls(
        &self,
        r: Request<pb::ListCallsRequest>,
    ) -> Result<Response<pb::ListCallsResponse>, Status> {
        self.answer("ListCalls", r, Ok(pb::ListCallsResponse::default()))
    }

    async fn test_alert(
        &self,
        r: Request<pb::TestAlertRequest>,
    ) -> Result<Response<pb::TestAlertResponse>, Status> {
        self.answer("TestAlert", r, Ok(pb::TestAlertResponse::default()))
    }
    async fn add_price(
        &self,
        r: Request<pb::AddPriceRequest>,
    ) -> Result<Response<pb::Price>, Status> {
        self.answer("AddPrice", r, Ok(pb::Price::default()))
    }
    async fn list_prices(
        &self,
        r: Request<pb::ListPricesRequest>,
    ) -> Result<Response<pb::ListPricesResponse>, Status> {
        self.answer("ListPrices", r, Ok(pb::ListPricesResponse::default()))
    }
    async fn get_invoice(
        &self,
        r: Request<pb::GetInvoiceRequest>,
    ) -> Result<Response<pb::Invoice>, Status> {
        self.answer("GetInvoice", r, Ok(pb::Invoice::default()))
    }

    async fn list_models(
        &self,
        r: Request<pb::ListCatalogueRequest>,
    ) -> Result<Response<pb::ListCatalogueResponse>, Status> {
        self.answer("ListModels", r, Ok(pb::ListCatalogueResponse::default()))
    }
    async fn get_model(
        &self,
        r: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::CatalogueModel>, Status> {
        self.answer("GetModel", r, Ok(pb::CatalogueModel::default()))
    }
    async fn put_model(
        &self,
        r: Request<pb::CatalogueModel>,
    ) -> Result<Response<pb::CatalogueModel>, Status> {
        let model = r.get_ref().clone();
        self.answer("PutModel", r, Ok(model))
    }
    async fn delete_model(
        &self,
        r: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::CatalogueModel>, Status> {
        self.answer("DeleteModel", r, Ok(pb::CatalogueModel::default()))
    }

    async fn list_audit(
        &self,
        r: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.answer("ListAudit", r, Ok(pb::ListAuditResponse::default()))
    }

    type BackupStream = futures_util::stream::Empty<Result<pb::BackupChunk, Status>>;

    async fn backup(
        &self,
        r: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        self.answer("Backup", r, Ok(futures_util::stream::empty()))
    }
}

/// The fake on 127.0.0.1:0, stopped through a oneshot.
struct FakeServer {
    url: String,
    admin: FakeAdmin,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl FakeServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let admin = FakeAdmin::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::builder()
            .add_service(AdminServer::new(admin.clone()))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            });
        FakeServer {
            url,
            admin,
            stop,
            task: tokio::spawn(server),
        }
    }

    /// Runs `step3-gateway admin --url … --token … <args>` in-process; returns what it printed.
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let argv = [
            "step3-gateway",
            "admin",
            "--url",
            &self.url,
            "--token",
            TOKEN,
        ]
        .into_iter()
        .chain(args.iter().copied());
        let CliCommand::Admin(admin) = Cli::try_parse_from(argv)?.command else {
            anyhow::bail!("not an admin command");
        };
        let mut out = Vec::new();
        admin_client::run(*admin, &mut out).await?;
        Ok(String::from_utf8(out)?)
    }

    fn last(&self) -> (&'static str, Option<String>) {
        let seen = self.admin.seen.lock().unwrap();
        let last = seen.last().unwrap();
        (last.rpc, last.authorization.clone())
    }

    fn request<T: Message + Default>(&self) -> T {
        T::decode(
            self.admin
                .seen
                .lock()
                .unwrap()
                .last()
                .unwrap()
                .request
                .as_slice(),
        )
        .unwrap()
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn keys_create_sends_the_admin_token_and_prints_the_created_key() {
    let server = FakeServer::start().await;
    let out = server
        .run(&[
            "keys",
            "create",
            "--user",
            "usr_1",
            "--name",
            "prod",
            "--rpm",
            "60",
            "--expires-in",
            "30d",
            "--model",
            "a",
            "--model",
            "b",
        ])
        .await
        .unwrap();

    assert_eq!(
        server.last(),
        ("CreateKey", Some(format!("Bearer {TOKEN}")))
    );
    let sent: pb::CreateKeyRequest = server.request();
    assert_eq!(sent.user_id, "usr_1");
    assert_eq!(sent.rpm_limit, Some(60));
    assert_eq!(sent.expires_in.as_deref(), Some("30d"));
    assert_eq!(sent.models, ["a", "b"]);

    assert!(
        out.ends_with("}\n") && out.contains("\n  \"secret\""),
        "not pretty: {out}"
    );
    let printed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["secret"], "sk-step3-secret");
    // REST's shape: the key's fields and the secret side by side, the counters flat.
    assert_eq!(printed["id"], "key_1");
    assert_eq!(printed["rpm_limit"], 60);
    assert_eq!(printed["token_quota"], Value::Null);
    assert_eq!(
        printed["models"],
        serde_json::json!(["stepfun-ai/Step3-VL-10B"])
    );
    assert_eq!(printed["requests_used"], 0);
    assert!(printed.get("key").is_none(), "{printed}");
    server.stop().await;
}

#[tokio::test]
async fn every_admin_rpc_is_reachable_from_the_command_line() {
    let server = FakeServer::start().await;
    let cases: [(&[&str], &str); 13] = [
        (&["users", "list"], "ListUsers"),
        (&["users", "create", "--name", "Ada"], "CreateUser"),
        (&["users", "get", "usr_1"], "GetUser"),
        (&["users", "update", "usr_1", "--clear-email"], "UpdateUser"),
        (&["users", "deactivate", "usr_1"], "DeactivateUser"),
        (
            &["keys", "list", "--user", "usr_1", "--page-token", "page-2"],
            "ListKeys",
        ),
        (&["keys", "create", "--user", "usr_1"], "CreateKey"),
        (&["keys", "get", "key_1"], "GetKey"),
        (
            &["keys", "update", "key_1", "--clear", "rpm_limit"],
            "UpdateKey",
        ),
        (&["keys", "revoke", "key_1"], "RevokeKey"),
        (
            &["keys", "rotate", "key_1", "--grace-seconds", "0"],
            "RotateKey",
        ),
        (
            &["usage", "--key", "key_1", "--group-by", "day"],
            "GetUsage",
        ),
        (&["calls", "--status", "500"], "ListCalls"),
    ];
    for (args, rpc) in cases {
        let out = server.run(args).await.unwrap();
        assert_eq!(
            server.last(),
            (rpc, Some(format!("Bearer {TOKEN}"))),
            "{args:?}"
        );
        let _: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
    }
    // Spot checks that what was parsed is what went over the wire.
    let calls: pb::ListCallsRequest = server.request();
    assert_eq!(calls.status, Some(500));
    server
        .run(&["keys", "rotate", "key_1", "--grace-seconds", "0"])
        .await
        .unwrap();
    let rotate: pb::RotateKeyRequest = server.request();
    assert_eq!(rotate.grace_seconds, Some(0));
    server.stop().await;
}

#[tokio::test]
async fn the_binary_reads_its_env_prints_json_and_reports_grpc_errors() {
    let server = FakeServer::start().await;
    let binary = |args: &'static [&'static str]| {
        let url = server.url.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_step3-gateway"))
                .args(args)
                .env("STEP3GW_ADMIN_URL", url)
                .env("STEP3GW_ADMIN_TOKEN", TOKEN)
                .output()
                .unwrap()
        })
    };

    let ok = binary(&["admin", "keys", "list"]).await.unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let printed: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(printed["next_page_token"], "page-2");
    assert_eq!(server.last(), ("ListKeys", Some(format!("Bearer {TOKEN}"))));

    let missing = binary(&["admin", "users", "get", "usr_missing"])
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "step3-gateway: NotFound: no user usr_missing\n"
    );

    let usage = binary(&["admin", "usage"]).await.unwrap();
    assert_eq!(usage.status.code(), Some(2), "a usage error is clap's");
    server.stop().await;
}

#[tokio::test]
async fn url_and_token_may_follow_the_subcommand() {
    let server = FakeServer::start().await;
    let argv = [
        "step3-gateway",
        "admin",
        "users",
        "list",
        "--url",
        &server.url,
        "--token",
        TOKEN,
    ];
    let CliCommand::Admin(admin) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not an admin command");
    };
    let mut out = Vec::new();
    admin_client::run(*admin, &mut out).await.unwrap();
    assert_eq!(
        server.last(),
        ("ListUsers", Some(format!("Bearer {TOKEN}")))
    );
    server.stop().await;
}

/// `step3-gateway <args>` with no `STEP3GW_*` variable of the test's environment.
fn binary(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_step3-gateway"));
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STEP3GW_") {
            command.env_remove(name);
        }
    }
    command
}

#[tokio::test]
async fn command_line_errors_say_each_thing_once() {
    let run = |args: &'static [&'static str]| {
        tokio::task::spawn_blocking(move || binary(args).output().unwrap())
    };
    // Not a URL: a usage error, before anything is sent.
    let bad_url = run(&["admin", "--url", "foo", "--token", "t", "users", "list"])
        .await
        .unwrap();
    assert_eq!(bad_url.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad_url.stderr);
    assert!(
        stderr.contains("'foo'") && stderr.contains("http://"),
        "{stderr}"
    );

    // No token: a usage error that says where a token comes from.
    let no_token = run(&["admin", "users", "list"]).await.unwrap();
    assert_eq!(no_token.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&no_token.stderr);
    assert!(stderr.contains("STEP3GW_ADMIN_TOKEN"), "{stderr}");

    // Nothing listening: one line, no cause repeated.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url: &'static str = format!("http://{}", closed.local_addr().unwrap()).leak();
    drop(closed);
    let refused = tokio::task::spawn_blocking(move || {
        binary(&["admin", "users", "list", "--url", url, "--token", "t"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        stderr.starts_with(&format!("step3-gateway: cannot connect to {url}")),
        "{stderr}"
    );
    let parts: Vec<&str> = stderr.trim_end().split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..]
                .iter()
                .any(|later| later.contains(part) || part.contains(later)),
            "repeated: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_reader_that_leaves_early_gets_no_broken_pipe_message() {
    use std::io::{BufRead, BufReader};
    let server = FakeServer::start().await;
    let url = server.url.clone();
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = binary(&[
            "admin",
            "keys",
            "list",
            "--page-size",
            "1000",
            "--url",
            &url,
            "--token",
            TOKEN,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        // As `| head -1`: one line, then the pipe is closed.
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert_eq!(first, "{\n");
        let output = child.wait_with_output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?} {stderr}");
    assert_eq!(stderr, "");
    server.stop().await;
}
