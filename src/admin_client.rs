//! `step3-gateway admin`: turns the command line into Admin RPCs against a running gateway
//! and prints each answer as pretty JSON.

use std::io::Write;

use anyhow::Context as _;
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::cli::{
    AdminArgs, AdminCommand, AlertsCommand, CallsArgs, KeyLimitArgs, KeysCommand, ModelsCommand,
    PricesCommand, UsageArgs, UsageGroupingArg, UsersCommand,
};
use crate::core::access::IpAllowlist;
use crate::core::admin::{CreatedKey, KeyPage, KeyView};
use crate::core::catalogue::ModelRecord;
use crate::core::limits::KeyLimits;
use crate::core::money::Money;
use crate::core::records::KeyCounters;
use crate::grpc::convert::{catalogue_model_from, catalogue_model_proto};
use crate::grpc::pb::{self, admin_client::AdminClient, get_usage_report_request::Subject};

/// One Admin RPC with its request, built from the command line before anything is sent.
#[derive(Clone, Debug, PartialEq)]
pub enum AdminRequest {
    ListUsers(pb::ListUsersRequest),
    CreateUser(pb::CreateUserRequest),
    GetUser(pb::GetUserRequest),
    UpdateUser(pb::UpdateUserRequest),
    DeactivateUser(pb::DeactivateUserRequest),
    ListKeys(pb::ListKeysRequest),
    CreateKey(pb::CreateKeyRequest),
    GetKey(pb::GetKeyRequest),
    UpdateKey(pb::UpdateKeyRequest),
    RevokeKey(pb::RevokeKeyRequest),
    RotateKey(pb::RotateKeyRequest),
    GetUsage(pb::GetUsageReportRequest),
    ListCalls(pb::ListCallsRequest),
    TestAlert(pb::TestAlertRequest),
    AddPrice(pb::AddPriceRequest),
    ListPrices(pb::ListPricesRequest),
    /// With `csv`: printed as CSV lines.
    GetInvoice(pb::GetInvoiceRequest, bool),
    ListModels(pb::ListCatalogueRequest),
    GetModel(pb::GetModelRequest),
    PutModel(pb::CatalogueModel),
    DeleteModel(pb::DeleteModelRequest),
    ListAudit(pb::ListAuditRequest),
}

impl From<AdminCommand> for AdminRequest {
    fn from(command: AdminCommand) -> Self {
        match command {
            AdminCommand::Users(users) => users.into(),
            AdminCommand::Keys(keys) => keys.into(),
            AdminCommand::Usage(usage) => AdminRequest::GetUsage(usage.into()),
            AdminCommand::Calls(calls) => AdminRequest::ListCalls(calls.into()),
            AdminCommand::Models(models) => match models {
                ModelsCommand::List => AdminRequest::ListModels(pb::ListCatalogueRequest {}),
                ModelsCommand::Get { name } => AdminRequest::GetModel(pb::GetModelRequest { name }),
                ModelsCommand::Put { file } => AdminRequest::PutModel(catalogue_model_proto(file)),
                ModelsCommand::Delete { name } => {
                    AdminRequest::DeleteModel(pb::DeleteModelRequest { name })
                }
            },
            AdminCommand::Alerts(AlertsCommand::Test { channel }) => {
                AdminRequest::TestAlert(pb::TestAlertRequest {
                    channel: channel.unwrap_or_default(),
                })
            }
            AdminCommand::Prices(PricesCommand::List { model }) => {
                AdminRequest::ListPrices(pb::ListPricesRequest { model })
            }
            AdminCommand::Prices(PricesCommand::Add(p)) => {
                AdminRequest::AddPrice(pb::AddPriceRequest {
                    model: p.model,
                    effective_from: p.effective_from,
                    prompt_per_million: p.prompt_per_million,
                    completion_per_million: p.completion_per_million,
                    per_second: p.per_second,
                    per_call_minimum: p.per_call_minimum,
                    images: p.images.into_iter().collect(),
                })
            }
            AdminCommand::Invoice(i) => AdminRequest::GetInvoice(
                pb::GetInvoiceRequest {
                    user_id: i.user_id,
                    from: i.from,
                    to: i.to,
                },
                i.csv,
            ),
            AdminCommand::Audit(page) => AdminRequest::ListAudit(pb::ListAuditRequest {
                page_size: page.page_size,
                page_token: page.page_token,
            }),
        }
    }
}

