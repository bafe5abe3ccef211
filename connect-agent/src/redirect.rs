//! The eBPF side of the agent: loads the embedded object, attaches its programs to
//! the application cgroup, and owns the maps.
//!
//! What it owns: the programs' attachment (through BPF links pinned on bpffs, so
//! enforcement outlives the agent: a crash or an upgrade never opens a protected
//! port; [`Redirector::detach`] is the one way to remove it), the maps' contents
//! (mesh destinations and protected ports, written from the catalog; redirect
//! records, read and removed for the proxy) and the counters. What it does not:
//! deciding what is a mesh destination — the catalog says so and calls
//! [`Redirector`]'s setters.
//!
//! While no agent runs, the programs keep enforcing with the maps as they were:
//! off-node packets to protected ports are dropped, and redirected connections go to
//! the outbound listener's address, where nothing listens, so they are refused.

mod maintain;
pub mod pins;

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
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps, links::FdLink,
    },
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
        "connect-agent runs inside --cgroup {path} (its own cgroup is {own}): it would redirect its own connections to itself; start it outside that cgroup"
    )]
    InsideCgroup { path: PathBuf, own: PathBuf },
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
    #[error(
        "cannot mount bpffs at /sys/fs/bpf (the pins that keep enforcement across restarts live there): {0}"
    )]
    Bpffs(#[source] std::io::Error),
    #[error("cannot pin eBPF state at {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot pin the link of eBPF program {name} (pinned links need Linux 5.7 or later): {source}"
    )]
    Link {
        name: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the pinned eBPF state in {path} cannot be read ({source}); remove it with `connect-agent detach --cgroup <path>`"
    )]
    PinnedState {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
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
    /// Plaintext ports of this node's services and its upstream listeners' ports,
    /// each with how it is guarded.
    pub protected_ports: BTreeMap<u16, PortGuard>,
}

/// How a port of this node is guarded, with the cgroup of the service that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortGuard {
    /// A service's plaintext port: off-node traffic is dropped, application TCP
    /// on a host-local address goes through the proxy, and only the owner's
    /// cgroup may send it datagrams.
    Service(Option<CgroupId>),
    /// An upstream listener, which speaks as its owner to whoever connects: only
    /// the owner's cgroup may connect to it. No owner (the service names no
    /// cgroup, or one that does not exist) refuses every application cgroup.
    Upstream(Option<CgroupId>),
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

/// Loaded programs plus the maps the agent drives. Dropping it closes the agent's
/// handles only: the pinned links keep the programs attached (see the module doc).
pub struct Redirector {
    cgroup: PathBuf,
    pins: pins::PinDir,
    // Field order matters for drop: maps and links go before the logger.
    mesh: Mutex<HashMap<MapData, SockKey, MeshDestination>>,
    protected: Mutex<HashMap<MapData, PortKey, ProtectedPort>>,
    by_port: Mutex<HashMap<MapData, SockKey, RedirectRecord>>,
    by_cookie: Mutex<HashMap<MapData, u64, RedirectRecord>>,
    counters: PerCpuArray<MapData, u64>,
    /// What the maps hold: read from adopted maps at load, then what the last
    /// [`Redirector::sync`] wrote, to diff the next one against.
    applied: Mutex<Desired>,
    /// Whether [`Redirector::load`] found a previous agent's maps and took them over.
    adopted: bool,
    /// Map writes that failed, ever (a metric), and entries the last sync could not
    /// write (a port or destination not enforced until a retry succeeds: `doctor`
    /// reports it).
    write_failures: std::sync::atomic::AtomicU64,
    unapplied: std::sync::atomic::AtomicUsize,
    ebpf: Mutex<Ebpf>,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// How each program attaches.
#[derive(Clone, Copy)]
enum Hook {
    SockAddr,
    SockOps,
    SkbIngress,
}

const PROGRAMS: [(&str, Hook); 8] = [
    (program::CONNECT4, Hook::SockAddr),
    (program::CONNECT6, Hook::SockAddr),
    (program::SENDMSG4, Hook::SockAddr),
    (program::SENDMSG6, Hook::SockAddr),
    (program::GETPEERNAME4, Hook::SockAddr),
    (program::GETPEERNAME6, Hook::SockAddr),
    (program::SOCK_OPS, Hook::SockOps),
    (program::INGRESS, Hook::SkbIngress),
];

/// The names of Connect's programs, as the kernel lists them.
pub fn program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS.iter().map(|(name, _)| *name)
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
    if let Some(own) = own_cgroup()
        && let Ok(target) = std::fs::canonicalize(cgroup)
        && own.starts_with(&target)
    {
        return Err(Error::InsideCgroup {
            path: cgroup.to_owned(),
            own,
        });
    }
    Ok(())
}

