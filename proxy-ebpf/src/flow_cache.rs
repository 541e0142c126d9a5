//! A per-CPU exact-match cache of translations in front of conntrack (as
//! Open vSwitch's EMC sits in front of its classifier).
//!
//! The conntrack lookup is a hash-map lookup: the kernel hashes the key,
//! walks a bucket and compares keys in functions of its own, and on a CPU
//! whose every return goes through a return thunk (SRSO "safe RET" here)
//! those calls cost more than the rest of an established packet's work
//! (docs/BENCHMARKS.md, part 1). An array lookup the verifier inlines into
//! the program costs a few instructions. So each CPU keeps, in
//! `FLOW_CACHE_V2`, a direct-mapped table indexed by a hash of the tuple:
//! the last translation of each tracked flow it saw, which the next
//! packets of that flow reuse without the lookup.
//!
//! A cached translation is exactly what the conntrack entry gives, for as
//! long as nothing could have changed it:
//! - the tuple's generation in `FLOW_GEN_V1` (one shared array) is the one
//!   read before the entry was: a new entry for the tuple, on any CPU,
//!   bumps it (`invalidate`), so a port reused by a new connection or a
//!   flow opened again after eviction never meets an old slot;
//! - the backend epoch is the datapath's: userspace starts a new one when
//!   a backend may have gone, when it purges UDP flows, and at every load;
//! - TCP packets that change a flow's state (SYN, FIN, RST) always take the
//!   conntrack path, which tracks the state as before;
//! - a slot is used for `FLOW_CACHE_TTL_NS`, or half the flow's timeout
//!   when that is shorter; then the packet takes the conntrack lookup
//!   again, which refreshes the entry's `last_seen_ns` (so an active flow
//!   never looks idle to the sweep) and its place in the LRU, and refills
//!   the slot.

use proxy_common::{
    mix, stat, ConntrackKey4, DatapathConfig, FlowCacheSlot, CONFIG_FLAG_NO_FLOW_CACHE,
    FLOW_CACHE_EXTERNAL, FLOW_CACHE_REPLY, FLOW_CACHE_ROUTE_OUT, FLOW_CACHE_SLOTS,
    FLOW_CACHE_TO_HOST, FLOW_CACHE_TTL_NS,
};

