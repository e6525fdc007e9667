//! The notifier port: what the doors may ask of the alerts (a test message to a channel,
//! the delivery figures for `/metrics`) without knowing how messages are sent.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

use super::error::GatewayError;

/// What happened to one test message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TestDelivery {
    pub channel: String,
    /// `webhook`, `dingtalk`, `feishu`, `wecom`, `slack` or `email`.
    pub kind: String,
    pub delivered: bool,
    /// Why it was not delivered; never a channel's URL or secret.
    pub error: Option<String>,
}

/// A channel's delivery counts since start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryFigures {
    pub channel: String,
    pub sent: u64,
    pub failed: u64,
    /// Messages dropped because the channel's queue was full.
    pub dropped: u64,
}

pub type TestFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<TestDelivery>, GatewayError>> + Send + 'a>>;

/// The alerts as the doors see them.
pub trait Notifier: Send + Sync + std::fmt::Debug + 'static {
    /// Sends a test message to `channel` (every channel when `None`) at once, outside the
    /// queue, and says how each delivery went. An unknown channel is `NotFound`.
    fn send_test<'a>(&'a self, channel: Option<&'a str>) -> TestFuture<'a>;
    /// Delivery counts by channel.
    fn figures(&self) -> Vec<DeliveryFigures>;
}

impl super::Gateway {
    /// `admin alerts test`: a test message to `channel`, or to every channel.
    pub async fn test_alert(
        &self,
        channel: Option<&str>,
    ) -> Result<Vec<TestDelivery>, GatewayError> {
        let Some(notifier) = self.notifier() else {
            return Err(GatewayError::invalid_request(
                "no alert channels are configured ([[alerts.channels]] in the configuration)",
                Some("channel"),
            ));
        };
        notifier.send_test(channel).await
    }

    /// Delivery counts by channel (empty when alerting is off).
    pub fn delivery_figures(&self) -> Vec<DeliveryFigures> {
        self.notifier().map(|n| n.figures()).unwrap_or_default()
    }
}
