//! `cgroup_skb/ingress`: only the node itself may open a connection to, or send a
//! datagram to, a protected plaintext port.
//!
//! The packet starts at its network header. What passes: anything that is not TCP or
//! UDP, anything to an unprotected port, anything from loopback (the agent's inbound
//! proxy connects from 127.0.0.1), and replies to the node's own sockets (a TCP
//! segment that is not a SYN for a socket that is not listening; a datagram for a
//! connected UDP socket), so a local client whose ephemeral port happens to equal a
//! protected port keeps its replies. What is dropped: a TCP SYN or any segment for a
//! listening socket, and a datagram for an unconnected UDP socket.

use aya_ebpf::{bindings::bpf_sock, helpers::bpf_sk_fullsock, programs::SkBuffContext};
use aya_log_ebpf::debug;
use connect_common::{Counter, PortKey, addr};

use crate::{PROTECTED_PORTS, config, count};

/// Verdicts of a `cgroup_skb` program.
pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

/// `skb->protocol` values, network order as loaded on a little-endian host.
const ETH_P_IP_BE: u32 = 0x0008;
const ETH_P_IPV6_BE: u32 = 0xDD86;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HDR_LEN: usize = 40;
/// IPv6 extension headers (hop-by-hop, routing, fragment, ESP, AH, destination options).
const IPV6_EXT_HEADERS: [u8; 6] = [0, 43, 44, 50, 51, 60];
/// TCP flag bits, in the flags byte (offset 13 of the TCP header).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// `sk_state` values (include/net/tcp_states.h); a connected UDP socket is ESTABLISHED.
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;

/// What the transport header says, once located.
struct Transport {
    proto: u8,
    /// Offset of the transport header from the network header.
    offset: usize,
    from_loopback: bool,
}

pub fn try_ingress(ctx: &SkBuffContext) -> Result<i32, ()> {
    let transport = match ctx.skb.protocol() {
        ETH_P_IP_BE => v4(ctx)?,
        ETH_P_IPV6_BE => match v6(ctx)? {
            Some(t) => t,
            None => {
                // The transport header, if any, sits behind extension headers; we
                // cannot tell its port cheaply, so such a packet may not reach a
                // socket in the application cgroup.
                count(Counter::IngressIpv6ExtDropped);
                return Ok(DROP);
            }
        },
        _ => return Ok(PASS),
    };
    if transport.proto != IPPROTO_TCP && transport.proto != IPPROTO_UDP {
        return Ok(PASS);
    }
    let dport_be: u16 = ctx.load(transport.offset + 2).map_err(|_| ())?;
    let port = u16::from_be(dport_be);
    // SAFETY: only tested for presence.
    let protected = unsafe { PROTECTED_PORTS.get(PortKey::new(port)) }.is_some();
    if !protected || transport.from_loopback {
        return Ok(PASS);
    }
    let state = receiver_state(ctx);
    let (opens, counter) = if transport.proto == IPPROTO_TCP {
        let flags: u8 = ctx.load(transport.offset + 13).map_err(|_| ())?;
        let syn = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
        // No full socket to look at: treat it as an opening (closed).
        let to_listener = matches!(state, None | Some(TCP_LISTEN));
        (syn || to_listener, Counter::IngressDropped)
    } else {
        (state != Some(TCP_ESTABLISHED), Counter::IngressUdpDropped)
    };
    if !opens {
        return Ok(PASS);
    }
    count(counter);
    if config().is_some_and(|c| c.debug != 0) {
        debug!(ctx, "dropped off-node packet to protected port {}", port);
    }
    Ok(DROP)
}

fn v4(ctx: &SkBuffContext) -> Result<Transport, ()> {
    let vihl: u8 = ctx.load(0).map_err(|_| ())?;
    let offset = usize::from(vihl & 0x0f) * 4;
    if offset < 20 {
        return Err(());
    }
    let proto: u8 = ctx.load(9).map_err(|_| ())?;
    let src: u32 = ctx.load(12).map_err(|_| ())?;
    Ok(Transport {
        proto,
        offset,
        from_loopback: addr::is_loopback(&addr::mapped(src)),
    })
}

/// `None` when extension headers hide the transport header.
fn v6(ctx: &SkBuffContext) -> Result<Option<Transport>, ()> {
    let next: u8 = ctx.load(6).map_err(|_| ())?;
    if IPV6_EXT_HEADERS.contains(&next) {
        return Ok(None);
    }
    // Source address: bytes 8..24. Loopback is ::1 or the v4-mapped ::ffff:127.x.y.z.
    let src: [u32; 4] = [
        ctx.load(8).map_err(|_| ())?,
        ctx.load(12).map_err(|_| ())?,
        ctx.load(16).map_err(|_| ())?,
        ctx.load(20).map_err(|_| ())?,
    ];
    Ok(Some(Transport {
        proto: next,
        offset: IPV6_HDR_LEN,
        from_loopback: addr::is_loopback(&src),
    }))
}

/// The state of the socket the packet is for (`None` if it is not a full socket).
#[inline(always)]
fn receiver_state(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: `skb` is the kernel's context; `sk` may be null and is checked.
    let sk: *mut bpf_sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper takes the context's socket pointer and returns a full
    // socket or null, which is checked before the read.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    // SAFETY: non-null full socket from the helper.
    Some(unsafe { (*full).state })
}
