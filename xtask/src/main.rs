//! `cargo xtask`: Connect's build, bootstrap and test driver.
//!
//! A fresh machine goes from `git clone` to a running agent or a green test run with
//! one command each (`cargo xtask run`, `cargo xtask test`); everything they need
//! (Debian packages, the nightly's rust-src, bpf-linker linked against the nightly's
//! own LLVM) is installed by [`bootstrap`], cached so that a second run costs seconds.
//! Every error names the command that failed.

mod bench;
mod bootstrap;
mod ebpf;
mod lab;
mod loadgen;
mod netns;
mod test;
mod util;
mod vmlab;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, test and run Connect")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker).
    Bootstrap {
        /// Only the Rust toolchain parts and protoc; no apt packages.
        #[arg(long)]
        no_apt: bool,
        /// Install nothing: list each prerequisite, whether it is there and what
        /// installs it; exit non-zero if any is missing.
        #[arg(long)]
        check: bool,
    },
    /// Build the eBPF object into target/bpf/connect-ebpf.o.
    BuildEbpf,
    /// Build the eBPF object and connect-agent (release) with the object embedded.
    Build,
    /// Build, then run the agent (as root) with the given arguments (default: --dev).
    Run {
        /// Arguments for connect-agent.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// fmt, clippy, unit tests, then the privileged integration tests; one summary.
    Test(test::TestArgs),
    /// A multi-node lab in network namespaces: `up [--nodes N]`, `status`, `down`.
    Lab(lab::LabArgs),
    /// The lab on VMs with their own kernel: `box` builds the Vagrant box.
    VmLab(vmlab::VmLabArgs),
    /// Benchmarks against a direct connection and a stunnel pair, on two namespace nodes.
    Bench(bench::BenchArgs),
    /// (internal) the echo server the benchmarks run inside a namespace.
    #[command(hide = true)]
    BenchEcho(loadgen::EchoArgs),
    /// (internal) the benchmark load generators.
    #[command(hide = true, subcommand)]
    BenchClient(loadgen::ClientCommand),
    /// (internal) what the lab runs inside a node's namespace: HTTP requests, an echo.
    #[command(hide = true, subcommand)]
    LabProbe(lab::ProbeCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bootstrap { no_apt, check } => {
            if check {
                bootstrap::check(!no_apt)
            } else {
                bootstrap::run(!no_apt).map(|_| ())
            }
        }
        Command::BuildEbpf => bootstrap::run(false).and_then(|tc| ebpf::build(&tc)),
        Command::Build => build().map(|_| ()),
        Command::Run { args } => run(args),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Lab(args) => lab::run(args),
        Command::VmLab(args) => vmlab::run(args),
        Command::BenchEcho(args) => loadgen::echo(args),
        Command::BenchClient(cmd) => loadgen::client(cmd),
        Command::LabProbe(cmd) => lab::probe(cmd),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub(crate) fn build() -> Result<PathBuf> {
    let tc = bootstrap::run(false)?;
    let bin = build_agent(&tc)?;
    println!("xtask: built {}", bin.display());
    Ok(bin)
}

/// The eBPF object, then the release `connect-agent` with it embedded, stripped into
/// `target/dist/`; returns the stripped binary's path.
pub(crate) fn build_agent(tc: &bootstrap::Toolchain) -> Result<PathBuf> {
    ebpf::build(tc)?;
    util::cargo(&[
        "build",
        "--release",
        "-p",
        "connect-agent",
        "--bin",
        "connect-agent",
    ])?;
    let root = util::workspace_root();
    dist(
        &root.join("target/release/connect-agent"),
        &root.join("target/dist"),
    )
}

/// What is installed: `dist/connect-agent` without debug info (about a sixth of the
/// size), pointing through `.gnu_debuglink` at `dist/connect-agent.debug`, which keeps
/// the debug info for `perf report` and gdb (both find it beside the binary, or under
/// /usr/lib/debug). Redone only when the release binary changed.
fn dist(built: &std::path::Path, dir: &std::path::Path) -> Result<PathBuf> {
    use anyhow::Context;
    let bin = dir.join("connect-agent");
    let debug = dir.join("connect-agent.debug");
    let newer = |a: &std::path::Path, b: &std::path::Path| -> bool {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        match (m(a), m(b)) {
            (Some(a), Some(b)) => a > b,
            _ => true,
        }
    };
    if !newer(built, &bin) && debug.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join("connect-agent.partial");
    util::run_status(
        std::process::Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(built)
            .arg(&debug),
    )?;
    // --add-gnu-debuglink names the file only (no directory); debuggers look beside
    // the binary first.
    util::run_status(
        std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg("--strip-unneeded")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(built)
            .arg(&tmp),
    )?;
    std::fs::rename(&tmp, &bin).with_context(|| format!("cannot write {}", bin.display()))?;
    Ok(bin)
}

fn run(args: Vec<String>) -> Result<()> {
    let tc = bootstrap::run(true)?;
    let bin = build_agent(&tc)?;
    let args = if args.is_empty() {
        vec!["--dev".to_owned()]
    } else {
        args
    };
    let mut cmd = if util::is_root() {
        std::process::Command::new(&bin)
    } else {
        let mut c = std::process::Command::new("sudo");
        c.arg(&bin);
        c
    };
    cmd.args(&args);
    util::run_status(&mut cmd)
}
