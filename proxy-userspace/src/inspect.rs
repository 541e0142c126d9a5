//! `kproxy services|conntrack|status`: what the pinned maps hold, as a
//! table or JSON. Reads the maps only, so it works with or without a
//! running daemon.

use std::net::{IpAddr, SocketAddr};

use proxy_common::{
    stat, BACKEND_STATE_TERMINATING, CT_DIR_FORWARD, SCOPE_EXTERNAL, SVC_FLAG_VIP_MARKER,
};
use serde::Serialize;

use crate::model::Protocol;
use crate::sync::{addr_from_bytes, MapContents};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceListing {
    pub frontend: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub scope: &'static str,
    /// New flows are source-NATed to the node (`SVC_FLAG_SNAT`): external
    /// traffic with policy Cluster, ClusterIPs with `--masquerade-all`.
    pub source_nat: bool,
    pub rev_nat_id: u32,
    pub backends: Vec<BackendListing>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendListing {
    pub id: u32,
    pub address: String,
    pub state: &'static str,
}

fn protocol_name(proto: u8) -> String {
    Protocol::from_number(proto)
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| proto.to_string())
}

/// A frontend as `kproxy services` and the metrics name it:
/// `198.18.0.10:80/TCP`, `[2001:db8::a]:80/UDP`.
pub fn frontend_name(ip: IpAddr, port: u16, proto: u8) -> String {
    format!("{}/{}", SocketAddr::new(ip, port), protocol_name(proto))
}

/// Frontends with their backends, in slot order.
pub fn services(contents: &MapContents) -> Vec<ServiceListing> {
    let mut out = Vec::new();
    for (key, value) in &contents.services {
        if key.slot != 0 || value.flags & SVC_FLAG_VIP_MARKER != 0 {
            continue;
        }
        let ip = addr_from_bytes(key.addr);
        let mut backends = Vec::new();
        for slot in 1..=value.count {
            let slot_key = proxy_common::ServiceKey { slot, ..*key };
            let Some(slot_value) = contents.services.get(&slot_key) else {
                continue;
            };
            let id = slot_value.backend_id;
            let (address, state) = match contents.backends.get(&id) {
                Some(b) => (
                    SocketAddr::new(addr_from_bytes(b.addr), b.port).to_string(),
                    if b.state == BACKEND_STATE_TERMINATING {
                        "terminating"
                    } else {
                        "active"
                    },
                ),
                None => ("<missing>".to_owned(), "missing"),
            };
            backends.push(BackendListing { id, address, state });
        }
        out.push(ServiceListing {
            frontend: frontend_name(ip, key.port, key.proto),
            ip,
            port: key.port,
            protocol: protocol_name(key.proto),
            scope: if key.scope == SCOPE_EXTERNAL {
                "external"
            } else {
                "internal"
            },
            source_nat: value.flags & proxy_common::SVC_FLAG_SNAT != 0,
            rev_nat_id: value.rev_nat_id,
            backends,
        });
    }
    out
}

pub fn services_table(listing: &[ServiceListing]) -> String {
    let mut out =
        String::from("FRONTEND                                  SCOPE    SNAT BACKENDS\n");
    for s in listing {
        let backends = if s.backends.is_empty() {
            "(none: rejects)".to_owned()
        } else {
            s.backends
                .iter()
                .map(|b| {
                    if b.state == "active" {
                        b.address.clone()
                    } else {
                        format!("{} ({})", b.address, b.state)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let snat = if s.source_nat { "yes" } else { "-" };
        out.push_str(&format!(
            "{:<41} {:<8} {:<4} {}\n",
            s.frontend, s.scope, snat, backends
        ));
    }
    out
}

#[derive(Debug, Serialize)]
pub struct ConntrackListing {
    pub direction: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub nat: String,
    /// Source-NATed flows: the other side's translation (forward: the new
    /// source; reply: the client the reply goes back to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
    pub state: &'static str,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub idle_seconds: f64,
}

fn state_name(proto: u8, state: u8) -> &'static str {
    match proto {
        proxy_common::PROTO_TCP => {}
        // Tracked like UDP: no states, an idle timeout.
        proxy_common::PROTO_SCTP => return "sctp",
        _ => return "udp",
    }
    match state {
        proxy_common::CT_STATE_NEW => "syn_sent",
        proxy_common::CT_STATE_ESTABLISHED => "established",
        proxy_common::CT_STATE_CLOSING => "closing",
        _ => "closed",
    }
}

pub fn conntrack(
    entries: &[(proxy_common::ConntrackKey, proxy_common::ConntrackValue)],
    now_ns: u64,
) -> Vec<ConntrackListing> {
    entries
        .iter()
        .map(|(k, v)| ConntrackListing {
            direction: if v.direction == CT_DIR_FORWARD {
                "forward"
            } else {
                "reply"
            },
            protocol: protocol_name(k.proto),
            source: SocketAddr::new(addr_from_bytes(k.saddr), k.sport).to_string(),
            destination: SocketAddr::new(addr_from_bytes(k.daddr), k.dport).to_string(),
            nat: SocketAddr::new(addr_from_bytes(v.nat_addr), v.nat_port).to_string(),
            snat: (v.flags & proxy_common::CT_FLAG_SNAT != 0)
                .then(|| SocketAddr::new(addr_from_bytes(v.other_addr), v.other_port).to_string()),
            state: state_name(k.proto, v.state),
            backend_id: v.backend_id,
            rev_nat_id: v.rev_nat_id,
            idle_seconds: now_ns.saturating_sub(v.last_seen_ns) as f64 / 1e9,
        })
        .collect()
}

pub fn conntrack_table(listing: &[ConntrackListing]) -> String {
    let mut out = String::from(
        "DIR      PROTO SOURCE                  DESTINATION             NAT TO                  SNAT/CLIENT             STATE        IDLE\n",
    );
    for c in listing {
        out.push_str(&format!(
            "{:<8} {:<5} {:<23} {:<23} {:<23} {:<23} {:<12} {:.0}s\n",
            c.direction,
            c.protocol,
            c.source,
            c.destination,
            c.nat,
            c.snat.as_deref().unwrap_or("-"),
            c.state,
            c.idle_seconds
        ));
    }
    out
}

/// Datapath counters by name.
pub fn stats(values: &[u64]) -> Vec<(&'static str, u64)> {
    stat::NAMES
        .iter()
        .zip(values.iter())
        .map(|(n, v)| (*n, *v))
        .collect()
}
