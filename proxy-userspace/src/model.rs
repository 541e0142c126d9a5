//! The pure model: (Services, EndpointSlices, Node, config) -> desired
//! datapath state. No I/O here; `sync` turns the result into map writes.
//!
//! Implements SPEC.md section 1 and the ClusterIP part of section 2.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

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
    /// Backend selection for Services without a valid `kproxy.io/lb-algorithm`.
    pub default_algorithm: Algorithm,
}

/// The annotation that picks a Service's backend selection algorithm.
pub const ANNOTATION_LB_ALGORITHM: &str = "kproxy.io/lb-algorithm";
/// kube-proxy's default and maximum ClientIP affinity timeouts.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// How a new flow picks its backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// Uniformly at random (kube-proxy's iptables mode).
    #[default]
    Random,
    /// Consistent hashing of the 5-tuple over a Maglev table.
    Maglev,
    /// Round robin.
    RoundRobin,
    /// Least connections.
    LeastConnection,
    /// Source hashing: one client address, one backend.
    SourceHash,
    /// Destination hashing: one destination address, one backend.
    DestinationHash,
    /// Shortest expected delay: fewest (active + 1).
    ShortestExpectedDelay,
    /// Never queue: an idle backend if there is one, else shortest expected delay.
    NeverQueue,
}

impl Algorithm {
    /// The annotation values, as IPVS names its schedulers.
    pub const NAMES: [(&'static str, Algorithm); 8] = [
        ("random", Algorithm::Random),
        ("maglev", Algorithm::Maglev),
        ("rr", Algorithm::RoundRobin),
        ("lc", Algorithm::LeastConnection),
        ("sh", Algorithm::SourceHash),
        ("dh", Algorithm::DestinationHash),
        ("sed", Algorithm::ShortestExpectedDelay),
        ("nq", Algorithm::NeverQueue),
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(_, a)| *a)
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .unwrap_or("random")
    }

    /// The datapath's number for it (`proxy_common::ALG_*`).
    pub fn number(self) -> u8 {
        match self {
            Algorithm::Random => proxy_common::ALG_RANDOM,
            Algorithm::Maglev => proxy_common::ALG_MAGLEV,
            Algorithm::RoundRobin => proxy_common::ALG_RR,
            Algorithm::LeastConnection => proxy_common::ALG_LC,
            Algorithm::SourceHash => proxy_common::ALG_SH,
            Algorithm::DestinationHash => proxy_common::ALG_DH,
            Algorithm::ShortestExpectedDelay => proxy_common::ALG_SED,
            Algorithm::NeverQueue => proxy_common::ALG_NQ,
        }
    }

    pub fn from_number(n: u8) -> Self {
        Self::NAMES
            .iter()
            .map(|(_, a)| *a)
            .find(|a| a.number() == n)
            .unwrap_or_default()
    }
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

