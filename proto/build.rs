//! Compiles every .proto of the workspace once, and writes the descriptor set that server reflection serves.
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "palette/segmenter/v1/segmenter.proto",
    "palette/orchestrator/v1/orchestrator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // tonic 0.14's builder no longer emits rerun-if-changed lines; list the inputs ourselves.
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("palette_descriptor.bin"))
        .compile_with_config(
            config,
            PROTOS,
            &[".", include.to_str().ok_or("non-UTF-8 include path")?],
        )?;
    Ok(())
}
