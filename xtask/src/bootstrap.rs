//! Installs what building and testing need, idempotently and quickly when done.
//!
//! - Debian packages the tests use (only those missing; `apt-get update` once).
//! - `protoc` and google/protobuf's well-known `.proto` files, which etcd-client's build
//!   script needs: copied from the protoc-bin-vendored crate (crates.io) into
//!   `target/tools/protoc`, where `.cargo/config.toml` points `PROTOC` and
//!   `PROTOC_INCLUDE`. No Debian package is involved, so a missing include file can no
//!   longer hide behind a package installed on one machine and not another.
//! - `rust-src` on the nightly toolchain (for `-Z build-std=core`).
//! - bpf-linker, built against the LLVM shared library inside the nightly toolchain
//!   (no LLVM development package matches the nightly's LLVM on Debian bookworm, and
//!   prebuilt downloads are not available here; see shared/TOOLCHAIN.md). It is cached
//!   under ~/.cache/connect, keyed by its version and the LLVM major version.
//!
//! [`check`] lists every prerequisite, whether it is there and what installs it;
//! `cargo xtask test` runs it first, so a machine that cannot install what is missing
//! fails in its first second, naming it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, describe, is_root, output, run_status};

/// bpf-linker's version; must support the nightly's LLVM major version.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests, the lab and the bench use, with the command each
/// provides (empty: checked by package only).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("socat", "socat"),
    ("netcat-openbsd", "nc"),
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    ("dnsutils", "dig"),
    ("iperf3", "iperf3"),
    ("stunnel4", "stunnel4"),
    ("openssl", "openssl"),
    ("curl", "curl"),
    ("tcpdump", "tcpdump"),
    ("util-linux", "nsenter"),
    // objcopy: `cargo xtask build` ships the agent stripped, its debug info beside it.
    ("binutils", "objcopy"),
    ("python3-venv", ""),
    ("vagrant", "vagrant"),
];

/// Debian packages of the VM lab (`cargo xtask vm-lab`): building its box and
/// running its VMs under qemu.
const VM_LAB_PACKAGES: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("qemu-utils", "qemu-img"),
    ("e2fsprogs", "mkfs.ext4"),
    ("openssh-client", "ssh"),
];

/// Installs the VM lab's packages that are missing.
pub fn vm_lab_packages() -> Result<()> {
    apt_install(VM_LAB_PACKAGES)
}

/// Where bootstrap puts protoc and its include files (see `.cargo/config.toml`).
const PROTOC_DIR: &str = "target/tools/protoc";

/// What the eBPF build needs: where bpf-linker lives.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub bpf_linker_bin: PathBuf,
}

pub fn run(with_apt: bool) -> Result<Toolchain> {
    if with_apt {
        apt_packages()?;
    }
    protoc()?;
    lint_components()?;
    rust_src()?;
    let bpf_linker_bin = bpf_linker()?;
    Ok(Toolchain { bpf_linker_bin })
}

/// One prerequisite: what it is, whether it is there, and what installs it.
#[derive(Debug)]
pub struct Prerequisite {
    pub name: String,
    pub present: bool,
    pub installed_by: String,
}

/// Every prerequisite of building and testing, checked without installing anything.
pub fn prerequisites(with_apt: bool) -> Vec<Prerequisite> {
    let mut list = Vec::new();
    if with_apt {
        for (pkg, _) in APT_PACKAGES {
            list.push(Prerequisite {
                name: format!("Debian package {pkg}"),
                present: dpkg_installed(pkg),
                installed_by: format!("apt-get install {pkg}"),
            });
        }
    }
    for (component, tool) in LINT_COMPONENTS {
        list.push(Prerequisite {
            name: format!("{tool} on this toolchain"),
            present: tool_present(tool),
            installed_by: format!("rustup component add {component}"),
        });
    }
    let sysroot = nightly_sysroot().ok();
    list.push(Prerequisite {
        name: "nightly toolchain".to_owned(),
        present: sysroot.is_some(),
        installed_by: "rustup toolchain install nightly (not installed by bootstrap)".to_owned(),
    });
    list.push(Prerequisite {
        name: "rust-src on the nightly".to_owned(),
        present: sysroot
            .as_ref()
            .is_some_and(|s| s.join("lib/rustlib/src/rust/library/core").is_dir()),
        installed_by: "rustup component add rust-src --toolchain nightly".to_owned(),
    });
    list.push(Prerequisite {
        name: format!("bpf-linker {BPF_LINKER_VERSION}"),
        present: bpf_linker_prefix().is_ok_and(|p| works(&p.join("bin/bpf-linker"))),
        installed_by: "cargo install bpf-linker (built against the nightly's libLLVM, cached under ~/.cache/connect)".to_owned(),
    });
    let protoc_dir = util::workspace_root().join(PROTOC_DIR);
    list.push(Prerequisite {
        name: "protoc with well-known types".to_owned(),
        present: protoc_dir.join("bin/protoc").is_file()
            && protoc_dir
                .join("include/google/protobuf/descriptor.proto")
                .is_file(),
        installed_by: format!("copied from the protoc-bin-vendored crate into {PROTOC_DIR}"),
    });
    list
}

