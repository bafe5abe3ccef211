//! Helpers for mesh tests against real processes: the `connect-agent` CLI,
//! services registered through the agent's API, throwaway processes (socat, nc,
//! openssl, `connect-agent proxy`) killed by PID in `Drop`, and bounded waits.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    agent::{AgentProcess, agent_binary, free_port, http},
    wait::wait_for,
};

/// A Python client that dials `host port` once, sends the payload line, and
/// prints what came back as `echo=...`; exit 3 if it cannot connect. Run it as
/// `python3 -c ONE_SHOT_CLIENT host port payload`.
pub const ONE_SHOT_CLIENT: &str = r#"
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    s = socket.create_connection((host, port), timeout=3)
except ConnectionResetError:
    # A refused connection, reset so fast that connect() reports it: no echo.
    print("echo=''")
    sys.exit(0)
except OSError as e:
    print("connect-failed", e)
    sys.exit(3)
s.settimeout(5)
s.sendall(payload.encode() + b"\n")
data = b""
try:
    while not data.endswith(b"\n"):
        chunk = s.recv(200)
        if not chunk:
            break
        data += chunk
except (socket.timeout, ConnectionResetError):
    pass
print("echo=%r" % data.decode(errors="replace"))
"#;

/// A child process killed (by PID) and reaped when dropped; its output goes to
/// files under `dir` or to in-memory buffers read by threads.
#[derive(Debug)]
pub struct Spawned {
    pub name: String,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Starts `cmd` with piped stdio; output is collected in the background.
    pub fn start(name: &str, cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, stdout.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(collect(err, stderr.clone()));
        }
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            stderr,
            readers,
        })
    }

    /// Waits (bounded) until stdout and stderr reached EOF, so that after the
    /// process exited [`Spawned::stdout`] and [`Spawned::stderr`] hold everything.
    pub fn wait_output(&self, timeout: Duration) -> Result<()> {
        wait_for(timeout, "the process's output to end", || {
            self.readers.iter().all(|r| r.is_finished())
        })
        .map(|_| ())
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(|p| p.into_inner())).into()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner())).into()
    }

    /// The child's process id, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Writes to the child's stdin.
    pub fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        let stdin = self
            .child
            .as_mut()
            .and_then(|c| c.stdin.as_mut())
            .with_context(|| format!("{} has no stdin", self.name))?;
        stdin.write_all(data)?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes the child's stdin (EOF).
    pub fn close_stdin(&mut self) {
        if let Some(c) = self.child.as_mut() {
            drop(c.stdin.take());
        }
    }

    /// Waits until the child exits, up to `timeout`; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stdout contains `needle`, or fails with everything seen.
    pub fn wait_stdout(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait_for(timeout, "the output", || self.stdout().contains(needle))
            .with_context(|| {
                format!(
                    "{} did not print {needle:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.name,
                    self.stdout(),
                    self.stderr()
                )
            })
            .map(|_| ())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn collect(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    })
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_for(timeout, "a listener", || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
    .with_context(|| format!("nothing listens on {addr}"))
    .map(|_| ())
}

/// Runs `connect-agent <args> -http-addr <agent>` to completion (bounded).
pub fn cli(agent: &AgentProcess, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(agent_binary()?);
    cmd.args(args)
        .arg("-http-addr")
        .arg(agent.http_addr.to_string());
    run_bounded(&mut cmd, None, Duration::from_secs(30))
}

/// Runs `cmd` with `input` on stdin (then EOF) until it exits, killing it after
/// `timeout`.
pub fn run_bounded(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let name = format!("{:?}", cmd.get_program());
    let mut p = Spawned::start(&name, cmd)?;
    if let Some(input) = input {
        p.write_stdin(input)?;
    }
    p.close_stdin();
    let status = p
        .wait_exit(timeout)?
        .with_context(|| format!("{name} did not exit within {timeout:?}"))?;
    // The pipes reach EOF once the process is gone; read them to the end.
    wait_for(Duration::from_secs(5), "the output to end", || {
        p.readers.iter().all(|r| r.is_finished())
    })
    .with_context(|| format!("{name}'s output did not end"))?;
    Ok(Output {
        status,
        stdout: p.stdout().into_bytes(),
        stderr: p.stderr().into_bytes(),
    })
}

/// Registers a service through `PUT /v1/agent/service/register` (Consul's body).
pub fn register(agent: &AgentProcess, body: &serde_json::Value) -> Result<()> {
    let (status, text) = http(
        agent.http_addr,
        "PUT",
        "/v1/agent/service/register",
        Some(&body.to_string()),
    )?;
    if status != 200 {
        bail!("registering {body}: {status} {text}");
    }
    Ok(())
}

