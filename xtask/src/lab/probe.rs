//! `cargo xtask lab-probe`: the requests the lab makes from inside a node's
//! namespace (an HTTP call to the agent, an echo through the mesh), run as a child
//! process that entered the namespace.

use super::*;

/// `cargo xtask lab-probe`: what the lab runs inside a node's namespace (and cgroup),
/// where xtask itself cannot reach: plain HTTP requests, and one echo round trip.
#[derive(Debug, Subcommand)]
pub enum ProbeCommand {
    /// Each request is "METHOD HOST:PORT PATH [BODY]"; prints one JSON line per request.
    Http {
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        requests: Vec<String>,
    },
    /// Connects to HOST:PORT, sends PAYLOAD and a newline, prints the line that comes back.
    Echo { addr: SocketAddr, payload: String },
}

pub fn probe(cmd: ProbeCommand) -> Result<()> {
    match cmd {
        ProbeCommand::Http {
            timeout_ms,
            requests,
        } => {
            for r in requests {
                let line = match http_request(&r, Duration::from_millis(timeout_ms)) {
                    Ok((status, body)) => serde_json::json!({"status": status, "body": body}),
                    Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                };
                println!("{line}");
            }
            Ok(())
        }
        ProbeCommand::Echo { addr, payload } => {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .with_context(|| format!("connecting to {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("{payload}\n").as_bytes())?;
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !got.ends_with(b"\n") {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e).context("reading the echo"),
                }
            }
            print!("{}", String::from_utf8_lossy(&got));
            Ok(())
        }
    }
}

pub(super) fn http_request(req: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut parts = req.splitn(4, ' ');
    let (Some(method), Some(addr), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("a request is \"METHOD HOST:PORT PATH [BODY]\": {req:?}");
    };
    let body = parts.next().unwrap_or("");
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr:?}"))?;
    xtask::http1(
        addr,
        &xtask::Request {
            method,
            path,
            body,
            token: None,
            timeout,
        },
    )
}

/// Runs HTTP requests from inside `ns` (through `xtask lab-probe http`); one result
/// per request, an error string when it got no answer.
pub(super) fn http_in(
    ns: &Netns,
    requests: &[String],
    timeout_ms: u64,
) -> Vec<Result<(u16, String), String>> {
    if requests.is_empty() {
        return Vec::new();
    }
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return requests.iter().map(|_| Err(e.to_string())).collect(),
    };
    let out = ns
        .command(&me)
        .args(["lab-probe", "http", "--timeout-ms", &timeout_ms.to_string()])
        .args(requests)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let text = match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => return requests.iter().map(|_| Err(e.to_string())).collect(),
    };
    let mut lines = text.lines();
    requests
        .iter()
        .map(|_| {
            let v: Value = lines
                .next()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default();
            match (v["status"].as_u64(), v["body"].as_str()) {
                (Some(s), Some(b)) => Ok((u16::try_from(s).unwrap_or(0), b.to_owned())),
                _ => Err(v["error"].as_str().unwrap_or("no answer").to_owned()),
            }
        })
        .collect()
}

/// One echo round trip from inside `ns` and `cgroup` (so eBPF redirects it).
pub(super) fn echo_in(ns: &Netns, cgroup: &Path, addr: &str, payload: &str) -> Result<String> {
    let me = std::env::current_exe()?;
    let me = me.to_string_lossy();
    let mut child = xtask::command_in(
        Some(cgroup),
        Some(&ns.name),
        &me,
        &["lab-probe", "echo", addr, payload],
    )
    .spawn()
    .context("starting the echo probe")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the echo probe did not finish within 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ------------------------------------------------------------------------ misc
