//! Alerts: what is watched (backends, the store, error rate, latency, quotas, expiring
//! keys, failed authentications), when to tell someone, and the channels that carry the
//! message. Nothing here runs on the request path but a few atomic counts and a
//! non-blocking send into a bounded queue: a monitor task decides, one worker per channel
//! delivers (retries with backoff), and a full queue drops a message rather than wait.
//!
//! It knows the gate through core's ports only: it watches [`GateEvents`] and answers the
//! doors through [`Notifier`]; the backends' health comes from the wiring as a function.

pub mod channels;
pub mod message;
mod monitor;
pub mod settings;
mod window;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::Gateway;
use crate::core::error::GatewayError;
use crate::core::events::{Door, GateEvents, QuotaCrossing, SettledCall};
use crate::core::notifier::{DeliveryFigures, Notifier, TestDelivery, TestFuture};
use crate::core::time::{monotonic_ms, now_unix};
use channels::{Channel, DeliveryError};
use message::{Alert, AlertState, Severity};
use settings::{AlertsConfig, EventKind};
use window::CallWindow;

/// One backend's health as the pool sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub name: String,
    pub healthy: bool,
}

/// Reads the backends' health (the wiring passes the pool's status).
pub type BackendProbe = Arc<dyn Fn() -> Vec<BackendHealth> + Send + Sync>;

/// What the request path hands the monitor; kept small, sent without waiting.
#[derive(Debug)]
enum Signal {
    AuthFailed(IpAddr),
    Quota {
        key_id: String,
        key_name: String,
        user_id: String,
        what: &'static str,
        percent: u8,
        used: u64,
        quota: u64,
    },
}

/// A channel's delivery counts.
#[derive(Debug, Default)]
struct ChannelStats {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// A channel, its queue and its counts, shared by the monitor, its worker and the doors.
#[derive(Debug)]
struct Outlet {
    channel: Channel,
    queue: mpsc::Sender<Alert>,
    stats: ChannelStats,
}

/// The alerts: a watcher of the gate's events and the doors' notifier.
#[derive(Debug)]
pub struct Alerts {
    signals: mpsc::Sender<Signal>,
    /// Signals dropped because the monitor's queue was full (a flood of bad keys).
    dropped_signals: AtomicU64,
    errors: CallWindow,
    slow: CallWindow,
    slow_after: Duration,
    outlets: Vec<Arc<Outlet>>,
    source: String,
    /// Taken by [`Alerts::run`].
    pending: std::sync::Mutex<Option<Pending>>,
}

/// The tasks of the alerts; [`AlertTasks::stop`] ends them once shutdown is signalled.
pub struct AlertTasks {
    tasks: Vec<JoinHandle<()>>,
}

impl AlertTasks {
    /// Waits for the monitor and the channel workers, which end on the shutdown token
    /// after trying to deliver what they hold (a few seconds at most).
    pub async fn stop(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "an alerts task failed");
            }
        }
    }
}

/// How long, at shutdown, the messages still queued may take to go out.
const FINAL_DELIVERY: Duration = Duration::from_secs(3);

/// What [`Alerts::run`] starts: the queues' other ends and the settings.
#[derive(Debug)]
struct Pending {
    config: AlertsConfig,
    signals: mpsc::Receiver<Signal>,
    queues: Vec<mpsc::Receiver<Alert>>,
}

impl Alerts {
    /// Builds the channels and their queues; nothing runs until [`Alerts::run`]. In between
    /// the gate can be built with the alerts among its watchers.
    pub fn new(config: &AlertsConfig) -> Result<Arc<Alerts>, String> {
        config.validate()?;
        let timeout = Duration::from_secs(config.timeout_secs);
        let mut outlets = Vec::new();
        let mut queues = Vec::new();
        for channel_config in &config.channels {
            let name = channel_config.name.clone();
            let channel = Channel::new(channel_config.clone(), timeout)
                .map_err(|e| format!("alerts channel `{name}`: {e}"))?;
            let (queue, rx) = mpsc::channel(config.queue_capacity);
            outlets.push(Arc::new(Outlet {
                channel,
                queue,
                stats: ChannelStats::default(),
            }));
            queues.push(rx);
        }
        let (signals, signal_rx) = mpsc::channel(config.queue_capacity.max(64));
        Ok(Arc::new(Alerts {
            signals,
            dropped_signals: AtomicU64::new(0),
            errors: CallWindow::new(Duration::from_secs(config.error_rate.window_secs)),
            slow: CallWindow::new(Duration::from_secs(config.latency.window_secs)),
            slow_after: Duration::from_millis(config.latency.p95_ms),
            outlets,
            source: config.source.clone(),
            pending: std::sync::Mutex::new(Some(Pending {
                config: config.clone(),
                signals: signal_rx,
                queues,
            })),
        }))
    }