impl From<UsersCommand> for AdminRequest {
    fn from(command: UsersCommand) -> Self {
        match command {
            UsersCommand::List => AdminRequest::ListUsers(pb::ListUsersRequest {}),
            UsersCommand::Create {
                name,
                email,
                subject,
                limits,
            } => AdminRequest::CreateUser(pb::CreateUserRequest {
                name,
                email,
                subject,
                rpm_limit: limits.rpm_limit,
                tpm_limit: limits.tpm_limit,
                max_concurrent: limits.max_concurrent,
                allowed_ips: limits.allowed_ips,
                budget: limits.budget,
                period: limits.period,
            }),
            UsersCommand::Get { id } => AdminRequest::GetUser(pb::GetUserRequest { id }),
            UsersCommand::Update(args) => AdminRequest::UpdateUser(pb::UpdateUserRequest {
                id: args.id,
                name: args.name,
                email: args.email,
                subject: args.subject,
                active: args.active,
                rpm_limit: args.limits.rpm_limit,
                tpm_limit: args.limits.tpm_limit,
                max_concurrent: args.limits.max_concurrent,
                allowed_ips: args.limits.allowed_ips,
                budget: args.limits.budget,
                period: args.limits.period,
                clear: args
                    .clear_email
                    .then_some("email")
                    .into_iter()
                    .map(str::to_owned)
                    .chain(args.clear)
                    .collect(),
            }),
            UsersCommand::Deactivate { id } => {
                AdminRequest::DeactivateUser(pb::DeactivateUserRequest { id })
            }
        }
    }
}

impl From<KeysCommand> for AdminRequest {
    fn from(command: KeysCommand) -> Self {
        match command {
            KeysCommand::List { user_id, page } => AdminRequest::ListKeys(pb::ListKeysRequest {
                user_id,
                page_size: page.page_size,
                page_token: page.page_token,
            }),
            KeysCommand::Create(args) => {
                let KeyLimitArgs {
                    rpm_limit,
                    tpm_limit,
                    max_concurrent,
                    image_quota,
                    max_images_per_request,
                    request_quota,
                    token_quota,
                    expires_in,
                    expires_at,
                    models,
                    allowed_ips,
                    budget,
                    period,
                    cache,
                } = args.limits;
                AdminRequest::CreateKey(pb::CreateKeyRequest {
                    budget,
                    period,
                    user_id: args.user_id,
                    name: args.name,
                    rpm_limit,
                    tpm_limit,
                    max_concurrent,
                    image_quota,
                    max_images_per_request,
                    request_quota,
                    token_quota,
                    expires_at,
                    expires_in,
                    models,
                    allowed_ips,
                    cache,
                })
            }
            KeysCommand::Get { id } => AdminRequest::GetKey(pb::GetKeyRequest { id }),
            KeysCommand::Update(args) => {
                let KeyLimitArgs {
                    rpm_limit,
                    tpm_limit,
                    max_concurrent,
                    image_quota,
                    max_images_per_request,
                    request_quota,
                    token_quota,
                    expires_in,
                    expires_at,
                    models,
                    allowed_ips,
                    budget,
                    period,
                    cache,
                } = args.limits;
                AdminRequest::UpdateKey(pb::UpdateKeyRequest {
                    budget,
                    period,
                    id: args.id,
                    name: args.name,
                    rpm_limit,
                    tpm_limit,
                    max_concurrent,
                    image_quota,
                    max_images_per_request,
                    request_quota,
                    token_quota,
                    expires_at,
                    expires_in,
                    models,
                    allowed_ips,
                    cache,
                    active: args.active,
                    clear: args.clear,
                })
            }
            KeysCommand::Revoke { id } => AdminRequest::RevokeKey(pb::RevokeKeyRequest { id }),
            KeysCommand::Rotate { id, grace_seconds } => {
                AdminRequest::RotateKey(pb::RotateKeyRequest { id, grace_seconds })
            }
        }
    }
}

