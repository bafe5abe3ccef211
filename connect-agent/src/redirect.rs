//! The eBPF side of the agent: loads the embedded object, attaches its programs to
//! the application cgroup, owns the maps, and detaches everything when dropped.
//!
//! What it owns: the programs' lifetime (through BPF links, so a killed agent leaves
//! nothing attached), the maps' contents (mesh destinations and protected ports,
//! written from the catalog; redirect records, read and removed for the proxy) and
//! the counters. What it does not: deciding what is a mesh destination — the catalog
//! says so and calls [`Redirector`]'s setters.

mod maintain;

pub use self::maintain::{sweep_records, sync_maps};

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps},
};
use connect_common::{
    Config as BpfConfig, Counter, DEST_INSTANCE, DEST_VIRTUAL_IP, MeshDestination, PortKey,
    ProtectedPort, RedirectRecord, SockKey, addr, map, program,
};

/// The kernel object, built by `cargo xtask build-ebpf` and embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("CONNECT_EBPF_OBJECT"));

/// Why redirection could not start or a map operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "eBPF needs root (or CAP_BPF and CAP_NET_ADMIN): run connect-agent with sudo, or without --cgroup"
    )]
    NotRoot,
    #[error(
        "cgroup {path} does not exist: create it (mkdir) and move the applications into cgroups below it"
    )]
    CgroupMissing { path: PathBuf },
    #[error(
        "{path} is not a cgroup v2 directory: pass a directory under the cgroup2 mount (see `grep cgroup2 /proc/mounts`)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): Connect needs a kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    NoBtf,
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("cannot load eBPF program {name}: {source} (does the kernel support cgroup BPF?)")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach eBPF program {name} to {path}: {source}")]
    Attach {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "the eBPF object has no {kind} named {name} (the object and the agent are out of step: rebuild with `cargo xtask build`)"
    )]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map {
        map,
        source: Box::new(source),
    }
}

/// Where redirected connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The outbound listener (IPv4).
    pub proxy: SocketAddrV4,
    /// Emit a debug log line per redirected connection through aya-log.
    pub debug: bool,
}

/// A cgroup (v2) id: the inode number of the cgroup's directory, which is what
/// `bpf_get_current_cgroup_id` reports for processes in it ([`cgroup_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

impl std::fmt::Display for CgroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The address an application dialed, before eBPF sent its connection to the
/// proxy: what the proxy routes on (an instance's `IP:port`, a virtual IP, or a
/// local service's protected port on loopback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddrV4);

