//! Two nodes, each a network namespace with its own agent, joined by a veth and
//! sharing state through an etcd member on node A: `web` (a python3 process in its
//! service cgroup on node A, no configuration) dials socat's address on node B. The
//! connection crosses the veth as mutual TLS between the two node proxies, and a
//! capture on the veth must not contain the payload (a plaintext control connection
//! over the same veth shows the capture would have seen it). A direct connection from
//! node A to socat's plaintext port is dropped by node B's eBPF; a deny intention
//! created on node A stops `web`.
//!
//! Agents run with `nsenter --net=`; their HTTP APIs are on each namespace's own
//! loopback, so the test talks to them with the CLI run inside the namespace.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use connect_tests::{
    agent::{agent_binary, private_dir},
    etcd::TlsFiles,
    lab::{CgroupProc, TestCgroup, TestNetns, require_privileges, veth},
    mesh::ONE_SHOT_CLIENT,
    wait::wait_for,
};

const A_IP: &str = "198.18.9.1";
const B_IP: &str = "198.18.9.2";
const ETCD_CLIENT: u16 = 23790;
const ETCD_PEER: u16 = 23800;
const SOCAT_PORT: u16 = 8181;
const CONTROL_PORT: u16 = 8282;
const HTTP: &str = "127.0.0.1:8500";

/// A process started in a namespace, its stderr in a file; killed by PID on drop.
struct NsProc {
    child: Child,
    log: PathBuf,
}

