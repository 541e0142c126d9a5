//! What the service path needs from its hook, for tc (`TcContext`, an skb)
//! and XDP (`XdpContext`, a raw frame). The service path is written once,
//! generic over `Packet`; each hook supplies its verdicts, how it rewrites
//! an address and port, and how it sends a packet out of another interface.
//! XDP hands what it cannot do itself (rejects, fragments, ICMP errors) to
//! the tc program behind it by passing the packet untouched.

use aya_ebpf::{
    bindings::{
        xdp_action, BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use proxy_common::{crc32c, stat, LOOPBACK_IFINDEX, PROTO_SCTP, PROTO_UDP};

use crate::{
    csum, frag, icmp,
    maps::count,
    parse::{
        bytes_at, field, ipv4_header, set_field, Flow, FragmentId, Ipv4, ETH_LEN, IP_CHECK_OFF,
        IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, SCTP_CHECK_OFF,
    },
    reject,
    route::{self, Route},
    service::Nat,
    skb,
};

pub trait Packet {
    /// XDP: what the kernel cannot do at this hook goes to tc untouched.
    const IS_XDP: bool;
    const PASS: i32;
    const DROP: i32;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length (an skb may hold part of it non-linear).
    fn len(&self) -> usize;
    /// Makes the first `len` bytes directly readable (tc: pull them in).
    fn make_linear(&self, len: usize);
    /// Rewrites the packet's addresses and ports to `nat`'s (both sides,
    /// either or both changed), keeping the checksums right.
    fn rewrite(&self, flow: &Flow, nat: &Nat) -> bool;
    /// The route to `dst` (XDP: only a complete one, neighbour included).
    fn route(&self, dst: Ipv4) -> Option<&'static Route>;
    /// Sends the (rewritten) packet out along `route`; returns the verdict.
    fn forward(&self, route: &Route) -> i32;
    /// The interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Hands the (translated) packet to this node's own stack through
    /// `lo`, where a local source address is accepted.
    fn to_host(&self) -> i32;
    fn reject(&self, flow: &Flow) -> i32;
    /// `route_out`: at the external hook, a fragment of a source-NATed
    /// flow leaves by its route like the rest of the flow.
    fn later_fragment(&self, id: &FragmentId, route_out: bool) -> i32;
    fn remember_fragment(&self, flow: &Flow);
    /// `external`: at the external hook (see `icmp::error`).
    fn icmp_error(&self, l4_off: usize, external: bool) -> i32;
}

impl Packet for TcContext {
    const IS_XDP: bool = false;
    const PASS: i32 = TC_ACT_OK as i32;
    const DROP: i32 = TC_ACT_SHOT as i32;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn make_linear(&self, len: usize) {
        if TcContext::data(self) + len > TcContext::data_end(self) {
            let have = TcContext::len(self) as usize;
            let _ = self.pull_data(if have < len { have } else { len } as u32);
        }
    }

    /// Addresses, ports and the IPv4 header checksum (never offloaded)
    /// written in place; the L4 checksum by the skb's checksum state
    /// (`skb::ip_summed`):
    /// - none yet verified, or verified (`CHECKSUM_NONE`,
    ///   `CHECKSUM_UNNECESSARY`): the field holds the whole checksum, which
    ///   takes every change, in place as at XDP;
    /// - `CHECKSUM_PARTIAL` (sent by a local socket, here a pod's, for the
    ///   device or the stack to finish): the field holds only the
    ///   pseudo-header's sum, which takes the address change and not the
    ///   port change, in place;
    /// - `CHECKSUM_COMPLETE` (the device summed the packet into
    ///   `skb->csum`, which must follow the pseudo-header change), or a
    ///   kernel where the state cannot be read: `bpf_l4_csum_replace`,
    ///   which handles every state; two calls, one for the addresses
    ///   (pseudo-header) and one for the ports, each covering both sides
    ///   as one 32-bit word before and after.
    ///
    /// The two helper calls (a call, a return and a reload of every packet
    /// pointer each) were about half of an established packet's time at
    /// tc (docs/BENCHMARKS.md, part 1, measures both ways).
    #[inline(always)]
    fn rewrite(&self, flow: &Flow, nat: &Nat) -> bool {
        let Some(change) = write_in_place(self, flow, nat) else {
            return false;
        };
        if flow.proto == PROTO_SCTP {
            // A CHECKSUM_PARTIAL skb's CRC is computed later over the
            // rewritten packet: updating the field is harmless there.
            return update_sctp_crc(self, flow, change.ports);
        }
        match skb::ip_summed(self) {
            skb::CHECKSUM_NONE | skb::CHECKSUM_UNNECESSARY => {
                write_l4_check(self, flow, change.sum(), false)
            }
            skb::CHECKSUM_PARTIAL => write_l4_check(
                self,
                flow,
                csum::change4(change.addrs.0, change.addrs.1),
                true,
            ),
            _ => {
                count(stat::CSUM_HELPER);
                l4_csum_by_helper(self, flow, &change)
            }
        }
    }

    /// The egress interface only: `bpf_redirect_neigh` resolves the next
    /// hop itself (and asks for it when it is not known yet).
    #[inline(always)]
    fn route(&self, dst: Ipv4) -> Option<&'static Route> {
        route::lookup(self.as_ptr(), dst, ingress_ifindex_tc(self), true)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        ingress_ifindex_tc(self)
    }

    #[inline(always)]
    fn to_host(&self) -> i32 {
        // The stack drops frames not addressed to the receiving device
        // (PACKET_OTHERHOST): address this one to lo's all-zero MAC.
        if self.store(0, &[0u8; 6], 0).is_err() {
            return Self::DROP;
        }
        unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS as u64) as i32 }
    }

    #[inline(always)]
    fn forward(&self, route: &Route) -> i32 {
        let rc = unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) };
        if rc == TC_ACT_REDIRECT as i64 {
            TC_ACT_REDIRECT as i32
        } else {
            Self::DROP
        }
    }

    #[inline(always)]
    fn reject(&self, flow: &Flow) -> i32 {
        reject::port_unreachable(self, flow)
    }
    #[inline(always)]
    fn later_fragment(&self, id: &FragmentId, route_out: bool) -> i32 {
        frag::later_fragment(self, id, route_out)
    }
    #[inline(always)]
    fn remember_fragment(&self, flow: &Flow) {
        frag::remember(self, flow)
    }
    #[inline(always)]
    fn icmp_error(&self, l4_off: usize, external: bool) -> i32 {
        icmp::error(self, l4_off, external)
    }
}

