//! The channels: how one alert is laid out, signed and sent to a generic webhook, a
//! DingTalk, Feishu/Lark or WeCom robot, a Slack-compatible webhook, or by email.
//!
//! No error or log line here carries a channel's URL (robot URLs hold their token) or
//! secret: errors name the channel and what went wrong.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Value, json};
use sha2::Sha256;

use super::message::Alert;
use super::settings::{ChannelConfig, ChannelKind, SmtpSecurity};

/// The headers of a generic webhook: the event, when it was signed, and the signature.
pub const EVENT_HEADER: &str = "x-step3gw-event";
pub const TIMESTAMP_HEADER: &str = "x-step3gw-timestamp";
pub const SIGNATURE_HEADER: &str = "x-step3gw-signature";

/// Why one try failed; the text names no URL and no secret.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryError(pub String);

/// A channel ready to send: its settings and its client.
pub struct Channel {
    pub config: ChannelConfig,
    http: reqwest::Client,
    mailer: Option<AsyncSmtpTransport<Tokio1Executor>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("name", &self.config.name)
            .field("kind", &self.config.kind)
            .finish_non_exhaustive()
    }
}

/// HMAC-SHA256 of `message` under `key`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    // HMAC takes a key of any length; the error is for fixed-size MACs only.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return Vec::new(),
    };
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// The generic webhook's signature: `sha256=` and the hex HMAC-SHA256, under the
/// channel's secret, of `<timestamp>.<body>` (the timestamp lets a receiver refuse replays).
pub fn webhook_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(body);
    let mac = hmac_sha256(secret.as_bytes(), &message);
    format!("sha256={}", crate::core::keys::to_hex(&mac))
}

/// DingTalk's robot signature: base64 HMAC-SHA256, keyed by the secret, of
/// `<timestamp ms>\n<secret>` (sent URL-encoded as `sign`, beside `timestamp`).
pub fn dingtalk_sign(secret: &str, timestamp_ms: i64) -> String {
    let message = format!("{timestamp_ms}\n{secret}");
    BASE64.encode(hmac_sha256(secret.as_bytes(), message.as_bytes()))
}

/// Feishu/Lark's bot signature: base64 HMAC-SHA256 whose *key* is `<timestamp s>\n<secret>`
/// over an empty message (sent in the body as `sign`, beside `timestamp`).
pub fn feishu_sign(secret: &str, timestamp: i64) -> String {
    let key = format!("{timestamp}\n{secret}");
    BASE64.encode(hmac_sha256(key.as_bytes(), b""))
}

/// The generic webhook's body: the alert's fields as JSON (documented in the README).
pub fn webhook_body(alert: &Alert) -> Value {
    json!({
        "version": 1,
        "event": alert.event.as_str(),
        "state": alert.state.as_str(),
        "severity": alert.severity,
        "incident": alert.incident(),
        "subject": alert.subject,
        "title": alert.title,
        "text": alert.text,
        "at": alert.at,
        "source": alert.source,
    })
}

pub fn slack_body(alert: &Alert) -> Value {
    json!({"text": format!("*{}*\n{}", alert.headline(), alert.text)})
}

pub fn wecom_body(alert: &Alert) -> Value {
    json!({"msgtype": "markdown", "markdown": {"content": alert.markdown()}})
}

pub fn dingtalk_body(alert: &Alert) -> Value {
    json!({
        "msgtype": "markdown",
        "markdown": {"title": alert.headline(), "text": alert.markdown()},
    })
}

pub fn feishu_body(alert: &Alert, signed: Option<(i64, String)>) -> Value {
    let mut body = json!({"msg_type": "text", "content": {"text": alert.plain_text()}});
    if let Some((timestamp, sign)) = signed {
        body["timestamp"] = timestamp.to_string().into();
        body["sign"] = sign.into();
    }
    body
}

