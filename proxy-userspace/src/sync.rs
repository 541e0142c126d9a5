//! Applies a [`DesiredState`] to the maps as a delta, in an order where no
//! packet can ever see a half-written Service (DESIGN.md section 3):
//! backends, then slots 1..N, then rev-NAT, then slot 0 (the commit point),
//! then deletion of stale slots, rev-NAT entries and unreferenced backends.
//!
//! Each frontend is its own unit: if writing one fails (a full map, say),
//! it keeps what it had, the error is reported, and the others still sync.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use proxy_common::{
    ipv4_mapped, AddressFilter, BackendValue, MaglevKey, RevNatValue, ServiceKey, ServiceValue,
    SourceRange, BACKEND_FLAG_LOCAL, BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING,
    MAGLEV_GEN_BIT, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_MAGLEV_GEN,
    SVC_FLAG_SNAT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_VIP_MARKER,
};
use thiserror::Error;

use crate::address_filter::AddressFilterBits;
use crate::maglev::{self, MaglevBackend};
use crate::model::{Algorithm, DesiredState, FrontendKey, ServicePortName};

/// What the maps hold (or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub rev_nat: BTreeMap<u32, RevNatValue>,
    pub maglev: BTreeMap<MaglevKey, u32>,
    /// `loadBalancerSourceRanges` entries: (LPM prefix length, data).
    pub source_ranges: BTreeSet<SourceRangeKey>,
    /// The address filter; `None`: unknown (a write failed).
    pub address_filter: Option<AddressFilterBits>,
}

/// A `SOURCE_RANGES_V1` key: prefix length in bits and the data it covers.
pub type SourceRangeKey = (u32, SourceRange);

/// The LPM key allowing `addr/prefix` for frontend `rev_nat_id` (host
/// bits cleared, so each range has one canonical key).
pub fn source_range_key(rev_nat_id: u32, addr: IpAddr, prefix: u8) -> SourceRangeKey {
    let (bits, max) = match addr {
        IpAddr::V4(_) => (96 + u32::from(prefix.min(32)), 128),
        IpAddr::V6(_) => (u32::from(prefix.min(128)), 128),
    };
    let mut bytes = addr_bytes(addr);
    let host_bits = max - bits;
    let mask: u128 = if host_bits >= 128 {
        0
    } else {
        !0u128 << host_bits
    };
    bytes = (u128::from_be_bytes(bytes) & mask).to_be_bytes();
    (
        SourceRange::ID_BITS + bits,
        SourceRange {
            rev_nat_id: rev_nat_id.to_be_bytes(),
            addr: bytes,
        },
    )
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("map {map}: {message}{}", if *.full { " (the map is full: raise its size or reduce Services/endpoints)" } else { "" })]
pub struct WriteError {
    pub map: &'static str,
    /// The write failed because the map has no room left.
    pub full: bool,
    pub message: String,
}

/// Access to the datapath maps: the real pinned maps in production, an
/// in-memory fake in unit tests.
pub trait MapWriter {
    fn read_all(&self) -> Result<MapContents, WriteError>;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), WriteError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), WriteError>;
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), WriteError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), WriteError>;
    fn put_rev_nat(&mut self, id: u32, value: &RevNatValue) -> Result<(), WriteError>;
    fn delete_rev_nat(&mut self, id: u32) -> Result<(), WriteError>;
    fn put_maglev(&mut self, key: &MaglevKey, backend_id: u32) -> Result<(), WriteError>;
    fn delete_maglev(&mut self, key: &MaglevKey) -> Result<(), WriteError>;
    fn put_source_range(&mut self, key: &SourceRangeKey) -> Result<(), WriteError>;
    fn delete_source_range(&mut self, key: &SourceRangeKey) -> Result<(), WriteError>;
    /// Replaces the whole address filter (`ADDRESS_FILTER_V1`).
    fn put_address_filter(&mut self, filter: &AddressFilter) -> Result<(), WriteError>;
}

/// The 16-byte map form of an address (IPv4 is stored IPv4-mapped).
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 16-byte map address stands for.
pub fn addr_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    /// Frontend entries (one per scope) the desired state has.
    pub frontends: usize,
    /// Desired frontends planned by this apply (every one, or only those
    /// that changed since the last apply).
    pub planned: usize,
    pub backends: usize,
    /// Frontends left as they were because a write failed.
    pub failed: Vec<(FrontendKey, WriteError)>,
    /// Deletions that failed (retried on the next sync).
    pub failed_deletes: Vec<WriteError>,
    /// Writes of no one frontend's that failed (the address filter),
    /// retried on the next sync.
    pub failed_writes: Vec<WriteError>,
}

/// The entries one frontend needs.
struct FrontendEntries {
    frontend: FrontendKey,
    /// ClusterIPs only: the address gets a VIP marker (unknown ports are
    /// rejected). Node addresses (NodePorts) must never get one.
    vip_marker: bool,
    slot0: (ServiceKey, ServiceValue),
    slots: Vec<(ServiceKey, ServiceValue)>,
    rev_nat: (u32, RevNatValue),
    backends: Vec<(u32, BackendValue)>,
    /// For Maglev frontends: the lookup table, as backend ids.
    maglev_table: Option<Vec<u32>>,
    /// `loadBalancerSourceRanges` (external scope of LoadBalancer IPs).
    source_ranges: Vec<SourceRangeKey>,
}

/// Hands out the smallest ids not in use (ids start at 1; 0 means none).
/// Ids below `next` are in use unless listed in `free`.
#[derive(Default)]
struct IdAllocator {
    free: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().filter(|id| *id != 0).collect();
        let mut free = BTreeSet::new();
        let mut expected = 1;
        for &id in &used {
            free.extend(expected..id);
            expected = id.saturating_add(1);
        }
        Self {
            free,
            next: expected,
        }
    }

    fn allocate(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        let id = self.next;
        self.next = self.next.saturating_add(1);
        id
    }

    /// `id` is no longer in use.
    fn release(&mut self, id: u32) {
        if id != 0 && id < self.next {
            self.free.insert(id);
        }
    }
}

/// The Maglev table of a frontend, as backend ids. Backends are hashed by
/// "ip:port" so every node (and every restart) builds the same table.
fn maglev_table(backends: &[crate::model::Backend], ids: &[(u32, BackendValue)]) -> Vec<u32> {
    let names: Vec<String> = backends
        .iter()
        .map(|b| std::net::SocketAddr::new(b.ip, b.port).to_string())
        .collect();
    let input: Vec<MaglevBackend<'_>> = names
        .iter()
        .map(|n| MaglevBackend {
            key: n.as_bytes(),
            weight: 1,
        })
        .collect();
    let size = maglev::table_size_for(input.len());
    match maglev::build_table(&input, size) {
        Ok(table) => table.into_iter().map(|i| ids[i as usize].0).collect(),
        Err(err) => {
            tracing::error!(error = %err, "building a Maglev table failed; using slot order");
            (0..size as usize).map(|i| ids[i % ids.len()].0).collect()
        }
    }
}

/// The slot-0 key of `frontend`'s entry in `scope`.
fn slot0_key(frontend: &FrontendKey, scope: u8) -> ServiceKey {
    ServiceKey::new(
        addr_bytes(frontend.ip),
        frontend.port,
        frontend.protocol.number(),
        scope,
        0,
    )
}

/// Every services-map key of one frontend entry (slot 0 to the last slot):
/// the key orders by slot last, so they are one range.
fn entry_range(slot0: ServiceKey) -> std::ops::RangeInclusive<ServiceKey> {
    slot0..=ServiceKey {
        slot: u16::MAX,
        ..slot0
    }
}

fn range_id(key: &SourceRangeKey) -> u32 {
    u32::from_be_bytes(key.1.rev_nat_id)
}

/// What the maps hold, with indexes kept in step with every change, so a
/// change finds the entries it affects without scanning all of them.
#[derive(Default)]
struct Mirror {
    contents: MapContents,
    /// Slots (1..N) referencing each backend id.
    backend_users: HashMap<u32, u32>,
    /// Backends in the maps that no slot references.
    unreferenced_backends: BTreeSet<u32>,
    /// Frontend slot-0 entries naming each rev-NAT id.
    rev_nat_users: HashMap<u32, u32>,
    /// Rev-NAT entries no slot 0 names.
    unreferenced_rev_nat: BTreeSet<u32>,
    /// Source ranges per rev-NAT id.
    ranges: HashMap<u32, BTreeSet<SourceRangeKey>>,
}

impl Mirror {
    fn new(mut contents: MapContents) -> Self {
        let mut mirror = Mirror::default();
        mirror.contents.maglev = std::mem::take(&mut contents.maglev);
        mirror.contents.address_filter = contents.address_filter.take();
        for (id, value) in &contents.backends {
            mirror.set_backend(*id, *value);
        }
        for (id, value) in &contents.rev_nat {
            mirror.set_rev_nat(*id, *value);
        }
        for key in &contents.source_ranges {
            mirror.insert_range(*key);
        }
        for (key, value) in &contents.services {
            mirror.set_service(*key, *value);
        }
        mirror
    }

    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) {
        if let Some(old) = self.contents.services.insert(key, value) {
            self.unlink(&key, &old);
        }
        if value.flags & SVC_FLAG_VIP_MARKER != 0 {
            return;
        }
        if key.slot == 0 {
            *self.rev_nat_users.entry(value.rev_nat_id).or_default() += 1;
            self.unreferenced_rev_nat.remove(&value.rev_nat_id);
        } else {
            *self.backend_users.entry(value.backend_id).or_default() += 1;
            self.unreferenced_backends.remove(&value.backend_id);
        }
    }

    fn remove_service(&mut self, key: &ServiceKey) {
        if let Some(old) = self.contents.services.remove(key) {
            self.unlink(key, &old);
        }
    }

    fn unlink(&mut self, key: &ServiceKey, old: &ServiceValue) {
        if old.flags & SVC_FLAG_VIP_MARKER != 0 {
            return;
        }
        let (users, unreferenced, present, id) = if key.slot == 0 {
            (
                &mut self.rev_nat_users,
                &mut self.unreferenced_rev_nat,
                self.contents.rev_nat.contains_key(&old.rev_nat_id),
                old.rev_nat_id,
            )
        } else {
            (
                &mut self.backend_users,
                &mut self.unreferenced_backends,
                self.contents.backends.contains_key(&old.backend_id),
                old.backend_id,
            )
        };
        if let Some(n) = users.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                users.remove(&id);
                if present {
                    unreferenced.insert(id);
                }
            }
        }
    }

    fn set_backend(&mut self, id: u32, value: BackendValue) {
        self.contents.backends.insert(id, value);
        if !self.backend_users.contains_key(&id) {
            self.unreferenced_backends.insert(id);
        }
    }

    fn remove_backend(&mut self, id: u32) -> Option<BackendValue> {
        self.unreferenced_backends.remove(&id);
        self.contents.backends.remove(&id)
    }

    fn set_rev_nat(&mut self, id: u32, value: RevNatValue) {
        self.contents.rev_nat.insert(id, value);
        if !self.rev_nat_users.contains_key(&id) {
            self.unreferenced_rev_nat.insert(id);
        }
    }

    fn remove_rev_nat(&mut self, id: u32) {
        self.unreferenced_rev_nat.remove(&id);
        self.contents.rev_nat.remove(&id);
    }

    fn insert_range(&mut self, key: SourceRangeKey) {
        self.contents.source_ranges.insert(key);
        self.ranges.entry(range_id(&key)).or_default().insert(key);
    }

    fn remove_range(&mut self, key: &SourceRangeKey) {
        self.contents.source_ranges.remove(key);
        let id = range_id(key);
        if let Some(set) = self.ranges.get_mut(&id) {
            set.remove(key);
            if set.is_empty() {
                self.ranges.remove(&id);
            }
        }
    }

    fn ranges_of(&self, id: u32) -> impl Iterator<Item = &SourceRangeKey> {
        self.ranges.get(&id).into_iter().flatten()
    }
}

