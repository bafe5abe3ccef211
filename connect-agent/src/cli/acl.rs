//! `connect-agent acl bootstrap`, `acl token {create,list,read,delete}` and
//! `acl policy {create,list,read,delete}`: Consul's `consul acl` commands against a
//! running agent's HTTP API, with the same flags and output (`-format json` prints
//! the API's JSON instead).
//!
//! Commands write to the given stream and return an exit code, so tests can run
//! them against an in-process agent. The secret of a token is printed only by
//! `bootstrap` and `token create`: the agent keeps no copy it could show later.

use std::{
    io::{Read, Write},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::http::{Client, HttpArgs, enc};
use crate::acl::model::{PolicyJson, TokenJson};

/// Manage ACL tokens and policies.
#[derive(Debug, Args)]
pub struct AclArgs {
    #[command(subcommand)]
    pub command: AclCommand,
}

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Create the first management token (once per cluster) and print it.
    Bootstrap(FormatArgs),
    /// Create, list, read and delete tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Create, list, read and delete policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token linked to policies and identities; prints its secret once.
    Create(TokenCreateArgs),
    /// List every token (secrets hidden).
    List(FormatArgs),
    /// Show one token, by accessor ID or -self.
    Read(TokenReadArgs),
    /// Delete a token by accessor ID.
    Delete(IdArgs),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a policy from rules (HCL or JSON; `@FILE` reads a file, `-` stdin).
    Create(PolicyCreateArgs),
    /// List every policy.
    List(FormatArgs),
    /// Show one policy, by -id or -name.
    Read(PolicyRefArgs),
    /// Delete a policy, by -id or -name.
    Delete(PolicyRefArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub out: FormatArgs,
    /// Description of the token.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Link the policy with this ID; repeatable.
    #[arg(long, value_name = "ID")]
    pub policy_id: Vec<String>,
    /// Link the policy with this name; repeatable.
    #[arg(long, value_name = "NAME")]
    pub policy_name: Vec<String>,
    /// A service identity, `NAME` or `NAME:DC1,DC2`; repeatable.
    #[arg(long, value_name = "NAME[:DCS]")]
    pub service_identity: Vec<String>,
    /// A node identity, `NAME:DC`; repeatable.
    #[arg(long, value_name = "NAME:DC")]
    pub node_identity: Vec<String>,
    /// Use this accessor ID (a UUID) instead of a random one.
    #[arg(long, value_name = "UUID")]
    pub accessor: Option<String>,
    /// Use this secret (a UUID) instead of a random one.
    #[arg(long, value_name = "UUID")]
    pub secret: Option<String>,
    /// Mark the token local to this datacenter.
    #[arg(long)]
    pub local: bool,
}

#[derive(Debug, Args)]
pub struct TokenReadArgs {
    #[command(flatten)]
    pub out: FormatArgs,
    /// The token's accessor ID.
    #[arg(long, value_name = "ID", required_unless_present = "self_")]
    pub id: Option<String>,
    /// Read the token this command runs with.
    #[arg(long = "self", id = "self_")]
    pub self_: bool,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// The accessor ID.
    #[arg(long, value_name = "ID")]
    pub id: String,
}

#[derive(Debug, Args)]
pub struct PolicyCreateArgs {
    #[command(flatten)]
    pub out: FormatArgs,
    /// The policy's unique name.
    #[arg(long)]
    pub name: String,
    /// Description of the policy.
    #[arg(long, default_value = "")]
    pub description: String,
    /// The rules: text, `@FILE`, or `-` for standard input.
    #[arg(long, default_value = "")]
    pub rules: String,
    /// Limit the policy to this datacenter; repeatable.
    #[arg(long, value_name = "DC")]
    pub valid_datacenter: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PolicyRefArgs {
    #[command(flatten)]
    pub out: FormatArgs,
    /// The policy's ID.
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "name",
        required_unless_present = "name"
    )]
    pub id: Option<String>,
    /// The policy's name.
    #[arg(long)]
    pub name: Option<String>,
}

/// Runs an ACL subcommand, printing to standard output.
pub async fn run(args: AclArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    run_to(args, &mut out).await
}

