//! The service path for traffic entering from pods: reverse NAT for
//! replies, conntrack for established flows, backend selection and DNAT for
//! new flows, reject when a Service has nothing to offer.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use proxy_common::{
    ipv4_mapped, stat, ConntrackKey, ConntrackValue, ServiceKey, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_STATE_NEW, PROTO_UDP, SCOPE_EXTERNAL,
};

use crate::{
    maps::{count, BACKENDS, CONNTRACK, SERVICES},
    parse::{parse, Flow, Skip, IP_CHECK_OFF, IP_DST_OFF, IP_SRC_OFF},
    reject,
};

const OK: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Result<i32, ()> {
    let flow = match parse(ctx) {
        Ok(flow) => flow,
        Err(Skip::NotService) => return Ok(OK),
        Err(Skip::Malformed) => {
            count(stat::MALFORMED);
            return Ok(OK);
        }
        Err(Skip::Fragment) => {
            count(stat::FRAGMENT);
            return Ok(OK);
        }
    };
    let saddr = ipv4_mapped(flow.saddr);
    let daddr = ipv4_mapped(flow.daddr);
    let now = unsafe { bpf_ktime_get_ns() };

    // A reply from a backend of a tracked flow: restore the service address.
    let reply_key = ct_key(&flow, saddr, daddr, CT_DIR_REPLY);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&reply_key) {
        // SAFETY: a valid map value pointer for the duration of the program.
        let entry = unsafe { &mut *entry };
        entry.last_seen_ns = now;
        let (addr, port) = (v4(&entry.nat_addr), entry.nat_port);
        count(stat::REV_NAT);
        return Ok(rewrite(ctx, &flow, Side::Source, addr, port));
    }

    // An established flow keeps its backend, even one that left the Service
    // while it still runs. A new TCP connection (SYN) re-checks that the
    // backend is still programmed, so a reused source port never lands on a
    // removed endpoint.
    let fwd_key = ct_key(&flow, saddr, daddr, CT_DIR_FORWARD);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&fwd_key) {
        let entry = unsafe { &mut *entry };
        let still_valid = !flow.is_syn() || backend_matches(entry);
        if still_valid {
            entry.last_seen_ns = now;
            let (addr, port) = (v4(&entry.nat_addr), entry.nat_port);
            count(stat::DNAT);
            return Ok(rewrite(ctx, &flow, Side::Destination, addr, port));
        }
    }

    let frontend_key = ServiceKey::new(daddr, flow.dport, flow.proto, SCOPE_EXTERNAL, 0);
    let frontend = match unsafe { SERVICES.get(&frontend_key) } {
        Some(frontend) => *frontend,
        None => {
            if unsafe { SERVICES.get(ServiceKey::vip_marker(daddr)) }.is_some() {
                count(stat::REJECT_UNKNOWN_PORT);
                return Ok(reject::port_unreachable(ctx, &flow));
            }
            return Ok(OK);
        }
    };
    if frontend.count == 0 {
        count(stat::REJECT_NO_ENDPOINTS);
        return Ok(reject::port_unreachable(ctx, &flow));
    }

    let slot = 1 + (unsafe { bpf_get_prandom_u32() } % frontend.count as u32) as u16;
    let slot_key = ServiceKey {
        slot,
        ..frontend_key
    };
    let Some(backend_id) = (unsafe { SERVICES.get(&slot_key) }).map(|s| s.backend_id) else {
        count(stat::MISSING_BACKEND);
        return Ok(SHOT);
    };
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }).copied() else {
        count(stat::MISSING_BACKEND);
        return Ok(SHOT);
    };

    let forward = ConntrackValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        state: CT_STATE_NEW,
        rev_nat_id: frontend.rev_nat_id,
        backend_id,
        last_seen_ns: now,
        ..ConntrackValue::default()
    };
    let reply_key = ConntrackKey {
        saddr: backend.addr,
        daddr: saddr,
        sport: backend.port,
        dport: flow.sport,
        proto: flow.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let reply = ConntrackValue {
        nat_addr: daddr,
        nat_port: flow.dport,
        ..forward
    };
    if CONNTRACK.insert(&fwd_key, &forward, 0).is_err()
        || CONNTRACK.insert(&reply_key, &reply, 0).is_err()
    {
        count(stat::CT_INSERT_FAILED);
    } else {
        count(stat::CT_CREATED);
    }
    count(stat::DNAT);
    Ok(rewrite(
        ctx,
        &flow,
        Side::Destination,
        v4(&backend.addr),
        backend.port,
    ))
}

/// A tracked backend is still the one programmed under its id.
#[inline(always)]
fn backend_matches(entry: &ConntrackValue) -> bool {
    match unsafe { BACKENDS.get(entry.backend_id) } {
        Some(b) => b.addr == entry.nat_addr && b.port == entry.nat_port,
        None => false,
    }
}

#[inline(always)]
fn ct_key(flow: &Flow, saddr: [u8; 16], daddr: [u8; 16], direction: u8) -> ConntrackKey {
    ConntrackKey {
        saddr,
        daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

#[inline(always)]
fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Rewrites one side's address and port, keeping the IP and L4 checksums
/// right through the kernel's incremental helpers (which also handle
/// CHECKSUM_PARTIAL skbs from local sockets). Returns the verdict.
#[inline(always)]
fn rewrite(ctx: &TcContext, flow: &Flow, side: Side, addr: [u8; 4], port: u16) -> i32 {
    let (addr_off, old_addr, port_off, old_port) = match side {
        Side::Source => (IP_SRC_OFF, flow.saddr, flow.l4_off, flow.sport),
        Side::Destination => (IP_DST_OFF, flow.daddr, flow.l4_off + 2, flow.dport),
    };
    let check_off = flow.l4_check_off();
    // A zero UDP checksum means "none": leave it zero.
    let mangled = if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let from_addr = u32::from_ne_bytes(old_addr) as u64;
    let to_addr = u32::from_ne_bytes(addr) as u64;
    if from_addr != to_addr {
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
        if ctx
            .l4_csum_replace(check_off, from_addr, to_addr, pseudo)
            .is_err()
            || ctx
                .l3_csum_replace(IP_CHECK_OFF, from_addr, to_addr, 4)
                .is_err()
            || ctx.store(addr_off, &addr, 0).is_err()
        {
            return SHOT;
        }
    }
    let from_port = u16::from_ne_bytes(old_port.to_be_bytes()) as u64;
    let to_port = u16::from_ne_bytes(port.to_be_bytes()) as u64;
    if from_port != to_port {
        let port_bytes = port.to_be_bytes();
        if ctx
            .l4_csum_replace(check_off, from_port, to_port, mangled | 2)
            .is_err()
            || ctx.store(port_off, &port_bytes, 0).is_err()
        {
            return SHOT;
        }
    }
    OK
}
