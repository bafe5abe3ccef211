//! `cgroup_skb/ingress`: only the node itself may reach a protected plaintext port.
//!
//! The packet starts at its network header. Anything that is not TCP to a protected
//! port passes; TCP to a protected port passes only from loopback (the agent's
//! inbound proxy connects from 127.0.0.1).

use aya_ebpf::programs::SkBuffContext;
use aya_log_ebpf::debug;
use connect_common::{Counter, PortKey};

use crate::{PROTECTED_PORTS, config, count};

/// Verdicts of a `cgroup_skb` program.
pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

/// `skb->protocol` values, network order as loaded on a little-endian host.
const ETH_P_IP_BE: u32 = 0x0008;
const ETH_P_IPV6_BE: u32 = 0xDD86;
const IPPROTO_TCP: u8 = 6;
const IPV6_HDR_LEN: usize = 40;
/// IPv6 extension headers (hop-by-hop, routing, fragment, ESP, AH, destination options).
const IPV6_EXT_HEADERS: [u8; 6] = [0, 43, 44, 50, 51, 60];

pub fn try_ingress(ctx: &SkBuffContext) -> Result<i32, ()> {
    match ctx.skb.protocol() {
        ETH_P_IP_BE => ingress_v4(ctx),
        ETH_P_IPV6_BE => ingress_v6(ctx),
        _ => Ok(PASS),
    }
}

fn ingress_v4(ctx: &SkBuffContext) -> Result<i32, ()> {
    let vihl: u8 = ctx.load(0).map_err(|_| ())?;
    let hdr_len = usize::from(vihl & 0x0f) * 4;
    if hdr_len < 20 {
        return Err(());
    }
    let proto: u8 = ctx.load(9).map_err(|_| ())?;
    if proto != IPPROTO_TCP {
        return Ok(PASS);
    }
    let src_first_octet: u8 = ctx.load(12).map_err(|_| ())?;
    let dport_be: u16 = ctx.load(hdr_len + 2).map_err(|_| ())?;
    let port = u16::from_be(dport_be);
    verdict(ctx, port, src_first_octet == 127)
}

fn ingress_v6(ctx: &SkBuffContext) -> Result<i32, ()> {
    let next: u8 = ctx.load(6).map_err(|_| ())?;
    if next != IPPROTO_TCP {
        if IPV6_EXT_HEADERS.contains(&next) {
            // The TCP header, if any, is further in; we cannot tell its port cheaply,
            // so such a packet may not reach a socket in the application cgroup.
            count(Counter::IngressIpv6ExtDropped);
            return Ok(DROP);
        }
        return Ok(PASS);
    }
    // Source address: bytes 8..24. Loopback is ::1 or the v4-mapped ::ffff:127.x.y.z.
    let hi: u64 = ctx.load(8).map_err(|_| ())?;
    let lo_hi: u32 = ctx.load(16).map_err(|_| ())?;
    let lo_lo: u32 = ctx.load(20).map_err(|_| ())?;
    let loopback = hi == 0
        && ((lo_hi == 0 && u32::from_be(lo_lo) == 1)
            || (u32::from_be(lo_hi) == 0x0000_ffff && u32::from_be(lo_lo) >> 24 == 127));
    let dport_be: u16 = ctx.load(IPV6_HDR_LEN + 2).map_err(|_| ())?;
    verdict(ctx, u16::from_be(dport_be), loopback)
}

#[inline(always)]
fn verdict(ctx: &SkBuffContext, port: u16, from_loopback: bool) -> Result<i32, ()> {
    // SAFETY: only tested for presence.
    let protected = unsafe { PROTECTED_PORTS.get(PortKey::new(port)) }.is_some();
    if !protected || from_loopback {
        return Ok(PASS);
    }
    count(Counter::IngressDropped);
    if config().is_some_and(|c| c.debug != 0) {
        debug!(ctx, "dropped off-node packet to protected port {}", port);
    }
    Ok(DROP)
}
