//! ICMP errors about a translated flow (port unreachable from a backend,
//! fragmentation needed from a router on the path): the quoted packet went
//! client -> backend, but the client only knows client -> VIP. The quote
//! and, when the backend itself answered, the outer source are translated
//! back so the client's socket learns of the error (PMTU discovery works).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{ipv4_mapped, stat, ConntrackKey, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP};

use crate::maps::{count, CONNTRACK};
use crate::parse::{IP_CHECK_OFF, IP_SRC_OFF};

const OK: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

#[inline(never)]
pub fn error(ctx: &TcContext, l4_off: usize) -> i32 {
    match translate(ctx, l4_off) {
        Ok(verdict) => verdict,
        Err(()) => SHOT,
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, l4_off: usize) -> Result<i32, ()> {
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
    // The quote must be a plain IPv4 header followed by TCP/UDP ports.
    if ip[0] != 0x45 || (ip[9] != PROTO_TCP && ip[9] != PROTO_UDP) {
        return Ok(OK);
    }
    let inner_src = [ip[12], ip[13], ip[14], ip[15]];
    let inner_dst = [ip[16], ip[17], ip[18], ip[19]];
    let inner_sport = u16::from_be_bytes([ip[20], ip[21]]);
    let inner_dport = u16::from_be_bytes([ip[22], ip[23]]);
    // The quoted packet went client -> backend: its reply entry is keyed
    // backend -> client and holds the VIP and port the client used.
    let key = ConntrackKey {
        saddr: ipv4_mapped(inner_dst),
        daddr: ipv4_mapped(inner_src),
        sport: inner_dport,
        dport: inner_sport,
        proto: ip[9],
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let Some(entry) = (unsafe { CONNTRACK.get(&key) }) else {
        return Ok(OK);
    };
    let vip = [
        entry.nat_addr[12],
        entry.nat_addr[13],
        entry.nat_addr[14],
        entry.nat_addr[15],
    ];
    let vport = entry.nat_port;

    let icmp_check = l4_off + 2;
    let inner_check = inner + 10;
    let inner_dst_off = inner + 16;
    let inner_dport_off = inner + 22;
    let old_addr = u32::from_ne_bytes(inner_dst) as u64;
    let new_addr = u32::from_ne_bytes(vip) as u64;
    // The quoted IP header's checksum, then the ICMP checksum over every
    // quoted byte that changed (ICMP has no pseudo-header).
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
    ctx.store(inner_dst_off, &vip, 0).map_err(|_| ())?;
    let old_port = u16::from_ne_bytes(inner_dport.to_be_bytes()) as u64;
    let new_port = u16::from_ne_bytes(vport.to_be_bytes()) as u64;
    ctx.l4_csum_replace(icmp_check, old_port, new_port, 2)
        .map_err(|_| ())?;
    ctx.store(inner_dport_off, &vport.to_be_bytes(), 0)
        .map_err(|_| ())?;

    // Sent by the backend itself: it must come from the VIP.
    let outer_src: [u8; 4] = ctx.load(IP_SRC_OFF).map_err(|_| ())?;
    if outer_src == inner_dst {
        ctx.l3_csum_replace(IP_CHECK_OFF, old_addr, new_addr, 4)
            .map_err(|_| ())?;
        ctx.store(IP_SRC_OFF, &vip, 0).map_err(|_| ())?;
    }
    count(stat::ICMP_REV_NAT);
    Ok(OK)
}
