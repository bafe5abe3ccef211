//! Kernel attestation of a Unix socket's peer (see the module doc of
//! [`crate::workload`]).
//!
//! PID reuse: `SO_PEERCRED` reports the PID the peer had when it connected. If
//! that process has exited and its PID was given to another process by the time
//! we read `/proc/<pid>/cgroup`, we would read the other process's cgroup. So a
//! pidfd is taken first and the process is checked to be alive through it after
//! the read: a process that is alive still holds its PID, so the PID named the
//! same process throughout. With `SO_PEERPIDFD` (Linux 6.5) the pidfd is the
//! peer's own, taken by the kernel at `connect()`, and there is no window at all.
//! Without it, `pidfd_open(pid)` leaves the window between the peer's exit and
//! that call, as SPIRE's peertracker does; so the pidfd is taken once, when the
//! connection is accepted ([`Peer::of`]), not at each call: a connection the
//! peer passed on before it exited, used much later by another process, still
//! names the process that connected, not whoever holds its PID by then
//! (tests/tests/workload_pid_reuse.rs). `pidfd_open` is used only where the
//! kernel does not know `SO_PEERPIDFD`; any other refusal of it means the peer is
//! gone (Linux 6.5 to 6.15 answer `EINVAL` for a reaped peer, 6.16 and later a
//! pidfd of the dead process).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::identity::ServiceName;

/// Why a peer could not be attested. Every one means: no identity.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the socket has no peer credentials: {0}")]
    Credentials(#[source] nix::Error),
    #[error("the calling process {pid} is gone")]
    Gone { pid: i32 },
    #[error("cannot read the cgroup of process {pid}: {source}")]
    Cgroup {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot pin process {pid} with a pidfd: {source}")]
    Pidfd {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} is in cgroup {cgroup}, outside the agent's --cgroup {root}")]
    OutsideRoot {
        pid: i32,
        cgroup: PathBuf,
        root: PathBuf,
    },
    #[error("process {pid} is in cgroup {cgroup}, which no registered service of this node names")]
    NoService { pid: i32, cgroup: PathBuf },
}

/// A connection's peer as the kernel names it, pinned when the connection was
/// accepted: its credentials and a pidfd of that very process.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pidfd: OwnedFd,
}

impl Peer {
    /// Pins the peer of `socket` (a connected Unix stream); call it at accept.
    pub fn of(socket: &impl AsFd) -> Result<Self, Error> {
        let fd = socket.as_fd();
        let (pid, uid) = credentials(fd)?;
        let pidfd = match peer_pidfd(fd) {
            Ok(pidfd) => pidfd,
            // Linux before 6.5: no SO_PEERPIDFD; pin by PID, racing the peer's exit.
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                pidfd_open(pid).map_err(|source| pidfd_error(pid, source))?
            }
            Err(source) => return Err(pidfd_error(pid, source)),
        };
        Ok(Self { pid, uid, pidfd })
    }

    /// As a kernel without `SO_PEERPIDFD` pins it (`pidfd_open`).
    #[cfg(test)]
    fn by_pid(socket: &impl AsFd) -> Result<Self, Error> {
        let (pid, uid) = credentials(socket.as_fd())?;
        let pidfd = pidfd_open(pid).map_err(|source| pidfd_error(pid, source))?;
        Ok(Self { pid, uid, pidfd })
    }
}

/// The peer's PID and uid from `SO_PEERCRED`.
fn credentials(fd: BorrowedFd<'_>) -> Result<(i32, u32), Error> {
    let cred = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(Error::Credentials)?;
    let (pid, uid) = (cred.pid(), cred.uid());
    if pid <= 0 {
        return Err(Error::Gone { pid });
    }
    Ok((pid, uid))
}

/// A pidfd refused: `ESRCH` (no such process) and `EINVAL` (`SO_PEERPIDFD` of a
/// reaped peer, Linux 6.5 to 6.15) mean the peer is gone.
fn pidfd_error(pid: i32, source: io::Error) -> Error {
    match source.raw_os_error() {
        Some(libc::ESRCH | libc::EINVAL) => Error::Gone { pid },
        _ => Error::Pidfd { pid, source },
    }
}

/// A peer the kernel vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    pub pid: i32,
    pub uid: u32,
    /// Its cgroup, relative to `--cgroup`.
    pub cgroup: PathBuf,
    pub service: ServiceName,
}

/// The cgroup v2 directory of process `pid` (`"self"` for this one): the `0::`
/// line of `/proc/<pid>/cgroup` under the cgroup2 mount of this process.
pub fn cgroup_dir_of(pid: &str) -> io::Result<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let rel = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("no cgroup v2 line"))?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Where cgroup2 is mounted, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|l| {
            // "id parent maj:min root mountpoint options... - fstype source superoptions"
            let (fields, tail) = l.split_once(" - ")?;
            (tail.split(' ').next() == Some("cgroup2")).then(|| fields.split(' ').nth(4))?
        })
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("no cgroup2 mount"))
}

/// Attests the peer of `socket` (a connected Unix stream) now: [`Peer::of`],
/// then [`attest_peer`].
pub fn attest(
    socket: &impl AsFd,
    root: &Path,
    service_of: impl Fn(&Path) -> Option<ServiceName>,
) -> Result<Attested, Error> {
    attest_peer(&Peer::of(socket)?, root, service_of)
}

