//! Map keys, values and constants shared by the eBPF programs and userspace.
//!
//! Every type is `#[repr(C)]` with fixed-width fields and explicit padding so
//! that the kernel and userspace agree byte for byte, and so that
//! `bpftool map dump` can print named fields from BTF. Addresses are
//! 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one layout
//! serves both families. The one exception is the IPv4 conntrack key
//! (`ConntrackKey4`), which every tracked packet hashes: four-byte
//! addresses. Ports are in host byte order (readable in dumps).
#![no_std]

/// Map names carry a layout version, so a new layout never reuses an
/// incompatible pinned map left behind by an older kproxy.
pub const SERVICES_MAP: &str = "SERVICES_V1";
pub const BACKENDS_MAP: &str = "BACKENDS_V1";
pub const REV_NAT_MAP: &str = "REV_NAT_V1";
/// IPv4 flows (`ConntrackKey4`).
pub const CONNTRACK_MAP: &str = "CONNTRACK4_V1";
pub const STATS_MAP: &str = "STATS_V3";
pub const CONFIG_MAP: &str = "CONFIG_V3";
pub const AFFINITY_MAP: &str = "AFFINITY_V1";
pub const MAGLEV_MAP: &str = "MAGLEV_V1";
pub const RR_MAP: &str = "RR_V1";
pub const BACKEND_CONNS_MAP: &str = "BACKEND_CONNS_V1";
pub const FRAGMENTS_MAP: &str = "FRAGMENTS_V2";
pub const SOURCE_RANGES_MAP: &str = "SOURCE_RANGES_V1";
/// Each CPU's recent FIB answers ([`RouteCacheSlot`]).
pub const ROUTE_CACHE_MAP: &str = "ROUTE_CACHE_V1";
/// Each CPU's recent translations of tracked flows ([`FlowCacheSlot`]).
pub const FLOW_CACHE_MAP: &str = "FLOW_CACHE_V2";
/// Each CPU's packets and bytes per frontend entry ([`FrontendStats`],
/// indexed by the entry's rev-NAT id).
pub const FRONTEND_STATS_MAP: &str = "FRONTEND_STATS_V1";
/// One generation number per flow cache index (`u32`), shared by all CPUs:
/// a new conntrack entry bumps its tuple's, which retires every CPU's
/// cached translation of that tuple.
pub const FLOW_GEN_MAP: &str = "FLOW_GEN_V1";
/// One bit per hash of every IPv4 frontend address ([`AddressFilter`]).
pub const ADDRESS_FILTER_MAP: &str = "ADDRESS_FILTER_V1";

/// Maps of older layouts a previous kproxy may have pinned; `kproxy cleanup`
/// and an upgraded daemon remove them. An upgraded daemon first carries the
/// flows of `CONNTRACK_V3` and `CONNTRACK_V2` over into the current map
/// (see `ConntrackKey4::from_mapped`, `ConntrackKeyV2`); those of
/// `CONNTRACK_V1` cannot be.
pub const LEGACY_MAPS: [&str; 9] = [
    "CONNTRACK_V1",
    "CONNTRACK_V2",
    CONNTRACK_V3_MAP,
    "STATS_V1",
    "STATS_V2",
    "FRAGMENTS_V1",
    "CONFIG_V1",
    "CONFIG_V2",
    "FLOW_CACHE_V1",
];

/// `CONNTRACK_V3`: the conntrack map before it was split by address family,
/// keyed by [`ConntrackKey`] (16-byte addresses), the value as now.
pub const CONNTRACK_V3_MAP: &str = "CONNTRACK_V3";

/// `CONNTRACK_V2`'s key: the direction was in the key. Its value had the
/// layout of [`ConntrackValue`] with `direction` and `_pad` unused.
pub const CONNTRACK_V2_MAP: &str = "CONNTRACK_V2";

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConntrackKeyV2 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

impl ConntrackKeyV2 {
    /// The current key and value of a `CONNTRACK_V2` entry.
    pub fn upgrade(&self, value: &ConntrackValue) -> (ConntrackKey, ConntrackValue) {
        let key = ConntrackKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        };
        let value = ConntrackValue {
            direction: self.direction,
            backend_epoch: 0,
            ..*value
        };
        (key, value)
    }
}

/// Every map kproxy pins, in the order `kproxy cleanup` removes them.
pub const ALL_MAPS: [&str; 17] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    REV_NAT_MAP,
    CONNTRACK_MAP,
    STATS_MAP,
    CONFIG_MAP,
    AFFINITY_MAP,
    MAGLEV_MAP,
    RR_MAP,
    BACKEND_CONNS_MAP,
    FRAGMENTS_MAP,
    SOURCE_RANGES_MAP,
    ROUTE_CACHE_MAP,
    FLOW_CACHE_MAP,
    FLOW_GEN_MAP,
    ADDRESS_FILTER_MAP,
    FRONTEND_STATS_MAP,
];

