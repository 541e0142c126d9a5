//! The pure model: (Services, EndpointSlices, Node, config) -> desired
//! datapath state. No I/O here; `sync` turns the result into map writes.
//!
//! Implements SPEC.md section 1 and the ClusterIP part of section 2.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Everything the model reads, as a source (dir or kube) last saw it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// Configuration the model needs (from flags / config file).
#[derive(Clone, Debug, Default)]
pub struct ModelConfig {
    /// This node's name (`--hostname-override`); decides which endpoints are local.
    pub node_name: String,
    /// kproxy's own proxy name (`service.kubernetes.io/service-proxy-name`);
    /// `None` means "skip every Service that carries the label".
    pub proxy_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// IANA protocol number, as the datapath sees it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::PROTO_TCP,
            Protocol::Udp => proxy_common::PROTO_UDP,
            Protocol::Sctp => proxy_common::PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::PROTO_TCP => Some(Protocol::Tcp),
            proxy_common::PROTO_UDP => Some(Protocol::Udp),
            proxy_common::PROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// What a client addresses: one IP, one port, one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
}

/// Which Service port a frontend belongs to (for listings and metrics).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's `name` ("" when unnamed).
    pub port_name: String,
}

/// One usable endpoint: where traffic for the frontend goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    /// Serving but terminating (only chosen through the graceful fallback).
    pub terminating: bool,
    /// On this node (`nodeName` == node name).
    pub local: bool,
}

/// One frontend and the endpoints that serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// Sorted, without duplicates. Empty: the frontend rejects.
    pub backends: Vec<Backend>,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// Computes the desired state. Pure: same input, same output.
pub fn desired_state(snapshot: &Snapshot, config: &ModelConfig) -> DesiredState {
    let _ = (snapshot, config);
    todo!("model: SPEC.md section 1 + ClusterIP")
}
