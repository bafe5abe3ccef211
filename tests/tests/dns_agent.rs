//! DNS and virtual IPs with the real agent binary.
//!
//! - `dig` against a running agent: `<svc>.service.consul` (A, SRV),
//!   `<svc>.connect.consul` (the node's inbound port), `<svc>.virtual.consul` (a
//!   VIP from 240.0.0.0/4 that survives a restart on the same data directory), the
//!   node's own name, and NXDOMAIN for what does not exist.
//! - A DNS port that is taken fails startup with a message naming it.
//! - An application with no configuration in `web`'s cgroup (python3) resolves
//!   `socat.virtual.consul` through the agent with glibc's resolver and reaches
//!   socat through the mesh at that address; a deny intention stops it.
//! - Two socat processes registered as one service `echo`: connections to echo's
//!   VIP are spread over both, and once one is killed (by its PID) every new
//!   connection still succeeds, through the other.
//!
//! The last two need root (eBPF, cgroups, a mount namespace for resolv.conf) and
//! fail saying so without it.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::{AgentProcess, NO_WORKLOAD_API, agent_binary, free_port, http, private_dir},
    dig::{Dig, dig},
    lab::{CgroupProc, TestCgroup, require_privileges},
    mesh::{Spawned, TempDir, cli, get_json, register, socat_echo, wait_listening},
    wait::wait_for_ok,
};
use serde_json::json;

/// The same question over UDP and TCP; both answers must agree.
fn dig_both(server: SocketAddr, name: &str, rtype: &str) -> Result<Dig> {
    let udp = dig(server, &[name, rtype])?;
    let tcp = dig(server, &["+tcp", name, rtype])?;
    ensure!(
        (&udp.status, &udp.answers) == (&tcp.status, &tcp.answers),
        "UDP and TCP disagree for {name} {rtype}: {udp:?} vs {tcp:?}"
    );
    Ok(udp)
}

/// The one A record of `name`, which must be a virtual IP.
fn vip_of(server: SocketAddr, name: &str) -> Result<Ipv4Addr> {
    let answer = dig_both(server, name, "A")?;
    ensure!(answer.status == "NOERROR", "{name}: {answer:?}");
    let [ip] = answer
        .data("A")
        .try_into()
        .map_err(|v| anyhow::anyhow!("{name}: one A record expected, got {v:?}"))?;
    let ip: Ipv4Addr = ip.parse()?;
    ensure!(
        ip.octets()[0] >= 240 && ip != Ipv4Addr::BROADCAST,
        "{name}: {ip} is not in 240.0.0.0/4"
    );
    Ok(ip)
}

/// One gauge or counter from the agent's Prometheus metrics (`name` with labels).
fn metric(agent: &AgentProcess, name: &str) -> Result<u64> {
    let (status, text) = http(
        agent.http_addr,
        "GET",
        "/v1/agent/metrics?format=prometheus",
        None,
    )?;
    ensure!(status == 200, "metrics: {status} {text}");
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .with_context(|| format!("no {name} in metrics:\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} value"))
}