impl std::fmt::Display for OrigDst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The origin of a redirected connection, as eBPF recorded it at `connect()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// The address the application dialed.
    pub orig_dst: OrigDst,
    /// The cgroup of the dialing process.
    pub cgroup_id: CgroupId,
}

/// Kind of a mesh destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DestinationKind {
    /// A service instance's `IP:port`.
    Instance,
    /// A service virtual IP: every port of it.
    VirtualIp,
}

/// What the maps should hold, computed from the catalog (and virtual IPs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Service instances (`IP:port`) and virtual IPs whose connections go to the proxy.
    pub destinations: BTreeSet<(SocketAddrV4, DestinationKind)>,
    /// Plaintext ports of this node's services, each with the cgroup of the service
    /// that owns it (the one application cgroup whose UDP may reach it directly).
    pub protected_ports: BTreeMap<u16, Option<CgroupId>>,
}

/// What one [`Redirector::sweep`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub unclaimed: usize,
    pub unestablished: usize,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// What one [`Redirector::sync`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub added: usize,
    pub removed: usize,
    /// Entries that could not be written (map full, kernel error); retried next sync.
    pub failed: usize,
}

/// Loaded and attached programs plus the maps the agent drives. Dropping it detaches
/// every program (the links close with their file descriptors).
pub struct Redirector {
    cgroup: PathBuf,
    // Field order matters for drop: maps and links go before the logger.
    mesh: Mutex<HashMap<MapData, SockKey, MeshDestination>>,
    protected: Mutex<HashMap<MapData, PortKey, ProtectedPort>>,
    by_port: Mutex<HashMap<MapData, SockKey, RedirectRecord>>,
    by_cookie: Mutex<HashMap<MapData, u64, RedirectRecord>>,
    counters: PerCpuArray<MapData, u64>,
    /// What the last [`Redirector::sync`] wrote, to diff the next one against.
    applied: Mutex<Desired>,
    ebpf: Ebpf,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Checks what loading needs, so the user gets one line that says what is missing.
pub fn preflight(cgroup: &Path) -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    if !cgroup.is_dir() {
        return Err(Error::CgroupMissing {
            path: cgroup.to_owned(),
        });
    }
    match nix::sys::statfs::statfs(cgroup) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => {}
        _ => {
            return Err(Error::NotCgroup2 {
                path: cgroup.to_owned(),
            });
        }
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(Error::NoBtf);
    }
    Ok(())
}

impl Redirector {
    /// Loads the embedded object, writes the config, and attaches every program to
    /// `cgroup` (and so to every cgroup below it) beside programs others attached.
    pub fn attach(cgroup: &Path, config: RedirectConfig) -> Result<Self, Error> {
        preflight(cgroup)?;
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        // aya-log needs its map alive for as long as the programs run; keep the logger.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(error) => {
                tracing::debug!(%error, "eBPF logging unavailable");
                None
            }
        };

        let mut cfg_map: Array<MapData, BpfConfig> = take_map(&mut ebpf, map::CONFIG)?;
        cfg_map
            .set(
                connect_common::CONFIG_KEY,
                BpfConfig {
                    proxy_ip_be: u32::from(*config.proxy.ip()).to_be(),
                    proxy_port: config.proxy.port(),
                    enabled: 1,
                    debug: u8::from(config.debug),
                },
                0,
            )
            .map_err(map_err(map::CONFIG))?;

        let file = File::open(cgroup).map_err(|source| Error::OpenCgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let fd = file.as_fd();
        // Through BPF links (kernel >= 5.7, which aya uses when available) a cgroup
        // attachment always coexists with others: the kernel ignores the legacy
        // BPF_F_ALLOW_MULTI semantics for links and rejects any flag with EINVAL
        // (`cgroup_bpf_link_attach`). So the mode must be the flag-less default.
        let mode = CgroupAttachMode::default();
        let attach_err = |name: &'static str| {
            let path = cgroup.to_owned();
            move |e: aya::programs::ProgramError| Error::Attach {
                name,
                path: path.clone(),
                source: Box::new(e),
            }
        };
        let load_err = |name: &'static str| {
            move |e: aya::programs::ProgramError| Error::LoadProgram {
                name,
                source: Box::new(e),
            }
        };
        for name in [
            program::CONNECT4,
            program::CONNECT6,
            program::SENDMSG4,
            program::SENDMSG6,
            program::GETPEERNAME4,
            program::GETPEERNAME6,
        ] {
            let prog: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            prog.load().map_err(load_err(name))?;
            prog.attach(fd, mode).map_err(attach_err(name))?;
        }
        let prog: &mut SockOps = program_mut(&mut ebpf, program::SOCK_OPS)?;
        prog.load().map_err(load_err(program::SOCK_OPS))?;
        prog.attach(fd, mode)
            .map_err(attach_err(program::SOCK_OPS))?;
        let prog: &mut CgroupSkb = program_mut(&mut ebpf, program::INGRESS)?;
        prog.load().map_err(load_err(program::INGRESS))?;
        prog.attach(fd, CgroupSkbAttachType::Ingress, mode)
            .map_err(attach_err(program::INGRESS))?;

        Ok(Self {
            cgroup: cgroup.to_owned(),
            mesh: Mutex::new(take_map(&mut ebpf, map::MESH_DESTINATIONS)?),
            protected: Mutex::new(take_map(&mut ebpf, map::PROTECTED_PORTS)?),
            by_port: Mutex::new(take_map(&mut ebpf, map::REDIRECT_BY_PORT)?),
            by_cookie: Mutex::new(take_map(&mut ebpf, map::REDIRECT_BY_COOKIE)?),
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            applied: Mutex::new(Desired::default()),
            ebpf,
            _logger: logger,
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Brings the maps in step with `desired`: adds what is new, removes what is gone,
    /// and leaves the rest alone (so in-flight lookups never see a gap). Entries that
    /// fail are logged, counted, and retried on the next sync.
    pub fn sync(&self, desired: &Desired) -> SyncStats {
        let mut applied = lock(&self.applied);
        let mut stats = SyncStats::default();
        let mut now = Desired::default();
        for &(addr, kind) in applied.destinations.difference(&desired.destinations) {
            match self.remove_destination(addr, kind) {
                Ok(()) => stats.removed += 1,
                Err(error) => {
                    tracing::warn!(%addr, ?kind, %error, "cannot remove mesh destination");
                    stats.failed += 1;
                    now.destinations.insert((addr, kind));
                }
            }
        }
        for &(addr, kind) in &desired.destinations {
            if applied.destinations.contains(&(addr, kind)) {
                now.destinations.insert((addr, kind));
                continue;
            }
            match self.add_destination(addr, kind) {
                Ok(()) => {
                    stats.added += 1;
                    now.destinations.insert((addr, kind));
                }
                Err(error) => {
                    tracing::warn!(%addr, ?kind, %error, "cannot add mesh destination");
                    stats.failed += 1;
                }
            }
        }
        for (&port, &owner) in &applied.protected_ports {
            if desired.protected_ports.contains_key(&port) {
                continue;
            }
            match self.unprotect_port(port) {
                Ok(()) => stats.removed += 1,
                Err(error) => {
                    tracing::warn!(port, %error, "cannot unprotect port");
                    stats.failed += 1;
                    now.protected_ports.insert(port, owner);
                }
            }
        }
        for (&port, &owner) in &desired.protected_ports {
            if applied.protected_ports.get(&port) == Some(&owner) {
                now.protected_ports.insert(port, owner);
                continue;
            }
            match self.protect_port(port, owner) {
                Ok(()) => {
                    stats.added += 1;
                    now.protected_ports.insert(port, owner);
                }
                Err(error) => {
                    tracing::warn!(port, %error, "cannot protect port");
                    stats.failed += 1;
                }
            }
        }
        *applied = now;
        stats
    }

    /// Makes `addr` a mesh destination: connections to it go to the proxy.
    pub fn add_destination(&self, addr: SocketAddrV4, kind: DestinationKind) -> Result<(), Error> {
        let (port, kind) = match kind {
            DestinationKind::Instance => (addr.port(), DEST_INSTANCE),
            DestinationKind::VirtualIp => (0, DEST_VIRTUAL_IP),
        };
        lock(&self.mesh)
            .insert(
                ip_key(*addr.ip(), port),
                MeshDestination { kind, _pad: 0 },
                0,
            )
            .map_err(map_err(map::MESH_DESTINATIONS))
    }

    /// Stops redirecting connections to `addr`. Removing a missing entry is fine.
    pub fn remove_destination(
        &self,
        addr: SocketAddrV4,
        kind: DestinationKind,
    ) -> Result<(), Error> {
        let port = match kind {
            DestinationKind::Instance => addr.port(),
            DestinationKind::VirtualIp => 0,
        };
        ignore_missing(lock(&self.mesh).remove(&ip_key(*addr.ip(), port)))
            .map_err(map_err(map::MESH_DESTINATIONS))
    }

    /// Protects a plaintext service port: off-node connections and datagrams to it
    /// are dropped, application TCP connections to it on a host-local address go
    /// through the proxy, and application UDP to it is refused except from `owner`,
    /// the cgroup of the service that listens there.
    pub fn protect_port(&self, port: u16, owner: Option<CgroupId>) -> Result<(), Error> {
        lock(&self.protected)
            .insert(
                PortKey::new(port),
                ProtectedPort {
                    redirect_loopback: 1,
                    _pad: 0,
                    owner_cgroup_id: owner.map_or(0, |c| c.0),
                },
                0,
            )
            .map_err(map_err(map::PROTECTED_PORTS))
    }

    /// Stops protecting a port.
    pub fn unprotect_port(&self, port: u16) -> Result<(), Error> {
        ignore_missing(lock(&self.protected).remove(&PortKey::new(port)))
            .map_err(map_err(map::PROTECTED_PORTS))
    }

    /// Claims the origin of a connection the outbound listener accepted from `peer`.
    /// The record is removed: each is claimed once.
    pub fn take_redirect(&self, peer: SocketAddrV4) -> Result<Option<Redirect>, Error> {
        let key = ip_key(*peer.ip(), peer.port());
        let mut m = lock(&self.by_port);
        let rec = match m.get(&key, 0) {
            Ok(r) => r,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(map::REDIRECT_BY_PORT)(e)),
        };
        ignore_missing(m.remove(&key)).map_err(map_err(map::REDIRECT_BY_PORT))?;
        let Some(ip) = orig_ipv4(&rec.orig_ip_be) else {
            // The programs redirect only mesh addresses (IPv4) and host-local ones.
            tracing::warn!(%peer, "redirect record with an IPv6 destination that is not ::1");
            return Ok(None);
        };
        Ok(Some(Redirect {
            orig_dst: OrigDst(SocketAddrV4::new(ip, rec.orig_port)),
            cgroup_id: CgroupId(rec.cgroup_id),
        }))
    }

    /// Files a by-port record as `sock_ops` does when a redirected connection from
    /// `peer` is established. For benchmarks and tests of the claiming side that
    /// have no kernel connection behind the record; the agent never calls it.
    pub fn file_redirect(&self, peer: SocketAddrV4, redirect: Redirect) -> Result<(), Error> {
        let rec = RedirectRecord {
            cgroup_id: redirect.cgroup_id.0,
            created_ns: monotonic_ns(),
            orig_ip_be: addr::mapped(u32::from(*redirect.orig_dst.0.ip()).to_be()),
            orig_port: redirect.orig_dst.0.port(),
            established: 1,
            _pad: 0,
            _pad2: 0,
        };
        lock(&self.by_port)
            .insert(ip_key(*peer.ip(), peer.port()), rec, 0)
            .map_err(map_err(map::REDIRECT_BY_PORT))
    }

    /// Removes records nobody will use: by-port records the proxy did not claim
    /// within `unclaimed` (it claims right after `accept()`, so these belong to
    /// connections that died before that), and by-cookie records of `connect()`s that
    /// never completed within `unestablished` (established ones are removed by
    /// `sock_ops` when the socket closes, and must stay until then for
    /// `getpeername`). The LRU maps bound memory either way; this keeps them from
    /// filling with garbage that evicts live records.
    pub fn sweep(&self, unclaimed: Duration, unestablished: Duration) -> SweepStats {
        let now = monotonic_ns();
        let older = |rec: &RedirectRecord, age: Duration| {
            now.saturating_sub(rec.created_ns) > u64::try_from(age.as_nanos()).unwrap_or(u64::MAX)
        };
        let mut stats = SweepStats::default();
        {
            let mut m = lock(&self.by_port);
            let stale: Vec<SockKey> = m
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, rec)| older(rec, unclaimed))
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                if m.remove(&k).is_ok() {
                    stats.unclaimed += 1;
                }
            }
        }
        {
            let mut m = lock(&self.by_cookie);
            let stale: Vec<u64> = m
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, rec)| rec.established == 0 && older(rec, unestablished))
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                if m.remove(&k).is_ok() {
                    stats.unestablished += 1;
                }
            }
        }
        stats
    }

    /// The programs' counters, summed over CPUs, with their metric names.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|(c, name)| {
                let sum = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (*name, sum)
            })
            .collect()
    }

    /// How many entries the maps hold as of the last [`Redirector::sync`]:
    /// (instance destinations, virtual IPs, protected ports).
    pub fn applied_counts(&self) -> (usize, usize, usize) {
        let applied = lock(&self.applied);
        let vips = applied
            .destinations
            .iter()
            .filter(|(_, k)| *k == DestinationKind::VirtualIp)
            .count();
        (
            applied.destinations.len() - vips,
            vips,
            applied.protected_ports.len(),
        )
    }

    /// The loaded object, for callers that need a program or map this type does not wrap.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// The cgroup (v2) id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id` reports for processes in it.
