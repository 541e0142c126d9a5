//! IP fragments: only a datagram's first fragment carries the ports, so it
//! is translated through conntrack as usual and leaves a record here; the
//! later fragments (same source, destination, IP id and protocol) get the
//! same address. The receiving host reassembles an intact datagram.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext, EbpfContext as _};
use proxy_common::{ipv4_mapped, stat, FragmentKey, FragmentValue};

use crate::maps::{count, FRAGMENTS};
use crate::packet::{fib_lookup, Packet as _};
use crate::parse::{Flow, FragmentId, IP_CHECK_OFF, IP_DST_OFF, IP_SRC_OFF};

const OK: i32 = TC_ACT_OK as i32;

/// A datagram's identity, as every one of its fragments carries it.
#[inline(always)]
fn fragment_key(saddr: [u8; 4], daddr: [u8; 4], id: u16, proto: u8) -> FragmentKey {
    FragmentKey {
        saddr: ipv4_mapped(saddr),
        daddr: ipv4_mapped(daddr),
        id,
        proto,
        _pad: [0; 5],
    }
}

/// After a first fragment was translated: record how, keyed by the
/// datagram's original identity (what its later fragments carry). Both
/// sides are recorded: a source-NATed flow rewrites both.
#[inline(never)]
pub fn remember(ctx: &TcContext, flow: &Flow) {
    let Ok(addrs) = ctx.load::<[u8; 8]>(IP_SRC_OFF) else {
        return;
    };
    let saddr = [addrs[0], addrs[1], addrs[2], addrs[3]];
    let daddr = [addrs[4], addrs[5], addrs[6], addrs[7]];
    if saddr == flow.saddr && daddr == flow.daddr {
        return;
    }
    let key = fragment_key(flow.saddr, flow.daddr, flow.ip_id, flow.proto);
    let value = FragmentValue {
        saddr: ipv4_mapped(saddr),
        daddr: ipv4_mapped(daddr),
    };
    let _ = FRAGMENTS.insert(&key, &value, 0);
}

/// A later fragment: rewrite its addresses as the first fragment's were.
/// Without a record (not ours, or the first fragment was lost or came
/// later) it passes untouched.
#[inline(never)]
pub fn later_fragment(ctx: &TcContext, id: &FragmentId, route_out: bool) -> i32 {
    let key = fragment_key(id.saddr, id.daddr, id.id, id.proto);
    let Some(record) = (unsafe { FRAGMENTS.get(&key) }) else {
        count(stat::FRAGMENT);
        return OK;
    };
    let new_saddr = v4(&record.saddr);
    let new_daddr = v4(&record.daddr);
    if !rewrite_address(ctx, IP_SRC_OFF, id.saddr, new_saddr)
        || !rewrite_address(ctx, IP_DST_OFF, id.daddr, new_daddr)
    {
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    count(stat::FRAGMENT_NAT);
    // Both sides rewritten at the external hook: a source-NATed flow,
    // whose packets leave by their route (its source is now this node's
    // address, which the stack would drop as a martian).
    if route_out && new_saddr != id.saddr && new_daddr != id.daddr {
        let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
        let Some(route) = fib_lookup(ctx.as_ptr(), new_daddr, ingress, true) else {
            count(stat::NO_ROUTE);
            return aya_ebpf::bindings::TC_ACT_SHOT as i32;
        };
        if !ctx.decrement_ttl() {
            count(stat::TTL_EXCEEDED);
            return aya_ebpf::bindings::TC_ACT_SHOT as i32;
        }
        count(stat::XDP_FORWARD);
        return ctx.forward(&route);
    }
    OK
}

#[inline(always)]
fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// One IPv4 address (a later fragment has no L4 header to fix).
#[inline(always)]
fn rewrite_address(ctx: &TcContext, offset: usize, old: [u8; 4], new: [u8; 4]) -> bool {
    if old == new {
        return true;
    }
    let from = u32::from_ne_bytes(old) as u64;
    let to = u32::from_ne_bytes(new) as u64;
    ctx.l3_csum_replace(IP_CHECK_OFF, from, to, 4).is_ok() && ctx.store(offset, &new, 0).is_ok()
}
