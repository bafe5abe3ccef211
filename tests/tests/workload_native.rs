//! Connect-native clients end to end: applications that fetch their identity
//! through the SPIFFE Workload API and do their own mutual TLS to a service's node
//! proxy, with no proxy of their own.
//!
//! An agent with `--cgroup` and `--workload-api-socket`; `web` and `socat`
//! registered with their cgroups, a socat echo behind socat's node proxy (the
//! agent's inbound listener, port 20000 outside the tests). From web's cgroup:
//!
//! - Python, the README's program as written: py-spiffe fetches web's
//!   X.509-SVID, the program writes the chain, key and bundle to files, and the
//!   standard `ssl` module connects with them (the bundle as CA, the SVID as
//!   client certificate, SNI `socat.svc.<trust-domain>`, hostname checked) and
//!   gets its line echoed. The server's leaf carries socat's SPIFFE ID.
//! - Rust: `connect-agent/examples/spiffe_native.rs` (the `spiffe` crate and
//!   rustls) prints web's SPIFFE ID and gets its line echoed.
//! - With an intention `web => socat` deny, both handshakes complete (the client
//!   certificate is valid) and the node proxy then resets the connection (TCP
//!   RST, no TLS alert) before a byte is forwarded. Python's `ssl` raises
//!   `ssl.SSLEOFError` ("EOF occurred in violation of protocol") from `sendall`
//!   when the reset arrived before the write, and from `recv` when the write went
//!   out first (a plain `ConnectionResetError` is accepted too; without
//!   `suppress_ragged_eofs=False` that `recv` would return a clean-looking `b""`);
//!   the example fails with "Connection reset by peer".

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::{AgentProcess, agent_binary},
    lab::{CgroupProc, TestCgroup, require_privileges},
    mesh::{Spawned, TempDir, cli, connect_address, register, roots, socat_echo},
    workload::{agent_with_cgroups, venv_python},
};
use serde_json::json;

/// The README's Python client (py-spiffe and `ssl`): the `python` block after
/// `<!-- workload-native: python -->`, run as written.
fn readme_python() -> Result<String> {
    const MARKER: &str = "<!-- workload-native: python -->";
    let readme = include_str!("../../README.md");
    let rest = &readme[readme
        .find(MARKER)
        .with_context(|| format!("the README has no {MARKER}"))?..];
    let start = rest
        .find("```python\n")
        .with_context(|| format!("no python block after {MARKER}"))?
        + "```python\n".len();
    let len = rest[start..]
        .find("```")
        .with_context(|| format!("the block after {MARKER} does not end"))?;
    Ok(rest[start..start + len].to_owned())
}

const LINE: &str = "hello native";

/// The agent, socat behind its node proxy, and web's cgroup.
struct Native {
    cg: TestCgroup,
    _dir: TempDir,
    socket: PathBuf,
    agent: AgentProcess,
    _socat: Spawned,
    /// socat's node proxy (the agent's inbound listener).
    inbound: SocketAddr,
    /// `socat.svc.<trust-domain>`.
    sni: String,
    trust_domain: String,
}

impl Native {
    fn start(name: &str) -> Result<Self> {
        require_privileges()?;
        let (cg, agent, socket) = agent_with_cgroups(name, &["web", "socat"])?;
        let dir = TempDir::new(name)?;
        let (socat, socat_port) = socat_echo()?;
        register(&agent, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
        register(
            &agent,
            &json!({"Name": "socat", "Port": socat_port, "cgroup": "socat",
                    "Connect": {"Proxy": {}}}),
        )?;
        let inbound = connect_address(&agent, "socat")?;
        let (trust_domain, _) = roots(&agent, &dir.0)?;
        Ok(Self {
            cg,
            _dir: dir,
            socket,
            agent,
            _socat: socat,
            inbound,
            sni: format!("socat.svc.{trust_domain}"),
            trust_domain,
        })
    }

    fn web(&self) -> PathBuf {
        self.cg.path.join("web")
    }

    /// Runs `program args` in web's cgroup: (exit code, stdout, stderr).
    fn run_in_web(&self, program: &str, args: &[&str]) -> Result<(i32, String, String)> {
        CgroupProc::spawn(&self.web(), program, args)?.output(Duration::from_secs(30))
    }

    fn deny_web_to_socat(&self) -> Result<()> {
        let out = cli(
            &self.agent,
            &["intention", "create", "-deny", "web", "socat"],
        )?;
        ensure!(
            out.status.success(),
            "intention create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn web_id(&self) -> String {
        format!("spiffe://{}/ns/default/dc/dc1/svc/web", self.trust_domain)
    }
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key))
}

