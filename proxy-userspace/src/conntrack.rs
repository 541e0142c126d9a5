//! Conntrack housekeeping decisions, pure: which entries have expired, and
//! which UDP flows point at a backend that no longer serves their frontend.
//! `datapath` reads and deletes; the daemon decides when.

use std::collections::{HashMap, HashSet};

use proxy_common::{
    AffinityKey, AffinityValue, ConntrackKey, ConntrackValue, DatapathConfig, ServiceKey,
    CT_DIR_FORWARD, CT_FLAG_SNAT, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_VIP_MARKER,
};

use crate::model::FrontendKey;
use crate::sync::{addr_bytes, MapContents};

/// An (address, port) in map form.
pub type Endpoint = ([u8; 16], u16);

/// The key of the other direction's entry of the same flow. A
/// source-NATed flow (`CT_FLAG_SNAT`) keeps the other side's translation in
/// `other_addr`/`other_port`: the reply is keyed (backend -> SNAT address),
/// and the reply entry names the client there.
pub fn peer_key(key: &ConntrackKey, value: &ConntrackValue) -> ConntrackKey {
    let snat = value.flags & CT_FLAG_SNAT != 0;
    if value.direction == CT_DIR_FORWARD {
        // (client -> VIP) -> reply keyed (backend -> client or SNAT address).
        let (client, client_port) = if snat {
            (value.other_addr, value.other_port)
        } else {
            (key.saddr, key.sport)
        };
        ConntrackKey {
            saddr: value.nat_addr,
            daddr: client,
            sport: value.nat_port,
            dport: client_port,
            ..*key
        }
    } else {
        // (backend -> client or SNAT address) -> forward keyed (client -> VIP).
        let (client, client_port) = if snat {
            (value.other_addr, value.other_port)
        } else {
            (key.daddr, key.dport)
        };
        ConntrackKey {
            saddr: client,
            daddr: value.nat_addr,
            sport: client_port,
            dport: value.nat_port,
            ..*key
        }
    }
}

fn idle_expired(value: &ConntrackValue, proto: u8, config: &DatapathConfig, now_ns: u64) -> bool {
    now_ns.saturating_sub(value.last_seen_ns) > config.timeout_ns(proto, value.state)
}