/// Runs an ACL subcommand, printing to `out`.
pub async fn run_to(args: AclArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match args.command {
        AclCommand::Bootstrap(a) => {
            let client = Client::new(&a.http)?;
            let t: TokenJson = client
                .send_json(reqwest::Method::PUT, "/v1/acl/bootstrap", &json!({}))
                .await
                .context("Failed ACL bootstrapping")?;
            print_token(out, &t, a.format)?;
        }
        AclCommand::Token(TokenCommand::Create(a)) => {
            let client = Client::new(&a.out.http)?;
            let t: TokenJson = client
                .send_json(reqwest::Method::PUT, "/v1/acl/token", &token_body(&a)?)
                .await
                .context("Failed to create new token")?;
            print_token(out, &t, a.out.format)?;
        }
        AclCommand::Token(TokenCommand::List(a)) => {
            let client = Client::new(&a.http)?;
            let list: Vec<TokenJson> = client
                .get("/v1/acl/tokens")
                .await
                .context("Failed to retrieve the token list")?;
            if a.format == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                for (i, t) in list.iter().enumerate() {
                    if i > 0 {
                        writeln!(out)?;
                    }
                    print_token(out, t, Format::Pretty)?;
                }
            }
        }
        AclCommand::Token(TokenCommand::Read(a)) => {
            let client = Client::new(&a.out.http)?;
            let path = match (&a.id, a.self_) {
                (_, true) => "/v1/acl/token/self".to_owned(),
                (Some(id), false) => format!("/v1/acl/token/{}", enc(id)),
                (None, false) => bail!("Must specify the -id parameter"),
            };
            let t: TokenJson = client.get(&path).await.context("Error reading token")?;
            print_token(out, &t, a.out.format)?;
        }
        AclCommand::Token(TokenCommand::Delete(a)) => {
            let client = Client::new(&a.http)?;
            client
                .delete(&format!("/v1/acl/token/{}", enc(&a.id)))
                .await
                .with_context(|| format!("Error deleting token {:?}", a.id))?;
            writeln!(out, "Token {:?} deleted successfully", a.id)?;
        }
        AclCommand::Policy(PolicyCommand::Create(a)) => {
            let client = Client::new(&a.out.http)?;
            let body = json!({
                "Name": a.name,
                "Description": a.description,
                "Rules": rules_text(&a.rules)?,
                "Datacenters": a.valid_datacenter,
            });
            let p: PolicyJson = client
                .send_json(reqwest::Method::PUT, "/v1/acl/policy", &body)
                .await
                .context("Failed to create new policy")?;
            print_policy(out, &p, a.out.format)?;
        }
        AclCommand::Policy(PolicyCommand::List(a)) => {
            let client = Client::new(&a.http)?;
            let list: Vec<PolicyJson> = client
                .get("/v1/acl/policies")
                .await
                .context("Failed to retrieve the policy list")?;
            if a.format == Format::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                for p in &list {
                    writeln!(out, "{}:", p.name)?;
                    writeln!(out, "   ID:           {}", p.id)?;
                    writeln!(out, "   Description:  {}", p.description)?;
                    writeln!(out, "   Datacenters:  {}", p.datacenters.join(", "))?;
                }
            }
        }
        AclCommand::Policy(PolicyCommand::Read(a)) => {
            let client = Client::new(&a.out.http)?;
            let p: PolicyJson = client
                .get(&policy_path(&a))
                .await
                .context("Error reading policy")?;
            print_policy(out, &p, a.out.format)?;
        }
        AclCommand::Policy(PolicyCommand::Delete(a)) => {
            let client = Client::new(&a.out.http)?;
            let id = match (&a.id, &a.name) {
                (Some(id), _) => id.clone(),
                (None, Some(_)) => {
                    let p: PolicyJson = client
                        .get(&policy_path(&a))
                        .await
                        .context("Error reading policy")?;
                    p.id
                }
                (None, None) => bail!("Must specify the -id or -name parameter"),
            };
            client
                .delete(&format!("/v1/acl/policy/{}", enc(&id)))
                .await
                .with_context(|| format!("Error deleting policy {id:?}"))?;
            writeln!(out, "Policy {id:?} deleted successfully")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_path(a: &PolicyRefArgs) -> String {
    match (&a.id, &a.name) {
        (Some(id), _) => format!("/v1/acl/policy/{}", enc(id)),
        (None, Some(name)) => format!("/v1/acl/policy/name/{}", enc(name)),
        (None, None) => "/v1/acl/policy/".to_owned(),
    }
}

/// The request body of `token create`.
fn token_body(a: &TokenCreateArgs) -> anyhow::Result<Value> {
    let policies: Vec<Value> = a
        .policy_id
        .iter()
        .map(|id| json!({"ID": id}))
        .chain(a.policy_name.iter().map(|n| json!({"Name": n})))
        .collect();
    let services = a
        .service_identity
        .iter()
        .map(|s| {
            let (name, dcs) = s.split_once(':').unwrap_or((s, ""));
            if name.is_empty() {
                bail!("-service-identity {s:?} has no service name");
            }
            let dcs: Vec<&str> = dcs.split(',').filter(|d| !d.is_empty()).collect();
            Ok(json!({"ServiceName": name, "Datacenters": dcs}))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nodes = a
        .node_identity
        .iter()
        .map(|s| match s.split_once(':') {
            Some((n, dc)) if !n.is_empty() && !dc.is_empty() => {
                Ok(json!({"NodeName": n, "Datacenter": dc}))
            }
            _ => bail!("-node-identity {s:?} must be NAME:DATACENTER"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut body = json!({
        "Description": a.description,
        "Policies": policies,
        "ServiceIdentities": services,
        "NodeIdentities": nodes,
        "Local": a.local,
    });
    if let Some(acc) = &a.accessor {
        body["AccessorID"] = json!(acc);
    }
    if let Some(sec) = &a.secret {
        body["SecretID"] = json!(sec);
    }
    Ok(body)
}

/// `-rules` as given: text, `@FILE` or `-` (standard input).
fn rules_text(arg: &str) -> anyhow::Result<String> {
    if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read rules from standard input")?;
        Ok(s)
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("cannot read rules file {path}"))
    } else {
        Ok(arg.to_owned())
    }
}

fn print_token(out: &mut dyn Write, t: &TokenJson, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(t)?)?;
        return Ok(());
    }
    writeln!(out, "AccessorID:       {}", t.accessor_id)?;
    writeln!(out, "SecretID:         {}", t.secret_id)?;
    writeln!(out, "Description:      {}", t.description)?;
    writeln!(out, "Local:            {}", t.local)?;
    writeln!(out, "Create Time:      {}", t.create_time)?;
    if !t.policies.is_empty() {
        writeln!(out, "Policies:")?;
        for p in &t.policies {
            writeln!(out, "   {} - {}", p.id, p.name)?;
        }
    }
    if !t.service_identities.is_empty() {
        writeln!(out, "Service Identities:")?;
        for s in &t.service_identities {
            if s.datacenters.is_empty() {
                writeln!(out, "   {} (Datacenters: all)", s.service_name)?;
            } else {
                writeln!(
                    out,
                    "   {} (Datacenters: {})",
                    s.service_name,
                    s.datacenters.join(", ")
                )?;
            }
        }
    }
    if !t.node_identities.is_empty() {
        writeln!(out, "Node Identities:")?;
        for n in &t.node_identities {
            writeln!(out, "   {} (Datacenter: {})", n.node_name, n.datacenter)?;
        }
    }
    Ok(())
}

fn print_policy(out: &mut dyn Write, p: &PolicyJson, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(p)?)?;
        return Ok(());
    }
    writeln!(out, "ID:           {}", p.id)?;
    writeln!(out, "Name:         {}", p.name)?;
    writeln!(out, "Description:  {}", p.description)?;
    writeln!(out, "Datacenters:  {}", p.datacenters.join(", "))?;
    writeln!(out, "Rules:")?;
    writeln!(out, "{}", p.rules.as_deref().unwrap_or(""))?;
    Ok(())
}

#[cfg(test)]
mod tests;
