//! The service path for traffic entering from pods: reverse NAT for
//! replies, conntrack for established flows, backend selection and DNAT for
//! new flows, reject when a Service has nothing to offer.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use proxy_common::{
    ipv4_mapped, stat, ConntrackKey, ConntrackValue, DatapathConfig, ServiceKey, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_STATE_CLOSED, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, PROTO_TCP,
    PROTO_UDP, SCOPE_INTERNAL, SVC_FLAG_DROP_WHEN_EMPTY,
};

use crate::{
    frag, icmp, lb,
    maps::{config, count, BACKENDS, CONNTRACK, SERVICES},
    parse::{
        parse, Flow, Skip, IP_CHECK_OFF, IP_DST_OFF, IP_SRC_OFF, TCP_FLAG_ACK, TCP_FLAG_FIN,
        TCP_FLAG_RST, TCP_FLAG_SYN,
    },
    reject,
};

const OK: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Result<i32, ()> {
    let mut flow = Flow::default();
    match parse(ctx, &mut flow) {
        Ok(()) => {}
        Err(Skip::NotService) => return Ok(OK),
        Err(Skip::Malformed) => {
            count(stat::MALFORMED);
            return Ok(OK);
        }
        Err(Skip::Fragment(id)) => return Ok(frag::later_fragment(ctx, &id)),
        Err(Skip::Icmp { l4_off }) => return Ok(icmp::error(ctx, l4_off)),
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let tracked = tracked(ctx, &flow, now);
    let verdict = if tracked != NOT_TRACKED {
        tracked as i32
    } else {
        match new_flow(ctx, &flow, now) {
            NewFlow::Verdict(verdict) => verdict,
            NewFlow::Reject => return Ok(reject::port_unreachable(ctx, &flow)),
        }
    };
    if flow.first_fragment && verdict == OK {
        frag::remember(ctx, &flow);
    }
    Ok(verdict)
}

/// `tracked` found no usable flow.
const NOT_TRACKED: i64 = -1;

/// A packet of a tracked flow: reverse NAT for replies, DNAT to the
/// recorded backend for the client's side. Returns the verdict, or
/// `NOT_TRACKED`. A separate BPF function, like `new_flow`, so each path's
/// keys live in its own stack frame.
#[inline(never)]
fn tracked(ctx: &TcContext, flow: &Flow, now: u64) -> i64 {
    let saddr = ipv4_mapped(flow.saddr);
    let daddr = ipv4_mapped(flow.daddr);

    let config = config();

    // A reply from a backend of a tracked flow: restore the service address.
    let reply_key = ct_key(flow, saddr, daddr, CT_DIR_REPLY);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&reply_key) {
        // SAFETY: a valid map value pointer for the duration of the program.
        let entry = unsafe { &mut *entry };
        if flow_expired(entry, flow, CT_DIR_FORWARD, config, now) {
            // Un-NATing it would leak the backend's address to the client,
            // which answers with a RST: drop, as kube-proxy drops INVALID.
            count(stat::CT_EXPIRED);
            return SHOT as i64;
        }
        entry.last_seen_ns = now;
        if flow.proto == PROTO_TCP {
            track_reply(entry, flow);
        }
        let (addr, port) = (v4(&entry.nat_addr), entry.nat_port);
        count(stat::REV_NAT);
        return rewrite(ctx, flow, Side::Source, addr, port) as i64;
    }

    // An established flow keeps its backend, even one that left the Service
    // while it still runs (drain). A new TCP connection (SYN) and every UDP
    // datagram re-check that the backend is still programmed, so a reused
    // source port never lands on a removed endpoint and UDP clients with a
    // fixed source port move on when their backend goes away.
    let fwd_key = ct_key(flow, saddr, daddr, CT_DIR_FORWARD);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&fwd_key) {
        let entry = unsafe { &mut *entry };
        let usable = if flow_expired(entry, flow, CT_DIR_REPLY, config, now) {
            count(stat::CT_EXPIRED);
            false
        } else if flow.proto == PROTO_TCP {
            // A SYN on a closing or closed flow is a new connection reusing
            // the port: pick again. Otherwise (a retransmission, a late
            // duplicate) it stays with its backend while that still exists.
            !flow.is_syn() || (entry.state <= CT_STATE_ESTABLISHED && backend_matches(entry))
        } else {
            backend_matches(entry)
        };
        if usable {
            entry.last_seen_ns = now;
            if flow.proto == PROTO_TCP {
                track_forward(entry, flow);
            }
            let (addr, port) = (v4(&entry.nat_addr), entry.nat_port);
            count(stat::DNAT);
            return rewrite(ctx, flow, Side::Destination, addr, port) as i64;
        }
    }

    NOT_TRACKED
}

enum NewFlow {
    Verdict(i32),
    Reject,
}

