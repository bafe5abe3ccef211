//! `cgroup/connect{4,6}` and `cgroup/sendmsg{4,6}`: TCP connections to mesh
//! destinations go to the outbound listener; UDP to another service's protected port
//! (or to a mesh destination, since Connect carries TCP only) is refused.
//!
//! Both families share one body. An IPv4 destination is turned into its v4-mapped
//! form first, so a v4-mapped address on an IPv6 socket is looked up, recorded and
//! judged exactly as its IPv4 form.

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use connect_common::{Counter, PortKey, RedirectRecord, SockKey, addr};

use crate::{MESH_DESTINATIONS, PROTECTED_PORTS, REDIRECT_BY_COOKIE, config, count};

/// Verdicts of a `cgroup_sock_addr` program.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// Which hook a program is: which address field of `bpf_sock_addr` holds the destination.
#[derive(Clone, Copy)]
pub enum Family {
    V4,
    V6,
}

pub fn on_connect(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (ip, port) = destination(sa, family);
    if sa.type_ == SOCK_STREAM && sa.protocol == IPPROTO_TCP {
        match redirect_tcp(ctx, sa, family, ip, port) {
            Ok(verdict) => verdict,
            Err(()) => REJECT,
        }
    } else if sa.type_ == SOCK_DGRAM && sa.protocol == IPPROTO_UDP {
        udp_verdict(ip, port)
    } else {
        ALLOW
    }
}

pub fn on_sendmsg(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: as in `on_connect`.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_DGRAM {
        return ALLOW;
    }
    let (ip, port) = destination(sa, family);
    udp_verdict(ip, port)
}

/// The destination in the shared form: address words (IPv4 v4-mapped) and host-order port.
#[inline(always)]
fn destination(sa: &bpf_sock_addr, family: Family) -> ([u32; 4], u16) {
    let ip = match family {
        Family::V4 => addr::mapped(sa.user_ip4),
        Family::V6 => read_ip6(sa),
    };
    // `user_port` holds the port in network order in its low 16 bits; it must be read
    // as a whole u32 (the verifier rejects narrower loads of it on older kernels).
    (ip, u16::from_be(sa.user_port as u16))
}

fn redirect_tcp(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    family: Family,
    ip: [u32; 4],
    port: u16,
) -> Result<i32, ()> {
    let Some(cfg) = config() else {
        count(Counter::NotConfigured);
        return Ok(ALLOW);
    };
    if !is_mesh_destination(&ip, port) {
        return Ok(upstream_verdict(&ip, port));
    }

    // SAFETY: both helpers are allowed in cgroup_sock_addr programs and take the
    // context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: no arguments; allowed in every program type.
    let created_ns = unsafe { bpf_ktime_get_ns() };
    let record = RedirectRecord {
        cgroup_id,
        created_ns,
        orig_ip_be: addr::peer_form(ip),
        orig_port: port,
        established: 0,
        _pad: 0,
        _pad2: 0,
    };
    if REDIRECT_BY_COOKIE.insert(cookie, record, 0).is_err() {
        count(Counter::RedirectRecordFull);
        return Err(());
    }

    // An IPv6 socket goes to the IPv4 listener through its v4-mapped address: the
    // kernel then runs the connection as IPv4 (an IPV6_V6ONLY socket cannot, and its
    // connect() fails: closed, never direct).
    match family {
        Family::V4 => sa.user_ip4 = cfg.proxy_ip_be,
        Family::V6 => write_ip6(sa, addr::mapped(cfg.proxy_ip_be)),
    }
    sa.user_port = u32::from(cfg.proxy_port.to_be());
    count(Counter::Redirected);
    if cfg.debug != 0 {
        debug!(
            ctx,
            "redirect cookie={} cgroup={} port={}", cookie, cgroup_id, port
        );
    }
    Ok(ALLOW)
}

