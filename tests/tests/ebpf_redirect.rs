//! The eBPF chain for real: the embedded object is loaded, its programs are attached to
//! a cgroup of the test's own, and an unmodified client (python3) inside that cgroup
//! dials a mesh destination. The connection must arrive at the listener the programs
//! point to, carry its origin (original destination and the client's cgroup), and the
//! client must see the address it dialed. Outside the cgroup, or to a destination not
//! in the mesh, nothing changes; after detach, nothing of ours stays attached.
//!
//! Addresses are loopback only: if redirection failed, a connection to 127.0.0.2 is
//! refused locally instead of leaving the machine.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use connect_agent::redirect::{Desired, DestinationKind, RedirectConfig, Redirector};
use connect_tests::lab::{
    CgroupProc, TestCgroup, TestNetns, accept_redirected, assert_eventually, attached_programs,
    require_privileges, veth,
};

/// A destination in the mesh: nothing listens there, so only redirection can answer.
const MESH_DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 8080);
/// Not in the mesh.
const OTHER_DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), 8080);

const CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
except OSError as e:
    print("connect-failed", e.errno)
    sys.exit(3)
s.sendall(b"hello")
peer = s.getpeername()
print("peer", peer[0], peer[1])
print("got", s.recv(100).decode())
"#;

#[test]
fn connect4_redirects_an_unmodified_client_and_detaches_cleanly() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("redirect")?;
    let app = cg.child("web")?.to_owned();
    let app_id = connect_tests::lab::cgroup_id(&app)?;

    // The "outbound listener": this test process, outside the application cgroup.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let proxy = match listener.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => bail!("bound an IPv6 address"),
    };

    let redirector = Redirector::attach(
        &cg.path,
        RedirectConfig {
            proxy,
            debug: false,
        },
    )
    .context("loading and attaching the embedded eBPF object")?;
    let attached = attached_programs(&cg.path)?;
    for p in connect_common::program::ALL {
        assert!(
            attached.iter().any(|n| n == p),
            "{p} not attached to {}: {attached:?}",
            cg.path.display()
        );
    }
    redirector.add_destination(MESH_DST, DestinationKind::Instance)?;

    // An unmodified client inside a child cgroup dials the mesh destination.
    let client = CgroupProc::spawn(
        &app,
        "python3",
        &[
            "-c",
            CLIENT,
            &MESH_DST.ip().to_string(),
            &MESH_DST.port().to_string(),
        ],
    )?;
    let (mut conn, peer) = accept_redirected(&listener, Duration::from_secs(5))?;
    let mut buf = [0u8; 5];
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.read_exact(&mut buf)?;
    assert_eq!(&buf, b"hello");

    // The agent side can tell where it was going and who dialed.
    let origin = redirector
        .take_redirect(peer)?
        .context("no redirect record for the accepted connection")?;
    assert_eq!(origin.orig_dst.0, MESH_DST);
    assert_eq!(
        origin.cgroup_id.0, app_id,
        "the record names the client's cgroup"
    );
    assert_eq!(
        redirector.take_redirect(peer)?,
        None,
        "a record is claimed once"
    );
    conn.write_all(b"world")?;
    drop(conn);

    let (code, out, err) = client.output(Duration::from_secs(10))?;
    assert_eq!(code, 0, "client failed: {out}{err}");
    assert!(
        out.contains(&format!("peer {} {}", MESH_DST.ip(), MESH_DST.port())),
        "getpeername shows the dialed address: {out}"
    );
    assert!(out.contains("got world"), "{out}");
    let counters = redirector.counters();
    let redirected = counters
        .iter()
        .find(|(n, _)| *n == "redirected")
        .map(|(_, v)| *v);
    assert!(redirected >= Some(1), "redirect counter: {counters:?}");

    // Not a mesh destination: untouched (refused, nothing listens there).
    let other = CgroupProc::spawn(
        &app,
        "python3",
        &[
            "-c",
            CLIENT,
            &OTHER_DST.ip().to_string(),
            &OTHER_DST.port().to_string(),
        ],
    )?;
    let (code, out, _) = other.output(Duration::from_secs(10))?;
    assert_eq!(
        code, 3,
        "a destination outside the mesh is not redirected: {out}"
    );

    // A process outside the cgroup is not affected: the mesh address refuses it.
    let outside = Command::new("python3")
        .args([
            "-c",
            CLIENT,
            &MESH_DST.ip().to_string(),
            &MESH_DST.port().to_string(),
        ])
        .output()?;
    assert_eq!(
        outside.status.code(),
        Some(3),
        "a process outside the cgroup is not redirected"
    );

    // Dropping the redirector leaves the programs attached (pinned, to outlive the
    // agent); detach removes them: nothing of ours stays attached, and the client is
    // no longer redirected.
    let pins = redirector.pin_dir().to_owned();
    drop(redirector);
    assert!(
        !attached_programs(&cg.path)?.is_empty(),
        "the programs outlive the redirector"
    );
    assert!(
        Redirector::detach(&cg.path)?,
        "there was something to detach"
    );
    assert!(!pins.exists(), "detach leaves nothing in bpffs");
    assert_eventually(Duration::from_secs(2), "programs detached", || {
        attached_programs(&cg.path).is_ok_and(|a| a.is_empty())
    })?;
    let after = CgroupProc::spawn(
        &app,
        "python3",
        &[
            "-c",
            CLIENT,
            &MESH_DST.ip().to_string(),
            &MESH_DST.port().to_string(),
        ],
    )?;
    let (code, out, _) = after.output(Duration::from_secs(10))?;
    assert_eq!(
        code, 3,
        "after detach the connection is not redirected: {out}"
    );
    drop(cg);
    Ok(())
}

