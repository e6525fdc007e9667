//! step3-gateway: an authenticating, rate-limiting, metering gateway in front of a
//! self-hosted STEP3-VL (OpenAI-compatible) model server.

pub mod admin_client;
pub mod app;
pub mod backup;
pub mod cache;
pub mod call;
pub mod cli;
pub mod config;
pub mod console;
pub mod core;
pub mod edge;
pub mod grpc;
pub mod metrics;
pub mod notify;
pub mod progress;
pub mod rest;
pub mod server;
pub mod sim;
pub mod store;
pub mod store_copy;
pub mod telemetry;
pub mod tls;
pub mod upstream;