/// `cargo xtask bootstrap --check`: prints every prerequisite; fails if any is missing.
pub fn check(with_apt: bool) -> Result<()> {
    let list = prerequisites(with_apt);
    for p in &list {
        println!(
            "  {:<7} {:<34} {}",
            if p.present { "ok" } else { "MISSING" },
            p.name,
            p.installed_by
        );
    }
    let missing: Vec<&str> = list
        .iter()
        .filter(|p| !p.present)
        .map(|p| p.name.as_str())
        .collect();
    if !missing.is_empty() {
        bail!("missing: {}", missing.join(", "));
    }
    Ok(())
}

/// What `cargo xtask test` runs first: checks, and if something is missing and this
/// process cannot install it (not root, no network), fails at once naming it.
pub fn check_or_install(with_apt: bool) -> Result<Toolchain> {
    let missing: Vec<Prerequisite> = prerequisites(with_apt)
        .into_iter()
        .filter(|p| !p.present)
        .collect();
    let apt_missing: Vec<&Prerequisite> = missing
        .iter()
        .filter(|p| p.name.starts_with("Debian package"))
        .collect();
    if !apt_missing.is_empty() && !is_root() {
        bail!(
            "missing, and installing needs root: {} (run `sudo cargo xtask bootstrap`, or install them: `sudo apt-get install {}`)",
            apt_missing
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            apt_missing
                .iter()
                .filter_map(|p| p.name.strip_prefix("Debian package "))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(p) = missing.iter().find(|p| p.name == "nightly toolchain") {
        bail!("missing: {} ({})", p.name, p.installed_by);
    }
    if !missing.is_empty() {
        println!(
            "xtask: installing {}",
            missing
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    run(with_apt)
}

/// Copies protoc and its include files from the protoc-bin-vendored crate into
/// [`PROTOC_DIR`] (only when they differ), where `.cargo/config.toml` points cargo.
fn protoc() -> Result<()> {
    let bin = protoc_bin_vendored::protoc_bin_path()
        .map_err(|e| anyhow::anyhow!("protoc-bin-vendored has no protoc for this platform: {e}"))?;
    let include = protoc_bin_vendored::include_path()
        .map_err(|e| anyhow::anyhow!("protoc-bin-vendored has no include files: {e}"))?;
    let dest = util::workspace_root().join(PROTOC_DIR);
    copy_if_changed(&bin, &dest.join("bin/protoc"))?;
    copy_tree(&include, &dest.join("include"))?;
    let mut cmd = Command::new(dest.join("bin/protoc"));
    cmd.arg("--version");
    output(&mut cmd).context("the vendored protoc does not run on this machine")?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            copy_if_changed(&path, &target)?;
        }
    }
    Ok(())
}

fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let new = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    if std::fs::read(to).ok().as_deref() == Some(new.as_slice()) {
        return Ok(());
    }
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Write beside and rename, so a build running meanwhile never sees half a file.
    let tmp = to.with_extension("partial");
    std::fs::write(&tmp, &new).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mode = std::fs::metadata(from)
        .with_context(|| format!("cannot stat {}", from.display()))?
        .permissions();
    std::fs::set_permissions(&tmp, mode)
        .with_context(|| format!("cannot set permissions on {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot write {}", to.display()))
}

fn works(bin: &Path) -> bool {
    bin.is_file()
        && Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn apt_packages() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// Installs what is missing of `packages`. Twice at most: installing one package
/// can remove another (Debian's qemu-system-x86 replaces a backported
/// qemu-utils), so what is missing is checked again afterwards.
fn apt_install(packages: &[(&str, &str)]) -> Result<()> {
    for _ in 0..2 {
        apt_install_once(packages)?;
    }
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        bail!(
            "Debian packages {} are still missing after apt-get install",
            missing.join(" ")
        );
    }
    Ok(())
}

fn apt_install_once(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
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

/// rustup components the fmt and clippy steps run, with the tool each provides.
const LINT_COMPONENTS: &[(&str, &str)] = &[("rustfmt", "rustfmt"), ("clippy", "clippy-driver")];

/// Whether `tool` runs from the toolchain this cargo belongs to (rustup's proxies
/// exist even when the component does not, so run it).
fn tool_present(tool: &str) -> bool {
    let dir = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .and_then(|c| c.parent().map(PathBuf::from));
    let bin = dir.map(|d| d.join(tool)).filter(|p| p.is_file());
    let mut cmd = Command::new(bin.unwrap_or_else(|| PathBuf::from(tool)));
    cmd.arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd.status().is_ok_and(|s| s.success())
}

fn lint_components() -> Result<()> {
    for (component, tool) in LINT_COMPONENTS {
        if !tool_present(tool) {
            println!("xtask: adding {component} to the toolchain");
            run_status(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
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

fn bpf_linker_prefix() -> Result<PathBuf> {
    let llvm = nightly_llvm_major()?;
    Ok(cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{llvm}")))
}

fn bpf_linker() -> Result<PathBuf> {
    let llvm = nightly_llvm_major()?;
    let prefix = bpf_linker_prefix()?;
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
    if works(&bin) {
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