/// A listener on a protected port inside a node namespace and the app cgroup: a
/// connection from another namespace (off the node) is dropped and counted; one from
/// the node's loopback is accepted. Unprotected ports are not affected.
#[test]
fn ingress_drops_off_node_connections_to_protected_ports() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("offnode")?;
    let svc = cg.child("socat")?.to_owned();
    let node = TestNetns::create("node")?;
    let peer = TestNetns::create("peer")?;
    veth(&node, "198.18.2.1/30", &peer, "198.18.2.2/30")?;
    let redirector = Redirector::attach(
        &cg.path,
        RedirectConfig {
            proxy: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
            debug: false,
        },
    )?;
    let (protected, open) = (18181u16, 18182u16);
    redirector.protect_port(protected, None)?;

    const SERVE: &str = "import socket,sys,threading\n\
def serve(port):\n    l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); l.bind(('0.0.0.0',port)); l.listen()\n    while True:\n        c,_=l.accept(); c.sendall(b'ok'); c.close()\n\
for p in sys.argv[1:]:\n    threading.Thread(target=serve,args=(int(p),),daemon=True).start()\n\
print('ready',flush=True)\nimport time\ntime.sleep(30)\n";
    let _server = node.spawn(
        Some(&svc),
        "python3",
        &["-c", SERVE, &protected.to_string(), &open.to_string()],
    )?;
    const DIAL: &str = "import socket,sys\ntry:\n    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1.5); print('got',s.recv(2).decode())\nexcept OSError as e:\n    print('failed',e)\n";
    let dial = |ns: &TestNetns, host: &str, port: u16| -> Result<String> {
        let (_, out, _) = ns
            .spawn(None, "python3", &["-c", DIAL, host, &port.to_string()])?
            .output(Duration::from_secs(10))?;
        Ok(out)
    };
    // Wait for the server via the unprotected port from the peer.
    assert_eventually(Duration::from_secs(5), "server ready", || {
        dial(&peer, "198.18.2.1", open).is_ok_and(|o| o.contains("got ok"))
    })?;
    let before = redirector.counter("ingress_dropped");
    let out = dial(&peer, "198.18.2.1", protected)?;
    assert!(
        out.contains("failed"),
        "off-node connection to a protected port must fail: {out}"
    );
    assert!(
        redirector.counter("ingress_dropped") > before,
        "the drop counter grows"
    );
    let out = dial(&node, "127.0.0.1", protected)?;
    assert!(
        out.contains("got ok"),
        "loopback on the node reaches the protected port: {out}"
    );
    // Unprotect: off-node works again (the protection follows the map).
    redirector.unprotect_port(protected)?;
    let out = dial(&peer, "198.18.2.1", protected)?;
    assert!(
        out.contains("got ok"),
        "after unprotect the port is reachable: {out}"
    );
    Ok(())
}

#[test]
fn ingress_drops_off_node_packets_to_protected_ports_only() -> Result<()> {
    // Loopback traffic to a protected port must pass: the agent's inbound proxy
    // connects from 127.0.0.1.
    require_privileges()?;
    let mut cg = TestCgroup::create("ingress")?;
    let svc = cg.child("socat")?.to_owned();
    let redirector = Redirector::attach(
        &cg.path,
        RedirectConfig {
            proxy: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
            debug: false,
        },
    )?;
    let port = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    redirector.protect_port(port, None)?;
    // A listener inside the service cgroup on the protected port.
    let server = CgroupProc::spawn(
        &svc,
        "python3",
        &[
            "-c",
            "import socket,sys\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('127.0.0.1',int(sys.argv[1])))\nl.listen()\nprint('ready',flush=True)\nc,_=l.accept()\nc.sendall(b'ok')\n",
            &port.to_string(),
        ],
    )?;
    // From loopback, outside the app cgroup (like the agent): accepted.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).context("loopback connection to a protected port"),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 2];
    conn.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ok");
    let (code, out, err) = server.output(Duration::from_secs(5))?;
    assert_eq!(code, 0, "{out}{err}");
    let dropped = redirector
        .counters()
        .iter()
        .find(|(n, _)| *n == "ingress_dropped")
        .map(|(_, v)| *v);
    assert_eq!(dropped, Some(0), "loopback traffic is never dropped");
    Ok(())
}

