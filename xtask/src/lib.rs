//! The few pieces of xtask that the integration tests (`connect-tests`) use too:
//! the lab and the tests find cgroup v2 and talk HTTP to agents the same way, so
//! they share one copy.

pub mod pki;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};

/// The cgroup2 mount point, from /proc/mounts (never hard-coded: it is
/// /sys/fs/cgroup on most systems and /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 mount in /proc/mounts: Connect needs cgroup v2")
}

/// A command that starts `program args` inside `cgroup` and the network namespace
/// `netns` (either optional): `sh -c` writes its own PID to the cgroup's
/// `cgroup.procs`, then execs the program (through `nsenter` for a namespace;
/// arguments quoted), so the program is in both from its first instruction.
/// Stdin is null, stdout and stderr are piped.
pub fn command_in(
    cgroup: Option<&Path>,
    netns: Option<&str>,
    program: &str,
    args: &[&str],
) -> Command {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut script = String::new();
    if let Some(cg) = cgroup {
        script.push_str(&format!(
            "echo $$ > {} && ",
            quote(&format!("{}/cgroup.procs", cg.display()))
        ));
    }
    script.push_str("exec ");
    if let Some(ns) = netns {
        script.push_str(&format!(
            "nsenter {} -- ",
            quote(&format!("--net=/var/run/netns/{ns}"))
        ));
    }
    script.push_str(&quote(program));
    for a in args {
        script.push(' ');
        script.push_str(&quote(a));
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// One HTTP/1.1 request to an agent's plaintext API.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub body: &'a str,
    /// Sent as `X-Consul-Token`.
    pub token: Option<&'a str>,
    /// For the connect and for each read and write.
    pub timeout: Duration,
}

/// Sends `req` to `addr` on a new connection (`Connection: close`) and reads the
/// answer to its end: the status and the body, de-chunked. No dependencies and no
/// pooling, so that a test sees each request on the wire as written.
pub fn http1(addr: SocketAddr, req: &Request<'_>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, req.timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(req.timeout))?;
    s.set_write_timeout(Some(req.timeout))?;
    let token = req
        .token
        .map(|t| format!("X-Consul-Token: {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{token}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        req.method,
        req.path,
        req.body.len(),
        req.body,
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to {} {}", req.method, req.path))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

/// The payload of a chunked body (enough for the agent's answers: no trailers).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{command_in, dechunk};

    #[test]
    fn commands_keep_their_arguments_whole() {
        let out = command_in(None, None, "printf", &["%s|", "it's", "two words", "$HOME"])
            .output()
            .expect("sh runs");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "it's|two words|$HOME|"
        );
    }

    #[test]
    fn dechunks_what_hyper_sends() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        assert_eq!(
            dechunk("10\r\nshort\r\n"),
            "",
            "a truncated chunk is not made up"
        );
    }
}
