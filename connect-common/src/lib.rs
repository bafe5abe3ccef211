//! Types shared by Connect's kernel programs (`connect-ebpf`) and the agent.
//!
//! Everything a map stores is defined here once: keys and values are `#[repr(C)]`
//! with fixed-width fields and explicit padding, so that a hash key never holds
//! uninitialised bytes (the kernel hashes all of them) and both sides agree on the
//! layout. Sizes are asserted at compile time. Byte order is part of each field's
//! name: `_be` is network order, everything else is host order.
//!
//! This crate deliberately holds no logic beyond key construction: policy lives in
//! the agent, enforcement in the programs.
#![no_std]

// ───────────────────────────── names ─────────────────────────────

/// Program names, as the functions are called in the object (`aya` looks them up by these).
pub mod program {
    pub const CONNECT4: &str = "connect4";
    pub const SOCK_OPS: &str = "sock_ops";
    pub const GETPEERNAME4: &str = "getpeername4";
    pub const INGRESS: &str = "ingress";
    /// Every program the agent loads and attaches to the application cgroup.
    pub const ALL: &[&str] = &[CONNECT4, SOCK_OPS, GETPEERNAME4, INGRESS];
}

/// Map names, as the statics are called in the object.
pub mod map {
    pub const CONFIG: &str = "CONFIG";
    pub const MESH_DESTINATIONS: &str = "MESH_DESTINATIONS";
    pub const PROTECTED_PORTS: &str = "PROTECTED_PORTS";
    pub const REDIRECT_BY_COOKIE: &str = "REDIRECT_BY_COOKIE";
    pub const REDIRECT_BY_PORT: &str = "REDIRECT_BY_PORT";
    pub const COUNTERS: &str = "COUNTERS";
    /// Every map the object defines (aya-log's own map aside).
    pub const ALL: &[&str] = &[
        CONFIG,
        MESH_DESTINATIONS,
        PROTECTED_PORTS,
        REDIRECT_BY_COOKIE,
        REDIRECT_BY_PORT,
        COUNTERS,
    ];
}

// ───────────────────────────── sizes ─────────────────────────────

/// Upper bound of mesh destinations (service instances and virtual IPs) a node tracks.
pub const MAX_MESH_DESTINATIONS: u32 = 65_536;
/// Upper bound of protected (plaintext service) ports on one node.
pub const MAX_PROTECTED_PORTS: u32 = 4_096;
/// In-flight redirect records. The maps are LRU: a record the proxy never claimed
/// (the client gave up before `accept()`) is evicted instead of filling the map.
pub const MAX_REDIRECTS: u32 = 65_536;

// ───────────────────────────── config ─────────────────────────────

/// Index of the single entry of the `CONFIG` array.
pub const CONFIG_KEY: u32 = 0;

/// Where redirected connections go, written by the agent before it attaches programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// IPv4 address of the outbound listener, network order (127.0.0.1 by default).
    pub proxy_ip_be: u32,
    /// Port of the outbound listener, host order (15001 by default).
    pub proxy_port: u16,
    /// Non-zero once the agent has written the config; until then nothing is redirected.
    pub enabled: u8,
    /// Non-zero to emit per-connection debug logs through aya-log.
    pub debug: u8,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

// ───────────────────────────── keys ─────────────────────────────

/// An IPv4 socket address as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Key {
    /// Address, network order.
    pub ip_be: u32,
    /// Port, host order. `0` in `MESH_DESTINATIONS` means "every port" (virtual IPs).
    pub port: u16,
    /// Always zero: keeps the key free of uninitialised bytes.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Ipv4Key>() == 8);

impl Ipv4Key {
    /// Builds a key. Every program and the agent build keys through this one helper,
    /// so byte order is decided in one place.
    #[inline(always)]
    pub const fn new(ip_be: u32, port: u16) -> Self {
        Self {
            ip_be,
            port,
            _pad: 0,
        }
    }
}

/// A protected port (a plaintext service listener) as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Port, host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 4);

impl PortKey {
    #[inline(always)]
    pub const fn new(port: u16) -> Self {
        Self { port, _pad: 0 }
    }
}

// ───────────────────────────── values ─────────────────────────────

/// What `MESH_DESTINATIONS` says about a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshDestination {
    /// Kind of destination, one of the `DEST_*` constants.
    pub kind: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MeshDestination>() == 8);

/// A registered service instance's `IP:port`.
pub const DEST_INSTANCE: u32 = 1;
/// A service virtual IP (any port).
pub const DEST_VIRTUAL_IP: u32 = 2;

/// Value of `PROTECTED_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtectedPort {
    /// Non-zero: also redirect connections from application cgroups to this port on
    /// loopback (co-located services go through the proxy too).
    pub redirect_loopback: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ProtectedPort>() == 8);

/// The original destination and source of a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectRecord {
    /// The cgroup (v2) id of the socket that called `connect()`: tells the agent
    /// which service the connection speaks for.
    pub cgroup_id: u64,
    /// When `connect()` was redirected (`bpf_ktime_get_ns`, CLOCK_MONOTONIC): lets the
    /// agent sweep records nobody will claim.
    pub created_ns: u64,
    /// The address the application dialed, network order.
    pub orig_ip_be: u32,
    /// The port the application dialed, host order.
    pub orig_port: u16,
    /// Set by `sock_ops` once the connection is established: from then on the record
    /// lives as long as the socket (removed on close), before that a failed
    /// `connect()` would leave it behind.
    pub established: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RedirectRecord>() == 24);

// ───────────────────────────── counters ─────────────────────────────

/// Per-CPU counters, indexed by reason. The agent sums them across CPUs and exports
/// them as metrics; every error path in the programs bumps one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connection redirected to the outbound listener.
    Redirected = 0,
    /// A redirect record could not be stored; the connection was refused.
    RedirectRecordFull = 1,
    /// An ingress packet to a protected port from off the node was dropped.
    IngressDropped = 2,
    /// An ingress packet could not be parsed; it was dropped (fail closed).
    IngressMalformed = 3,
    /// `sock_ops` could not re-key a record: the proxy will not find the connection's
    /// origin and closes it.
    SockOpsUpdateFailed = 4,
    /// `getpeername4` restored an original destination.
    PeerNameRestored = 5,
    /// The config was not written yet; `connect4` let the connection through unchanged.
    NotConfigured = 6,
    /// An IPv6 packet whose transport header sits behind extension headers was dropped
    /// because its destination port could not be checked (fail closed).
    IngressIpv6ExtDropped = 7,
}

impl Counter {
    /// Number of counters (size of the `COUNTERS` array).
    pub const COUNT: u32 = 8;
    /// Every counter with its metric name, for the agent's exporter.
    pub const ALL: [(Counter, &'static str); Self::COUNT as usize] = [
        (Counter::Redirected, "redirected"),
        (Counter::RedirectRecordFull, "redirect_record_full"),
        (Counter::IngressDropped, "ingress_dropped"),
        (Counter::IngressMalformed, "ingress_malformed"),
        (Counter::SockOpsUpdateFailed, "sockops_update_failed"),
        (Counter::PeerNameRestored, "peername_restored"),
        (Counter::NotConfigured, "not_configured"),
        (Counter::IngressIpv6ExtDropped, "ingress_ipv6_ext_dropped"),
    ];
}

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    use super::*;
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers, with explicit
    // padding fields, so every bit pattern is valid and none of its bytes is uninitialised.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Ipv4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MeshDestination {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProtectedPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RedirectRecord {}
}
