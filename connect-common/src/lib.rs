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
#![cfg_attr(not(test), no_std)]

// ───────────────────────────── names ─────────────────────────────

/// Program names, as the functions are called in the object (`aya` looks them up by these).
pub mod program {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SENDMSG4: &str = "sendmsg4";
    pub const SENDMSG6: &str = "sendmsg6";
    pub const SOCK_OPS: &str = "sock_ops";
    pub const GETPEERNAME4: &str = "getpeername4";
    pub const GETPEERNAME6: &str = "getpeername6";
    pub const INGRESS: &str = "ingress";
    /// Every program the agent loads and attaches to the application cgroup.
    pub const ALL: &[&str] = &[
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        SOCK_OPS,
        GETPEERNAME4,
        GETPEERNAME6,
        INGRESS,
    ];
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
    /// The cgroup (v2) id the programs are attached to. The maps are pinned and
    /// outlive the agent; a restarted agent adopts them only if this matches, so pins
    /// left for a cgroup that was removed and made again are not mistaken for its own.
    pub cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// Version of the maps' layout (every key and value type in this crate). The agent
/// pins maps under a directory named after it: an agent of the same layout adopts
/// the maps a previous one left, one of another layout makes new ones (and removes
/// the old once its programs replaced the old programs). Bump on any layout change.
pub const MAP_LAYOUT: u32 = 3;

// ───────────────────────────── keys ─────────────────────────────

/// A socket address of either family as a map key.
///
/// IPv4 is stored v4-mapped (`::ffff:a.b.c.d`), the form the kernel itself gives an
/// IPv4 peer of an IPv6 socket: one key type serves both families, and a v4-mapped
/// destination is the same key as its IPv4 form, so no program can treat the two
/// differently.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Address, network order, as four 32-bit words (the layout of `bpf_sock_addr.user_ip6`).
    pub ip_be: [u32; 4],
    /// Port, host order. `0` in `MESH_DESTINATIONS` means "every port" (virtual IPs).
    pub port: u16,
    /// Always zero: keeps the key free of uninitialised bytes.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);

impl SockKey {
    /// The key of an IPv4 address (network order) and port. Every program and the
    /// agent build keys through these helpers, so byte order is decided in one place.
    #[inline(always)]
    pub const fn v4(ip_be: u32, port: u16) -> Self {
        Self::v6(addr::mapped(ip_be), port)
    }

    /// The key of an IPv6 address (network-order words) and port.
    #[inline(always)]
    pub const fn v6(ip_be: [u32; 4], port: u16) -> Self {
        Self {
            ip_be,
            port,
            _pad: 0,
        }
    }
}

/// Address classification shared by the programs and the agent (and unit-tested
/// here, where it is plain Rust). Addresses are network-order words as in [`SockKey`].
pub mod addr {
    /// The third word of a v4-mapped address, `0000:ffff`.
    const MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();

    /// `::ffff:a.b.c.d` for an IPv4 address in network order.
    #[inline(always)]
    pub const fn mapped(ip4_be: u32) -> [u32; 4] {
        [0, 0, MAPPED_WORD, ip4_be]
    }

    /// The IPv4 address (network order) of a v4-mapped address.
    #[inline(always)]
    pub const fn as_v4(ip: &[u32; 4]) -> Option<u32> {
        if ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_WORD {
            Some(ip[3])
        } else {
            None
        }
    }

    /// Addresses the kernel delivers to this host whatever the routes say:
    /// 127.0.0.0/8, `::1`, and the unspecified `0.0.0.0` and `::` (a `connect()` to
    /// them reaches the local host). In either family, v4-mapped included.
    #[inline(always)]
    pub const fn is_host_local(ip: &[u32; 4]) -> bool {
        match as_v4(ip) {
            Some(v4) => {
                let host = u32::from_be(v4);
                host >> 24 == 127 || host == 0
            }
            None => {
                ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == 1_u32.to_be())
            }
        }
    }

    /// Loopback only (127.0.0.0/8 and `::1`, v4-mapped included): the sources the
    /// agent's inbound proxy sends from.
    #[inline(always)]
    pub const fn is_loopback(ip: &[u32; 4]) -> bool {
        match as_v4(ip) {
            Some(v4) => u32::from_be(v4) >> 24 == 127,
            None => ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1_u32.to_be(),
        }
    }

