//! ICMP errors about a translated flow, in both directions: port
//! unreachable or fragmentation needed about client -> backend packets
//! (from the backend or a router) are translated back to client -> VIP, and
//! errors a client sends about a reply (VIP -> client) are translated to the
//! backend. A source-NATed flow's other end is translated too (the SNAT
//! address and port back to the client, or the client to them), and at the
//! external hook the error then leaves by its route, as the flow's packets
//! do. Each socket then learns of its error (PMTU discovery works).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    stat, ConntrackKey4, CT_DIR_REPLY, CT_FLAG_SNAT, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use crate::maps::{count, CONNTRACK};
use crate::packet::{decrement_ttl, Packet};
use crate::parse::{IP_CHECK_OFF, IP_DST_OFF, IP_SRC_OFF};

const OK: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Which end of the quoted packet is rewritten (offsets: address 12 + 4x,
/// port 20 + 2x from the quoted IP header).
const QUOTED_SOURCE: usize = 0;
const QUOTED_DESTINATION: usize = 1;

/// `external`: at the external hook, where a source-NATed flow's packets
/// leave by their route (the error's new source may be this node's own
/// address, which the stack would drop as a martian).
#[inline(never)]
pub fn error(ctx: &TcContext, l4_off: usize, external: bool) -> i32 {
    match translate(ctx, l4_off, external) {
        Ok(verdict) => verdict,
        Err(()) => SHOT,
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, l4_off: usize, external: bool) -> Result<i32, ()> {
    let Ok(icmp) = ctx.load::<[u8; 8]>(l4_off) else {
        return Ok(OK);
    };
    if !matches!(
        icmp[0],
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Ok(OK);
    }
    let inner = l4_off + 8;
    let Ok(ip) = ctx.load::<[u8; 24]>(inner) else {
        return Ok(OK);
    };
    // The quote must be a plain IPv4 header followed by TCP/UDP/SCTP ports.
    if ip[0] != 0x45 || !matches!(ip[9], PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        return Ok(OK);
    }
    let inner_src = [ip[12], ip[13], ip[14], ip[15]];
    let inner_dst = [ip[16], ip[17], ip[18], ip[19]];
    let inner_sport = u16::from_be_bytes([ip[20], ip[21]]);
    let inner_dport = u16::from_be_bytes([ip[22], ip[23]]);
    // From the backend's side the quote went client -> backend: its reply
    // entry (keyed backend -> client) holds the VIP the client used; the
    // quoted destination and, when the backend itself answered, the outer
    // source become the VIP again. From the client's side the quote went
    // VIP -> client (a reply already translated back): its forward entry
    // (keyed client -> VIP) holds the backend; the quoted source and the
    // outer destination become the backend.
    let key = ConntrackKey4::new(inner_dst, inner_src, inner_dport, inner_sport, ip[9]);
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }) else {
        return Ok(OK);
    };
    let reply = entry.direction == CT_DIR_REPLY;
    let service_side = if reply {
        End {
            quoted: QUOTED_DESTINATION,
            outer: IP_SRC_OFF,
            old: inner_dst,
            old_port: inner_dport,
        }
    } else {
        End {
            quoted: QUOTED_SOURCE,
            outer: IP_DST_OFF,
            old: inner_src,
            old_port: inner_sport,
        }
    };
    rewrite(
        ctx,
        l4_off,
        &service_side,
        v4(&entry.nat_addr),
        entry.nat_port,
    )?;
    if entry.flags & CT_FLAG_SNAT != 0 {
        // The other end went through source NAT. From the backend's side
        // the quote came from the SNAT address and port, to which the
        // error is addressed: both become the client's. From the client's
        // side the quote went to the client, and so did, when the client
        // itself answered, the error: both become the SNAT address and port.
        let other_side = if reply {
            End {
                quoted: QUOTED_SOURCE,
                outer: IP_DST_OFF,
                old: inner_src,
                old_port: inner_sport,
            }
        } else {
            End {
                quoted: QUOTED_DESTINATION,
                outer: IP_SRC_OFF,
                old: inner_dst,
                old_port: inner_dport,
            }
        };
        rewrite(
            ctx,
            l4_off,
            &other_side,
            v4(&entry.other_addr),
            entry.other_port,
        )?;
        count(stat::ICMP_REV_NAT);
        if external {
            return Ok(route_out(ctx));
        }
        return Ok(OK);
    }
    count(stat::ICMP_REV_NAT);
    Ok(OK)
}

/// One end of the quoted packet being translated: which one, the outer
/// header's address on the same side, and the address and port it had.
struct End {
    quoted: usize,
    outer: usize,
    old: [u8; 4],
    old_port: u16,
}

#[inline(always)]
fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// Rewrites one end of the quote to `new`:`new_port` (the quoted IP
/// header's checksum, then the ICMP checksum over every quoted byte that
/// changed: ICMP has no pseudo-header), and the outer address on that side
/// when it is the quoted end's (the error came from, or goes to, that end).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    l4_off: usize,
    end: &End,
    new: [u8; 4],
    new_port: u16,
) -> Result<(), ()> {
    let inner = l4_off + 8;
    let icmp_check = l4_off + 2;
    let inner_check = inner + 10;
    let addr_off = inner + 12 + end.quoted * 4;
    let port_off = inner + 20 + end.quoted * 2;
    let old_addr = u32::from_ne_bytes(end.old) as u64;
    let new_addr = u32::from_ne_bytes(new) as u64;
    let old_check: [u8; 2] = ctx.load(inner_check).map_err(|_| ())?;
    ctx.l3_csum_replace(inner_check, old_addr, new_addr, 4)
        .map_err(|_| ())?;
    let new_check: [u8; 2] = ctx.load(inner_check).map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_check, old_addr, new_addr, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(
        icmp_check,
        u16::from_ne_bytes(old_check) as u64,
        u16::from_ne_bytes(new_check) as u64,
        2,
    )
    .map_err(|_| ())?;
    ctx.store(addr_off, &new, 0).map_err(|_| ())?;
    let from_port = u16::from_ne_bytes(end.old_port.to_be_bytes()) as u64;
    let to_port = u16::from_ne_bytes(new_port.to_be_bytes()) as u64;
    ctx.l4_csum_replace(icmp_check, from_port, to_port, 2)
        .map_err(|_| ())?;
    ctx.store(port_off, &new_port.to_be_bytes(), 0)
        .map_err(|_| ())?;

    let outer_addr: [u8; 4] = ctx.load(end.outer).map_err(|_| ())?;
    if outer_addr == end.old {
        ctx.l3_csum_replace(IP_CHECK_OFF, old_addr, new_addr, 4)
            .map_err(|_| ())?;
        ctx.store(end.outer, &new, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Sends the translated error out by the route to its new destination
/// (FIB lookup, TTL lowered, `bpf_redirect_neigh`), as the external hook
/// sends a source-NATed flow's packets.
#[inline(always)]
fn route_out(ctx: &TcContext) -> i32 {
    let Ok(dst) = ctx.load::<[u8; 4]>(IP_DST_OFF) else {
        return SHOT;
    };
    let Some(route) = ctx.route(u32::from_ne_bytes(dst)) else {
        count(stat::NO_ROUTE);
        return SHOT;
    };
    if !decrement_ttl(ctx) {
        count(stat::TTL_EXCEEDED);
        return SHOT;
    }
    count(stat::XDP_FORWARD);
    ctx.forward(route)
}