#[test]
fn dig_answers_each_name_from_a_running_agent() -> Result<()> {
    let dir = tempfile::tempdir().context("creating the data directory")?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let flags = ["--acl-default-policy", "allow", "--node-name", "dns-node"];
    let mut agent = AgentProcess::start_in(dir.path(), &[], &flags)?;
    let s = agent.dns_addr;
    let inbound: SocketAddr = get_json(&agent, "/v1/agent/self")?["Member"]["Port"]
        .as_u64()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p as u16)))
        .context("no inbound port in /v1/agent/self")?;
    register(
        &agent,
        &json!({"ID": "socat-1", "Name": "socat", "Port": 8181, "Connect": {"Proxy": {}}}),
    )?;
    register(
        &agent,
        // A second instance on another port (a service address must be one of
        // this node's own, and loopback is refused, so both share the node's).
        &json!({"ID": "socat-2", "Name": "socat", "Port": 8182}),
    )?;
    register(
        &agent,
        &json!({"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}}),
    )?;

    let a = dig_both(s, "socat.service.consul", "A")?;
    ensure!(a.status == "NOERROR", "{a:?}");
    ensure!(a.flags.contains("aa"), "authoritative: {:?}", a.flags);
    ensure!(
        // One record per address, as Consul answers (it drops duplicates of a
        // node that runs a service on several ports).
        a.data("A") == ["127.0.0.1"],
        "socat's instances: {a:?}"
    );
    ensure!(a.ttls.iter().all(|t| *t == 0), "TTL 0: {:?}", a.ttls);
    let srv = dig_both(s, "SOCAT.service.dc1.consul", "SRV")?;
    ensure!(
        srv.data("SRV")
            == [
                "1 1 8181 dns-node.node.dc1.consul.",
                "1 1 8182 dns-node.node.dc1.consul."
            ],
        "SRV of socat: {srv:?}"
    );
    let node = dig_both(s, "dns-node.node.consul", "A")?;
    ensure!(node.data("A") == ["127.0.0.1"], "{node:?}");

    // Connect: both instances are behind the node's one inbound listener.
    let connect = dig_both(s, "socat.connect.consul", "SRV")?;
    ensure!(
        connect.data("SRV") == [format!("1 1 {} dns-node.node.dc1.consul.", inbound.port())],
        "socat.connect: {connect:?} (inbound {inbound})"
    );
    let connect_a = dig_both(s, "socat.connect.consul", "A")?;
    ensure!(connect_a.data("A") == [inbound.ip().to_string()]);

    let socat_vip = vip_of(s, "socat.virtual.consul")?;
    let web_vip = vip_of(s, "Web.virtual.consul")?;
    ensure!(socat_vip != web_vip, "two services share {socat_vip}");
    // The sidecar is a service, but not a destination with a VIP.
    let sidecar = dig_both(s, "web-sidecar-proxy.service.consul", "SRV")?;
    ensure!(sidecar.status == "NOERROR", "{sidecar:?}");
    for name in [
        "nope.service.consul",
        "nope.connect.consul",
        "nope.virtual.consul",
        "web-sidecar-proxy.virtual.consul",
        "socat.service.dc2.consul",
        "nope.node.consul",
        "what.ever.consul",
    ] {
        let miss = dig_both(s, name, "A")?;
        ensure!(miss.status == "NXDOMAIN", "{name}: {miss:?}");
        ensure!(
            miss.authority
                .iter()
                .any(|(n, t, _)| n == "consul." && t == "SOA"),
            "{name}: no SOA in the authority section"
        );
    }
    ensure!(dig_both(s, "example.org", "A")?.status == "REFUSED");
    ensure!(metric(&agent, "connect_virtual_ips")? == 2);

    // A graceful stop, then a restart on the same data directory: same addresses.
    let status =
        agent.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(20))?;
    ensure!(status.success(), "the agent stops cleanly: {status}");
    let log = agent.log();
    ensure!(
        log.contains("DNS server stopped"),
        "the DNS server drains with the agent:\n{log}"
    );
    drop(agent);
    let again = AgentProcess::start_in(dir.path(), &[], &flags)?;
    ensure!(
        vip_of(again.dns_addr, "socat.virtual.consul")? == socat_vip,
        "a VIP survives a restart"
    );
    ensure!(vip_of(again.dns_addr, "web.virtual.consul")? == web_vip);
    Ok(())
}

/// Starts the agent with `--dns-addr addr` and returns its exit status and stderr;
/// fails if it is still running after 20 s (it is killed by PID then).
fn start_expecting_failure(name: &str, dns_addr: SocketAddr) -> Result<(i32, String)> {
    let dir = private_dir(name)?;
    let http_addr = format!("127.0.0.1:{}", free_port()?);
    let inbound = format!("127.0.0.1:{}", free_port()?);
    let outbound = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(agent_binary()?);
    cmd.arg("--dev")
        .arg("--data-dir")
        .arg(&dir)
        .args(["--http-addr", &http_addr])
        .args(["--dns-addr", &dns_addr.to_string()])
        .args(["--inbound-addr", &inbound, "--outbound-addr", &outbound])
        .args(NO_WORKLOAD_API);
    let mut p = Spawned::start("connect-agent", &mut cmd)?;
    p.close_stdin();
    let status = p.wait_exit(Duration::from_secs(20))?;
    let stderr = p.stderr();
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
    let status = status.with_context(|| {
        format!("the agent kept running with DNS on a taken address {dns_addr}:\n{stderr}")
    })?;
    Ok((status.code().unwrap_or(-1), stderr))
}

#[test]
fn a_taken_dns_port_stops_startup_with_a_clear_error() -> Result<()> {
    // UDP taken.
    let udp = UdpSocket::bind("127.0.0.1:0")?;
    let addr = udp.local_addr()?;
    let (code, stderr) = start_expecting_failure("dns-udp-taken", addr)?;
    ensure!(code != 0, "exit code {code}");
    ensure!(
        stderr.contains(&format!("cannot bind the DNS server to {addr} (UDP)")),
        "{stderr}"
    );
    ensure!(
        !stderr.contains("agent ready"),
        "claimed to be ready:\n{stderr}"
    );
    drop(udp);
    // TCP taken (UDP free on the same port).
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = tcp.local_addr()?;
    let (code, stderr) = start_expecting_failure("dns-tcp-taken", addr)?;
    ensure!(code != 0, "exit code {code}");
    ensure!(
        stderr.contains(&format!("cannot bind the DNS server to {addr} (TCP)")),
        "{stderr}"
    );
    Ok(())
}