use crate::{
    maps::{config, count, FLOW_CACHE, FLOW_GEN},
    parse::{field, set_field, Flow, Ipv4, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
    service::Nat,
};

/// Word offsets in a slot: key (two words), `filled_ns`, the addresses,
/// ports and `ttl_ns`, flags, epoch and generation, the frontend.
const KEY: usize = 0;
const FILLED: usize = 16;
const ADDRS: usize = 24;
const PORTS_TTL: usize = 32;
const FLAGS_GEN: usize = 40;
const FRONTEND: usize = 48;
const _: () = {
    assert!(core::mem::offset_of!(FlowCacheSlot, filled_ns) == FILLED);
    assert!(core::mem::offset_of!(FlowCacheSlot, saddr) == ADDRS);
    assert!(core::mem::offset_of!(FlowCacheSlot, daddr) == ADDRS + 4);
    assert!(core::mem::offset_of!(FlowCacheSlot, sport) == PORTS_TTL);
    assert!(core::mem::offset_of!(FlowCacheSlot, dport) == PORTS_TTL + 2);
    assert!(core::mem::offset_of!(FlowCacheSlot, ttl_ns) == PORTS_TTL + 4);
    assert!(core::mem::offset_of!(FlowCacheSlot, flags) == FLAGS_GEN);
    assert!(core::mem::offset_of!(FlowCacheSlot, backend_epoch) == FLAGS_GEN + 1);
    assert!(core::mem::offset_of!(FlowCacheSlot, generation) == FLAGS_GEN + 4);
    assert!(core::mem::offset_of!(FlowCacheSlot, frontend) == FRONTEND);
};

/// A packet's place in the cache: its tuple's index, and its generation,
/// read before the conntrack lookup (a new entry made after that read
/// leaves a slot filled from the old one unusable). Two words, not the
/// slot's pointer: the entry point's stack frame is tight.
pub struct Probe {
    index: u32,
    generation: u32,
}

impl Probe {
    #[inline(always)]
    pub fn new(flow: &Flow, config: &DatapathConfig) -> Self {
        let (k0, k1) = key_words(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
        // With the cache off, an index past the end: no slot to use or fill
        // (arithmetic, not a branch: one register less in the entry
        // point's frame, whose call chains are at the 512-byte limit).
        const OFF: u32 = (FLOW_CACHE_SLOTS / CONFIG_FLAG_NO_FLOW_CACHE as u32).trailing_zeros();
        let index = index(k0, k1) | ((config.flags & CONFIG_FLAG_NO_FLOW_CACHE) as u32) << OFF;
        Self {
            index,
            generation: FLOW_GEN.get(index).map_or(0, |g| *g),
        }
    }

    /// This CPU's slot for the tuple (0: none, when the cache is off).
    #[inline(always)]
    fn slot(&self) -> usize {
        FLOW_CACHE.get_ptr_mut(self.index).map_or(0, |p| p as usize)
    }

    /// Fills `nat` from the slot when it holds a usable translation of
    /// this packet's flow, and counts it as the conntrack path would.
    #[inline(always)]
    pub fn hit<const EXTERNAL: bool>(
        &self,
        flow: &Flow,
        config: &DatapathConfig,
        now: u64,
        nat: &mut Nat,
    ) -> bool {
        if flow.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
            return false;
        }
        let slot = self.slot();
        if slot == 0 {
            return false;
        }
        let (k0, k1) = key_words(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
        // SAFETY (every `field`): inside this CPU's slot, a map value valid
        // for the program's run, at 8-byte-aligned offsets.
        let (flags_gen, ports_ttl) = unsafe {
            if field::<u64>(slot, KEY) != k0 || field::<u64>(slot, KEY + 8) != k1 {
                return false;
            }
            (field::<u64>(slot, FLAGS_GEN), field::<u64>(slot, PORTS_TTL))
        };
        let flags = flags_gen as u8;
        let filled = unsafe { field::<u64>(slot, FILLED) };
        if (flags & FLOW_CACHE_EXTERNAL != 0) != EXTERNAL
            || !usable(flags_gen, ports_ttl, filled, self.generation, config, now)
        {
            return false;
        }
        let addrs = unsafe { field::<u64>(slot, ADDRS) };
        nat.saddr = addrs as Ipv4;
        nat.daddr = (addrs >> 32) as Ipv4;
        nat.sport = ports_ttl as u16;
        nat.dport = (ports_ttl >> 16) as u16;
        nat.route_out = flags & FLOW_CACHE_ROUTE_OUT != 0;
        nat.to_host = flags & FLOW_CACHE_TO_HOST != 0;
        nat.frontend = unsafe { field::<u64>(slot, FRONTEND) } as u32;
        count(if flags & FLOW_CACHE_REPLY != 0 {
            stat::REV_NAT
        } else {
            stat::DNAT
        });
        true
    }

    /// Records `nat`, the translation the conntrack entry gave this
    /// packet, for the flow's next packets on this CPU. `state`: the
    /// entry's TCP state (its idle timeout bounds the slot's life).
    #[inline(always)]
    pub fn fill<const EXTERNAL: bool>(
        &self,
        flow: &Flow,
        nat: &Nat,
        reply: bool,
        state: u8,
        now: u64,
    ) {
        let mut flags = 0;
        if reply {
            flags |= FLOW_CACHE_REPLY;
        }
        if EXTERNAL {
            flags |= FLOW_CACHE_EXTERNAL;
        }
        if fill_slot(
            self.index as u64 | (self.generation as u64) << 32,
            flow,
            nat,
            flags as u32 | (state as u32) << 8,
            now,
        ) {
            count(stat::FLOW_CACHE_FILL);
        }
    }
}

/// `Probe::fill`'s work, in a BPF function of its own: only packets that
/// read conntrack get here, and its temporaries stay out of the entry
/// point's stack frame (whose call chains are at the 512-byte limit).
/// `probe`: index and generation; `how`: `FLOW_CACHE_*` flags and the TCP
/// state (bits 8-15). At most five arguments, so it reads the config
/// itself. Returns whether it filled the slot: not when the cache is off,
/// nor over another flow's usable translation. A result the caller uses: LLVM drops an unused one, and a BPF
/// function that returns nothing may leave a pointer into its frame in
/// r0, which the verifier refuses.
#[inline(never)]
fn fill_slot(probe: u64, flow: &Flow, nat: &Nat, how: u32, now: u64) -> bool {
    let Some(slot) = FLOW_CACHE.get_ptr_mut(probe as u32) else {
        return false;
    };
    let slot = slot as usize;
    let config = config();
    let (k0, k1) = key_words(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    // SAFETY (every `field` and `set_field`): inside this CPU's slot, a map value
    // valid for the program's run, at 8-byte-aligned offsets.
    unsafe {
        // Another flow's translation that is still usable keeps its slot:
        // two flows that share one would otherwise evict each other on
        // every packet, and neither would ever hit.
        if (field::<u64>(slot, KEY) != k0 || field::<u64>(slot, KEY + 8) != k1)
            && usable(
                field::<u64>(slot, FLAGS_GEN),
                field::<u64>(slot, PORTS_TTL),
                field::<u64>(slot, FILLED),
                (probe >> 32) as u32,
                config,
                now,
            )
        {
            return false;
        }
    }
    let half = config.timeout_ns(flow.proto, (how >> 8) as u8) / 2;
    let ttl = if half < FLOW_CACHE_TTL_NS {
        half
    } else {
        FLOW_CACHE_TTL_NS
    };
    let mut flags = how as u8;
    if nat.route_out {
        flags |= FLOW_CACHE_ROUTE_OUT;
    }
    if nat.to_host {
        flags |= FLOW_CACHE_TO_HOST;
    }
    unsafe {
        set_field(slot, KEY, k0);
        set_field(slot, KEY + 8, k1);
        set_field(slot, FILLED, now);
        set_field(slot, ADDRS, nat.saddr as u64 | (nat.daddr as u64) << 32);
        set_field(
            slot,
            PORTS_TTL,
            nat.sport as u64 | (nat.dport as u64) << 16 | ttl << 32,
        );
        set_field(
            slot,
            FLAGS_GEN,
            flags as u64 | (config.backend_epoch() as u64) << 8 | (probe >> 32) << 32,
        );
        set_field(slot, FRONTEND, nat.frontend as u64);
    }
    true
}

/// Whether a slot whose words are `flags_gen`, `ports_ttl` and `filled`
/// still holds a usable translation: filled under the tuple's current
/// `generation` and the current backend epoch, less than its TTL ago.
#[inline(always)]
fn usable(
    flags_gen: u64,
    ports_ttl: u64,
    filled: u64,
    generation: u32,
    config: &DatapathConfig,
    now: u64,
) -> bool {
    (flags_gen >> 32) as u32 == generation
        && (flags_gen >> 8) as u8 == config.backend_epoch()
        && now.wrapping_sub(filled) < ports_ttl >> 32
}

/// A conntrack entry for `key` is being made: every CPU's cached
/// translation of that tuple is retired (one shared generation number per
/// index; a race between two CPUs still changes it).
#[inline(always)]
pub fn invalidate(key: &ConntrackKey4) {
    let (k0, k1) = key_words(
        u32::from_ne_bytes(key.saddr),
        u32::from_ne_bytes(key.daddr),
        key.sport,
        key.dport,
        key.proto,
    );
    if let Some(generation) = FLOW_GEN.get_ptr_mut(index(k0, k1)) {
        // SAFETY: a valid map value pointer for the program's run.
        unsafe { *generation = (*generation).wrapping_add(1) };
    }
}

/// The tuple as the two little-endian words of its `ConntrackKey4`.
#[inline(always)]
fn key_words(saddr: Ipv4, daddr: Ipv4, sport: u16, dport: u16, proto: u8) -> (u64, u64) {
    (
        saddr as u64 | (daddr as u64) << 32,
        sport as u64 | (dport as u64) << 16 | (proto as u64) << 32,
    )
}

/// The slot (and generation) index of a tuple.
#[inline(always)]
fn index(k0: u64, k1: u64) -> u32 {
    let h = (k0 as u32)
        ^ ((k0 >> 32) as u32).rotate_left(13)
        ^ (k1 as u32).wrapping_mul(0x9e37_79b1)
        ^ (k1 >> 32) as u32;
    mix(h) & (FLOW_CACHE_SLOTS - 1)
}