/// Attests a pinned peer: the service whose cgroup, as `service_of` maps paths
/// relative to `root` (`--cgroup`), contains the peer process, which must still
/// run. `service_of` gets the peer's cgroup and then each of its ancestors up to
/// `root`, and the first name it returns wins (the most specific cgroup).
pub fn attest_peer(
    peer: &Peer,
    root: &Path,
    service_of: impl Fn(&Path) -> Option<ServiceName>,
) -> Result<Attested, Error> {
    let Peer { pid, uid, pidfd } = peer;
    let (pid, uid) = (*pid, *uid);
    let dir = cgroup_dir_of(&pid.to_string()).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::Gone { pid },
        _ => Error::Cgroup { pid, source },
    })?;
    // The read above was of the caller's own /proc entry only if it still runs.
    if !alive(pidfd.as_fd()) {
        return Err(Error::Gone { pid });
    }
    let rel = dir.strip_prefix(root).map_err(|_| Error::OutsideRoot {
        pid,
        cgroup: dir.clone(),
        root: root.to_owned(),
    })?;
    let mut at = Some(rel);
    while let Some(p) = at {
        if let Some(service) = service_of(p) {
            return Ok(Attested {
                pid,
                uid,
                cgroup: rel.to_owned(),
                service,
            });
        }
        at = p.parent().filter(|p| !p.as_os_str().is_empty());
    }
    Err(Error::NoService {
        pid,
        cgroup: rel.to_owned(),
    })
}

/// The peer's pidfd from the kernel (`SO_PEERPIDFD`, Linux 6.5+).
#[allow(unsafe_code)]
fn peer_pidfd(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `pidfd`, an int we own;
    // `fd` is a valid open socket for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if pidfd < 0 {
        return Err(io::Error::other("SO_PEERPIDFD returned no descriptor"));
    }
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// `SO_PEERPIDFD` (asm-generic, x86 and arm alike).
const SO_PEERPIDFD: libc::c_int = 77;

/// `pidfd_open(pid, 0)`.
#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` still runs: signal 0 through the pidfd
/// succeeds only while it does (and names exactly that process, not its PID).
#[allow(unsafe_code)]
fn alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: a plain syscall; a null siginfo is allowed and means "as kill()".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        os::unix::net::{UnixListener, UnixStream},
        process::{Command, Stdio},
    };

    use super::*;

    fn svc(s: &str) -> ServiceName {
        s.parse().expect("name")
    }

    #[test]
    fn this_process_is_attested_by_its_cgroup_and_the_most_specific_service_wins() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let own = cgroup_dir_of("self").expect("own cgroup");
        // Pose as an agent whose --cgroup is our cgroup's parent, with a service
        // naming our cgroup and another naming nothing of ours.
        let root = own.parent().expect("parent").to_owned();
        let name = own.file_name().expect("name").to_owned();
        let got =
            attest(&a, &root, |p| (p == Path::new(&name)).then(|| svc("web"))).expect("attested");
        assert_eq!(got.pid, i32::try_from(std::process::id()).expect("pid"));
        assert_eq!(got.service, svc("web"));
        assert_eq!(got.cgroup, Path::new(&name));

        let e = attest(&a, &root, |_| None).expect_err("no service");
        assert!(matches!(e, Error::NoService { .. }), "{e}");
        let e =
            attest(&a, Path::new("/nonexistent/root"), |_| Some(svc("web"))).expect_err("outside");
        assert!(matches!(e, Error::OutsideRoot { .. }), "{e}");
    }

    /// A caller that connected and then exited is never attested, whatever its
    /// PID names by now.
    #[test]
    fn a_caller_that_is_gone_gets_no_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'x')",
            ])
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        let (mut conn, _) = listener.accept().expect("accept");
        let mut b = [0u8; 1];
        conn.read_exact(&mut b).expect("the child wrote");
        assert!(child.wait().expect("wait").success());
        let own = cgroup_dir_of("self").expect("own cgroup");
        let root = own.parent().expect("parent").to_owned();
        let e = attest(&conn, &root, |_| Some(svc("web"))).expect_err("gone");
        assert!(matches!(e, Error::Gone { .. }), "{e}");
        let _ = conn.write_all(b"x");
    }

    /// A peer pinned at accept, by either way of pinning, is the process that
    /// connected: once it exits, the connection earns nothing, whoever holds it.
    #[test]
    fn a_peer_pinned_at_accept_that_exits_later_gets_no_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let own = cgroup_dir_of("self").expect("own cgroup");
        let root = own.parent().expect("parent").to_owned();
        type Pin = fn(&UnixStream) -> Result<Peer, Error>;
        let pins: [Pin; 2] = [|s| Peer::of(s), |s| Peer::by_pid(s)];
        for pin in pins {
            let mut child = Command::new("python3")
                .args([
                    "-c",
                    "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'x'); sys.stdin.read()",
                ])
                .arg(&path)
                .stdin(Stdio::piped())
                .spawn()
                .expect("python3");
            let (mut conn, _) = listener.accept().expect("accept");
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).expect("the child wrote");
            let peer = pin(&conn).expect("pinned while it runs");
            attest_peer(&peer, &root, |_| Some(svc("web"))).expect("attested while it runs");
            drop(child.stdin.take());
            assert!(child.wait().expect("wait").success());
            let e = attest_peer(&peer, &root, |_| Some(svc("web"))).expect_err("gone");
            assert!(matches!(e, Error::Gone { .. }), "{e}");
        }
    }
}