impl From<UsageArgs> for pb::GetUsageReportRequest {
    fn from(args: UsageArgs) -> Self {
        // clap's `subject` group guarantees exactly one of the two.
        let subject = match (args.key_id, args.user_id) {
            (Some(key), _) => Some(Subject::KeyId(key)),
            (None, user) => user.map(Subject::UserId),
        };
        let group_by = match args.group_by {
            None => pb::UsageGrouping::Unspecified,
            Some(UsageGroupingArg::Hour) => pb::UsageGrouping::Hour,
            Some(UsageGroupingArg::Day) => pb::UsageGrouping::Day,
            Some(UsageGroupingArg::Month) => pb::UsageGrouping::Month,
        };
        pb::GetUsageReportRequest {
            subject,
            from: args.from,
            to: args.to,
            group_by: group_by.into(),
            by_model: args.by_model,
            by_key: args.by_key,
        }
    }
}

impl From<CallsArgs> for pb::ListCallsRequest {
    fn from(args: CallsArgs) -> Self {
        pb::ListCallsRequest {
            key_id: args.key_id,
            user_id: args.user_id,
            model: args.model,
            status: args.status,
            from: args.from,
            page_size: args.page.page_size,
            page_token: args.page.page_token,
        }
    }
}

/// Puts `authorization: Bearer <admin token>` on every call.
#[derive(Clone, Debug)]
pub struct BearerAuth(MetadataValue<Ascii>);

impl BearerAuth {
    pub fn new(token: &str) -> anyhow::Result<Self> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .context("the admin token must be printable ASCII")?;
        // Keeps the token out of HTTP/2 header compression tables and debug output.
        value.set_sensitive(true);
        Ok(BearerAuth(value))
    }
}

impl Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        // The audit log tells the CLI's changes from other gRPC clients'.
        request.metadata_mut().insert(
            crate::grpc::ADMIN_CLIENT_HEADER,
            MetadataValue::from_static("cli"),
        );
        Ok(request)
    }
}

type Client = AdminClient<InterceptedService<Channel, BearerAuth>>;

/// What to say when no admin token was given.
pub const MISSING_TOKEN: &str = "no admin token: pass --token <TOKEN> or set STEP3GW_ADMIN_TOKEN (a lost token: \
     `step3-gateway admin-token reset`, with the gateway stopped)";

/// Runs one admin command against the gateway at `args.url` and writes the answer to `out`.
///
/// A gRPC error comes back as `<code>: <message>` (e.g. `NotFound: no such key`).
pub async fn run(args: AdminArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let token = args.token.as_deref().context(MISSING_TOKEN)?;
    let auth = BearerAuth::new(token)?;
    let request = AdminRequest::from(args.command);
    let channel = Endpoint::from_shared(args.url.clone())
        .with_context(|| format!("invalid --url `{}`", args.url))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.url))?;
    let mut client = AdminClient::with_interceptor(channel, auth);
    send(&mut client, request, out).await
}

async fn send(
    client: &mut Client,
    request: AdminRequest,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match request {
        AdminRequest::ListUsers(r) => print(out, client.list_users(r).await),
        AdminRequest::CreateUser(r) => print(out, client.create_user(r).await),
        AdminRequest::GetUser(r) => print(out, client.get_user(r).await),
        AdminRequest::UpdateUser(r) => print(out, client.update_user(r).await),
        AdminRequest::DeactivateUser(r) => print(out, client.deactivate_user(r).await),
        AdminRequest::ListKeys(r) => print(out, client.list_keys(r).await.map(page_view)),
        AdminRequest::CreateKey(r) => print(out, client.create_key(r).await.map(created_view)),
        AdminRequest::GetKey(r) => print(out, client.get_key(r).await.map(key_view)),
        AdminRequest::UpdateKey(r) => print(out, client.update_key(r).await.map(key_view)),
        AdminRequest::RevokeKey(r) => print(out, client.revoke_key(r).await.map(key_view)),
        AdminRequest::RotateKey(r) => print(out, client.rotate_key(r).await.map(created_view)),
        AdminRequest::GetUsage(r) => print(out, client.get_usage(r).await),
        AdminRequest::ListCalls(r) => print(out, client.list_calls(r).await),
        AdminRequest::AddPrice(r) => print(out, client.add_price(r).await),
        AdminRequest::ListPrices(r) => print(out, client.list_prices(r).await),
        AdminRequest::GetInvoice(r, false) => print(out, client.get_invoice(r).await),
        AdminRequest::GetInvoice(r, true) => {
            let invoice = client.get_invoice(r).await?.into_inner();
            out.write_all(invoice_csv(invoice).as_bytes())?;
            Ok(())
        }
        AdminRequest::ListModels(r) => print(out, client.list_models(r).await.map(models_view)),
        AdminRequest::GetModel(r) => print(out, client.get_model(r).await.map(model_view)),
        AdminRequest::PutModel(r) => print(out, client.put_model(r).await.map(model_view)),
        AdminRequest::DeleteModel(r) => print(out, client.delete_model(r).await.map(model_view)),
        AdminRequest::ListAudit(r) => print(out, client.list_audit(r).await),
        AdminRequest::TestAlert(r) => {
            let answer = client.test_alert(r).await;
            let failed = answer.as_ref().map_or(0, |a| {
                a.get_ref()
                    .deliveries
                    .iter()
                    .filter(|d| !d.delivered)
                    .count()
            });
            print(out, answer)?;
            if failed > 0 {
                anyhow::bail!(
                    "{failed} test message{} not delivered",
                    if failed == 1 { " was" } else { "s were" }
                );
            }
            Ok(())
        }
    }
}