pub fn cgroup_id(path: &Path) -> std::io::Result<CgroupId> {
    use std::os::unix::fs::MetadataExt;
    Ok(CgroupId(std::fs::metadata(path)?.ino()))
}

fn ip_key(ip: Ipv4Addr, port: u16) -> SockKey {
    SockKey::v4(u32::from(ip).to_be(), port)
}

/// The IPv4 form of a recorded destination: v4-mapped addresses are IPv4, and `::1`
/// is the same host-local services as 127.0.0.1 (a listener on `[::]` serves both).
fn orig_ipv4(ip_be: &[u32; 4]) -> Option<Ipv4Addr> {
    if let Some(v4) = addr::as_v4(ip_be) {
        return Some(Ipv4Addr::from(u32::from_be(v4)));
    }
    addr::is_loopback(ip_be).then_some(Ipv4Addr::LOCALHOST)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Map handles hold no invariants across a panic: keep using a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, Error>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(Error::Missing { kind: "map", name })?;
    M::try_from(m).map_err(map_err(name))
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    p.try_into().map_err(|e| Error::LoadProgram {
        name,
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map and program named in connect-common is in the embedded object, so a
    /// rename on one side cannot ship unnoticed. Parsing needs no privileges.
    #[test]
    fn object_has_every_named_map_and_program() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        for name in program::ALL {
            assert!(
                obj.programs.contains_key(*name),
                "program {name} missing from the object"
            );
        }
        for name in map::ALL {
            assert!(
                obj.maps.contains_key(*name),
                "map {name} missing from the object"
            );
        }
    }
}