/// The ids the syncer hands out, kept across applies: backend
/// (addr, port, proto) -> backend id, frontend entry (its slot-0 key) ->
/// rev-NAT id, affinity group -> port id.
#[derive(Default)]
struct Ids {
    backends: HashMap<([u8; 16], u16, u8), u32>,
    backend_alloc: IdAllocator,
    frontends: HashMap<ServiceKey, u32>,
    rev_nat_alloc: IdAllocator,
    /// Port id and how many planned frontend entries belong to the group.
    ports: HashMap<AffinityGroup, (u32, usize)>,
    port_alloc: IdAllocator,
}

/// The frontend entries that share session affinity (slot 0's `backend_id`,
/// the key of the affinity map): one Service port's entries that pick from
/// the same endpoint set. kube-proxy keeps affinity per policy chain, so a
/// backend a client got from the cluster set (a NodePort reached from a
/// pod) never steers that client's flows to a Local-policy entry of the
/// same port (the ClusterIP with `internalTrafficPolicy: Local`, the
/// NodePort from outside with `externalTrafficPolicy: Local`) to a remote
/// endpoint, nor the other way round.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AffinityGroup {
    service: ServicePortName,
    local_set: bool,
}

/// One map entry of a frontend: the scope it serves, the endpoint set it
/// picks from, whether it drops (rather than rejects) when that set is
/// empty, and its affinity group.
struct ScopeEntry<'a> {
    scope: u8,
    set: &'a [crate::model::Backend],
    drop_when_empty: bool,
    /// New flows are source-NATed to the node (`SVC_FLAG_SNAT`).
    snat: bool,
    group: AffinityGroup,
}

/// Traffic from pods and this node always gets Cluster behaviour
/// (kube-proxy's short-circuit for external frontends), without source
/// NAT; traffic from outside (external scope, the XDP path) gets the
/// external policy's set and, with policy Cluster, source NAT (SPEC 5).
/// ClusterIP frontends have one, internal, entry, source-NATed with
/// `--masquerade-all`.
fn scope_entries(frontend: &crate::model::Frontend) -> Vec<ScopeEntry<'_>> {
    let group = |local_set| AffinityGroup {
        service: frontend.service.clone(),
        local_set,
    };
    let policy_entry = |scope| ScopeEntry {
        scope,
        set: &frontend.backends,
        drop_when_empty: frontend.drop_when_empty,
        snat: frontend.snat,
        group: group(frontend.policy_local),
    };
    if frontend.kind.is_external() {
        vec![
            ScopeEntry {
                scope: SCOPE_INTERNAL,
                set: &frontend.cluster_backends,
                drop_when_empty: false,
                snat: false,
                group: group(false),
            },
            policy_entry(SCOPE_EXTERNAL),
        ]
    } else {
        vec![policy_entry(SCOPE_INTERNAL)]
    }
}

impl Ids {
    /// The ids the maps already hold, so that unchanged entries are not
    /// rewritten (and a restart keeps them).
    fn from_maps(mirror: &MapContents, desired: &DesiredState) -> Self {
        let backends: HashMap<([u8; 16], u16, u8), u32> = mirror
            .backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port, b.proto), *id))
            .collect();
        let mut frontends: HashMap<ServiceKey, u32> = mirror
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & SVC_FLAG_VIP_MARKER == 0)
            .map(|(k, v)| (*k, v.rev_nat_id))
            .collect();
        // A frontend whose slot 0 vanished (deleted by hand) finds its id
        // again through its rev-NAT entry, so drift repair changes nothing else.
        let claimed: HashSet<u32> = frontends.values().copied().collect();
        for (id, rn) in &mirror.rev_nat {
            if !claimed.contains(id) {
                let key = ServiceKey::new(rn.addr, rn.port, rn.proto, SCOPE_INTERNAL, 0);
                frontends.entry(key).or_insert(*id);
            }
        }
        // Port ids live in slot 0's `backend_id`: recover them per
        // frontend entry, so a restart keeps affinity entries meaningful.
        // An id goes to one affinity group only (the first in key order),
        // even if a frontend moved to another Service since it was written.
        let mut ports: HashMap<AffinityGroup, (u32, usize)> = HashMap::new();
        let mut claimed_ports: HashSet<u32> = HashSet::new();
        for (key, frontend) in &desired.frontends {
            for entry in scope_entries(frontend) {
                if ports.contains_key(&entry.group) {
                    continue;
                }
                if let Some(v) = mirror.services.get(&slot0_key(key, entry.scope)) {
                    if v.backend_id != 0 && claimed_ports.insert(v.backend_id) {
                        ports.insert(entry.group, (v.backend_id, 0));
                    }
                }
            }
        }
        Ids {
            backend_alloc: IdAllocator::new(backends.values().copied()),
            backends,
            rev_nat_alloc: IdAllocator::new(
                mirror
                    .rev_nat
                    .keys()
                    .copied()
                    .chain(frontends.values().copied()),
            ),
            frontends,
            port_alloc: IdAllocator::new(ports.values().map(|(id, _)| *id)),
            ports,
        }
    }

    /// The port id of `group`, for one more planned frontend entry.
    fn port_id(&mut self, group: &AffinityGroup) -> u32 {
        if let Some((id, users)) = self.ports.get_mut(group) {
            *users += 1;
            return *id;
        }
        let id = self.port_alloc.allocate();
        self.ports.insert(group.clone(), (id, 1));
        id
    }

    /// The port ids of every entry of `frontend`, for a planned frontend.
    fn take_ports(&mut self, frontend: &crate::model::Frontend) {
        for entry in scope_entries(frontend) {
            self.port_id(&entry.group);
        }
    }

    /// A planned frontend is gone: its entries release their port ids.
    fn release_ports(&mut self, frontend: &crate::model::Frontend) {
        for entry in scope_entries(frontend) {
            self.release_port(&entry.group);
        }
    }

    /// One planned frontend entry of `group` is gone.
    fn release_port(&mut self, group: &AffinityGroup) {
        if let Some((id, users)) = self.ports.get_mut(group) {
            *users = users.saturating_sub(1);
            if *users == 0 {
                let id = *id;
                self.ports.remove(group);
                self.port_alloc.release(id);
            }
        }
    }
}

/// Turns one desired frontend into map entries (one per scope), taking
/// ids from `ids`.
fn plan_frontend(
    ids: &mut Ids,
    key: &FrontendKey,
    frontend: &crate::model::Frontend,
    out: &mut Vec<FrontendEntries>,
) {
    let addr = addr_bytes(key.ip);
    let proto = key.protocol.number();
    for ScopeEntry {
        scope,
        set,
        drop_when_empty,
        snat,
        group,
    } in scope_entries(frontend)
    {
        let slot0_key = ServiceKey::new(addr, key.port, proto, scope, 0);
        let rev_nat_id = *ids
            .frontends
            .entry(slot0_key)
            .or_insert_with(|| ids.rev_nat_alloc.allocate());
        let mut backends = Vec::with_capacity(set.len());
        let mut slots = Vec::with_capacity(set.len());
        for (i, b) in set.iter().enumerate() {
            let b_addr = addr_bytes(b.ip);
            let id = *ids
                .backends
                .entry((b_addr, b.port, proto))
                .or_insert_with(|| ids.backend_alloc.allocate());
            let value = BackendValue {
                addr: b_addr,
                port: b.port,
                proto,
                flags: if b.local { BACKEND_FLAG_LOCAL } else { 0 },
                state: if b.terminating {
                    BACKEND_STATE_TERMINATING
                } else {
                    BACKEND_STATE_ACTIVE
                },
                ..BackendValue::default()
            };
            backends.push((id, value));
            let slot = u16::try_from(i + 1).unwrap_or(u16::MAX);
            slots.push((
                ServiceKey { slot, ..slot0_key },
                ServiceValue {
                    backend_id: id,
                    ..ServiceValue::default()
                },
            ));
        }
        let count = u16::try_from(set.len()).unwrap_or(u16::MAX);
        let port_id = ids.port_id(&group);
        let maglev_table = (frontend.algorithm == Algorithm::Maglev && !backends.is_empty())
            .then(|| maglev_table(set, &backends));
        // Source ranges restrict traffic from outside to LB IPs
        // (the model gives them to LoadBalancer frontends only).
        let source_ranges: Vec<SourceRangeKey> = if scope == SCOPE_EXTERNAL {
            frontend
                .source_ranges
                .iter()
                .map(|(ip, prefix)| source_range_key(rev_nat_id, *ip, *prefix))
                .collect()
        } else {
            Vec::new()
        };
        let mut flags = if drop_when_empty {
            SVC_FLAG_DROP_WHEN_EMPTY
        } else {
            0
        };
        if !source_ranges.is_empty() {
            flags |= SVC_FLAG_SOURCE_RANGES;
        }
        if snat {
            flags |= SVC_FLAG_SNAT;
        }
        out.push(FrontendEntries {
            frontend: *key,
            vip_marker: frontend.kind == crate::model::FrontendKind::ClusterIp,
            slot0: (
                slot0_key,
                ServiceValue {
                    count,
                    rev_nat_id,
                    backend_id: port_id,
                    algorithm: frontend.algorithm.number(),
                    affinity_timeout: frontend.affinity_timeout.unwrap_or(0),
                    maglev_size: maglev_table.as_ref().map_or(0, |t| t.len() as u32),
                    flags,
                    ..ServiceValue::default()
                },
            ),
            maglev_table,
            source_ranges,
            slots,
            rev_nat: (
                rev_nat_id,
                RevNatValue {
                    addr,
                    port: key.port,
                    proto,
                    ..RevNatValue::default()
                },
            ),
            backends,
        });
    }
}

/// Which frontends an apply plans and writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Every frontend, with stale entries found by scanning every map
    /// (the first apply, and the first after `reload` or a failure).
    All,
    /// Only these: added, changed or removed since the last apply.
    Frontends(Vec<FrontendKey>),
}