/// `target/debug/examples/spiffe_native`, beside the agent binary; `cargo xtask
/// test` builds it before the integration tests.
fn example_binary() -> Result<PathBuf> {
    let agent = agent_binary()?;
    let bin = agent
        .parent()
        .context("the agent binary has no directory")?
        .join("examples/spiffe_native");
    ensure!(
        bin.is_file(),
        "{} is missing: `cargo xtask test` builds it (or `cargo build -p connect-agent --example spiffe_native`)",
        bin.display()
    );
    Ok(bin)
}

#[test]
fn native_python_ssl_client_with_a_py_spiffe_svid_is_echoed_and_refused_by_a_deny() -> Result<()> {
    let python = venv_python()?;
    let script = readme_python()?;
    let n = Native::start("wlnat-py")?;
    let (host, port) = (n.inbound.ip().to_string(), n.inbound.port().to_string());
    let endpoint_var = format!("SPIFFE_ENDPOINT_SOCKET=unix://{}", n.socket.display());
    let args = [
        endpoint_var.as_str(),
        &python,
        "-c",
        &script,
        &host,
        &port,
        &n.sni,
        LINE,
    ];

    let (code, out, err) = n.run_in_web("env", &args)?;
    ensure!(
        code == 0,
        "python failed ({code}): {out}\n{err}\n{}",
        n.agent.log()
    );
    ensure!(
        field(&out, "id=") == Some(n.web_id().as_str()),
        "web's SVID: {out}"
    );
    ensure!(
        field(&out, "peer=")
            == Some(format!("spiffe://{}/ns/default/dc/dc1/svc/socat", n.trust_domain).as_str()),
        "the node proxy presents socat's SVID: {out}"
    );
    ensure!(
        field(&out, "answer=") == Some(LINE),
        "no echo through socat's node proxy: {out}\n{err}\n{}",
        n.agent.log()
    );

    n.deny_web_to_socat()?;
    let (code, out, err) = n.run_in_web("env", &args)?;
    ensure!(code != 0, "denied, yet python succeeded: {out}");
    ensure!(
        field(&out, "peer=").is_some(),
        "the handshake of a denied client completes: {out}\n{err}"
    );
    ensure!(
        field(&out, "answer=").is_none(),
        "denied, yet echoed: {out}"
    );
    // A reset, as Python reports it; an alert would read "[SSL: …ALERT…]".
    ensure!(
        (err.contains("ssl.SSLEOFError") || err.contains("ConnectionResetError"))
            && !err.contains("ALERT"),
        "a denied native client is reset after its handshake, without an alert: {out}\n{err}"
    );
    println!(
        "denied: python ended with {:?}",
        err.lines().last().unwrap_or("")
    );
    ensure!(
        n.agent.log().contains("connection denied"),
        "the denial is logged:\n{}",
        n.agent.log()
    );
    Ok(())
}

#[test]
fn native_rust_spiffe_crate_example_prints_its_id_is_echoed_and_refused_by_a_deny() -> Result<()> {
    let example = example_binary()?;
    let example = example.to_string_lossy().into_owned();
    let n = Native::start("wlnat-rs")?;
    let endpoint = format!("unix://{}", n.socket.display());
    let inbound = n.inbound.to_string();
    // CgroupProc execs through a shell that moves itself into the cgroup; env(1)
    // sets the endpoint for the example alone.
    let endpoint_var = format!("SPIFFE_ENDPOINT_SOCKET={endpoint}");
    let args = [endpoint_var.as_str(), &example, &inbound, &n.sni, LINE];

    let (code, out, err) = n.run_in_web("env", &args)?;
    ensure!(
        code == 0,
        "spiffe_native failed ({code}): {out}\n{err}\n{}",
        n.agent.log()
    );
    ensure!(
        field(&out, "id=") == Some(n.web_id().as_str()),
        "web's SPIFFE ID: {out}"
    );
    ensure!(
        field(&out, "answer=") == Some(LINE),
        "no echo through socat's node proxy: {out}\n{err}"
    );

    n.deny_web_to_socat()?;
    let (code, out, err) = n.run_in_web("env", &args)?;
    ensure!(code != 0, "denied, yet spiffe_native succeeded: {out}");
    ensure!(
        field(&out, "answer=").is_none(),
        "denied, yet echoed: {out}"
    );
    ensure!(
        err.contains("Connection reset by peer"),
        "a denied native client is reset after its handshake: {out}\n{err}"
    );
    println!(
        "denied: spiffe_native ended with {:?}",
        err.lines().find(|l| l.starts_with("Error:")).unwrap_or("")
    );
    Ok(())
}
