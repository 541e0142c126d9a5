//! The service path, written once for every hook (generic over `Packet`):
//! reverse NAT for replies, conntrack for established flows, backend
//! selection and DNAT for new flows, reject or drop when a Service has
//! nothing to offer.
//!
//! Two kinds of hook share it. The pod hook (`EXTERNAL = false`, tc on pod
//! interfaces) serves traffic from pods and this node: ClusterIPs with
//! their internal policy, external frontends with Cluster behaviour, and
//! source-NATs hairpin flows (a pod reaching itself) to the service
//! address, or every ClusterIP flow to this node's address with
//! `--masquerade-all` (the replies of those from other nodes come back
//! through the external hook). The external hook (`EXTERNAL = true`, XDP and tc on
//! `--interfaces`) serves traffic from outside: NodePorts, LoadBalancer
//! IPs and externalIPs with their external policy and source ranges. A
//! remote backend is DNATed, source-NATed to the node and sent straight
//! back out; a local backend is only DNATed and handed to the stack (its
//! reply passes this node's pod hook anyway).

use core::mem::MaybeUninit;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use proxy_common::{
    addr_eq, address_filter_slot, stat, ConntrackKey4, ConntrackValue, DatapathConfig, ServiceKey,
    ServiceValue, SourceRange, BACKEND_FLAG_LOCAL, CONFIG_FLAG_ADDRESS_FILTER,
    CONFIG_FLAG_ADDRESS_MARKERS, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_HOST, CT_FLAG_SNAT,
    CT_STATE_CLOSED, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, LOOPBACK_IFINDEX,
    PROTO_TCP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SNAT_PORT_MAX, SNAT_PORT_MIN,
    SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    clock::now_ns,
    flow_cache, lb,
    maps::{
        config, count, count_frontend, ADDRESS_FILTER, BACKENDS, CONNTRACK, SERVICES, SOURCE_RANGES,
    },
    packet::{decrement_ttl, Packet},
    parse::{
        clear_addr, mapped, parse, unmapped, Flow, Ipv4, Skip, TCP_FLAG_ACK, TCP_FLAG_FIN,
        TCP_FLAG_RST, TCP_FLAG_SYN,
    },
};

/// How many random SNAT ports a new flow tries before giving up: enough
/// that a flow still finds one of the few left when nine in ten are taken
/// (it fails then with a chance of 0.9^128, about one in 700 000).
const SNAT_PROBES: u32 = 128;

/// The rewrite a packet gets: its new source and destination (equal to
/// the packet's own where that side is not translated).
#[derive(Clone, Copy, Default)]
pub struct Nat {
    pub saddr: Ipv4,
    pub sport: u16,
    pub daddr: Ipv4,
    pub dport: u16,
    /// Leaves by its route (FIB lookup, then out): a source-NATed flow at
    /// the external hook, or a flow of this node's own processes at `lo`.
    pub route_out: bool,
    /// A reply at the external hook to a flow this node's own process
    /// opened: handed to the stack through `lo`.
    pub to_host: bool,
    /// The flow's frontend entry (rev-NAT id): the packet counts in its
    /// `FRONTEND_STATS_V1` once it is rewritten.
    pub frontend: u32,
}

