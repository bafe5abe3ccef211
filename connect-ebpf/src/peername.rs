//! `cgroup/getpeername{4,6}`: an application sees the address it dialed, not the proxy's.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use connect_common::{Counter, addr};

use crate::{
    REDIRECT_BY_COOKIE,
    connect::{Family, write_ip6},
    count,
};

pub fn restore(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the helper is allowed in cgroup/getpeername* and takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: the value is copied out at once.
    let Some(record) = (unsafe { REDIRECT_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    match family {
        Family::V4 => {
            // An IPv4 socket only ever dialed an IPv4 address.
            let Some(ip4) = addr::as_v4(&record.orig_ip_be) else {
                return;
            };
            sa.user_ip4 = ip4;
        }
        Family::V6 => write_ip6(sa, record.orig_ip_be),
    }
    sa.user_port = u32::from(record.orig_port.to_be());
    count(Counter::PeerNameRestored);
}
