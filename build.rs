//! Compiles `proto/` without a system `protoc`: protox parses the sources into
//! a descriptor set, tonic-prost-build generates the Rust code from it, and the
//! full set (imports included) is written to `OUT_DIR/keel_descriptor.bin` for
//! reflection and the HTTP gateway.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = Path::new("proto");
    let mut entry_points = Vec::new();
    collect_service_protos(proto_root, &mut entry_points)?;
    entry_points.sort();
    println!("cargo:rerun-if-changed={}", proto_root.display());

    let mut compiler = protox::Compiler::new([proto_root])?;
    compiler.include_imports(true).include_source_info(true);
    for file in &entry_points {
        let relative = file.strip_prefix(proto_root)?;
        compiler.open_file(relative)?;
    }
    // Encoded by protox itself: a round trip through prost-types would drop
    // custom options such as the google.api.http annotations.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("keel_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    let descriptors = compiler.file_descriptor_set();

    // prost-build needs the imports to analyse types; it writes a module for
    // them too, but only our own packages are included by src/lib.rs.
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}

/// Every `.proto` under `proto/` except the vendored `google/` schemas is an
/// entry point, so a new service file needs no change here.
fn collect_service_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "google") && path.parent() == Some(Path::new("proto")) {
                continue;
            }
            collect_service_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