/// Default capacities; userspace may override them at load time.
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
pub const BACKENDS_MAX_ENTRIES: u32 = 131_072;
pub const REV_NAT_MAX_ENTRIES: u32 = 65_536;
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
pub const MAGLEV_MAX_ENTRIES: u32 = 1_048_576;
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 65_536;
/// Slots of each CPU's route cache (a power of two: the index is a masked
/// hash).
pub const ROUTE_CACHE_SLOTS: u32 = 1_024;
/// How long a cached FIB answer is used: the most a route or neighbour
/// change takes to reach the packets of established flows the datapath
/// routes itself.
pub const ROUTE_CACHE_TTL_NS: u64 = 100_000_000;
/// Slots of each CPU's flow cache, and generations in `FLOW_GEN_V1` (a
/// power of two: the index is a masked hash of the tuple).
pub const FLOW_CACHE_SLOTS: u32 = 4_096;
/// The longest a cached translation is used before the packet takes the
/// conntrack lookup again (which refreshes the entry's `last_seen_ns` and
/// its place in the LRU, and refills the slot). Half the flow's timeout
/// when that is shorter, so an active flow never looks idle to the sweep.
pub const FLOW_CACHE_TTL_NS: u64 = 100_000_000;
/// [`FlowCacheSlot::flags`]: a reply (counted as reverse NAT).
pub const FLOW_CACHE_REPLY: u8 = 1;
/// The packet leaves by its route (`route_out` of the rewrite).
pub const FLOW_CACHE_ROUTE_OUT: u8 = 2;
/// The packet goes to this node's stack through `lo` (`to_host`).
pub const FLOW_CACHE_TO_HOST: u8 = 4;
/// Filled by an external hook (XDP or tc on `--interfaces`): only those
/// use it, as only pod hooks use the others.
pub const FLOW_CACHE_EXTERNAL: u8 = 8;
/// Least-connection schedulers look at this many backends (a random window
/// of them when a Service has more).
pub const LC_SCAN_MAX: u32 = 32;

/// The tc program attached to pod-facing interfaces.
pub const TC_POD_PROGRAM: &str = "kproxy_tc_pod";
/// The XDP program on the external interfaces (`--interfaces`).
pub const XDP_EXTERNAL_PROGRAM: &str = "kproxy_xdp_external";
/// Loaded but attached nowhere: test-run at load to scale jiffies to
/// CLOCK_MONOTONIC (`DatapathConfig::clock_tick_ns`), and once per
/// conntrack sweep to check that scale.
pub const CLOCK_PROGRAM: &str = "kproxy_clock";
/// The tc program behind it on the same interfaces: what XDP passes on
/// (rejects, fragments, ICMP errors, flows whose next hop has no neighbour
/// entry yet), and the whole external path with `--xdp-mode off`.
pub const TC_EXTERNAL_PROGRAM: &str = "kproxy_tc_external";

/// Source ports for source-NATed flows (external traffic with policy
/// Cluster to a backend on another node, hairpin). Above Linux's default
/// ephemeral range (32768-60999), so the node's own connections never
/// collide with them.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// `ServiceKey::scope`: who is asking. Internal: traffic from pods and from
/// this node (ClusterIP with its internal policy; external frontends with
/// Cluster behaviour, kube-proxy's short-circuit). External: traffic that
/// arrived from outside the node (the external traffic policy's set).
pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// `ServiceValue::flags` on slot 0.
/// The entry only marks its address as a known VIP (port 0, proto 0):
/// traffic to an unknown port of a known VIP is rejected, not passed.
pub const SVC_FLAG_VIP_MARKER: u16 = 1 << 0;
/// The live Maglev table is generation 1 (`MAGLEV_GEN_BIT` set in indexes).
pub const SVC_FLAG_MAGLEV_GEN: u16 = 1 << 1;
/// Traffic policy Local: with no endpoint, drop silently (the client times
/// out) instead of rejecting.
pub const SVC_FLAG_DROP_WHEN_EMPTY: u16 = 1 << 2;
/// `loadBalancerSourceRanges`: only sources in `SOURCE_RANGES_V1` under this
/// frontend's id may open flows; others are dropped.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 3;
/// Source-NATed to this node whatever backend a flow gets, on this node or
/// another (SPEC 5, as kube-proxy masquerades it): external traffic with
/// `externalTrafficPolicy: Cluster` (an external scope entry), and with
/// `--masquerade-all` all traffic to a ClusterIP (its internal entry).
pub const SVC_FLAG_SNAT: u16 = 1 << 4;

/// `ServiceValue::algorithm` on slot 0: how a new flow picks its backend.
pub const ALG_RANDOM: u8 = 0;
pub const ALG_MAGLEV: u8 = 1;
pub const ALG_RR: u8 = 2;
pub const ALG_LC: u8 = 3;
pub const ALG_SH: u8 = 4;
pub const ALG_DH: u8 = 5;
pub const ALG_SED: u8 = 6;
pub const ALG_NQ: u8 = 7;

/// `BackendValue::state`.
pub const BACKEND_STATE_ACTIVE: u8 = 0;
pub const BACKEND_STATE_TERMINATING: u8 = 1;

