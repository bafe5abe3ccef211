//! Builds the kernel programs and puts the object where connect-agent embeds it.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{bootstrap::Toolchain, util};

/// Where the agent's build script expects the object (see connect-agent/build.rs).
pub const OBJECT_PATH: &str = "target/bpf/connect-ebpf.o";

pub fn build(tc: &Toolchain) -> Result<()> {
    let root = util::workspace_root();
    let crate_dir = root.join("connect-ebpf");
    let mut cmd = nightly_cargo(tc);
    cmd.args(["build", "--release"]).current_dir(&crate_dir);
    util::run_status(&mut cmd)?;
    let built = crate_dir.join("target/bpfel-unknown-none/release/connect-ebpf");
    let dest = root.join(OBJECT_PATH);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Copy only when changed, so connect-agent is not rebuilt needlessly.
    let new = std::fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    if std::fs::read(&dest).ok().as_deref() != Some(new.as_slice()) {
        std::fs::write(&dest, &new).with_context(|| format!("cannot write {}", dest.display()))?;
    }
    Ok(())
}

/// `cargo` for connect-ebpf: its rust-toolchain.toml selects the nightly, and
/// bpf-linker must be on PATH.
pub fn nightly_cargo(tc: &Toolchain) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tc.bpf_linker_bin.clone()];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("cargo");
    // Drop the outer cargo's toolchain choice so rust-toolchain.toml applies.
    cmd.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env("PATH", std::env::join_paths(paths).unwrap_or(path));
    cmd
}