    /// Starts the monitor and one worker per channel, all ending on `shutdown`. Only the
    /// first call starts anything.
    pub fn run(
        self: &Arc<Self>,
        gateway: Arc<Gateway>,
        backends: BackendProbe,
        shutdown: CancellationToken,
    ) -> AlertTasks {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(pending) = pending else {
            return AlertTasks { tasks: Vec::new() };
        };
        let config = pending.config;
        let retry = Retry {
            attempts: config.max_attempts,
            backoff: Duration::from_millis(config.retry_backoff_ms),
        };
        let mut tasks: Vec<JoinHandle<()>> = self
            .outlets
            .iter()
            .zip(pending.queues)
            .map(|(outlet, rx)| {
                tokio::spawn(deliver_queue(outlet.clone(), rx, retry, shutdown.clone()))
            })
            .collect();
        let monitor = monitor::Monitor::new(config, self.clone(), gateway, backends);
        tasks.push(tokio::spawn(monitor.run(pending.signals, shutdown)));
        tracing::info!(
            channels = self.outlets.len(),
            "alerts: watching backends, the store, error rate, latency, quotas, key expiry \
             and failed authentications"
        );
        AlertTasks { tasks }
    }

    /// Queues `alert` for every channel that wants it; a full queue drops it (counted).
    fn publish(&self, alert: &Alert) {
        tracing::info!(
            event = alert.event.as_str(),
            state = alert.state.as_str(),
            subject = %alert.subject,
            "alert: {}",
            alert.title
        );
        for outlet in &self.outlets {
            if !outlet.channel.config.wants(alert.event) {
                continue;
            }
            if outlet.queue.try_send(alert.clone()).is_err() {
                outlet.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    channel = outlet.channel.name(),
                    "alerts: the channel's queue is full; a message was dropped"
                );
            }
        }
    }

    fn signal(&self, signal: Signal) {
        if self.signals.try_send(signal).is_err() {
            self.dropped_signals.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn alert(&self, event: EventKind, state: AlertState, severity: Severity) -> AlertDraft<'_> {
        AlertDraft {
            source: &self.source,
            event,
            state,
            severity,
        }
    }
}

/// The fields every alert of one kind shares, before its words.
struct AlertDraft<'a> {
    source: &'a str,
    event: EventKind,
    state: AlertState,
    severity: Severity,
}

impl AlertDraft<'_> {
    fn about(self, subject: impl Into<String>, title: String, text: String) -> Alert {
        Alert {
            event: self.event,
            state: self.state,
            severity: if self.state == AlertState::Resolved {
                Severity::Info
            } else {
                self.severity
            },
            subject: subject.into(),
            title,
            text,
            at: now_unix(),
            source: self.source.to_owned(),
        }
    }
}

impl GateEvents for Alerts {
    fn call_started(&self, _: Door) {}

    fn call_withdrawn(&self, _: Door) {}

    fn call_settled(&self, call: &SettledCall<'_>) {
        let now = monotonic_ms();
        // The model server's failures; a client's 4xx passed on from it is not one.
        let failed = call.status >= 500
            || matches!(
                call.outcome,
                "upstream_failed" | "timed_out" | "stream_incomplete"
            );
        self.errors.record(now, failed);
        // A stream's latency is its time to the first token (`first_chunk`).
        if !call.stream {
            self.slow.record(now, call.total > self.slow_after);
        }
    }

    fn first_chunk(&self, _: Door, _: &str, after: Duration) {
        self.slow.record(monotonic_ms(), after > self.slow_after);
    }