/// Entries of flows idle past their state's timeout. A flow is idle only
/// when both of its directions are (the datapath judges the same way).
pub fn expired_keys(
    entries: &HashMap<ConntrackKey, ConntrackValue>,
    config: &DatapathConfig,
    now_ns: u64,
) -> Vec<ConntrackKey> {
    entries
        .iter()
        .filter(|(key, value)| {
            idle_expired(value, key.proto, config, now_ns)
                && entries
                    .get(&peer_key(key, value))
                    .is_none_or(|peer| idle_expired(peer, key.proto, config, now_ns))
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Entries whose other direction is gone, idle for at least `grace_ns`.
/// LRU eviction removes single entries when the map is full; the surviving
/// half of such a flow is useless, so the sweep deletes it and counts it as
/// an eviction. The grace period keeps a flow being created while the
/// sweep reads the map (one entry written, the other not yet) safe.
pub fn orphan_keys(
    entries: &HashMap<ConntrackKey, ConntrackValue>,
    now_ns: u64,
    grace_ns: u64,
) -> Vec<ConntrackKey> {
    entries
        .iter()
        .filter(|(k, v)| {
            now_ns.saturating_sub(v.last_seen_ns) >= grace_ns
                && !entries.contains_key(&peer_key(k, v))
        })
        .map(|(k, _)| *k)
        .collect()
}

/// For each UDP frontend, the backends it currently has.
pub fn udp_members(maps: &MapContents) -> HashMap<Endpoint, HashSet<Endpoint>> {
    let mut out: HashMap<Endpoint, HashSet<Endpoint>> = HashMap::new();
    for (key, value) in &maps.services {
        if key.proto != PROTO_UDP || value.flags & SVC_FLAG_VIP_MARKER != 0 {
            continue;
        }
        let members = out.entry((key.addr, key.port)).or_default();
        if key.slot != 0 {
            if let Some(b) = maps.backends.get(&value.backend_id) {
                members.insert((b.addr, b.port));
            }
        }
    }
    out
}

/// The slot-0 entries of `frontends` (both scopes) and their backend ids.
fn frontend_entries<'a>(
    maps: &'a MapContents,
    frontends: &'a [FrontendKey],
) -> impl Iterator<Item = (ServiceKey, &'a proxy_common::ServiceValue, Vec<u32>)> + 'a {
    frontends.iter().flat_map(move |key| {
        [SCOPE_INTERNAL, SCOPE_EXTERNAL]
            .into_iter()
            .filter_map(move |scope| {
                let slot0 = ServiceKey::new(
                    addr_bytes(key.ip),
                    key.port,
                    key.protocol.number(),
                    scope,
                    0,
                );
                let value = maps.services.get(&slot0)?;
                let ids = (1..=value.count)
                    .filter_map(|slot| maps.services.get(&ServiceKey { slot, ..slot0 }))
                    .map(|s| s.backend_id)
                    .collect();
                Some((slot0, value, ids))
            })
    })
}

/// [`udp_members`] of `frontends` only (those an apply touches), so a
/// change costs what it touches: the same as `udp_members` restricted to
/// their (address, port), whose entries are all among them.
pub fn udp_members_of(
    maps: &MapContents,
    frontends: &[FrontendKey],
) -> HashMap<Endpoint, HashSet<Endpoint>> {
    let mut out: HashMap<Endpoint, HashSet<Endpoint>> = HashMap::new();
    for (slot0, _, ids) in frontend_entries(maps, frontends) {
        if slot0.proto != PROTO_UDP {
            continue;
        }
        let members = out.entry((slot0.addr, slot0.port)).or_default();
        members.extend(
            ids.iter()
                .filter_map(|id| maps.backends.get(id))
                .map(|b| (b.addr, b.port)),
        );
    }
    out
}

/// [`affinity_members`] of `frontends` only. A Service port may have other
/// frontends: a loss seen here is only a candidate, to be confirmed
/// against the whole `affinity_members` after the change.
pub fn affinity_members_of(
    maps: &MapContents,
    frontends: &[FrontendKey],
) -> HashMap<u32, HashSet<u32>> {
    let mut out: HashMap<u32, HashSet<u32>> = HashMap::new();
    for (_, value, ids) in frontend_entries(maps, frontends) {
        if value.affinity_timeout == 0 {
            continue;
        }
        out.entry(value.backend_id).or_default().extend(ids);
    }
    out
}

/// True when some UDP frontend lost a backend (or vanished) between two
/// states: only then is a conntrack scan worth it.
pub fn udp_lost_backends(
    before: &HashMap<Endpoint, HashSet<Endpoint>>,
    after: &HashMap<Endpoint, HashSet<Endpoint>>,
) -> bool {
    before
        .iter()
        .any(|(frontend, old)| match after.get(frontend) {
            None => !old.is_empty(),
            Some(new) => old.iter().any(|b| !new.contains(b)),
        })
}

/// UDP entries whose backend no longer serves their frontend: kube-proxy's
/// most reported bug is a UDP client with a fixed source port black-holed on
/// a dead endpoint; these are deleted so its next datagram picks again.
pub fn stale_udp_keys(
    entries: &HashMap<ConntrackKey, ConntrackValue>,
    members: &HashMap<Endpoint, HashSet<Endpoint>>,
) -> Vec<ConntrackKey> {
    entries
        .iter()
        .filter(|(key, value)| {
            if key.proto != PROTO_UDP {
                return false;
            }
            let (frontend, backend) = if value.direction == CT_DIR_FORWARD {
                ((key.daddr, key.dport), (value.nat_addr, value.nat_port))
            } else {
                ((value.nat_addr, value.nat_port), (key.saddr, key.sport))
            };
            !members
                .get(&frontend)
                .is_some_and(|backends| backends.contains(&backend))
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Backend ids of forward entries among `deleted` whose flow was still
/// open (not closing): their backends' open-flow counts must drop by one.
pub fn open_flow_backends(
    deleted: &[ConntrackKey],
    entries: &HashMap<ConntrackKey, ConntrackValue>,
) -> Vec<u32> {
    deleted
        .iter()
        .filter_map(|k| entries.get(k))
        .filter(|v| v.direction == CT_DIR_FORWARD && v.state < proxy_common::CT_STATE_CLOSING)
        .map(|v| v.backend_id)
        .collect()
}

/// For each Service port with session affinity, the backend ids it has.
pub fn affinity_members(maps: &MapContents) -> HashMap<u32, HashSet<u32>> {
    let mut out: HashMap<u32, HashSet<u32>> = HashMap::new();
    for (key, value) in &maps.services {
        if key.slot != 0 || value.affinity_timeout == 0 || value.flags & SVC_FLAG_VIP_MARKER != 0 {
            continue;
        }
        let members = out.entry(value.backend_id).or_default();
        for slot in 1..=value.count {
            if let Some(s) = maps
                .services
                .get(&proxy_common::ServiceKey { slot, ..*key })
            {
                members.insert(s.backend_id);
            }
        }
    }
    out
}

/// Whether a Service port lost a backend or its affinity between two states.
pub fn affinity_lost_backends(
    before: &HashMap<u32, HashSet<u32>>,
    after: &HashMap<u32, HashSet<u32>>,
) -> bool {
    before.iter().any(|(port, old)| match after.get(port) {
        None => true,
        Some(new) => old.iter().any(|b| !new.contains(b)),
    })
}

/// Affinity entries that remember a backend no longer in their Service
/// port (or a port without affinity now): the client picks anew.
pub fn stale_affinity_keys(
    entries: &HashMap<AffinityKey, AffinityValue>,
    members: &HashMap<u32, HashSet<u32>>,
) -> Vec<AffinityKey> {
    entries
        .iter()
        .filter(|(k, v)| {
            !members
                .get(&k.service_port_id)
                .is_some_and(|m| m.contains(&v.backend_id))
        })
        .map(|(k, _)| *k)
        .collect()
}

#[cfg(test)]
mod tests {
    use proxy_common::{
        ipv4_mapped, BackendValue, ServiceKey, ServiceValue, CT_DIR_REPLY, CT_STATE_ESTABLISHED,
        NS_PER_SEC, PROTO_TCP, SCOPE_INTERNAL,
    };

    use super::*;

    const CLIENT: [u8; 16] = ipv4_mapped([198, 18, 1, 2]);
    const VIP: [u8; 16] = ipv4_mapped([198, 19, 0, 10]);
    const B1: [u8; 16] = ipv4_mapped([198, 18, 2, 2]);
    const B2: [u8; 16] = ipv4_mapped([198, 18, 3, 2]);

    /// Both entries of a flow client:40000 -> VIP:53 -> backend:8080.
    fn flow(
        proto: u8,
        backend: [u8; 16],
        fwd_seen: u64,
        reply_seen: u64,
    ) -> [(ConntrackKey, ConntrackValue); 2] {
        let fwd = ConntrackKey {
            saddr: CLIENT,
            daddr: VIP,
            sport: 40000,
            dport: 53,
            proto,
            _pad: [0; 3],
        };
        let fwd_value = ConntrackValue {
            nat_addr: backend,
            nat_port: 8080,
            direction: CT_DIR_FORWARD,
            last_seen_ns: fwd_seen,
            ..ConntrackValue::default()
        };
        let reply = peer_key(&fwd, &fwd_value);
        let reply_value = ConntrackValue {
            nat_addr: VIP,
            nat_port: 53,
            direction: CT_DIR_REPLY,
            last_seen_ns: reply_seen,
            ..ConntrackValue::default()
        };
        [(fwd, fwd_value), (reply, reply_value)]
    }

    #[test]
    fn peer_keys_are_symmetric() {
        let [(fwd, fv), (reply, rv)] = flow(PROTO_UDP, B1, 0, 0);
        assert_eq!(reply.saddr, B1);
        assert_eq!(reply.dport, 40000);
        assert_eq!(peer_key(&reply, &rv), fwd);
        assert_eq!(peer_key(&fwd, &fv), reply);
    }

    #[test]
    fn source_nated_flows_pair_through_the_snat_address() {
        // client:40000 -> node:30080, DNAT to B1:8080 and SNAT to node:61234.
        let node = ipv4_mapped([198, 18, 100, 11]);
        let fwd = ConntrackKey {
            saddr: CLIENT,
            daddr: node,
            sport: 40000,
            dport: 30080,
            proto: PROTO_UDP,
            _pad: [0; 3],
        };
        let fv = ConntrackValue {
            nat_addr: B1,
            nat_port: 8080,
            other_addr: node,
            other_port: 61234,
            flags: CT_FLAG_SNAT,
            ..ConntrackValue::default()
        };
        let reply = peer_key(&fwd, &fv);
        assert_eq!((reply.saddr, reply.sport), (B1, 8080));
        assert_eq!((reply.daddr, reply.dport), (node, 61234));
        let rv = ConntrackValue {
            nat_addr: node,
            nat_port: 30080,
            other_addr: CLIENT,
            other_port: 40000,
            flags: CT_FLAG_SNAT,
            direction: CT_DIR_REPLY,
            ..ConntrackValue::default()
        };
        assert_eq!(peer_key(&reply, &rv), fwd);
        let entries: HashMap<_, _> = [(fwd, fv), (reply, rv)].into_iter().collect();
        assert!(
            orphan_keys(&entries, u64::MAX, 0).is_empty(),
            "both halves of a source-NATed flow are there: no orphan"
        );
    }

    #[test]
    fn a_flow_expires_only_when_both_directions_are_idle() {
        let config = DatapathConfig::default();
        let now = 1000 * NS_PER_SEC;
        // One-way stream: the client keeps sending, the backend never answers.
        let one_way: HashMap<_, _> = flow(PROTO_UDP, B1, now, 0).into_iter().collect();
        assert!(expired_keys(&one_way, &config, now).is_empty());
        let idle: HashMap<_, _> = flow(PROTO_UDP, B1, now - 61 * NS_PER_SEC, now - 61 * NS_PER_SEC)
            .into_iter()
            .collect();
        assert_eq!(expired_keys(&idle, &config, now).len(), 2);
        // TCP established flows live 24 h; the same idle time keeps them.
        let mut tcp: HashMap<_, _> =
            flow(PROTO_TCP, B1, now - 61 * NS_PER_SEC, now - 61 * NS_PER_SEC)
                .into_iter()
                .collect();
        for v in tcp.values_mut() {
            v.state = CT_STATE_ESTABLISHED;
        }
        assert!(expired_keys(&tcp, &config, now).is_empty());
        // Configured timeouts apply.
        let short = DatapathConfig {
            tcp_established_timeout_ns: 30 * NS_PER_SEC,
            ..config
        };
        assert_eq!(expired_keys(&tcp, &short, now).len(), 2);
    }

    fn maps_with_udp_backends(backends: &[[u8; 16]]) -> MapContents {
        let mut maps = MapContents::default();
        let base = ServiceKey::new(VIP, 53, PROTO_UDP, SCOPE_INTERNAL, 0);
        maps.services.insert(
            base,
            ServiceValue {
                count: backends.len() as u16,
                ..ServiceValue::default()
            },
        );
        for (i, b) in backends.iter().enumerate() {
            let id = i as u32 + 1;
            maps.backends.insert(
                id,
                BackendValue {
                    addr: *b,
                    port: 8080,
                    proto: PROTO_UDP,
                    ..BackendValue::default()
                },
            );
            maps.services.insert(
                ServiceKey {
                    slot: id as u16,
                    ..base
                },
                ServiceValue {
                    backend_id: id,
                    ..ServiceValue::default()
                },
            );
        }
        maps
    }

    #[test]
    fn udp_flows_to_a_backend_that_left_are_stale_both_ways() {
        let before = udp_members(&maps_with_udp_backends(&[B1, B2]));
        let after = udp_members(&maps_with_udp_backends(&[B2]));
        assert!(udp_lost_backends(&before, &after));
        assert!(
            !udp_lost_backends(&after, &before),
            "gaining a backend is no loss"
        );
        let mut entries: HashMap<_, _> = flow(PROTO_UDP, B1, 0, 0).into_iter().collect();
        // A second client port, to backend 2.
        entries.extend(flow(PROTO_UDP, B2, 0, 0).into_iter().map(|(mut k, v)| {
            if v.direction == CT_DIR_FORWARD {
                k.sport = 40001;
            } else {
                k.dport = 40001;
            }
            (k, v)
        }));
        let stale = stale_udp_keys(&entries, &after);
        assert_eq!(stale.len(), 2, "{stale:?}");
        assert!(stale
            .iter()
            .all(|k| k.saddr == B1 || entries[k].nat_addr == B1));
        // A deleted frontend makes all of its flows stale.
        assert_eq!(stale_udp_keys(&entries, &HashMap::new()).len(), 4);
    }

    #[test]
    fn affinity_to_a_backend_that_left_is_stale() {
        let mut maps = maps_with_udp_backends(&[B1, B2]);
        let slot0 = *maps.services.keys().find(|k| k.slot == 0).unwrap();
        let v = maps.services.get_mut(&slot0).unwrap();
        v.affinity_timeout = 10_800;
        v.backend_id = 7; // the Service port id
        let before = affinity_members(&maps);
        assert_eq!(before[&7], HashSet::from([1, 2]));
        // Backend 1 leaves: slot 1 now holds backend 2 only.
        let v = maps.services.get_mut(&slot0).unwrap();
        v.count = 1;
        maps.services
            .get_mut(&ServiceKey { slot: 1, ..slot0 })
            .unwrap()
            .backend_id = 2;
        let after = affinity_members(&maps);
        assert!(affinity_lost_backends(&before, &after));
        let entry = |client: [u8; 16], backend_id| {
            (
                AffinityKey {
                    client,
                    service_port_id: 7,
                    _pad: 0,
                },
                AffinityValue {
                    backend_id,
                    ..AffinityValue::default()
                },
            )
        };
        let entries: HashMap<_, _> = [entry(CLIENT, 1), entry(VIP, 2)].into_iter().collect();
        let stale = stale_affinity_keys(&entries, &after);
        assert_eq!(stale, vec![entry(CLIENT, 1).0]);
    }

    #[test]
    fn half_evicted_flows_are_orphans() {
        let mut entries: HashMap<_, _> = flow(PROTO_TCP, B1, 0, 0).into_iter().collect();
        let second = NS_PER_SEC;
        assert!(orphan_keys(&entries, 10 * second, second).is_empty());
        let reply = *entries
            .iter()
            .find(|(_, v)| v.direction == CT_DIR_REPLY)
            .unwrap()
            .0;
        entries.remove(&reply);
        // Just created (or still being created): kept.
        assert!(orphan_keys(&entries, second / 2, second).is_empty());
        let orphans = orphan_keys(&entries, 10 * second, second);
        assert_eq!(orphans.len(), 1);
        assert_eq!(entries[&orphans[0]].direction, CT_DIR_FORWARD);
    }

    #[test]
    fn deleting_open_flows_releases_their_backends() {
        let entries: HashMap<_, _> = flow(PROTO_UDP, B1, 0, 0)
            .into_iter()
            .map(|(k, mut v)| {
                v.backend_id = 9;
                (k, v)
            })
            .collect();
        let keys: Vec<_> = entries.keys().copied().collect();
        assert_eq!(
            open_flow_backends(&keys, &entries),
            vec![9],
            "one per flow, not per entry"
        );
    }

    #[test]
    fn tcp_flows_are_never_purged_for_membership() {
        let entries: HashMap<_, _> = flow(PROTO_TCP, B1, 0, 0).into_iter().collect();
        assert!(stale_udp_keys(&entries, &HashMap::new()).is_empty());
    }
}