/// A packet with no tracked flow: look the frontend up, pick a backend,
/// record the flow both ways, DNAT. A separate BPF function so that its
/// keys and values do not add to the established-flow path's stack frame
/// (the reject path's buffers get their own frame too, called from `handle`).
#[inline(never)]
fn new_flow(ctx: &TcContext, flow: &Flow, now: u64) -> NewFlow {
    let saddr = ipv4_mapped(flow.saddr);
    let daddr = ipv4_mapped(flow.daddr);
    let frontend_key = ServiceKey::new(daddr, flow.dport, flow.proto, SCOPE_INTERNAL, 0);
    let frontend = match unsafe { SERVICES.get(&frontend_key) } {
        Some(frontend) => frontend,
        None => {
            if unsafe { SERVICES.get(ServiceKey::vip_marker(daddr)) }.is_some() {
                count(stat::REJECT_UNKNOWN_PORT);
                return NewFlow::Reject;
            }
            return NewFlow::Verdict(OK);
        }
    };
    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count(stat::DROP_NO_LOCAL_ENDPOINTS);
            return NewFlow::Verdict(SHOT);
        }
        count(stat::REJECT_NO_ENDPOINTS);
        return NewFlow::Reject;
    }
    // Only a SYN opens a TCP flow; anything else without a tracked flow
    // would reach a random backend mid-stream.
    if flow.proto == PROTO_TCP && !flow.is_syn() {
        count(stat::INVALID);
        return NewFlow::Verdict(SHOT);
    }

    let Some(backend_id) = lb::select(flow, &frontend_key, frontend, &saddr, now) else {
        count(stat::MISSING_BACKEND);
        return NewFlow::Verdict(SHOT);
    };
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }) else {
        count(stat::MISSING_BACKEND);
        return NewFlow::Verdict(SHOT);
    };

    // One key and one value, rewritten in place for the reply direction:
    // this function's stack frame stays small.
    let mut key = ct_key(flow, saddr, daddr, CT_DIR_FORWARD);
    let mut value = ConntrackValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        state: CT_STATE_NEW,
        rev_nat_id: frontend.rev_nat_id,
        backend_id,
        last_seen_ns: now,
        ..ConntrackValue::default()
    };
    let mut inserted = CONNTRACK.insert(&key, &value, 0).is_ok();
    key.saddr = backend.addr;
    key.daddr = saddr;
    key.sport = backend.port;
    key.dport = flow.sport;
    key.direction = CT_DIR_REPLY;
    value.nat_addr = daddr;
    value.nat_port = flow.dport;
    inserted = inserted && CONNTRACK.insert(&key, &value, 0).is_ok();
    if inserted {
        lb::flow_opened(backend_id);
    }
    count(if inserted {
        stat::CT_CREATED
    } else {
        stat::CT_INSERT_FAILED
    });
    count(stat::DNAT);
    let (addr, port) = (v4(&backend.addr), backend.port);
    NewFlow::Verdict(rewrite(ctx, flow, Side::Destination, addr, port))
}

#[inline(always)]
fn expired(entry: &ConntrackValue, config: &DatapathConfig, proto: u8, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) > config.timeout_ns(proto, entry.state)
}

/// TCP state from the client's side: FIN starts closing, RST closes.
#[inline(always)]
fn track_forward(entry: &mut ConntrackValue, flow: &Flow) {
    if let Some(state) = closing_state(entry.state, flow.tcp_flags) {
        if entry.state < CT_STATE_CLOSING {
            lb::flow_closed(entry.backend_id);
        }
        entry.state = state;
        set_peer_state(entry, flow, CT_DIR_REPLY, state);
    }
}

/// TCP state from the backend's side: its SYN-ACK establishes the flow.
#[inline(always)]
fn track_reply(entry: &mut ConntrackValue, flow: &Flow) {
    let state = match closing_state(entry.state, flow.tcp_flags) {
        Some(state) => state,
        None if entry.state == CT_STATE_NEW
            && flow.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK =>
        {
            CT_STATE_ESTABLISHED
        }
        None => return,
    };
    if entry.state < CT_STATE_CLOSING && state >= CT_STATE_CLOSING {
        lb::flow_closed(entry.backend_id);
    }
    entry.state = state;
    set_peer_state(entry, flow, CT_DIR_FORWARD, state);
}

#[inline(always)]
fn closing_state(current: u8, flags: u8) -> Option<u8> {
    if flags & TCP_FLAG_RST != 0 {
        Some(CT_STATE_CLOSED)
    } else if flags & TCP_FLAG_FIN != 0 && current != CT_STATE_CLOSED {
        Some(CT_STATE_CLOSING)
    } else {
        None
    }
}

/// Keeps the other direction's entry in the same state (state changes are
/// rare: SYN-ACK, FIN, RST), so both expire together.
#[inline(always)]
fn set_peer_state(entry: &ConntrackValue, flow: &Flow, peer_direction: u8, state: u8) {
    if let Some(peer) = peer_entry(entry, flow, peer_direction) {
        // SAFETY: a valid map value pointer for the duration of the program.
        unsafe { (*peer).state = state };
    }
}

/// The other direction's entry of the flow `entry` belongs to.
#[inline(always)]
fn peer_entry(
    entry: &ConntrackValue,
    flow: &Flow,
    peer_direction: u8,
) -> Option<*mut ConntrackValue> {
    // The peer entry is keyed by the other side's view of the tuple.
    let (saddr, daddr, sport, dport) = if peer_direction == CT_DIR_REPLY {
        (
            entry.nat_addr,
            ipv4_mapped(flow.saddr),
            entry.nat_port,
            flow.sport,
        )
    } else {
        (
            ipv4_mapped(flow.daddr),
            entry.nat_addr,
            flow.dport,
            entry.nat_port,
        )
    };
    let key = ConntrackKey {
        saddr,
        daddr,
        sport,
        dport,
        proto: flow.proto,
        direction: peer_direction,
        _pad: [0; 2],
    };
    CONNTRACK.get_ptr_mut(&key)
}

/// A flow is idle only when both directions are: a one-way stream (say,
/// UDP logs) keeps its reply entry usable. The peer is only consulted on
/// the rare path where this entry alone looks expired.
#[inline(always)]
fn flow_expired(
    entry: &ConntrackValue,
    flow: &Flow,
    peer_direction: u8,
    config: &DatapathConfig,
    now: u64,
) -> bool {
    if !expired(entry, config, flow.proto, now) {
        return false;
    }
    match peer_entry(entry, flow, peer_direction) {
        // SAFETY: a valid map value pointer for the duration of the program.
        Some(peer) => expired(unsafe { &*peer }, config, flow.proto, now),
        None => true,
    }
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