/// This process's cgroup (v2) directory; `None` if it cannot be read.
fn own_cgroup() -> Option<PathBuf> {
    crate::workload::attest::cgroup_dir_of("self").ok()
}

impl Redirector {
    /// [`Redirector::load`] then [`Redirector::attach_programs`] with whatever the
    /// maps hold (empty, or what a previous agent left).
    pub fn attach(cgroup: &Path, config: RedirectConfig) -> Result<Self, Error> {
        let r = Self::load(cgroup, config)?;
        r.attach_programs()?;
        Ok(r)
    }

    /// Loads the embedded object with its maps pinned for `cgroup` (adopting the
    /// maps a previous agent of the same layout left there), writes the config, and
    /// loads the programs into the kernel without attaching them. The caller fills
    /// the maps ([`Redirector::sync`]) and then calls
    /// [`Redirector::attach_programs`], so new programs never run on empty maps.
    pub fn load(cgroup: &Path, config: RedirectConfig) -> Result<Self, Error> {
        preflight(cgroup)?;
        pins::ensure_bpffs()?;
        let id = cgroup_id(cgroup).map_err(|source| Error::OpenCgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let dir = pins::PinDir::for_cgroup(cgroup);
        let adopted = match pinned_cgroup_id(&dir)? {
            Some(pinned) if pinned == id.0 => true,
            Some(pinned) => {
                // Pins of a cgroup that was removed and made again at this path:
                // their programs went with the old cgroup.
                tracing::warn!(dir = %dir.path.display(), pinned, current = id.0, "removing stale eBPF pins");
                pins::remove(&dir).map_err(|source| Error::Pin {
                    path: dir.path.clone(),
                    source,
                })?;
                false
            }
            None => false,
        };
        for d in [dir.maps(), dir.links()] {
            std::fs::create_dir_all(&d).map_err(|source| Error::Pin { path: d, source })?;
        }

        let mut loader = EbpfLoader::new();
        for name in map::ALL {
            loader.map_pin_path(name, dir.maps().join(name));
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
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
                    cgroup_id: id.0,
                },
                0,
            )
            .map_err(map_err(map::CONFIG))?;
        for (name, hook) in PROGRAMS {
            let load_err = |e| Error::LoadProgram {
                name,
                source: Box::new(e),
            };
            match hook {
                Hook::SockAddr => program_mut::<CgroupSockAddr>(&mut ebpf, name)?
                    .load()
                    .map_err(load_err)?,
                Hook::SockOps => program_mut::<SockOps>(&mut ebpf, name)?
                    .load()
                    .map_err(load_err)?,
                Hook::SkbIngress => program_mut::<CgroupSkb>(&mut ebpf, name)?
                    .load()
                    .map_err(load_err)?,
            }
        }

        let mesh: HashMap<MapData, SockKey, MeshDestination> =
            take_map(&mut ebpf, map::MESH_DESTINATIONS)?;
        let protected: HashMap<MapData, PortKey, ProtectedPort> =
            take_map(&mut ebpf, map::PROTECTED_PORTS)?;
        let applied = read_applied(&mesh, &protected);
        if adopted {
            tracing::info!(
                dir = %dir.path.display(),
                destinations = applied.destinations.len(),
                protected_ports = applied.protected_ports.len(),
                "adopted the eBPF maps a previous agent left"
            );
        }
        Ok(Self {
            cgroup: cgroup.to_owned(),
            pins: dir,
            mesh: Mutex::new(mesh),
            protected: Mutex::new(protected),
            by_port: Mutex::new(take_map(&mut ebpf, map::REDIRECT_BY_PORT)?),
            by_cookie: Mutex::new(take_map(&mut ebpf, map::REDIRECT_BY_COOKIE)?),
            counters: take_map(&mut ebpf, map::COUNTERS)?,
            applied: Mutex::new(applied),
            adopted,
            write_failures: std::sync::atomic::AtomicU64::new(0),
            unapplied: std::sync::atomic::AtomicUsize::new(0),
            ebpf: Mutex::new(ebpf),
            _logger: logger,
        })
    }

