//! Turns a packet to a Service with no usable endpoint into an ICMP port
//! unreachable sent back out of the interface it came in on. A TCP client
//! sees ECONNREFUSED at once, a UDP client an ICMP error, as with
//! kube-proxy's REJECT rules.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{stat, PROTO_TCP};

use crate::{csum::checksum, maps::count, parse::Flow, parse::ETH_LEN};

const IPV4_LEN: usize = 20;
const ICMP_LEN: usize = 8;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

// A separate BPF function: its buffers get their own stack frame instead of
// adding to the hot path's.
#[inline(never)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow) -> i32 {
    // The quote is the offending IP header plus the whole base L4 header
    // (RFC 792 asks for at least 8 bytes; RFC 1812 allows more). Cutting
    // inside the L4 header is refused for CHECKSUM_PARTIAL skbs (locally
    // generated traffic on veth), so TCP quotes its 20 bytes.
    let built = if flow.proto == PROTO_TCP {
        build::<
            { IPV4_LEN + TCP_LEN },
            { ETH_LEN + IPV4_LEN + TCP_LEN },
            { ICMP_LEN + IPV4_LEN + TCP_LEN },
            { ETH_LEN + IPV4_LEN + ICMP_LEN + IPV4_LEN + TCP_LEN },
        >(ctx, flow)
    } else {
        build::<
            { IPV4_LEN + UDP_LEN },
            { ETH_LEN + IPV4_LEN + UDP_LEN },
            { ICMP_LEN + IPV4_LEN + UDP_LEN },
            { ETH_LEN + IPV4_LEN + ICMP_LEN + IPV4_LEN + UDP_LEN },
        >(ctx, flow)
    };
    match built {
        Ok(verdict) => verdict,
        Err(()) => {
            count(stat::REJECT_FAILED);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn build<const QUOTE: usize, const ORIG: usize, const ICMP_MSG: usize, const OUT: usize>(
    ctx: &TcContext,
    flow: &Flow,
) -> Result<i32, ()> {
    // Quoting IP options is not worth the complexity: drop those instead.
    if flow.ip_hdr_len as usize != IPV4_LEN {
        return Err(());
    }
    // Everything is built in `out`; checksums are summed over its parts,
    // so the frame is the only large buffer on this function's stack.
    let mut out = [0u8; OUT];
    let ip = ETH_LEN;
    let icmp = ip + IPV4_LEN;
    let quote = icmp + ICMP_LEN;
    // The quote: the original IP header and the start of its L4 header.
    let quoted: [u8; QUOTE] = ctx.load(ETH_LEN).map_err(|_| ())?;
    out[quote..].copy_from_slice(&quoted);
    // Ethernet: back to where it came from.
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    out[0..6].copy_from_slice(&macs[6..12]);
    out[6..12].copy_from_slice(&macs[0..6]);
    out[12] = 0x08;
    out[13] = 0x00;
    // IPv4, from the address the client wrote to (the VIP).
    out[ip] = 0x45;
    let total = (IPV4_LEN + ICMP_MSG) as u16;
    out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    out[ip + 8] = 64;
    out[ip + 9] = IPPROTO_ICMP;
    out[ip + 12..ip + 16].copy_from_slice(&flow.daddr.to_ne_bytes());
    out[ip + 16..ip + 20].copy_from_slice(&flow.saddr.to_ne_bytes());
    let ip_check = checksum(&out[ip..icmp]);
    out[ip + 10..ip + 12].copy_from_slice(&ip_check.to_be_bytes());
    // ICMP destination unreachable / port unreachable + the quote.
    out[icmp] = ICMP_DEST_UNREACH;
    out[icmp + 1] = ICMP_PORT_UNREACH;
    let icmp_check = checksum(&out[icmp..]);
    out[icmp + 2..icmp + 4].copy_from_slice(&icmp_check.to_be_bytes());

    // Reshape the skb to the new length, then write the whole frame.
    // SAFETY: helper calls on our own skb.
    let skb = ctx.skb.skb;
    if unsafe { bpf_skb_change_tail(skb.cast(), ORIG as u32, 0) } != 0 {
        return Err(());
    }
    let grow = (IPV4_LEN + ICMP_LEN) as i32;
    ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, 0).map_err(|_| ())?;
    ctx.store(0, &out, 0).map_err(|_| ())?;
    let ifindex = unsafe { (*skb).ifindex };
    let verdict = unsafe { bpf_redirect(ifindex, 0) };
    if verdict != TC_ACT_REDIRECT as i64 {
        return Err(());
    }
    Ok(verdict as i32)
}