    /// Reads a Service or EndpointSlice port's `protocol`: unset means TCP,
    /// anything but TCP/UDP/SCTP is `None`.
    pub fn from_k8s(protocol: Option<&str>) -> Option<Self> {
        match protocol {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
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
    pub algorithm: Algorithm,
    /// `sessionAffinity: ClientIP`: the idle timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// Sorted, without duplicates. Empty: the frontend rejects.
    pub backends: Vec<Backend>,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label handing a Service to another proxy (or, with `--proxy-name`, to us).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that makes kube-proxy ignore a Service or EndpointSlice.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// The namespace objects without one are applied to (as kubectl does).
pub const DEFAULT_NAMESPACE: &str = "default";

/// One endpoint of one Service port after merging the Service's slices
/// (SPEC 1.2 to 1.4), before choosing the cluster or local set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` == node name).
    pub local: bool,
}

impl Endpoint {
    /// Of two copies of one ip:port, the one to keep: the non-terminating one
    /// (SPEC 1.3), then the more usable one; the full order breaks the
    /// remaining ties so the choice never depends on input order.
    fn preferred(self, other: Endpoint) -> Endpoint {
        let rank = |e: &Endpoint| (e.terminating, !e.ready, !e.serving, *e);
        if rank(&other) < rank(&self) {
            other
        } else {
            self
        }
    }
}

/// Computes the desired state. Pure: same input, same output, whatever the
/// order of the objects in the snapshot.
pub fn desired_state(snapshot: &Snapshot, config: &ModelConfig) -> DesiredState {
    let slices = SliceIndex::new(&snapshot.endpoint_slices);
    let mut claims: BTreeMap<FrontendKey, Vec<Frontend>> = BTreeMap::new();

    for service in &snapshot.services {
        if !service_is_proxied(service, config) {
            continue;
        }
        let (Some(name), Some(spec)) = (service.metadata.name.as_deref(), &service.spec) else {
            continue;
        };
        let namespace = namespace_of(&service.metadata);
        let ips = cluster_ips(service);
        let algorithm = algorithm_of(service, namespace, name, config);
        let affinity_timeout = affinity_of(spec);
        for service_port in spec.ports.iter().flatten() {
            let port_name = service_port.name.as_deref().unwrap_or("");
            let Some(protocol) = Protocol::from_k8s(service_port.protocol.as_deref()) else {
                tracing::warn!(
                    service = %format_args!("{namespace}/{name}"),
                    port = port_name,
                    protocol = service_port.protocol.as_deref(),
                    "skipping Service port with an unknown protocol"
                );
                continue;
            };
            let Some(port) = port_number(service_port.port) else {
                tracing::warn!(
                    service = %format_args!("{namespace}/{name}"),
                    port = service_port.port,
                    "skipping Service port out of range 1-65535"
                );
                continue;
            };
            for &ip in &ips {
                let endpoints =
                    slices.endpoints(namespace, name, port_name, protocol, Family::of(ip), config);
                let frontend = Frontend {
                    service: ServicePortName {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        port_name: port_name.to_owned(),
                    },
                    kind: FrontendKind::ClusterIp,
                    algorithm,
                    affinity_timeout,
                    backends: cluster_endpoints(&endpoints),
                };
                claims
                    .entry(FrontendKey { ip, port, protocol })
                    .or_default()
                    .push(frontend);
            }
        }
    }

    let frontends = claims
        .into_iter()
        .map(|(key, claimants)| (key, resolve_claims(key, claimants)))
        .collect();
    DesiredState { frontends }
}

/// Whether kproxy handles this Service at all (SPEC 1.1). Headless and
/// ExternalName Services have no frontends; labelled ones belong to another
/// proxy (or, when we have a proxy name, only those with our name are ours).
pub fn service_is_proxied(service: &Service, config: &ModelConfig) -> bool {
    let labels = service.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|labels| labels.get(key));
    if label(LABEL_HEADLESS).is_some() {
        return false;
    }
    let proxy_name = label(LABEL_SERVICE_PROXY_NAME);
    let ours = match &config.proxy_name {
        None => proxy_name.is_none(),
        Some(ours) => proxy_name == Some(ours),
    };
    if !ours {
        return false;
    }
    let Some(spec) = &service.spec else {
        return true;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || spec.cluster_ips.iter().flatten().any(|ip| ip == "None");
    !headless
}

/// The ClusterIP frontend addresses: `clusterIPs`, or `clusterIP` for objects
/// written before dual-stack. Unparseable entries are skipped.
fn cluster_ips(service: &Service) -> BTreeSet<IpAddr> {
    let Some(spec) = &service.spec else {
        return BTreeSet::new();
    };
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    listed
        .into_iter()
        .filter(|ip| !ip.is_empty())
        .filter_map(|ip| match ip.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(
                    service = %qualified_name(&service.metadata),
                    cluster_ip = ip,
                    "skipping a clusterIP that is not an IP address"
                );
                None
            }
        })
        .collect()
}

/// The cluster endpoint set (SPEC 1.5): the ready endpoints; when none is
/// ready, the serving and terminating ones (graceful termination), marked
/// `terminating`. Topology hints (SPEC 8) will narrow the ready set here.
pub fn cluster_endpoints(endpoints: &[Endpoint]) -> Vec<Backend> {
    usable(endpoints.iter())
}

/// The local endpoint set (SPEC 1.5), for traffic policy Local: the local
/// ready endpoints; when none, the local serving and terminating ones.
/// Topology hints never apply here.
pub fn local_endpoints(endpoints: &[Endpoint]) -> Vec<Backend> {
    usable(endpoints.iter().filter(|endpoint| endpoint.local))
}

fn usable<'a>(endpoints: impl Iterator<Item = &'a Endpoint> + Clone) -> Vec<Backend> {
    let backend = |endpoint: &Endpoint, terminating| Backend {
        ip: endpoint.ip,
        port: endpoint.port,
        terminating,
        local: endpoint.local,
    };
    let mut backends: Vec<Backend> = endpoints
        .clone()
        .filter(|endpoint| endpoint.ready)
        .map(|endpoint| backend(endpoint, false))
        .collect();
    if backends.is_empty() {
        backends = endpoints
            .filter(|endpoint| endpoint.serving && endpoint.terminating)
            .map(|endpoint| backend(endpoint, true))
            .collect();
    }
    backends.sort();
    backends.dedup();
    backends
}

/// Several Services claim one frontend: a misconfiguration (or two copies of
/// one object). Keep the lowest namespace/name/port so the winner never
/// depends on input order, and say so.
/// The Service's `kproxy.io/lb-algorithm`, or the default (with a warning
/// for a value kproxy does not know).
fn algorithm_of(service: &Service, namespace: &str, name: &str, config: &ModelConfig) -> Algorithm {
    let Some(value) = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
    else {
        return config.default_algorithm;
    };
    Algorithm::parse(value).unwrap_or_else(|| {
        tracing::warn!(
            service = %format_args!("{namespace}/{name}"),
            value = %value,
            default = config.default_algorithm.name(),
            "unknown {ANNOTATION_LB_ALGORITHM}; use one of random, maglev, rr, lc, sh, dh, sed, nq"
        );
        config.default_algorithm
    })
}

