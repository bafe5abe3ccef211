//! Enforcement with no way around it, at the kernel: the embedded programs attached
//! through the agent's `Redirector`, unmodified python clients and servers in
//! cgroups and namespaces. Each hole is probed together with a positive control (the
//! same probe succeeding where it should), so a broken harness cannot pass.
//!
//! - TCP to a protected port on a host-local address is redirected in every form:
//!   `127.0.0.1`, `0.0.0.0`, `::1`, `::`, `::ffff:127.0.0.1`, `::ffff:0.0.0.0`, and a
//!   mesh instance by its v4-mapped address; `getpeername()` shows what was dialed.
//! - UDP to a protected port is refused from any application cgroup but its owner's,
//!   by `sendto()` and by a connected socket, in both families.
//! - From off the node, IPv6 (link-local over a veth) and UDP to a protected port are
//!   dropped and counted; replies to a node socket whose own port is protected pass.
//!
//! Servers listen on `[::]` with `IPV6_V6ONLY` off, so a probe that escapes the
//! programs reaches them and says `direct`.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use connect_agent::redirect::{DestinationKind, RedirectConfig, Redirector};
use connect_tests::lab::{
    CgroupProc, TestCgroup, TestNetns, accept_redirected, assert_eventually, cgroup_id,
    require_privileges, veth,
};
use connect_tests::probes::{DIAL, SERVE, dial, probe};

/// A free port on both families' loopback (bound and released).
fn free_port() -> Result<u16> {
    let l = std::net::UdpSocket::bind("[::]:0")?;
    let port = l.local_addr()?.port();
    let t = TcpListener::bind(("::", port));
    ensure!(t.is_ok(), "port {port} is taken for TCP");
    Ok(port)
}

/// The test's own "outbound listener" and the redirector pointing at it.
fn attach(cg: &TestCgroup) -> Result<(TcpListener, Redirector)> {
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
    )
    .context("loading and attaching the embedded eBPF object")?;
    Ok((listener, redirector))
}

fn wait_ready(port: u16) -> Result<()> {
    assert_eventually(Duration::from_secs(5), "server ready", || {
        dial(None, "tcp", "127.0.0.1", port).is_ok_and(|o| o.starts_with("got direct"))
    })
}

#[test]
fn tcp_to_a_protected_port_is_redirected_in_every_address_form() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("forms")?;
    let web = cg.child("web")?.to_owned();
    let db = cg.child("db")?.to_owned();
    let (listener, redirector) = attach(&cg)?;
    let port = free_port()?;
    redirector.protect_port(
        port,
        Some(connect_agent::redirect::CgroupId(cgroup_id(&db)?)),
    )?;
    let _server = CgroupProc::spawn(&db, "python3", &["-c", SERVE, &port.to_string()])?;
    wait_ready(port)?;

    // Positive control: outside the application cgroup nothing is redirected, so
    // the server answers on the IPv6 loopback: the probe would see an escape.
    let out = dial(None, "tcp", "::1", port)?;
    ensure!(out == "got direct peer ::1", "control from outside: {out}");

    let web_id = cgroup_id(&web)?;
    let forms = [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("::1", "::1"),
        ("::", "::1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("::ffff:0.0.0.0", "::ffff:127.0.0.1"),
    ];
    for (dialed, peer) in forms {
        let before = redirector.counter("redirected");
        let client = CgroupProc::spawn(
            &web,
            "python3",
            &["-c", DIAL, "tcp", dialed, &port.to_string()],
        )?;
        let (mut conn, from) = accept_redirected(&listener, Duration::from_secs(5))
            .with_context(|| format!("{dialed}: not redirected"))?;
        let origin = redirector
            .take_redirect(from)?
            .with_context(|| format!("{dialed}: no redirect record"))?;
        assert_eq!(
            origin.orig_dst.0,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            "{dialed}: the proxy sees the local service's port on loopback"
        );
        assert_eq!(origin.cgroup_id.0, web_id, "{dialed}: the record names web");
        conn.write_all(b"proxy")?;
        drop(conn);
        let out = probe(client)?;
        assert_eq!(
            out,
            format!("got proxy peer {peer}"),
            "{dialed}: redirected, and getpeername shows the dialed address"
        );
        assert!(
            redirector.counter("redirected") > before,
            "{dialed}: counted"
        );
    }

    // A mesh instance by its v4-mapped address is the instance.
    let instance = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 8080);
    redirector.add_destination(instance, DestinationKind::Instance)?;
    let client = CgroupProc::spawn(
        &web,
        "python3",
        &["-c", DIAL, "tcp", "::ffff:127.0.0.2", "8080"],
    )?;
    let (mut conn, from) = accept_redirected(&listener, Duration::from_secs(5))?;
    let origin = redirector.take_redirect(from)?.context("no record")?;
    assert_eq!(origin.orig_dst.0, instance);
    conn.write_all(b"proxy")?;
    drop(conn);
    assert_eq!(probe(client)?, "got proxy peer ::ffff:127.0.0.2");

    // An unprotected local port is not ours: left alone (positive control inside).
    let open = free_port()?;
    let _open_server = CgroupProc::spawn(&db, "python3", &["-c", SERVE, &open.to_string()])?;
    wait_ready(open)?;
    assert_eq!(dial(Some(&web), "tcp", "::1", open)?, "got direct peer ::1");
    Ok(())
}

