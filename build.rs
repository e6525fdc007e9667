//! Compiles the protos with protox (no system `protoc`) and writes the descriptor set that
//! server reflection serves.

use std::path::PathBuf;

/// Admin messages the CLI prints as JSON.
const SERIALIZED: &[&str] = &[
    "User",
    "ListUsersResponse",
    "Key",
    "CreatedKey",
    "ListKeysResponse",
    "UsageBucket",
    "UsageReport",
    "Call",
    "ImageSize",
    "ListCallsResponse",
    "AlertDelivery",
    "TestAlertResponse",
    "Price",
    "ListPricesResponse",
    "InvoiceLine",
    "Invoice",
    "AuditEntry",
    "ListAuditResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/step3/gateway/v1/chat.proto",
        "proto/step3/gateway/v1/admin.proto",
    ];
    let descriptors = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(files)?
        .file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("step3_gateway_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Small per-call buffers: see src/grpc/codec.rs.
    let mut config = tonic_prost_build::configure().codec_path("crate::grpc::codec::SmallCodec");
    for name in SERIALIZED {
        config = config.type_attribute(
            format!(".step3.gateway.v1.{name}"),
            "#[derive(serde::Serialize)]",
        );
    }
    config.compile_fds(descriptors)?;
    Ok(())
}
