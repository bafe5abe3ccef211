//! `connect-agent intention {create,delete,get,list,check,match}`: Consul's
//! `consul intention` commands (reference §6.2) against a running agent's HTTP API,
//! with the same flags, output and exit codes.
//!
//! Commands write to the given output streams and return an exit code, so tests can
//! run them against an in-process agent. Pairs use the 1.9+ exact endpoints; a
//! single argument to `get`/`delete` is an intention ID.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::http::{Client, HttpArgs, enc};
use crate::intentions::{ApiIntention, Body};

/// Manage intentions: which services may connect to which.
#[derive(Debug, Args)]
pub struct IntentionArgs {
    #[command(subcommand)]
    pub command: IntentionCommand,
}

#[derive(Debug, Subcommand)]
pub enum IntentionCommand {
    /// Create an intention from SRC to DST (allow unless -deny).
    Create(CreateArgs),
    /// Delete the intention of SRC DST, or the one with ID.
    Delete(TargetArgs),
    /// Show the intention of SRC DST, or the one with ID.
    Get(TargetArgs),
    /// List every intention, in evaluation order.
    List(ListArgs),
    /// Check whether SRC may connect to DST: exit 0 allowed, 1 denied, 2 on error.
    Check(CheckArgs),
    /// List the intentions that apply to a destination (default) or a source.
    Match(MatchArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// Allow the connections (the default).
    #[arg(long)]
    pub allow: bool,
    /// Deny the connections.
    #[arg(long)]
    pub deny: bool,
    /// Replace the intention of the same pair if there is one.
    #[arg(long)]
    pub replace: bool,
    /// Metadata as KEY=VALUE; repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Read intentions from JSON files: the arguments are paths (`-` is stdin).
    #[arg(long)]
    pub file: bool,
    /// SRC DST, or files with -file.
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// SRC DST, or an intention ID.
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub http: HttpArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// SRC DST.
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct MatchArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    /// Match intentions by their source.
    #[arg(long, conflicts_with = "destination")]
    pub source: bool,
    /// Match intentions by their destination (the default).
    #[arg(long)]
    pub destination: bool,
    /// The service name.
    pub args: Vec<String>,
}

/// Runs an intention command on stdout/stderr.
pub async fn run(args: IntentionArgs) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let result = execute(args.command, &mut out, &mut err).await;
    // Buffered so that tests can capture the same output; every command is short.
    std::io::stdout()
        .write_all(&out)
        .context("cannot write to stdout")?;
    std::io::stderr()
        .write_all(&err)
        .context("cannot write to stderr")?;
    result.map(ExitCode::from)
}