/// What a rewrite changes, as the checksums see it: the addresses (which
/// the pseudo-header carries) and the ports, each as one 32-bit word
/// before and after (the two addresses summed into one: the one's
/// complement sum only sees their sum).
struct Change {
    addrs: (u32, u32),
    ports: (u32, u32),
}

impl Change {
    /// What the change adds to a checksum, unfolded.
    #[inline(always)]
    fn sum(&self) -> u64 {
        csum::change4(self.addrs.0, self.addrs.1) + csum::change4(self.ports.0, self.ports.1)
    }
}

/// Writes `nat`'s addresses and ports over the packet's and updates the
/// IPv4 header checksum (RFC 1624), by direct packet access; returns what
/// the L4 checksum must take. At tc the headers were pulled into the
/// linear data (`make_linear`), and the verifier unclones a cloned skb
/// before a program that writes directly runs (the byte helpers,
/// `bpf_skb_store_bytes`, cost a call and a memcpy each).
#[inline(always)]
fn write_in_place<P: Packet>(ctx: &P, flow: &Flow, nat: &Nat) -> Option<Change> {
    let addrs = write_addresses(ctx, (flow.saddr, flow.daddr), (nat.saddr, nat.daddr))?;
    // Checked on its own: the verifier bounds a packet pointer only by a
    // check on that very pointer.
    let at = bytes_at(ctx, flow.l4_start(), 4)?;
    let ports = (
        ports_word(flow.sport, flow.dport),
        ports_word(nat.sport, nat.dport),
    );
    // SAFETY: inside the checked span.
    unsafe { set_field(at, 0, ports.1) };
    Some(Change { addrs, ports })
}