impl NsProc {
    fn spawn(ns: &TestNetns, log: PathBuf, program: &Path, args: &[String]) -> Result<Self> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} in {}", program.display(), ns.name))?;
        Ok(Self { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        // SIGTERM first: an agent detaches its programs and ends cleanly.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `program args` in `ns` to completion, bounded.
fn ns_run(ns: &TestNetns, program: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} {args:?} did not finish within {timeout:?}",
                program.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(ns: &TestNetns, args: &[&str]) -> Result<Output> {
    let mut all = args.to_vec();
    all.extend(["-http-addr", HTTP]);
    ns_run(ns, &agent_binary()?, &all, Duration::from_secs(30))
}

/// One node's agent with its service definitions.
struct Node {
    agent: NsProc,
    dir: PathBuf,
}

impl Node {
    fn start(
        ns: &TestNetns,
        name: &str,
        ip: &str,
        cgroup: &Path,
        services: &str,
        tls: &TlsFiles,
    ) -> Result<Self> {
        let dir = private_dir(&format!("two-{name}"))?;
        let config = dir.join("config");
        std::fs::create_dir_all(&config)?;
        std::fs::write(config.join("services.json"), services)?;
        let args: Vec<String> = [
            "--data-dir",
            &dir.join("data").to_string_lossy(),
            "--config-dir",
            &config.to_string_lossy(),
            "--store",
            &format!("etcd://{A_IP}:{ETCD_CLIENT}"),
            "--server",
            "--acl-default-policy",
            "allow",
            "--node-name",
            name,
            "--advertise-addr",
            ip,
            "--inbound-addr",
            &format!("{ip}:20000"),
            "--http-addr",
            HTTP,
            "--cgroup",
            &cgroup.to_string_lossy(),
            // Both nodes share the machine's /run: a socket each, in its directory.
            "--workload-api-socket",
            &dir.join("workload.sock").to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(tls.agent_flags())
        .collect();
        let agent = NsProc::spawn(ns, dir.join("agent.log"), &agent_binary()?, &args)?;
        let node = Self { agent, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if cli(ns, &["ca", "roots"]).is_ok_and(|o| o.status.success()) {
                return Ok(node);
            }
            if Instant::now() > deadline {
                bail!("agent {name} is not ready:\n{}", node.agent.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn echo_of(p: CgroupProc) -> Result<String> {
    let (_, out, err) = p.output(Duration::from_secs(20))?;
    out.lines()
        .find_map(|l| l.strip_prefix("echo="))
        .map(str::to_owned)
        .with_context(|| format!("client printed no echo: {out}\n{err}"))
}

#[test]
fn web_on_node_a_reaches_socat_on_node_b_over_mtls_only() -> Result<()> {
    require_privileges()?;
    let a = TestNetns::create("two-a")?;
    let b = TestNetns::create("two-b")?;
    let (iface, _) = veth(&a, &format!("{A_IP}/24"), &b, &format!("{B_IP}/24"))?;
    let work = private_dir("two-nodes")?;
    let _work_guard = RemoveDir(work.clone());

    // etcd, one member on node A, reachable from B across the veth: https only,
    // with client certificates, as agents off loopback require.
    let etcd_bin = which("etcd").context("etcd is needed (Debian package etcd-server)")?;
    let tls_dir = work.join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    let tls = TlsFiles::make_for(&tls_dir, &[A_IP])?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let etcd = NsProc::spawn(
        &a,
        work.join("etcd.log"),
        &etcd_bin,
        &[
            "--name".into(),
            "two-a".into(),
            "--data-dir".into(),
            work.join("etcd").to_string_lossy().into_owned(),
            "--listen-client-urls".into(),
            format!("https://{A_IP}:{ETCD_CLIENT}"),
            "--advertise-client-urls".into(),
            format!("https://{A_IP}:{ETCD_CLIENT}"),
            "--cert-file".into(),
            path(&tls.server_cert),
            "--key-file".into(),
            path(&tls.server_key),
            "--trusted-ca-file".into(),
            path(&tls.ca),
            "--client-cert-auth".into(),
            "--listen-peer-urls".into(),
            format!("http://{A_IP}:{ETCD_PEER}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{A_IP}:{ETCD_PEER}"),
            "--initial-cluster".into(),
            format!("two-a=http://{A_IP}:{ETCD_PEER}"),
        ],
    )?;

    let mut cg_a = TestCgroup::create("two-a")?;
    let web_cg = cg_a.child("web")?.to_owned();
    let mut cg_b = TestCgroup::create("two-b")?;
    let socat_cg = cg_b.child("socat")?.to_owned();

    let node_a = Node::start(
        &a,
        "node-a",
        A_IP,
        &cg_a.path,
        r#"{"service": {"name": "web", "port": 0, "cgroup": "web"}}"#,
        &tls,
    )
    .with_context(|| etcd.log())?;
    let node_b = Node::start(
        &b,
        "node-b",
        B_IP,
        &cg_b.path,
        &format!(r#"{{"service": {{"name": "socat", "port": {SOCAT_PORT}, "cgroup": "socat"}}}}"#),
        &tls,
    )?;
    // socat on node B, in its service cgroup, listening on every address.
    let _socat = b.spawn(
        Some(&socat_cg),
        "socat",
        &[
            &format!("tcp-l:{SOCAT_PORT},fork,reuseaddr"),
            "exec:/bin/cat",
        ],
    )?;
    // A plaintext control service on node B, outside the mesh.
    let _control = b.spawn(
        None,
        "socat",
        &[
            &format!("tcp-l:{CONTROL_PORT},fork,reuseaddr"),
            "exec:/bin/cat",
        ],
    )?;
    let logs = || {
        format!(
            "--- node A ---\n{}\n--- node B ---\n{}",
            node_a.agent.log(),
            node_b.agent.log()
        )
    };

    // Node A learns socat's instance on B through etcd.
    wait_for(Duration::from_secs(10), "node A to see socat", || {
        ns_run(
            &a,
            Path::new("dig"),
            &["@127.0.0.1", "-p", "8600", "+short", "socat.service.consul"],
            Duration::from_secs(5),
        )
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(B_IP))
    })
    .with_context(logs)?;

    // Capture everything on node A's end of the veth.
    let pcap = work.join("veth.pcap");
    let capture = NsProc::spawn(
        &a,
        work.join("tcpdump.log"),
        &which("tcpdump").context("tcpdump is needed (Debian package tcpdump)")?,
        &[
            "-i".into(),
            iface.clone(),
            "-U".into(),
            "-s".into(),
            "0".into(),
            "-w".into(),
            pcap.to_string_lossy().into_owned(),
        ],
    )?;
    wait_for(Duration::from_secs(10), "tcpdump to listen", || {
        capture.log().contains("listening on")
    })?;

    let secret = format!("mesh-payload-{}", std::process::id());
    let client = |host: &str, port: u16, payload: &str| {
        a.spawn(
            Some(&web_cg),
            "python3",
            &["-c", ONE_SHOT_CLIENT, host, &port.to_string(), payload],
        )
    };
    let mut echo = String::new();
    // The redirect maps follow the catalog; give them a moment on a slow machine.
    wait_for(
        Duration::from_secs(10),
        "the echo through both proxies",
        || {
            echo = client(B_IP, SOCAT_PORT, &secret)
                .and_then(echo_of)
                .unwrap_or_default();
            echo.contains(&secret)
        },
    )
    .with_context(|| format!("last echo {echo:?}\n{}", logs()))?;

    let control = format!("plain-control-{}", std::process::id());
    let echo = a
        .spawn(
            None,
            "python3",
            &[
                "-c",
                ONE_SHOT_CLIENT,
                B_IP,
                &CONTROL_PORT.to_string(),
                &control,
            ],
        )
        .and_then(echo_of)?;
    ensure!(echo.contains(&control), "control echo: {echo}");

    // Off node B, socat's plaintext port is unreachable (outside A's app cgroup, so
    // not redirected either).
    let direct = a.spawn(
        None,
        "python3",
        &[
            "-c",
            ONE_SHOT_CLIENT,
            B_IP,
            &SOCAT_PORT.to_string(),
            "direct",
        ],
    )?;
    let (code, out, _) = direct.output(Duration::from_secs(20))?;
    ensure!(
        code == 3 || !out.contains("direct"),
        "a direct plaintext connection to socat on node B worked: {out}"
    );

    // tcpdump writes each packet as it sees it (-U), and the control connection
    // crossed the veth after the mesh one: once the file holds the control, it holds
    // the mesh connection's packets too.
    let holds =
        |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    wait_for(
        Duration::from_secs(5),
        "the capture to hold the control",
        || std::fs::read(&pcap).is_ok_and(|b| holds(&b, &control)),
    )
    .context("the capture misses the plaintext control: it proves nothing")?;
    drop(capture);
    let bytes = std::fs::read(&pcap).context("reading the capture")?;
    let has = |needle: &str| holds(&bytes, needle);
    ensure!(
        has(&control),
        "the capture misses the plaintext control ({} bytes): it proves nothing",
        bytes.len()
    );
    ensure!(
        !has(&secret),
        "the mesh payload crossed the veth in plaintext"
    );
    println!(
        "capture: {} bytes, control seen, mesh payload not seen",
        bytes.len()
    );

    // A deny intention created on node A reaches node B's decision through etcd.
    let out = cli(&a, &["intention", "create", "-deny", "web", "socat"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("Created: web => socat (deny)"),
        "{out:?}"
    );
    let mut echo = String::new();
    wait_for(Duration::from_secs(5), "the deny to take effect", || {
        echo = client(B_IP, SOCAT_PORT, &secret)
            .and_then(echo_of)
            .unwrap_or_else(|e| e.to_string());
        !echo.contains(&secret)
    })
    .with_context(|| format!("last echo {echo:?}\n{}", logs()))?;
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
