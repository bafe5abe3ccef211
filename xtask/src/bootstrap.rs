//! Installs what building and testing need, idempotently and quickly when done.
//!
//! - Debian packages the build and the tests use (only those missing; `apt-get update`
//!   once), among them `protobuf-compiler`: etcd-client's build script runs `protoc`.
//! - `rust-src` on the nightly toolchain (for `-Z build-std=core`).
//! - bpf-linker, built against the LLVM shared library inside the nightly toolchain
//!   (no LLVM development package matches the nightly's LLVM on Debian bookworm, and
//!   prebuilt downloads are not available here; see shared/TOOLCHAIN.md). It is cached
//!   under ~/.cache/connect, keyed by its version and the LLVM major version.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{describe, is_root, output, run_status};

/// bpf-linker's version; must support the nightly's LLVM major version.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the build and the tests use, with the command each provides.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("socat", "socat"),
    ("netcat-openbsd", "nc"),
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    // The agent's build: etcd-client's build script compiles etcd's protos with protoc.
    ("protobuf-compiler", "protoc"),
    ("dnsutils", "dig"),
    ("iperf3", "iperf3"),
    ("stunnel4", "stunnel4"),
    ("openssl", "openssl"),
    ("tcpdump", "tcpdump"),
    ("util-linux", "nsenter"),
    ("python3-venv", ""),
    ("vagrant", "vagrant"),
];

/// What the eBPF build needs: where bpf-linker lives.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub bpf_linker_bin: PathBuf,
}

pub fn run(with_apt: bool) -> Result<Toolchain> {
    if with_apt {
        apt_packages()?;
    }
    rust_src()?;
    let bpf_linker_bin = bpf_linker()?;
    Ok(Toolchain { bpf_linker_bin })
}

/// Fails with the package to install when `protoc`, which building the agent needs, is
/// missing: for the commands that build without installing Debian packages.
pub fn require_protoc() -> Result<()> {
    // prost-build honours PROTOC, so a protoc elsewhere is fine too.
    if std::env::var_os("PROTOC").is_some() || on_path("protoc") {
        return Ok(());
    }
    bail!(
        "building connect-agent needs `protoc` (etcd-client's build script runs it): install Debian's protobuf-compiler (`sudo apt-get install protobuf-compiler`) or run `sudo cargo xtask bootstrap`"
    )
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: install them as root (`sudo apt-get install {}`) or run `sudo cargo xtask bootstrap`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    println!("xtask: installing {}", missing.join(" "));
    run_status(Command::new("apt-get").arg("update").arg("-qq"))?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run_status(&mut cmd)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    println!("xtask: adding rust-src to the nightly toolchain");
    run_status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let mut cmd = Command::new("rustc");
    cmd.args(["+nightly", "--print", "sysroot"]);
    let out = output(&mut cmd)
        .context("the nightly toolchain is needed for eBPF (`rustup toolchain install nightly`)")?;
    Ok(PathBuf::from(out.trim()))
}

/// The nightly's LLVM major version, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> Result<u32> {
    let mut cmd = Command::new("rustc");
    cmd.args(["+nightly", "-vV"]);
    let out = output(&mut cmd)?;
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .with_context(|| format!("`{}` printed no LLVM version", describe(&cmd)))?;
    line.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {line:?}"))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("connect")
}

fn bpf_linker() -> Result<PathBuf> {
    let llvm = nightly_llvm_major()?;
    let prefix = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{llvm}"));
    let bin = prefix.join("bin/bpf-linker");
    let sysroot = nightly_sysroot()?;
    let lib = find_libllvm(&sysroot)?;
    std::fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("cannot create {}", prefix.display()))?;
    // Keep the rpath target pointing at the current nightly's library (a nightly
    // update replaces the file name).
    // `libLLVM.so` for the build (LLVM_PREFIX), and every file name the nightly ships
    // the library under, since the installed binary asks for its soname through its
    // rpath.
    let mut names = vec![PathBuf::from("libLLVM.so")];
    names.extend(libllvm_names(&sysroot)?);
    for name in names {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), lib.display()))?;
    }
    if bin.is_file()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(prefix.join("bin"));
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm} (about a minute)"
    );
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{llvm}"),
        "--root",
    ])
    .arg(&prefix)
    .env("LLVM_PREFIX", &prefix)
    // Build with the default (stable) toolchain, not the one this xtask was started with.
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO")
    .current_dir(std::env::temp_dir());
    run_status(&mut cmd)?;
    Ok(prefix.join("bin"))
}

/// The LLVM shared library inside the nightly (`libLLVM.so.<ver>-rust-<ver>`).
fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let names = libllvm_names(sysroot)?;
    let pick = names
        .iter()
        .find(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        .or_else(|| names.first())
        .with_context(|| {
            format!(
                "no libLLVM shared library in {}/lib: is the nightly toolchain complete?",
                sysroot.display()
            )
        })?;
    Ok(sysroot.join("lib").join(pick))
}

fn libllvm_names(sysroot: &Path) -> Result<Vec<PathBuf>> {
    let dir = sysroot.join("lib");
    let entries =
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| PathBuf::from(e.file_name())))
        .filter(|n| n.to_string_lossy().starts_with("libLLVM"))
        .collect();
    found.sort();
    Ok(found)
}