#[inline(always)]
pub fn handle<P: Packet, const EXTERNAL: bool>(ctx: &P) -> i32 {
    let mut flow = MaybeUninit::<Flow>::uninit();
    match parse(ctx, flow.as_mut_ptr()) {
        Ok(()) => {}
        Err(Skip::NotService) => return P::PASS,
        Err(Skip::Malformed) => {
            count(stat::MALFORMED);
            return P::PASS;
        }
        Err(Skip::Fragment(id)) => return ctx.later_fragment(&id, EXTERNAL),
        Err(Skip::Icmp { l4_off }) => return ctx.icmp_error(l4_off, EXTERNAL),
    };
    // SAFETY: `parse` wrote all of it.
    let flow = unsafe { flow.assume_init_ref() };
    // The first fragment of a datagram leaves a record for the later ones,
    // which only tc keeps: the whole datagram goes that way.
    if P::IS_XDP && flow.first_fragment {
        return P::PASS;
    }
    let config = config();
    let now = now_ns(config);
    let mut nat = Nat {
        saddr: flow.saddr,
        sport: flow.sport,
        daddr: flow.daddr,
        dport: flow.dport,
        route_out: false,
        to_host: false,
        frontend: 0,
    };
    // Most packets belong to a flow this CPU translated moments ago.
    let cache = flow_cache::Probe::new(flow, config);
    let tracked = if cache.hit::<EXTERNAL>(flow, config, now, &mut nat) {
        TRANSLATE
    } else {
        tracked::<EXTERNAL>(flow, config, now, &cache, &mut nat)
    };
    if tracked == NOT_TRACKED {
        let frontend = match destination::<EXTERNAL>(config, flow) {
            Destination::NoService => return P::PASS,
            Destination::Frontend(frontend) => Some(frontend),
            Destination::Undecided => None,
        };
        let verdict = open_new::<P, EXTERNAL>(ctx, flow, now, frontend, &mut nat);
        if verdict == REJECT {
            return ctx.reject(flow);
        }
        if verdict != TRANSLATE {
            return verdict as i32;
        }
    } else if tracked != TRANSLATE {
        return if tracked == DROP { P::DROP } else { P::PASS };
    }
    finish(ctx, flow, &nat)
}

