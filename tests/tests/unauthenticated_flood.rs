//! Peers that never authenticate cannot take a node's mesh traffic down.
//!
//! One agent (started with the soft open-file limit of 1,024 that systemd gives
//! a daemon) serves socat behind the explicit proxy for `web`. An attacker opens
//! 2,000 TCP connections to the agent's inbound mTLS port from 127.0.0.2 and 500
//! to its HTTPS API from 127.0.0.3, and says nothing on any of them. Meanwhile
//! `web`'s connections through the mesh (explicit proxy → the node's inbound
//! listener → socat) must each finish a round trip in under a second, and the
//! HTTP and HTTPS APIs must still answer other clients.
//!
//! Before the fix the agent ran out of descriptors (accept failed with EMFILE for
//! everyone) and every silent socket held a slot of the connection limit.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use connect_tests::{
    agent::{AgentProcess, agent_binary, free_port},
    mesh::{TempDir, connect_address, roots, run_bounded, socat_behind_upstream},
};

const SILENT_INBOUND: usize = 2_000;
const SILENT_HTTPS: usize = 500;
/// What a real connection through the mesh may take beside the flood.
const WITHIN: Duration = Duration::from_secs(1);

/// Opens `n` TCP connections from `source` to `to` and keeps them silent.
/// Connections the agent refuses at once count too: they are what it should do
/// with a peer over its share. Bounded: `n` sockets, 30 s.
fn flood(source: Ipv4Addr, to: SocketAddr, n: usize) -> Result<(Vec<TcpStream>, usize)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = Vec::with_capacity(n);
    let mut refused = 0;
    for _ in 0..n {
        ensure!(
            Instant::now() < deadline,
            "opening {n} connections took over 30 s"
        );
        match connect_from(source, to) {
            Ok(s) => open.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => refused += 1,
            Err(e) => return Err(e).with_context(|| format!("connecting {source} → {to}")),
        }
    }
    Ok((open, refused))
}

/// A TCP connection from a chosen loopback source address (std cannot bind
/// before connecting; nix can, without `unsafe`).
fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrStorage, bind, connect, socket,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// One round trip through the mesh: connect to `web`'s upstream, send a line,
/// read it back from socat's echo.
fn round_trip(upstream: u16, line: &[u8]) -> Result<Duration> {
    let started = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", upstream)).context("connect to the upstream")?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(line)?;
    let mut got = vec![0u8; line.len()];
    c.read_exact(&mut got).context("reading the echo")?;
    ensure!(
        got == line,
        "echo {:?} for {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(line)
    );
    Ok(started.elapsed())
}

/// Raises this test's own soft open-file limit: it holds 2,500 sockets.
fn raise_own_nofile() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let need = (SILENT_INBOUND + SILENT_HTTPS + 256) as u64;
    ensure!(
        hard >= need,
        "this test needs {need} open files and the hard limit is {hard}; raise it (ulimit -Hn) to run it"
    );
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}

#[test]
fn silent_peers_do_not_stop_the_mesh_or_the_api() -> Result<()> {
    raise_own_nofile()?;
    let https_port = free_port()?;
    let https = SocketAddr::from(([127, 0, 0, 1], https_port));
    let agent = AgentProcess::start_dev_nofile(
        "unauth-flood",
        &["--https-addr", &https.to_string()],
        1024,
    )?;
    let (_socat, proxy, upstream) = socat_behind_upstream(&agent)?;
    let logs = || {
        format!(
            "--- agent log ---\n{}\n--- proxy stderr ---\n{}",
            agent.log(),
            proxy.stderr()
        )
    };
    // No round trip before the flood: the first one during it must open a new
    // node-to-node connection (later ones may reuse it), so it needs an accept
    // and a handshake on the flooded listener.
    let inbound = connect_address(&agent, "socat")?;
    let dir = TempDir::new("unauth-flood-ca")?;
    let (_, ca_file) = roots(&agent, &dir.0)?;

    let (silent_api, refused_api) = flood(Ipv4Addr::new(127, 0, 0, 3), https, SILENT_HTTPS)?;
    let (silent_in, refused_in) = flood(Ipv4Addr::new(127, 0, 0, 2), inbound, SILENT_INBOUND)?;
    eprintln!(
        "flood: {} + {} silent connections open to {inbound} and {https} ({refused_in} + {refused_api} refused at connect)",
        silent_in.len(),
        silent_api.len()
    );

    let mut took = Vec::new();
    for i in 0..5 {
        let t = round_trip(upstream, format!("during the flood {i}\n").as_bytes())
            .with_context(|| format!("round trip {i} during the flood\n{}", logs()))?;
        took.push(t);
    }
    let slowest = took.iter().max().copied().unwrap_or_default();
    eprintln!("round trips during the flood: {took:?}");
    ensure!(
        slowest < WITHIN,
        "a mesh round trip took {slowest:?} during the flood\n{}",
        logs()
    );

    // The APIs still answer other clients: plain HTTP, and HTTPS verified
    // against the CA's roots.
    let started = Instant::now();
    let out = run_bounded(
        std::process::Command::new(agent_binary()?)
            .args([
                "services",
                "list",
                "-http-addr",
                &format!("https://{https}"),
                "-ca-file",
            ])
            .arg(&ca_file),
        None,
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("socat"),
        "the HTTPS API did not answer during the flood: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let https_took = started.elapsed();
    let (status, _) =
        connect_tests::agent::http(agent.http_addr, "GET", "/v1/catalog/services", None)?;
    ensure!(
        status == 200,
        "the HTTP API answered {status} during the flood"
    );
    eprintln!("HTTPS API answered in {https_took:?} during the flood");

    // The agent said what it did with its descriptor limit.
    let log = agent.log();
    if !log.contains("raised the open-file limit") {
        bail!("the agent did not log raising its open-file limit:\n{log}");
    }
    drop(silent_in);
    drop(silent_api);
    Ok(())
}