// A key is printed as REST answers with it (core's `KeyView`, whose field names are the
// proto's): one shape for a key in `curl`, the CLI and grpcurl. Users, usage reports and
// the call log are printed as their proto messages, whose names REST shares.

/// A model is printed as REST answers with it (core's `ModelRecord`).
fn model_view(response: tonic::Response<pb::CatalogueModel>) -> tonic::Response<ModelRecord> {
    response.map(model_from_proto)
}

fn models_view(
    response: tonic::Response<pb::ListCatalogueResponse>,
) -> tonic::Response<serde_json::Value> {
    response.map(|list| {
        let models: Vec<ModelRecord> = list.models.into_iter().map(model_from_proto).collect();
        serde_json::json!({ "models": models })
    })
}

fn model_from_proto(model: pb::CatalogueModel) -> ModelRecord {
    let name = model.name.clone();
    // The gateway sent it: a weight it could not have stored is shown as no rollout.
    catalogue_model_from(model).unwrap_or_else(|_| ModelRecord {
        name,
        aliases: Vec::new(),
        versions: Vec::new(),
        default_version: String::new(),
        rollout: None,
        created_at: 0,
        updated_at: 0,
    })
}

fn key_view(response: tonic::Response<pb::Key>) -> tonic::Response<KeyView> {
    response.map(key_from_proto)
}

fn created_view(response: tonic::Response<pb::CreatedKey>) -> tonic::Response<CreatedKey> {
    response.map(|created| CreatedKey {
        key: key_from_proto(created.key.unwrap_or_default()),
        secret: created.secret,
    })
}

fn page_view(response: tonic::Response<pb::ListKeysResponse>) -> tonic::Response<KeyPage> {
    response.map(|page| KeyPage {
        keys: page.keys.into_iter().map(key_from_proto).collect(),
        next_page_token: page.next_page_token,
    })
}

/// An invoice as the REST door's CSV writes it.
fn invoice_csv(invoice: pb::Invoice) -> String {
    let money = |text: &str| Money::parse(text).unwrap_or_default();
    crate::core::billing::Invoice {
        user_id: invoice.user_id,
        user_name: invoice.user_name,
        currency: invoice.currency,
        from: invoice.from,
        to: invoice.to,
        total: money(&invoice.total),
        lines: invoice
            .lines
            .into_iter()
            .map(|l| crate::core::billing::InvoiceLine {
                cost: money(&l.cost),
                key_id: l.key_id,
                key_name: l.key_name,
                model: l.model,
                version: l.version,
                requests: l.requests,
                prompt_tokens: l.prompt_tokens,
                completion_tokens: l.completion_tokens,
                images: l.images,
            })
            .collect(),
    }
    .to_csv()
}