/// What the entry point learns of the destination of a packet no flow
/// knows, before any call.
enum Destination {
    /// No frontend has this address, whatever the port (most of what a
    /// node carries): the packet is not ours.
    NoService,
    /// This hook's frontend for the packet's address, port and protocol,
    /// handed to `new_flow`: a new flow looks it up once.
    Frontend(&'static ServiceValue),
    /// No frontend in this hook's scope, but the address is a frontend's
    /// (another port of a VIP or a node address, a ClusterIP reached from
    /// outside), or the markers are not known to be complete (maps an
    /// older kproxy filled): `new_flow` decides.
    Undecided,
}

/// First the address filter, if userspace says it is complete: a clear
/// bit says "no Service" with one load and no hash lookup. A set bit (a
/// frontend address, or one sharing its bit) leads to the frontend lookup
/// in this hook's scope, which a new flow needs anyway. Only when that
/// misses does the address marker, which every frontend address has, tell
/// the rest apart, once userspace says the markers are complete (until
/// then, a datapath loaded over an older kproxy's maps, `new_flow`
/// decides). A packet that is no Service's but whose address shares a bit
/// with a frontend's pays both lookups.
#[inline(always)]
fn destination<const EXTERNAL: bool>(config: &DatapathConfig, flow: &Flow) -> Destination {
    if config.flags & CONFIG_FLAG_ADDRESS_FILTER != 0 && !may_be_frontend(flow.daddr) {
        return Destination::NoService;
    }
    let daddr = mapped(flow.daddr);
    let mut key = frontend_key::<EXTERNAL>(flow);
    if let Some(frontend) = unsafe { SERVICES.get(&key) } {
        return Destination::Frontend(frontend);
    }
    // The marker's key in place of the frontend's: one key in the entry
    // point's frame, which every path adds to.
    key = ServiceKey::address_marker(daddr);
    if config.flags & CONFIG_FLAG_ADDRESS_MARKERS != 0 && unsafe { SERVICES.get(&key) }.is_none() {
        Destination::NoService
    } else {
        Destination::Undecided
    }
}

/// The key of the packet's frontend in this hook's scope: internal at the
/// pod hook, external at the external hook.
#[inline(always)]
fn frontend_key<const EXTERNAL: bool>(flow: &Flow) -> ServiceKey {
    let scope = if EXTERNAL {
        SCOPE_EXTERNAL
    } else {
        SCOPE_INTERNAL
    };
    ServiceKey::new(mapped(flow.daddr), flow.dport, flow.proto, scope, 0)
}

/// The address filter's bit for `daddr` is set. An array lookup, which the
/// verifier inlines: no call, no hash of the key.
#[inline(always)]
fn may_be_frontend(daddr: Ipv4) -> bool {
    let (word, bit) = address_filter_slot(u32::from_be(daddr));
    ADDRESS_FILTER
        .get(0)
        .and_then(|filter| filter.words.get(word))
        .map_or(true, |w| w & bit != 0)
}

/// A packet no tracked flow knows: decide (`new_flow`), take the SNAT
/// address where one is needed, record the flow (`open_flow`). Returns
/// `TRANSLATE` with `nat` filled, or the verdict. Its own BPF function, so
/// that its locals are not in the entry point's frame, which every path
/// adds to.
#[inline(never)]
fn open_new<P: Packet, const EXTERNAL: bool>(
    ctx: &P,
    flow: &Flow,
    now: u64,
    frontend: Option<&ServiceValue>,
    nat: &mut Nat,
) -> i64 {
    let from_host = !EXTERNAL && ctx.ingress_ifindex() == LOOPBACK_IFINDEX;
    // Uninitialised until `new_flow` opens the flow: zeroing it first is a
    // byte-wise `memset` call in BPF, paid by every untracked packet.
    let mut pending = MaybeUninit::<Pending>::uninit();
    match new_flow::<EXTERNAL>(flow, now, from_host, frontend, pending.as_mut_ptr()) {
        NewFlow::Verdict(Verdict::Pass) => return P::PASS as i64,
        NewFlow::Verdict(Verdict::Drop) => return P::DROP as i64,
        // Rejected by the entry point: `reject` builds its reply in a large
        // frame of its own, which must not add to this one.
        NewFlow::Reject => return REJECT,
        NewFlow::Open => {}
    }
    // SAFETY: `new_flow` wrote all of it when it returned `Open`.
    let pending = unsafe { pending.assume_init_ref() };
    let snat_addr = match pending.snat {
        Snat::None => 0,
        // Hairpin: the pod sees its own connection come from the Service,
        // and answers through us.
        Snat::Hairpin => flow.daddr,
        // To the node: masquerade to the address the route picks.
        Snat::Node => match ctx.route(pending.backend_addr) {
            Some(route) => u32::from_ne_bytes(route.src),
            None => return no_route::<P>() as i64,
        },
    };
    if !open_flow(flow, pending, snat_addr, now, nat) {
        return P::DROP as i64;
    }
    // A flow of this node's own process leaves by its route: a packet that
    // looped through `lo` still carries the local route it was sent with,
    // so the stack would deliver it locally despite the new destination.
    nat.route_out = (EXTERNAL && pending.snat == Snat::Node) || from_host;
    TRANSLATE
}

/// Applies `nat`. The common case, a packet the stack takes on (no route
/// of its own, not for `lo`, no fragments to follow), is inlined into the
/// entry point: a BPF-to-BPF call and its return cost more than the
/// rewrite itself. The rest goes to `finish_routed`.
#[inline(always)]
fn finish<P: Packet>(ctx: &P, flow: &Flow, nat: &Nat) -> i32 {
    if nat.route_out || nat.to_host || flow.first_fragment {
        return finish_routed(ctx, flow, nat);
    }
    if rewrite(ctx, flow, nat) {
        count_frontend(nat.frontend, ctx.len());
        P::PASS
    } else {
        P::DROP
    }
}

/// Rewrites the packet to `nat`, if that changes anything.
#[inline(always)]
fn rewrite<P: Packet>(ctx: &P, flow: &Flow, nat: &Nat) -> bool {
    (nat.saddr, nat.sport, nat.daddr, nat.dport) == (flow.saddr, flow.sport, flow.daddr, flow.dport)
        || ctx.rewrite(flow, nat)
}

/// A flow with `route_out` leaves through the interface its route names, a
/// reply with `to_host` goes to `lo`, a first fragment leaves a record for
/// the later ones. Its own BPF function: the route lives in its frame.
#[inline(never)]
fn finish_routed<P: Packet>(ctx: &P, flow: &Flow, nat: &Nat) -> i32 {
    if nat.to_host && P::IS_XDP {
        count(stat::XDP_TO_TC);
        return P::PASS;
    }
    let route = if nat.route_out {
        match ctx.route(nat.daddr) {
            Some(r) => Some(r),
            None => return no_route::<P>(),
        }
    } else {
        None
    };
    if !rewrite(ctx, flow, nat) {
        return P::DROP;
    }
    count_frontend(nat.frontend, ctx.len());
    if flow.first_fragment {
        ctx.remember_fragment(flow);
    }
    if nat.to_host {
        return ctx.to_host();
    }
    match route {
        Some(route) => {
            // Forwarded here, not by the kernel: the TTL is ours to lower.
            if !decrement_ttl(ctx) {
                count(stat::TTL_EXCEEDED);
                return P::DROP;
            }
            count(stat::XDP_FORWARD);
            ctx.forward(&route)
        }
        None => P::PASS,
    }
}

/// XDP cannot complete the route (no neighbour entry for the next hop yet,
/// or none at all): the packet goes on untouched to the tc program, which
/// resolves the neighbour. At tc there is no route at all: drop.
#[inline(always)]
fn no_route<P: Packet>() -> i32 {
    if P::IS_XDP {
        count(stat::XDP_TO_TC);
        P::PASS
    } else {
        count(stat::NO_ROUTE);
        P::DROP
    }
}

/// `tracked` found no usable flow.
const NOT_TRACKED: i64 = -1;
/// `tracked` filled in the rewrite.
const TRANSLATE: i64 = -2;
const DROP: i64 = -3;
/// `open_new`: answer with an ICMP port unreachable.
const REJECT: i64 = -4;

/// A packet of a tracked flow: reverse NAT for replies, DNAT (and SNAT) to
/// the recorded backend for the client's side. Fills `nat` and returns
/// `TRANSLATE`, or returns `DROP` or `NOT_TRACKED`. Inlined into the entry
/// point, like `parse`: most packets belong to a tracked flow. The new-flow
/// path (`open_new`) stays a call of its own; the stack frames along one
/// chain of calls must fit in 512 bytes together.
#[inline(always)]
fn tracked<const EXTERNAL: bool>(
    flow: &Flow,
    config: &DatapathConfig,
    now: u64,
    cache: &flow_cache::Probe,
    nat: &mut Nat,
) -> i64 {
    // One lookup finds the packet's entry whichever way it goes: the
    // direction is in the value.
    let Some(entry) = CONNTRACK.get_ptr_mut(&ct_key(flow)) else {
        return NOT_TRACKED;
    };
    // SAFETY: a valid map value pointer for the duration of the program.
    let entry = unsafe { &mut *entry };

    // A reply from a backend of a tracked flow: restore the service address.
    let reply = entry.direction == CT_DIR_REPLY;
    nat.frontend = entry.rev_nat_id;
    if reply {
        if flow_expired(entry, flow, CT_DIR_FORWARD, config, now) {
            // Un-NATing it would leak the backend's address to the client,
            // which answers with a RST: drop, as kube-proxy drops INVALID.
            count(stat::CT_EXPIRED);
            return DROP;
        }
        entry.last_seen_ns = now;
        if flow.proto == PROTO_TCP {
            track_reply(entry, flow);
        }
        nat.saddr = unmapped(&entry.nat_addr);
        nat.sport = entry.nat_port;
        if entry.flags & CT_FLAG_SNAT != 0 {
            nat.daddr = unmapped(&entry.other_addr);
            nat.dport = entry.other_port;
            nat.route_out = EXTERNAL;
        }
        nat.to_host = EXTERNAL && entry.flags & CT_FLAG_HOST != 0;
        count(stat::REV_NAT);
    } else {
        if !forward_usable(entry, flow, config, now) {
            return NOT_TRACKED;
        }
        entry.last_seen_ns = now;
        if flow.proto == PROTO_TCP {
            track_forward(entry, flow);
        }
        nat.daddr = unmapped(&entry.nat_addr);
        nat.dport = entry.nat_port;
        if entry.flags & CT_FLAG_SNAT != 0 {
            nat.saddr = unmapped(&entry.other_addr);
            nat.sport = entry.other_port;
            nat.route_out = EXTERNAL;
        }
        if entry.flags & CT_FLAG_HOST != 0 {
            nat.route_out = true;
        }
        count(stat::DNAT);
    }
    cache.fill::<EXTERNAL>(flow, nat, reply, entry.state, now);
    TRANSLATE
}

/// Whether the client's packet may use its flow's entry. An established
/// flow keeps its backend, even one that left the Service while it still
/// runs (drain). A new TCP connection (SYN) re-checks that the backend is
/// still programmed, and so does a UDP flow once per backend epoch, so a
/// reused source port never lands on a removed endpoint and UDP clients
/// with a fixed source port move on when their backend goes away
/// (userspace also deletes such UDP flows at once).
#[inline(always)]
fn forward_usable(
    entry: &mut ConntrackValue,
    flow: &Flow,
    config: &DatapathConfig,
    now: u64,
) -> bool {
    if flow_expired(entry, flow, CT_DIR_REPLY, config, now) {
        count(stat::CT_EXPIRED);
        false
    } else if flow.proto == PROTO_TCP {
        // A SYN on a closing or closed flow is a new connection reusing
        // the port: pick again. Otherwise (a retransmission, a late
        // duplicate) it stays with its backend while that still exists.
        !flow.is_syn() || (entry.state <= CT_STATE_ESTABLISHED && backend_matches(entry))
    } else {
        udp_backend_current(entry, config)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Snat {
    None,
    /// To this node's address: external traffic with policy Cluster, a
    /// ClusterIP reached from outside, every ClusterIP flow with
    /// `--masquerade-all`.
    Node,
    /// A pod reaching itself through a Service.
    Hairpin,
}

/// A new flow's decision, before it is recorded.
#[derive(Clone, Copy)]
struct Pending {
    /// One word, read once from the backend's map value: copying its
    /// 16-byte form between two pointers is a byte-at-a-time `memmove` call
    /// in the eBPF object.
    backend_addr: Ipv4,
    backend_port: u16,
    backend_id: u32,
    rev_nat_id: u32,
    snat: Snat,
    /// Opened by this node's own process (arrived on `lo`).
    from_host: bool,
}

#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    Drop,
}

enum NewFlow {
    Verdict(Verdict),
    Reject,
    Open,
}

/// A packet with no tracked flow: take the frontend the entry point found
/// in this hook's scope (internal at the pod hook, external at the external
/// hook); without one, a ClusterIP reached from outside or an unknown port
/// of a VIP. Then apply source ranges and policy, pick a backend. A
/// separate BPF function so that its keys and values do not add to the
/// established-flow path's stack frame.
#[inline(never)]
fn new_flow<const EXTERNAL: bool>(
    flow: &Flow,
    now: u64,
    from_host: bool,
    in_scope: Option<&ServiceValue>,
    pending: *mut Pending,
) -> NewFlow {
    let saddr = mapped(flow.saddr);
    let daddr = mapped(flow.daddr);
    // Kept for the backend slots' keys (`lb::select`).
    let mut frontend_key = frontend_key::<EXTERNAL>(flow);
    // A ClusterIP reached from outside the cluster (a router sends the
    // Service range to this node): served, and source-NATed so the reply
    // comes back through us (SPEC 5). External frontends always have an
    // external-scope entry, so only ClusterIPs get here.
    let mut cluster_ip_from_outside = false;
    // `destination` looked this scope up already: `None` is its miss.
    let mut found = in_scope;
    if EXTERNAL && found.is_none() {
        frontend_key.scope = SCOPE_INTERNAL;
        found = unsafe { SERVICES.get(&frontend_key) };
        cluster_ip_from_outside = found.is_some();
    }
    let frontend = match found {
        Some(frontend) => frontend,
        None => {
            if unsafe { SERVICES.get(ServiceKey::vip_marker(daddr)) }.is_some() {
                count(stat::REJECT_UNKNOWN_PORT);
                return NewFlow::Reject;
            }
            return NewFlow::Verdict(Verdict::Pass);
        }
    };
    if frontend.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_allowed(frontend.rev_nat_id, saddr) {
        count(stat::DROP_SOURCE_RANGE);
        return NewFlow::Verdict(Verdict::Drop);
    }
    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count(stat::DROP_NO_LOCAL_ENDPOINTS);
            return NewFlow::Verdict(Verdict::Drop);
        }
        count(stat::REJECT_NO_ENDPOINTS);
        return NewFlow::Reject;
    }
    // Only a SYN opens a TCP flow; anything else without a tracked flow
    // would reach a random backend mid-stream.
    if flow.proto == PROTO_TCP && !flow.is_syn() {
        count(stat::INVALID);
        return NewFlow::Verdict(Verdict::Drop);
    }

