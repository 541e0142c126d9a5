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
    ipv4_mapped, BackendValue, MaglevKey, RevNatValue, ServiceKey, ServiceValue, SourceRange,
    BACKEND_FLAG_LOCAL, BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, MAGLEV_GEN_BIT,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_MAGLEV_GEN,
    SVC_FLAG_SOURCE_RANGES, SVC_FLAG_VIP_MARKER,
};
use thiserror::Error;

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
    pub frontends: usize,
    pub backends: usize,
    /// Frontends left as they were because a write failed.
    pub failed: Vec<(FrontendKey, WriteError)>,
    /// Deletions that failed (retried on the next sync).
    pub failed_deletes: Vec<WriteError>,
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
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: 1,
        }
    }

    fn allocate(&mut self) -> u32 {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        self.used.insert(self.next);
        self.next
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

/// Keeps a mirror of what the maps hold and writes only differences.
#[derive(Default)]
pub struct Syncer {
    mirror: MapContents,
}

impl Syncer {
    pub fn new() -> Self {
        Self::default()
    }

    /// What this syncer believes the maps hold.
    pub fn mirror(&self) -> &MapContents {
        &self.mirror
    }

    /// Re-reads the maps: at startup (a previous kproxy may have left state,
    /// whose ids are reused) and on every full resync (repairs drift, e.g. an
    /// entry deleted by hand).
    pub fn reload(&mut self, writer: &impl MapWriter) -> Result<(), WriteError> {
        self.mirror = writer.read_all()?;
        Ok(())
    }

    pub fn apply(&mut self, writer: &mut impl MapWriter, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        let entries = self.plan(desired);
        let mut keep: HashSet<ServiceKey> = HashSet::new();
        let mut keep_ranges: HashSet<SourceRangeKey> = HashSet::new();
        let mut wanted_backends: HashSet<u32> = HashSet::new();

        for fe in &entries {
            wanted_backends.extend(fe.backends.iter().map(|(id, _)| *id));
            match self.write_frontend(writer, fe, &mut report) {
                Ok(()) => {
                    keep.insert(fe.slot0.0);
                    keep.extend(fe.slots.iter().map(|(k, _)| *k));
                    keep_ranges.extend(fe.source_ranges.iter().copied());
                }
                Err(err) => {
                    // Its source ranges stay as they were, too.
                    let id = fe.rev_nat.0.to_be_bytes();
                    keep_ranges.extend(
                        self.mirror
                            .source_ranges
                            .iter()
                            .filter(|(_, r)| r.rev_nat_id == id)
                            .copied(),
                    );
                    tracing::error!(frontend = ?fe.frontend, error = %err, "frontend not updated; it keeps its previous state");
                    // Keep whatever the frontend had, consistently: its old
                    // slot 0 and every slot it may reference.
                    keep.insert(fe.slot0.0);
                    if let Some(old) = self.mirror.services.get(&fe.slot0.0) {
                        for slot in 1..=old.count {
                            keep.insert(ServiceKey { slot, ..fe.slot0.0 });
                        }
                    }
                    report.failed.push((fe.frontend, err));
                }
            }
        }

        // VIP markers: "this address is a Service VIP", for reject on unknown ports.
        let vips: BTreeSet<[u8; 16]> = entries
            .iter()
            .filter(|e| e.vip_marker)
            .map(|e| e.slot0.0.addr)
            .collect();
        for addr in vips {
            let key = ServiceKey::vip_marker(addr);
            let value = ServiceValue {
                flags: SVC_FLAG_VIP_MARKER,
                ..ServiceValue::default()
            };
            keep.insert(key);
            if let Err(err) = self.put_service(writer, &key, &value, &mut report) {
                tracing::error!(error = %err, "writing a VIP marker failed");
            }
        }

        self.delete_stale(writer, &keep, &wanted_backends, &mut report);
        self.delete_stale_ranges(writer, &keep_ranges, &mut report);
        report.frontends = entries.len();
        report.backends = self.mirror.backends.len();
        report
    }

    /// Turns the desired state into map entries, reusing the ids the maps
    /// already hold so that unchanged entries are not rewritten.
    fn plan(&self, desired: &DesiredState) -> Vec<FrontendEntries> {
        let mut backend_ids: HashMap<([u8; 16], u16, u8), u32> = self
            .mirror
            .backends
            .iter()
            .map(|(id, b)| ((b.addr, b.port, b.proto), *id))
            .collect();
        let mut frontend_ids: HashMap<ServiceKey, u32> = self
            .mirror
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & SVC_FLAG_VIP_MARKER == 0)
            .map(|(k, v)| (*k, v.rev_nat_id))
            .collect();
        // A frontend whose slot 0 vanished (deleted by hand) finds its id
        // again through its rev-NAT entry, so drift repair changes nothing else.
        let claimed: HashSet<u32> = frontend_ids.values().copied().collect();
        for (id, rn) in &self.mirror.rev_nat {
            if !claimed.contains(id) {
                let key = ServiceKey::new(rn.addr, rn.port, rn.proto, SCOPE_INTERNAL, 0);
                frontend_ids.entry(key).or_insert(*id);
            }
        }
        let mut backend_alloc = IdAllocator::new(self.mirror.backends.keys().copied());
        // Service port ids live in slot 0's `backend_id`: recover them per
        // frontend, so a restart keeps affinity entries meaningful.
        let mut port_ids: HashMap<ServicePortName, u32> = HashMap::new();
        for (key, frontend) in &desired.frontends {
            let k = ServiceKey::new(
                addr_bytes(key.ip),
                key.port,
                key.protocol.number(),
                SCOPE_INTERNAL,
                0,
            );
            if let Some(v) = self.mirror.services.get(&k) {
                if v.backend_id != 0 {
                    port_ids
                        .entry(frontend.service.clone())
                        .or_insert(v.backend_id);
                }
            }
        }
        let mut port_alloc = IdAllocator::new(port_ids.values().copied());
        let mut rev_nat_alloc = IdAllocator::new(
            self.mirror
                .rev_nat
                .keys()
                .copied()
                .chain(frontend_ids.values().copied()),
        );

        let mut out = Vec::with_capacity(desired.frontends.len());
        for (key, frontend) in &desired.frontends {
            let addr = addr_bytes(key.ip);
            let proto = key.protocol.number();
            // Traffic from pods and this node always gets Cluster behaviour
            // (kube-proxy's short-circuit for external frontends); traffic
            // from outside (external scope, the XDP path) gets the external
            // policy's set. ClusterIP frontends have one, internal, entry.
            let scopes: Vec<(u8, &[crate::model::Backend], bool)> = if frontend.kind.is_external() {
                vec![
                    (SCOPE_INTERNAL, &frontend.cluster_backends, false),
                    (SCOPE_EXTERNAL, &frontend.backends, frontend.drop_when_empty),
                ]
            } else {
                vec![(SCOPE_INTERNAL, &frontend.backends, frontend.drop_when_empty)]
            };
            for (scope, set, drop_when_empty) in scopes {
                let slot0_key = ServiceKey::new(addr, key.port, proto, scope, 0);
                let rev_nat_id = *frontend_ids
                    .entry(slot0_key)
                    .or_insert_with(|| rev_nat_alloc.allocate());
                let mut backends = Vec::with_capacity(set.len());
                let mut slots = Vec::with_capacity(set.len());
                for (i, b) in set.iter().enumerate() {
                    let b_addr = addr_bytes(b.ip);
                    let id = *backend_ids
                        .entry((b_addr, b.port, proto))
                        .or_insert_with(|| backend_alloc.allocate());
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
                let port_id = *port_ids
                    .entry(frontend.service.clone())
                    .or_insert_with(|| port_alloc.allocate());
                let maglev_table = (frontend.algorithm == Algorithm::Maglev
                    && !backends.is_empty())
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
        out
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
            if self.mirror.backends.get(id) != Some(value) {
                writer.put_backend(*id, value)?;
                self.mirror.backends.insert(*id, *value);
                report.writes += 1;
            }
        }
        for (key, value) in &fe.slots {
            self.put_service(writer, key, value, report)?;
        }
        let (id, value) = &fe.rev_nat;
        if self.mirror.rev_nat.get(id) != Some(value) {
            writer.put_rev_nat(*id, value)?;
            self.mirror.rev_nat.insert(*id, *value);
            report.writes += 1;
        }
        for range in &fe.source_ranges {
            if !self.mirror.source_ranges.contains(range) {
                writer.put_source_range(range)?;
                self.mirror.source_ranges.insert(*range);
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
        let current = self
            .mirror
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
                self.mirror.maglev.get(&MaglevKey {
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
            if self.mirror.maglev.get(&key) != Some(backend_id) {
                writer.put_maglev(&key, *backend_id)?;
                self.mirror.maglev.insert(key, *backend_id);
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
        if self.mirror.services.get(key) != Some(value) {
            writer.put_service(key, value)?;
            self.mirror.services.insert(*key, *value);
            report.writes += 1;
        }
        Ok(())
    }

    /// Source ranges no frontend wants (after slot 0 dropped the flag or
    /// the frontend went away).
    fn delete_stale_ranges(
        &mut self,
        writer: &mut impl MapWriter,
        keep: &HashSet<SourceRangeKey>,
        report: &mut SyncReport,
    ) {
        let stale: Vec<SourceRangeKey> = self
            .mirror
            .source_ranges
            .iter()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        for key in stale {
            match writer.delete_source_range(&key) {
                Ok(()) => {
                    self.mirror.source_ranges.remove(&key);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }
    }

    fn delete_stale(
        &mut self,
        writer: &mut impl MapWriter,
        keep: &HashSet<ServiceKey>,
        wanted_backends: &HashSet<u32>,
        report: &mut SyncReport,
    ) {
        // Slot 0 first: once a frontend's slot 0 is gone, no packet reads its
        // slots any more.
        let mut stale: Vec<ServiceKey> = self
            .mirror
            .services
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        stale.sort_by_key(|k| k.slot != 0);
        for key in stale {
            match writer.delete_service(&key) {
                Ok(()) => {
                    self.mirror.services.remove(&key);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }

        let live_rev_nat: HashSet<u32> = self
            .mirror
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & SVC_FLAG_VIP_MARKER == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        let stale: Vec<u32> = self
            .mirror
            .rev_nat
            .keys()
            .filter(|id| !live_rev_nat.contains(id))
            .copied()
            .collect();
        for id in stale {
            match writer.delete_rev_nat(id) {
                Ok(()) => {
                    self.mirror.rev_nat.remove(&id);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }

        // Maglev entries of tables that are not live (old generations,
        // frontends gone or no longer Maglev).
        let live_tables: HashMap<u32, (u32, u32)> = self
            .mirror
            .services
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.maglev_size > 0 && v.flags & SVC_FLAG_VIP_MARKER == 0)
            .map(|(_, v)| {
                let gen = if v.flags & SVC_FLAG_MAGLEV_GEN != 0 {
                    MAGLEV_GEN_BIT
                } else {
                    0
                };
                (v.rev_nat_id, (gen, v.maglev_size))
            })
            .collect();
        let stale: Vec<MaglevKey> = self
            .mirror
            .maglev
            .keys()
            .filter(|k| match live_tables.get(&k.rev_nat_id) {
                Some((gen, size)) => {
                    k.index & MAGLEV_GEN_BIT != *gen || k.index & !MAGLEV_GEN_BIT >= *size
                }
                None => true,
            })
            .copied()
            .collect();
        for key in stale {
            match writer.delete_maglev(&key) {
                Ok(()) => {
                    self.mirror.maglev.remove(&key);
                    report.deletes += 1;
                }
                Err(err) => report.failed_deletes.push(err),
            }
        }

        let referenced: HashSet<u32> = self
            .mirror
            .services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        let stale: Vec<u32> = self
            .mirror
            .backends
            .keys()
            .filter(|id| !referenced.contains(id) && !wanted_backends.contains(id))
            .copied()
            .collect();
        for id in stale {
            match writer.delete_backend(id) {
                Ok(()) => {
                    self.mirror.backends.remove(&id);
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
        let range_put = maps
            .ops
            .iter()
            .position(|o| o.starts_with("put source range"))
            .unwrap();
        let slot0_put = maps
            .ops
            .iter()
            .rposition(|o| o == "put service slot=0")
            .unwrap();
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
        let slot0_put = maps
            .ops
            .iter()
            .position(|o| o == "put service slot=0")
            .unwrap();
        let range_delete = maps
            .ops
            .iter()
            .position(|o| o.starts_with("delete source range"))
            .unwrap();
        assert!(slot0_put < range_delete, "{:?}", maps.ops);
        assert_eq!(&maps.contents, syncer.mirror());
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
        let first_slot0 = ops.iter().position(|o| o == "put service slot=0").unwrap();
        let last_slot = ops
            .iter()
            .rposition(|o| o.starts_with("put service slot=") && o != "put service slot=0")
            .unwrap();
        let last_backend = ops
            .iter()
            .rposition(|o| o.starts_with("put backend"))
            .unwrap();
        let rev_nat = ops
            .iter()
            .position(|o| o.starts_with("put rev_nat"))
            .unwrap();
        assert!(
            last_backend < first_slot0 && last_slot < first_slot0 && rev_nat < first_slot0,
            "{ops:?}"
        );

        maps.ops.clear();
        syncer.apply(&mut maps, &state(&[]));
        let ops = &maps.ops;
        assert_eq!(ops[0], "delete service slot=0", "{ops:?}");
        let last_service = ops
            .iter()
            .rposition(|o| o.starts_with("delete service"))
            .unwrap();
        let first_backend = ops
            .iter()
            .position(|o| o.starts_with("delete backend"))
            .unwrap();
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
        // No slot beyond the count survives.
        assert_eq!(maps.contents.services.len(), 1 + 2 + 1);
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
        let commit = maps
            .ops
            .iter()
            .position(|o| o == "put service slot=0")
            .unwrap();
        let first_delete = maps
            .ops
            .iter()
            .position(|o| o.starts_with("delete maglev"))
            .unwrap();
        let last_put = maps
            .ops
            .iter()
            .rposition(|o| o.starts_with("put maglev"))
            .unwrap();
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
}
