//! Connect's kernel programs, attached to the application cgroup by the agent.
//!
//! This file holds only the map statics and the program entry points; each program's
//! logic lives in its own module. Every entry states whether it fails open or closed:
//! a failure never lets an application reach a protected plaintext port directly.
#![no_std]
#![no_main]

mod connect;
mod ingress;
mod peername;
mod sockops;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use connect_common::{
    Config, Counter, MAX_MESH_DESTINATIONS, MAX_PROTECTED_PORTS, MAX_REDIRECTS, MeshDestination,
    PortKey, ProtectedPort, RedirectRecord, SockKey,
};

// ───────────────────────────── maps ─────────────────────────────

/// Where to redirect to; written once by the agent before it attaches the programs.
#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Mesh destinations (service instance `IP:port`, virtual IP with port 0), from the catalog.
#[map(name = "MESH_DESTINATIONS")]
static MESH_DESTINATIONS: HashMap<SockKey, MeshDestination> =
    HashMap::with_max_entries(MAX_MESH_DESTINATIONS, 0);

/// Plaintext service ports on this node, from the catalog.
#[map(name = "PROTECTED_PORTS")]
static PROTECTED_PORTS: HashMap<PortKey, ProtectedPort> =
    HashMap::with_max_entries(MAX_PROTECTED_PORTS, 0);

/// socket cookie -> original destination + cgroup, from `connect()` until the socket closes.
#[map(name = "REDIRECT_BY_COOKIE")]
static REDIRECT_BY_COOKIE: LruHashMap<u64, RedirectRecord> =
    LruHashMap::with_max_entries(MAX_REDIRECTS, 0);

/// client `IP:port` -> original destination + cgroup, from establishment until the agent
/// claims it at `accept()`.
#[map(name = "REDIRECT_BY_PORT")]
static REDIRECT_BY_PORT: LruHashMap<SockKey, RedirectRecord> =
    LruHashMap::with_max_entries(MAX_REDIRECTS, 0);

/// Per-CPU event and error counters, indexed by [`Counter`].
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Adds one to a counter. Per-CPU, so a plain add is race-free.
#[inline(always)]
fn count(counter: Counter) {
    if let Some(ptr) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from the map and is valid for this CPU's slot;
        // per-CPU maps are not shared between CPUs and programs do not preempt each
        // other on one CPU.
        unsafe { *ptr += 1 };
    }
}

/// The agent's config, or `None` before it wrote one.
#[inline(always)]
fn config() -> Option<Config> {
    match CONFIG.get(connect_common::CONFIG_KEY) {
        Some(cfg) if cfg.enabled != 0 => Some(*cfg),
        _ => None,
    }
}

// ───────────────────────── cgroup/connect4, cgroup/connect6 ─────────────────────────

/// Redirects TCP connections to mesh destinations (and to protected ports on a
/// host-local address) to the outbound listener; refuses UDP `connect()`s that would
/// reach another service's protected port. One body serves both families: IPv4 is
/// handled in its v4-mapped form, so `[::ffff:127.0.0.1]:p` is `127.0.0.1:p`.
///
/// Fails closed: if the original destination cannot be recorded, the `connect()` is
/// refused (EPERM) rather than let through to the plaintext destination.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    connect::on_connect(&ctx, connect::Family::V4)
}

/// See [`connect4`].
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    connect::on_connect(&ctx, connect::Family::V6)
}

// ───────────────────────── cgroup/sendmsg4, cgroup/sendmsg6 ─────────────────────────

/// Refuses datagrams from an application cgroup to another service's protected port
/// (or to a mesh destination: Connect carries TCP only), sent with an address on an
/// unconnected UDP socket. Connected UDP sockets were checked at `connect()`.
///
/// Fails closed: a datagram that cannot be checked is refused.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    connect::on_sendmsg(&ctx, connect::Family::V4)
}

/// See [`sendmsg4`].
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    connect::on_sendmsg(&ctx, connect::Family::V6)
}

// ───────────────────────────── sock_ops ─────────────────────────────

/// Re-keys a redirected socket's record by its local address once it is established,
/// and forgets the record when the socket closes.
///
/// Fails open: `sock_ops` cannot refuse a connection; a missing record makes the proxy
/// close the connection instead, which is the closed outcome.
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    sockops::try_sock_ops(&ctx);
    1
}

// ─────────────────────── cgroup/getpeername4, cgroup/getpeername6 ───────────────────────

/// Shows the application the address it dialed instead of the proxy's.
///
/// Fails open: without a record the real peer address is returned; no traffic depends on it.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    peername::restore(&ctx, connect::Family::V4);
    1
}

/// See [`getpeername4`].
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    peername::restore(&ctx, connect::Family::V6);
    1
}

// ───────────────────────────── cgroup_skb/ingress ─────────────────────────────

/// Drops what would open a connection from off the node to a protected (plaintext
/// service) port: TCP SYNs and anything for a listening socket, and UDP datagrams for
/// an unconnected socket. Replies to the node's own sockets pass, whatever their port.
///
/// Fails closed: a packet that cannot be parsed is dropped.
#[cgroup_skb(ingress)]
pub fn ingress(ctx: SkBuffContext) -> i32 {
    match ingress::try_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(()) => {
            count(Counter::IngressMalformed);
            ingress::DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