/// A node: an agent with `--cgroup`, a `web` service whose cgroup holds the
/// clients, and whatever services the test registers.
struct Node {
    agent: AgentProcess,
    cg: TestCgroup,
}

impl Node {
    fn start(name: &str, dns_addr: Option<SocketAddr>) -> Result<Self> {
        require_privileges()?;
        let mut cg = TestCgroup::create(name)?;
        cg.child("web")?;
        let cgroup = cg.path.to_string_lossy().into_owned();
        let agent = AgentProcess::start_dev_dns(
            name,
            dns_addr,
            &["--cgroup", &cgroup],
            &[("RUST_LOG", "info,connect_agent::proxy=debug")],
        )?;
        register(&agent, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
        Ok(Self { agent, cg })
    }

    fn web(&self) -> std::path::PathBuf {
        self.cg.path.join("web")
    }

    /// Waits until every service's VIP is in the agent's eBPF map: DNS may answer a
    /// moment before the map is written.
    fn wait_vips_programmed(&self, services: u64) -> Result<()> {
        wait_for_ok(
            Duration::from_secs(5),
            "the VIPs to reach the eBPF map",
            || {
                Ok(metric(&self.agent, "connect_virtual_ips")? == services
                    && metric(
                        &self.agent,
                        "connect_ebpf_mesh_destinations{kind=\"virtual_ip\"}",
                    )? == services)
            },
        )
        .with_context(|| self.agent.log())
        .map(|_| ())
    }
}

/// Resolves `argv[1]` with glibc (`getaddrinfo`), connects to it on port
/// `argv[2]`, sends one line and prints the address it resolved, what
/// `getpeername()` says and what came back.
const RESOLVING_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
print("resolved=%s" % addr[0])
sys.stdout.flush()
try:
    s = socket.create_connection(addr, timeout=5)
except ConnectionResetError:
    # Refused so fast that connect() itself reports the reset.
    print("peer=reset")
    print("echo=''")
    sys.exit(0)
print("peer=%s:%d" % s.getpeername())
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
print("echo=%r" % data.decode(errors="replace"))
"#;

/// A loopback address of this test process's own for DNS on port 53 (the only
/// port glibc's resolver uses), so parallel tests and a system resolver on
/// 127.0.0.1/127.0.0.53 are not in the way.
fn own_port_53() -> SocketAddr {
    let pid = std::process::id();
    let b = ((pid >> 8) & 0xff) as u8;
    let c = ((pid & 0xff) as u8).max(1);
    SocketAddr::from(([127, 53, b, c], 53))
}

#[test]
fn an_unconfigured_app_reaches_socat_by_its_virtual_name_until_denied() -> Result<()> {
    let dns_addr = own_port_53();
    let node = Node::start("dns-vip", Some(dns_addr))?;
    let (_socat, socat_port) = socat_echo()?;
    register(
        &node.agent,
        &json!({"ID": "socat-1", "Name": "socat", "Port": socat_port, "Connect": {"Proxy": {}}}),
    )?;
    let vip = vip_of(dns_addr, "socat.virtual.consul")?;
    node.wait_vips_programmed(2)?;

    // The application's resolver: /etc/resolv.conf, in a mount namespace of the
    // client's own, names the agent. Nothing else is configured.
    let tmp = TempDir::new("dns-vip")?;
    let resolv = tmp.0.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "nameserver {}\noptions timeout:2 attempts:2\n",
            dns_addr.ip()
        ),
    )?;
    let run_client = || -> Result<(String, String, String)> {
        let p = CgroupProc::spawn(
            &node.web(),
            "unshare",
            &[
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                r#"mount --bind "$0" /etc/resolv.conf && exec python3 -c "$1" "$2" "$3""#,
                &resolv.to_string_lossy(),
                RESOLVING_CLIENT,
                "socat.virtual.consul",
                &socat_port.to_string(),
            ],
        )?;
        let (code, out, err) = p.output(Duration::from_secs(30))?;
        ensure!(code == 0, "client failed ({code}): {out}\n{err}");
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::to_owned)
                .with_context(|| format!("client printed no {k}: {out}\n{err}"))
        };
        Ok((field("resolved=")?, field("peer=")?, field("echo=")?))
    };

    let before = metric(
        &node.agent,
        "connect_ebpf_events_total{event=\"redirected\"}",
    )?;
    let (resolved, peer, echo) = run_client().with_context(|| node.agent.log())?;
    ensure!(
        resolved == vip.to_string(),
        "glibc resolved {resolved}, dig {vip}"
    );
    ensure!(
        echo == "'hello mesh\\n'",
        "echo through the mesh: {echo}\n{}",
        node.agent.log()
    );
    ensure!(
        peer == format!("{vip}:{socat_port}"),
        "getpeername() shows the VIP, got {peer}"
    );
    ensure!(
        metric(
            &node.agent,
            "connect_ebpf_events_total{event=\"redirected\"}"
        )? > before,
        "the connection went through eBPF"
    );
    let log = node.agent.log();
    let orig = format!("orig_dst={vip}:{socat_port}");
    ensure!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains(&orig)
            && l.contains("src=web")
            && l.contains("dst=socat")),
        "no close record with {orig}, src=web, dst=socat:\n{log}"
    );

    let out = cli(
        &node.agent,
        &["intention", "create", "-deny", "web", "socat"],
    )?;
    ensure!(out.status.success(), "{out:?}");
    let (_, _, echo) = run_client()?;
    ensure!(echo == "''", "denied, yet the echo came back: {echo}");
    let out = cli(&node.agent, &["intention", "delete", "web", "socat"])?;
    ensure!(out.status.success(), "{out:?}");
    let (_, _, echo) = run_client()?;
    ensure!(echo == "'hello mesh\\n'", "allowed again: {echo}");
    Ok(())
}

