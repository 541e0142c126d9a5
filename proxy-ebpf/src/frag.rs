//! IP fragments: only a datagram's first fragment carries the ports, so it
//! is translated through conntrack as usual and leaves a record here; the
//! later fragments (same source, destination, IP id and protocol) get the
//! same address. The receiving host reassembles an intact datagram.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{
    ipv4_mapped, stat, FragmentKey, FragmentValue, FRAG_REWRITE_DESTINATION, FRAG_REWRITE_SOURCE,
};

use crate::maps::{count, FRAGMENTS};
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
/// datagram's original identity (what its later fragments carry).
#[inline(never)]
pub fn remember(ctx: &TcContext, flow: &Flow) {
    let Ok(addrs) = ctx.load::<[u8; 8]>(IP_SRC_OFF) else {
        return;
    };
    let saddr = [addrs[0], addrs[1], addrs[2], addrs[3]];
    let daddr = [addrs[4], addrs[5], addrs[6], addrs[7]];
    let (side, addr) = if daddr != flow.daddr {
        (FRAG_REWRITE_DESTINATION, daddr)
    } else if saddr != flow.saddr {
        (FRAG_REWRITE_SOURCE, saddr)
    } else {
        return;
    };
    let key = fragment_key(flow.saddr, flow.daddr, flow.ip_id, flow.proto);
    let value = FragmentValue {
        addr: ipv4_mapped(addr),
        side,
        _pad: [0; 7],
    };
    let _ = FRAGMENTS.insert(&key, &value, 0);
}

/// A later fragment: rewrite its address as the first fragment's was.
/// Without a record (not ours, or the first fragment was lost or came
/// later) it passes untouched.
#[inline(never)]
pub fn later_fragment(ctx: &TcContext, id: &FragmentId) -> i32 {
    let key = fragment_key(id.saddr, id.daddr, id.id, id.proto);
    let Some(record) = (unsafe { FRAGMENTS.get(&key) }) else {
        count(stat::FRAGMENT);
        return OK;
    };
    let new = [
        record.addr[12],
        record.addr[13],
        record.addr[14],
        record.addr[15],
    ];
    let (offset, old) = if record.side == FRAG_REWRITE_DESTINATION {
        (IP_DST_OFF, id.daddr)
    } else {
        (IP_SRC_OFF, id.saddr)
    };
    let from = u32::from_ne_bytes(old) as u64;
    let to = u32::from_ne_bytes(new) as u64;
    if ctx.l3_csum_replace(IP_CHECK_OFF, from, to, 4).is_err()
        || ctx.store(offset, &new, 0).is_err()
    {
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    count(stat::FRAGMENT_NAT);
    OK
}