/// `BackendValue::flags`: the endpoint runs on this node. External traffic
/// with policy Local to a local backend is only DNATed and handed to the
/// stack; traffic to a remote one is always source-NATed and sent straight
/// back out.
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 0;

/// `ConntrackKey::direction`.
pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// `ConntrackValue::state`. TCP: NEW after the SYN, ESTABLISHED once the
/// backend answered with SYN-ACK, CLOSING after a FIN, CLOSED after a RST.
/// UDP flows stay NEW. Each state has its own idle timeout (`DatapathConfig`).
pub const CT_STATE_NEW: u8 = 0;
pub const CT_STATE_ESTABLISHED: u8 = 1;
pub const CT_STATE_CLOSING: u8 = 2;
pub const CT_STATE_CLOSED: u8 = 3;

/// `ConntrackValue::flags`: the flow is translated on both sides (SNAT as
/// well as DNAT); `other_addr`/`other_port` hold the second rewrite.
pub const CT_FLAG_SNAT: u8 = 1 << 0;
/// The flow was opened by this node's own process (it came in on `lo`):
/// a reply arriving from another node goes back to `lo` once translated
/// (its new source is a local address, which other interfaces refuse).
pub const CT_FLAG_HOST: u8 = 1 << 1;

/// The loopback interface's index, in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Default idle timeouts (SPEC section 7; kube-proxy's conntrack settings).
pub const DEFAULT_TCP_SYN_TIMEOUT_NS: u64 = 60 * NS_PER_SEC;
pub const DEFAULT_TCP_ESTABLISHED_TIMEOUT_NS: u64 = 24 * 3600 * NS_PER_SEC;
pub const DEFAULT_TCP_CLOSE_WAIT_TIMEOUT_NS: u64 = 3600 * NS_PER_SEC;
pub const DEFAULT_TCP_CLOSED_TIMEOUT_NS: u64 = 10 * NS_PER_SEC;
pub const DEFAULT_UDP_TIMEOUT_NS: u64 = 60 * NS_PER_SEC;
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Indexes into the per-CPU `STATS_V3` array (`STATS_V2` had one fewer).
pub mod stat {
    /// Packets rewritten towards a backend (DNAT).
    pub const DNAT: u32 = 0;
    /// Replies rewritten back to the service address (reverse NAT).
    pub const REV_NAT: u32 = 1;
    /// New flows recorded in conntrack.
    pub const CT_CREATED: u32 = 2;
    /// Service traffic answered with ICMP port unreachable.
    pub const REJECT_NO_ENDPOINTS: u32 = 3;
    /// Traffic to a known VIP on a port no Service exposes.
    pub const REJECT_UNKNOWN_PORT: u32 = 4;
    /// Packets whose headers were truncated or malformed; passed untouched.
    pub const MALFORMED: u32 = 5;
    /// A slot pointed at a backend id that was not present (should not happen
    /// with the ordered update; counted so it shows up if it ever does).
    pub const MISSING_BACKEND: u32 = 6;
    /// Conntrack insert failed (map full even after LRU eviction).
    pub const CT_INSERT_FAILED: u32 = 7;
    /// Reject could not be built (e.g. IP options); the packet was dropped.
    pub const REJECT_FAILED: u32 = 8;
    /// Non-first IP fragments to a VIP (no L4 header to translate); passed.
    pub const FRAGMENT: u32 = 9;
    /// A TCP segment other than a SYN to a Service, with no tracked flow
    /// (or an expired one): dropped rather than sent to a random backend.
    pub const INVALID: u32 = 10;
    /// A conntrack entry found past its idle timeout and replaced.
    pub const CT_EXPIRED: u32 = 11;
    /// Later fragments translated like their first fragment.
    pub const FRAGMENT_NAT: u32 = 12;
    /// ICMP errors about a translated flow, translated back for the client.
    pub const ICMP_REV_NAT: u32 = 13;
    /// Traffic policy Local and no local endpoint: dropped silently.
    pub const DROP_NO_LOCAL_ENDPOINTS: u32 = 14;
    /// A source outside the frontend's `loadBalancerSourceRanges`: dropped.
    pub const DROP_SOURCE_RANGE: u32 = 15;
    /// New flows source-NATed (external, to a remote backend; hairpin).
    pub const SNAT: u32 = 16;
    /// No free SNAT port for a new flow after several tries: dropped.
    pub const SNAT_PORTS_EXHAUSTED: u32 = 17;
    /// Packets XDP handed to the tc program because it could not forward
    /// them itself (no neighbour entry for the next hop yet, other errors).
    pub const XDP_TO_TC: u32 = 18;
    /// Packets the external hook sent straight back out (XDP_TX or a
    /// redirect at XDP; a neighbour redirect at tc).
    pub const XDP_FORWARD: u32 = 19;
    /// A source-NATed flow with no route to its next hop: dropped.
    pub const NO_ROUTE: u32 = 20;
    /// A packet to forward whose TTL ran out: dropped.
    pub const TTL_EXCEEDED: u32 = 21;
    /// FIB lookups made for packets the datapath routes itself (the
    /// others were answered by the route cache, `ROUTE_CACHE_V1`).
    pub const FIB_LOOKUP: u32 = 22;
    /// Packets of tracked flows that read their conntrack entry and left
    /// their translation in this CPU's flow cache slot (`FLOW_CACHE_V2`;
    /// a slot another flow still uses is left to it).
    pub const FLOW_CACHE_FILL: u32 = 23;
    /// Packets whose L4 checksum a tc rewrite updated through the
    /// `bpf_l4_csum_replace` helper rather than in place: a
    /// CHECKSUM_COMPLETE skb, or every rewrite where the datapath could
    /// not read the skb's checksum state (see `proxy-ebpf/src/skb.rs`).
    pub const CSUM_HELPER: u32 = 24;
    pub const COUNT: u32 = 25;

