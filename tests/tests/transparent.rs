//! The transparent path with the real agent binary, eBPF and unmodified clients:
//! `web` is a python3 process in its service cgroup that dials socat's own address
//! (no upstream ports, no configuration). The agent's catalog drives the eBPF maps,
//! the transparent listener takes the connection, and the node proxies carry it
//! over mTLS to socat, as intentions allow.
//!
//! Checked here: the echo works through the mesh and `getpeername()` shows the
//! dialed address; the agent logs the original destination and both services; a
//! deny intention refuses new connections and closes a live one within a second;
//! deregistering socat stops redirection and protection within a second and
//! registering it again restores them; a process outside the cgroup, and a
//! destination outside the mesh, are left alone.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use connect_tests::{
    agent::{AgentProcess, http},
    lab::{CgroupProc, TestCgroup, assert_eventually, require_privileges},
    mesh::{TempDir, cli, register, socat_echo},
};
use serde_json::json;

/// A client that dials `127.0.0.1:<port>`, sends one line, and prints what came back
/// and what `getpeername()` says. With a file argument it then stays connected,
/// writes `echoed` to the file, and writes `eof <unix time>` when the connection
/// ends (for the live-close check).
const CLIENT: &str = r#"
import socket, sys, time
port = int(sys.argv[1])
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
except ConnectionResetError:
    # Refused so fast that connect() itself reports the reset.
    print("peer=reset")
    print("echo=''")
    sys.exit(0)
peer = s.getpeername()
s.sendall(b"hello mesh\n")
data = b""
try:
    while not data.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
except (socket.timeout, ConnectionResetError):
    pass
print("peer=%s:%d" % peer)
print("echo=%r" % data.decode(errors="replace"))
sys.stdout.flush()
if len(sys.argv) > 2:
    with open(sys.argv[2], "w") as f:
        f.write("echoed\n")
    s.settimeout(20)
    try:
        while s.recv(100):
            pass
    except (socket.timeout, ConnectionResetError):
        pass
    with open(sys.argv[2], "a") as f:
        f.write("eof %f\n" % time.time())
"#;

/// A client whose connection is to be refused: connects to 127.0.0.1:<port>,
/// sends a line if told to `speak`, and prints how its socket reported the end
/// (`reset`, `eof`, `data …` or `open` after 5 s) and how long after its connect.
const REFUSED: &str = r#"
import socket, sys, time
port, mode = int(sys.argv[1]), sys.argv[2]
start = time.monotonic()
try:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
except ConnectionResetError:
    # Refused so fast that connect() itself reports the reset.
    print("closed=reset took_ms=%.1f" % ((time.monotonic() - start) * 1000))
    sys.exit(0)
if mode == "speak":
    try:
        s.sendall(b"hello mesh\n")
    except OSError:
        pass
try:
    data = s.recv(100)
    how = "eof" if not data else "data %r" % data
except ConnectionResetError:
    how = "reset"
except socket.timeout:
    how = "open"
print("closed=%s took_ms=%.1f" % (how, (time.monotonic() - start) * 1000))
"#;

struct Node {
    agent: AgentProcess,
    cg: TestCgroup,
    socat_port: u16,
    _socat: connect_tests::mesh::Spawned,
}

