//! The `[alerts]` section: the channels and what each wants, the rules' thresholds, and
//! how messages are delivered.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A setting that holds a secret (a robot's URL with its token, a signing key, an SMTP
/// password): shown as `***` in every `Debug` output, so no log line can carry it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What a channel can be told about. A channel that names none is told everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A backend failed its health checks (or was ejected), and when it is back.
    BackendDown,
    /// No backend is healthy: every call fails at once.
    NoHealthyBackend,
    /// The store does not take writes (calls are refused), and when it does again.
    StoreUnavailable,
    /// The share of failed calls over the window is above the threshold.
    ErrorRate,
    /// The 95th percentile of call latency over the window is above the threshold.
    Latency,
    /// A key's use of a quota reached one of `quota_percents`.
    Quota,
    /// A key expires within `key_expiry_days`.
    KeyExpiring,
    /// Many failed authentications from one address.
    AuthFailures,
    /// A message sent by `admin alerts test`.
    Test,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BackendDown => "backend_down",
            EventKind::NoHealthyBackend => "no_healthy_backend",
            EventKind::StoreUnavailable => "store_unavailable",
            EventKind::ErrorRate => "error_rate",
            EventKind::Latency => "latency",
            EventKind::Quota => "quota",
            EventKind::KeyExpiring => "key_expiring",
            EventKind::AuthFailures => "auth_failures",
            EventKind::Test => "test",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// Any HTTP endpoint: a JSON body, signed with HMAC-SHA256 when `secret` is set.
    Webhook,
    /// A DingTalk group robot (`secret`: its 加签 signing secret).
    Dingtalk,
    /// A Feishu / Lark custom bot (`secret`: its signature verification secret).
    Feishu,
    /// A WeCom (企业微信) group robot.
    Wecom,
    /// A Slack incoming webhook, or anything that takes Slack's `{"text": …}` (Mattermost,
    /// Rocket.Chat, Discord's `/slack` endpoint).
    Slack,
    /// Email over SMTP.
    Email,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Webhook => "webhook",
            ChannelKind::Dingtalk => "dingtalk",
            ChannelKind::Feishu => "feishu",
            ChannelKind::Wecom => "wecom",
            ChannelKind::Slack => "slack",
            ChannelKind::Email => "email",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (port 587 by default); refused without it.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 by default).
    Tls,
    /// No encryption (port 25 by default): only for a relay on the same host.
    None,
}

/// One place messages go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Names the channel in logs, metrics and `admin alerts test --channel`.
    pub name: String,
    pub kind: ChannelKind,
    /// What this channel is told; empty: everything.
    #[serde(default)]
    pub events: Vec<EventKind>,
    /// The endpoint (every kind but `email`). Robot URLs carry their token: never logged.
    #[serde(default)]
    pub url: Option<Secret>,
    /// `webhook`: the HMAC-SHA256 key of `X-Step3gw-Signature`; `dingtalk`, `feishu`: the
    /// robot's signing secret.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// `email`: the SMTP server.
    #[serde(default)]
    pub smtp_host: Option<String>,
    /// `email`: default 587 (starttls), 465 (tls) or 25 (none).
    #[serde(default)]
    pub smtp_port: Option<u16>,
    #[serde(default)]
    pub smtp_security: SmtpSecurity,
    #[serde(default)]
    pub smtp_username: Option<String>,
    #[serde(default)]
    pub smtp_password: Option<Secret>,
    /// `email`: the sender, e.g. `step3-gateway <gateway@example.com>`.
    #[serde(default)]
    pub from: Option<String>,
    /// `email`: the recipients.
    #[serde(default)]
    pub to: Vec<String>,
}