/// Keeps a mirror of what the maps hold and writes only differences.
///
/// It remembers the desired frontends it last applied; while that apply
/// fully succeeded, the next one plans and writes only the frontends whose
/// desired value differs (a merge walk of two sorted maps), deletes only
/// their stale entries, and garbage-collects backends and rev-NAT entries
/// by reference count. After `reload` or any failed write or delete, the
/// next apply plans everything and scans every map, which also retries
/// what failed.
#[derive(Default)]
pub struct Syncer {
    mirror: Mirror,
    ids: Ids,
    /// The desired frontends the last apply planned; `None` when the next
    /// apply must plan everything.
    applied: Option<BTreeMap<FrontendKey, crate::model::Frontend>>,
    /// ClusterIP frontends per address (one VIP marker while > 0).
    vip_users: HashMap<[u8; 16], usize>,
    /// Frontends of any kind per address (one address marker while > 0).
    address_users: HashMap<[u8; 16], usize>,
    /// Addresses whose address marker could not be written: until it is,
    /// the datapath must not trust a missing marker.
    missing_address_markers: BTreeSet<[u8; 16]>,
    /// A full apply has written (or tried) every address marker.
    markers_planned: bool,
    /// Frontend entries (one per scope) of the applied frontends.
    entries: usize,
}

impl Syncer {
    pub fn new() -> Self {
        Self::default()
    }

    /// What this syncer believes the maps hold.
    pub fn mirror(&self) -> &MapContents {
        &self.mirror.contents
    }

    /// Re-reads the maps: at startup (a previous kproxy may have left state,
    /// whose ids are reused) and on every full resync (repairs drift, e.g. an
    /// entry deleted by hand). The next apply compares against the maps.
    pub fn reload(&mut self, writer: &impl MapWriter) -> Result<(), WriteError> {
        self.mirror = Mirror::new(writer.read_all()?);
        self.applied = None;
        Ok(())
    }

    /// What `apply_changes` would plan for `desired`.
    pub fn changes(&self, desired: &DesiredState) -> Changes {
        let Some(applied) = &self.applied else {
            return Changes::All;
        };
        let mut changed = Vec::new();
        let mut old = applied.iter().peekable();
        let mut new = desired.frontends.iter().peekable();
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some((k, _)), None) => {
                    changed.push(**k);
                    old.next();
                }
                (None, Some((k, _))) => {
                    changed.push(**k);
                    new.next();
                }
                (Some((ko, vo)), Some((kn, vn))) => match ko.cmp(kn) {
                    std::cmp::Ordering::Less => {
                        changed.push(**ko);
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        changed.push(**kn);
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if vo != vn {
                            changed.push(**kn);
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        Changes::Frontends(changed)
    }

    pub fn apply(&mut self, writer: &mut impl MapWriter, desired: &DesiredState) -> SyncReport {
        let changes = self.changes(desired);
        self.apply_changes(writer, desired, &changes)
    }

    /// Applies `desired`, planning only `changes`, which must be what
    /// [`Syncer::changes`] returned for it with no apply or reload since.
    pub fn apply_changes(
        &mut self,
        writer: &mut impl MapWriter,
        desired: &DesiredState,
        changes: &Changes,
    ) -> SyncReport {
        let report = match (changes, self.applied.take()) {
            (Changes::Frontends(keys), Some(applied)) => {
                self.apply_incremental(writer, desired, keys, applied)
            }
            _ => self.apply_all(writer, desired),
        };
        if !report.failed.is_empty()
            || !report.failed_deletes.is_empty()
            || !report.failed_writes.is_empty()
        {
            // Compare against the maps next time: retries what failed.
            self.applied = None;
        }
        report
    }

    /// Plans every frontend and deletes whatever no frontend wants.
    fn apply_all(&mut self, writer: &mut impl MapWriter, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        self.ids = Ids::from_maps(&self.mirror.contents, desired);
        let mut entries = Vec::with_capacity(desired.frontends.len());
        for (key, frontend) in &desired.frontends {
            plan_frontend(&mut self.ids, key, frontend, &mut entries);
        }
        self.widen_address_filter(writer, entries.iter().map(|e| &e.slot0.0.addr), &mut report);
        let mut keep: HashSet<ServiceKey> = HashSet::new();
        let mut keep_ranges: HashSet<SourceRangeKey> = HashSet::new();
        let mut wanted_backends: HashSet<u32> = HashSet::new();
        for fe in &entries {
            wanted_backends.extend(fe.backends.iter().map(|(id, _)| *id));
            self.write_and_keep(writer, fe, &mut keep, &mut keep_ranges, &mut report);
        }
        let vips: BTreeSet<[u8; 16]> = entries
            .iter()
            .filter(|e| e.vip_marker)
            .map(|e| e.slot0.0.addr)
            .collect();
        for addr in vips {
            keep.insert(ServiceKey::vip_marker(addr));
            self.put_vip_marker(writer, addr, &mut report);
        }
        let addresses: BTreeSet<[u8; 16]> = entries.iter().map(|e| e.slot0.0.addr).collect();
        self.missing_address_markers.clear();
        for addr in addresses {
            keep.insert(ServiceKey::address_marker(addr));
            self.put_address_marker(writer, addr, &mut report);
        }
        self.markers_planned = true;

        let stale: Vec<ServiceKey> = self
            .mirror
            .contents
            .services
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        self.delete_services(writer, stale, &mut report);
        self.delete_unreferenced(writer, &wanted_backends, &mut report);
        // Maglev entries of tables that are not live (old generations,
        // frontends gone or no longer Maglev).
        let ids: BTreeSet<u32> = self
            .mirror
            .contents
            .maglev
            .keys()
            .map(|k| k.rev_nat_id)
            .collect();
        let slot0s: Vec<ServiceKey> = self
            .mirror
            .contents
            .services
            .keys()
            .filter(|k| k.slot == 0)
            .copied()
            .collect();
        self.delete_stale_maglev(writer, ids, slot0s, &mut report);
        let stale: Vec<SourceRangeKey> = self
            .mirror
            .contents
            .source_ranges
            .iter()
            .filter(|k| !keep_ranges.contains(k))
            .copied()
            .collect();
        self.delete_ranges(writer, stale, &mut report);

        // Start the incremental state from what the maps hold now.
        self.ids = Ids::from_maps(&self.mirror.contents, desired);
        self.vip_users.clear();
        self.address_users.clear();
        for (key, frontend) in &desired.frontends {
            self.ids.take_ports(frontend);
            let addr = addr_bytes(key.ip);
            if frontend.kind == crate::model::FrontendKind::ClusterIp {
                *self.vip_users.entry(addr).or_default() += 1;
            }
            *self.address_users.entry(addr).or_default() += 1;
        }
        self.write_address_filter(writer, &mut report);
        self.entries = entries.len();
        self.applied = Some(desired.frontends.clone());
        report.frontends = entries.len();
        report.planned = desired.frontends.len();
        report.backends = self.mirror.contents.backends.len();
        report
    }

    /// Plans and writes only `keys` (added, changed or removed frontends).
    fn apply_incremental(
        &mut self,
        writer: &mut impl MapWriter,
        desired: &DesiredState,
        keys: &[FrontendKey],
        mut applied: BTreeMap<FrontendKey, crate::model::Frontend>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut entries = Vec::new();
        let mut markers: BTreeSet<[u8; 16]> = BTreeSet::new();
        let mut addresses: BTreeSet<[u8; 16]> = BTreeSet::new();
        for key in keys {
            let addr = addr_bytes(key.ip);
            if let Some(old) = applied.remove(key) {
                self.ids.release_ports(&old);
                self.entries -= if old.kind.is_external() { 2 } else { 1 };
                if old.kind == crate::model::FrontendKind::ClusterIp {
                    if let Some(n) = self.vip_users.get_mut(&addr) {
                        *n -= 1;
                    }
                    markers.insert(addr);
                }
                if let Some(n) = self.address_users.get_mut(&addr) {
                    *n -= 1;
                }
                addresses.insert(addr);
            }
            if let Some(new) = desired.frontends.get(key) {
                let before = entries.len();
                plan_frontend(&mut self.ids, key, new, &mut entries);
                self.entries += entries.len() - before;
                if new.kind == crate::model::FrontendKind::ClusterIp {
                    *self.vip_users.entry(addr).or_default() += 1;
                    markers.insert(addr);
                }
                *self.address_users.entry(addr).or_default() += 1;
                addresses.insert(addr);
                applied.insert(*key, new.clone());
            }
        }
        let has_frontend = |users: &HashMap<[u8; 16], usize>, addr: &[u8; 16]| {
            users.get(addr).is_some_and(|n| *n > 0)
        };
        let wanted = addresses
            .iter()
            .filter(|a| has_frontend(&self.address_users, a));
        let wanted: Vec<&[u8; 16]> = wanted.collect();
        self.widen_address_filter(writer, wanted, &mut report);
        let lost_one = addresses
            .iter()
            .any(|a| !has_frontend(&self.address_users, a));

        let mut keep: HashSet<ServiceKey> = HashSet::new();
        let mut keep_ranges: HashSet<SourceRangeKey> = HashSet::new();
        let mut wanted_backends: HashSet<u32> = HashSet::new();
        for fe in &entries {
            wanted_backends.extend(fe.backends.iter().map(|(id, _)| *id));
            self.write_and_keep(writer, fe, &mut keep, &mut keep_ranges, &mut report);
        }
        let mut stale: Vec<ServiceKey> = Vec::new();
        for addr in markers {
            let marker = ServiceKey::vip_marker(addr);
            if self.vip_users.get(&addr).is_some_and(|n| *n > 0) {
                self.put_vip_marker(writer, addr, &mut report);
            } else {
                self.vip_users.remove(&addr);
                stale.push(marker);
            }
        }
        for addr in addresses {
            if self.address_users.get(&addr).is_some_and(|n| *n > 0) {
                self.put_address_marker(writer, addr, &mut report);
            } else {
                self.address_users.remove(&addr);
                self.missing_address_markers.remove(&addr);
                stale.push(ServiceKey::address_marker(addr));
            }
        }

        // Stale entries can only belong to the frontends planned here.
        let mut touched_ids: BTreeSet<u32> = BTreeSet::new();
        let mut gone_scopes: Vec<ServiceKey> = Vec::new();
        let mut touched_slot0s: Vec<ServiceKey> = Vec::new();
        for key in keys {
            for scope in [SCOPE_INTERNAL, SCOPE_EXTERNAL] {
                let slot0 = slot0_key(key, scope);
                touched_slot0s.push(slot0);
                stale.extend(
                    self.mirror
                        .contents
                        .services
                        .range(entry_range(slot0))
                        .map(|(k, _)| *k)
                        .filter(|k| !keep.contains(k)),
                );
                if let Some(id) = self.ids.frontends.get(&slot0) {
                    touched_ids.insert(*id);
                    let wanted = desired
                        .frontends
                        .get(key)
                        .is_some_and(|f| scope == SCOPE_INTERNAL || f.kind.is_external());
                    if !wanted {
                        gone_scopes.push(slot0);
                    }
                }
            }
        }
        self.delete_services(writer, stale, &mut report);
        self.delete_unreferenced(writer, &wanted_backends, &mut report);
        self.delete_stale_maglev(
            writer,
            touched_ids.iter().copied(),
            touched_slot0s,
            &mut report,
        );
        let stale: Vec<SourceRangeKey> = touched_ids
            .iter()
            .flat_map(|id| self.mirror.ranges_of(*id))
            .filter(|k| !keep_ranges.contains(k))
            .copied()
            .collect();
        self.delete_ranges(writer, stale, &mut report);
        // A bit clears only when an address lost its last frontend.
        if lost_one || self.mirror.contents.address_filter.is_none() {
            self.write_address_filter(writer, &mut report);
        }

        // Ids of frontend entries that are gone for good are free again.
        for slot0 in gone_scopes {
            let id = self.ids.frontends[&slot0];
            if !self.mirror.contents.services.contains_key(&slot0)
                && !self.mirror.contents.rev_nat.contains_key(&id)
            {
                self.ids.frontends.remove(&slot0);
                self.ids.rev_nat_alloc.release(id);
            }
        }
        self.applied = Some(applied);
        report.frontends = self.entries;
        report.planned = keys.len();
        report.backends = self.mirror.contents.backends.len();
        report
    }

    /// Writes one frontend entry and adds what must survive the stale
    /// deletes to `keep` / `keep_ranges`: the new entries, or on failure
    /// whatever the frontend had, consistently (its old slot 0 and every
    /// slot it may reference, its old source ranges).
    fn write_and_keep(
        &mut self,
        writer: &mut impl MapWriter,
        fe: &FrontendEntries,
        keep: &mut HashSet<ServiceKey>,
        keep_ranges: &mut HashSet<SourceRangeKey>,
        report: &mut SyncReport,
    ) {
        match self.write_frontend(writer, fe, report) {
            Ok(()) => {
                keep.insert(fe.slot0.0);
                keep.extend(fe.slots.iter().map(|(k, _)| *k));
                keep_ranges.extend(fe.source_ranges.iter().copied());
            }
            Err(err) => {
                keep_ranges.extend(self.mirror.ranges_of(fe.rev_nat.0).copied());
                tracing::error!(frontend = ?fe.frontend, error = %err, "frontend not updated; it keeps its previous state");
                keep.insert(fe.slot0.0);
                if let Some(old) = self.mirror.contents.services.get(&fe.slot0.0) {
                    for slot in 1..=old.count {
                        keep.insert(ServiceKey { slot, ..fe.slot0.0 });
                    }
                }
                report.failed.push((fe.frontend, err));
            }
        }
    }

    /// Whether every frontend address has its address marker in the maps
    /// (then the datapath may pass a packet to an unmarked address at once:
    /// `CONFIG_FLAG_ADDRESS_MARKERS`).
    pub fn address_markers_complete(&self) -> bool {
        self.markers_planned && self.missing_address_markers.is_empty()
    }

    /// The `CONFIG_FLAG_*` bits the datapath may act on after this sync:
    /// `ADDRESS_MARKERS` once every frontend address has its marker,
    /// `ADDRESS_FILTER` once the filter holds the bits of them all.
    pub fn datapath_flags(&self) -> u64 {
        let mut flags = 0;
        if self.address_markers_complete() {
            flags |= proxy_common::CONFIG_FLAG_ADDRESS_MARKERS;
        }
        if self.markers_planned && self.mirror.contents.address_filter.is_some() {
            flags |= proxy_common::CONFIG_FLAG_ADDRESS_FILTER;
        }
        flags
    }

    /// Before the frontends' writes: sets the bits of `adding` (addresses
    /// whose frontends are about to be written) in the filter the map holds
    /// where one is clear, so that no frontend's entries are there while
    /// its bit is clear. Bits of
    /// addresses on their way out stay until `write_address_filter`. A
    /// filter the syncer does not know (`None`: the datapath does not
    /// trust it) is left to `write_address_filter`.
    fn widen_address_filter<'a>(
        &mut self,
        writer: &mut impl MapWriter,
        adding: impl IntoIterator<Item = &'a [u8; 16]>,
        report: &mut SyncReport,
    ) {
        let current = self.mirror.contents.address_filter.as_ref();
        if let Some(wider) = current.and_then(|f| f.with(adding)) {
            self.put_address_filter(writer, wider, report);
        }
    }

    /// Writes the address filter of the current frontend addresses unless
    /// the map already holds it. After the frontends' writes and the stale
    /// deletes: a new address's bit goes in once its entries are there, a
    /// removed one's goes out once they are gone. A failure is logged and
    /// leaves the filter untrusted (no `ADDRESS_FILTER` flag) until a later
    /// sync writes it.
    fn write_address_filter(&mut self, writer: &mut impl MapWriter, report: &mut SyncReport) {
        let addresses = self
            .address_users
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(addr, _)| addr);
        let filter = AddressFilterBits::of(addresses);
        if self.mirror.contents.address_filter.as_ref() == Some(&filter) {
            return;
        }
        self.put_address_filter(writer, filter, report);
    }

