//! `sock_ops`: re-keys redirect records by the client's local address once established,
//! so the proxy can find them from `accept()`'s peer address.

use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockOpsContext};
use connect_common::{Counter, SockKey};

use crate::{REDIRECT_BY_COOKIE, REDIRECT_BY_PORT, count};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const BPF_TCP_CLOSE: u32 = 7;

pub fn try_sock_ops(ctx: &SockOpsContext) {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(ctx),
        _ => {}
    }
}

fn on_established(ctx: &SockOpsContext) {
    // SAFETY: the helper is allowed in sock_ops and takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: the value is copied out at once.
    let Some(mut record) = (unsafe { REDIRECT_BY_COOKIE.get(cookie) }).copied() else {
        // Not redirected: most connections of an application are not mesh traffic.
        return;
    };
    record.established = 1;
    // The cookie record now lives as long as the socket; mark it so the agent's
    // sweep leaves it alone (it only removes records of connects that never
    // completed).
    if REDIRECT_BY_COOKIE.insert(cookie, record, 0).is_err() {
        count(Counter::SockOpsUpdateFailed);
    }
    // `local_port` is in host order, the addresses in network order. A redirected
    // IPv6 socket runs as v4-mapped IPv4, so its `local_ip6` is the key the agent
    // builds from the listener's IPv4 peer address.
    let port = ctx.local_port() as u16;
    let key = if ctx.family() == AF_INET {
        SockKey::v4(ctx.local_ip4(), port)
    } else {
        SockKey::v6(local_ip6(ctx), port)
    };
    if REDIRECT_BY_PORT.insert(key, record, 0).is_err() {
        count(Counter::SockOpsUpdateFailed);
        return;
    }
    // Ask for state changes so the cookie record goes when the socket closes.
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG).is_err() {
        count(Counter::SockOpsUpdateFailed);
    }
}

fn on_close(ctx: &SockOpsContext) {
    // SAFETY: the helper is allowed in sock_ops and takes the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // A missing entry is fine: LRU may have evicted it.
    let _ = REDIRECT_BY_COOKIE.remove(cookie);
}

/// `local_ip6`, one 32-bit load per word straight off the context pointer (the
/// verifier refuses loads through a context pointer with an offset added, which a
/// copy of the whole array compiles to).
#[inline(always)]
fn local_ip6(ctx: &SockOpsContext) -> [u32; 4] {
    // SAFETY: `ops` is the kernel's valid `bpf_sock_ops`; each read is one field word.
    unsafe {
        [
            read_volatile(addr_of!((*ctx.ops).local_ip6[0])),
            read_volatile(addr_of!((*ctx.ops).local_ip6[1])),
            read_volatile(addr_of!((*ctx.ops).local_ip6[2])),
            read_volatile(addr_of!((*ctx.ops).local_ip6[3])),
        ]
    }
}