impl Node {
    fn start(name: &str) -> Result<Self> {
        require_privileges()?;
        let mut cg = TestCgroup::create(name)?;
        cg.child("web")?;
        let cgroup = cg.path.to_string_lossy().into_owned();
        // Close records of allowed connections are debug events.
        let agent = AgentProcess::start_dev_env(
            name,
            &["--cgroup", &cgroup],
            &[("RUST_LOG", "info,connect_agent::proxy=debug")],
        )?;
        let (socat, socat_port) = socat_echo()?;
        register(&agent, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
        register_socat(&agent, socat_port)?;
        Ok(Self {
            agent,
            cg,
            socat_port,
            _socat: socat,
        })
    }

    fn web(&self) -> std::path::PathBuf {
        self.cg.path.join("web")
    }

    /// Runs the client in `web`'s cgroup against `port`: (echo, peer).
    fn dial_from_web(&self, port: u16) -> Result<(String, String)> {
        client_output(CgroupProc::spawn(
            &self.web(),
            "python3",
            &["-c", CLIENT, &port.to_string()],
        )?)
    }

    fn redirected(&self) -> Result<u64> {
        ebpf_counter(&self.agent, "redirected")
    }
}

fn register_socat(agent: &AgentProcess, port: u16) -> Result<()> {
    register(
        agent,
        &json!({"ID": "socat-1", "Name": "socat", "Port": port, "Connect": {"Proxy": {}}}),
    )
}

fn client_output(p: CgroupProc) -> Result<(String, String)> {
    let (code, out, err) = p.output(Duration::from_secs(20))?;
    ensure!(code == 0, "client failed ({code}): {out}\n{err}");
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::to_owned)
            .with_context(|| format!("client printed no {k}: {out}\n{err}"))
    };
    Ok((field("echo=")?, field("peer=")?))
}

/// One of the eBPF counters from the agent's metrics.
fn ebpf_counter(agent: &AgentProcess, event: &str) -> Result<u64> {
    metric(
        agent,
        &format!("connect_ebpf_events_total{{event=\"{event}\"}} "),
    )
}

/// The sample of the agent's metrics whose line starts with `prefix`.
fn metric(agent: &AgentProcess, prefix: &str) -> Result<u64> {
    let (status, text) = http(
        agent.http_addr,
        "GET",
        "/v1/agent/metrics?format=prometheus",
        None,
    )?;
    ensure!(status == 200, "metrics: {status} {text}");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .with_context(|| format!("no {prefix:?} in metrics:\n{text}"))?
        .trim()
        .parse()
        .context("counter value")
}

const REUSED: &str = "connect_proxy_streams_total{side=\"outbound\",connection=\"reused\"} ";

const ECHO: &str = "'hello mesh\\n'";

#[test]
fn web_reaches_socat_through_the_mesh_until_denied() -> Result<()> {
    let node = Node::start("transp-echo")?;
    let before = node.redirected()?;
    let (echo, peer) = node
        .dial_from_web(node.socat_port)
        .with_context(|| node.agent.log())?;
    ensure!(
        echo == ECHO,
        "echo through the mesh: {echo}\n{}",
        node.agent.log()
    );
    ensure!(
        peer == format!("127.0.0.1:{}", node.socat_port),
        "getpeername() shows the dialed address, got {peer}"
    );
    ensure!(
        node.redirected()? > before,
        "the connection went through eBPF"
    );
    // The agent knows where the connection was going and who made it.
    let log = node.agent.log();
    let orig = format!("orig_dst=127.0.0.1:{}", node.socat_port);
    ensure!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains(&orig)
            && l.contains("src=web")
            && l.contains("dst=socat")),
        "no close record with {orig}, src=web, dst=socat:\n{log}"
    );
    // Later connections ride the node-to-node connection the first one made.
    for _ in 0..2 {
        let (echo, _) = node.dial_from_web(node.socat_port)?;
        ensure!(echo == ECHO, "echo on a reused connection: {echo}");
    }
    let reused = metric(&node.agent, REUSED)?;
    ensure!(
        reused >= 1,
        "no connection reused a node-to-node connection:\n{}",
        node.agent.log()
    );

    // Deny: a new connection gets no echo.
    let out = cli(
        &node.agent,
        &["intention", "create", "-deny", "web", "socat"],
    )?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("Created: web => socat (deny)"),
        "{out:?}"
    );
    // From the application's socket: reset within a second of its connect,
    // silent (the first rides the pooled node-to-node connection) or speaking.
    for mode in ["silent", "silent", "speak"] {
        let out = CgroupProc::spawn(
            &node.web(),
            "python3",
            &["-c", REFUSED, &node.socat_port.to_string(), mode],
        )?
        .output(Duration::from_secs(20))?;
        let (code, out, err) = out;
        ensure!(code == 0, "client failed ({code}): {out}\n{err}");
        let line = out.trim();
        let took_ms: f64 = line
            .strip_prefix("closed=reset took_ms=")
            .with_context(|| format!("{mode}: not a reset: {line}\n{}", node.agent.log()))?
            .parse()?;
        println!("denied transparent connection ({mode}) reset {took_ms:.1} ms after connect");
        ensure!(
            took_ms < 1000.0,
            "{mode}: reset {took_ms:.1} ms after connect (must be within 1 s)"
        );
    }
    let out = cli(&node.agent, &["intention", "delete", "web", "socat"])?;
    ensure!(out.status.success(), "{out:?}");
    let (echo, _) = node.dial_from_web(node.socat_port)?;
    ensure!(echo == ECHO, "allowed again: {echo}");
    Ok(())
}