    /// Names for metrics and `kproxy status`, by index.
    pub const NAMES: [&str; 25] = [
        "dnat",
        "rev_nat",
        "ct_created",
        "reject_no_endpoints",
        "reject_unknown_port",
        "malformed",
        "missing_backend",
        "ct_insert_failed",
        "reject_failed",
        "fragment",
        "invalid",
        "ct_expired",
        "fragment_nat",
        "icmp_rev_nat",
        "drop_no_local_endpoints",
        "drop_source_range",
        "snat",
        "snat_ports_exhausted",
        "xdp_to_tc",
        "xdp_forward",
        "no_route",
        "ttl_exceeded",
        "fib_lookup",
        "flow_cache_fill",
        "csum_helper",
    ];
}

/// Key of the services map. Slot 0 of a (vip, port, proto, scope) holds the
/// frontend ([`ServiceValue::count`] etc.); slots `1..=count` hold backend ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: [u8; 2],
}

/// Value of the services map. On slots 1..=count: `backend_id`. On slot 0
/// (the frontend): `count`, `rev_nat_id` (this frontend's id), `flags`,
/// `algorithm`, `affinity_timeout` (seconds, 0 = no affinity),
/// `maglev_size` (the table size for `ALG_MAGLEV`), and in `backend_id` the
/// Service port's id: affinity is shared by all frontends of a Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub affinity_timeout: u32,
    pub maglev_size: u32,
    pub count: u16,
    pub flags: u16,
    pub algorithm: u8,
    pub _pad: [u8; 3],
}

/// Key of the session affinity map: a client of a Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    pub client: [u8; 16],
    pub service_port_id: u32,
    pub _pad: u32,
}

/// Value of the session affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// Key of the Maglev map: entry `index` of a frontend's lookup table.
/// Bit 31 of `index` is the table generation: a new table is written under
/// the other generation and committed by flipping `SVC_FLAG_MAGLEV_GEN` in
/// slot 0, so a table is always swapped whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MaglevKey {
    pub rev_nat_id: u32,
    pub index: u32,
}

pub const MAGLEV_GEN_BIT: u32 = 1 << 31;

/// Key of the fragments map: one fragmented datagram, as its fragments
/// arrive (before translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragmentKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub id: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// One slot of the per-CPU route cache (`ROUTE_CACHE_V1`): a FIB lookup's
/// question and its answer. Addresses as in the packet (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RouteCacheSlot {
    /// The question: the destination, the interface the packet arrived
    /// on, and 1 when the caller resolves the next hop itself (no
    /// neighbour lookup, no MACs in the answer).
    pub dst: [u8; 4],
    pub ingress: u32,
    pub skip_neigh: u8,
    pub _pad: [u8; 3],
    /// The answer: the interface out, the source address the kernel would
    /// pick, and the Ethernet addresses for the next hop.
    pub ifindex: u32,
    pub src: [u8; 4],
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// When it was looked up (the datapath's clock, CLOCK_MONOTONIC); 0:
    /// never.
    pub looked_up_ns: u64,
}

/// One slot of the per-CPU flow cache (`FLOW_CACHE_V2`): how the last
/// packet of a tracked flow with this tuple was translated, so the next
/// ones skip the conntrack hash lookup. Valid while `generation` is the
/// tuple's in `FLOW_GEN_V1`, `backend_epoch` the datapath's, and for
/// `ttl_ns` after `filled_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowCacheSlot {
    /// The packet's tuple, as its conntrack key (all zero: empty).
    pub key: ConntrackKey4,
    /// When the slot was filled (the datapath's clock).
    pub filled_ns: u64,
    /// The rewrite: the packet's new source and destination (its own where
    /// a side is not translated). Addresses in network order, ports in
    /// host order.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// How long after `filled_ns` the slot is used.
    pub ttl_ns: u32,
    /// `FLOW_CACHE_*`.
    pub flags: u8,
    /// [`DatapathConfig::backend_epoch`] when filled.
    pub backend_epoch: u8,
    pub _pad: [u8; 2],
    /// The tuple's generation in `FLOW_GEN_V1` when filled.
    pub generation: u32,
    /// The flow's frontend entry (its rev-NAT id), whose
    /// [`FrontendStats`] the packet counts in.
    pub frontend: u32,
    pub _pad2: u32,
}

