//! The `Admin` service: a thin adapter from proto to the core admin functions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{catalogue_model_from, catalogue_model_proto};
use super::{bearer, pb};
use crate::core::access::IpAllowlist;
use crate::core::admin::{
    CallFilter, CreatedKey, DEFAULT_ROTATION_GRACE_SECS, KeyFilter, KeyPatch, KeyView, NewKey,
    NewUser, TimeInput, UsageGrouping, UsageQuery, UsageReport, UsageSubject, UserPatch,
};
use crate::core::audit::{Actor, AuditRecord};
use crate::core::billing::NewPrice;
use crate::core::limits::{KeyLimits, LimitChanges, UserLimits};
use crate::core::money::Money;
use crate::core::period::Period;
use crate::core::pricing::PriceRecord;
use crate::core::records::{CallRecord, UserRecord};
use crate::core::{Gateway, GatewayError};
use crate::edge::client_addr::client_addr;

/// The limits a `CreateKeyRequest` or `UpdateKeyRequest` gives (they name them alike).
macro_rules! key_limits_of {
    ($r:expr) => {
        allowlist(&$r.allowed_ips).and_then(|allowed_ips| {
            Ok(KeyLimits {
                rpm_limit: $r.rpm_limit,
                tpm_limit: $r.tpm_limit,
                max_concurrent: $r.max_concurrent,
                request_quota: $r.request_quota,
                token_quota: $r.token_quota,
                image_quota: $r.image_quota,
                max_images_per_request: $r.max_images_per_request,
                allowed_ips,
                budget: money(&$r.budget, "budget")?,
                period: period(&$r.period)?,
                cache: $r.cache,
            })
        })
    };
}

/// An amount of money as the proto gives it (decimal text).
fn money(text: &Option<String>, field: &str) -> Result<Option<Money>, GatewayError> {
    text.as_deref()
        .map(|t| Money::parse(t).map_err(|e| GatewayError::invalid_request(e, Some(field))))
        .transpose()
}

/// A period as the proto gives it (`day`, `week`, `month`).
fn period(text: &Option<String>) -> Result<Option<Period>, GatewayError> {
    text.as_deref()
        .map(|t| {
            t.parse()
                .map_err(|e: String| GatewayError::invalid_request(e, Some("period")))
        })
        .transpose()
}

/// An allowlist as the proto gives it: empty is "not given" (a message cannot tell an
/// empty list from none; `clear` removes a list).
fn allowlist(entries: &[String]) -> Result<Option<IpAllowlist>, GatewayError> {
    if entries.is_empty() {
        return Ok(None);
    }
    IpAllowlist::parse(entries)
        .map(Some)
        .map_err(|e| GatewayError::invalid_request(e, Some("allowed_ips")))
}

pub struct AdminService {
    gateway: Arc<Gateway>,
}

impl AdminService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        AdminService { gateway }
    }

    /// Checks the admin token, then hands out the request's message.
    fn authorize<T>(&self, request: Request<T>) -> Result<T, Status> {
        self.gateway.authenticate_admin(
            bearer(request.metadata()),
            client_addr(request.extensions()),
        )?;
        Ok(request.into_inner())
    }

    /// [`Self::authorize`], and who is acting: the CLI says so in `x-admin-client`.
    fn authorize_actor<T>(&self, request: Request<T>) -> Result<(T, Actor), Status> {
        let client = client_addr(request.extensions());
        let door = match request.metadata().get(ADMIN_CLIENT_HEADER) {
            Some(v) if v.as_bytes() == b"cli" => "cli",
            _ => "grpc",
        };
        let who = client.map_or_else(
            || "admin token".to_owned(),
            |a| format!("admin token from {a}"),
        );
        Ok((self.authorize(request)?, Actor::new(door, who)))
    }
}

