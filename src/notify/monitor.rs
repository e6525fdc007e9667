//! The monitor: one task that looks at health, the store and the windows every
//! `check_interval_ms`, takes the request path's signals (failed authentications, quota
//! shares), and turns conditions into messages: one when an incident begins, one when it
//! ends, none for a repeat within the cooldown.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::message::{AlertState, Severity};
use super::settings::{AlertsConfig, EventKind};
use super::{Alerts, BackendProbe, Signal};
use crate::core::Gateway;
use crate::core::time::{monotonic_ms, now_unix};

/// Addresses followed at once for failed authentications; past it new ones are ignored
/// until old ones leave the window (a spray from a whole IPv6 range cannot grow memory).
const MAX_ADDRESSES: usize = 10_000;

/// One-off notices remembered so that each is sent once (quota shares, expiring keys).
const MAX_NOTICES: usize = 100_000;

/// What the monitor knows of one incident.
#[derive(Debug, Default)]
struct Incident {
    open: bool,
    /// The current opening was announced (so its end will be).
    announced: bool,
    /// When the last opening was announced.
    announced_at: Option<Instant>,
}

pub(super) struct Monitor {
    config: AlertsConfig,
    alerts: Arc<Alerts>,
    gateway: Arc<Gateway>,
    backends: BackendProbe,
    incidents: HashMap<String, Incident>,
    notices: HashSet<String>,
    /// Recent failed authentications by address (at most `count` instants each).
    failures: HashMap<IpAddr, VecDeque<Instant>>,
    next_key_scan: Instant,
}

impl Monitor {
    pub(super) fn new(
        config: AlertsConfig,
        alerts: Arc<Alerts>,
        gateway: Arc<Gateway>,
        backends: BackendProbe,
    ) -> Self {
        Monitor {
            config,
            alerts,
            gateway,
            backends,
            incidents: HashMap::new(),
            notices: HashSet::new(),
            failures: HashMap::new(),
            next_key_scan: Instant::now(),
        }
    }

    pub(super) async fn run(
        mut self,
        mut signals: mpsc::Receiver<Signal>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.check_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                signal = signals.recv() => match signal {
                    Some(signal) => self.take(signal),
                    None => return,
                },
                _ = tick.tick() => self.check().await,
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn take(&mut self, signal: Signal) {
        match signal {
            Signal::AuthFailed(address) => {
                let limit = self.config.auth_failures.count;
                if limit == 0 {
                    return;
                }
                if !self.failures.contains_key(&address) && self.failures.len() >= MAX_ADDRESSES {
                    return;
                }
                let seen = self.failures.entry(address).or_default();
                seen.push_back(Instant::now());
                while seen.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
                    seen.pop_front();
                }
                // Said at once, not at the next tick: someone is trying keys now.
                self.check_address(address);
            }
            Signal::Quota {
                key_id,
                key_name,
                user_id,
                what,
                percent,
                used,
                quota,
            } => {
                // Each share once per quota: a raised quota may be crossed again.
                let notice = format!("quota:{key_id}:{what}:{percent}:{quota}");
                if !self.remember(notice) {
                    return;
                }
                let severity = if percent >= 100 {
                    Severity::Critical
                } else {
                    Severity::Warning
                };
                // A budget is counted in nano-units and shown as money.
                let (one, used, quota, what) = match what {
                    "budget" => (
                        "budget".to_owned(),
                        crate::core::money::Money(used).to_string(),
                        crate::core::money::Money(quota).to_string(),
                        "of its budget",
                    ),
                    _ => (
                        format!("{} quota", what.trim_end_matches('s')),
                        used.to_string(),
                        quota.to_string(),
                        what,
                    ),
                };
                let (title, consequence) = if percent >= 100 {
                    (
                        format!("key {key_id} ({key_name}) has used up its {one}"),
                        "Its calls are refused (429 insufficient_quota) until the quota is \
                         raised.",
                    )
                } else {
                    (
                        format!("key {key_id} ({key_name}) has used {percent}% of its {one}"),
                        "Calls are still served.",
                    )
                };
                let alert = self
                    .alerts
                    .alert(EventKind::Quota, AlertState::Notice, severity)
                    .about(
                        key_id.clone(),
                        title,
                        format!("Used {used} of {quota} {what} (user {user_id}). {consequence}"),
                    );
                self.alerts.publish(&alert);
            }
        }
    }

    /// Remembers a one-off notice; false when it was sent before.
    fn remember(&mut self, notice: String) -> bool {
        if self.notices.len() >= MAX_NOTICES {
            self.notices.clear();
        }
        self.notices.insert(notice)
    }