/// `sync` diffs the desired set against what it wrote: a destination it adds is
/// redirected at once, and one it drops is not; unchanged entries stay in place.
#[test]
fn sync_adds_and_removes_destinations() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("sync")?;
    let app = cg.child("web")?.to_owned();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let SocketAddr::V4(proxy) = listener.local_addr()? else {
        bail!("IPv6")
    };
    let redirector = Redirector::attach(
        &cg.path,
        RedirectConfig {
            proxy,
            debug: false,
        },
    )?;

    let mut desired = Desired::default();
    desired
        .destinations
        .insert((MESH_DST, DestinationKind::Instance));
    desired
        .protected_ports
        .insert(18183, connect_agent::redirect::PortGuard::Service(None));
    let stats = redirector.sync(&desired);
    assert_eq!((stats.added, stats.removed, stats.failed), (2, 0, 0));
    assert_eq!(
        redirector.sync(&desired).added,
        0,
        "a repeated sync changes nothing"
    );

    let client = CgroupProc::spawn(
        &app,
        "python3",
        &[
            "-c",
            CLIENT,
            &MESH_DST.ip().to_string(),
            &MESH_DST.port().to_string(),
        ],
    )?;
    let (mut conn, _) = accept_redirected(&listener, Duration::from_secs(5))?;
    conn.write_all(b"world")?;
    drop(conn);
    let (code, out, _) = client.output(Duration::from_secs(10))?;
    assert_eq!(code, 0, "redirected after sync: {out}");

    let stats = redirector.sync(&Desired::default());
    assert_eq!((stats.added, stats.removed, stats.failed), (0, 2, 0));
    let client = CgroupProc::spawn(
        &app,
        "python3",
        &[
            "-c",
            CLIENT,
            &MESH_DST.ip().to_string(),
            &MESH_DST.port().to_string(),
        ],
    )?;
    let (code, out, _) = client.output(Duration::from_secs(10))?;
    assert_eq!(code, 3, "no longer redirected after removal: {out}");
    Ok(())
}

/// Connects, says hello, waits for the server's word, and only then asks
/// `getpeername()`: the sweep in between must not have touched a live connection.
const PATIENT_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
except OSError as e:
    print("connect-failed", e.errno)
    sys.exit(3)
s.sendall(b"hello")
word = s.recv(100).decode()
peer = s.getpeername()
print("got", word)
print("peer", peer[0], peer[1])
"#;

#[test]
fn stale_records_are_swept_and_live_ones_kept() -> Result<()> {
    use connect_agent::redirect::SweepStats;
    require_privileges()?;
    let mut cg = TestCgroup::create("sweep")?;
    let app = cg.child("web")?.to_owned();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let SocketAddr::V4(proxy) = listener.local_addr()? else {
        bail!("bound an IPv6 address");
    };
    let redirector = Redirector::attach(
        &cg.path,
        RedirectConfig {
            proxy,
            debug: false,
        },
    )?;
    redirector.add_destination(MESH_DST, DestinationKind::Instance)?;
    let hour = Duration::from_secs(3600);

    // A live connection whose by-port record nobody claimed.
    let client = CgroupProc::spawn(
        &app,
        "python3",
        &[
            "-c",
            PATIENT_CLIENT,
            &MESH_DST.ip().to_string(),
            &MESH_DST.port().to_string(),
        ],
    )?;
    let (mut conn, peer) = accept_redirected(&listener, Duration::from_secs(5))?;
    let mut buf = [0u8; 5];
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.read_exact(&mut buf)?;
    assert_eq!(
        redirector.sweep(hour, hour),
        SweepStats::default(),
        "nothing is stale yet"
    );
    // Everything old enough: the unclaimed by-port record goes, the established
    // connection's cookie record stays.
    let swept = redirector.sweep(Duration::ZERO, Duration::ZERO);
    assert_eq!(swept.unclaimed, 1, "{swept:?}");
    assert_eq!(swept.unestablished, 0, "{swept:?}");
    assert_eq!(redirector.take_redirect(peer)?, None, "the record is gone");
    conn.write_all(b"go")?;
    let (code, out, err) = client.output(Duration::from_secs(10))?;
    assert_eq!(code, 0, "client failed: {out}{err}");
    assert!(
        out.contains(&format!("peer {} {}", MESH_DST.ip(), MESH_DST.port())),
        "getpeername still shows the dialed address after the sweep: {out}"
    );
    drop(conn);

    // A connect() that never completes: the redirect target refuses it.
    drop(listener);
    let client = CgroupProc::spawn(
        &app,
        "python3",
        &[
            "-c",
            PATIENT_CLIENT,
            &MESH_DST.ip().to_string(),
            &MESH_DST.port().to_string(),
        ],
    )?;
    let (code, out, _) = client.output(Duration::from_secs(10))?;
    assert_eq!(code, 3, "the connect fails: {out}");
    let swept = redirector.sweep(hour, Duration::ZERO);
    assert_eq!(
        swept.unestablished, 1,
        "the failed connect's record: {swept:?}"
    );
    assert_eq!(
        redirector.sweep(Duration::ZERO, Duration::ZERO),
        SweepStats::default()
    );
    Ok(())
}
