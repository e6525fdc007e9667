//! Integration tests: the real gateway in front of the simulated STEP3-VL server.
#![expect(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

mod access;
mod admin;
mod admin_cli;
mod admin_input;
mod alerts;
mod apis;
mod audit;
mod backups;
mod billing;
mod binary;
mod books;
mod cache;
mod chat;
mod common;
mod console;
mod crash;
mod data_dir;
mod errors;
mod faults;
mod first_start;
mod grpc;
mod grpc_admin;
mod grpc_health;
mod grpcurl_readme;
mod hardening;
mod hostile;
mod image_fetch;
mod jwt;
mod key_shape;
mod key_tokens;
mod models;
mod money;
mod openai_sdk;
mod pool;
mod reflection_client;
mod secrets;
mod shared;
mod store_copy;
mod surface;
mod tls;
mod tls_upstream;
mod traces;