/// Writes the source and destination addresses `new` over `old` and
/// updates the IPv4 header checksum, in place under one bounds check (see
/// `write_in_place`); returns the two as one 32-bit word each, before and
/// after (`Change::addrs`). Also for a later fragment, which has no L4
/// header.
#[inline(always)]
pub fn write_addresses<P: Packet>(
    ctx: &P,
    old: (Ipv4, Ipv4),
    new: (Ipv4, Ipv4),
) -> Option<(u32, u32)> {
    let ip = ipv4_header(ctx)?;
    let addrs = (csum::add32(old.0, old.1), csum::add32(new.0, new.1));
    // SAFETY: every field is inside the checked IPv4 header.
    unsafe {
        let check = csum::apply(field(ip, IP_CHECK_OFF), csum::change4(addrs.0, addrs.1));
        set_field(ip, IP_CHECK_OFF, check);
        set_field(ip, IP_SRC_OFF, new.0);
        set_field(ip, IP_DST_OFF, new.1);
    }
    Some(addrs)
}

/// Lowers the IPv4 TTL by one, as forwarding does, and updates the header
/// checksum (RFC 1624), in place under one bounds check (at tc the headers
/// are linear and writable, see `write_in_place`); false when the TTL
/// would reach zero (or the header is not there).
#[inline(always)]
pub fn decrement_ttl<P: Packet>(ctx: &P) -> bool {
    let Some(ip) = ipv4_header(ctx) else {
        return false;
    };
    // SAFETY: both fields are inside the checked IPv4 header.
    unsafe {
        // TTL and protocol, one raw 16-bit word of the checksum.
        let old: u16 = field(ip, IP_TTL_OFF);
        let [ttl, proto] = old.to_ne_bytes();
        if ttl <= 1 {
            return false;
        }
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        let check = csum::update2(field(ip, IP_CHECK_OFF), old, new);
        set_field(ip, IP_TTL_OFF, new);
        set_field(ip, IP_CHECK_OFF, check);
    }
    true
}

/// A source and a destination port as the one 32-bit word they make in
/// the L4 header, raw (network byte order read natively).
#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    let ([s0, s1], [d0, d1]) = (sport.to_be_bytes(), dport.to_be_bytes());
    u32::from_ne_bytes([s0, s1, d0, d1])
}

/// Brings the L4 checksum in line with `change` through
/// `bpf_l4_csum_replace`, whatever the skb's checksum state (see
/// `TcContext::rewrite`).
#[inline(always)]
fn l4_csum_by_helper(ctx: &TcContext, flow: &Flow, change: &Change) -> bool {
    let check_off = flow.l4_check_off();
    // A zero UDP checksum means "none": the kernel leaves it zero.
    let mangled = if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let (addrs, ports) = (change.addrs, change.ports);
    (addrs.0 == addrs.1
        || ctx
            .l4_csum_replace(
                check_off,
                addrs.0 as u64,
                addrs.1 as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )
            .is_ok())
        && (ports.0 == ports.1
            || ctx
                .l4_csum_replace(check_off, ports.0 as u64, ports.1 as u64, mangled | 4)
                .is_ok())
}

/// SCTP's CRC32c has no pseudo-header: the address change leaves it as
/// it is, a port change (`ports`, the first word before and after) takes
/// `crc32c::update` over the packet's length. A first fragment carries
/// only part of the packet the CRC covers: left as it is (SCTP avoids IP
/// fragmentation with its own path MTU discovery). Its own BPF function:
/// only SCTP packets get here.
#[inline(never)]
fn update_sctp_crc<P: Packet>(ctx: &P, flow: &Flow, ports: (u32, u32)) -> bool {
    if ports.0 == ports.1 || flow.first_fragment {
        return true;
    }
    let Some(ip) = ipv4_header(ctx) else {
        return false;
    };
    // SAFETY: inside the checked IPv4 header.
    let total_len = u16::from_be(unsafe { field::<u16>(ip, ETH_LEN + 2) }) as usize;
    let len = total_len.saturating_sub(flow.ip_hdr_len as usize);
    let Some(at) = bytes_at(ctx, flow.l4_start() + SCTP_CHECK_OFF, 4) else {
        return false;
    };
    // SAFETY: inside the checked span.
    unsafe {
        if let Some(check) = crc32c::update(field(at, 0), len, ports.0, ports.1) {
            set_field(at, 0, check);
        }
    }
    true
}

