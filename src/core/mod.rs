//! The gate: protocol-free authentication, policy, limits, quotas and metering, shared by
//! the REST and gRPC doors. Nothing here knows HTTP, axum, tonic or sled.

pub mod admin;
pub mod chat;
pub mod error;
pub mod gateway;
pub mod images;
pub mod keys;
pub mod limits;
pub mod quota;
pub mod records;

pub use error::GatewayError;
pub use gateway::{Admission, CallFacts, Caller, GateSettings, Gateway, Remaining};
