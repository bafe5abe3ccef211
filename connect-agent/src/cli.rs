//! The command line: `connect-agent [flags]` runs the agent; subcommands talk to a
//! running agent's HTTP API, with flags and output like `consul`'s.
//!
//! Consul's CLI takes Go-style flags (`-service web`, `-http-addr=...`); clap wants
//! `--service`. [`normalize_args`] rewrites single-dash long flags before parsing, so
//! both spellings work, as they do for `consul`.

pub mod acl;
pub mod ca;
pub mod doctor;
pub mod http;
pub mod intention;
pub mod proxy;
pub mod services;

use std::{ffi::OsString, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::AgentArgs;

/// Connect: service identities, intentions and transparent mutual TLS for a node.
#[derive(Debug, Parser)]
#[command(
    name = "connect-agent",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub agent: AgentArgs,
}

/// Subcommands that talk to a running agent.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and configure the built-in CA (roots, configuration, rotation).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Ask the running agent to re-read its config directory (like SIGHUP).
    Reload(http::HttpArgs),
    /// Make a lab network namespace's applications resolve through its agent.
    ///
    /// Checks that the node's agent answers DNS on port 53 in the namespace (run it
    /// with `--dns-addr 127.0.0.1:53`: the system resolver only uses port 53), then
    /// writes /etc/netns/NAME/resolv.conf, which `ip netns exec NAME ...` mounts as
    /// /etc/resolv.conf for the processes it starts.
    DnsSetup(crate::dns::setup::SetupArgs),
    /// Manage intentions: which services may connect to which.
    Intention(intention::IntentionArgs),
    /// Manage ACL tokens and policies.
    Acl(acl::AclArgs),
    /// Check the running agent against the Connect security checklist.
    Doctor(http::HttpArgs),
    /// Register, deregister and list the agent's services.
    #[command(subcommand)]
    Services(services::ServicesCommand),
    /// Run a Connect proxy for a service, through the local agent (like `consul connect proxy`).
    Proxy(proxy::ProxyArgs),
    /// Remove Connect's eBPF programs and maps from a cgroup.
    ///
    /// They are pinned on bpffs and outlive the agent on purpose (a crash or an
    /// upgrade must not open the services' plaintext ports); this is the deliberate
    /// way to take them away. Run it after stopping the agent.
    Detach(DetachArgs),
    /// List Connect's eBPF programs loaded in this kernel, with the verifier's
    /// instruction counts (what a kernel upgrade or a program change moves).
    Programs,
}

/// Arguments of `connect-agent detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The `--cgroup` the agent ran with.
    #[arg(long, value_name = "PATH")]
    pub cgroup: std::path::PathBuf,
}

impl Command {
    /// Whether the command runs long and logs as it goes (main sets up logging).
    pub fn streams_logs(&self) -> bool {
        matches!(self, Command::Proxy(_))
    }
}

/// Rewrites `-flag` and `-flag=value` to `--flag...` (Go flag style, as `consul`
/// takes), leaving short flags (`-h`, `-V`), negative numbers, lone `-` and
/// everything after `--` alone.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        let is_go_long = s.starts_with('-')
            && !s.starts_with("--")
            && s.len() > 2
            && s[1..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
            && s[1..].split('=').next().is_some_and(|name| name.len() > 1);
        if is_go_long {
            out.push(OsString::from(format!("-{s}")));
        } else {
            out.push(arg);
        }
    }
    out
}

/// Runs a subcommand and turns its result into Consul's exit codes.
pub async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Ca(cmd) => ca::run(cmd).await,
        Command::Reload(args) => reload(&args).await,
        Command::DnsSetup(args) => dns_setup(&args),
        Command::Intention(args) => intention::run(args).await,
        Command::Acl(args) => acl::run(args).await,
        Command::Doctor(args) => return doctor::run(args).await,
        Command::Services(cmd) => services::run(cmd).await,
        Command::Proxy(args) => proxy::run(args).await,
        Command::Detach(args) => detach(&args),
        Command::Programs => programs(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn detach(args: &DetachArgs) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("detach needs root: run it with sudo");
    }
    let dir = crate::redirect::pins::PinDir::for_cgroup(&args.cgroup);
    if crate::redirect::Redirector::detach(&args.cgroup)? {
        println!(
            "Detached Connect's eBPF programs from {} (removed {})",
            args.cgroup.display(),
            dir.path.display()
        );
    } else {
        println!(
            "Nothing of Connect's is pinned for {} ({} does not exist)",
            args.cgroup.display(),
            dir.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn programs() -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("listing the kernel's eBPF programs needs root: run it with sudo");
    }
    let uname = nix::sys::utsname::uname().context("uname")?;
    println!("kernel {}", uname.release().to_string_lossy());
    let names: Vec<&str> = crate::redirect::program_names().collect();
    let mut found = 0;
    for info in aya::programs::loaded_programs() {
        let info = info.context("cannot read a loaded program's info")?;
        let Some(name) = info.name_as_str().filter(|n| names.contains(n)) else {
            continue;
        };
        found += 1;
        let kind = format!("{:?}", info.program_type());
        let kind = kind
            .strip_prefix("BPF_PROG_TYPE_")
            .unwrap_or(&kind)
            .to_lowercase();
        let insns = info
            .verified_instruction_count()
            .map_or_else(|| "n/a (kernel before 5.16)".to_owned(), |n| n.to_string());
        println!(
            "{name:<14} {kind:<18} id {:<6} verified_insns {insns}",
            info.id()
        );
    }
    if found == 0 {
        println!("no Connect program is loaded");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn reload(args: &http::HttpArgs) -> anyhow::Result<ExitCode> {
    let client = http::Client::new(args)?;
    client.put_empty("/v1/agent/reload").await?;
    println!("Configuration reload triggered");
    Ok(ExitCode::SUCCESS)
}

fn dns_setup(args: &crate::dns::setup::SetupArgs) -> anyhow::Result<ExitCode> {
    let path = crate::dns::setup::run(args)
        .map_err(anyhow::Error::new)
        .with_context(|| format!("dns-setup for network namespace {}", args.netns))?;
    println!(
        "Wrote {}: processes started with `ip netns exec {} ...` resolve through {}:{}",
        path.display(),
        args.netns,
        args.nameserver,
        crate::dns::setup::RESOLVER_PORT
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(OsString::from))
            .into_iter()
            .map(|s| s.into_string().expect("utf-8"))
            .collect()
    }

    #[test]
    fn go_style_flags_become_long_flags() {
        assert_eq!(
            norm(&[
                "c",
                "proxy",
                "-service",
                "web",
                "-upstream=socat:9191",
                "--x",
                "-h",
                "-1",
                "-",
                "--",
                "-raw"
            ]),
            [
                "c",
                "proxy",
                "--service",
                "web",
                "--upstream=socat:9191",
                "--x",
                "-h",
                "-1",
                "-",
                "--",
                "-raw"
            ]
        );
    }

    #[test]
    fn cli_parses() {
        Cli::try_parse_from(norm(&["connect-agent", "--dev"])).expect("agent flags");
        Cli::try_parse_from(norm(&[
            "connect-agent",
            "reload",
            "-http-addr",
            "127.0.0.1:8500",
        ]))
        .expect("reload");
    }
}