/// The metadata by which the CLI names itself, so the audit log can tell it from grpcurl.
pub const ADMIN_CLIENT_HEADER: &str = "x-admin-client";

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_models(
        &self,
        request: Request<pb::ListCatalogueRequest>,
    ) -> Result<Response<pb::ListCatalogueResponse>, Status> {
        self.authorize(request)?;
        Ok(Response::new(pb::ListCatalogueResponse {
            models: self
                .gateway
                .list_models()
                .into_iter()
                .map(catalogue_model_proto)
                .collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::CatalogueModel>, Status> {
        let r = self.authorize(request)?;
        Ok(Response::new(catalogue_model_proto(
            self.gateway.get_model(&r.name)?,
        )))
    }

    async fn put_model(
        &self,
        request: Request<pb::CatalogueModel>,
    ) -> Result<Response<pb::CatalogueModel>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        let model = catalogue_model_from(r)?;
        Ok(Response::new(catalogue_model_proto(
            self.gateway.acting(actor).put_model(model)?,
        )))
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::CatalogueModel>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        Ok(Response::new(catalogue_model_proto(
            self.gateway.acting(actor).delete_model(&r.name)?,
        )))
    }

    type BackupStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        self.authorize(request)?;
        let snapshot = self.gateway.snapshot().await?;
        let mut first = Some((
            snapshot.summary.bytes,
            crate::core::snapshot::file_name(snapshot.summary.created_at),
        ));
        let pieces = snapshot.into_chunks();
        let stream = futures_util::stream::unfold(pieces, move |mut pieces| {
            let head = first.take();
            async move {
                let piece = pieces.recv().await?;
                let (total_bytes, file_name) = head.unwrap_or_default();
                let chunk = piece
                    .map(|data| pb::BackupChunk {
                        data: data.to_vec(),
                        total_bytes,
                        file_name,
                    })
                    .map_err(|e| Status::internal(format!("cannot read the snapshot: {e}")));
                Some((chunk, pieces))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn add_price(
        &self,
        request: Request<pb::AddPriceRequest>,
    ) -> Result<Response<pb::Price>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        let images = r
            .images
            .iter()
            .map(|(tier, price)| {
                Money::parse(price)
                    .map(|p| (tier.clone(), p))
                    .map_err(|e| GatewayError::invalid_request(e, Some("images")))
            })
            .collect::<Result<_, _>>()?;
        let price = self.gateway.acting(actor).add_price(NewPrice {
            model: r.model,
            effective_from: r.effective_from.map(TimeInput::Unix),
            prompt_per_million: money(&r.prompt_per_million, "prompt_per_million")?
                .unwrap_or_default(),
            completion_per_million: money(&r.completion_per_million, "completion_per_million")?
                .unwrap_or_default(),
            per_second: money(&r.per_second, "per_second")?.unwrap_or_default(),
            per_call_minimum: money(&r.per_call_minimum, "per_call_minimum")?.unwrap_or_default(),
            images,
        })?;
        Ok(Response::new(price_proto(price)))
    }

    async fn list_prices(
        &self,
        request: Request<pb::ListPricesRequest>,
    ) -> Result<Response<pb::ListPricesResponse>, Status> {
        let r = self.authorize(request)?;
        let prices = self
            .gateway
            .list_prices(r.model.as_deref())
            .into_iter()
            .map(price_proto)
            .collect();
        Ok(Response::new(pb::ListPricesResponse {
            prices,
            currency: self.gateway.currency().to_owned(),
        }))
    }

    async fn get_invoice(
        &self,
        request: Request<pb::GetInvoiceRequest>,
    ) -> Result<Response<pb::Invoice>, Status> {
        let r = self.authorize(request)?;
        let (month_start, month_end) = self.gateway.month_of(self.gateway.now_unix());
        let invoice = self.gateway.invoice(
            &r.user_id,
            r.from.unwrap_or(month_start),
            r.to.unwrap_or(month_end),
        )?;
        Ok(Response::new(pb::Invoice {
            user_id: invoice.user_id,
            user_name: invoice.user_name,
            currency: invoice.currency,
            from: invoice.from,
            to: invoice.to,
            lines: invoice
                .lines
                .into_iter()
                .map(|l| pb::InvoiceLine {
                    key_id: l.key_id,
                    key_name: l.key_name,
                    model: l.model,
                    version: l.version,
                    requests: l.requests,
                    prompt_tokens: l.prompt_tokens,
                    completion_tokens: l.completion_tokens,
                    images: l.images,
                    cost: l.cost.to_string(),
                })
                .collect(),
            total: invoice.total.to_string(),
        }))
    }

    async fn test_alert(
        &self,
        request: Request<pb::TestAlertRequest>,
    ) -> Result<Response<pb::TestAlertResponse>, Status> {
        let r = self.authorize(request)?;
        let channel = Some(r.channel.as_str()).filter(|c| !c.is_empty());
        let deliveries = self
            .gateway
            .test_alert(channel)
            .await?
            .into_iter()
            .map(|d| pb::AlertDelivery {
                channel: d.channel,
                kind: d.kind,
                delivered: d.delivered,
                error: d.error,
            })
            .collect();
        Ok(Response::new(pb::TestAlertResponse { deliveries }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        let limits = UserLimits {
            rpm_limit: r.rpm_limit,
            tpm_limit: r.tpm_limit,
            max_concurrent: r.max_concurrent,
            allowed_ips: allowlist(&r.allowed_ips)?,
            budget: money(&r.budget, "budget")?,
            period: period(&r.period)?,
        };
        let user = self.gateway.acting(actor).create_user(NewUser {
            name: r.name,
            email: r.email,
            subject: r.subject,
            limits: limits.into(),
        })?;
        Ok(Response::new(user_proto(user)))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let r = self.authorize(request)?;
        Ok(Response::new(user_proto(self.gateway.get_user(&r.id)?)))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.authorize(request)?;
        let users = self
            .gateway
            .list_users()
            .into_iter()
            .map(user_proto)
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        let set = UserLimits {
            rpm_limit: r.rpm_limit,
            tpm_limit: r.tpm_limit,
            max_concurrent: r.max_concurrent,
            allowed_ips: allowlist(&r.allowed_ips)?,
            budget: money(&r.budget, "budget")?,
            period: period(&r.period)?,
        };
        let (clear_email, clear_rest) = take_clear(&r.clear, "email");
        if clear_email && r.email.is_some() {
            return Err(both_set_and_cleared("email").into());
        }
        let (clear_subject, clear_limits) = take_clear(&clear_rest, "subject");
        if clear_subject && r.subject.is_some() {
            return Err(both_set_and_cleared("subject").into());
        }
        let patch = UserPatch {
            name: r.name,
            email: if clear_email {
                Some(None)
            } else {
                r.email.map(Some)
            },
            active: r.active,
            subject: if clear_subject {
                Some(None)
            } else {
                r.subject.map(Some)
            },
            limits: LimitChanges::from_parts(&set, &clear_limits)?,
        };
        Ok(Response::new(user_proto(
            self.gateway.acting(actor).update_user(&r.id, patch)?,
        )))
    }

    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        Ok(Response::new(user_proto(
            self.gateway.acting(actor).deactivate_user(&r.id)?,
        )))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreatedKey>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        let limits = key_limits_of!(r)?;
        let created = self.gateway.acting(actor).create_key(NewKey {
            user_id: r.user_id,
            name: Some(r.name).filter(|n| !n.is_empty()),
            limits: limits.into(),
            expires_at: r.expires_at.map(TimeInput::Unix),
            expires_in: r.expires_in,
            models: Some(r.models).filter(|m| !m.is_empty()),
        })?;
        Ok(Response::new(created_proto(created)))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let r = self.authorize(request)?;
        Ok(Response::new(key_proto(self.gateway.get_key(&r.id)?)))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let r = self.authorize(request)?;
        let page_size = usize::try_from(r.page_size).ok().filter(|&n| n > 0);
        let page = self.gateway.list_keys_page(
            &KeyFilter { user_id: r.user_id },
            Some(&r.page_token),
            page_size,
        )?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: page.keys.into_iter().map(key_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        let set = key_limits_of!(r)?;
        let (clear_expiry, clear) = take_clear(&r.clear, "expires_at");
        let (clear_models, clear_limits) = take_clear(&clear, "models");
        if clear_expiry && (r.expires_at.is_some() || r.expires_in.is_some()) {
            return Err(both_set_and_cleared("expires_at").into());
        }
        if clear_models && !r.models.is_empty() {
            return Err(both_set_and_cleared("models").into());
        }
        let patch = KeyPatch {
            name: r.name,
            limits: LimitChanges::from_parts(&set, &clear_limits)?,
            expires_at: if clear_expiry {
                Some(None)
            } else {
                r.expires_at.map(|t| Some(TimeInput::Unix(t)))
            },
            expires_in: r.expires_in,
            models: if clear_models {
                Some(None)
            } else {
                Some(Some(r.models)).filter(|m| m.as_ref().is_some_and(|m| !m.is_empty()))
            },
            active: r.active,
        };
        Ok(Response::new(key_proto(
            self.gateway.acting(actor).update_key(&r.id, patch)?,
        )))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        Ok(Response::new(key_proto(
            self.gateway.acting(actor).revoke_key(&r.id)?,
        )))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::CreatedKey>, Status> {
        let (r, actor) = self.authorize_actor(request)?;
        let grace = r.grace_seconds.unwrap_or(DEFAULT_ROTATION_GRACE_SECS);
        Ok(Response::new(created_proto(
            self.gateway.acting(actor).rotate_key(&r.id, grace)?,
        )))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageReportRequest>,
    ) -> Result<Response<pb::UsageReport>, Status> {
        let r = self.authorize(request)?;
        let subject = match r.subject {
            Some(pb::get_usage_report_request::Subject::KeyId(id)) => UsageSubject::Key(id),
            Some(pb::get_usage_report_request::Subject::UserId(id)) => UsageSubject::User(id),
            None => {
                return Err(GatewayError::invalid_request(
                    "give `key_id` or `user_id`",
                    Some("subject"),
                )
                .into());
            }
        };
        let group_by = match pb::UsageGrouping::try_from(r.group_by) {
            Ok(pb::UsageGrouping::Day) => UsageGrouping::Day,
            Ok(pb::UsageGrouping::Month) => UsageGrouping::Month,
            Ok(pb::UsageGrouping::Hour | pb::UsageGrouping::Unspecified) => UsageGrouping::Hour,
            Err(_) => {
                return Err(
                    GatewayError::invalid_request("unknown `group_by`", Some("group_by")).into(),
                );
            }
        };
        let report = self.gateway.usage_report(&UsageQuery {
            subject,
            from: r.from,
            to: r.to,
            group_by,
            by_model: r.by_model,
            by_key: r.by_key,
        })?;
        Ok(Response::new(report_proto(report)))
    }

    async fn list_calls(
        &self,
        request: Request<pb::ListCallsRequest>,
    ) -> Result<Response<pb::ListCallsResponse>, Status> {
        let r = self.authorize(request)?;
        let status = match r.status {
            Some(s) => Some(u16::try_from(s).map_err(|_| {
                GatewayError::invalid_request("`status` is an HTTP status", Some("status"))
            })?),
            None => None,
        };
        let page = self.gateway.list_calls(&CallFilter {
            key_id: r.key_id,
            user_id: r.user_id,
            model: r.model,
            status,
            from: r.from,
            page_token: Some(r.page_token),
            page_size: usize::try_from(r.page_size).ok().filter(|&n| n > 0),
        })?;
        Ok(Response::new(pb::ListCallsResponse {
            calls: page.calls.into_iter().map(call_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let r = self.authorize(request)?;
        let page = self.gateway.audit_log(
            Some(r.page_token.as_str()),
            usize::try_from(r.page_size).ok().filter(|&n| n > 0),
        )?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: page.entries.into_iter().map(audit_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

fn audit_proto(record: AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        id: record.id,
        at_micros: record.at_micros,
        door: record.actor.door,
        who: record.actor.who,
        action: record.action,
        target: record.target,
        before_json: record.before.map(|v| v.to_string()),
        after_json: record.after.map(|v| v.to_string()),
    }
}

/// Whether `field` is among the names to clear, and the other names.
fn take_clear(clear: &[String], field: &str) -> (bool, Vec<String>) {
    let others: Vec<String> = clear.iter().filter(|c| *c != field).cloned().collect();
    (others.len() < clear.len(), others)
}

/// A field both set and cleared in one request is a mistake, not a choice to guess at.
fn both_set_and_cleared(field: &str) -> GatewayError {
    GatewayError::invalid_request(format!("`{field}` is both set and cleared"), Some("clear"))
}

fn user_proto(user: UserRecord) -> pb::User {
    pb::User {
        id: user.id,
        name: user.name,
        email: user.email,
        subject: user.subject,
        active: user.active,
        created_at: user.created_at,
        updated_at: user.updated_at,
        rpm_limit: user.limits.rpm_limit,
        tpm_limit: user.limits.tpm_limit,
        max_concurrent: user.limits.max_concurrent,
        allowed_ips: user
            .limits
            .allowed_ips
            .map(|l| l.entries())
            .unwrap_or_default(),
        budget: user.limits.budget.map(|b| b.to_string()),
        period: user.limits.period.map(|p| p.as_str().to_owned()),
    }
}

fn key_proto(key: KeyView) -> pb::Key {
    let KeyLimits {
        rpm_limit,
        tpm_limit,
        max_concurrent,
        request_quota,
        token_quota,
        image_quota,
        max_images_per_request,
        allowed_ips,
        budget,
        period,
        cache,
    } = key.limits;
    pb::Key {
        id: key.id,
        user_id: key.user_id,
        name: key.name,
        prefix: key.prefix,
        rpm_limit,
        request_quota,
        token_quota,
        expires_at: key.expires_at,
        models: key.models.unwrap_or_default(),
        active: key.active,
        created_at: key.created_at,
        updated_at: key.updated_at,
        revoked_at: key.revoked_at,
        previous_secret_valid_until: key.previous_secret_valid_until,
        requests_used: key.used.requests,
        prompt_tokens_used: key.used.prompt_tokens,
        completion_tokens_used: key.used.completion_tokens,
        tpm_limit,
        max_concurrent,
        image_quota,
        max_images_per_request,
        images_used: key.used.images,
        allowed_ips: allowed_ips.map(|l| l.entries()).unwrap_or_default(),
        budget: budget.map(|b| b.to_string()),
        period: period.map(|p| p.as_str().to_owned()),
        cost_used: key.used.cost.to_string(),
        cache,
    }
}

fn created_proto(created: CreatedKey) -> pb::CreatedKey {
    pb::CreatedKey {
        key: Some(key_proto(created.key)),
        secret: created.secret,
    }
}

fn report_proto(report: UsageReport) -> pb::UsageReport {
    pb::UsageReport {
        from: report.from,
        to: report.to,
        buckets: report
            .buckets
            .into_iter()
            .map(|b| pb::UsageBucket {
                start: b.start,
                key_id: b.key_id,
                model: b.model,
                version: b.version,
                cost: b.cost.to_string(),
                requests: b.requests,
                errors: b.errors,
                prompt_tokens: b.prompt_tokens,
                completion_tokens: b.completion_tokens,
                images: b.images,
                cache_hits: b.cache_hits,
            })
            .collect(),
        requests: report.requests,
        prompt_tokens: report.prompt_tokens,
        completion_tokens: report.completion_tokens,
        images: report.images,
        cost: report.cost.to_string(),
        currency: report.currency,
        cache_hits: report.cache_hits,
    }
}

fn price_proto(price: PriceRecord) -> pb::Price {
    pb::Price {
        model: price.model,
        effective_from: price.effective_from,
        prompt_per_million: price.prompt_per_million.to_string(),
        completion_per_million: price.completion_per_million.to_string(),
        per_second: price.per_second.to_string(),
        per_call_minimum: price.per_call_minimum.to_string(),
        images: price
            .images
            .into_iter()
            .map(|(tier, p)| (tier, p.to_string()))
            .collect(),
        created_at: price.created_at,
    }
}

fn call_proto(call: CallRecord) -> pb::Call {
    pb::Call {
        at_micros: call.at_micros,
        request_id: call.request_id,
        key_id: call.key_id,
        user_id: call.user_id,
        model: call.model,
        status: u32::from(call.status),
        outcome: call.outcome.as_str().to_owned(),
        stream: call.stream,
        latency_ms: call.latency_ms,
        charged_request: call.charged_request,
        prompt_tokens: call.usage.prompt_tokens,
        completion_tokens: call.usage.completion_tokens,
        usage_estimated: call.usage_estimated,
        request_body: call.request_body,
        response_body: call.response_body,
        images: call.images,
        image_sizes: call
            .image_sizes
            .into_iter()
            .map(|s| pb::ImageSize {
                width: s.width,
                height: s.height,
            })
            .collect(),
        client_address: call.client_addr,
        version: call.version,
        cost: call.cost.to_string(),
        cache_hit: call.cache_hit,
    }
}