/// Value of `FRONTEND_STATS_V1`, a per-CPU array indexed by a frontend
/// entry's rev-NAT id (0 unused): the packets the datapath translated for
/// the frontend, both directions (to its backends and their replies), and
/// their bytes (L2 frame at XDP, the skb at tc). Userspace sums the CPUs;
/// an id's counters are zeroed when the id is released.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FrontendStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Value of the fragments map: the addresses the first fragment got (a
/// side that was not translated keeps its own address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragmentValue {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

pub const FRAGMENTS_MAX_ENTRIES: u32 = 8192;

/// The data of a `SOURCE_RANGES_V1` LPM key: a frontend id (big-endian, so
/// it is matched first and whole) and a client address. A range `a/n` of a
/// frontend is keyed with prefix length `ID_BITS + n` for IPv6 and
/// `ID_BITS + 96 + n` for IPv4 (stored IPv4-mapped); a lookup uses the
/// full length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SourceRange {
    pub rev_nat_id: [u8; 4],
    pub addr: [u8; 16],
}

impl SourceRange {
    /// Prefix length (bits) of the frontend id part of a key.
    pub const ID_BITS: u32 = 32;
}

/// Value of the backends map (key: backend id, `u32`, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BackendValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Value of the reverse-NAT map (key: service frontend id, `u32`, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RevNatValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A conntrack key in the family-neutral form (16-byte addresses): what
/// userspace works with, and the key of the older `CONNTRACK_V3`. The IPv4
/// map holds the same tuple as [`ConntrackKey4`]. The tuple is the packet's
/// own, as seen at the hook.
/// A forward entry is keyed by (client, VIP); a reply entry by
/// (backend, client or SNAT address). The direction is in the value, not
/// the key, so one lookup finds a packet's entry whichever way it goes.
/// The two kinds of tuple do not meet in practice: a forward key's
/// destination is a Service address and port, a reply key's destination is
/// a client, and where that client is a Service address too (hairpin and
/// node SNAT), its port comes from the SNAT range, inserted only where no
/// entry is. A clash needs a client whose own address is a Service address
/// with exactly matching ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConntrackKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of the IPv4 conntrack map (`CONNTRACK4_V1`): [`ConntrackKey`] with
/// four-byte addresses, 16 bytes in all. Every tracked packet hashes its
/// key (jhash, whose cost grows with the key's length) and compares it:
/// this is less than half of the 40-byte form. Userspace works with the
/// family-neutral [`ConntrackKey`] and converts at the map
/// (`ConntrackKey4::mapped`, `ConntrackKey4::from_mapped`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConntrackKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl ConntrackKey4 {
    /// Built as whole words: spelled field by field, the three pad bytes
    /// become a call to a byte-at-a-time `memset` in the eBPF object, paid
    /// by every packet. The addresses are the packet's own four bytes.
    #[inline(always)]
    pub const fn new(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> Self {
        #[repr(C)]
        struct Words {
            saddr: u32,
            daddr: u32,
            sport: u16,
            dport: u16,
            proto_and_pad: u32,
        }
        // SAFETY: both are repr(C), 16 bytes, every field at the same offset
        // (checked by the size asserts), and any bit pattern is valid.
        unsafe {
            core::mem::transmute::<Words, ConntrackKey4>(Words {
                saddr: u32::from_ne_bytes(saddr),
                daddr: u32::from_ne_bytes(daddr),
                sport,
                dport,
                proto_and_pad: u32::from_ne_bytes([proto, 0, 0, 0]),
            })
        }
    }

    /// The same tuple with IPv4-mapped addresses.
    pub const fn mapped(&self) -> ConntrackKey {
        ConntrackKey::new(
            ipv4_mapped(self.saddr),
            ipv4_mapped(self.daddr),
            self.sport,
            self.dport,
            self.proto,
        )
    }

    /// The IPv4 key of `key`; `None` when either address is not
    /// IPv4-mapped (an IPv6 flow, which this map does not hold).
    pub fn from_mapped(key: &ConntrackKey) -> Option<Self> {
        let v4 = |a: &[u8; 16]| Some(core::net::Ipv6Addr::from(*a).to_ipv4_mapped()?.octets());
        Some(Self::new(
            v4(&key.saddr)?,
            v4(&key.daddr)?,
            key.sport,
            key.dport,
            key.proto,
        ))
    }
}

/// Value of the conntrack map. The translated address is stored in the
/// entry itself, so an established flow keeps working when its backend
/// leaves the Service while it still runs (graceful drain).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConntrackValue {
    /// Forward: the backend address (new destination); reply: the service
    /// address (new source).
    pub nat_addr: [u8; 16],
    /// With `CT_FLAG_SNAT`: forward: the SNAT address (new source); reply:
    /// the client (new destination). Zero otherwise.
    pub other_addr: [u8; 16],
    pub nat_port: u16,
    pub other_port: u16,
    pub state: u8,
    pub flags: u8,
    /// `CT_DIR_FORWARD` (client -> VIP) or `CT_DIR_REPLY` (backend ->
    /// client).
    pub direction: u8,
    /// Forward entries of UDP flows: the backend epoch
    /// ([`DatapathConfig::backend_epoch`]) in which the datapath last found
    /// the flow's backend still programmed. While that is the current
    /// epoch, datagrams skip the re-check.
    pub backend_epoch: u8,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// CLOCK_MONOTONIC at tick resolution (see
    /// [`DatapathConfig::clock_tick_ns`]) of the last packet.
    pub last_seen_ns: u64,
}

