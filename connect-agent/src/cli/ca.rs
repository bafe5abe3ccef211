//! `connect-agent ca roots|get-config|set-config`: the CA through a running agent's
//! HTTP API, with `consul connect ca`'s flags and output.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::Value;

use super::http::{Client, HttpArgs};
use crate::api::ca::{CaConfigurationJson, IndexedCaRoots};

/// CA subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA roots (the trust bundle) as JSON, or as PEM with -pem.
    Roots(RootsArgs),
    /// Print the CA configuration as JSON.
    GetConfig(HttpArgs),
    /// Set the CA configuration from a JSON file; a new CA key rotates the root.
    SetConfig(SetConfigArgs),
}

#[derive(Debug, Args)]
pub struct RootsArgs {
    /// Print the roots and their cross-signed certificates as one PEM bundle.
    #[arg(long)]
    pub pem: bool,

    #[command(flatten)]
    pub http: HttpArgs,
}

#[derive(Debug, Args)]
pub struct SetConfigArgs {
    /// The JSON file with the new configuration (`{"Provider": ..., "Config": {...}}`);
    /// `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<String>,

    /// Accepted for compatibility: the built-in CA always cross-signs.
    #[arg(long)]
    pub force_without_cross_signing: bool,

    #[command(flatten)]
    pub http: HttpArgs,
}

/// Runs a CA subcommand.
pub async fn run(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Roots(args) => roots(&args).await,
        CaCommand::GetConfig(args) => get_config(&args).await,
        CaCommand::SetConfig(args) => set_config(&args).await,
    }
}

async fn roots(args: &RootsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.http)?;
    let roots: IndexedCaRoots = client
        .get("/v1/agent/connect/ca/roots")
        .await
        .context("Error reading the CA roots")?;
    if args.pem {
        for r in &roots.roots {
            print!("{}", r.root_cert);
            for i in r.intermediate_certs.iter().flatten() {
                print!("{i}");
            }
        }
    } else {
        println!("{}", tab_json(&roots)?);
    }
    Ok(ExitCode::SUCCESS)
}

async fn get_config(args: &HttpArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(args)?;
    let config: CaConfigurationJson = client
        .get("/v1/connect/ca/configuration")
        .await
        .context("Error querying CA configuration")?;
    println!("{}", tab_json(&config)?);
    Ok(ExitCode::SUCCESS)
}

async fn set_config(args: &SetConfigArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.config_file.as_deref().filter(|p| !p.is_empty()) else {
        bail!("The -config-file flag is required");
    };
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin()).context("Error reading the config from stdin")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("Error reading config file {path}"))?
    };
    let mut body: Value =
        serde_json::from_str(&text).with_context(|| format!("Error parsing config file {path}"))?;
    if args.force_without_cross_signing
        && let Some(obj) = body.as_object_mut()
    {
        obj.insert("ForceWithoutCrossSigning".to_owned(), Value::Bool(true));
    }
    let client = Client::new(&args.http)?;
    client
        .send_json_no_answer(reqwest::Method::PUT, "/v1/connect/ca/configuration", &body)
        .await
        .context("Error setting CA configuration")?;
    println!("Configuration updated!");
    Ok(ExitCode::SUCCESS)
}

/// JSON indented with tabs, as `consul` prints it.
fn tab_json<T: Serialize>(v: &T) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).context("cannot encode JSON")?;
    String::from_utf8(out).context("JSON output is not UTF-8")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command, normalize_args};

    fn parse(args: &[&str]) -> CaCommand {
        let cli = Cli::try_parse_from(normalize_args(args.iter().map(Into::into))).expect("parses");
        match cli.command {
            Some(Command::Ca(c)) => c,
            other => panic!("not a ca command: {other:?}"),
        }
    }

    #[test]
    fn parses_consul_style_flags() {
        assert!(matches!(
            parse(&["c", "ca", "roots", "-pem"]),
            CaCommand::Roots(RootsArgs { pem: true, .. })
        ));
        assert!(matches!(
            parse(&["c", "ca", "get-config", "-http-addr", "127.0.0.1:1"]),
            CaCommand::GetConfig(_)
        ));
        match parse(&[
            "c",
            "ca",
            "set-config",
            "-config-file",
            "ca.json",
            "-force-without-cross-signing",
        ]) {
            CaCommand::SetConfig(a) => {
                assert_eq!(a.config_file.as_deref(), Some("ca.json"));
                assert!(a.force_without_cross_signing);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tab_indented_json() {
        let s = tab_json(&serde_json::json!({"Provider": "consul"})).expect("json");
        assert_eq!(s, "{\n\t\"Provider\": \"consul\"\n}");
    }

    #[tokio::test]
    async fn set_config_requires_the_file_flag() {
        let args = SetConfigArgs {
            config_file: None,
            force_without_cross_signing: false,
            http: HttpArgs::to("127.0.0.1:1"),
        };
        let err = set_config(&args).await.expect_err("must fail");
        assert_eq!(err.to_string(), "The -config-file flag is required");
    }
}
