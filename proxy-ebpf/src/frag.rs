//! IP fragments: only a datagram's first fragment carries the ports, so it
//! is translated through conntrack as usual and leaves a record here; the
//! later fragments (same source, destination, IP id and protocol) get the
//! same address. The receiving host reassembles an intact datagram.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{stat, FragmentKey, FragmentValue};

use crate::maps::{count, FRAGMENTS};
use crate::packet::{decrement_ttl, write_addresses, Packet as _};
use crate::parse::{mapped, unmapped, Flow, FragmentId, Ipv4, IP_DST_OFF, IP_SRC_OFF};

const OK: i32 = TC_ACT_OK as i32;

/// A datagram's identity, as every one of its fragments carries it.
#[inline(always)]
fn fragment_key(saddr: Ipv4, daddr: Ipv4, id: u16, proto: u8) -> FragmentKey {
    FragmentKey {
        saddr: mapped(saddr),
        daddr: mapped(daddr),
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
    let (Ok(saddr), Ok(daddr)) = (ctx.load::<Ipv4>(IP_SRC_OFF), ctx.load::<Ipv4>(IP_DST_OFF))
    else {
        return;
    };
    if saddr == flow.saddr && daddr == flow.daddr {
        return;
    }
    let key = fragment_key(flow.saddr, flow.daddr, flow.ip_id, flow.proto);
    let value = FragmentValue {
        saddr: mapped(saddr),
        daddr: mapped(daddr),
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
    let new_saddr = unmapped(&record.saddr);
    let new_daddr = unmapped(&record.daddr);
    if write_addresses(ctx, (id.saddr, id.daddr), (new_saddr, new_daddr)).is_none() {
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    count(stat::FRAGMENT_NAT);
    // Both sides rewritten at the external hook: a source-NATed flow,
    // whose packets leave by their route (its source is now this node's
    // address, which the stack would drop as a martian).
    if route_out && new_saddr != id.saddr && new_daddr != id.daddr {
        let Some(route) = ctx.route(new_daddr) else {
            count(stat::NO_ROUTE);
            return aya_ebpf::bindings::TC_ACT_SHOT as i32;
        };
        if !decrement_ttl(ctx) {
            count(stat::TTL_EXCEEDED);
            return aya_ebpf::bindings::TC_ACT_SHOT as i32;
        }
        count(stat::XDP_FORWARD);
        return ctx.forward(&route);
    }
    OK
}