/// A URL-encoded query value (base64 holds `+`, `/` and `=`).
fn query_value(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

impl Channel {
    pub fn new(config: ChannelConfig, timeout: Duration) -> Result<Self, DeliveryError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A robot endpoint has no reason to send a message elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DeliveryError(format!("cannot build an HTTP client: {e}")))?;
        let mailer = match config.kind {
            ChannelKind::Email => Some(mailer(&config, timeout)?),
            _ => None,
        };
        Ok(Channel {
            config,
            http,
            mailer,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// One try at sending `alert`.
    pub async fn deliver(&self, alert: &Alert) -> Result<(), DeliveryError> {
        let now_ms = crate::core::time::now_micros() / 1000;
        match self.config.kind {
            ChannelKind::Email => self.send_email(alert).await,
            ChannelKind::Webhook => {
                let body = serde_json::to_vec(&webhook_body(alert))
                    .map_err(|e| DeliveryError(e.to_string()))?;
                let timestamp = now_ms / 1000;
                let mut request = self
                    .http
                    .post(self.url()?)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(EVENT_HEADER, alert.event.as_str())
                    .header(TIMESTAMP_HEADER, timestamp.to_string());
                if let Some(secret) = &self.config.secret {
                    request = request.header(
                        SIGNATURE_HEADER,
                        webhook_signature(secret.expose(), timestamp, &body),
                    );
                }
                self.post(request.body(body), Answer::Status).await
            }
            ChannelKind::Slack => {
                let request = self.http.post(self.url()?).json(&slack_body(alert));
                self.post(request, Answer::Status).await
            }
            ChannelKind::Wecom => {
                let request = self.http.post(self.url()?).json(&wecom_body(alert));
                self.post(request, Answer::Field("errcode")).await
            }
            ChannelKind::Dingtalk => {
                let mut url = self.url()?.to_owned();
                if let Some(secret) = &self.config.secret {
                    let sign = dingtalk_sign(secret.expose(), now_ms);
                    let join = if url.contains('?') { '&' } else { '?' };
                    url = format!("{url}{join}timestamp={now_ms}&sign={}", query_value(&sign));
                }
                let request = self.http.post(url).json(&dingtalk_body(alert));
                self.post(request, Answer::Field("errcode")).await
            }
            ChannelKind::Feishu => {
                let timestamp = now_ms / 1000;
                let signed = self
                    .config
                    .secret
                    .as_ref()
                    .map(|secret| (timestamp, feishu_sign(secret.expose(), timestamp)));
                let request = self
                    .http
                    .post(self.url()?)
                    .json(&feishu_body(alert, signed));
                self.post(request, Answer::Field("code")).await
            }
        }
    }

    fn url(&self) -> Result<&str, DeliveryError> {
        self.config
            .url
            .as_ref()
            .map(|u| u.expose())
            .ok_or_else(|| DeliveryError("the channel has no url".into()))
    }

    async fn post(
        &self,
        request: reqwest::RequestBuilder,
        answer: Answer,
    ) -> Result<(), DeliveryError> {
        let response = request.send().await.map_err(|e| {
            // reqwest's message names the URL, which holds the robot's token.
            DeliveryError(format!("cannot send: {}", error_chain(&e.without_url())))
        })?;
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        if !status.is_success() {
            return Err(DeliveryError(format!(
                "the endpoint answered HTTP {}: {}",
                status.as_u16(),
                excerpt(&body)
            )));
        }
        // The robots answer 200 with an error code for a bad signature or a throttled bot.
        if let Answer::Field(field) = answer {
            let value: Value = serde_json::from_slice(&body).unwrap_or_default();
            let code = value
                .get(field)
                .or_else(|| value.get("StatusCode"))
                .and_then(Value::as_i64);
            if code.is_some_and(|c| c != 0) {
                return Err(DeliveryError(format!(
                    "the robot refused the message: {}",
                    excerpt(&body)
                )));
            }
        }
        Ok(())
    }

    async fn send_email(&self, alert: &Alert) -> Result<(), DeliveryError> {
        let mailer = self
            .mailer
            .as_ref()
            .ok_or_else(|| DeliveryError("the channel has no SMTP server".into()))?;
        let parse = |address: &str| {
            address
                .parse::<Mailbox>()
                .map_err(|e| DeliveryError(format!("`{address}` is not an address: {e}")))
        };
        let mut message = Message::builder()
            .from(parse(self.config.from.as_deref().unwrap_or_default())?)
            .subject(alert.headline());
        for to in &self.config.to {
            message = message.to(parse(to)?);
        }
        let message = message
            .body(alert.plain_text())
            .map_err(|e| DeliveryError(format!("cannot build the email: {e}")))?;
        mailer
            .send(message)
            .await
            .map_err(|e| DeliveryError(format!("the SMTP server refused: {}", error_chain(&e))))?;
        Ok(())
    }
}

/// How a 2xx answer says the message was taken.
enum Answer {
    /// The status alone.
    Status,
    /// A JSON field that is 0 when it was (`errcode`, `code`).
    Field(&'static str),
}

fn mailer(
    config: &ChannelConfig,
    timeout: Duration,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, DeliveryError> {
    let host = config.smtp_host.clone().unwrap_or_default();
    let tls = |host: &str| {
        TlsParameters::new(host.to_owned())
            .map_err(|e| DeliveryError(format!("cannot set up TLS for {host}: {e}")))
    };
    let (tls, port) = match config.smtp_security {
        SmtpSecurity::Starttls => (Tls::Required(tls(&host)?), 587),
        SmtpSecurity::Tls => (Tls::Wrapper(tls(&host)?), 465),
        SmtpSecurity::None => (Tls::None, 25),
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(config.smtp_port.unwrap_or(port))
        .tls(tls)
        .timeout(Some(timeout));
    if let (Some(user), Some(password)) = (&config.smtp_username, &config.smtp_password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
    }
    Ok(builder.build())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// The first 200 characters of an answer, on one line.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_hand_computed_hmacs() {
        // HMAC-SHA256(key = "key", "The quick brown fox jumps over the lazy dog").
        let mac = hmac_sha256(b"key", b"The quick brown fox jumps over the lazy dog");
        assert_eq!(
            crate::core::keys::to_hex(&mac),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert_eq!(
            webhook_signature("key", 1, b"{}"),
            format!(
                "sha256={}",
                crate::core::keys::to_hex(&hmac_sha256(b"key", b"1.{}"))
            )
        );
        assert_eq!(
            dingtalk_sign("SEC1", 1_700_000_000_000),
            BASE64.encode(hmac_sha256(b"SEC1", b"1700000000000\nSEC1"))
        );
        assert_eq!(
            feishu_sign("s", 1_700_000_000),
            BASE64.encode(hmac_sha256(b"1700000000\ns", b""))
        );
    }
}
