//! `connect-agent dns-setup --netns NAME`: make the applications of a lab node
//! resolve through that node's agent.
//!
//! What works, and why: glibc's resolver reads `nameserver` lines from
//! `/etc/resolv.conf` and always uses port 53; it cannot be pointed at 8600. Inside a
//! node's network namespace, loopback is the node's own, so the node's agent can
//! listen on `127.0.0.1:53` there (`--dns-addr 127.0.0.1:53`) without disturbing the
//! host. `ip netns exec NAME CMD` bind-mounts `/etc/netns/NAME/resolv.conf` over
//! `/etc/resolv.conf` for CMD, so that is the file this command writes. Steps:
//!
//! ```text
//! ip netns exec NAME connect-agent --dns-addr 127.0.0.1:53 ...   # the node's agent
//! connect-agent dns-setup --netns NAME          # checks the agent answers, writes the file
//! ip netns exec NAME getent hosts web.virtual.consul             # any application
//! ```
//!
//! `nsenter --net` does not apply `/etc/netns`: start applications with
//! `ip netns exec` (move the launching process into the service's cgroup first; the
//! exec keeps it there). This module does not start agents, create namespaces or
//! touch the host's own `/etc/resolv.conf`.

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RecordType},
};

/// The port the system resolver uses, whatever resolv.conf says.
pub const RESOLVER_PORT: u16 = 53;
/// Where `ip netns add` puts namespace handles.
const NETNS_RUN_DIR: &str = "/var/run/netns";
/// Where `ip netns exec` looks for per-namespace files.
const NETNS_ETC_DIR: &str = "/etc/netns";
/// How long the check waits for the agent's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Flags of `connect-agent dns-setup`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// Network namespace (a name from `ip netns list`) whose applications should
    /// resolve through the agent. The file written is /etc/netns/NAME/resolv.conf,
    /// which `ip netns exec NAME ...` uses as /etc/resolv.conf.
    #[arg(long, value_name = "NAME")]
    pub netns: String,

    /// Address of the agent's DNS server inside that namespace. The agent must listen
    /// on port 53 there (`--dns-addr 127.0.0.1:53`): the system resolver only talks
    /// to port 53.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub nameserver: IpAddr,

    /// Write the file without first checking that an agent answers there.
    #[arg(long)]
    pub no_check: bool,
}

/// Why the setup failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--netns {name:?} is invalid: {reason}")]
    NetnsName { name: String, reason: &'static str },
    #[error("there is no network namespace {name:?} ({path} is missing; see `ip netns list`)")]
    NoNetns { name: String, path: PathBuf },
    #[error(
        "no Connect agent answers DNS at {addr} in network namespace {netns}: {reason} (run that node's agent with `--dns-addr {addr}`, or pass --no-check to write the file anyway)"
    )]
    NoAgent {
        netns: String,
        addr: SocketAddr,
        reason: Probe,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the check query failed.
#[derive(Debug, thiserror::Error)]
pub enum Probe {
    #[error("cannot enter the namespace: {0}")]
    Enter(#[source] std::io::Error),
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "the answer is not from a Connect agent (response code {rcode}, authoritative: {authoritative})"
    )]
    NotConnect {
        rcode: ResponseCode,
        authoritative: bool,
    },
    #[error("the check thread panicked")]
    Panicked,
}

/// Checks (unless `--no-check`) and writes the namespace's resolv.conf; returns its
/// path.
pub fn run(args: &SetupArgs) -> Result<PathBuf, Error> {
    run_in(args, Path::new(NETNS_RUN_DIR), Path::new(NETNS_ETC_DIR))
}

fn run_in(args: &SetupArgs, run_dir: &Path, etc_dir: &Path) -> Result<PathBuf, Error> {
    check_name(&args.netns)?;
    let handle = run_dir.join(&args.netns);
    if !handle.exists() {
        return Err(Error::NoNetns {
            name: args.netns.clone(),
            path: handle,
        });
    }
    let addr = SocketAddr::new(args.nameserver, RESOLVER_PORT);
    if !args.no_check {
        probe_in(&handle, addr).map_err(|reason| Error::NoAgent {
            netns: args.netns.clone(),
            addr,
            reason,
        })?;
    }
    let dir = etc_dir.join(&args.netns);
    let path = dir.join("resolv.conf");
    write_atomically(
        &dir,
        &path,
        resolv_conf(&args.netns, args.nameserver).as_bytes(),
    )?;
    Ok(path)
}

/// The file's content. Short timeouts: the agent is local, and a name it refuses
/// (outside consul. without a recursor) should fail fast.
fn resolv_conf(netns: &str, nameserver: IpAddr) -> String {
    format!(
        "# Written by `connect-agent dns-setup --netns {netns}`: applications in this\n\
         # namespace resolve through the node's Connect agent (names under consul.;\n\
         # other names go to the agent's --dns-recursor, or are refused).\n\
         nameserver {nameserver}\n\
         options timeout:2 attempts:2\n"
    )
}