/// The inverse of the gRPC door's `Key` conversion.
fn key_from_proto(key: pb::Key) -> KeyView {
    KeyView {
        id: key.id,
        user_id: key.user_id,
        name: key.name,
        prefix: key.prefix,
        limits: KeyLimits {
            rpm_limit: key.rpm_limit,
            tpm_limit: key.tpm_limit,
            max_concurrent: key.max_concurrent,
            request_quota: key.request_quota,
            token_quota: key.token_quota,
            image_quota: key.image_quota,
            max_images_per_request: key.max_images_per_request,
            allowed_ips: (!key.allowed_ips.is_empty())
                .then(|| IpAllowlist::parse(&key.allowed_ips).ok())
                .flatten(),
            budget: key.budget.as_deref().and_then(|b| Money::parse(b).ok()),
            period: key.period.as_deref().and_then(|p| p.parse().ok()),
            cache: key.cache,
        },
        expires_at: key.expires_at,
        // The proto cannot tell "no allowlist" from an empty one; the gateway sends an
        // empty list for the first (every model), which REST shows as `null`.
        models: Some(key.models).filter(|models| !models.is_empty()),
        active: key.active,
        created_at: key.created_at,
        updated_at: key.updated_at,
        revoked_at: key.revoked_at,
        previous_secret_valid_until: key.previous_secret_valid_until,
        used: KeyCounters {
            requests: key.requests_used,
            prompt_tokens: key.prompt_tokens_used,
            completion_tokens: key.completion_tokens_used,
            images: key.images_used,
            cost: Money::parse(&key.cost_used).unwrap_or_default(),
        },
    }
}

fn print<T: Serialize>(
    out: &mut impl Write,
    answer: Result<tonic::Response<T>, tonic::Status>,
) -> anyhow::Result<()> {
    // The code's name (`NotFound`) as grpcurl shows it; tonic's `Display` is a sentence.
    let answer = answer.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
    // Rendered whole first, so that a closed pipe (`| head`) is a plain `io::Error` the
    // binary can recognise and stay quiet about.
    let mut text = serde_json::to_vec_pretty(answer.get_ref())?;
    text.push(b'\n');
    out.write_all(&text)?;
    out.flush()?;
    Ok(())
}

