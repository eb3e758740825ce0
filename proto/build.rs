use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "densebert4ret/v1/common.proto",
        "densebert4ret/v1/encoder.proto",
        "densebert4ret/v1/index.proto",
        "densebert4ret/v1/gateway.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("densebert4ret_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