    fn put_address_filter(
        &mut self,
        writer: &mut impl MapWriter,
        filter: AddressFilterBits,
        report: &mut SyncReport,
    ) {
        let written = writer.put_address_filter(filter.value());
        self.mirror.contents.address_filter = match written {
            Ok(()) => {
                report.writes += 1;
                Some(filter)
            }
            Err(err) => {
                tracing::error!(error = %err, "writing the address filter failed; retrying on the next sync");
                report.failed_writes.push(err);
                None
            }
        };
    }

    /// "Some frontend has this address", for passing everything else with
    /// one lookup.
    fn put_address_marker(
        &mut self,
        writer: &mut impl MapWriter,
        addr: [u8; 16],
        report: &mut SyncReport,
    ) {
        if self.put_marker(writer, ServiceKey::address_marker(addr), report) {
            self.missing_address_markers.remove(&addr);
        } else {
            self.missing_address_markers.insert(addr);
        }
    }

    /// "This address is a Service VIP", for reject on unknown ports.
    fn put_vip_marker(
        &mut self,
        writer: &mut impl MapWriter,
        addr: [u8; 16],
        report: &mut SyncReport,
    ) {
        self.put_marker(writer, ServiceKey::vip_marker(addr), report);
    }

    /// Writes a marker entry (VIP or address); false when it failed (logged,
    /// retried on the next sync).
    fn put_marker(
        &mut self,
        writer: &mut impl MapWriter,
        key: ServiceKey,
        report: &mut SyncReport,
    ) -> bool {
        let value = ServiceValue {
            flags: SVC_FLAG_VIP_MARKER,
            ..ServiceValue::default()
        };
        match self.put_service(writer, &key, &value, report) {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(error = %err, ?key, "writing a marker entry failed; retrying on the next sync");
                false
            }
        }
    }

    fn write_frontend(
        &mut self,
        writer: &mut impl MapWriter,
        fe: &FrontendEntries,
        report: &mut SyncReport,
    ) -> Result<(), WriteError> {
        if fe.slots.len() > usize::from(u16::MAX) {
            return Err(WriteError {
                map: proxy_common::SERVICES_MAP,
                full: false,
                message: format!(
                    "{} endpoints exceed the 65535 a frontend can hold",
                    fe.slots.len()
                ),
            });
        }
        for (id, value) in &fe.backends {
            if self.mirror.contents.backends.get(id) != Some(value) {
                writer.put_backend(*id, value)?;
                self.mirror.set_backend(*id, *value);
                report.writes += 1;
            }
        }
        for (key, value) in &fe.slots {
            self.put_service(writer, key, value, report)?;
        }
        let (id, value) = &fe.rev_nat;
        if self.mirror.contents.rev_nat.get(id) != Some(value) {
            writer.put_rev_nat(*id, value)?;
            self.mirror.set_rev_nat(*id, *value);
            report.writes += 1;
        }
        for range in &fe.source_ranges {
            if !self.mirror.contents.source_ranges.contains(range) {
                writer.put_source_range(range)?;
                self.mirror.insert_range(*range);
                report.writes += 1;
            }
        }
        let mut slot0 = fe.slot0.1;
        if let Some(table) = &fe.maglev_table {
            slot0.flags |= self.write_maglev(writer, fe.rev_nat.0, table, &fe.slot0.0, report)?;
        }
        // The commit point: from here packets see the new count (and table).
        self.put_service(writer, &fe.slot0.0, &slot0, report)
    }

    /// Makes `table` live for frontend `id`: reuses the live generation when
    /// it already holds exactly this table, else writes the other
    /// generation (committed by the caller's slot 0). Returns the flags.
    fn write_maglev(
        &mut self,
        writer: &mut impl MapWriter,
        id: u32,
        table: &[u32],
        slot0_key: &ServiceKey,
        report: &mut SyncReport,
    ) -> Result<u16, WriteError> {
        let maglev = &mut self.mirror.contents.maglev;
        let current = self
            .mirror
            .contents
            .services
            .get(slot0_key)
            .filter(|v| v.maglev_size > 0 && v.rev_nat_id == id);
        let live = current.map(|v| v.flags & SVC_FLAG_MAGLEV_GEN);
        if let Some(flags) = current
            .filter(|v| v.maglev_size as usize == table.len())
            .map(|v| v.flags & SVC_FLAG_MAGLEV_GEN)
        {
            let gen = if flags != 0 { MAGLEV_GEN_BIT } else { 0 };
            let same = table.iter().enumerate().all(|(i, b)| {
                maglev.get(&MaglevKey {
                    rev_nat_id: id,
                    index: i as u32 | gen,
                }) == Some(b)
            });
            if same {
                return Ok(flags);
            }
        }
        let flags = match live {
            Some(f) if f != 0 => 0,
            Some(_) => SVC_FLAG_MAGLEV_GEN,
            None => 0,
        };
        let gen = if flags != 0 { MAGLEV_GEN_BIT } else { 0 };
        for (i, backend_id) in table.iter().enumerate() {
            let key = MaglevKey {
                rev_nat_id: id,
                index: i as u32 | gen,
            };
            if maglev.get(&key) != Some(backend_id) {
                writer.put_maglev(&key, *backend_id)?;
                maglev.insert(key, *backend_id);
                report.writes += 1;
            }
        }
        Ok(flags)
    }

    fn put_service(
        &mut self,
        writer: &mut impl MapWriter,
        key: &ServiceKey,
        value: &ServiceValue,
        report: &mut SyncReport,
    ) -> Result<(), WriteError> {
        if self.mirror.contents.services.get(key) != Some(value) {
            writer.put_service(key, value)?;
            self.mirror.set_service(*key, *value);
            report.writes += 1;
        }
        Ok(())
    }

    /// Deletes services-map entries, slot 0 first: once a frontend's slot 0
    /// is gone, no packet reads its slots any more.
    fn delete_services(
        &mut self,
        writer: &mut impl MapWriter,
        mut stale: Vec<ServiceKey>,
        report: &mut SyncReport,
    ) {
        stale.sort_by_key(|k| k.slot != 0);
        for key in stale {
            if !self.mirror.contents.services.contains_key(&key) {
                continue;
            }
            match writer.delete_service(&key) {
                Ok(()) => {
                    self.mirror.remove_service(&key);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    /// Rev-NAT entries no slot 0 names, then backends no slot references
    /// and no frontend planned in this apply wants.
    fn delete_unreferenced(
        &mut self,
        writer: &mut impl MapWriter,
        wanted_backends: &HashSet<u32>,
        report: &mut SyncReport,
    ) {
        let stale: Vec<u32> = self.mirror.unreferenced_rev_nat.iter().copied().collect();
        for id in stale {
            match writer.delete_rev_nat(id) {
                Ok(()) => {
                    self.mirror.remove_rev_nat(id);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
        let stale: Vec<u32> = self
            .mirror
            .unreferenced_backends
            .iter()
            .filter(|id| !wanted_backends.contains(id))
            .copied()
            .collect();
        for id in stale {
            match writer.delete_backend(id) {
                Ok(()) => {
                    if let Some(b) = self.mirror.remove_backend(id) {
                        let key = (b.addr, b.port, b.proto);
                        if self.ids.backends.get(&key) == Some(&id) {
                            self.ids.backends.remove(&key);
                            self.ids.backend_alloc.release(id);
                        }
                    }
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    /// Maglev entries of frontends `ids` that are not in their live table
    /// (old generation, frontend gone or no longer Maglev). `slot0s`: the
    /// slot-0 keys that may name them.
    fn delete_stale_maglev(
        &mut self,
        writer: &mut impl MapWriter,
        ids: impl IntoIterator<Item = u32>,
        slot0s: impl IntoIterator<Item = ServiceKey>,
        report: &mut SyncReport,
    ) {
        let live: HashMap<u32, (u32, u32)> = slot0s
            .into_iter()
            .filter_map(|k| self.mirror.contents.services.get(&k))
            .filter(|v| v.maglev_size > 0 && v.flags & SVC_FLAG_VIP_MARKER == 0)
            .map(|v| {
                let gen = if v.flags & SVC_FLAG_MAGLEV_GEN != 0 {
                    MAGLEV_GEN_BIT
                } else {
                    0
                };
                (v.rev_nat_id, (gen, v.maglev_size))
            })
            .collect();
        let mut stale: Vec<MaglevKey> = Vec::new();
        for id in ids {
            let range = MaglevKey {
                rev_nat_id: id,
                index: 0,
            }..=MaglevKey {
                rev_nat_id: id,
                index: u32::MAX,
            };
            stale.extend(
                self.mirror
                    .contents
                    .maglev
                    .range(range)
                    .map(|(k, _)| *k)
                    .filter(|k| match live.get(&id) {
                        Some((gen, size)) => {
                            k.index & MAGLEV_GEN_BIT != *gen || k.index & !MAGLEV_GEN_BIT >= *size
                        }
                        None => true,
                    }),
            );
        }
        for key in stale {
            match writer.delete_maglev(&key) {
                Ok(()) => {
                    self.mirror.contents.maglev.remove(&key);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    /// Source ranges no frontend wants (after slot 0 dropped the flag or
    /// the frontend went away).
    fn delete_ranges(
        &mut self,
        writer: &mut impl MapWriter,
        stale: Vec<SourceRangeKey>,
        report: &mut SyncReport,
    ) {
        for key in stale {
            match writer.delete_source_range(&key) {
                Ok(()) => {
                    self.mirror.remove_range(&key);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }
}

/// An in-memory [`MapWriter`] with optional capacities, for tests of the
/// pure sync logic. It records every operation in order.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub contents: MapContents,
    pub ops: Vec<String>,
    pub services_capacity: Option<usize>,
    pub backends_capacity: Option<usize>,
    /// Fail every address filter write.
    pub address_filter_broken: bool,
}

/// Where the first (last) operation matching `pred` is in the log of
/// `FakeMaps` writes; panics with the whole log when there is none.
#[cfg(test)]
fn first_op(ops: &[String], pred: impl Fn(&str) -> bool) -> usize {
    ops.iter()
        .position(|o| pred(o))
        .unwrap_or_else(|| panic!("no such operation in {ops:?}"))
}

#[cfg(test)]
fn last_op(ops: &[String], pred: impl Fn(&str) -> bool) -> usize {
    ops.iter()
        .rposition(|o| pred(o))
        .unwrap_or_else(|| panic!("no such operation in {ops:?}"))
}

#[cfg(test)]
impl FakeMaps {
    fn full(map: &'static str) -> WriteError {
        WriteError {
            map,
            full: true,
            message: "no space left".into(),
        }
    }
}

#[cfg(test)]
impl MapWriter for FakeMaps {
    fn read_all(&self) -> Result<MapContents, WriteError> {
        Ok(self.contents.clone())
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), WriteError> {
        let len = self.contents.services.len();
        if !self.contents.services.contains_key(key)
            && self.services_capacity.is_some_and(|c| len >= c)
        {
            return Err(Self::full(proxy_common::SERVICES_MAP));
        }
        self.ops.push(format!("put service slot={}", key.slot));
        self.contents.services.insert(*key, *value);
        Ok(())
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), WriteError> {
        self.ops.push(format!("delete service slot={}", key.slot));
        self.contents.services.remove(key);
        Ok(())
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), WriteError> {
        let len = self.contents.backends.len();
        if !self.contents.backends.contains_key(&id)
            && self.backends_capacity.is_some_and(|c| len >= c)
        {
            return Err(Self::full(proxy_common::BACKENDS_MAP));
        }
        self.ops.push(format!("put backend {id}"));
        self.contents.backends.insert(id, *value);
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), WriteError> {
        self.ops.push(format!("delete backend {id}"));
        self.contents.backends.remove(&id);
        Ok(())
    }

    fn put_rev_nat(&mut self, id: u32, value: &RevNatValue) -> Result<(), WriteError> {
        self.ops.push(format!("put rev_nat {id}"));
        self.contents.rev_nat.insert(id, *value);
        Ok(())
    }

    fn delete_rev_nat(&mut self, id: u32) -> Result<(), WriteError> {
        self.ops.push(format!("delete rev_nat {id}"));
        self.contents.rev_nat.remove(&id);
        Ok(())
    }

    fn put_maglev(&mut self, key: &MaglevKey, backend_id: u32) -> Result<(), WriteError> {
        self.ops.push(format!("put maglev {}", key.index));
        self.contents.maglev.insert(*key, backend_id);
        Ok(())
    }

    fn delete_maglev(&mut self, key: &MaglevKey) -> Result<(), WriteError> {
        self.ops.push(format!("delete maglev {}", key.index));
        self.contents.maglev.remove(key);
        Ok(())
    }

    fn put_source_range(&mut self, key: &SourceRangeKey) -> Result<(), WriteError> {
        self.ops.push(format!("put source range /{}", key.0));
        self.contents.source_ranges.insert(*key);
        Ok(())
    }

    fn delete_source_range(&mut self, key: &SourceRangeKey) -> Result<(), WriteError> {
        self.ops.push(format!("delete source range /{}", key.0));
        self.contents.source_ranges.remove(key);
        Ok(())
    }

    fn put_address_filter(&mut self, filter: &AddressFilter) -> Result<(), WriteError> {
        if self.address_filter_broken {
            return Err(WriteError {
                map: proxy_common::ADDRESS_FILTER_MAP,
                full: false,
                message: "injected failure".into(),
            });
        }
        self.ops.push("put address filter".into());
        self.contents.address_filter = Some(AddressFilterBits::from_words(filter.words.to_vec()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Backend, Frontend, FrontendKind, Protocol, ServicePortName};

    fn backend(last: u8) -> Backend {
        Backend {
            ip: IpAddr::V4(Ipv4Addr::new(198, 18, last, 2)),
            port: 8080,
            terminating: false,
            local: false,
        }
    }

    fn key(vip_last: u8, port: u16) -> FrontendKey {
        FrontendKey {
            ip: IpAddr::V4(Ipv4Addr::new(198, 19, 0, vip_last)),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn state(frontends: &[(FrontendKey, Vec<Backend>)]) -> DesiredState {
        DesiredState {
            frontends: frontends
                .iter()
                .map(|(k, b)| {
                    (
                        *k,
                        Frontend::new(
                            ServicePortName {
                                namespace: "ns".into(),
                                name: "svc".into(),
                                port_name: String::new(),
                            },
                            FrontendKind::ClusterIp,
                            b.clone(),
                        ),
                    )
                })
                .collect(),
            ..DesiredState::default()
        }
    }

    fn slot0(contents: &MapContents, k: FrontendKey) -> Option<ServiceValue> {
        let key = ServiceKey::new(addr_bytes(k.ip), k.port, 6, SCOPE_INTERNAL, 0);
        contents.services.get(&key).copied()
    }

    /// The backend addresses a frontend resolves to, slot by slot, the way
    /// the datapath reads them.
    fn resolve(contents: &MapContents, k: FrontendKey) -> Vec<IpAddr> {
        let Some(fe) = slot0(contents, k) else {
            return Vec::new();
        };
        let base = ServiceKey::new(addr_bytes(k.ip), k.port, 6, SCOPE_INTERNAL, 0);
        (1..=fe.count)
            .map(|slot| {
                let id = contents.services[&ServiceKey { slot, ..base }].backend_id;
                addr_from_bytes(contents.backends[&id].addr)
            })
            .collect()
    }

    /// A LoadBalancer frontend with `ranges` and a local and a remote backend.
    fn load_balancer(ranges: &[(IpAddr, u8)]) -> DesiredState {
        let mut desired = state(&[(key(40, 80), vec![backend(2), backend(3)])]);
        let fe = desired.frontends.get_mut(&key(40, 80)).unwrap();
        fe.kind = FrontendKind::LoadBalancer;
        fe.backends[0].local = true;
        fe.cluster_backends = fe.backends.clone();
        fe.source_ranges = ranges.to_vec();
        desired
    }

    #[test]
    fn source_ranges_are_written_before_their_frontend_and_removed_with_it() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let range: (IpAddr, u8) = (IpAddr::V4(Ipv4Addr::new(198, 18, 71, 9)), 24);
        syncer.apply(&mut maps, &load_balancer(&[range]));
        let external = ServiceKey::new(addr_bytes(key(40, 80).ip), 80, 6, SCOPE_EXTERNAL, 0);
        let fe = maps.contents.services[&external];
        assert_ne!(fe.flags & SVC_FLAG_SOURCE_RANGES, 0);
        // One canonical key: host bits cleared, under the external entry's id.
        let expected =
            source_range_key(fe.rev_nat_id, IpAddr::V4(Ipv4Addr::new(198, 18, 71, 0)), 24);
        assert_eq!(expected.0, SourceRange::ID_BITS + 96 + 24);
        assert_eq!(
            maps.contents
                .source_ranges
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            vec![expected]
        );
        let internal = ServiceKey::new(addr_bytes(key(40, 80).ip), 80, 6, SCOPE_INTERNAL, 0);
        assert_eq!(
            maps.contents.services[&internal].flags & SVC_FLAG_SOURCE_RANGES,
            0,
            "pods are not filtered"
        );
        let range_put = first_op(&maps.ops, |o| o.starts_with("put source range"));
        let slot0_put = last_op(&maps.ops, |o| o == "put service slot=0");
        assert!(range_put < slot0_put, "{:?}", maps.ops);
        // Only the local endpoint carries the local flag.
        let flags: BTreeSet<(IpAddr, u8)> = maps
            .contents
            .backends
            .values()
            .map(|b| (addr_from_bytes(b.addr), b.flags))
            .collect();
        assert!(flags.contains(&(backend(2).ip, BACKEND_FLAG_LOCAL)));
        assert!(flags.contains(&(backend(3).ip, 0)));

        // Ranges dropped: the flag goes, then the entry.
        maps.ops.clear();
        syncer.apply(&mut maps, &load_balancer(&[]));
        assert_eq!(
            maps.contents.services[&external].flags & SVC_FLAG_SOURCE_RANGES,
            0
        );
        assert!(maps.contents.source_ranges.is_empty());
        let slot0_put = first_op(&maps.ops, |o| o == "put service slot=0");
        let range_delete = first_op(&maps.ops, |o| o.starts_with("delete source range"));
        assert!(slot0_put < range_delete, "{:?}", maps.ops);
        assert_eq!(&maps.contents, syncer.mirror());
    }

    /// Affinity (slot 0's port id) is shared by the entries of one Service
    /// port that pick from one set: a backend remembered from the cluster
    /// set must not steer a Local-policy entry to a remote endpoint.
    #[test]
    fn affinity_is_shared_per_service_port_and_endpoint_set() {
        let (local, remote) = (
            Backend {
                local: true,
                ..backend(2)
            },
            backend(3),
        );
        let mut desired = DesiredState::default();
        let service = ServicePortName {
            namespace: "ns".into(),
            name: "svc".into(),
            port_name: String::new(),
        };
        // ClusterIP with internalTrafficPolicy Local, NodePort with
        // externalTrafficPolicy Cluster, LoadBalancer with Local.
        let frontend = |kind, policy_local: bool| {
            let mut fe = Frontend::new(service.clone(), kind, vec![local, remote]);
            fe.affinity_timeout = Some(30);
            if policy_local {
                fe.policy_local = true;
                fe.backends = vec![local];
            }
            fe
        };
        let (cluster_ip, node_port, lb) = (key(50, 80), key(51, 30080), key(52, 80));
        desired
            .frontends
            .insert(cluster_ip, frontend(FrontendKind::ClusterIp, true));
        desired
            .frontends
            .insert(node_port, frontend(FrontendKind::NodePort, false));
        desired
            .frontends
            .insert(lb, frontend(FrontendKind::LoadBalancer, true));
        let port_id = |maps: &FakeMaps, k: FrontendKey, scope| {
            let key = ServiceKey::new(addr_bytes(k.ip), k.port, 6, scope, 0);
            maps.contents.services[&key].backend_id
        };
        let groups = |maps: &FakeMaps| {
            let local_set = [
                port_id(maps, cluster_ip, SCOPE_INTERNAL),
                port_id(maps, lb, SCOPE_EXTERNAL),
            ];
            let cluster_set = [
                port_id(maps, node_port, SCOPE_INTERNAL),
                port_id(maps, node_port, SCOPE_EXTERNAL),
                port_id(maps, lb, SCOPE_INTERNAL),
            ];
            assert!(local_set.iter().all(|id| *id == local_set[0] && *id != 0));
            assert!(cluster_set
                .iter()
                .all(|id| *id == cluster_set[0] && *id != 0));
            assert_ne!(local_set[0], cluster_set[0], "one group per endpoint set");
            (local_set[0], cluster_set[0])
        };
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        syncer.apply(&mut maps, &desired);
        let ids = groups(&maps);
        // A restarted kproxy keeps both ids (its clients keep their backends).
        let mut restarted = Syncer::new();
        restarted.reload(&maps).unwrap();
        restarted.apply(&mut maps, &desired);
        assert_eq!(groups(&maps), ids);
        // Removing the Local frontends frees the local group's id; the
        // NodePort keeps its own.
        desired.frontends.remove(&cluster_ip);
        desired.frontends.remove(&lb);
        restarted.apply(&mut maps, &desired);
        assert_eq!(port_id(&maps, node_port, SCOPE_INTERNAL), ids.1);
        assert_eq!(restarted.ids.ports.len(), 1, "the local group is released");
    }

    /// SPEC 5: traffic from outside with policy Cluster is source-NATed
    /// whatever its backend: the external entry says so; pods' traffic
    /// (the internal entry) and policy Local are not.
    #[test]
    fn external_entries_with_policy_cluster_carry_the_snat_flag() {
        let mut desired = load_balancer(&[]);
        // What the model gives a LoadBalancer with policy Cluster.
        desired.frontends.get_mut(&key(40, 80)).unwrap().snat = true;
        let mut local = desired.frontends[&key(40, 80)].clone();
        local.policy_local = true;
        local.snat = false;
        local.backends.retain(|b| b.local);
        desired.frontends.insert(key(41, 80), local);
        let mut maps = FakeMaps::default();
        Syncer::new().apply(&mut maps, &desired);
        let flags = |k: FrontendKey, scope| {
            let key = ServiceKey::new(addr_bytes(k.ip), k.port, 6, scope, 0);
            maps.contents.services[&key].flags & SVC_FLAG_SNAT
        };
        assert_ne!(
            flags(key(40, 80), SCOPE_EXTERNAL),
            0,
            "policy Cluster, outside"
        );
        assert_eq!(flags(key(40, 80), SCOPE_INTERNAL), 0, "pods");
        assert_eq!(flags(key(41, 80), SCOPE_EXTERNAL), 0, "policy Local");
    }

    /// SPEC 5, `--masquerade-all`: the model marks ClusterIP frontends
    /// `snat`, and their one (internal) entry carries the flag.
    #[test]
    fn cluster_ips_marked_snat_carry_the_snat_flag() {
        let mut desired = state(&[
            (key(10, 80), vec![backend(2)]),
            (key(11, 80), vec![backend(3)]),
        ]);
        desired.frontends.get_mut(&key(11, 80)).unwrap().snat = true;
        let mut maps = FakeMaps::default();
        Syncer::new().apply(&mut maps, &desired);
        let flags = |k: FrontendKey| {
            let key = ServiceKey::new(addr_bytes(k.ip), k.port, 6, SCOPE_INTERNAL, 0);
            maps.contents.services[&key].flags & SVC_FLAG_SNAT
        };
        assert_eq!(flags(key(10, 80)), 0, "without the flag");
        assert_ne!(flags(key(11, 80)), 0, "with it");
    }

    #[test]
    fn ipv6_source_ranges_use_their_own_prefix() {
        let v6: IpAddr = "2001:db8:1::ff".parse().unwrap();
        let (bits, data) = source_range_key(7, v6, 48);
        assert_eq!(bits, SourceRange::ID_BITS + 48);
        assert_eq!(
            addr_from_bytes(data.addr),
            "2001:db8:1::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(data.rev_nat_id, 7u32.to_be_bytes());
    }

    #[test]
    fn every_frontend_address_gets_an_address_marker_and_only_clusterips_a_vip_marker() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        assert!(!syncer.address_markers_complete(), "nothing written yet");
        let mut desired = state(&[(key(10, 80), vec![backend(2)])]);
        let node_port = key(20, 30080);
        let node_port_frontend = Frontend::new(
            ServicePortName {
                namespace: "ns".into(),
                name: "np".into(),
                port_name: String::new(),
            },
            FrontendKind::NodePort,
            vec![backend(3)],
        );
        desired
            .frontends
            .insert(node_port, node_port_frontend.clone());
        syncer.apply(&mut maps, &desired);
        let marked = |maps: &FakeMaps, key: ServiceKey| maps.contents.services.contains_key(&key);
        let (vip, node) = (addr_bytes(key(10, 80).ip), addr_bytes(node_port.ip));
        assert!(marked(&maps, ServiceKey::address_marker(vip)));
        assert!(marked(&maps, ServiceKey::address_marker(node)));
        assert!(marked(&maps, ServiceKey::vip_marker(vip)));
        assert!(
            !marked(&maps, ServiceKey::vip_marker(node)),
            "a node address must never reject unknown ports"
        );
        assert!(syncer.address_markers_complete());

        // The NodePort goes (incrementally): its address marker goes too.
        desired.frontends.remove(&node_port);
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!(report.planned, 1);
        assert!(!marked(&maps, ServiceKey::address_marker(node)));
        assert!(marked(&maps, ServiceKey::address_marker(vip)));

        // It comes back into a full map: its marker cannot be written, so
        // the datapath must not trust a missing marker until it is.
        desired.frontends.insert(node_port, node_port_frontend);
        maps.services_capacity = Some(maps.contents.services.len());
        syncer.apply(&mut maps, &desired);
        assert!(!syncer.address_markers_complete());
        maps.services_capacity = None;
        syncer.apply(&mut maps, &desired);
        assert!(marked(&maps, ServiceKey::address_marker(node)));
        assert!(syncer.address_markers_complete());
        assert_eq!(&maps.contents, syncer.mirror());
    }

    /// Whether the address filter the fake map holds has `key`'s bit, as
    /// the datapath tests it.
    fn filter_has(maps: &FakeMaps, key: FrontendKey) -> bool {
        let filter = maps.contents.address_filter.as_ref();
        let IpAddr::V4(v4) = key.ip else {
            panic!("IPv4 only")
        };
        filter.expect("an address filter was written").may_hold(v4)
    }

    #[test]
    fn the_address_filter_follows_the_set_of_frontend_addresses() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        assert_eq!(
            syncer.datapath_flags() & proxy_common::CONFIG_FLAG_ADDRESS_FILTER,
            0
        );
        let (a, b, c) = (key(10, 80), key(11, 80), key(12, 80));
        for k in [a, b, c] {
            let IpAddr::V4(v4) = k.ip else { unreachable!() };
            assert!(
                !AddressFilterBits::of([&addr_bytes(c.ip)]).may_hold(v4) || k == c,
                "the test's addresses must not share a bit"
            );
        }
        let mut desired = state(&[(a, vec![backend(2)]), (b, vec![backend(3)])]);
        syncer.apply(&mut maps, &desired);
        let has = |k| filter_has(&maps, k);
        assert!(has(a) && has(b) && !has(c));
        assert_ne!(
            syncer.datapath_flags() & proxy_common::CONFIG_FLAG_ADDRESS_FILTER,
            0
        );

        // An endpoint change leaves the addresses as they are: no rewrite.
        maps.ops.clear();
        desired = state(&[(a, vec![backend(2), backend(4)]), (b, vec![backend(3)])]);
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!(report.planned, 1);
        assert!(
            !maps.ops.iter().any(|o| o == "put address filter"),
            "{:?}",
            maps.ops
        );

        // A frontend goes and one comes: the new address's bit goes in
        // before its entries, the old one's goes out after its entries.
        maps.ops.clear();
        desired = state(&[(a, vec![backend(2), backend(4)]), (c, vec![backend(5)])]);
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!(report.planned, 2);
        let has = |k| filter_has(&maps, k);
        assert!(has(a) && !has(b) && has(c));
        let is_filter = |o: &str| o == "put address filter";
        let first_entry = first_op(&maps.ops, |o| o.starts_with("put") && !is_filter(o));
        assert!(first_op(&maps.ops, is_filter) < first_entry);
        let deletes_end = last_op(&maps.ops, |o| o.starts_with("delete service"));
        assert!(deletes_end < last_op(&maps.ops, is_filter));
        assert_eq!(maps.ops.iter().filter(|o| is_filter(o)).count(), 2);

        // A second frontend on an address that has one: the bit is there.
        maps.ops.clear();
        let a_udp = FrontendKey {
            protocol: Protocol::Udp,
            ..a
        };
        desired
            .frontends
            .insert(a_udp, desired.frontends[&a].clone());
        syncer.apply(&mut maps, &desired);
        assert!(maps.ops.iter().any(|o| o.starts_with("put service")));
        assert!(!maps.ops.iter().any(|o| is_filter(o)), "{:?}", maps.ops);
    }

    #[test]
    fn a_failed_address_filter_write_is_not_trusted_and_is_retried() {
        let mut maps = FakeMaps {
            address_filter_broken: true,
            ..FakeMaps::default()
        };
        let mut syncer = Syncer::new();
        let desired = state(&[(key(10, 80), vec![backend(2)])]);
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!(report.failed_writes.len(), 1);
        assert_eq!(
            report.failed_writes[0].map,
            proxy_common::ADDRESS_FILTER_MAP
        );
        assert_eq!(
            syncer.datapath_flags(),
            proxy_common::CONFIG_FLAG_ADDRESS_MARKERS,
            "the markers are in, the filter is not"
        );
        maps.address_filter_broken = false;
        let report = syncer.apply(&mut maps, &desired);
        assert!(report.failed_writes.is_empty());
        assert!(filter_has(&maps, key(10, 80)));
        assert_ne!(
            syncer.datapath_flags() & proxy_common::CONFIG_FLAG_ADDRESS_FILTER,
            0
        );

        // A full resync reads it back: the same filter is not rewritten,
        // one changed by hand is repaired.
        syncer.reload(&maps).expect("reload");
        maps.ops.clear();
        syncer.apply(&mut maps, &desired);
        assert!(maps.ops.is_empty(), "{:?}", maps.ops);
        maps.contents.address_filter = Some(AddressFilterBits::of([]));
        syncer.reload(&maps).expect("reload");
        syncer.apply(&mut maps, &desired);
        assert!(filter_has(&maps, key(10, 80)));
        assert_eq!(&maps.contents, syncer.mirror());
    }

    #[test]
    fn programs_every_entry_and_the_vip_marker() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let desired = state(&[(key(10, 80), vec![backend(2), backend(3)])]);
        let report = syncer.apply(&mut maps, &desired);
        assert!(report.failed.is_empty());
        assert_eq!(
            resolve(&maps.contents, key(10, 80)),
            vec![backend(2).ip, backend(3).ip]
        );
        let marker = ServiceKey::vip_marker(addr_bytes(key(10, 80).ip));
        assert_eq!(maps.contents.services[&marker].flags, SVC_FLAG_VIP_MARKER);
        let fe = slot0(&maps.contents, key(10, 80)).unwrap();
        assert_eq!(maps.contents.rev_nat[&fe.rev_nat_id].port, 80);
        assert_eq!(&maps.contents, syncer.mirror());
    }

    #[test]
    fn slot_zero_is_written_after_its_slots_and_deleted_before_them() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        syncer.apply(
            &mut maps,
            &state(&[(key(10, 80), vec![backend(2), backend(3)])]),
        );
        let ops = &maps.ops;
        let first_slot0 = first_op(ops, |o| o == "put service slot=0");
        let last_slot = last_op(ops, |o| {
            o.starts_with("put service slot=") && o != "put service slot=0"
        });
        let last_backend = last_op(ops, |o| o.starts_with("put backend"));
        let rev_nat = first_op(ops, |o| o.starts_with("put rev_nat"));
        assert!(
            last_backend < first_slot0 && last_slot < first_slot0 && rev_nat < first_slot0,
            "{ops:?}"
        );

        maps.ops.clear();
        syncer.apply(&mut maps, &state(&[]));
        let ops = &maps.ops;
        assert_eq!(ops[0], "delete service slot=0", "{ops:?}");
        let last_service = last_op(ops, |o| o.starts_with("delete service"));
        let first_backend = first_op(ops, |o| o.starts_with("delete backend"));
        assert!(last_service < first_backend, "{ops:?}");
        assert!(maps.contents.services.is_empty());
        assert!(maps.contents.backends.is_empty());
        assert!(maps.contents.rev_nat.is_empty());
    }

    #[test]
    fn an_unchanged_state_writes_nothing_and_ids_are_stable() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let desired = state(&[(key(10, 80), vec![backend(2), backend(3)])]);
        syncer.apply(&mut maps, &desired);
        let before = maps.contents.clone();
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!((report.writes, report.deletes), (0, 0));
        assert_eq!(before, maps.contents);

        // A restarted kproxy reads the maps and reuses their ids.
        let mut restarted = Syncer::new();
        restarted.reload(&maps).unwrap();
        let report = restarted.apply(&mut maps, &desired);
        assert_eq!((report.writes, report.deletes), (0, 0));
    }

    #[test]
    fn removing_a_backend_shrinks_the_frontend_and_frees_the_backend() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        syncer.apply(
            &mut maps,
            &state(&[(key(10, 80), vec![backend(2), backend(3), backend(4)])]),
        );
        syncer.apply(
            &mut maps,
            &state(&[(key(10, 80), vec![backend(2), backend(4)])]),
        );
        assert_eq!(
            resolve(&maps.contents, key(10, 80)),
            vec![backend(2).ip, backend(4).ip]
        );
        assert_eq!(maps.contents.backends.len(), 2);
        // No slot beyond the count survives: slot 0, two slots, the VIP
        // marker and the address marker.
        assert_eq!(maps.contents.services.len(), 1 + 2 + 1 + 1);
    }

    #[test]
    fn a_backend_shared_by_two_frontends_survives_until_both_drop_it() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        syncer.apply(
            &mut maps,
            &state(&[
                (key(10, 80), vec![backend(2)]),
                (key(11, 80), vec![backend(2)]),
            ]),
        );
        assert_eq!(maps.contents.backends.len(), 1);
        syncer.apply(&mut maps, &state(&[(key(11, 80), vec![backend(2)])]));
        assert_eq!(resolve(&maps.contents, key(11, 80)), vec![backend(2).ip]);
        assert!(slot0(&maps.contents, key(10, 80)).is_none());
    }

    #[test]
    fn a_full_map_keeps_programmed_frontends_and_reports_the_rest() {
        let mut maps = FakeMaps {
            backends_capacity: Some(3),
            ..FakeMaps::default()
        };
        let mut syncer = Syncer::new();
        syncer.apply(
            &mut maps,
            &state(&[(key(10, 80), vec![backend(2), backend(3)])]),
        );
        // A second Service needs three more backends: only one fits.
        let desired = state(&[
            (key(10, 80), vec![backend(2), backend(3)]),
            (key(11, 80), vec![backend(5), backend(6), backend(7)]),
        ]);
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, key(11, 80));
        assert!(report.failed[0].1.full);
        assert!(report.failed[0].1.to_string().contains("the map is full"));
        // The first Service is untouched and complete; the second has no
        // slot 0, so no packet can reach its half-written slots.
        assert_eq!(
            resolve(&maps.contents, key(10, 80)),
            vec![backend(2).ip, backend(3).ip]
        );
        assert!(slot0(&maps.contents, key(11, 80)).is_none());
    }

    #[test]
    fn a_failed_update_leaves_the_old_frontend_consistent() {
        let mut maps = FakeMaps {
            backends_capacity: Some(2),
            ..FakeMaps::default()
        };
        let mut syncer = Syncer::new();
        syncer.apply(
            &mut maps,
            &state(&[(key(10, 80), vec![backend(2), backend(3)])]),
        );
        let report = syncer.apply(
            &mut maps,
            &state(&[(key(10, 80), vec![backend(4), backend(5), backend(6)])]),
        );
        assert_eq!(report.failed.len(), 1);
        let fe = slot0(&maps.contents, key(10, 80)).unwrap();
        assert_eq!(fe.count, 2, "the old count stays the commit point");
        // Every slot still resolves to a programmed backend.
        assert_eq!(resolve(&maps.contents, key(10, 80)).len(), 2);
    }

    #[test]
    fn maglev_tables_are_swapped_whole_by_generation() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let maglev = |backends: Vec<Backend>| {
            let mut d = state(&[(key(10, 80), backends)]);
            for f in d.frontends.values_mut() {
                f.algorithm = crate::model::Algorithm::Maglev;
            }
            d
        };
        syncer.apply(&mut maps, &maglev(vec![backend(2), backend(3), backend(4)]));
        let fe = slot0(&maps.contents, key(10, 80)).unwrap();
        assert_eq!(fe.maglev_size as usize, maps.contents.maglev.len());
        assert!(fe.maglev_size >= 300);
        let gen0 = fe.flags & SVC_FLAG_MAGLEV_GEN;

        // Same backends: nothing rewritten.
        let report = syncer.apply(&mut maps, &maglev(vec![backend(2), backend(3), backend(4)]));
        assert_eq!(report.writes, 0);

        // A change (even one that shrinks the table) goes to the other
        // generation, committed by slot 0, then the old one is removed.
        maps.ops.clear();
        syncer.apply(&mut maps, &maglev(vec![backend(2), backend(3)]));
        let fe = slot0(&maps.contents, key(10, 80)).unwrap();
        assert_ne!(fe.flags & SVC_FLAG_MAGLEV_GEN, gen0, "generation flipped");
        assert_eq!(
            fe.maglev_size as usize,
            maps.contents.maglev.len(),
            "old generation removed"
        );
        let commit = first_op(&maps.ops, |o| o == "put service slot=0");
        let first_delete = first_op(&maps.ops, |o| o.starts_with("delete maglev"));
        let last_put = last_op(&maps.ops, |o| o.starts_with("put maglev"));
        assert!(last_put < commit && commit < first_delete, "{:?}", maps.ops);
        let live_gen = if fe.flags & SVC_FLAG_MAGLEV_GEN != 0 {
            MAGLEV_GEN_BIT
        } else {
            0
        };
        assert!(maps
            .contents
            .maglev
            .keys()
            .all(|k| k.index & MAGLEV_GEN_BIT == live_gen));
        let ids: HashSet<u32> = maps.contents.maglev.values().copied().collect();
        assert_eq!(ids.len(), 2);

        // Back to random: the table goes.
        syncer.apply(&mut maps, &state(&[(key(10, 80), vec![backend(2)])]));
        assert!(maps.contents.maglev.is_empty());
    }

    #[test]
    fn a_full_resync_repairs_an_entry_deleted_by_hand() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let desired = state(&[(key(10, 80), vec![backend(2)])]);
        syncer.apply(&mut maps, &desired);
        let wanted = maps.contents.clone();
        let slot1 = *maps.contents.services.keys().find(|k| k.slot == 1).unwrap();
        maps.contents.services.remove(&slot1);
        // The mirror still believes the entry is there: a plain apply does
        // not notice, a resync (reload + apply) does.
        syncer.apply(&mut maps, &desired);
        assert_ne!(maps.contents, wanted);
        syncer.reload(&maps).unwrap();
        syncer.apply(&mut maps, &desired);
        assert_eq!(maps.contents, wanted);

        // Slot 0 deleted by hand comes back with the same rev-NAT id.
        let slot0 = *maps
            .contents
            .services
            .keys()
            .find(|k| k.slot == 0 && k.port == 80)
            .unwrap();
        maps.contents.services.remove(&slot0);
        syncer.reload(&maps).unwrap();
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!((report.writes, report.deletes), (1, 0));
        assert_eq!(maps.contents, wanted);
    }

    /// 1 000 ClusterIP frontends of three backends each.
    fn thousand(changed: u8) -> DesiredState {
        let frontends: Vec<(FrontendKey, Vec<Backend>)> = (0..1000u16)
            .map(|i| {
                let k = FrontendKey {
                    ip: IpAddr::V4(Ipv4Addr::new(198, 19, (i / 256) as u8, (i % 256) as u8)),
                    port: 80,
                    protocol: Protocol::Tcp,
                };
                let backends = (0..3u16)
                    .map(|j| Backend {
                        ip: IpAddr::V4(Ipv4Addr::new(
                            198,
                            18,
                            (i / 64) as u8,
                            (i % 64 * 3 + j) as u8,
                        )),
                        ..backend(0)
                    })
                    .collect();
                (k, backends)
            })
            .collect();
        let mut desired = state(&frontends);
        let fe = desired.frontends.values_mut().nth(500).unwrap();
        fe.backends[0].ip = IpAddr::V4(Ipv4Addr::new(198, 18, 254, changed));
        fe.backends.sort();
        fe.cluster_backends = fe.backends.clone();
        desired
    }

    #[test]
    fn one_endpoint_change_plans_and_writes_only_that_frontend() {
        let mut maps = FakeMaps::default();
        let mut syncer = Syncer::new();
        let report = syncer.apply(&mut maps, &thousand(1));
        assert_eq!((report.planned, report.frontends), (1000, 1000));

        maps.ops.clear();
        let report = syncer.apply(&mut maps, &thousand(2));
        assert_eq!(report.planned, 1, "only the changed frontend is planned");
        assert_eq!(report.frontends, 1000);
        // The new backend, its slot, then the old backend's delete.
        assert_eq!(maps.ops.len(), 3, "{:?}", maps.ops);
        assert_eq!((report.writes, report.deletes), (2, 1));
        assert_eq!(&maps.contents, syncer.mirror());

        maps.ops.clear();
        let report = syncer.apply(&mut maps, &thousand(2));
        assert_eq!((report.planned, report.writes, report.deletes), (0, 0, 0));
        assert!(maps.ops.is_empty());

        // Removing one frontend deletes its entries and nothing else.
        let mut smaller = thousand(2);
        let gone = *smaller.frontends.keys().nth(7).unwrap();
        smaller.frontends.remove(&gone);
        maps.ops.clear();
        let report = syncer.apply(&mut maps, &smaller);
        assert_eq!(report.planned, 1);
        // Slot 0, three slots, the VIP and address markers, rev-NAT, three
        // backends; then the address filter without the address.
        assert_eq!(maps.ops.len(), 11, "{:?}", maps.ops);
        assert_eq!(maps.ops[10], "put address filter");
        assert!(slot0(&maps.contents, gone).is_none());
        assert_eq!(&maps.contents, syncer.mirror());
    }

    #[test]
    fn after_a_failure_the_next_apply_compares_against_everything() {
        let mut maps = FakeMaps {
            backends_capacity: Some(3),
            ..FakeMaps::default()
        };
        let mut syncer = Syncer::new();
        let desired = state(&[
            (key(10, 80), vec![backend(2), backend(3)]),
            (key(11, 80), vec![backend(5), backend(6)]),
        ]);
        let report = syncer.apply(&mut maps, &desired);
        assert_eq!(report.failed.len(), 1);
        maps.backends_capacity = None;
        let report = syncer.apply(&mut maps, &desired);
        assert!(report.failed.is_empty());
        assert_eq!(report.planned, 2, "the failed frontend is retried");
        assert_eq!(
            resolve(&maps.contents, key(11, 80)),
            vec![backend(5).ip, backend(6).ip]
        );
        assert_eq!(syncer.changes(&desired), Changes::Frontends(Vec::new()));
    }

    /// What the datapath sees, without the ids: per frontend entry its
    /// slot 0 (ids, generation bit cleared), its backends slot by slot,
    /// its rev-NAT entry, its live Maglev table and source ranges, as
    /// addresses; the VIP markers; which frontends share a port id; and
    /// how many entries each map holds (nothing unreferenced may stay).
    #[allow(clippy::type_complexity)]
    fn semantic(
        c: &MapContents,
    ) -> (
        BTreeMap<
            ServiceKey,
            (
                ServiceValue,
                Vec<BackendValue>,
                RevNatValue,
                Vec<BackendValue>,
                Vec<(u32, [u8; 16])>,
            ),
        >,
        BTreeSet<ServiceKey>,
        BTreeSet<BTreeSet<ServiceKey>>,
        [usize; 5],
    ) {
        let mut frontends = BTreeMap::new();
        let mut markers = BTreeSet::new();
        let mut by_port: BTreeMap<u32, BTreeSet<ServiceKey>> = BTreeMap::new();
        for (k, v) in c.services.iter().filter(|(k, _)| k.slot == 0) {
            if v.flags & SVC_FLAG_VIP_MARKER != 0 {
                markers.insert(*k);
                continue;
            }
            let backends = (1..=v.count)
                .map(|slot| c.backends[&c.services[&ServiceKey { slot, ..*k }].backend_id])
                .collect();
            let gen = if v.flags & SVC_FLAG_MAGLEV_GEN != 0 {
                MAGLEV_GEN_BIT
            } else {
                0
            };
            let table = (0..v.maglev_size)
                .map(|i| {
                    c.backends[&c.maglev[&MaglevKey {
                        rev_nat_id: v.rev_nat_id,
                        index: i | gen,
                    }]]
                })
                .collect();
            let ranges = c
                .source_ranges
                .iter()
                .filter(|(_, r)| r.rev_nat_id == v.rev_nat_id.to_be_bytes())
                .map(|(bits, r)| (*bits, r.addr))
                .collect();
            by_port.entry(v.backend_id).or_default().insert(*k);
            let value = ServiceValue {
                rev_nat_id: 0,
                backend_id: 0,
                flags: v.flags & !SVC_FLAG_MAGLEV_GEN,
                ..*v
            };
            frontends.insert(
                *k,
                (value, backends, c.rev_nat[&v.rev_nat_id], table, ranges),
            );
        }
        let slots = c.services.keys().filter(|k| k.slot != 0).count();
        let referenced: BTreeSet<u32> = c
            .services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        let counts = [
            slots,
            c.backends.len() - referenced.len(),
            c.rev_nat.len(),
            c.maglev.len(),
            c.source_ranges.len(),
        ];
        (frontends, markers, by_port.into_values().collect(), counts)
    }

    /// A small desired state from proptest's choices: frontend i of 6
    /// (two share an address) with its kind, algorithm, affinity, Service
    /// name, source ranges and backends out of 8.
    fn random_state(choices: &[(u8, u8, u8, u8, u8)]) -> DesiredState {
        let mut desired = DesiredState::default();
        for (i, &(present, kind, algorithm, service, backends)) in choices.iter().enumerate() {
            if present % 4 == 0 {
                continue;
            }
            let k = FrontendKey {
                ip: IpAddr::V4(Ipv4Addr::new(198, 19, 0, (i / 2) as u8 + 10)),
                port: 80 + (i % 2) as u16,
                protocol: if i == 5 { Protocol::Udp } else { Protocol::Tcp },
            };
            let set: Vec<Backend> = (0..8u8)
                .filter(|b| backends & (1 << b) != 0)
                .map(|b| Backend {
                    local: b % 3 == 0,
                    terminating: b == 7,
                    ..backend(b + 2)
                })
                .collect();
            let kind = [
                FrontendKind::ClusterIp,
                FrontendKind::NodePort,
                FrontendKind::LoadBalancer,
            ][usize::from(kind % 3)];
            let mut fe = Frontend::new(
                ServicePortName {
                    namespace: "ns".into(),
                    name: format!("svc-{}", service % 3),
                    port_name: String::new(),
                },
                kind,
                set.clone(),
            );
            if kind.is_external() && algorithm & 4 != 0 {
                fe.policy_local = true;
                fe.backends = set.iter().copied().filter(|b| b.local).collect();
                fe.drop_when_empty = !set.is_empty();
            }
            // Maglev tables are large: a few frontends only.
            if algorithm == 1 && i % 3 == 0 {
                fe.algorithm = crate::model::Algorithm::Maglev;
            }
            if algorithm & 2 != 0 {
                fe.affinity_timeout = Some(30);
            }
            if kind == FrontendKind::LoadBalancer && present % 2 == 0 {
                fe.source_ranges =
                    vec![(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)), 24 + present % 3)];
            }
            desired.frontends.insert(k, fe);
        }
        desired
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

        /// Incremental applies (with the odd full resync) leave the maps as
        /// a fresh apply of the last state would, ids aside.
        #[test]
        fn incremental_applies_end_where_a_fresh_apply_does(
            steps in proptest::collection::vec(
                (proptest::collection::vec(
                    (0u8..8, 0u8..3, 0u8..8, 0u8..3, proptest::prelude::any::<u8>()),
                    6,
                ), 0u8..8),
                1..8,
            )
        ) {
            let mut maps = FakeMaps::default();
            let mut syncer = Syncer::new();
            for (choices, resync) in &steps {
                if *resync == 0 {
                    syncer.reload(&maps).unwrap();
                }
                let report = syncer.apply(&mut maps, &random_state(choices));
                proptest::prop_assert!(report.failed.is_empty());
                let (m, s) = (&maps.contents, syncer.mirror());
                proptest::prop_assert_eq!(&m.services, &s.services);
                proptest::prop_assert_eq!(&m.backends, &s.backends);
                proptest::prop_assert_eq!(&m.rev_nat, &s.rev_nat);
                proptest::prop_assert_eq!(&m.source_ranges, &s.source_ranges);
                proptest::prop_assert!(m.maglev == s.maglev, "maglev differs");
            }
            let last = random_state(&steps.last().unwrap().0);
            let mut fresh = FakeMaps::default();
            Syncer::new().apply(&mut fresh, &last);
            proptest::prop_assert_eq!(semantic(&maps.contents), semantic(&fresh.contents));
            // And nothing left to do.
            proptest::prop_assert_eq!(syncer.changes(&last), Changes::Frontends(Vec::new()));
        }
    }
}