impl ChannelConfig {
    /// Whether this channel wants to hear of `kind` (a test message goes everywhere).
    pub fn wants(&self, kind: EventKind) -> bool {
        kind == EventKind::Test || self.events.is_empty() || self.events.contains(&kind)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorRateConfig {
    /// Alert when more than this share of calls (percent) failed over the window; 0: off.
    /// A failure is a model-server error (5xx), an unreachable server, a timeout or a
    /// stream cut short; refusals by the gateway and the client's own 4xx are not.
    pub threshold_percent: f64,
    pub window_secs: u64,
    /// Fewer calls than this in the window say nothing.
    pub min_calls: u64,
}

impl Default for ErrorRateConfig {
    fn default() -> Self {
        ErrorRateConfig {
            threshold_percent: 5.0,
            window_secs: 300,
            min_calls: 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatencyConfig {
    /// Alert when the 95th percentile over the window is above this; 0: off. A JSON
    /// call's latency is the whole call; a stream's is its time to the first token.
    pub p95_ms: u64,
    pub window_secs: u64,
    pub min_calls: u64,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig {
            p95_ms: 30_000,
            window_secs: 300,
            min_calls: 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailuresConfig {
    /// Alert when one address fails this many authentications within the window; 0: off.
    pub count: u64,
    pub window_secs: u64,
}

impl Default for AuthFailuresConfig {
    fn default() -> Self {
        AuthFailuresConfig {
            count: 20,
            window_secs: 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where messages go; none: alerting is off (nothing is watched).
    pub channels: Vec<ChannelConfig>,
    /// Names this gateway in every message (several gateways may share a channel).
    pub source: String,
    /// After a message about an incident, the same incident is not announced again for
    /// this long (a flapping backend is one message, not one per flap); its end is still
    /// said when it clears.
    pub cooldown_secs: u64,
    /// How often health, the store and the windows are looked at.
    pub check_interval_ms: u64,
    /// Messages waiting per channel; beyond it new ones are dropped (and counted).
    pub queue_capacity: usize,
    /// Tries per message, the first included, with the wait doubling from `retry_backoff_ms`.
    pub max_attempts: u32,
    pub retry_backoff_ms: u64,
    /// One try's time limit (connect, send and answer).
    pub timeout_secs: u64,
    pub error_rate: ErrorRateConfig,
    pub latency: LatencyConfig,
    /// Shares of a key's request, token or image quota to announce (each once).
    pub quota_percents: Vec<u8>,
    /// Announce keys expiring within this many days (each key once); 0: off.
    pub key_expiry_days: u64,
    /// How often keys are looked at for their expiry.
    pub key_expiry_check_secs: u64,
    pub auth_failures: AuthFailuresConfig,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            channels: Vec::new(),
            source: "step3-gateway".into(),
            cooldown_secs: 600,
            check_interval_ms: 1000,
            queue_capacity: 256,
            max_attempts: 4,
            retry_backoff_ms: 1000,
            timeout_secs: 10,
            error_rate: ErrorRateConfig::default(),
            latency: LatencyConfig::default(),
            quota_percents: vec![80, 100],
            key_expiry_days: 7,
            key_expiry_check_secs: 3600,
            auth_failures: AuthFailuresConfig::default(),
        }
    }
}

impl AlertsConfig {
    pub fn enabled(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Checks what types alone cannot; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for (i, channel) in self.channels.iter().enumerate() {
            let at = format!("alerts.channels.{i}");
            if channel.name.trim().is_empty() {
                return Err(format!("{at}.name must not be empty"));
            }
            if !names.insert(channel.name.as_str()) {
                return Err(format!(
                    "{at}.name: two channels are called `{}`",
                    channel.name
                ));
            }
            let at = format!("alerts.channels.{i} (`{}`)", channel.name);
            if channel.kind == ChannelKind::Email {
                if channel.smtp_host.as_deref().is_none_or(str::is_empty) {
                    return Err(format!("{at}: an email channel needs smtp_host"));
                }
                let from = channel.from.as_deref().unwrap_or_default();
                from.parse::<lettre::message::Mailbox>()
                    .map_err(|e| format!("{at}: from = {from:?} is not an address: {e}"))?;
                if channel.to.is_empty() {
                    return Err(format!("{at}: an email channel needs at least one `to`"));
                }
                for to in &channel.to {
                    to.parse::<lettre::message::Mailbox>()
                        .map_err(|e| format!("{at}: to = {to:?} is not an address: {e}"))?;
                }
                if channel.smtp_username.is_some() != channel.smtp_password.is_some() {
                    return Err(format!("{at}: smtp_username and smtp_password go together"));
                }
                if channel.url.is_some() {
                    return Err(format!("{at}: an email channel has no url"));
                }
            } else {
                // The URL itself is not repeated: it may carry the robot's token.
                let url = channel.url.as_ref().map(Secret::expose).unwrap_or_default();
                match url::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    _ => {
                        return Err(format!(
                            "{at}: url must be an http:// or https:// URL (not shown: it may \
                             hold a token)"
                        ));
                    }
                }
                if channel.smtp_host.is_some() || !channel.to.is_empty() {
                    return Err(format!(
                        "{at}: smtp_* settings and `to` are for email channels"
                    ));
                }
            }
            if channel.secret.is_some()
                && !matches!(
                    channel.kind,
                    ChannelKind::Webhook | ChannelKind::Dingtalk | ChannelKind::Feishu
                )
            {
                return Err(format!(
                    "{at}: `secret` signs webhook, dingtalk and feishu messages; a {} \
                     channel has none",
                    channel.kind.as_str()
                ));
            }
        }
        if self.check_interval_ms == 0 || self.timeout_secs == 0 || self.max_attempts == 0 {
            return Err(
                "alerts.check_interval_ms, alerts.timeout_secs and alerts.max_attempts must \
                 be at least 1"
                    .into(),
            );
        }
        if self.queue_capacity == 0 {
            return Err("alerts.queue_capacity must be at least 1".into());
        }
        if let Some(p) = self.quota_percents.iter().find(|&&p| p == 0 || p > 100) {
            return Err(format!(
                "alerts.quota_percents: {p} is not a share between 1 and 100"
            ));
        }
        if !(0.0..=100.0).contains(&self.error_rate.threshold_percent) {
            return Err("alerts.error_rate.threshold_percent must be within 0 and 100".into());
        }
        for (name, window) in [
            ("alerts.error_rate.window_secs", self.error_rate.window_secs),
            ("alerts.latency.window_secs", self.latency.window_secs),
            (
                "alerts.auth_failures.window_secs",
                self.auth_failures.window_secs,
            ),
            ("alerts.key_expiry_check_secs", self.key_expiry_check_secs),
        ] {
            if window == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(name: &str) -> ChannelConfig {
        ChannelConfig {
            name: name.into(),
            kind: ChannelKind::Webhook,
            events: Vec::new(),
            url: Some(Secret("https://hooks.example.com/T0/secret-token".into())),
            secret: None,
            smtp_host: None,
            smtp_port: None,
            smtp_security: SmtpSecurity::Starttls,
            smtp_username: None,
            smtp_password: None,
            from: None,
            to: Vec::new(),
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut channel = webhook("ops");
        channel.secret = Some(Secret("hmac-key".into()));
        let shown = format!("{channel:?}");
        assert!(!shown.contains("secret-token") && !shown.contains("hmac-key"));
    }

    #[test]
    fn mistakes_are_named_without_showing_the_url() {
        let mut config = AlertsConfig {
            channels: vec![webhook("ops"), webhook("ops")],
            ..AlertsConfig::default()
        };
        assert!(config.validate().unwrap_err().contains("two channels"));
        config.channels[1].name = "dev".into();
        config.channels[1].url = Some(Secret("ftp://x/secret-token".into()));
        let e = config.validate().unwrap_err();
        assert!(e.contains("`dev`") && !e.contains("secret-token"), "{e}");
        config.channels[1].url = Some(Secret("https://x".into()));
        config.channels[1].kind = ChannelKind::Slack;
        config.channels[1].secret = Some(Secret("k".into()));
        assert!(config.validate().unwrap_err().contains("slack channel"));
        config.channels[1].secret = None;
        config.quota_percents = vec![80, 120];
        assert!(config.validate().unwrap_err().contains("120"));
        config.quota_percents = vec![80, 100];
        config.validate().unwrap();
    }

    #[test]
    fn an_email_channel_needs_a_server_a_sender_and_recipients() {
        let mut email = webhook("mail");
        email.kind = ChannelKind::Email;
        email.url = None;
        let config = |c: &ChannelConfig| AlertsConfig {
            channels: vec![c.clone()],
            ..AlertsConfig::default()
        };
        assert!(config(&email).validate().unwrap_err().contains("smtp_host"));
        email.smtp_host = Some("smtp.example.com".into());
        email.from = Some("gateway <gw@example.com>".into());
        assert!(config(&email).validate().unwrap_err().contains("`to`"));
        email.to = vec!["ops@example.com".into()];
        config(&email).validate().unwrap();
        email.to = vec!["not an address".into()];
        assert!(config(&email).validate().is_err());
    }
}