    async fn check(&mut self) {
        self.check_backends();
        self.check_store();
        self.check_windows();
        let addresses: Vec<IpAddr> = self.failures.keys().copied().collect();
        for address in addresses {
            self.check_address(address);
        }
        if Instant::now() >= self.next_key_scan {
            self.next_key_scan =
                Instant::now() + Duration::from_secs(self.config.key_expiry_check_secs);
            self.check_expiring_keys().await;
        }
    }

    /// Opens, announces or closes the incident `(event, subject)` as `firing` says;
    /// `words` gives the title and text for a start (true) or an end (false).
    fn incident(
        &mut self,
        event: EventKind,
        severity: Severity,
        subject: &str,
        firing: bool,
        words: impl FnOnce(bool) -> (String, String),
    ) {
        let id = format!("{}:{subject}", event.as_str());
        let cooldown = Duration::from_secs(self.config.cooldown_secs);
        let now = Instant::now();
        let incident = self.incidents.entry(id).or_default();
        let state = if firing {
            incident.open = true;
            let quiet = incident
                .announced_at
                .is_some_and(|at| now.duration_since(at) < cooldown);
            if incident.announced || quiet {
                return;
            }
            incident.announced = true;
            incident.announced_at = Some(now);
            AlertState::Firing
        } else {
            if !incident.open {
                return;
            }
            incident.open = false;
            if !std::mem::replace(&mut incident.announced, false) {
                // Its start fell in the cooldown and was never said: nor is its end.
                return;
            }
            AlertState::Resolved
        };
        let (title, text) = words(firing);
        let alert = self
            .alerts
            .alert(event, state, severity)
            .about(subject, title, text);
        self.alerts.publish(&alert);
    }

    fn check_backends(&mut self) {
        let backends = (self.backends)();
        for backend in &backends {
            let name = backend.name.clone();
            self.incident(
                EventKind::BackendDown,
                Severity::Critical,
                &backend.name,
                !backend.healthy,
                |down| {
                    if down {
                        (
                            format!("backend {name} is down"),
                            format!(
                                "The backend {name} fails its health checks or was ejected \
                                 after failing calls. Calls go to the other backends serving \
                                 its models, if any."
                            ),
                        )
                    } else {
                        (
                            format!("backend {name} is healthy again"),
                            format!("The backend {name} passes its health checks and takes calls."),
                        )
                    }
                },
            );
        }
        let none = !backends.is_empty() && backends.iter().all(|b| !b.healthy);
        self.incident(
            EventKind::NoHealthyBackend,
            Severity::Critical,
            "",
            none,
            |none| {
                if none {
                    (
                        "no healthy backend: every model call fails".into(),
                        "No backend passes its health checks; calls are answered 503 at once."
                            .into(),
                    )
                } else {
                    (
                        "a backend is healthy again".into(),
                        "Model calls are served again.".into(),
                    )
                }
            },
        );
    }

    fn check_store(&mut self) {
        let health = self.gateway.store_health();
        let failing = !health.is_available();
        let error = health.last_error().unwrap_or_default();
        let unrecorded = health.unrecorded();
        self.incident(
            EventKind::StoreUnavailable,
            Severity::Critical,
            "",
            failing,
            |failing| {
                if failing {
                    (
                        "the store does not take writes: calls are refused".into(),
                        format!(
                            "New calls are answered 503 store_unavailable until the store \
                             takes writes again; {unrecorded} settled calls are held in memory. \
                             The store said: {error}"
                        ),
                    )
                } else {
                    (
                        "the store takes writes again".into(),
                        "Calls are accepted; the usage held in memory is recorded.".into(),
                    )
                }
            },
        );
    }

