//! `cgroup/connect4`: sends TCP connections to mesh destinations to the outbound listener.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use connect_common::{Counter, Ipv4Key, PortKey, RedirectRecord};

use crate::{MESH_DESTINATIONS, PROTECTED_PORTS, REDIRECT_BY_COOKIE, config, count};

/// Verdicts of a `cgroup/connect4` program.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;

pub fn try_connect4(ctx: &SockAddrContext) -> Result<i32, ()> {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP || sa.type_ != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let Some(cfg) = config() else {
        count(Counter::NotConfigured);
        return Ok(ALLOW);
    };
    let ip_be = sa.user_ip4;
    // `user_port` holds the port in network order in its low 16 bits; it must be read
    // as a whole u32 (the verifier rejects narrower loads of it on older kernels).
    let port = u16::from_be(sa.user_port as u16);

    if !is_mesh_destination(ip_be, port) {
        return Ok(ALLOW);
    }

    // SAFETY: both helpers are allowed in cgroup/connect4 and take the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let record = RedirectRecord {
        cgroup_id,
        orig_ip_be: ip_be,
        orig_port: port,
        _pad: 0,
    };
    if REDIRECT_BY_COOKIE.insert(cookie, record, 0).is_err() {
        count(Counter::RedirectRecordFull);
        return Err(());
    }

    sa.user_ip4 = cfg.proxy_ip_be;
    sa.user_port = u32::from(cfg.proxy_port.to_be());
    count(Counter::Redirected);
    if cfg.debug != 0 {
        debug!(
            ctx,
            "redirect cookie={} cgroup={} dst={:i}:{}",
            cookie,
            cgroup_id,
            u32::from_be(ip_be),
            port
        );
    }
    Ok(ALLOW)
}

/// A registered instance `IP:port`, a virtual IP (any port), or a protected port on a
/// loopback address (so co-located applications cannot bypass intentions).
#[inline(always)]
fn is_mesh_destination(ip_be: u32, port: u16) -> bool {
    // SAFETY: values are copied out immediately; the map is not modified through them.
    unsafe {
        if MESH_DESTINATIONS.get(Ipv4Key::new(ip_be, port)).is_some()
            || MESH_DESTINATIONS.get(Ipv4Key::new(ip_be, 0)).is_some()
        {
            return true;
        }
        if is_loopback(ip_be)
            && let Some(p) = PROTECTED_PORTS.get(PortKey::new(port))
        {
            return p.redirect_loopback != 0;
        }
    }
    false
}

/// 127.0.0.0/8: the first octet is the lowest byte of the network-order value as loaded.
#[inline(always)]
pub fn is_loopback(ip_be: u32) -> bool {
    u32::from_be(ip_be) >> 24 == 127
}
