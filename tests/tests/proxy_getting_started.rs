//! Consul's getting-started guide for Connect, automated on one node with the real
//! binaries: `socat` as the service, `connect-agent proxy -service web -upstream
//! socat:<port>` in front of the client, `nc` as the client, and intentions
//! created and deleted with the CLI. Ports are free ones instead of the guide's
//! 8181 and 9191, so that parallel runs do not collide.
//!
//! Needs the catalog in the agent (`PUT /v1/agent/service/register`,
//! `/v1/health/connect/<service>` answering with the node's inbound address,
//! `/v1/agent/self`), `socat` and netcat-openbsd.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::AgentProcess,
    mesh::{Spawned, cli, nc, socat_behind_upstream},
};

/// How soon the application must see a denied connection closed: the server
/// refuses within milliseconds; the bound leaves room for a loaded machine and is
/// far below an application's own timeouts.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

/// Connects to the upstream as an application would, writes a line or not, and
/// waits (at most 5 s) for its socket to report the connection's end: it must be
/// a reset (a refused connection, told apart from a server that answered nothing
/// with a clean EOF), within [`REFUSED_WITHIN`] of the connect, with no byte back.
fn expect_reset(port: u16, speak: bool) -> Result<Duration> {
    let started = Instant::now();
    let mut c = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(c) => c,
        // Refused so fast that connect() itself reports the reset.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(started.elapsed()),
        Err(e) => return Err(e).context("connect"),
    };
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    if speak {
        // May fail already if the reset came first.
        let _ = c.write_all(b"hello world\n");
    }
    let mut buf = [0u8; 64];
    let read = c.read(&mut buf);
    let took = started.elapsed();
    match read {
        Ok(0) => anyhow::bail!("a clean EOF {took:?} after connect, not a reset"),
        Ok(n) => anyhow::bail!("received {:?} on a denied connection", &buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => anyhow::bail!("not closed {took:?} after connect: {e}"),
    }
    ensure!(
        took < REFUSED_WITHIN,
        "the reset came {took:?} after connect"
    );
    Ok(took)
}

/// Everything the guide sets up: agent, socat registered with a Connect proxy,
/// and `connect-agent proxy` for `web` with an upstream to socat.
struct Guide {
    agent: AgentProcess,
    _socat: connect_tests::mesh::Spawned,
    proxy: connect_tests::mesh::Spawned,
    upstream: u16,
}

impl Guide {
    fn start(name: &str) -> Result<Self> {
        let agent = AgentProcess::start_dev(name, &[])?;
        let (socat, proxy, upstream) = socat_behind_upstream(&agent)?;
        Ok(Self {
            agent,
            _socat: socat,
            proxy,
            upstream,
        })
    }

    /// Logs of the agent and the proxy, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- proxy stdout ---\n{}\n--- proxy stderr ---\n{}\n--- agent log ---\n{}",
            self.proxy.stdout(),
            self.proxy.stderr(),
            self.agent.log()
        )
    }
}

#[test]
fn getting_started_guide() -> Result<()> {
    let g = Guide::start("proxy-guide")?;
    let banner = g.proxy.stdout();
    for line in [
        "               Service: web",
        &format!("              Upstream: socat => :{}", g.upstream),
        "       Public listener: Disabled",
    ] {
        ensure!(
            banner.contains(line),
            "startup output lacks {line:?}:\n{banner}"
        );
    }

    let out = nc(g.upstream, b"hello world\n")?;
    ensure!(
        out.stdout == b"hello world\n",
        "no echo through the mesh: {:?}\n{}",
        String::from_utf8_lossy(&out.stdout),
        g.logs()
    );

    let out = cli(&g.agent, &["intention", "create", "-deny", "web", "socat"])?;
    ensure!(
        out.status.success() && out.stdout == b"Created: web => socat (deny)\n",
        "intention create: {:?} {:?} {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // nc exits (run_bounded fails otherwise): the connection was closed, and
    // nothing came back.
    let out = nc(g.upstream, b"hello world\n")?;
    ensure!(
        out.stdout.is_empty(),
        "a denied connection echoed {:?}\n{}",
        String::from_utf8_lossy(&out.stdout),
        g.logs()
    );
    // The guide's reader types into nc: its input stays open, so only a reset
    // ends it; the denied connection must not sit open until nc gives up.
    let started = Instant::now();
    let mut typing = Spawned::start(
        "nc (interactive)",
        Command::new("nc").args(["127.0.0.1", &g.upstream.to_string()]),
    )?;
    let exited = typing.wait_exit(Duration::from_secs(5))?;
    let took = started.elapsed();
    ensure!(
        exited.is_some(),
        "an interactive nc was still connected 5 s after its denied connect\n{}",
        g.logs()
    );
    println!("interactive nc exited {took:?} after its denied connect");
    ensure!(
        took < REFUSED_WITHIN,
        "an interactive nc took {took:?} to see its denied connection closed"
    );
    // The application's own socket: reset, silent or speaking first, within
    // REFUSED_WITHIN of its connect (the first one rides the pooled node-to-node
    // connection the echo above left, the later ones are new).
    for speak in [false, false, true] {
        let took = expect_reset(g.upstream, speak).with_context(|| g.logs())?;
        println!("denied connection (speaking first: {speak}) reset {took:?} after connect");
    }

    let out = cli(&g.agent, &["intention", "delete", "web", "socat"])?;
    ensure!(
        out.status.success(),
        "intention delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = nc(g.upstream, b"hello again\n")?;
    ensure!(
        out.stdout == b"hello again\n",
        "no echo after the deny was deleted: {:?}\n{}",
        String::from_utf8_lossy(&out.stdout),
        g.logs()
    );
    Ok(())
}

#[test]
fn a_live_connection_is_closed_within_a_second_of_a_deny() -> Result<()> {
    let g = Guide::start("proxy-revoke")?;
    let mut live = TcpStream::connect(("127.0.0.1", g.upstream)).context("connect")?;
    live.set_read_timeout(Some(Duration::from_secs(10)))?;
    live.write_all(b"ping\n")?;
    let mut echo = [0u8; 5];
    live.read_exact(&mut echo)
        .with_context(|| format!("no echo on the live connection\n{}", g.logs()))?;
    ensure!(&echo == b"ping\n");

    let out = cli(&g.agent, &["intention", "create", "-deny", "web", "socat"])?;
    let created = Instant::now();
    ensure!(out.status.success(), "intention create failed");
    let left = Duration::from_secs(1).saturating_sub(created.elapsed());
    live.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut buf = [0u8; 16];
    match live.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => anyhow::bail!("received {:?} after the deny", &buf[..n]),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            anyhow::bail!(
                "the connection was still open {:?} after the deny\n{}",
                created.elapsed(),
                g.logs()
            )
        }
        // A reset is a close too.
        Err(_) => {}
    }
    Ok(())
}