/// Adds `change` (unfolded) to the L4 checksum in place (RFC 1624):
/// `pseudo_sum`, a CHECKSUM_PARTIAL skb's field, which holds the
/// pseudo-header's sum itself rather than the inverted sum of everything.
/// A zero UDP checksum means "none" and stays zero; a computed zero is
/// sent as 0xffff.
#[inline(always)]
fn write_l4_check<P: Packet>(ctx: &P, flow: &Flow, change: u64, pseudo_sum: bool) -> bool {
    let Some(at) = bytes_at(ctx, flow.l4_check_off(), 2) else {
        return false;
    };
    // SAFETY: inside the checked span.
    unsafe {
        let check: u16 = field(at, 0);
        if flow.proto == PROTO_UDP && check == 0 {
            return true;
        }
        let mut check = if pseudo_sum {
            csum::add_to_sum(check, change)
        } else {
            csum::apply(check, change)
        };
        if flow.proto == PROTO_UDP && check == 0 {
            check = 0xffff;
        }
        set_field(at, 0, check);
    }
    true
}

#[inline(always)]
fn ingress_ifindex_tc(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

impl Packet for XdpContext {
    const IS_XDP: bool = true;
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;

    // Volatile reads: the compiler must not hoist them into a caller and
    // pass packet pointers as 32-bit arguments, whose zero-extension the
    // verifier refuses ("pointer arithmetic on pkt_end prohibited").
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data) as usize }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) as usize }
    }
    #[inline(always)]
    fn len(&self) -> usize {
        Packet::data_end(self) - Packet::data(self)
    }
    #[inline(always)]
    fn make_linear(&self, _len: usize) {}

    /// RFC 1624 incremental checksums, written straight into the frame
    /// (the byte helpers `bpf_xdp_load_bytes` / `bpf_xdp_store_bytes` cost
    /// a call, a page walk and a memcpy each). Frames at XDP come from the
    /// wire with full checksums (no CHECKSUM_PARTIAL here), so the L4
    /// checksum takes every change, folded once.
    #[inline(always)]
    fn rewrite(&self, flow: &Flow, nat: &Nat) -> bool {
        let Some(change) = write_in_place(self, flow, nat) else {
            return false;
        };
        if flow.proto == PROTO_SCTP {
            return update_sctp_crc(self, flow, change.ports);
        }
        write_l4_check(self, flow, change.sum(), false)
    }

    /// Only a route back out of the interface the frame came in on
    /// (`XDP_TX`). Anything else goes through tc: redirecting a frame at
    /// XDP needs the target to take XDP frames (a pod's veth, whose peer
    /// runs no XDP, would hold them until something else wakes it).
    #[inline(always)]
    fn route(&self, dst: Ipv4) -> Option<&'static Route> {
        // SAFETY: the context pointer is valid for the program's run.
        let ingress = unsafe { (*self.ctx).ingress_ifindex };
        route::lookup(self.as_ptr(), dst, ingress, false).filter(|r| r.ifindex == ingress)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    /// Not at XDP: the service path passes such packets on to tc untouched.
    #[inline(always)]
    fn to_host(&self) -> i32 {
        Self::PASS
    }

    #[inline(always)]
    fn forward(&self, route: &Route) -> i32 {
        let Some(eth) = bytes_at(self, 0, ETH_LEN) else {
            return Self::DROP;
        };
        // SAFETY: inside the checked Ethernet header.
        unsafe {
            set_field(eth, 0, route.dmac);
            set_field(eth, 6, route.smac);
        }
        // `route` leaves by the ingress interface (see `route`).
        xdp_action::XDP_TX as i32
    }

    #[inline(always)]
    fn reject(&self, _flow: &Flow) -> i32 {
        Self::PASS
    }
    #[inline(always)]
    fn later_fragment(&self, _id: &FragmentId, _route_out: bool) -> i32 {
        Self::PASS
    }
    #[inline(always)]
    fn remember_fragment(&self, _flow: &Flow) {}
    #[inline(always)]
    fn icmp_error(&self, _l4_off: usize, _external: bool) -> i32 {
        Self::PASS
    }
}
