//! The gate: protocol-free authentication, policy, limits, quotas and metering, shared by
//! every door, and the ports through which it keeps its books (`store`, `usage_sink`) and
//! reports what happens (`events`). Nothing here knows HTTP, axum, tonic or sled.

pub mod access;
pub mod admin;
pub mod admission;
pub mod audit;
pub mod billing;
pub mod catalogue;
pub mod error;
pub mod events;
pub mod export;
pub mod gateway;
pub mod identity;
pub mod images;
pub mod journal;
pub mod key_index;
pub mod keys;
pub mod limits;
pub mod model_admin;
pub mod money;
pub mod notifier;
pub mod period;
pub mod pricing;
pub mod quota;
pub mod rate_limit;
pub mod records;
pub mod request;
mod settlement;
pub mod shared_limits;
pub mod snapshot;
mod spend;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod time;
pub mod usage_sink;

pub use admission::{Admission, CallFacts, ChargeFactor};
pub use error::GatewayError;
pub use gateway::{GateSettings, Gateway};
pub use key_index::{Caller, Remaining};