#[test]
fn udp_to_a_protected_port_is_refused_except_from_its_owner() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("udp")?;
    let web = cg.child("web")?.to_owned();
    let db = cg.child("db")?.to_owned();
    let (_listener, redirector) = attach(&cg)?;
    let (port, open) = (free_port()?, free_port()?);
    redirector.protect_port(
        port,
        Some(connect_agent::redirect::CgroupId(cgroup_id(&db)?)),
    )?;
    let _server = CgroupProc::spawn(
        &db,
        "python3",
        &["-c", SERVE, &port.to_string(), &open.to_string()],
    )?;
    wait_ready(port)?;

    // Positive controls: the owner's own cgroup, and a process outside the
    // application cgroup, reach the port; web reaches an unprotected port.
    assert_eq!(
        dial(Some(&db), "udp-sendto", "127.0.0.1", port)?,
        "got direct peer -"
    );
    assert_eq!(
        dial(Some(&db), "udp-connect", "::1", port)?,
        "got direct peer ::1"
    );
    assert_eq!(dial(None, "udp-sendto", "::1", port)?, "got direct peer -");
    assert_eq!(
        dial(Some(&web), "udp-sendto", "::1", open)?,
        "got direct peer -"
    );

    let before = redirector.counter("udp_refused");
    let mut refused = 0;
    for host in ["127.0.0.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1"] {
        for mode in ["udp-sendto", "udp-connect"] {
            let out = dial(Some(&web), mode, host, port)?;
            assert_eq!(out, "refused", "web {mode} {host}:{port}");
            refused += 1;
        }
    }
    // A mesh destination: Connect carries TCP only.
    let instance = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 8080);
    redirector.add_destination(instance, DestinationKind::Instance)?;
    assert_eq!(
        dial(Some(&web), "udp-sendto", "::ffff:127.0.0.2", 8080)?,
        "refused"
    );
    refused += 1;
    assert!(
        redirector.counter("udp_refused") >= before + refused,
        "every refusal is counted"
    );
    Ok(())
}

#[test]
fn off_node_ipv6_and_udp_are_dropped_and_replies_to_node_sockets_pass() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("offnode6")?;
    let svc = cg.child("db")?.to_owned();
    let node = TestNetns::create("n6")?;
    let peer = TestNetns::create("p6")?;
    let (node_if, peer_if) = veth(&node, "198.18.2.5/30", &peer, "198.18.2.6/30")?;
    node.ip(&["addr", "add", "fe80::1/64", "dev", &node_if, "nodad"])?;
    peer.ip(&["addr", "add", "fe80::2/64", "dev", &peer_if, "nodad"])?;
    let (_listener, redirector) = attach(&cg)?;
    let (protected, open, client_port) = (18191u16, 18192u16, 18193u16);
    redirector.protect_port(protected, None)?;
    // No listener: the port a node client happens to send from.
    redirector.protect_port(client_port, None)?;

    let _server = node.spawn(
        Some(&svc),
        "python3",
        &["-c", SERVE, &protected.to_string(), &open.to_string()],
    )?;
    let _remote = peer.spawn(None, "python3", &["-c", SERVE, &open.to_string()])?;
    let from_peer = |mode: &str, host: &str, port: u16| -> Result<String> {
        probe(peer.spawn(
            None,
            "python3",
            &["-c", DIAL, mode, host, &port.to_string()],
        )?)
    };
    let node6 = format!("fe80::1%{peer_if}");
    assert_eventually(Duration::from_secs(5), "servers ready", || {
        from_peer("tcp", "198.18.2.5", open).is_ok_and(|o| o.starts_with("got direct"))
    })?;

    // Positive controls: the unprotected port answers off the node in both
    // families and both protocols.
    assert_eq!(from_peer("tcp", &node6, open)?, "got direct peer fe80::1");
    assert_eq!(
        from_peer("udp-sendto", "198.18.2.5", open)?,
        "got direct peer -"
    );
    assert_eq!(from_peer("udp-sendto", &node6, open)?, "got direct peer -");

    let (tcp_before, udp_before) = (
        redirector.counter("ingress_dropped"),
        redirector.counter("ingress_udp_dropped"),
    );
    for (mode, host) in [
        ("tcp", "198.18.2.5"),
        ("tcp", node6.as_str()),
        ("udp-sendto", "198.18.2.5"),
        ("udp-sendto", node6.as_str()),
    ] {
        let out = from_peer(mode, host, protected)?;
        assert_eq!(out, "silent", "off-node {mode} to {host} port {protected}");
    }
    assert!(
        redirector.counter("ingress_dropped") >= tcp_before + 2,
        "TCP drops counted"
    );
    assert!(
        redirector.counter("ingress_udp_dropped") >= udp_before + 2,
        "UDP drops counted"
    );

    // A node client in the application cgroup whose own port is protected gets its
    // replies: a TCP handshake and a connected UDP exchange with the peer.
    let from_node = |mode: &str, host: &str| -> Result<String> {
        probe(node.spawn(
            Some(&svc),
            "python3",
            &[
                "-c",
                DIAL,
                mode,
                host,
                &open.to_string(),
                &client_port.to_string(),
            ],
        )?)
    };
    assert_eq!(
        from_node("tcp", "198.18.2.6")?,
        "got direct peer 198.18.2.6"
    );
    assert_eq!(
        from_node("udp-connect", "198.18.2.6")?,
        "got direct peer 198.18.2.6"
    );
    let peer6 = format!("fe80::2%{node_if}");
    assert_eq!(from_node("tcp", &peer6)?, "got direct peer fe80::2");
    Ok(())
}
