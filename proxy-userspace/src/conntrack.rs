//! Conntrack housekeeping decisions, pure: which entries have expired, and
//! which UDP flows point at a backend that no longer serves their frontend.
//! `datapath` reads and deletes; the daemon decides when.

use std::collections::{HashMap, HashSet};

use proxy_common::{
    ConntrackKey, ConntrackValue, DatapathConfig, CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_UDP,
    SVC_FLAG_VIP_MARKER,
};

use crate::sync::MapContents;

/// An (address, port) in map form.
pub type Endpoint = ([u8; 16], u16);

/// The key of the other direction's entry of the same flow.
pub fn peer_key(key: &ConntrackKey, value: &ConntrackValue) -> ConntrackKey {
    if key.direction == CT_DIR_FORWARD {
        // (client -> VIP) -> reply keyed (backend -> client).
        ConntrackKey {
            saddr: value.nat_addr,
            daddr: key.saddr,
            sport: value.nat_port,
            dport: key.sport,
            direction: CT_DIR_REPLY,
            ..*key
        }
    } else {
        // (backend -> client) -> forward keyed (client -> VIP).
        ConntrackKey {
            saddr: key.daddr,
            daddr: value.nat_addr,
            sport: key.dport,
            dport: value.nat_port,
            direction: CT_DIR_FORWARD,
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
            let (frontend, backend) = if key.direction == CT_DIR_FORWARD {
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

#[cfg(test)]
mod tests {
    use proxy_common::{
        ipv4_mapped, BackendValue, ServiceKey, ServiceValue, CT_STATE_ESTABLISHED, NS_PER_SEC,
        PROTO_TCP, SCOPE_EXTERNAL,
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
            direction: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let fwd_value = ConntrackValue {
            nat_addr: backend,
            nat_port: 8080,
            last_seen_ns: fwd_seen,
            ..ConntrackValue::default()
        };
        let reply = peer_key(&fwd, &fwd_value);
        let reply_value = ConntrackValue {
            nat_addr: VIP,
            nat_port: 53,
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
        let base = ServiceKey::new(VIP, 53, PROTO_UDP, SCOPE_EXTERNAL, 0);
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
            if k.direction == CT_DIR_FORWARD {
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
    fn tcp_flows_are_never_purged_for_membership() {
        let entries: HashMap<_, _> = flow(PROTO_TCP, B1, 0, 0).into_iter().collect();
        assert!(stale_udp_keys(&entries, &HashMap::new()).is_empty());
    }
}