/// The datapath's tunables, in `CONFIG_V3` (one entry). Zero means "use
/// the compiled-in default", so a datapath loaded without userspace (packet
/// fixtures) still behaves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DatapathConfig {
    pub tcp_syn_timeout_ns: u64,
    pub tcp_established_timeout_ns: u64,
    pub tcp_close_wait_timeout_ns: u64,
    pub tcp_closed_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    /// `CONFIG_FLAG_*`.
    pub flags: u64,
    /// The datapath's clock, CLOCK_MONOTONIC at tick resolution, read as
    /// `jiffies * clock_tick_ns + clock_offset_ns` (`bpf_jiffies64`, which
    /// the verifier inlines into one load, unlike a clock helper's call).
    /// Userspace measures both when it loads the datapath (`JiffyClock`);
    /// zero: not measured, read `bpf_ktime_get_coarse_ns` instead.
    pub clock_tick_ns: u64,
    /// See `clock_tick_ns` (wrapping arithmetic).
    pub clock_offset_ns: u64,
}

/// Placeholders the eBPF object carries where aya 0.14 cannot emit a kfunc
/// call or a CO-RE field offset; userspace patches them before loading
/// (`proxy-userspace/src/datapath/kfunc.rs`). The immediate of a
/// `call` that stands for the `bpf_cast_to_kern_ctx` kfunc.
pub const KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER: i32 = 0x6b66_0001;
/// The offset of a one-byte load from the kernel's `struct sk_buff` that
/// stands for the byte holding `ip_summed`; the instruction after it, a
/// right shift by 0, takes the field's bit position within that byte.
pub const SKB_IP_SUMMED_OFF_PLACEHOLDER: i16 = 0x7ff1;

/// Every frontend address has its address marker in the services map (the
/// daemon sets this once a sync wrote them all): a packet whose frontend
/// lookup missed, to an address without one, is no Service's, and passes
/// then. Until then (a datapath loaded over an older kproxy's maps) the
/// new-flow path decides, as before.
pub const CONFIG_FLAG_ADDRESS_MARKERS: u64 = 1 << 0;
/// The flow cache (`FLOW_CACHE_V2`) is off: every packet of a tracked flow
/// reads its conntrack entry (`kproxy run --no-flow-cache`; the benchmark
/// measures both ways).
pub const CONFIG_FLAG_NO_FLOW_CACHE: u64 = 1 << 1;
/// `ADDRESS_FILTER_V1` holds the bit of every IPv4 frontend address (the
/// daemon sets this once a sync wrote it): a packet whose destination's
/// bit is clear is no Service's without any hash lookup. A set bit only
/// says "maybe" (another address may share it): the frontend lookup and,
/// when that misses, the address marker decide.
pub const CONFIG_FLAG_ADDRESS_FILTER: u64 = 1 << 2;
/// Bits 8-15 of the flags: the backend epoch. Userspace starts a new one
/// (adds one) after every sync that deleted map entries, and whenever it
/// loads the datapath. A UDP flow's datagrams re-check that the flow's
/// backend is still programmed once per epoch instead of each time: a
/// backend is only ever removed by such a sync.
pub const CONFIG_BACKEND_EPOCH_SHIFT: u32 = 8;

impl DatapathConfig {
    /// The current backend epoch (see [`CONFIG_BACKEND_EPOCH_SHIFT`]).
    #[inline(always)]
    pub const fn backend_epoch(&self) -> u8 {
        (self.flags >> CONFIG_BACKEND_EPOCH_SHIFT) as u8
    }

    /// The same tunables in backend epoch `epoch`.
    pub const fn with_backend_epoch(mut self, epoch: u8) -> Self {
        self.flags = (self.flags & !(0xff << CONFIG_BACKEND_EPOCH_SHIFT))
            | ((epoch as u64) << CONFIG_BACKEND_EPOCH_SHIFT);
        self
    }

    /// The idle timeout of a flow in `state` for `proto`.
    #[inline(always)]
    pub fn timeout_ns(&self, proto: u8, state: u8) -> u64 {
        let (configured, default) = if proto != PROTO_TCP {
            (self.udp_timeout_ns, DEFAULT_UDP_TIMEOUT_NS)
        } else {
            match state {
                CT_STATE_NEW => (self.tcp_syn_timeout_ns, DEFAULT_TCP_SYN_TIMEOUT_NS),
                CT_STATE_ESTABLISHED => (
                    self.tcp_established_timeout_ns,
                    DEFAULT_TCP_ESTABLISHED_TIMEOUT_NS,
                ),
                CT_STATE_CLOSING => (
                    self.tcp_close_wait_timeout_ns,
                    DEFAULT_TCP_CLOSE_WAIT_TIMEOUT_NS,
                ),
                _ => (self.tcp_closed_timeout_ns, DEFAULT_TCP_CLOSED_TIMEOUT_NS),
            }
        };
        if configured == 0 {
            default
        } else {
            configured
        }
    }
}

