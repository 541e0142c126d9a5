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
use proxy_common::{LOOPBACK_IFINDEX, PROTO_UDP};

use crate::{
    csum, frag, icmp,
    parse::{
        bytes_at, field, ipv4_header, set_field, store, Flow, FragmentId, Ipv4, ETH_LEN,
        IP_CHECK_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF,
    },
    reject,
    route::{self, Route},
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

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
    /// Rewrites one side's address and port, keeping the checksums right.
    fn rewrite(&self, flow: &Flow, side: Side, addr: Ipv4, port: u16) -> bool;
    /// The route to `dst` (XDP: only a complete one, neighbour included).
    fn route(&self, dst: Ipv4) -> Option<&'static Route>;
    /// Sends the (rewritten) packet out along `route`; returns the verdict.
    fn forward(&self, route: &Route) -> i32;
    /// The interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Hands the (translated) packet to this node's own stack through
    /// `lo`, where a local source address is accepted.
    fn to_host(&self) -> i32;
    /// Lowers the IPv4 TTL by one, as forwarding does; false when it
    /// would reach zero (or the header cannot be written).
    fn decrement_ttl(&self) -> bool;
    fn reject(&self, flow: &Flow) -> i32;
    /// `route_out`: at the external hook, a fragment of a source-NATed
    /// flow leaves by its route like the rest of the flow.
    fn later_fragment(&self, id: &FragmentId, route_out: bool) -> i32;
    fn remember_fragment(&self, flow: &Flow);
    fn icmp_error(&self, l4_off: usize) -> i32;
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

    /// The L4 checksum through `bpf_l4_csum_replace`, which knows the skb's
    /// checksum state (CHECKSUM_PARTIAL from local sockets keeps only the
    /// pseudo-header sum); the IPv4 header (whose checksum is never
    /// offloaded), the address and the port written in place, which saves
    /// three helper calls per rewrite.
    #[inline(always)]
    fn rewrite(&self, flow: &Flow, side: Side, addr: Ipv4, port: u16) -> bool {
        let (addr_off, old_addr, port_off, old_port) = locate(flow, side);
        let check_off = flow.l4_check_off();
        // A zero UDP checksum means "none": leave it zero.
        let mangled = if flow.proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        let from_addr = old_addr as u64;
        let to_addr = addr as u64;
        if from_addr != to_addr {
            let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
            if self
                .l4_csum_replace(check_off, from_addr, to_addr, pseudo)
                .is_err()
                || !tc_rewrite_ip(self, addr_off, old_addr, addr)
            {
                return false;
            }
        }
        let from_port = u16::from_ne_bytes(old_port.to_be_bytes()) as u64;
        let to_port = u16::from_ne_bytes(port.to_be_bytes()) as u64;
        if from_port != to_port
            && (self
                .l4_csum_replace(check_off, from_port, to_port, mangled | 2)
                .is_err()
                || !store(self, port_off, port.to_be()))
        {
            return false;
        }
        true
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
    fn decrement_ttl(&self) -> bool {
        let Ok(old) = self.load::<[u8; 2]>(IP_TTL_OFF) else {
            return false;
        };
        if old[0] <= 1 {
            return false;
        }
        let new = [old[0] - 1, old[1]];
        let (from, to) = (
            u16::from_ne_bytes(old) as u64,
            u16::from_ne_bytes(new) as u64,
        );
        self.l3_csum_replace(IP_CHECK_OFF, from, to, 2).is_ok()
            && self.store(IP_TTL_OFF, &new, 0).is_ok()
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
    fn icmp_error(&self, l4_off: usize) -> i32 {
        icmp::error(self, l4_off)
    }
}

/// Replaces the IPv4 address at `addr_off` and updates the header
/// checksum (RFC 1624), by direct packet access: the headers were pulled
/// into the linear data (`make_linear`), and the verifier unclones a cloned
/// skb before a program that writes directly runs. The byte helpers
/// (`bpf_skb_store_bytes`) cost a call and a memcpy each.
#[inline(always)]
fn tc_rewrite_ip(ctx: &TcContext, addr_off: usize, old: Ipv4, new: Ipv4) -> bool {
    let Some(ip) = ipv4_header(ctx) else {
        return false;
    };
    // SAFETY: both fields are inside the checked IPv4 header.
    unsafe {
        let check = csum::update4(field(ip, IP_CHECK_OFF), old, new);
        set_field(ip, IP_CHECK_OFF, check);
        set_field(ip, addr_off, new);
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
    /// wire with full checksums (no CHECKSUM_PARTIAL here).
    #[inline(always)]
    fn rewrite(&self, flow: &Flow, side: Side, new_addr: Ipv4, port: u16) -> bool {
        let (addr_off, old_addr, port_off, old_port) = locate(flow, side);
        // Each span checked where it is used: the verifier bounds a packet
        // pointer only by a check on that very pointer.
        let (Some(ip), Some(check)) = (ipv4_header(self), bytes_at(self, flow.l4_check_off(), 2))
        else {
            return false;
        };
        let (old_port, new_port) = (old_port.to_be(), port.to_be());
        // SAFETY: every field is inside one of the two checked spans.
        unsafe {
            let addr_change = csum::change4(old_addr, new_addr);
            let ip_check = csum::apply(field(ip, IP_CHECK_OFF), addr_change);
            let mut l4_check: u16 = field(check, 0);
            // A zero UDP checksum means "none": leave it zero.
            if !(flow.proto == PROTO_UDP && l4_check == 0) {
                // Address (pseudo-header) and port: one fold for both.
                l4_check = csum::apply(l4_check, addr_change + csum::change2(old_port, new_port));
                if flow.proto == PROTO_UDP && l4_check == 0 {
                    l4_check = 0xffff;
                }
            }
            set_field(ip, IP_CHECK_OFF, ip_check);
            set_field(ip, addr_off, new_addr);
            set_field(check, 0, l4_check);
        }
        store(self, port_off, new_port)
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
    fn decrement_ttl(&self) -> bool {
        let Some(ip) = ipv4_header(self) else {
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
    fn icmp_error(&self, _l4_off: usize) -> i32 {
        Self::PASS
    }
}

/// Offsets and old values of one side's address and port.
#[inline(always)]
fn locate(flow: &Flow, side: Side) -> (usize, Ipv4, usize, u16) {
    match side {
        Side::Source => (IP_SRC_OFF, flow.saddr, flow.l4_start(), flow.sport),
        Side::Destination => (IP_DST_OFF, flow.daddr, flow.l4_start() + 2, flow.dport),
    }
}