/// `step3-gateway backup` against a running gateway: the `Admin.Backup` stream written to
/// `out` (under a hidden name until complete), read back whole and checked before it is
/// kept. `progress` is told the bytes received and the total.
pub async fn backup(
    url: &str,
    token: &str,
    out: &std::path::Path,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<crate::core::export::ExportSummary> {
    let auth = BearerAuth::new(token)?;
    let channel = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("invalid --url `{url}`"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let mut client = AdminClient::with_interceptor(channel, auth);
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    let mut pieces = client
        .backup(pb::BackupRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let mut partial = crate::backup::PartialFile::create(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let (mut received, mut total) = (0u64, 0u64);
    while let Some(piece) = pieces.message().await.map_err(status)? {
        if piece.total_bytes > 0 {
            total = piece.total_bytes;
        }
        partial
            .file
            .write_all(&piece.data)
            .with_context(|| format!("cannot write {}", partial.partial_path().display()))?;
        received += piece.data.len() as u64;
        progress(received, total);
    }
    if received != total {
        anyhow::bail!("the copy ended after {received} of {total} bytes; no backup was written");
    }
    partial.file.flush()?;
    // A copy that cannot be restored is no backup: read it back before keeping it.
    let written = std::fs::File::open(partial.partial_path())?;
    let summary = crate::core::export::verify_export(std::io::BufReader::new(written))
        .context("the copy received is not a whole backup; none was written")?;
    partial
        .commit()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn request(args: &[&str]) -> AdminRequest {
        let argv = ["step3-gateway", "admin", "--token", "t"]
            .iter()
            .chain(args)
            .copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Admin(admin) => admin.command.into(),
            other => panic!("not an admin command: {other:?}"),
        }
    }

    fn usage_error(args: &[&str]) -> clap::error::ErrorKind {
        let argv = ["step3-gateway", "admin", "--token", "t"]
            .iter()
            .chain(args)
            .copied();
        Cli::try_parse_from(argv).unwrap_err().kind()
    }

    #[test]
    fn keys_create_carries_limits_lifetime_and_every_model() {
        let request = request(&[
            "keys",
            "create",
            "--user",
            "usr_1",
            "--name",
            "prod",
            "--rpm",
            "60",
            "--token-quota",
            "5000",
            "--expires-in",
            "30d",
            "--model",
            "a",
            "--model",
            "b",
        ]);
        assert_eq!(
            request,
            AdminRequest::CreateKey(pb::CreateKeyRequest {
                user_id: "usr_1".into(),
                name: "prod".into(),
                rpm_limit: Some(60),
                request_quota: None,
                token_quota: Some(5000),
                expires_at: None,
                expires_in: Some("30d".into()),
                models: vec!["a".into(), "b".into()],
                ..Default::default()
            })
        );
    }

    #[test]
    fn money_is_checked_before_it_is_sent() {
        let added = request(&[
            "prices",
            "add",
            "--model",
            "m",
            "--prompt",
            ".5",
            "--image",
            "small=0.001",
        ]);
        assert_eq!(
            added,
            AdminRequest::AddPrice(pb::AddPriceRequest {
                model: "m".into(),
                prompt_per_million: Some("0.50".into()),
                images: [("small".to_owned(), "0.001".to_owned())].into(),
                ..Default::default()
            })
        );
        assert_eq!(
            request(&[
                "keys", "update", "key_1", "--budget", "25", "--period", "month"
            ]),
            AdminRequest::UpdateKey(pb::UpdateKeyRequest {
                id: "key_1".into(),
                budget: Some("25.00".into()),
                period: Some("month".into()),
                ..Default::default()
            })
        );
        for bad in [
            &["keys", "update", "key_1", "--budget", "ten"][..],
            &["keys", "update", "key_1", "--period", "fortnight"],
            &["prices", "add", "--model", "m", "--image", "small"],
        ] {
            assert_eq!(usage_error(bad), clap::error::ErrorKind::ValueValidation);
        }
        assert_eq!(
            request(&["invoice", "--user", "usr_1", "--csv"]),
            AdminRequest::GetInvoice(
                pb::GetInvoiceRequest {
                    user_id: "usr_1".into(),
                    ..Default::default()
                },
                true
            )
        );
    }

    #[test]
    fn keys_update_sends_clears_by_their_proto_names() {
        let request = request(&[
            "keys",
            "update",
            "key_1",
            "--clear",
            "rpm_limit",
            "--clear",
            "models",
            "--token-quota",
            "10",
            "--active",
            "false",
        ]);
        assert_eq!(
            request,
            AdminRequest::UpdateKey(pb::UpdateKeyRequest {
                id: "key_1".into(),
                token_quota: Some(10),
                active: Some(false),
                clear: vec!["rpm_limit".into(), "models".into()],
                ..Default::default()
            })
        );
    }

    #[test]
    fn users_update_clear_email_becomes_a_clear_entry() {
        assert_eq!(
            request(&[
                "users",
                "update",
                "usr_1",
                "--clear-email",
                "--active",
                "true"
            ]),
            AdminRequest::UpdateUser(pb::UpdateUserRequest {
                id: "usr_1".into(),
                active: Some(true),
                clear: vec!["email".into()],
                ..Default::default()
            })
        );
    }

    #[test]
    fn usage_by_user_grouped_by_day() {
        assert_eq!(
            request(&[
                "usage",
                "--user",
                "usr_1",
                "--from",
                "100",
                "--group-by",
                "day",
                "--by-model"
            ]),
            AdminRequest::GetUsage(pb::GetUsageReportRequest {
                subject: Some(Subject::UserId("usr_1".into())),
                from: Some(100),
                to: None,
                group_by: pb::UsageGrouping::Day.into(),
                by_model: true,
                by_key: false,
            })
        );
    }

    #[test]
    fn calls_and_keys_list_pass_page_tokens_through() {
        assert_eq!(
            request(&[
                "calls",
                "--key",
                "key_1",
                "--status",
                "500",
                "--page-size",
                "20",
                "--page-token",
                "abc"
            ]),
            AdminRequest::ListCalls(pb::ListCallsRequest {
                key_id: Some("key_1".into()),
                status: Some(500),
                page_size: 20,
                page_token: "abc".into(),
                ..Default::default()
            })
        );
        assert_eq!(
            request(&["keys", "list"]),
            AdminRequest::ListKeys(pb::ListKeysRequest::default())
        );
    }

    #[test]
    fn contradictory_or_malformed_flags_are_usage_errors() {
        use clap::error::ErrorKind;
        assert_eq!(usage_error(&["usage"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            usage_error(&["usage", "--key", "k", "--user", "u"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            usage_error(&[
                "keys",
                "create",
                "--user",
                "u",
                "--expires-in",
                "1d",
                "--expires-at",
                "5"
            ]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            usage_error(&["users", "update", "u", "--email", "e", "--clear-email"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            usage_error(&["keys", "create", "--user", "u", "--expires-in", "soon"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            usage_error(&["keys", "update", "k", "--clear", "name"]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        assert!(BearerAuth::new("line\nbreak").is_err());
    }
}