/// GETs a JSON document from the agent.
pub fn get_json(agent: &AgentProcess, path: &str) -> Result<serde_json::Value> {
    let (status, text) = http(agent.http_addr, "GET", path, None)?;
    if status != 200 {
        bail!("GET {path}: {status} {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("GET {path}: not JSON: {text}"))
}

/// Starts `socat -v tcp-l:<port>,fork exec:/bin/cat` (the getting-started echo
/// service) on a free port and waits until it listens.
pub fn socat_echo() -> Result<(Spawned, u16)> {
    let port = free_port()?;
    let p = Spawned::start(
        "socat",
        Command::new("socat")
            .arg("-v")
            .arg(format!("tcp-l:{port},fork,reuseaddr,bind=127.0.0.1"))
            .arg("exec:/bin/cat"),
    )
    .context("socat is needed (Debian package socat)")?;
    wait_listening(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    )?;
    Ok((p, port))
}

/// Starts `connect-agent proxy <args> -http-addr <agent>` and waits for its
/// startup output.
pub fn explicit_proxy(agent: &AgentProcess, args: &[&str]) -> Result<Spawned> {
    let mut cmd = Command::new(agent_binary()?);
    cmd.arg("proxy")
        .args(args)
        .arg("-http-addr")
        .arg(agent.http_addr.to_string());
    let p = Spawned::start("connect-agent proxy", &mut cmd)?;
    p.wait_stdout("Log data will now stream in", Duration::from_secs(20))?;
    Ok(p)
}

/// `nc -N 127.0.0.1 <port>` with `input`: what came back. `-N` closes the write
/// side after stdin's EOF, so nc exits once the other side closes too.
pub fn nc(port: u16, input: &[u8]) -> Result<Output> {
    run_bounded(
        Command::new("nc").args(["-N", "127.0.0.1", &port.to_string()]),
        Some(input),
        Duration::from_secs(15),
    )
}

/// The agent's trust domain and its roots as one PEM file under `dir`.
pub fn roots(agent: &AgentProcess, dir: &Path) -> Result<(String, PathBuf)> {
    let roots = get_json(agent, "/v1/agent/connect/ca/roots")?;
    let td = roots["TrustDomain"]
        .as_str()
        .context("roots without TrustDomain")?
        .to_owned();
    let mut pem = String::new();
    for r in roots["Roots"].as_array().context("roots without Roots")? {
        pem.push_str(r["RootCert"].as_str().context("root without RootCert")?);
        pem.push('\n');
    }
    let path = dir.join("roots.pem");
    std::fs::write(&path, pem)?;
    Ok((td, path))
}

/// The leaf of `service` from the agent, as cert and key PEM files under `dir`.
pub fn leaf_files(agent: &AgentProcess, service: &str, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let leaf = get_json(agent, &format!("/v1/agent/connect/ca/leaf/{service}"))?;
    let cert = dir.join(format!("{service}.pem"));
    let key = dir.join(format!("{service}.key"));
    std::fs::write(&cert, leaf["CertPEM"].as_str().context("no CertPEM")?)?;
    std::fs::write(
        &key,
        leaf["PrivateKeyPEM"].as_str().context("no PrivateKeyPEM")?,
    )?;
    Ok((cert, key))
}

/// Where `/v1/health/connect/<service>` says to dial the service: the first
/// entry's `Service.Address` (else `Node.Address`) and `Service.Port`, as the proxy
/// reads it.
pub fn connect_address(agent: &AgentProcess, service: &str) -> Result<SocketAddr> {
    let entries = get_json(agent, &format!("/v1/health/connect/{service}?passing=1"))?;
    let e = entries
        .as_array()
        .and_then(|a| a.first())
        .with_context(|| format!("no Connect-capable instance of {service}: {entries}"))?;
    let svc_addr = e["Service"]["Address"].as_str().unwrap_or("");
    let host = if svc_addr.is_empty() {
        e["Node"]["Address"].as_str().unwrap_or("")
    } else {
        svc_addr
    };
    let port = e["Service"]["Port"].as_u64().context("no Service.Port")?;
    format!("{host}:{port}")
        .parse()
        .with_context(|| format!("{host}:{port} is not an address"))
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("connect-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Consul's getting-started setup on `agent`: a socat echo registered with a
/// Connect proxy, and `connect-agent proxy -service web -upstream socat:<port>`
/// listening on a free port: (socat, the proxy, the upstream port).
pub fn socat_behind_upstream(agent: &AgentProcess) -> Result<(Spawned, Spawned, u16)> {
    let (socat, socat_port) = socat_echo()?;
    register(
        agent,
        &serde_json::json!({"name": "socat", "port": socat_port, "connect": {"proxy": {}}}),
    )?;
    let upstream = crate::agent::free_port()?;
    let proxy = explicit_proxy(
        agent,
        &["-service", "web", "-upstream", &format!("socat:{upstream}")],
    )?;
    wait_listening(
        SocketAddr::from(([127, 0, 0, 1], upstream)),
        Duration::from_secs(10),
    )?;
    Ok((socat, proxy, upstream))
}
