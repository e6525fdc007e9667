//! The gRPC door (tonic): `Chat` and `Admin` services, health and reflection.

pub mod pb {
    //! Code generated from `proto/step3/gateway/v1`.
    #![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("step3.gateway.v1");

    /// The encoded descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("step3_gateway_descriptor");
}
