//! Compiles `proto/` with protox (a Rust protobuf compiler, so no system `protoc`) and
//! generates the prost messages and tonic clients and servers into `OUT_DIR`, together
//! with the encoded file descriptor set that server reflection serves.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "proto/switchyard/v1/session.proto",
    "proto/switchyard/v1/admin.proto",
    "proto/switchyard/v1/membership.proto",
    "proto/switchyard/bench/v1/echo.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTO_FILES {
        println!("cargo:rerun-if-changed={proto}");
    }
    let file_descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("switchyard_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    // Every generated client and server decodes with ValidatingCodec: an undecodable
    // request is INVALID_ARGUMENT naming its field.
    tonic_prost_build::configure()
        .codec_path("crate::codec::ValidatingCodec")
        .compile_fds(file_descriptors)?;
    Ok(())
}
