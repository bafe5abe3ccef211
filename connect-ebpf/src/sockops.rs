//! `sock_ops`: re-keys redirect records by the client's local address once established,
//! so the proxy can find them from `accept()`'s peer address.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockOpsContext};
use connect_common::{Counter, Ipv4Key};

use crate::{REDIRECT_BY_COOKIE, REDIRECT_BY_PORT, count};

const AF_INET: u32 = 2;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const BPF_TCP_CLOSE: u32 = 7;

pub fn try_sock_ops(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
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
    let Some(record) = (unsafe { REDIRECT_BY_COOKIE.get(cookie) }).copied() else {
        // Not redirected: most connections of an application are not mesh traffic.
        return;
    };
    // `local_port` is in host order; `local_ip4` in network order.
    let key = Ipv4Key::new(ctx.local_ip4(), ctx.local_port() as u16);
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
