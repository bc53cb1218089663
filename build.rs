//! Compiles kefu's public API (`proto/kefu/v1`) with tonic's codegen and writes
//! the descriptor set that the reflection service serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // prost-build finds protoc through this variable.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let well_known = protoc_bin_vendored::include_path()?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/kefu/v1/common.proto",
        "proto/kefu/v1/chat.proto",
        "proto/kefu/v1/agent.proto",
        "proto/kefu/v1/marketing.proto",
        "proto/kefu/v1/admin.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kefu_descriptor.bin"))
        // RPCs that are not served yet answer UNIMPLEMENTED instead of
        // forcing a placeholder handler into the service code.
        .generate_default_stubs(true)
        .compile_protos(
            &protos.map(PathBuf::from),
            &[PathBuf::from("proto"), well_known],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
