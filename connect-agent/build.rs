//! Embeds the eBPF object that `cargo xtask build-ebpf` writes at one fixed path.
//!
//! A missing object is a build error naming the command that makes it: the agent is
//! self-contained and never looks for a `.o` file at run time.
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let object = manifest_dir
        .parent()
        .expect("connect-agent sits inside the workspace")
        .join("target/bpf/connect-ebpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the eBPF object {} is missing: run `cargo xtask build-ebpf` (or `cargo xtask build`) first",
            object.display()
        );
    }
    println!("cargo:rustc-env=CONNECT_EBPF_OBJECT={}", object.display());

    // The SPIFFE Workload API (server, and a client for the tests). protoc and
    // google/protobuf's .proto files come from `.cargo/config.toml`'s PROTOC and
    // PROTOC_INCLUDE (`cargo xtask bootstrap` puts them there).
    println!("cargo:rerun-if-changed=proto/workload.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/workload.proto"], &["proto"])
        .expect("compiling proto/workload.proto");
}