const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 64);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 8);
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);
const _: () = assert!(core::mem::size_of::<FragmentValue>() == 32);
const _: () = assert!(core::mem::size_of::<BackendValue>() == 24);
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 20);
const _: () = assert!(core::mem::size_of::<RouteCacheSlot>() == 40);
const _: () = assert!(ROUTE_CACHE_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<FlowCacheSlot>() == 56);
const _: () = assert!(core::mem::size_of::<FrontendStats>() == 16);
const _: () = assert!(FLOW_CACHE_SLOTS.is_power_of_two());
const _: () = assert!(FLOW_CACHE_TTL_NS <= u32::MAX as u64);
const _: () = assert!(core::mem::size_of::<ConntrackKey>() == 40);
const _: () = assert!(core::mem::size_of::<ConntrackKey4>() == 16);
const _: () = assert!(core::mem::size_of::<ConntrackKeyV2>() == 40);
const _: () = assert!(core::mem::size_of::<ConntrackValue>() == 56);
const _: () = assert!(core::mem::size_of::<SourceRange>() == 20);
const _: () = assert!(ADDRESS_FILTER_WORDS == 1 << 16);

// SAFETY: all types are #[repr(C)], made only of integers and byte arrays,
// with explicit padding (checked by the size asserts above and bytemuck).
#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for ConntrackKey {}
    unsafe impl aya::Pod for ConntrackKey4 {}
    unsafe impl aya::Pod for ConntrackKeyV2 {}
    unsafe impl aya::Pod for ConntrackValue {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for AddressFilter {}
    unsafe impl aya::Pod for FrontendStats {}
    unsafe impl bytemuck::Zeroable for AddressFilter {}
    unsafe impl bytemuck::Pod for AddressFilter {}
}

/// Words of [`AddressFilter`]: 2^22 bits (512 KiB). At 100 000 frontend
/// addresses about 2.4% of the bits are set, so about 2.4% of the other
/// addresses share a bit with one and take the frontend and address-marker
/// lookups.
pub const ADDRESS_FILTER_WORDS: usize = 1 << 16;

/// The value of `ADDRESS_FILTER_V1` (one entry): bit
/// [`address_filter_slot`] of every IPv4 frontend address is set. The
/// datapath tests a packet's destination here before any hash lookup
/// (`CONFIG_FLAG_ADDRESS_FILTER`); userspace rewrites the whole value when
/// the set of frontend addresses changes. A write racing a read can only
/// mix old and new bytes, and a bit set in both stays set.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AddressFilter {
    pub words: [u64; ADDRESS_FILTER_WORDS],
}

/// Where an IPv4 address (as a number, host order) is in the
/// [`AddressFilter`]: the word and the bit in it.
#[inline(always)]
pub const fn address_filter_slot(addr: u32) -> (usize, u64) {
    let h = mix(addr);
    ((h >> 16) as usize, 1 << (h & 63))
}

/// A stable 32-bit mix of a number (murmur3's finalizer): addresses as
/// numbers (host order), so every node and version hashes alike.
#[inline(always)]
pub const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `::ffff:a.b.c.d` for an IPv4 address given in network byte order.
///
/// Built from two 8-byte words: spelled as sixteen bytes, the ten leading
/// zeros become a call to a byte-at-a-time `memset` in the eBPF object,
/// which every packet paid several times.
#[inline(always)]
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    let low = u64::from_ne_bytes([0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]);
    // SAFETY: [u64; 2] and [u8; 16] have the same size and any bit pattern
    // is valid for both.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([0, low]) }
}

/// Two addresses compared as two 8-byte words (`==` on `[u8; 16]` is a
/// byte-at-a-time `bcmp` call in the eBPF object).
#[inline(always)]
pub fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    // SAFETY: both are 16 readable bytes; unaligned reads cope with any
    // alignment.
    unsafe {
        let (a, b) = (a.as_ptr().cast::<u64>(), b.as_ptr().cast::<u64>());
        core::ptr::read_unaligned(a) == core::ptr::read_unaligned(b)
            && core::ptr::read_unaligned(a.add(1)) == core::ptr::read_unaligned(b.add(1))
    }
}

impl ConntrackKey {
    /// The key of a tuple, padding zeroed.
    pub const fn new(saddr: [u8; 16], daddr: [u8; 16], sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: [0; 3],
        }
    }
}

