//! Probes in python3 (unmodified clients and servers, as applications are): a
//! dual-stack TCP and UDP server, and a dialer that reports how its socket ended.
//! Shared by the kernel-level and the agent-level enforcement tests.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Result, ensure};

use crate::lab::CgroupProc;

/// A dual-stack TCP and UDP server on every port given: TCP says `direct` and
/// closes, UDP answers each datagram with `direct`.
pub const SERVE: &str = r#"
import socket, sys, threading, time
def tcp(port):
    l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("::", port)); l.listen(64)
    while True:
        c, _ = l.accept()
        try:
            c.sendall(b"direct")
        except OSError:
            pass
        c.close()
def udp(port):
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    while True:
        _, a = u.recvfrom(100)
        u.sendto(b"direct", a)
for p in sys.argv[1:]:
    for f in (tcp, udp):
        threading.Thread(target=f, args=(int(p),), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"#;

/// `DIAL mode host port [source-port]`, mode `tcp`, `udp-sendto` or `udp-connect`.
/// Prints `got <reply> peer <getpeername address>`, `refused` (EPERM: a program
/// said no), `silent` (no answer within 2 s: dropped) or `failed <errno>`.
pub const DIAL: &str = r#"
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = int(sys.argv[4]) if len(sys.argv) > 4 else 0
typ = socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM
fam, _, _, _, addr = socket.getaddrinfo(host, port, 0, typ)[0]
s = socket.socket(fam, typ)
s.settimeout(2)
try:
    if src:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", src))
    if mode == "udp-sendto":
        s.sendto(b"ping", addr)
    else:
        s.connect(addr)
        if mode == "udp-connect":
            s.send(b"ping")
    data = s.recv(100)
    peer = "-" if mode == "udp-sendto" else s.getpeername()[0]
    print("got %s peer %s" % (data.decode(), peer))
except PermissionError:
    print("refused")
except socket.timeout:
    print("silent")
except OSError as e:
    print("failed", e.errno)
"#;

/// What a probe printed, trimmed; it must have exited 0.
pub fn probe(p: CgroupProc) -> Result<String> {
    let (code, out, err) = p.output(Duration::from_secs(15))?;
    ensure!(code == 0, "probe failed ({code}): {out}{err}");
    Ok(out.trim().to_owned())
}

/// [`DIAL`] `mode host port`, inside `cgroup`, or from the test's own cgroup
/// (outside the application cgroup) with `None`.
pub fn dial(cgroup: Option<&Path>, mode: &str, host: &str, port: u16) -> Result<String> {
    let port = port.to_string();
    let args = ["-c", DIAL, mode, host, &port];
    match cgroup {
        Some(cg) => probe(CgroupProc::spawn(cg, "python3", &args)?),
        None => {
            let out = Command::new("python3").args(args).output()?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
    }
}