/// Runs an intention command, writing what Consul prints to `out` and `err`; returns
/// the exit code, or an error that the caller reports with exit code 1.
pub async fn execute(
    command: IntentionCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<u8> {
    match command {
        IntentionCommand::Create(a) => create(&a, out).await,
        IntentionCommand::Delete(a) => delete(&a, out).await,
        IntentionCommand::Get(a) => get(&a, out).await,
        IntentionCommand::List(a) => list(&a, out, err).await,
        IntentionCommand::Check(a) => Ok(check(&a, out, err).await),
        IntentionCommand::Match(a) => matches(&a, out).await,
    }
}

async fn create(a: &CreateArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    if a.allow && a.deny {
        bail!("Only one of -allow or -deny may be specified.");
    }
    let action = if a.deny { "deny" } else { "allow" };
    let mut meta = BTreeMap::new();
    for m in &a.meta {
        let (k, v) = m
            .split_once('=')
            .with_context(|| format!("invalid -meta {m:?}: expected KEY=VALUE"))?;
        meta.insert(k.to_owned(), v.to_owned());
    }
    let client = Client::new(&a.http)?;
    let bodies: Vec<Value> = if a.file {
        if a.allow || a.deny || !a.meta.is_empty() {
            bail!("-allow, -deny and -meta cannot be used with -file: the files say it all");
        }
        if a.args.is_empty() {
            bail!("Must specify at least one file with -file");
        }
        a.args
            .iter()
            .map(|p| read_file(p))
            .collect::<anyhow::Result<_>>()?
    } else {
        let [src, dst] = a.args.as_slice() else {
            bail!("Must specify two arguments: source and destination");
        };
        let mut body = json!({
            "SourceName": src, "DestinationName": dst, "SourceType": "consul", "Action": action,
        });
        if !meta.is_empty() {
            body["Meta"] = json!(meta);
        }
        vec![body]
    };
    for body in bodies {
        let ixn: ApiIntention = serde_json::from_value(body.clone()).unwrap_or_default();
        let what = ixn.to_string();
        if a.replace {
            // The exact API is the pair's upsert; the names go in the query.
            let path = format!(
                "/v1/connect/intentions/exact?source={}&destination={}",
                enc(&ixn.source_name),
                enc(&ixn.destination_name)
            );
            client
                .send_json::<_, Value>(reqwest::Method::PUT, &path, &body)
                .await
                .with_context(|| format!("cannot create intention {what:?}"))?;
        } else {
            client
                .send_json::<_, Value>(reqwest::Method::POST, "/v1/connect/intentions", &body)
                .await
                .with_context(|| format!("cannot create intention {what:?}"))?;
        }
        writeln!(out, "Created: {what}")?;
    }
    Ok(0)
}

/// One intention per file (`-` = stdin), checked locally first so that a typo is
/// reported with the file's name.
fn read_file(path: &str) -> anyhow::Result<Value> {
    /// Intention files are tiny; refuse anything that is clearly not one.
    const MAX_FILE: u64 = 1 << 20;
    let mut text = String::new();
    if path == "-" {
        std::io::stdin()
            .take(MAX_FILE)
            .read_to_string(&mut text)
            .context("cannot read stdin")?;
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
        f.take(MAX_FILE)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {path}"))?;
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))?;
    Body::from_json(&v)
        .and_then(|b| b.into_spec())
        .with_context(|| format!("{path} is not a valid intention"))?;
    Ok(v)
}

/// The API path of an intention named by `SRC DST` or by ID.
fn target_path(args: &[String]) -> anyhow::Result<String> {
    match args {
        [id] => Ok(format!("/v1/connect/intentions/{}", enc(id))),
        [src, dst] => Ok(format!(
            "/v1/connect/intentions/exact?source={}&destination={}",
            enc(src),
            enc(dst)
        )),
        _ => bail!("Must specify one or two arguments: an intention ID, or source and destination"),
    }
}

async fn get(a: &TargetArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let path = target_path(&a.args)?;
    let client = Client::new(&a.http)?;
    let ixn: ApiIntention = client
        .get(&path)
        .await
        .context("cannot read the intention")?;
    out.write_all(format_get(&ixn).as_bytes())?;
    Ok(0)
}

async fn delete(a: &TargetArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let path = target_path(&a.args)?;
    let client = Client::new(&a.http)?;
    client
        .delete(&path)
        .await
        .context("cannot delete the intention")?;
    writeln!(out, "Intention deleted.")?;
    Ok(0)
}