    fn check_windows(&mut self) {
        let now = monotonic_ms();
        let rule = self.config.error_rate.clone();
        let counts = self.alerts.errors.counts(now);
        let rate = counts.percent();
        let failing = rule.threshold_percent > 0.0
            && counts.calls >= rule.min_calls
            && rate > rule.threshold_percent;
        let window = humantime::format_duration(Duration::from_secs(rule.window_secs));
        self.incident(
            EventKind::ErrorRate,
            Severity::Warning,
            "",
            failing,
            |failing| {
                if failing {
                    (
                        format!("{rate:.1}% of calls failed over the last {window}"),
                        format!(
                            "{} of {} calls in the last {window} failed (model-server errors, \
                             unreachable servers, timeouts, broken streams); the threshold is \
                             {}%.",
                            counts.marked, counts.calls, rule.threshold_percent
                        ),
                    )
                } else {
                    (
                        "the error rate is back under its threshold".into(),
                        format!(
                            "{} of {} calls in the last {window} failed.",
                            counts.marked, counts.calls
                        ),
                    )
                }
            },
        );

        let rule = self.config.latency.clone();
        let counts = self.alerts.slow.counts(now);
        // p95 above the threshold ⟺ more than 5% of calls took longer than it.
        let slow = rule.p95_ms > 0 && counts.calls >= rule.min_calls && counts.percent() > 5.0;
        let window = humantime::format_duration(Duration::from_secs(rule.window_secs));
        let share = counts.percent();
        self.incident(EventKind::Latency, Severity::Warning, "", slow, |slow| {
            if slow {
                (
                    format!("p95 latency over {} ms in the last {window}", rule.p95_ms),
                    format!(
                        "{} of {} calls ({share:.1}%) took longer than {} ms (JSON calls: the \
                         whole call; streams: the time to the first token).",
                        counts.marked, counts.calls, rule.p95_ms
                    ),
                )
            } else {
                (
                    format!("p95 latency back under {} ms", rule.p95_ms),
                    format!(
                        "{} of {} calls ({share:.1}%) in the last {window} took longer than {} ms.",
                        counts.marked, counts.calls, rule.p95_ms
                    ),
                )
            }
        });
    }

    fn check_address(&mut self, address: IpAddr) {
        let rule = self.config.auth_failures.clone();
        let window = Duration::from_secs(rule.window_secs);
        let now = Instant::now();
        let Some(seen) = self.failures.get_mut(&address) else {
            return;
        };
        while seen
            .front()
            .is_some_and(|at| now.duration_since(*at) > window)
        {
            seen.pop_front();
        }
        let count = seen.len() as u64;
        let burst = rule.count > 0 && count >= rule.count;
        if seen.is_empty() {
            self.failures.remove(&address);
        }
        let shown = humantime::format_duration(window);
        self.incident(
            EventKind::AuthFailures,
            Severity::Warning,
            &address.to_string(),
            burst,
            |burst| {
                if burst {
                    (
                        format!("{count} failed authentications from {address} within {shown}"),
                        format!(
                            "{address} sent {count} requests with an unknown, revoked or \
                             expired key (or a wrong admin token) within {shown}: someone may \
                             be trying keys."
                        ),
                    )
                } else {
                    (
                        format!("failed authentications from {address} have stopped"),
                        format!(
                            "Fewer than {} failed authentications from {address} in the last {shown}.",
                            rule.count
                        ),
                    )
                }
            },
        );
    }

    async fn check_expiring_keys(&mut self) {
        if self.config.key_expiry_days == 0 {
            return;
        }
        let now = now_unix();
        let horizon = now.saturating_add(
            i64::try_from(self.config.key_expiry_days.saturating_mul(86_400)).unwrap_or(i64::MAX),
        );
        let store = self.gateway.store().clone();
        // The scan reads every key: off the runtime's threads.
        let scanned = tokio::task::spawn_blocking(move || {
            let mut expiring = Vec::new();
            let result = store.scan_keys(None, &mut |key, _| {
                if let Some(at) = key.expires_at
                    && key.active
                    && key.revoked_at.is_none()
                    && at > now
                    && at <= horizon
                {
                    expiring.push(key);
                }
                true
            });
            result.map(|()| expiring)
        })
        .await;
        let expiring = match scanned {
            Ok(Ok(keys)) => keys,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "alerts: cannot read keys for their expiry");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "alerts: the key expiry scan failed");
                return;
            }
        };
        for key in expiring {
            let Some(at) = key.expires_at else { continue };
            if !self.remember(format!("expiry:{}:{at}", key.id)) {
                continue;
            }
            let left = Duration::from_secs(u64::try_from(at - now).unwrap_or(0));
            let days = left.as_secs().div_ceil(86_400);
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0)),
            );
            let alert = self
                .alerts
                .alert(
                    EventKind::KeyExpiring,
                    AlertState::Notice,
                    Severity::Warning,
                )
                .about(
                    key.id.clone(),
                    format!(
                        "key {} ({}) expires within {days} day{}",
                        key.id,
                        key.name,
                        if days == 1 { "" } else { "s" }
                    ),
                    format!(
                        "The key {} of user {} expires at {when}; its calls are refused after \
                         that. Extend it with `admin keys update {} --expires-in 30d`, or give \
                         its owner a new key.",
                        key.id, key.user_id, key.id
                    ),
                );
            self.alerts.publish(&alert);
        }
    }
}