    /// Attaches every program to the cgroup (and so to every cgroup below it)
    /// through links pinned under the cgroup's pin directory, then retires the links
    /// and maps a previous agent left there. The new set runs before the old one is
    /// removed, so no connection ever finds the cgroup without programs.
    pub fn attach_programs(&self) -> Result<(), Error> {
        let mut ebpf = lock(&self.ebpf);
        let file = File::open(&self.cgroup).map_err(|source| Error::OpenCgroup {
            path: self.cgroup.clone(),
            source,
        })?;
        let fd = file.as_fd();
        // Through BPF links (kernel >= 5.7) a cgroup attachment always coexists with
        // others: the kernel ignores the legacy BPF_F_ALLOW_MULTI semantics for links
        // and rejects any flag with EINVAL (`cgroup_bpf_link_attach`). So the mode
        // must be the flag-less default.
        let mode = CgroupAttachMode::default();
        let links = self.pins.links();
        let token = format!("{}-{}", std::process::id(), monotonic_ns());
        let mut ours = Vec::new();
        let result = (|| {
            for (name, hook) in PROGRAMS {
                let attach_err = |e| Error::Attach {
                    name,
                    path: self.cgroup.clone(),
                    source: Box::new(e),
                };
                let link_err = |e: aya::programs::links::LinkError| Error::Link {
                    name,
                    source: Box::new(e),
                };
                let link: FdLink = match hook {
                    Hook::SockAddr => {
                        let p = program_mut::<CgroupSockAddr>(&mut ebpf, name)?;
                        let id = p.attach(fd, mode).map_err(attach_err)?;
                        let link = p.take_link(id).map_err(attach_err)?;
                        FdLink::try_from(link).map_err(link_err)?
                    }
                    Hook::SockOps => {
                        let p = program_mut::<SockOps>(&mut ebpf, name)?;
                        let id = p.attach(fd, mode).map_err(attach_err)?;
                        let link = p.take_link(id).map_err(attach_err)?;
                        FdLink::try_from(link).map_err(link_err)?
                    }
                    Hook::SkbIngress => {
                        let p = program_mut::<CgroupSkb>(&mut ebpf, name)?;
                        let id = p
                            .attach(fd, CgroupSkbAttachType::Ingress, mode)
                            .map_err(attach_err)?;
                        let link = p.take_link(id).map_err(attach_err)?;
                        FdLink::try_from(link).map_err(link_err)?
                    }
                };
                let path = links.join(format!("{name}@{token}"));
                link.pin(&path).map_err(|e| Error::Link {
                    name,
                    source: Box::new(e),
                })?;
                ours.push(path);
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Leave the previous set (if any) in force and take back what we added.
            for path in &ours {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        let mut retired = 0;
        for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
            let path = entry.path();
            if !ours.contains(&path) && std::fs::remove_file(&path).is_ok() {
                retired += 1;
            }
        }
        for old in pins::other_layouts(&self.pins) {
            if let Err(error) = std::fs::remove_dir_all(&old) {
                tracing::warn!(dir = %old.display(), %error, "cannot remove old eBPF maps");
            }
        }
        tracing::info!(
            cgroup = %self.cgroup.display(),
            pins = %self.pins.path.display(),
            retired,
            "eBPF programs attached"
        );
        Ok(())
    }

    /// Removes every pin of `cgroup`'s programs and maps: the programs detach once
    /// no process holds their links. The one deliberate way to stop enforcement
    /// (`connect-agent detach`, `--detach-on-exit`). Returns whether anything was pinned.
    pub fn detach(cgroup: &Path) -> Result<bool, Error> {
        let dir = pins::PinDir::for_cgroup(cgroup);
        pins::remove(&dir).map_err(|source| Error::Pin {
            path: dir.path.clone(),
            source,
        })
    }

    /// The pin directory of this cgroup's programs and maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.path
    }

    /// Whether the maps were a previous agent's, taken over at load.
    pub fn adopted(&self) -> bool {
        self.adopted
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
            let written = match owner {
                PortGuard::Service(owner) => self.protect_port(port, owner),
                PortGuard::Upstream(owner) => self.guard_upstream(port, owner),
            };
            match written {
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
        use std::sync::atomic::Ordering::Relaxed;
        self.write_failures.fetch_add(stats.failed as u64, Relaxed);
        self.unapplied.store(stats.failed, Relaxed);
        stats
    }

    /// (map writes that ever failed, entries the last sync left unwritten).
    pub fn failures(&self) -> (u64, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.write_failures.load(Relaxed),
            self.unapplied.load(Relaxed),
        )
    }

    /// The programs whose links are pinned for this cgroup (what enforces while no
    /// agent runs), by name, sorted.
    pub fn pinned_programs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.pins.links())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.split_once('@').map(|(p, _)| p.to_owned())
            })
            .collect();
        names.sort();
        names
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
                    owner_only: 0,
                    owner_cgroup_id: owner.map_or(0, |c| c.0),
                },
                0,
            )
            .map_err(map_err(map::PROTECTED_PORTS))
    }

    /// Guards an upstream listener's port: TCP connections to it on a host-local
    /// address from any application cgroup but `owner` are refused by `connect()`.
    pub fn guard_upstream(&self, port: u16, owner: Option<CgroupId>) -> Result<(), Error> {
        lock(&self.protected)
            .insert(
                PortKey::new(port),
                ProtectedPort {
                    redirect_loopback: 0,
                    owner_only: 1,
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

    /// One counter by its metric name (see [`Counter::ALL`]), summed over CPUs; 0 for
    /// a name that is not a counter.
    pub fn counter(&self, name: &str) -> u64 {
        Counter::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .and_then(|(c, _)| self.counters.get(&(*c as u32), 0).ok())
            .map_or(0, |per_cpu| per_cpu.iter().sum())
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

/// The cgroup id in a pinned config map, if the pin directory has one.
fn pinned_cgroup_id(dir: &pins::PinDir) -> Result<Option<u64>, Error> {
    let path = dir.maps().join(map::CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let unreadable = |source: aya::maps::MapError| Error::PinnedState {
        path: path.clone(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(&path).map_err(unreadable)?;
    let cfg: Array<MapData, BpfConfig> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(unreadable)?;
    let value = cfg
        .get(&connect_common::CONFIG_KEY, 0)
        .map_err(unreadable)?;
    Ok(Some(value.cgroup_id))
}

/// What adopted maps hold, in the form [`Redirector::sync`] diffs against.
fn read_applied(
    mesh: &HashMap<MapData, SockKey, MeshDestination>,
    protected: &HashMap<MapData, PortKey, ProtectedPort>,
) -> Desired {
    let mut d = Desired::default();
    for (key, value) in mesh.iter().filter_map(Result::ok) {
        let Some(ip4) = addr::as_v4(&key.ip_be) else {
            continue;
        };
        let kind = if value.kind == DEST_VIRTUAL_IP {
            DestinationKind::VirtualIp
        } else {
            DestinationKind::Instance
        };
        let addr = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(ip4)), key.port);
        d.destinations.insert((addr, kind));
    }
    for (key, value) in protected.iter().filter_map(Result::ok) {
        let owner = (value.owner_cgroup_id != 0).then_some(CgroupId(value.owner_cgroup_id));
        let guard = if value.owner_only != 0 {
            PortGuard::Upstream(owner)
        } else {
            PortGuard::Service(owner)
        };
        d.protected_ports.insert(key.port, guard);
    }
    d
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