    let Some(backend_id) = lb::select(flow, &frontend_key, frontend, &saddr, now) else {
        count(stat::MISSING_BACKEND);
        return NewFlow::Verdict(Verdict::Drop);
    };
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }) else {
        count(stat::MISSING_BACKEND);
        return NewFlow::Verdict(Verdict::Drop);
    };
    let decided = Pending {
        from_host,
        backend_addr: unmapped(&backend.addr),
        backend_port: backend.port,
        backend_id,
        rev_nat_id: frontend.rev_nat_id,
        snat: if EXTERNAL {
            // Policy Cluster SNATs whatever the backend; policy Local
            // (only local backends) keeps the client's address.
            if frontend.flags & SVC_FLAG_SNAT != 0
                || backend.flags & BACKEND_FLAG_LOCAL == 0
                || cluster_ip_from_outside
            {
                Snat::Node
            } else {
                Snat::None
            }
        } else if frontend.flags & SVC_FLAG_SNAT != 0 {
            // `--masquerade-all`: every flow to the ClusterIP, hairpin
            // included, as kube-proxy marks them all for masquerade.
            Snat::Node
        } else if addr_eq(&backend.addr, &saddr) {
            Snat::Hairpin
        } else {
            Snat::None
        },
    };
    // SAFETY: the caller's slot, valid for writes.
    unsafe { pending.write(decided) };
    NewFlow::Open
}