/// `sessionAffinity: ClientIP` -> its timeout (default 10800 s, at most 86400 s).
fn affinity_of(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .map(|t| t.clamp(1, MAX_AFFINITY_TIMEOUT_SECONDS as i32) as u32)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
    Some(seconds)
}

fn resolve_claims(key: FrontendKey, mut claimants: Vec<Frontend>) -> Frontend {
    claimants
        .sort_by(|a, b| (&a.service, a.kind, &a.backends).cmp(&(&b.service, b.kind, &b.backends)));
    claimants.dedup();
    let mut claimants = claimants.into_iter();
    let winner = claimants.next().expect("a claim exists for every key");
    for loser in claimants {
        tracing::warn!(
            frontend = %format_args!("{}:{}/{}", key.ip, key.port, key.protocol.as_str()),
            kept = %format_args!("{}/{}:{}", winner.service.namespace, winner.service.name, winner.service.port_name),
            ignored = %format_args!("{}/{}:{}", loser.service.namespace, loser.service.name, loser.service.port_name),
            "two Services claim the same frontend; fix one of them"
        );
    }
    winner
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// An EndpointSlice `addressType`; FQDN (and anything else) has no family.
    fn of_address_type(address_type: &str) -> Option<Family> {
        match address_type {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

/// EndpointSlices grouped by the Service they belong to (SPEC 1.2).
struct SliceIndex<'a> {
    by_service: BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> SliceIndex<'a> {
    fn new(slices: &'a [EndpointSlice]) -> Self {
        let mut by_service: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for slice in slices {
            let labels = slice.metadata.labels.as_ref();
            if labels.is_some_and(|labels| labels.contains_key(LABEL_HEADLESS)) {
                continue;
            }
            let Some(service) = labels.and_then(|labels| labels.get(LABEL_SERVICE_NAME)) else {
                continue;
            };
            let namespace = namespace_of(&slice.metadata);
            by_service
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice);
        }
        SliceIndex { by_service }
    }

    /// The merged endpoints of one Service port in one address family,
    /// sorted by ip:port, one per ip:port (SPEC 1.2 to 1.4).
    fn endpoints(
        &self,
        namespace: &str,
        service: &str,
        port_name: &str,
        protocol: Protocol,
        family: Family,
        config: &ModelConfig,
    ) -> Vec<Endpoint> {
        let mut merged: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
        let slices = self.by_service.get(&(namespace, service));
        for slice in slices.into_iter().flatten() {
            if Family::of_address_type(&slice.address_type) != Some(family) {
                continue;
            }
            // Joined by (name, protocol), never by number: the slice says
            // which number the endpoints listen on.
            let numbers = slice.ports.iter().flatten().filter_map(|slice_port| {
                let same_name = slice_port.name.as_deref().unwrap_or("") == port_name;
                let same_protocol =
                    Protocol::from_k8s(slice_port.protocol.as_deref()) == Some(protocol);
                if same_name && same_protocol {
                    slice_port.port.and_then(port_number)
                } else {
                    None
                }
            });
            for port in numbers {
                for endpoint in &slice.endpoints {
                    let Some(endpoint) = read_endpoint(slice, endpoint, port, family, config)
                    else {
                        continue;
                    };
                    merged
                        .entry((endpoint.ip, endpoint.port))
                        .and_modify(|kept| *kept = kept.preferred(endpoint))
                        .or_insert(endpoint);
                }
            }
        }
        merged.into_values().collect()
    }
}

fn read_endpoint(
    slice: &EndpointSlice,
    endpoint: &k8s_openapi::api::discovery::v1::Endpoint,
    port: u16,
    family: Family,
    config: &ModelConfig,
) -> Option<Endpoint> {
    // Only the first address carries traffic; the others are informational.
    let address = endpoint.addresses.first()?;
    let ip = match address.parse::<IpAddr>() {
        Ok(ip) if Family::of(ip) == family => ip,
        _ => {
            tracing::warn!(
                slice = %qualified_name(&slice.metadata),
                address = address.as_str(),
                address_type = slice.address_type.as_str(),
                "skipping an endpoint address that does not match the slice's addressType"
            );
            return None;
        }
    };
    let conditions = endpoint.conditions.as_ref();
    let local = !config.node_name.is_empty()
        && endpoint.node_name.as_deref() == Some(config.node_name.as_str());
    Some(Endpoint {
        ip,
        port,
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        local,
    })
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&port| port != 0)
}

/// An object's namespace; unset means `default`, as for `kubectl apply`.
pub fn namespace_of(metadata: &ObjectMeta) -> &str {
    match metadata.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(namespace) => namespace,
    }
}

fn qualified_name(metadata: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        namespace_of(metadata),
        metadata.name.as_deref().unwrap_or("")
    )
}