    fn refused(&self, _: &'static str) {}

    fn auth_failed(&self, client: Option<IpAddr>) {
        if let Some(client) = client {
            self.signal(Signal::AuthFailed(client));
        }
    }

    fn quota_crossed(&self, crossing: &QuotaCrossing<'_>) {
        self.signal(Signal::Quota {
            key_id: crossing.key_id.to_owned(),
            key_name: crossing.key_name.to_owned(),
            user_id: crossing.user_id.to_owned(),
            what: crossing.what,
            percent: crossing.percent,
            used: crossing.used,
            quota: crossing.quota,
        });
    }
}

impl Notifier for Alerts {
    fn send_test<'a>(&'a self, channel: Option<&'a str>) -> TestFuture<'a> {
        Box::pin(async move {
            let outlets: Vec<&Arc<Outlet>> = self
                .outlets
                .iter()
                .filter(|o| channel.is_none_or(|name| o.channel.name() == name))
                .collect();
            if outlets.is_empty() {
                return Err(GatewayError::NotFound {
                    what: "alert channel",
                    id: channel.unwrap_or_default().to_owned(),
                });
            }
            let sends = outlets.into_iter().map(|outlet| async move {
                let config = &outlet.channel.config;
                let alert = self
                    .alert(EventKind::Test, AlertState::Notice, Severity::Info)
                    .about(
                        config.name.clone(),
                        format!("test message to channel {}", config.name),
                        format!(
                            "Sent by `step3-gateway admin alerts test` to the {} channel `{}`. \
                             If you read this, the channel works.",
                            config.kind.as_str(),
                            config.name
                        ),
                    );
                let result = outlet.channel.deliver(&alert).await;
                outlet.count(&result);
                TestDelivery {
                    channel: config.name.clone(),
                    kind: config.kind.as_str().to_owned(),
                    delivered: result.is_ok(),
                    error: result.err().map(|e| e.0),
                }
            });
            Ok(futures_util::future::join_all(sends).await)
        })
    }

    fn figures(&self) -> Vec<DeliveryFigures> {
        self.outlets
            .iter()
            .map(|o| DeliveryFigures {
                channel: o.channel.name().to_owned(),
                sent: o.stats.sent.load(Ordering::Relaxed),
                failed: o.stats.failed.load(Ordering::Relaxed),
                dropped: o.stats.dropped.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl Outlet {
    fn count(&self, result: &Result<(), DeliveryError>) {
        match result {
            Ok(()) => self.stats.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[derive(Clone, Copy, Debug)]
struct Retry {
    attempts: u32,
    backoff: Duration,
}

/// A channel's worker: sends each queued alert, trying again with a doubling wait; at
/// shutdown, gives what is still queued one try within [`FINAL_DELIVERY`].
async fn deliver_queue(
    outlet: Arc<Outlet>,
    mut queue: mpsc::Receiver<Alert>,
    retry: Retry,
    shutdown: CancellationToken,
) {
    loop {
        let alert = tokio::select! {
            alert = queue.recv() => match alert {
                Some(alert) => alert,
                None => return,
            },
            () = shutdown.cancelled() => break,
        };
        let mut wait = retry.backoff;
        for attempt in 1..=retry.attempts {
            let result = outlet.channel.deliver(&alert).await;
            if let Err(e) = &result {
                tracing::warn!(
                    channel = outlet.channel.name(),
                    event = alert.event.as_str(),
                    attempt,
                    error = %e,
                    "alerts: delivery failed"
                );
                if attempt < retry.attempts {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => {
                            outlet.count(&result);
                            break;
                        }
                    }
                    wait = wait.saturating_mul(2);
                    continue;
                }
            }
            outlet.count(&result);
            break;
        }
    }
    let last = async {
        while let Ok(alert) = queue.try_recv() {
            let result = outlet.channel.deliver(&alert).await;
            outlet.count(&result);
        }
    };
    if tokio::time::timeout(FINAL_DELIVERY, last).await.is_err() {
        tracing::warn!(
            channel = outlet.channel.name(),
            "alerts: messages still queued at shutdown were not sent"
        );
    }
}
