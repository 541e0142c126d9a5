//! Routes for the packets the datapath sends out itself (source-NATed
//! flows at the external hook, this node's own flows at `lo`): the
//! kernel's FIB lookup, and a small per-CPU cache of its answers.
//!
//! A FIB lookup walks the routing table and the neighbour table: on the
//! XDP forwarding path it cost about as much as everything else the
//! program does to a packet (docs/BENCHMARKS.md, part 4). Every packet of
//! a flow asks the same question, so each CPU keeps the last answers in
//! `ROUTE_CACHE_V1`, a direct-mapped table indexed by a hash of the
//! question (destination, ingress interface, whether the neighbour is
//! resolved by the caller). An answer is used for `ROUTE_CACHE_TTL_NS`
//! after its lookup and then asked again, so a route or neighbour change
//! reaches established flows within that time. Failed lookups are not
//! cached: their packets take the slow path (tc, or a drop) as before.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_FIB_LOOKUP_SRC,
    },
    helpers::bpf_fib_lookup,
};
use proxy_common::{mix, stat, RouteCacheSlot, ROUTE_CACHE_SLOTS, ROUTE_CACHE_TTL_NS};

use crate::{
    clock::now_ns,
    maps::{config, count, ROUTE_CACHE},
    parse::Ipv4,
};

const AF_INET: u8 = 2;

/// Where a packet leaves: a FIB answer, as cached (the question beside
/// it). Callers read it in place, in this CPU's slot: a copy on the stack
/// would add to frames whose sum along a call chain must stay within 512
/// bytes.
pub type Route = RouteCacheSlot;

/// The route to `dst` for a packet that arrived on `ingress`, from this
/// CPU's cache when it answered the same question less than
/// `ROUTE_CACHE_TTL_NS` ago, else from a FIB lookup (which refills the
/// slot). `skip_neigh`: the caller resolves the next hop itself (tc's
/// `bpf_redirect_neigh`), so no neighbour entry is needed. The answer is
/// valid until the next lookup on this CPU.
#[inline(always)]
pub fn lookup(
    ctx: *mut core::ffi::c_void,
    dst: Ipv4,
    ingress: u32,
    skip_neigh: bool,
) -> Option<&'static Route> {
    let now = now_ns(config());
    // The whole question picks the slot: XDP (neighbour resolved) and tc
    // (not) ask it for the same flows when XDP hands a flow routed out of
    // another interface to tc, and in one slot they would evict each
    // other on every packet.
    let index =
        mix(dst ^ ingress.rotate_left(16) ^ (skip_neigh as u32) << 31) & (ROUTE_CACHE_SLOTS - 1);
    let slot = ROUTE_CACHE.get_ptr_mut(index)?;
    // SAFETY: a valid per-CPU map value for the program's run; nothing
    // else on this CPU runs while it does.
    let slot = unsafe { &mut *slot };
    let fresh = u32::from_ne_bytes(slot.dst) == dst
        && slot.ingress == ingress
        && slot.skip_neigh == skip_neigh as u8
        && now.wrapping_sub(slot.looked_up_ns) < ROUTE_CACHE_TTL_NS;
    if fresh || fib_lookup(ctx, slot, dst, ingress, skip_neigh) {
        Some(slot)
    } else {
        None
    }
}

/// `bpf_fib_lookup`'s parameter block, aligned for word stores.
#[repr(C, align(8))]
struct FibRequest(FibParams);

/// A FIB lookup as the kernel's forwarding path would do it for a packet
/// to `dst` that arrived on `ingress`; on success the question and the
/// answer go into `slot`, stamped with the time. Its own BPF function: the
/// 64-byte parameter block gets its own stack frame (and BPF functions take
/// at most five arguments, so it reads the clock itself).
#[inline(never)]
fn fib_lookup(
    ctx: *mut core::ffi::c_void,
    slot: &mut RouteCacheSlot,
    dst: Ipv4,
    ingress: u32,
    skip_neigh: bool,
) -> bool {
    count(stat::FIB_LOOKUP);
    let mut request = MaybeUninit::<FibRequest>::uninit();
    // Zeroed one word at a time: `mem::zeroed` is a `memset` call, a
    // byte-at-a-time loop over all 64 bytes (see `clear_addr`), which cost
    // a routed packet more than its rewrite.
    let words = request.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < core::mem::size_of::<FibRequest>() / 8 {
        // SAFETY: inside `request`, which is 8-byte aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: all-zero, a valid (empty) request.
    let params = unsafe { &mut (*request.as_mut_ptr()).0 };
    params.family = AF_INET;
    params.ifindex = ingress;
    params.__bindgen_anon_4.ipv4_dst = dst;
    let mut flags = BPF_FIB_LOOKUP_SRC;
    if skip_neigh {
        flags |= BPF_FIB_LOOKUP_SKIP_NEIGH;
    }
    let rc =
        unsafe { bpf_fib_lookup(ctx, params, core::mem::size_of::<FibParams>() as i32, flags) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return false;
    }
    slot.dst = dst.to_ne_bytes();
    slot.ingress = ingress;
    slot.skip_neigh = skip_neigh as u8;
    slot.ifindex = params.ifindex;
    // SAFETY: the kernel filled the IPv4 source (BPF_FIB_LOOKUP_SRC).
    slot.src = unsafe { params.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    slot.smac = params.smac;
    slot.dmac = params.dmac;
    slot.looked_up_ns = now_ns(config());
    true
}