async fn list(a: &ListArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<u8> {
    let client = Client::new(&a.http)?;
    let ixns: Vec<ApiIntention> = client
        .get("/v1/connect/intentions")
        .await
        .context("cannot list intentions")?;
    if ixns.is_empty() {
        writeln!(err, "There are no intentions.")?;
        return Ok(2);
    }
    out.write_all(format_list(&ixns).as_bytes())?;
    Ok(0)
}

/// Exit codes are the answer: 0 allowed, 1 denied, 2 when there is no answer.
async fn check(a: &CheckArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let answer = async {
        let [src, dst] = a.args.as_slice() else {
            bail!("Must specify two arguments: source and destination");
        };
        let client = Client::new(&a.http)?;
        let path = format!(
            "/v1/connect/intentions/check?source={}&destination={}",
            enc(src),
            enc(dst)
        );
        let v: Value = client
            .get(&path)
            .await
            .context("cannot check the intention")?;
        v.get("Allowed")
            .and_then(Value::as_bool)
            .context("the agent's answer has no \"Allowed\"")
    }
    .await;
    let written = match answer {
        Ok(true) => writeln!(out, "Allowed").map(|()| 0),
        Ok(false) => writeln!(out, "Denied").map(|()| 1),
        Err(e) => writeln!(err, "Error: {e:#}").map(|()| 2),
    };
    written.unwrap_or(2)
}

async fn matches(a: &MatchArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let [name] = a.args.as_slice() else {
        bail!("Must specify exactly one argument: the service name");
    };
    let by = if a.source { "source" } else { "destination" };
    let client = Client::new(&a.http)?;
    let path = format!("/v1/connect/intentions/match?by={by}&name={}", enc(name));
    let mut found: BTreeMap<String, Vec<ApiIntention>> =
        client.get(&path).await.context("cannot match intentions")?;
    for ixn in found.remove(name.as_str()).unwrap_or_default() {
        writeln!(out, "{ixn}")?;
    }
    Ok(0)
}

// ───────────────────────────── output ─────────────────────────────

/// `consul intention get`: aligned `Label: value` lines.
pub fn format_get(i: &ApiIntention) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("Source:".into(), qualified(&i.source_ns, &i.source_name)),
        (
            "Destination:".into(),
            qualified(&i.destination_ns, &i.destination_name),
        ),
        ("Action:".into(), i.action.clone()),
        ("ID:".into(), i.id.clone()),
    ];
    if !i.description.is_empty() {
        rows.push(("Description:".into(), i.description.clone()));
    }
    for (k, v) in &i.meta {
        rows.push((format!("Meta[{k}]:"), v.clone()));
    }
    rows.push(("Created At:".into(), rfc850(&i.created_at)));
    let rows: Vec<Vec<String>> = rows.into_iter().map(|(a, b)| vec![a, b]).collect();
    columnize(&rows)
}

/// `consul intention list`: `ID  Source  Action  Destination  Precedence`.
pub fn format_list(ixns: &[ApiIntention]) -> String {
    let mut rows = vec![vec![
        "ID".to_owned(),
        "Source".to_owned(),
        "Action".to_owned(),
        "Destination".to_owned(),
        "Precedence".to_owned(),
    ]];
    rows.extend(ixns.iter().map(|i| {
        vec![
            i.id.clone(),
            qualified(&i.source_ns, &i.source_name),
            i.action.clone(),
            qualified(&i.destination_ns, &i.destination_name),
            i.precedence.to_string(),
        ]
    }));
    columnize(&rows)
}

fn qualified(ns: &str, name: &str) -> String {
    if ns.is_empty() || ns == crate::intentions::model::DEFAULT_NAMESPACE {
        name.to_owned()
    } else {
        format!("{ns}/{name}")
    }
}

/// Columns padded to their widest cell and joined by two spaces, trailing space
/// trimmed (Consul's `columnize`).
fn columnize(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[c].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Go's RFC 850 layout, in UTC: `Monday, 02-Jan-06 15:04:05 UTC`. An unparsable
/// time is shown as given.
fn rfc850(rfc3339: &str) -> String {
    use time::{
        OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339,
        macros::format_description,
    };
    let layout = format_description!(
        "[weekday], [day]-[month repr:short]-[year repr:last_two] [hour]:[minute]:[second] UTC"
    );
    OffsetDateTime::parse(rfc3339, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(UtcOffset::UTC).format(layout).ok())
        .unwrap_or_else(|| rfc3339.to_owned())
}

#[cfg(test)]
mod tests;