/// `loadBalancerSourceRanges`: the client is inside one of the frontend's.
#[inline(always)]
fn source_allowed(rev_nat_id: u32, client: [u8; 16]) -> bool {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        SourceRange::ID_BITS + 128,
        SourceRange {
            rev_nat_id: rev_nat_id.to_be_bytes(),
            addr: client,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// Records a new flow in both directions (the reply entry first, so a
/// forward entry never exists without its reply) and fills `nat`. A
/// source-NATed flow takes a free port in `SNAT_PORT_MIN..=SNAT_PORT_MAX`
/// of `snat_addr`: the reply entry is inserted only if no flow holds that
/// (backend, address, port) yet. Returns false when no port was free.
#[inline(never)]
fn open_flow(flow: &Flow, pending: &Pending, snat_addr: Ipv4, now: u64, nat: &mut Nat) -> bool {
    let saddr = mapped(flow.saddr);
    let daddr = mapped(flow.daddr);
    let snat = pending.snat != Snat::None;
    // One key and one value, rewritten in place for the forward direction:
    // this function's stack frame stays small.
    let mut entry = NewEntry {
        key: ct4(
            pending.backend_addr,
            flow.saddr,
            pending.backend_port,
            flow.sport,
            flow.proto,
        ),
        value: ConntrackValue {
            nat_addr: daddr,
            nat_port: flow.dport,
            state: CT_STATE_NEW,
            rev_nat_id: pending.rev_nat_id,
            backend_id: pending.backend_id,
            last_seen_ns: now,
            flags: if pending.from_host { CT_FLAG_HOST } else { 0 },
            direction: CT_DIR_REPLY,
            // The client, which a source-NATed flow's reply entry holds;
            // cleared below otherwise.
            other_addr: saddr,
            other_port: 0,
            backend_epoch: 0,
        },
        inserted: 0,
    };
    if snat {
        entry.value.flags |= CT_FLAG_SNAT;
        entry.value.other_port = flow.sport;
        entry.key.daddr = snat_addr.to_ne_bytes();
        // SAFETY: the callback only touches `entry`, which outlives the call.
        unsafe {
            bpf_loop(
                SNAT_PROBES,
                take_snat_port as *mut core::ffi::c_void,
                (&mut entry as *mut NewEntry).cast(),
                0,
            );
        }
        if entry.inserted == 0 {
            count(stat::SNAT_PORTS_EXHAUSTED);
            return false;
        }
        flow_cache::invalidate(&entry.key);
        count(stat::SNAT);
        nat.saddr = snat_addr;
        nat.sport = entry.key.dport;
        entry.value.other_addr = mapped(snat_addr);
        entry.value.other_port = entry.key.dport;
    } else {
        clear_addr(&mut entry.value.other_addr);
        entry.inserted = CONNTRACK.insert(&entry.key, &entry.value, 0).is_ok() as u8;
        flow_cache::invalidate(&entry.key);
    }
    entry.key = ct_key(flow);
    entry.value.direction = CT_DIR_FORWARD;
    entry.value.nat_addr = mapped(pending.backend_addr);
    entry.value.nat_port = pending.backend_port;
    let inserted = CONNTRACK.insert(&entry.key, &entry.value, 0).is_ok() && entry.inserted != 0;
    flow_cache::invalidate(&entry.key);
    if inserted {
        lb::flow_opened(pending.backend_id);
    }
    count(if inserted {
        stat::CT_CREATED
    } else {
        stat::CT_INSERT_FAILED
    });
    count(stat::DNAT);
    nat.daddr = pending.backend_addr;
    nat.dport = pending.backend_port;
    nat.frontend = pending.rev_nat_id;
    true
}

/// A conntrack entry being recorded, and whether it was (1): also the
/// state of the SNAT port search, passed to its `bpf_loop` callback.
struct NewEntry {
    key: ConntrackKey4,
    value: ConntrackValue,
    inserted: u8,
}

/// One try of the SNAT port search: a random port of
/// `SNAT_PORT_MIN..=SNAT_PORT_MAX`, taken when no flow to this backend
/// holds it (the reply entry is inserted only if absent). A lookup first:
/// a failed insert into the LRU map costs more (it takes a free element
/// before it finds the key, then gives it back). Random tries, not a
/// scan: taken ports leave no clusters to walk through. Returns 1 (stop)
/// once the entry is in.
extern "C" fn take_snat_port(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `NewEntry` passed by `open_flow`.
    let entry = unsafe { &mut *(ctx as *mut NewEntry) };
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    entry.key.dport = SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % span) as u16;
    if CONNTRACK.get_ptr_mut(&entry.key).is_some() {
        return 0;
    }
    if CONNTRACK
        .insert(&entry.key, &entry.value, BPF_NOEXIST)
        .is_ok()
    {
        entry.inserted = 1;
        return 1;
    }
    0
}

const BPF_NOEXIST: u64 = aya_ebpf::bindings::BPF_NOEXIST as u64;

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
    // The peer entry is keyed by the other side's view of the tuple: the
    // backend and the client (or, source-NATed, the SNAT address) for a
    // reply; the client and the service for a forward entry.
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    let (saddr, daddr, sport, dport) = if peer_direction == CT_DIR_REPLY {
        let (client, client_port) = if snat {
            (unmapped(&entry.other_addr), entry.other_port)
        } else {
            (flow.saddr, flow.sport)
        };
        (
            unmapped(&entry.nat_addr),
            client,
            entry.nat_port,
            client_port,
        )
    } else {
        let (client, client_port) = if snat {
            (unmapped(&entry.other_addr), entry.other_port)
        } else {
            (flow.daddr, flow.dport)
        };
        (
            client,
            unmapped(&entry.nat_addr),
            client_port,
            entry.nat_port,
        )
    };
    CONNTRACK.get_ptr_mut(&ct4(saddr, daddr, sport, dport, flow.proto))
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

/// A UDP flow's backend is still the one programmed under its id: looked
/// up once per backend epoch, not for every datagram (userspace starts a
/// new epoch after each sync that deleted map entries, and only such a
/// sync removes a backend).
#[inline(always)]
fn udp_backend_current(entry: &mut ConntrackValue, config: &DatapathConfig) -> bool {
    let epoch = config.backend_epoch();
    if entry.backend_epoch == epoch {
        return true;
    }
    if !backend_matches(entry) {
        return false;
    }
    entry.backend_epoch = epoch;
    true
}

/// A tracked backend is still the one programmed under its id.
#[inline(always)]
fn backend_matches(entry: &ConntrackValue) -> bool {
    match unsafe { BACKENDS.get(entry.backend_id) } {
        Some(b) => addr_eq(&b.addr, &entry.nat_addr) && b.port == entry.nat_port,
        None => false,
    }
}

/// The packet's own tuple: the key of its forward entry, or of its reply
/// entry when it comes from a backend.
#[inline(always)]
fn ct_key(flow: &Flow) -> ConntrackKey4 {
    ct4(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto)
}

#[inline(always)]
fn ct4(saddr: Ipv4, daddr: Ipv4, sport: u16, dport: u16, proto: u8) -> ConntrackKey4 {
    ConntrackKey4::new(
        saddr.to_ne_bytes(),
        daddr.to_ne_bytes(),
        sport,
        dport,
        proto,
    )
}
