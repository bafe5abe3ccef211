//! Security in production mode, against the real binary: ACLs with default deny
//! (py-consul with tokens), the HTTPS API with client verification and the CLI over
//! it, `doctor`, the data directory's protection, and an external TLS scanner
//! (sslyze, installed by `cargo xtask test` into target/py-venv) that must find
//! nothing on the HTTPS API nor on the inbound mTLS port.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use connect_tests::agent::{
    AgentProcess, NO_WORKLOAD_API, agent_binary, free_port, http, http_with_token, private_dir,
};

/// Kills a child process (by its handle) however the test ends.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a test's directory however the test ends.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn python() -> Result<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv/bin/python3");
    if !p.is_file() {
        bail!(
            "{} is missing: `cargo xtask test` creates the venv with py-consul and sslyze",
            p.display()
        );
    }
    Ok(p)
}

fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Runs `connect-agent ARGS` (a CLI subcommand) without inherited CONNECT_* settings.
fn cli(args: &[&str]) -> Result<Output> {
    let out = Command::new(agent_binary()?)
        .args(args)
        .env_remove("CONNECT_HTTP_TOKEN")
        .env_remove("CONNECT_HTTP_ADDR")
        .output()
        .context("running connect-agent")?;
    Ok(out)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `acl bootstrap` through the CLI; returns the management secret.
fn bootstrap(addr: SocketAddr) -> Result<String> {
    let out = cli(&["acl", "bootstrap", "-http-addr", &addr.to_string()])?;
    if !out.status.success() {
        bail!("acl bootstrap failed: {}", text(&out));
    }
    let stdout = String::from_utf8(out.stdout)?;
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("SecretID:"))
        .map(|s| s.trim().to_owned())
        .context("no SecretID in the bootstrap output")
}

/// A production agent (no --dev) in a private temporary directory.
fn production_agent(name: &str, extra: &[&str]) -> Result<(AgentProcess, DirGuard)> {
    let dir = private_dir(name)?;
    let guard = DirGuard(dir.clone());
    let agent = AgentProcess::start_in(&dir, &[], extra)?;
    Ok((agent, guard))
}

#[test]
fn py_consul_with_a_token() -> Result<()> {
    let python = python()?;
    let (agent, _dir) = production_agent("acl-py", &[])?;
    // Default deny: nothing but the roots without a token.
    let (status, body) = http(
        agent.http_addr,
        "GET",
        "/v1/agent/connect/ca/leaf/web",
        None,
    )?;
    assert_eq!((status, body.as_str()), (403, "Permission denied"));
    let root = bootstrap(agent.http_addr)?;
    let out = Command::new(&python)
        .arg(py_script("acl_compat.py"))
        .arg(agent.http_addr.ip().to_string())
        .arg(agent.http_addr.port().to_string())
        .arg(&root)
        .output()
        .context("running acl_compat.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        bail!(
            "py-consul ACL checks failed:\n{}\n--- agent log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
    }
    assert!(stdout.contains("all py-consul ACL checks passed"));
    // The secrets never reach the agent's log.
    assert!(
        !agent.log().contains(&root),
        "the management secret was logged"
    );
    Ok(())
}

/// An agent with the HTTPS API under --verify-incoming, bootstrapped, with the CA
/// bundle and a client certificate (a service leaf) written to files.
struct HttpsAgent {
    agent: AgentProcess,
    https: SocketAddr,
    root: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    _dir: DirGuard,
    _files: DirGuard,
}

fn https_agent(name: &str) -> Result<HttpsAgent> {
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let (agent, dir) = production_agent(
        name,
        &["--https-addr", &https.to_string(), "--verify-incoming"],
    )?;
    let root = bootstrap(agent.http_addr)?;
    let files = private_dir(&format!("{name}-files"))?;
    let ca = files.join("ca.pem");
    let out = cli(&[
        "ca",
        "roots",
        "-pem",
        "-http-addr",
        &agent.http_addr.to_string(),
    ])?;
    if !out.status.success() {
        bail!("ca roots -pem failed: {}", text(&out));
    }
    std::fs::write(&ca, &out.stdout)?;
    let (status, body) = http_with_token(
        agent.http_addr,
        "GET",
        "/v1/agent/connect/ca/leaf/cli",
        None,
        Some(&root),
    )?;
    if status != 200 {
        bail!("leaf for the CLI: {status} {body}");
    }
    let leaf: serde_json::Value = serde_json::from_str(&body)?;
    let cert = files.join("cli.pem");
    let key = files.join("cli-key.pem");
    std::fs::write(&cert, leaf["CertPEM"].as_str().context("CertPEM")?)?;
    std::fs::write(
        &key,
        leaf["PrivateKeyPEM"].as_str().context("PrivateKeyPEM")?,
    )?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    Ok(HttpsAgent {
        agent,
        https,
        root,
        ca,
        cert,
        key,
        _dir: dir,
        _files: DirGuard(files),
    })
}