#[test]
fn a_live_connection_is_closed_within_a_second_of_a_deny() -> Result<()> {
    let node = Node::start("transp-live")?;
    let dir = TempDir::new("transp-live")?;
    let marker = dir.0.join("client.state");
    let client = CgroupProc::spawn(
        &node.web(),
        "python3",
        &[
            "-c",
            CLIENT,
            &node.socat_port.to_string(),
            &marker.to_string_lossy(),
        ],
    )?;
    assert_eventually(Duration::from_secs(10), "the client echoed", || {
        read(&marker).contains("echoed")
    })
    .with_context(|| node.agent.log())?;
    let denied_at = now();
    let out = cli(
        &node.agent,
        &["intention", "create", "-deny", "web", "socat"],
    )?;
    ensure!(out.status.success(), "{out:?}");
    assert_eventually(Duration::from_secs(5), "the live connection ended", || {
        read(&marker).contains("eof")
    })
    .with_context(|| node.agent.log())?;
    let eof: f64 = read(&marker)
        .lines()
        .find_map(|l| l.strip_prefix("eof "))
        .context("eof line")?
        .trim()
        .parse()?;
    let took = eof - denied_at;
    println!(
        "live connection closed {:.0} ms after the deny",
        took * 1000.0
    );
    ensure!(
        took < 1.0,
        "closed {took:.3} s after the deny (must be within 1 s)"
    );
    client.output(Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn registration_changes_redirection_and_protection_within_a_second() -> Result<()> {
    let node = Node::start("transp-reg")?;
    let cli_ok = |args: &[&str]| -> Result<()> {
        let out = cli(&node.agent, args)?;
        ensure!(out.status.success(), "{args:?}: {out:?}");
        Ok(())
    };
    // With a deny in place, an echo proves the connection was *not* redirected.
    cli_ok(&["intention", "create", "-deny", "web", "socat"])?;
    ensure!(node.dial_from_web(node.socat_port)?.0 == "''", "denied");
    ensure!(protected_ports()?.contains(&node.socat_port));

    let (status, text) = http(
        node.agent.http_addr,
        "PUT",
        "/v1/agent/service/deregister/socat-1",
        None,
    )?;
    ensure!(status == 200, "deregister: {status} {text}");
    let t = Instant::now();
    assert_eventually(Duration::from_secs(1), "port unprotected", || {
        protected_ports().is_ok_and(|p| !p.contains(&node.socat_port))
    })?;
    let (echo, _) = node.dial_from_web(node.socat_port)?;
    ensure!(
        echo == ECHO,
        "after deregistering, socat is reached directly: {echo}"
    );
    println!("deregistration took effect in {:?}", t.elapsed());

    register_socat(&node.agent, node.socat_port)?;
    assert_eventually(Duration::from_secs(1), "port protected again", || {
        protected_ports().is_ok_and(|p| p.contains(&node.socat_port))
    })?;
    ensure!(
        node.dial_from_web(node.socat_port)?.0 == "''",
        "registered again: redirected and denied"
    );
    Ok(())
}

#[test]
fn outsiders_and_destinations_outside_the_mesh_are_left_alone() -> Result<()> {
    let node = Node::start("transp-out")?;
    let (_other, other_port) = socat_echo()?;
    let out = cli(&node.agent, &["intention", "create", "-deny", "*", "*"])?;
    ensure!(out.status.success(), "{out:?}");
    let before = node.redirected()?;

    // In the cgroup, to a port no service has: direct, so it echoes despite `* => *`.
    let (echo, peer) = node.dial_from_web(other_port)?;
    ensure!(echo == ECHO, "not a mesh destination: {echo}");
    ensure!(peer == format!("127.0.0.1:{other_port}"));
    // Outside the cgroup, to socat itself: direct too.
    let p = Command::new("python3")
        .args(["-c", CLIENT, &node.socat_port.to_string()])
        .output()?;
    let out = String::from_utf8_lossy(&p.stdout);
    ensure!(
        out.contains(&format!("echo={ECHO}")),
        "a process outside the cgroup is not redirected: {out}"
    );
    ensure!(
        node.redirected()? == before,
        "nothing was redirected for these connections"
    );
    Ok(())
}

/// The ports in every `PROTECTED_PORTS` map on the machine (each test's agent
/// has its own; ports are unique per test, so membership is what counts).
fn protected_ports() -> Result<Vec<u16>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "name", "PROTECTED_PORTS"])
        .output()
        .context("bpftool is needed (Debian package bpftool)")?;
    if !out.status.success() {
        bail!("bpftool: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut ports = Vec::new();
    let mut entries = Vec::new();
    collect_entries(&v, &mut entries);
    for e in entries {
        // Raw keys: bytes as hex strings; the port is host order (little endian).
        if let Some(bytes) = e["key"].as_array() {
            let b: Vec<u8> = bytes
                .iter()
                .filter_map(|x| x.as_str())
                .filter_map(|x| u8::from_str_radix(x.trim_start_matches("0x"), 16).ok())
                .collect();
            if b.len() >= 2 {
                ports.push(u16::from_le_bytes([b[0], b[1]]));
            }
        } else if let Some(p) = e["formatted"]["key"]["port"].as_u64() {
            ports.push(u16::try_from(p)?);
        }
    }
    Ok(ports)
}

/// bpftool prints one array per map when several match the name.
fn collect_entries(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_entries(x, out)),
        serde_json::Value::Object(o) if o.contains_key("key") => out.push(v.clone()),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_entries(x, out)),
        _ => {}
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `web => db` decided by intentions whatever way web dials: every host-local form
/// of db's port, in both families, goes through the mesh when allowed (each one
/// counted as redirected, none reaching the listener on its own) and is reset when
/// denied. UDP to db's port is refused from web either way (Connect carries TCP
/// only) and reaches it from db's own cgroup; a process outside the application
/// cgroup (the operator's) reaches it directly, the positive control.
#[test]
fn web_reaches_db_by_every_address_form_only_as_intentions_allow() -> Result<()> {
    use connect_tests::probes::{SERVE, dial as dial_port};
    require_privileges()?;
    let mut cg = TestCgroup::create("transp-forms")?;
    let web = cg.child("web")?.to_owned();
    let db = cg.child("db")?.to_owned();
    let cgroup = cg.path.to_string_lossy().into_owned();
    let agent = AgentProcess::start_dev("transp-forms", &["--cgroup", &cgroup])?;
    let port = connect_tests::agent::free_port()?;
    register(&agent, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
    register(
        &agent,
        &json!({"Name": "db", "Port": port, "cgroup": "db", "Connect": {"Proxy": {}}}),
    )?;
    let _server = CgroupProc::spawn(&db, "python3", &["-c", SERVE, &port.to_string()])?;
    let dial = |cgroup: Option<&Path>, mode: &str, host: &str| dial_port(cgroup, mode, host, port);
    assert_eventually(
        Duration::from_secs(5),
        "db up and its port protected",
        || {
            dial(None, "tcp", "127.0.0.1").is_ok_and(|o| o == "got direct peer 127.0.0.1")
                && dial(Some(&web), "udp-sendto", "127.0.0.1").is_ok_and(|o| o == "refused")
        },
    )?;

    let forms = [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("::1", "::1"),
        ("::", "::1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("::ffff:0.0.0.0", "::ffff:127.0.0.1"),
    ];
    // Allowed (--dev): through the mesh, every form.
    for (host, peer) in forms {
        let before = ebpf_counter(&agent, "redirected")?;
        let out = dial(Some(&web), "tcp", host)?;
        ensure!(
            out == format!("got direct peer {peer}"),
            "web -> db at {host} (allowed): {out}\n{}",
            agent.log()
        );
        ensure!(
            ebpf_counter(&agent, "redirected")? > before,
            "web -> db at {host} went through the proxy"
        );
    }
    let out = cli(&agent, &["intention", "create", "-deny", "web", "db"])?;
    ensure!(out.status.success(), "{out:?}");
    for (host, _) in forms {
        let out = dial(Some(&web), "tcp", host)?;
        ensure!(
            out == "failed 104",
            "web -> db at {host} (denied) must be reset: {out}"
        );
    }
    for host in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "::"] {
        for mode in ["udp-sendto", "udp-connect"] {
            let out = dial(Some(&web), mode, host)?;
            ensure!(out == "refused", "web {mode} {host}: {out}");
        }
    }
    // Positive controls: the owner's cgroup over UDP, the operator's process over TCP.
    let out = dial(Some(&db), "udp-sendto", "::1")?;
    ensure!(out == "got direct peer -", "db to its own port: {out}");
    let out = dial(None, "tcp", "::1")?;
    ensure!(
        out == "got direct peer ::1",
        "outside the application cgroup: {out}"
    );
    Ok(())
}

/// An upstream listener speaks as its owner to whoever connects, so with
/// `--cgroup` only the owner's cgroup may connect to it: from `web`'s cgroup the
/// connection echoes through the mesh (positive control), from `db`'s cgroup
/// `connect()` itself is refused (EPERM) and the refusal is counted. Before,
/// `db` reached socat as `web`.
#[test]
fn an_upstream_listener_serves_only_its_owners_cgroup() -> Result<()> {
    let mut node = Node::start("transp-upstream")?;
    node.cg.child("db")?;
    register(
        &node.agent,
        &json!({"Name": "db", "Port": 0, "cgroup": "db"}),
    )?;
    let upstream = connect_tests::agent::free_port()?;
    register(
        &node.agent,
        &json!({"Name": "web", "Port": 0, "cgroup": "web", "Connect": {"Proxy": {"Upstreams": [
            {"DestinationName": "socat", "LocalBindPort": upstream}
        ]}}}),
    )?;
    connect_tests::mesh::wait_listening(
        std::net::SocketAddr::from(([127, 0, 0, 1], upstream)),
        Duration::from_secs(10),
    )?;
    // The guard reaches the map within a moment of the registration.
    assert_eventually(Duration::from_secs(2), "the upstream port guarded", || {
        protected_ports().is_ok_and(|p| p.contains(&upstream))
    })?;

    let (echo, _) = node
        .dial_from_web(upstream)
        .with_context(|| node.agent.log())?;
    ensure!(echo == ECHO, "web through its own upstream: {echo}");

    let before = ebpf_counter(&node.agent, "upstream_refused")?;
    let p = CgroupProc::spawn(
        &node.cg.path.join("db"),
        "python3",
        &[
            "-c",
            "import socket,sys\ntry:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n    print('connected')\nexcept OSError as e:\n    print('refused errno=%d' % e.errno)",
            &upstream.to_string(),
        ],
    )?;
    let (code, out, err) = p.output(Duration::from_secs(20))?;
    ensure!(code == 0, "db's client failed: {out}\n{err}");
    ensure!(
        out.trim() == "refused errno=1",
        "db's cgroup connecting to web's upstream listener: {out}"
    );
    ensure!(
        ebpf_counter(&node.agent, "upstream_refused")? == before + 1,
        "the refusal is counted"
    );
    Ok(())
}