/// Connects `argv[3]` times to `argv[1]:argv[2]`, one after the other, and prints
/// the first line each connection gets (the instance's name) or the error.
const COUNTING_CLIENT: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"hi\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
        s.close()
        print("got=%s" % (data.decode(errors="replace").strip() or "<nothing>"))
    except Exception as e:
        print("got=<error %s>" % e)
    sys.stdout.flush()
"#;

/// `socat` that says its name on every connection, then echoes.
fn named_echo(name: &str) -> Result<(Spawned, u16)> {
    let port = free_port()?;
    let p = Spawned::start(
        name,
        Command::new("socat")
            .arg(format!("tcp-l:{port},fork,reuseaddr,bind=127.0.0.1"))
            .arg(format!("system:echo {name}; exec cat")),
    )
    .context("socat is needed (Debian package socat)")?;
    wait_listening(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    )?;
    Ok((p, port))
}

#[test]
fn connections_spread_over_two_instances_and_survive_one_being_killed() -> Result<()> {
    let node = Node::start("dns-lb", None)?;
    let (mut one, port_one) = named_echo("echo-1")?;
    let (_two, port_two) = named_echo("echo-2")?;
    for (id, port) in [("echo-1", port_one), ("echo-2", port_two)] {
        register(
            &node.agent,
            &json!({"ID": id, "Name": "echo", "Port": port, "Connect": {"Proxy": {}}}),
        )?;
    }
    let srv = dig_both(node.agent.dns_addr, "echo.service.consul", "SRV")?;
    ensure!(srv.data("SRV").len() == 2, "two instances: {srv:?}");
    let vip = vip_of(node.agent.dns_addr, "echo.virtual.consul")?;
    node.wait_vips_programmed(2)?;

    let count = |n: usize| -> Result<Vec<String>> {
        let p = CgroupProc::spawn(
            &node.web(),
            "python3",
            &[
                "-c",
                COUNTING_CLIENT,
                &vip.to_string(),
                "7000",
                &n.to_string(),
            ],
        )?;
        let (code, out, err) = p.output(Duration::from_secs(60))?;
        ensure!(code == 0, "client failed ({code}): {out}\n{err}");
        let got: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("got="))
            .map(str::to_owned)
            .collect();
        ensure!(got.len() == n, "{n} results expected: {out}\n{err}");
        Ok(got)
    };
    let tally = |got: &[String], name: &str| got.iter().filter(|g| *g == name).count();

    let got = count(10).with_context(|| node.agent.log())?;
    println!("before the kill: {got:?}");
    let (ones, twos) = (tally(&got, "echo-1"), tally(&got, "echo-2"));
    ensure!(
        ones + twos == 10,
        "every connection reached an instance: {got:?}\n{}",
        node.agent.log()
    );
    ensure!(
        ones >= 3 && twos >= 3,
        "connections are spread over both instances: {got:?}"
    );

    // Kill echo-1 by its PID; echo-1 stays registered (there are no health checks).
    let pid = one.pid().context("echo-1 has a PID")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    ensure!(
        one.wait_exit(Duration::from_secs(5))?.is_some(),
        "echo-1 ({pid}) did not die"
    );
    let got = count(10).with_context(|| node.agent.log())?;
    println!("after the kill: {got:?}");
    ensure!(
        tally(&got, "echo-2") == 10,
        "every new connection succeeds through echo-2: {got:?}\n{}",
        node.agent.log()
    );
    Ok(())
}
