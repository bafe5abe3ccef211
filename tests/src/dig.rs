//! `dig` (Debian's dnsutils) as tests use it: run against a server, bounded, and
//! its output parsed into sections.

use std::{collections::BTreeSet, net::SocketAddr, process::Command};

use anyhow::{Context, Result, ensure};

/// What `dig` printed, parsed.
#[derive(Debug, Clone)]
pub struct Dig {
    pub status: String,
    pub flags: BTreeSet<String>,
    /// (name, type, data) of the answer section, sorted.
    pub answers: Vec<(String, String, String)>,
    pub authority: Vec<(String, String, String)>,
    pub additional: Vec<(String, String, String)>,
    /// The TTL of each answer.
    pub ttls: Vec<u32>,
}

impl Dig {
    /// The data of the answers of type `rtype`, sorted.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        self.answers
            .iter()
            .filter(|(_, t, _)| t == rtype)
            .map(|(_, _, d)| d.clone())
            .collect()
    }
}

/// The argument vector of `dig` against `server` (port given, or 53 from
/// resolv.conf when `None`), with `prefix` before it (e.g. `ip netns exec NAME`):
/// two seconds, one try, no `.digrc`.
pub fn argv(prefix: &[&str], server: Option<SocketAddr>, args: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    argv.push("dig".into());
    if let Some(server) = server {
        argv.push(format!("@{}", server.ip()));
        argv.push("-p".into());
        argv.push(server.port().to_string());
    }
    argv.extend(["+time=2", "+tries=1", "-r"].map(String::from));
    argv.extend(args.iter().map(|s| s.to_string()));
    argv
}

/// Runs `argv` (from [`argv`]) and parses what it printed.
pub fn run(argv: &[String]) -> Result<Dig> {
    let shown = argv.join(" ");
    let (program, rest) = argv.split_first().context("empty dig command")?;
    let out = Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("running `{shown}` (is dnsutils installed?)"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "`{shown}` failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&text).with_context(|| format!("parsing the output of `{shown}`:\n{text}"))
}

/// `dig @server -p port args...`, blocking.
pub fn dig(server: SocketAddr, args: &[&str]) -> Result<Dig> {
    run(&argv(&[], Some(server), args))
}

/// Parses `dig`'s default output.
pub fn parse(text: &str) -> Result<Dig> {
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .context("no status line")?
        .to_owned();
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|rest| rest.split(';').next())
        .context("no flags line")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let section = |title: &str| -> (Vec<(String, String, String)>, Vec<u32>) {
        let mut records = Vec::new();
        let mut ttls = Vec::new();
        let mut lines = text
            .lines()
            .skip_while(|l| !l.starts_with(&format!(";; {title} SECTION:")));
        lines.next();
        for line in lines.take_while(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 5 {
                ttls.push(fields[1].parse().unwrap_or(u32::MAX));
                records.push((
                    fields[0].to_owned(),
                    fields[3].to_owned(),
                    fields[4..].join(" "),
                ));
            }
        }
        records.sort();
        (records, ttls)
    };
    let (answers, ttls) = section("ANSWER");
    Ok(Dig {
        status,
        flags,
        answers,
        authority: section("AUTHORITY").0,
        additional: section("ADDITIONAL").0,
        ttls,
    })
}