/// A registered instance `IP:port`, a virtual IP (any port), or a protected port on a
/// host-local address (so co-located applications cannot bypass intentions).
#[inline(always)]
fn is_mesh_destination(ip: &[u32; 4], port: u16) -> bool {
    if is_mesh_address(ip, port) {
        return true;
    }
    // SAFETY: the value is copied out at once.
    addr::is_host_local(ip)
        && unsafe { PROTECTED_PORTS.get(PortKey::new(port)) }
            .is_some_and(|p| p.redirect_loopback != 0)
}

/// A TCP connection to an upstream listener on this host: only from the cgroup of
/// the service it speaks for. Anything else is not ours to judge.
#[inline(always)]
fn upstream_verdict(ip: &[u32; 4], port: u16) -> i32 {
    if !addr::is_host_local(ip) {
        return ALLOW;
    }
    // SAFETY: the value is copied out at once.
    let Some(guard) = (unsafe { PROTECTED_PORTS.get(PortKey::new(port)) }).copied() else {
        return ALLOW;
    };
    if guard.owner_only == 0 {
        return ALLOW;
    }
    // SAFETY: no arguments; allowed in cgroup_sock_addr programs.
    let caller = unsafe { bpf_get_current_cgroup_id() };
    if guard.owner_cgroup_id != 0 && guard.owner_cgroup_id == caller {
        return ALLOW;
    }
    count(Counter::UpstreamRefused);
    REJECT
}

#[inline(always)]
fn is_mesh_address(ip: &[u32; 4], port: u16) -> bool {
    // SAFETY: only tested for presence.
    unsafe {
        MESH_DESTINATIONS.get(SockKey::v6(*ip, port)).is_some()
            || MESH_DESTINATIONS.get(SockKey::v6(*ip, 0)).is_some()
    }
}

/// UDP from an application cgroup: a protected port on this host only from the
/// cgroup of the service that owns it; a mesh destination never (Connect carries
/// TCP only, and the destination's node drops it anyway); anything else is not ours.
#[inline(always)]
fn udp_verdict(ip: [u32; 4], port: u16) -> i32 {
    let mesh = is_mesh_address(&ip, port);
    if !mesh && !addr::is_host_local(&ip) {
        return ALLOW;
    }
    // SAFETY: the value is copied out at once.
    let owner = unsafe { PROTECTED_PORTS.get(PortKey::new(port)) }.map(|p| p.owner_cgroup_id);
    let verdict = match owner {
        // SAFETY: no arguments; allowed in cgroup_sock_addr programs.
        Some(id) if id != 0 && id == unsafe { bpf_get_current_cgroup_id() } => ALLOW,
        Some(_) => REJECT,
        None if mesh => REJECT,
        None => ALLOW,
    };
    if verdict == REJECT {
        count(Counter::UdpRefused);
    }
    verdict
}

/// `user_ip6`, read one 32-bit word at a time straight off the context pointer (the
/// width the verifier accepts on every kernel we support; it also refuses loads
/// through a context pointer with an offset added).
#[inline(always)]
pub fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    // SAFETY: each read is one word of `user_ip6` in the kernel's context.
    unsafe {
        [
            read_volatile(addr_of!(sa.user_ip6[0])),
            read_volatile(addr_of!(sa.user_ip6[1])),
            read_volatile(addr_of!(sa.user_ip6[2])),
            read_volatile(addr_of!(sa.user_ip6[3])),
        ]
    }
}

/// Writes `user_ip6` one 32-bit word at a time.
#[inline(always)]
pub fn write_ip6(sa: &mut bpf_sock_addr, ip: [u32; 4]) {
    // SAFETY: as in `read_ip6`; the field is writable in connect6 and getpeername6.
    unsafe {
        write_volatile(addr_of_mut!(sa.user_ip6[0]), ip[0]);
        write_volatile(addr_of_mut!(sa.user_ip6[1]), ip[1]);
        write_volatile(addr_of_mut!(sa.user_ip6[2]), ip[2]);
        write_volatile(addr_of_mut!(sa.user_ip6[3]), ip[3]);
    }
}
