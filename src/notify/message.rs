//! One alert as every channel receives it: what happened, whether it starts, ends or is a
//! one-off notice, and the words a person reads.

use serde::Serialize;

use super::settings::EventKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// An incident began (a backend is down).
    Firing,
    /// It is over (the backend is back).
    Resolved,
    /// Something to know that does not end by itself (a quota share, an expiring key, a
    /// test).
    Notice,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
            AlertState::Notice => "notice",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

/// One message, the same for every channel; each channel only lays it out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub event: EventKind,
    pub state: AlertState,
    pub severity: Severity,
    /// What it is about: a backend's name, a key's id, an address; empty for the gateway
    /// as a whole. With `event`, it names the incident.
    pub subject: String,
    /// One line.
    pub title: String,
    /// A few lines of detail (plain text).
    pub text: String,
    /// Seconds since the epoch.
    pub at: i64,
    /// The gateway that sent it (`alerts.source`).
    pub source: String,
}

impl Alert {
    /// `backend_down:gpu-a`: the same for an incident's start and its end.
    pub fn incident(&self) -> String {
        format!("{}:{}", self.event.as_str(), self.subject)
    }

    /// `[step3-gateway] RESOLVED: backend gpu-a is healthy again`.
    pub fn headline(&self) -> String {
        let state = match self.state {
            AlertState::Firing => "FIRING: ",
            AlertState::Resolved => "RESOLVED: ",
            AlertState::Notice => "",
        };
        format!("[{}] {state}{}", self.source, self.title)
    }

    /// The headline, the details and the time, as plain text.
    pub fn plain_text(&self) -> String {
        let at = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.at.max(0).unsigned_abs()),
        );
        format!("{}\n\n{}\n\n{at}", self.headline(), self.text)
    }

    /// The same as Markdown (DingTalk, WeCom): a heading, then the details.
    pub fn markdown(&self) -> String {
        let at = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.at.max(0).unsigned_abs()),
        );
        format!(
            "### {}\n\n{}\n\n> {} · {at}",
            self.headline(),
            self.text.replace('\n', "\n\n"),
            self.event.as_str()
        )
    }
}