#[test]
fn https_api_with_verify_incoming_and_the_cli() -> Result<()> {
    let a = https_agent("acl-https")?;
    let url = format!("https://localhost:{}", a.https.port());
    let ca = a.ca.display().to_string();
    let cert = a.cert.display().to_string();
    let key = a.key.display().to_string();

    // Without a client certificate the handshake is refused.
    let out = cli(&[
        "acl",
        "token",
        "list",
        "-http-addr",
        &url,
        "-ca-file",
        &ca,
        "-token",
        &a.root,
    ])?;
    assert!(
        !out.status.success(),
        "no client cert accepted: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("cannot reach the agent"),
        "{}",
        text(&out)
    );
    // Without the CA the agent is not trusted.
    let out = cli(&[
        "acl",
        "token",
        "list",
        "-http-addr",
        &url,
        "-client-cert",
        &cert,
        "-client-key",
        &key,
        "-token",
        &a.root,
    ])?;
    assert!(
        !out.status.success(),
        "untrusted server accepted: {}",
        text(&out)
    );

    // With both, the CLI works over HTTPS, and ACLs still apply there.
    let with = |args: &[&str]| -> Result<Output> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "-http-addr",
            &url,
            "-ca-file",
            &ca,
            "-client-cert",
            &cert,
            "-client-key",
            &key,
        ]);
        cli(&all)
    };
    let out = with(&["acl", "token", "list", "-token", &a.root])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Bootstrap Token (Global Management)"),
        "{}",
        text(&out)
    );
    let out = with(&["acl", "token", "list"])?;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("403 (Permission denied)"),
        "{}",
        text(&out)
    );
    // The token from CONNECT_HTTP_TOKEN, as the CLI's users set it.
    let out = Command::new(agent_binary()?)
        .args([
            "acl",
            "token",
            "read",
            "-self",
            "-http-addr",
            &url,
            "-ca-file",
            &ca,
        ])
        .args(["-client-cert", &cert, "-client-key", &key])
        .env("CONNECT_HTTP_TOKEN", &a.root)
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("global-management"), "{}", text(&out));
    let out = with(&[
        "intention",
        "create",
        "-deny",
        "web",
        "db",
        "-token",
        &a.root,
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    let out = with(&["intention", "check", "web", "db", "-token", &a.root])?;
    assert_eq!(out.status.code(), Some(1), "denied: {}", text(&out));

    // doctor over HTTPS: everything but eBPF (no --cgroup here) is in order.
    let out = with(&["doctor", "-token", &a.root])?;
    let report = text(&out);
    println!("{report}");
    assert_eq!(out.status.code(), Some(1), "{report}");
    for ok in [
        "ok      ACLs enabled, default deny",
        "ok      agent API encrypted and verified",
        "ok      plaintext HTTP on loopback only",
        "ok      data directory private",
        "not ok  no non-Connect traffic to services",
    ] {
        assert!(report.contains(ok), "missing {ok:?} in\n{report}");
    }
    // doctor needs agent:read.
    let out = with(&["doctor"])?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("403"), "{}", text(&out));
    let _ = &a.agent;
    Ok(())
}

#[test]
fn doctor_flags_a_dev_agent() -> Result<()> {
    let agent = AgentProcess::start_dev("acl-doctor-dev", &[])?;
    let out = cli(&["doctor", "-http-addr", &agent.http_addr.to_string()])?;
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("not ok  ACLs enabled, default deny: ACLs are disabled"),
        "{report}"
    );
    assert!(
        report.contains("not ok  agent API encrypted and verified"),
        "{report}"
    );
    Ok(())
}

/// Runs tls_scan.py against `target`; Ok(report) if it found nothing.
fn scan(target: &str, extra: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(python()?)
        .arg(py_script("tls_scan.py"))
        .arg(target)
        .args(extra)
        .output()
        .context("running tls_scan.py (sslyze)")?;
    Ok((out.status.success(), text(&out)))
}