    /// The address a connection to `ip` really has as its peer: the unspecified
    /// address becomes loopback of its family (what Linux connects to and what
    /// `getpeername()` reports); every other address is itself.
    #[inline(always)]
    pub const fn peer_form(ip: [u32; 4]) -> [u32; 4] {
        match as_v4(&ip) {
            Some(0) => mapped(0x7f00_0001_u32.to_be()),
            Some(_) => ip,
            None => {
                if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 0 {
                    [0, 0, 0, 1_u32.to_be()]
                } else {
                    ip
                }
            }
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
    /// Non-zero: also redirect TCP connections from application cgroups to this port
    /// on a host-local address (co-located services go through the proxy too).
    pub redirect_loopback: u32,
    /// Non-zero for an upstream listener's port: a TCP `connect()` to it on a
    /// host-local address from any application cgroup but the owner's is refused
    /// (EPERM), because the listener speaks as its owner to whoever connects.
    pub owner_only: u32,
    /// The cgroup id of the service that owns the port, `0` if it has none: the only
    /// application cgroup whose datagrams may reach the port directly (and, with
    /// `owner_only`, whose TCP connections may).
    pub owner_cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<ProtectedPort>() == 16);

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
    /// The address the application dialed, network-order words, IPv4 v4-mapped, the
    /// unspecified address as loopback ([`addr::peer_form`]).
    pub orig_ip_be: [u32; 4],
    /// The port the application dialed, host order.
    pub orig_port: u16,
    /// Set by `sock_ops` once the connection is established: from then on the record
    /// lives as long as the socket (removed on close), before that a failed
    /// `connect()` would leave it behind.
    pub established: u8,
    pub _pad: u8,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<RedirectRecord>() == 40);

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
    /// A UDP datagram (or a UDP `connect()`) from an application cgroup to another
    /// service's protected port, or to a mesh destination, was refused (EPERM).
    UdpRefused = 8,
    /// A UDP datagram from off the node to a protected port was dropped.
    IngressUdpDropped = 9,
    /// A TCP `connect()` from an application cgroup to another service's upstream
    /// listener was refused (EPERM).
    UpstreamRefused = 10,
}

impl Counter {
    /// Number of counters (size of the `COUNTERS` array).
    pub const COUNT: u32 = 11;
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
        (Counter::UdpRefused, "udp_refused"),
        (Counter::IngressUdpDropped, "ingress_udp_dropped"),
        (Counter::UpstreamRefused, "upstream_refused"),
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
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MeshDestination {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProtectedPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RedirectRecord {}
}

#[cfg(test)]
mod tests {
    use super::addr::*;

    fn words(ip: core::net::Ipv6Addr) -> [u32; 4] {
        let o = ip.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }
    fn v4(s: &str) -> [u32; 4] {
        let ip: core::net::Ipv4Addr = s.parse().expect("test address");
        mapped(u32::from_ne_bytes(ip.octets()))
    }
    fn v6(s: &str) -> [u32; 4] {
        words(s.parse().expect("test address"))
    }

    #[test]
    fn a_mapped_address_is_its_ipv4_form() {
        assert_eq!(v4("127.0.0.1"), v6("::ffff:127.0.0.1"));
        assert_eq!(v4("198.18.0.2"), v6("::ffff:198.18.0.2"));
        assert_eq!(
            as_v4(&v6("::ffff:198.18.0.2")),
            Some(u32::from_ne_bytes([198, 18, 0, 2]))
        );
        assert_eq!(as_v4(&v6("::1")), None);
        assert_eq!(as_v4(&v6("fe80::1")), None);
    }

    #[test]
    fn host_local_is_loopback_and_unspecified_in_both_families() {
        for local in ["127.0.0.1", "127.1.2.3", "0.0.0.0"] {
            assert!(is_host_local(&v4(local)), "{local}");
        }
        for local in ["::1", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"] {
            assert!(is_host_local(&v6(local)), "{local}");
        }
        for remote in ["198.18.0.2", "128.0.0.1", "0.0.0.1"] {
            assert!(!is_host_local(&v4(remote)), "{remote}");
        }
        for remote in [
            "fe80::1",
            "::2",
            "2001:db8::1",
            "::ffff:198.18.0.2",
            "::127.0.0.1",
        ] {
            assert!(!is_host_local(&v6(remote)), "{remote}");
        }
    }

    #[test]
    fn loopback_excludes_unspecified() {
        assert!(is_loopback(&v4("127.0.0.9")) && is_loopback(&v6("::1")));
        assert!(is_loopback(&v6("::ffff:127.0.0.1")));
        assert!(!is_loopback(&v4("0.0.0.0")) && !is_loopback(&v6("::")));
        assert!(!is_loopback(&v6("fe80::1")) && !is_loopback(&v4("198.18.0.1")));
    }

    #[test]
    fn unspecified_peers_become_loopback_of_their_family() {
        assert_eq!(peer_form(v4("0.0.0.0")), v4("127.0.0.1"));
        assert_eq!(peer_form(v6("::")), v6("::1"));
        assert_eq!(peer_form(v4("198.18.0.2")), v4("198.18.0.2"));
        assert_eq!(peer_form(v6("fe80::1")), v6("fe80::1"));
    }
}