/// Namespace names become path components: refuse anything that could leave
/// /etc/netns or that `ip netns` would not make.
fn check_name(name: &str) -> Result<(), Error> {
    let bad = |reason| Error::NetnsName {
        name: name.chars().take(64).collect(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("it must be 1-64 characters"));
    }
    if name == "." || name == ".." {
        return Err(bad("it may not be '.' or '..'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(bad(
            "only ASCII letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

fn write_atomically(dir: &Path, path: &Path, content: &[u8]) -> Result<(), Error> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(err(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(err(dir))?;
    tmp.write_all(content).map_err(err(tmp.path()))?;
    // resolv.conf must be readable by every application, whatever our umask.
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))
            .map_err(err(tmp.path()))?;
    }
    tmp.persist(path).map_err(|e| Error::Write {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Asks `addr` for the SOA of `consul.` from inside the namespace at `handle`, on a
/// thread of its own (entering a namespace changes only the calling thread, which
/// ends right after).
fn probe_in(handle: &Path, addr: SocketAddr) -> Result<(), Probe> {
    let handle = handle.to_owned();
    std::thread::spawn(move || {
        let ns = fs::File::open(&handle).map_err(Probe::Enter)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Probe::Enter(e.into()))?;
        probe(addr)
    })
    .join()
    .unwrap_or(Err(Probe::Panicked))
}

/// One UDP query for `consul. SOA`; a Connect agent answers it authoritatively.
pub(crate) fn probe(addr: SocketAddr) -> Result<(), Probe> {
    let io = |op| move |source| Probe::Io { op, source };
    let local = match addr.ip() {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local).map_err(io("bind"))?;
    socket.connect(addr).map_err(io("connect"))?;
    socket
        .set_read_timeout(Some(CHECK_TIMEOUT))
        .map_err(io("set timeout"))?;
    let mut query = Message::query();
    // "consul." always parses; the fallback only keeps this free of unwrap.
    let apex = Name::from_str("consul.").unwrap_or_else(|_| Name::root());
    query.add_query(Query::query(apex, RecordType::SOA));
    let bytes = query.to_vec().map_err(|e| Probe::Io {
        op: "encode",
        source: std::io::Error::other(e),
    })?;
    socket.send(&bytes).map_err(io("send"))?;
    let mut buf = [0u8; 4096];
    loop {
        let len = match socket.recv(&mut buf) {
            Ok(len) => len,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Probe::Timeout(CHECK_TIMEOUT));
            }
            Err(e) => return Err(io("receive")(e)),
        };
        let Ok(answer) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        if answer.id != query.id || answer.message_type != MessageType::Response {
            continue;
        }
        let ok = answer.response_code == ResponseCode::NoError
            && answer.authoritative
            && answer
                .answers
                .iter()
                .any(|r| r.record_type() == RecordType::SOA);
        return if ok {
            Ok(())
        } else {
            Err(Probe::NotConnect {
                rcode: answer.response_code,
                authoritative: answer.authoritative,
            })
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(netns: &str, no_check: bool) -> SetupArgs {
        SetupArgs {
            netns: netns.to_owned(),
            nameserver: IpAddr::V4(Ipv4Addr::LOCALHOST),
            no_check,
        }
    }

    #[test]
    fn namespace_names() {
        for (name, ok) in [
            ("node-1", true),
            ("connect_dns.2", true),
            ("", false),
            (".", false),
            ("..", false),
            ("a/b", false),
            ("../etc", false),
            ("a b", false),
            (&"x".repeat(65), false),
        ] {
            assert_eq!(check_name(name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn writes_resolv_conf_for_an_existing_namespace() {
        let root = tempfile::tempdir().expect("tempdir");
        let (run_dir, etc_dir) = (root.path().join("run"), root.path().join("etc"));
        fs::create_dir_all(&run_dir).expect("mkdir");
        fs::write(run_dir.join("node1"), b"").expect("handle");

        let path = run_in(&args("node1", true), &run_dir, &etc_dir).expect("setup");
        assert_eq!(path, etc_dir.join("node1/resolv.conf"));
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.lines().any(|l| l == "nameserver 127.0.0.1"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);

        // Running again replaces the file.
        let mut v6 = args("node1", true);
        v6.nameserver = IpAddr::V6(Ipv6Addr::LOCALHOST);
        run_in(&v6, &run_dir, &etc_dir).expect("again");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.lines().any(|l| l == "nameserver ::1"), "{text}");
        assert!(!text.contains("127.0.0.1"));
    }

    #[test]
    fn a_missing_namespace_or_bad_name_writes_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let (run_dir, etc_dir) = (root.path().join("run"), root.path().join("etc"));
        assert!(matches!(
            run_in(&args("absent", true), &run_dir, &etc_dir),
            Err(Error::NoNetns { .. })
        ));
        assert!(matches!(
            run_in(&args("../x", true), &run_dir, &etc_dir),
            Err(Error::NetnsName { .. })
        ));
        assert!(!etc_dir.exists());
    }

    #[test]
    fn the_probe_reports_silence() {
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        assert!(matches!(probe(addr), Err(Probe::Timeout(_))));
    }
}