impl ServiceKey {
    #[inline(always)]
    pub const fn new(addr: [u8; 16], port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            scope,
            slot,
            _pad: [0; 2],
        }
    }

    /// The marker entry saying "this address is a VIP".
    #[inline(always)]
    pub const fn vip_marker(addr: [u8; 16]) -> Self {
        Self::new(addr, 0, 0, SCOPE_INTERNAL, 0)
    }

    /// "Some frontend has this address" (any kind, NodePort node addresses
    /// included), value flagged `SVC_FLAG_VIP_MARKER`. A key of its own,
    /// not the VIP marker's, so an older datapath never takes a node
    /// address for a ClusterIP.
    pub const fn address_marker(addr: [u8; 16]) -> Self {
        Self::new(addr, 0, 0, SCOPE_EXTERNAL, 0)
    }
}

/// SCTP's checksum (RFC 9260, appendix A): CRC32c over the whole SCTP
/// packet, with no pseudo-header, stored as the little-endian bytes of the
/// final CRC. A NAT that rewrites only the ports (the first four bytes)
/// updates it without reading the packet: the CRC is linear, so the new
/// one is the old one XOR the CRC (initial value 0, no final XOR) of the
/// four changed bytes followed by as many zero bytes as the rest of the
/// packet, which is the four bytes' CRC times x^(8n) modulo the
/// polynomial ([`crc32c::SHIFT`] holds those powers).
pub mod crc32c {
    /// The Castagnoli polynomial, bit-reversed (x^0 is bit 31).
    pub const POLY: u32 = 0x82F6_3B78;

    /// The byte-at-a-time table of the reflected CRC.
    pub const TABLE: [u32; 256] = table();

    /// `SHIFT[k]` = x^(32k) mod P: what a CRC register becomes over `k`
    /// zero words is it times this ([`multiply`]). SCTP packets are whole
    /// words long, and an IPv4 packet is shorter than 64 KiB.
    pub const SHIFT_WORDS: usize = 16_384;
    pub static SHIFT: [u32; SHIFT_WORDS] = shift();

    const fn table() -> [u32; 256] {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    }

    const fn shift() -> [u32; SHIFT_WORDS] {
        let mut shift = [0u32; SHIFT_WORDS];
        // x^0; and x^32 mod P is the polynomial's lower terms.
        shift[0] = 1 << 31;
        let mut k = 1;
        while k < SHIFT_WORDS {
            shift[k] = multiply(shift[k - 1], POLY);
            k += 1;
        }
        shift
    }

    /// a(x) * b(x) mod P, both bit-reversed (zlib's `multmodp`), in a
    /// fixed 32 steps.
    #[inline(always)]
    pub const fn multiply(a: u32, mut b: u32) -> u32 {
        let mut product = 0;
        let mut i = 0;
        while i < 32 {
            if a & (1 << (31 - i)) != 0 {
                product ^= b;
            }
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
            i += 1;
        }
        product
    }

    /// The CRC (initial value 0, no final XOR) of four bytes, in packet
    /// order as one native little-endian word.
    #[inline(always)]
    pub const fn of_word(word: u32) -> u32 {
        let bytes = word.to_le_bytes();
        let mut crc = 0u32;
        let mut i = 0;
        while i < 4 {
            crc = TABLE[((crc ^ bytes[i] as u32) & 0xff) as usize] ^ (crc >> 8);
            i += 1;
        }
        crc
    }

    /// The stored CRC of an SCTP packet of `len` bytes whose first word
    /// (the ports, native little-endian load of the packet bytes) changed
    /// from `old_word` to `new_word`; `None` when `len` is no whole number
    /// of words or out of range.
    #[inline(always)]
    pub fn update(check: u32, len: usize, old_word: u32, new_word: u32) -> Option<u32> {
        if !len.is_multiple_of(4) || len < 4 || (len - 4) / 4 >= SHIFT_WORDS {
            return None;
        }
        let shift = SHIFT[((len - 4) / 4) & (SHIFT_WORDS - 1)];
        Some(check ^ multiply(shift, of_word(old_word ^ new_word)))
    }
}

#[cfg(test)]
mod crc32c_tests {
    extern crate std;
    use std::vec::Vec;

    use super::crc32c;

    /// CRC32c as the `crc` crate computes it (CRC-32/ISCSI, RFC 9260's).
    fn crc32c_reference(data: &[u8]) -> u32 {
        crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(data)
    }

    #[test]
    fn rfc_check_value() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c_reference(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn a_port_change_updates_the_crc_as_a_full_recomputation_does() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for words in [1usize, 3, 5, 16, 100, 375, 2304, 16_383] {
            let len = words * 4;
            let mut packet: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let old = crc32c_reference(&packet);
            let old_word = u32::from_le_bytes(packet[..4].try_into().unwrap());
            let new_word = next() as u32;
            packet[..4].copy_from_slice(&new_word.to_le_bytes());
            assert_eq!(
                crc32c::update(old, len, old_word, new_word),
                Some(crc32c_reference(&packet)),
                "{len} bytes"
            );
        }
        assert_eq!(crc32c::update(0, 6, 1, 2), None, "not whole words");
        assert_eq!(crc32c::update(0, 65_540, 1, 2), None, "too long");
    }
}
