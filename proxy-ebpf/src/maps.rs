//! The maps, declared with BTF so `bpftool map dump` prints named fields.
//! Names and layouts come from proxy-common; capacities are defaults that
//! userspace may override at load time.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    AddressFilter, AffinityKey, AffinityValue, BackendValue, ConntrackKey4, ConntrackValue,
    DatapathConfig, FlowCacheSlot, FragmentKey, FragmentValue, FrontendStats, MaglevKey,
    RevNatValue, RouteCacheSlot, ServiceKey, ServiceValue, SourceRange, AFFINITY_MAX_ENTRIES,
    BACKENDS_MAX_ENTRIES, CONNTRACK_MAX_ENTRIES, FLOW_CACHE_SLOTS, FRAGMENTS_MAX_ENTRIES,
    MAGLEV_MAX_ENTRIES, REV_NAT_MAX_ENTRIES, ROUTE_CACHE_SLOTS, SERVICES_MAX_ENTRIES,
    SOURCE_RANGES_MAX_ENTRIES,
};

#[btf_map(name = "SERVICES_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map(name = "BACKENDS_V1")]
pub static BACKENDS: HashMap<u32, BackendValue, { BACKENDS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "REV_NAT_V1")]
pub static REV_NAT: HashMap<u32, RevNatValue, { REV_NAT_MAX_ENTRIES as usize }> = HashMap::new();

/// IPv4 flows; `CONNTRACK_MAP` in proxy-common.
#[btf_map(name = "CONNTRACK4_V1")]
pub static CONNTRACK: LruHashMap<
    ConntrackKey4,
    ConntrackValue,
    { CONNTRACK_MAX_ENTRIES as usize },
> = LruHashMap::new();

#[btf_map(name = "STATS_V3")]
pub static STATS: PerCpuArray<u64, { proxy_common::stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "MAGLEV_V1")]
pub static MAGLEV: HashMap<MaglevKey, u32, { MAGLEV_MAX_ENTRIES as usize }> = HashMap::new();

/// Round-robin position per frontend (rev-NAT id).
#[btf_map(name = "RR_V1")]
pub static RR: HashMap<u32, u64, { REV_NAT_MAX_ENTRIES as usize }> = HashMap::new();

/// Open flows per backend id, for the least-connection schedulers.
#[btf_map(name = "BACKEND_CONNS_V1")]
pub static BACKEND_CONNS: HashMap<u32, u64, { BACKENDS_MAX_ENTRIES as usize }> = HashMap::new();

/// How the first fragment of a datagram was translated, for the rest.
#[btf_map(name = "FRAGMENTS_V2")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue, { FRAGMENTS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// `loadBalancerSourceRanges` per frontend (see `SourceRange`).
#[btf_map(name = "SOURCE_RANGES_V1")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8, { SOURCE_RANGES_MAX_ENTRIES as usize }> =
    LpmTrie::new();

/// Each CPU's last FIB answers (see `route.rs`).
#[btf_map(name = "ROUTE_CACHE_V1")]
pub static ROUTE_CACHE: PerCpuArray<RouteCacheSlot, { ROUTE_CACHE_SLOTS as usize }> =
    PerCpuArray::new();

/// Each CPU's last translations of tracked flows (see `flow_cache.rs`).
#[btf_map(name = "FLOW_CACHE_V2")]
pub static FLOW_CACHE: PerCpuArray<FlowCacheSlot, { FLOW_CACHE_SLOTS as usize }> =
    PerCpuArray::new();

/// Each CPU's packets and bytes per frontend entry (rev-NAT id); one more
/// than the rev-NAT map's capacity, as ids start at 1 (userspace sizes
/// both).
#[btf_map(name = "FRONTEND_STATS_V1")]
pub static FRONTEND_STATS: PerCpuArray<FrontendStats, { REV_NAT_MAX_ENTRIES as usize + 1 }> =
    PerCpuArray::new();

/// One generation per flow cache index, shared by all CPUs.
#[btf_map(name = "FLOW_GEN_V1")]
pub static FLOW_GEN: Array<u32, { FLOW_CACHE_SLOTS as usize }> = Array::new();

/// Bit `address_filter_slot` of every IPv4 frontend address (see
/// `service::destination`).
#[btf_map(name = "ADDRESS_FILTER_V1")]
pub static ADDRESS_FILTER: Array<AddressFilter, 1> = Array::new();

#[btf_map(name = "CONFIG_V3")]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// All zero: every field falls back to its compiled-in default.
static DEFAULT_CONFIG: DatapathConfig = DatapathConfig {
    tcp_syn_timeout_ns: 0,
    tcp_established_timeout_ns: 0,
    tcp_close_wait_timeout_ns: 0,
    tcp_closed_timeout_ns: 0,
    udp_timeout_ns: 0,
    flags: 0,
    clock_tick_ns: 0,
    clock_offset_ns: 0,
};

/// The tunables userspace wrote (all defaults when it wrote none). A
/// reference, not a copy: the hot path's stack frame is tight.
#[inline(always)]
pub fn config() -> &'static DatapathConfig {
    CONFIG.get(0).unwrap_or(&DEFAULT_CONFIG)
}

/// Counts one translated packet of `len` bytes for frontend entry
/// `frontend` (an array lookup the verifier inlines; an id past the array
/// is not counted).
#[inline(always)]
pub fn count_frontend(frontend: u32, len: usize) {
    if let Some(stats) = FRONTEND_STATS.get_ptr_mut(frontend) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len as u64;
        }
    }
}

/// Bumps one per-CPU counter (see `proxy_common::stat`).
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}