#[test]
fn tls_scanner_finds_nothing_on_the_https_api() -> Result<()> {
    let a = https_agent("acl-scan")?;
    let target = a.https.to_string();
    let (clean, report) = scan(
        &target,
        &[
            "--ca-file",
            &a.ca.display().to_string(),
            "--cert",
            &a.cert.display().to_string(),
            "--key",
            &a.key.display().to_string(),
        ],
    )?;
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("finding:"))
        .collect();
    assert!(
        clean && findings.is_empty(),
        "the scanner found:\n{}",
        findings.join("\n")
    );
    assert!(report.contains("no findings"), "{report}");

    // The scanner does fail on a weak server: openssl with TLS 1.0-1.2, RSA key
    // exchange and CBC, no TLS 1.3.
    let dir = private_dir("acl-scan-weak")?;
    let _guard = DirGuard(dir.clone());
    let (cert, key) = (dir.join("weak.pem"), dir.join("weak-key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl req (Debian's openssl)")?;
    if !made.status.success() {
        bail!("openssl req failed: {}", text(&made));
    }
    let port = free_port()?;
    let server = Command::new("openssl")
        .args([
            "s_server",
            "-www",
            "-no_tls1_3",
            "-cipher",
            "AES128-SHA:@SECLEVEL=0",
        ])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("openssl s_server")?;
    let _server = Kill(server);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("openssl s_server did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (clean, report) = scan(&format!("127.0.0.1:{port}"), &[])?;
    assert!(!clean, "a weak server passed the scan:\n{report}");
    assert!(
        report.contains("finding: tls_1_2 accepts weak suite"),
        "{report}"
    );
    Ok(())
}

#[test]
fn data_dir_and_key_files_are_protected() -> Result<()> {
    let base = private_dir("acl-datadir")?;
    let _guard = DirGuard(base.clone());
    let run = |dir: &Path, extra: &[&str]| -> Result<Output> {
        let out = Command::new(agent_binary()?)
            .arg("--data-dir")
            .arg(dir)
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--dns-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--outbound-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--inbound-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(NO_WORKLOAD_API)
            .args(extra)
            .output()?;
        Ok(out)
    };

    // Group/other-readable data directory: refused, with the reason and the fix.
    let open = base.join("open");
    std::fs::create_dir(&open)?;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755))?;
    let out = run(&open, &[])?;
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains(&open.display().to_string())
            && msg.contains("mode 0755")
            && msg.contains("chmod 700"),
        "{msg}"
    );

    // A readable file inside: refused, naming it.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700))?;
    let leaked = open.join("connect.redb");
    std::fs::write(&leaked, b"")?;
    std::fs::set_permissions(&leaked, std::fs::Permissions::from_mode(0o644))?;
    let out = run(&open, &[])?;
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains(&leaked.display().to_string()) && msg.contains("chmod 600"),
        "{msg}"
    );

    // A key file others can read: refused.
    let keyfile = base.join("key.pem");
    std::fs::write(&keyfile, b"not really a key")?;
    std::fs::set_permissions(&keyfile, std::fs::Permissions::from_mode(0o644))?;
    let fresh = base.join("fresh-for-key");
    let out = run(
        &fresh,
        &[
            "--https-addr",
            &format!("127.0.0.1:{}", free_port()?),
            "--cert-file",
            &keyfile.display().to_string(),
            "--key-file",
            &keyfile.display().to_string(),
        ],
    )?;
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("key file") && msg.contains("chmod 600"),
        "{msg}"
    );

    // A directory that does not exist yet is created 0700 and accepted.
    let created = base.join("new/data");
    let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let child = Command::new(agent_binary()?)
        .arg("--data-dir")
        .arg(&created)
        .args(["--http-addr", &http_addr.to_string()])
        .args(["--dns-addr", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--outbound-addr", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--inbound-addr", &format!("127.0.0.1:{}", free_port()?)])
        .args(NO_WORKLOAD_API)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let _agent = Kill(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !http(http_addr, "GET", "/v1/agent/connect/ca/roots", None).is_ok_and(|(s, _)| s == 200) {
        if std::time::Instant::now() > deadline {
            bail!("the agent did not start on a new data directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = std::fs::metadata(&created)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data directory created with mode {mode:o}");
    Ok(())
}

#[test]
fn tls_scanner_finds_nothing_on_the_inbound_mtls_port() -> Result<()> {
    use connect_tests::mesh::{TempDir, connect_address, leaf_files, register, roots, socat_echo};
    let agent = AgentProcess::start_dev("acl-scan-inbound", &[])?;
    // A live local service behind the SNI: the scanner's probes (early data, for
    // one) complete a handshake and expect the connection to stay up.
    let (_socat, port) = socat_echo()?;
    register(&agent, &serde_json::json!({"Name": "socat", "Port": port}))?;
    let dir = TempDir::new("acl-scan-inbound")?;
    let (trust_domain, ca) = roots(&agent, &dir.0)?;
    let (cert, key) = leaf_files(&agent, "web", &dir.0)?;
    let inbound = connect_address(&agent, "socat")?;
    let sni = format!("socat.svc.{trust_domain}");
    let (clean, report) = scan(
        &inbound.to_string(),
        &[
            "--ca-file",
            &ca.display().to_string(),
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--sni",
            &sni,
        ],
    )?;
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("finding:"))
        .collect();
    assert!(
        clean && findings.is_empty(),
        "the scanner found on the inbound port:\n{}\n{report}",
        findings.join("\n")
    );
    assert!(report.contains("no findings"), "{report}");
    Ok(())
}
