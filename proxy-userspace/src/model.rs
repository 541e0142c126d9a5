//! The pure model: (Services, EndpointSlices, Node, config) -> desired
//! datapath state. No I/O here; `sync` turns the result into map writes.
//!
//! Implements SPEC.md section 1 (which Services and endpoints count),
//! section 2 (ClusterIP, NodePort, externalIP and LoadBalancer frontends),
//! section 4 (traffic policies, `loadBalancerSourceRanges`,
//! `healthCheckNodePort`) and section 8 (topology hints).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Everything the model reads, as a source (dir or kube) last saw it.
/// Objects are shared: a source hands out the same `Arc` again for an
/// object that did not change, which is how [`Model`] tells what to
/// recompute.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
}

/// Configuration the model needs (from flags / config file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// This node's name (`--hostname-override`); decides which endpoints are local.
    pub node_name: String,
    /// kproxy's own proxy name (`service.kubernetes.io/service-proxy-name`);
    /// `None` means "skip every Service that carries the label".
    pub proxy_name: Option<String>,
    /// Backend selection for Services without a valid `kproxy.io/lb-algorithm`.
    pub default_algorithm: Algorithm,
    /// The addresses NodePorts answer on, already narrowed by the caller
    /// (`--nodeport-addresses`, `primary`, never 127.0.0.1 / ::1 unless
    /// asked). Empty: no NodePort frontends at all.
    pub node_addresses: Vec<IpAddr>,
    /// `--masquerade-all`: every flow to a ClusterIP is source-NATed to
    /// this node, as kube-proxy's `masqueradeAll` marks it (SPEC 5).
    pub masquerade_all: bool,
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

/// How a client reaches a frontend (SPEC 2). Every kind but `ClusterIp` is
/// "external" traffic for `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// A `clusterIPs` entry and the Service port.
    ClusterIp,
    /// A node address (`ModelConfig::node_addresses`) and the `nodePort`.
    NodePort,
    /// A `spec.externalIPs` entry and the Service port.
    ExternalIp,
    /// A VIP-mode `status.loadBalancer.ingress[].ip` and the Service port.
    LoadBalancer,
}

impl FrontendKind {
    /// Governed by `externalTrafficPolicy` rather than `internalTrafficPolicy`.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }
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
///
/// The derived order (service first) is what breaks ties between Services
/// claiming one frontend; see `resolve_claims`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    pub algorithm: Algorithm,
    /// `sessionAffinity: ClientIP`: the idle timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// The traffic policy that governs this frontend is `Local`
    /// (`internalTrafficPolicy` for ClusterIP, `externalTrafficPolicy` for
    /// the others; SPEC 4): `backends` is then the local set.
    pub policy_local: bool,
    /// What to do when `backends` is empty: drop silently (true) or reject
    /// (false). True when `policy_local` and the Service has usable
    /// endpoints elsewhere in the cluster; a Service with no usable endpoint
    /// anywhere rejects whatever its policy, as kube-proxy does (SPEC 3).
    pub drop_when_empty: bool,
    /// The traffic this frontend's policy applies to is source-NATed to
    /// the node (SPEC 5): external traffic with `externalTrafficPolicy:
    /// Cluster` on an external frontend (pods reaching it are not), all
    /// traffic to a ClusterIP with `--masquerade-all`.
    pub snat: bool,
    /// Sorted, without duplicates. Empty: the frontend rejects, or drops
    /// when `drop_when_empty`.
    pub backends: Vec<Backend>,
    /// What traffic from this node itself (its pods or its host) gets: the
    /// cluster set (SPEC 4, short-circuit). Differs from `backends` only on
    /// external frontends with `externalTrafficPolicy: Local`.
    pub cluster_backends: Vec<Backend>,
    /// `loadBalancerSourceRanges` of this frontend's family, as network
    /// address and prefix length (host bits cleared); only on LoadBalancer
    /// frontends. Empty: every source is allowed. Sources outside a
    /// non-empty list are dropped.
    pub source_ranges: Vec<(IpAddr, u8)>,
}

impl Frontend {
    /// A frontend with the defaults of a plain Service: random selection,
    /// no affinity, traffic policy Cluster (so SNAT for external kinds), no
    /// source ranges.
    pub fn new(service: ServicePortName, kind: FrontendKind, backends: Vec<Backend>) -> Self {
        Frontend {
            service,
            kind,
            algorithm: Algorithm::default(),
            affinity_timeout: None,
            policy_local: false,
            drop_when_empty: false,
            snat: kind.is_external(),
            cluster_backends: backends.clone(),
            backends,
            source_ranges: Vec::new(),
        }
    }
}

/// A `healthCheckNodePort` to serve (SPEC 4): LoadBalancer Services with
/// `externalTrafficPolicy: Local`. The HTTP server answers 200 when
/// `local_endpoints` > 0 (and the proxy is healthy), else 503.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Unique IPs of this node's ready endpoints, over every port and family
    /// of the Service. Terminating-only endpoints do not count, so the node
    /// reports 503 while their traffic still flows.
    pub local_endpoints: usize,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Sorted by port, one per port.
    pub health_checks: Vec<HealthCheck>,
}

/// Label naming the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label handing a Service to another proxy (or, with `--proxy-name`, to us).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that makes kube-proxy ignore a Service or EndpointSlice.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// The Node label naming its zone, matched against `hints.forZones`.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

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
    /// What `hints.forZones` says about this node's zone.
    pub zone_hint: Hint,
    /// What `hints.forNodes` says about this node.
    pub node_hint: Hint,
}

/// What one kind of topology hint on an endpoint says about this node
/// (SPEC 8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hint {
    /// No hint of this kind (absent or an empty list).
    #[default]
    Unset,
    /// Hinted for this node (or its zone).
    Here,
    /// Hinted, but only for other nodes (or zones).
    Elsewhere,
}

impl Hint {
    fn of<'a>(names: impl Iterator<Item = &'a str>, here: Option<&str>) -> Hint {
        let mut hinted = false;
        for name in names {
            hinted = true;
            if Some(name) == here {
                return Hint::Here;
            }
        }
        if hinted {
            Hint::Elsewhere
        } else {
            Hint::Unset
        }
    }
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

/// Computes the desired state from nothing. Pure: same input, same output,
/// whatever the order of the objects in the snapshot. The daemon keeps a
/// [`Model`] instead, which recomputes only the Services that changed.
pub fn desired_state(snapshot: &Snapshot, config: &ModelConfig) -> DesiredState {
    let mut model = Model::default();
    model.update(snapshot, config);
    model.state
}

/// The desired state, kept up to date one Service at a time.
///
/// A Service's frontends depend on the Service, its EndpointSlices, this
/// node's zone and the config, nothing else. `update` compares the
/// snapshot's objects with the last snapshot's by identity (the sources
/// hand out the same `Arc` again for an object that did not change),
/// recomputes only the Services whose own objects came, went or changed,
/// and re-resolves only the frontend keys those Services claim. A change of
/// the node's zone or of the config recomputes everything. An update costs
/// a pointer comparison per object plus the work of what changed.
#[derive(Default)]
pub struct Model {
    /// The zone and config every Service was computed with.
    inputs: Option<(ModelConfig, Option<String>)>,
    /// The last snapshot's objects, in its order.
    last_services: Vec<Arc<Service>>,
    last_slices: Vec<Arc<EndpointSlice>>,
    /// By `namespace/name`: the Service objects of that name (more than
    /// one only for copies in a snapshot; each is computed, the claims
    /// resolve them), its EndpointSlices, and what they make.
    by_name: HashMap<String, Named>,
    /// Every Service port's claim on each frontend key.
    claims: BTreeMap<FrontendKey, Vec<Frontend>>,
    state: DesiredState,
}

/// What one `Model::update` recomputed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelUpdate {
    /// Services computed again (new, changed, or all after a config change).
    pub recomputed: usize,
    /// Services no longer in the snapshot.
    pub removed: usize,
}

/// The objects of one `namespace/name` and the result they give.
#[derive(Default)]
struct Named {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    frontends: Vec<(FrontendKey, Frontend)>,
    health_checks: Vec<HealthCheck>,
}

impl Model {
    /// The desired state as of the last `update`.
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Brings the desired state up to `snapshot`.
    pub fn update(&mut self, snapshot: &Snapshot, config: &ModelConfig) -> ModelUpdate {
        let zone = node_zone(&snapshot.nodes, &config.node_name).map(str::to_owned);
        if self
            .inputs
            .as_ref()
            .is_none_or(|(c, z)| c != config || *z != zone)
        {
            *self = Model {
                inputs: Some((config.clone(), zone.clone())),
                ..Model::default()
            };
        }
        let mut dirty = BTreeSet::new();
        let (gone, came) = changed_objects(&self.last_services, &snapshot.services);
        for service in gone {
            let key = service_key(&service.metadata);
            if let Some(named) = self.by_name.get_mut(&key) {
                named.services.retain(|s| !Arc::ptr_eq(s, &service));
            }
            dirty.insert(key);
        }
        for service in came {
            let key = service_key(&service.metadata);
            self.by_name
                .entry(key.clone())
                .or_default()
                .services
                .push(service);
            dirty.insert(key);
        }
        let (gone, came) = changed_objects(&self.last_slices, &snapshot.endpoint_slices);
        for slice in gone {
            if let Some(key) = slice_owner(&slice) {
                if let Some(named) = self.by_name.get_mut(&key) {
                    named.slices.retain(|s| !Arc::ptr_eq(s, &slice));
                }
                dirty.insert(key);
            }
        }
        for slice in came {
            if let Some(key) = slice_owner(&slice) {
                self.by_name
                    .entry(key.clone())
                    .or_default()
                    .slices
                    .push(slice);
                dirty.insert(key);
            }
        }
        self.last_services.clone_from(&snapshot.services);
        self.last_slices.clone_from(&snapshot.endpoint_slices);
        if dirty.is_empty() {
            return ModelUpdate::default();
        }

        let node = ThisNode {
            name: &config.node_name,
            zone: zone.as_deref(),
        };
        let mut update = ModelUpdate::default();
        let mut touched = BTreeSet::new();
        let mut health_changed = false;
        for key in dirty {
            let Some(named) = self.by_name.get_mut(&key) else {
                continue;
            };
            let mut frontends = Vec::new();
            let mut health_checks = Vec::new();
            for service in &named.services {
                let (f, h) = service_state(service, &named.slices, &node, config);
                frontends.extend(f);
                health_checks.extend(h);
            }
            match (named.services.is_empty(), named.frontends.is_empty()) {
                (false, _) => update.recomputed += 1,
                (true, false) => update.removed += 1,
                (true, true) => {}
            }
            for (key, frontend) in &named.frontends {
                if let Some(claimants) = self.claims.get_mut(key) {
                    if let Some(index) = claimants.iter().position(|c| c == frontend) {
                        claimants.swap_remove(index);
                    }
                }
                touched.insert(*key);
            }
            for (key, frontend) in &frontends {
                self.claims.entry(*key).or_default().push(frontend.clone());
                touched.insert(*key);
            }
            health_changed |= !named.health_checks.is_empty() || !health_checks.is_empty();
            named.frontends = frontends;
            named.health_checks = health_checks;
            if named.services.is_empty() && named.slices.is_empty() {
                self.by_name.remove(&key);
            }
        }
        for key in touched {
            match self.claims.get(&key) {
                Some(claimants) if !claimants.is_empty() => {
                    let winner = resolve_claims(key, claimants.clone());
                    self.state.frontends.insert(key, winner);
                }
                _ => {
                    self.claims.remove(&key);
                    self.state.frontends.remove(&key);
                }
            }
        }
        if health_changed {
            let checks = self
                .by_name
                .values()
                .flat_map(|named| named.health_checks.iter().cloned())
                .collect();
            self.state.health_checks = resolve_health_checks(checks);
        }
        update
    }
}

/// The objects that left `last` and those that joined it in `now`, by
/// identity. Sources keep their order, so a change is usually the same list
/// with a few entries replaced in place: compared position by position,
/// with no hashing at all when nothing changed.
pub fn changed_objects<T>(last: &[Arc<T>], now: &[Arc<T>]) -> (Vec<Arc<T>>, Vec<Arc<T>>) {
    let (mut gone, mut came) = (Vec::new(), Vec::new());
    if last.len() == now.len() {
        for (old, new) in last.iter().zip(now) {
            if !Arc::ptr_eq(old, new) {
                gone.push(Arc::clone(old));
                came.push(Arc::clone(new));
            }
        }
    } else {
        gone.extend(last.iter().cloned());
        came.extend(now.iter().cloned());
    }
    if gone.is_empty() || came.is_empty() {
        return (gone, came);
    }
    // An object in both only moved: it neither left nor joined.
    let addresses =
        |list: &[Arc<T>]| -> HashSet<*const T> { list.iter().map(Arc::as_ptr).collect() };
    let (was, is) = (addresses(&gone), addresses(&came));
    gone.retain(|object| !is.contains(&Arc::as_ptr(object)));
    came.retain(|object| !was.contains(&Arc::as_ptr(object)));
    (gone, came)
}

/// `namespace/name` of a Service.
fn service_key(metadata: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        namespace_of(metadata),
        metadata.name.as_deref().unwrap_or("")
    )
}

/// `namespace/name` of the Service an EndpointSlice belongs to (SPEC 1.2);
/// `None` for a headless slice or one without the label.
fn slice_owner(slice: &EndpointSlice) -> Option<String> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.contains_key(LABEL_HEADLESS) {
        return None;
    }
    let service = labels.get(LABEL_SERVICE_NAME)?;
    Some(format!("{}/{service}", namespace_of(&slice.metadata)))
}

/// One Service's frontends (SPEC 2, 4) and its health check, from the
/// Service and its own EndpointSlices.
fn service_state(
    service: &Service,
    slices: &[Arc<EndpointSlice>],
    node: &ThisNode,
    config: &ModelConfig,
) -> (Vec<(FrontendKey, Frontend)>, Option<HealthCheck>) {
    let mut frontends = Vec::new();
    if !service_is_proxied(service, config) {
        return (frontends, None);
    }
    let (Some(name), Some(spec)) = (service.metadata.name.as_deref(), &service.spec) else {
        return (frontends, None);
    };
    let namespace = namespace_of(&service.metadata);
    let addresses = ServiceAddresses::of(service, config);
    let source_ranges = source_ranges(service);
    let algorithm = algorithm_of(service, namespace, name, config);
    let affinity_timeout = affinity_of(spec);
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let takes_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut local_ready_ips = BTreeSet::new();
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
        // nodePort 0 or unset: none (`allocateLoadBalancerNodePorts: false`).
        let node_port = service_port
            .node_port
            .and_then(port_number)
            .filter(|_| takes_node_ports);
        for family in [Family::V4, Family::V6] {
            let targets = addresses.targets(family, port, node_port);
            if targets.is_empty() {
                continue;
            }
            let endpoints = merged_endpoints(slices, port_name, protocol, family, node);
            local_ready_ips.extend(
                endpoints
                    .iter()
                    .filter(|endpoint| endpoint.local && endpoint.ready)
                    .map(|endpoint| endpoint.ip),
            );
            let cluster = cluster_endpoints(&endpoints);
            let local = local_endpoints(&endpoints);
            for (kind, ip, port) in targets {
                let external = kind.is_external();
                let policy_local = if external {
                    external_local
                } else {
                    internal_local
                };
                let backends = if policy_local { &local } else { &cluster };
                let frontend = Frontend {
                    service: ServicePortName {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        port_name: port_name.to_owned(),
                    },
                    kind,
                    algorithm,
                    affinity_timeout,
                    policy_local,
                    // The cluster set is empty only when no endpoint is
                    // usable anywhere: then reject, as for policy Cluster.
                    drop_when_empty: policy_local && !cluster.is_empty(),
                    snat: if external {
                        !policy_local
                    } else {
                        config.masquerade_all
                    },
                    backends: backends.clone(),
                    cluster_backends: if external { &cluster } else { backends }.clone(),
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        source_ranges
                            .iter()
                            .copied()
                            .filter(|(ip, _)| Family::of(*ip) == family)
                            .collect()
                    } else {
                        Vec::new()
                    },
                };
                frontends.push((FrontendKey { ip, port, protocol }, frontend));
            }
        }
    }
    let health_check = health_check_port(spec, namespace, name).map(|port| HealthCheck {
        port,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        local_endpoints: local_ready_ips.len(),
    });
    (frontends, health_check)
}

/// This node, as endpoint locality and topology hints see it.
struct ThisNode<'a> {
    /// `--hostname-override`; empty makes nothing local.
    name: &'a str,
    /// Its `topology.kubernetes.io/zone` label, if its Node object has one.
    zone: Option<&'a str>,
}

/// The zone of the Node named `node_name` (SPEC 8). No such Node, or no
/// label: no zone, so zone hints never match.
pub fn node_zone<'a>(nodes: &'a [Arc<Node>], node_name: &str) -> Option<&'a str> {
    if node_name.is_empty() {
        return None;
    }
    // Two Node objects with one name (two copies in a directory source):
    // take the smallest zone so the answer never depends on input order.
    nodes
        .iter()
        .filter(|node| node.metadata.name.as_deref() == Some(node_name))
        .filter_map(|node| node.metadata.labels.as_ref()?.get(LABEL_TOPOLOGY_ZONE))
        .map(String::as_str)
        .filter(|zone| !zone.is_empty())
        .min()
}

/// Every address a Service's frontends answer on, by kind (SPEC 2), each
/// list sorted and without duplicates.
struct ServiceAddresses {
    cluster: BTreeSet<IpAddr>,
    node: BTreeSet<IpAddr>,
    external: BTreeSet<IpAddr>,
    load_balancer: BTreeSet<IpAddr>,
}

impl ServiceAddresses {
    /// NodePort, externalIP and LoadBalancer addresses only of the families
    /// of the Service's clusterIPs, as kube-proxy programs a family only for
    /// Services with a clusterIP in it (`ipFamilies` is not read: it may
    /// list a family the Service has no clusterIP of).
    fn of(service: &Service, config: &ModelConfig) -> Self {
        let cluster = cluster_ips(service);
        let families: BTreeSet<Family> = cluster.iter().map(|ip| Family::of(*ip)).collect();
        let of_service_family = |ip: &IpAddr| families.contains(&Family::of(*ip));
        let node = config
            .node_addresses
            .iter()
            .copied()
            .filter(of_service_family)
            .collect();
        let external = external_ips(service)
            .into_iter()
            .filter(of_service_family)
            .collect();
        let load_balancer = load_balancer_ips(service)
            .into_iter()
            .filter(of_service_family)
            .collect();
        ServiceAddresses {
            cluster,
            node,
            external,
            load_balancer,
        }
    }

    /// The frontends of one Service port in one family: kind, address, port.
    fn targets(
        &self,
        family: Family,
        port: u16,
        node_port: Option<u16>,
    ) -> Vec<(FrontendKind, IpAddr, u16)> {
        let lists = [
            (FrontendKind::ClusterIp, &self.cluster, Some(port)),
            (FrontendKind::NodePort, &self.node, node_port),
            (FrontendKind::ExternalIp, &self.external, Some(port)),
            (FrontendKind::LoadBalancer, &self.load_balancer, Some(port)),
        ];
        let mut targets = Vec::new();
        for (kind, ips, port) in lists {
            let Some(port) = port else {
                continue;
            };
            let ips = ips.iter().filter(|ip| Family::of(**ip) == family);
            targets.extend(ips.map(|&ip| (kind, ip, port)));
        }
        targets
    }
}

/// `spec.externalIPs`, unparseable entries skipped with a warning.
fn external_ips(service: &Service) -> Vec<IpAddr> {
    let listed = service
        .spec
        .as_ref()
        .and_then(|spec| spec.external_ips.as_ref());
    listed
        .into_iter()
        .flatten()
        .filter(|ip| !ip.is_empty())
        .filter_map(|ip| match ip.trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(
                    service = %qualified_name(&service.metadata),
                    external_ip = ip.as_str(),
                    "skipping an externalIP that is not an IP address"
                );
                None
            }
        })
        .collect()
}

/// The LoadBalancer ingress IPs kproxy answers on: `ipMode` VIP or unset.
/// `Proxy` mode means the load balancer delivers to the node itself, and
/// hostname-only entries have no address to answer on; both are skipped.
/// Only for `type: LoadBalancer`, so a type change removes them at once.
fn load_balancer_ips(service: &Service) -> Vec<IpAddr> {
    let is_load_balancer =
        service.spec.as_ref().and_then(|spec| spec.type_.as_deref()) == Some("LoadBalancer");
    if !is_load_balancer {
        return Vec::new();
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref());
    ingress
        .into_iter()
        .flatten()
        .filter(|ingress| matches!(ingress.ip_mode.as_deref(), None | Some("VIP")))
        .filter_map(|ingress| ingress.ip.as_deref().filter(|ip| !ip.is_empty()))
        .filter_map(|ip| match ip.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(
                    service = %qualified_name(&service.metadata),
                    ingress_ip = ip,
                    "skipping a load balancer ingress IP that is not an IP address"
                );
                None
            }
        })
        .collect()
}

/// `loadBalancerSourceRanges` as (network, prefix length), sorted and
/// deduplicated, both families. As kube-proxy does: entries are trimmed
/// (API validation lets whitespace through), invalid ones skipped with a
/// warning, and a frontend whose family ends up with no range allows every
/// source, even when the Service listed only invalid or other-family ones.
fn source_ranges(service: &Service) -> Vec<(IpAddr, u8)> {
    let listed = service
        .spec
        .as_ref()
        .and_then(|spec| spec.load_balancer_source_ranges.as_ref());
    let ranges: BTreeSet<(IpAddr, u8)> = listed
        .into_iter()
        .flatten()
        .map(|range| range.trim())
        .filter(|range| !range.is_empty())
        .filter_map(|range| {
            let parsed = parse_cidr(range);
            if parsed.is_none() {
                tracing::warn!(
                    service = %qualified_name(&service.metadata),
                    range,
                    "skipping a loadBalancerSourceRanges entry that is not a CIDR (like 203.0.113.0/24)"
                );
            }
            parsed
        })
        .collect();
    ranges.into_iter().collect()
}

/// The addresses NodePorts answer on (SPEC 2): this Node's InternalIP and
/// ExternalIP addresses from `status.addresses`; with `--nodeport-addresses`
/// only those inside the given CIDRs, or with `primary` the node's primary
/// address of each family. Never loopback (**ours**). Entries that are not
/// [`NodePortAddress`]es are skipped here; `kproxy run` refuses them at
/// startup.
pub fn nodeport_addresses(nodes: &[Arc<Node>], node_name: &str, filter: &[String]) -> Vec<IpAddr> {
    let Some(node) = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
    else {
        return Vec::new();
    };
    let listed: Vec<(String, IpAddr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| Some((a.type_.clone(), a.address.parse::<IpAddr>().ok()?)))
        .filter(|(_, ip)| !ip.is_loopback())
        .collect();
    let mut out: Vec<IpAddr> = if filter.is_empty() {
        listed.iter().map(|(_, ip)| *ip).collect()
    } else {
        let entries: Vec<NodePortAddress> = filter
            .iter()
            .filter_map(|entry| NodePortAddress::parse(entry))
            .collect();
        let mut chosen: Vec<IpAddr> = listed
            .iter()
            .map(|(_, ip)| *ip)
            .filter(|ip| {
                entries.iter().any(|entry| {
                    matches!(*entry, NodePortAddress::Cidr(network, len)
                        if cidr_contains((network, len), *ip))
                })
            })
            .collect();
        if entries.contains(&NodePortAddress::Primary) {
            // As kube-proxy's GetNodeHostIPs: the first InternalIP of each
            // family, else (a Node with only ExternalIPs of that family)
            // the first ExternalIP.
            for v4 in [true, false] {
                let first = |address_type: &str| {
                    listed
                        .iter()
                        .find(|(t, ip)| t == address_type && ip.is_ipv4() == v4)
                        .map(|(_, ip)| *ip)
                };
                chosen.extend(first("InternalIP").or_else(|| first("ExternalIP")));
            }
        }
        chosen
    };
    out.sort();
    out.dedup();
    out
}

/// One `--nodeport-addresses` (`nodePortAddresses`) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    /// `primary`: this Node's primary address of each family.
    Primary,
    /// The node addresses inside a CIDR: network address (host bits
    /// cleared) and prefix length.
    Cidr(IpAddr, u8),
}

impl NodePortAddress {
    /// `primary` or a CIDR like `192.0.2.0/24`, surrounding blanks ignored;
    /// `None` for anything else (a bare address, a prefix too long for its
    /// family, a typo).
    pub fn parse(entry: &str) -> Option<Self> {
        let entry = entry.trim();
        if entry == "primary" {
            return Some(NodePortAddress::Primary);
        }
        let (network, len) = parse_cidr(entry)?;
        Some(NodePortAddress::Cidr(network, len))
    }
}

fn cidr_contains((network, len): (IpAddr, u8), ip: IpAddr) -> bool {
    parse_cidr(&format!("{ip}/{len}")).is_some_and(|(n, _)| n == network)
}

/// `ip/len` -> (network address, len), host bits cleared as Go's
/// `ParseCIDR` does. A bare address without `/len` is not a CIDR.
fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = text.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    if u32::from(len) > bits {
        return None;
    }
    // `checked_shl` fails for a shift of the full width: prefix length 0.
    let network = match ip {
        IpAddr::V4(ip) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(ip) & mask).into())
        }
        IpAddr::V6(ip) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(ip) & mask).into())
        }
    };
    Some((network, len))
}

/// The `healthCheckNodePort` to serve, for LoadBalancer Services with
/// `externalTrafficPolicy: Local` (SPEC 4).
fn health_check_port(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    namespace: &str,
    name: &str,
) -> Option<u16> {
    let needed = spec.type_.as_deref() == Some("LoadBalancer")
        && spec.external_traffic_policy.as_deref() == Some("Local");
    if !needed {
        return None;
    }
    let port = spec.health_check_node_port.and_then(port_number);
    if port.is_none() {
        tracing::warn!(
            service = %format_args!("{namespace}/{name}"),
            health_check_node_port = spec.health_check_node_port,
            "LoadBalancer Service with externalTrafficPolicy Local has no valid healthCheckNodePort; serving no health check for it"
        );
    }
    port
}

/// One health check per port: the lowest namespace/name keeps a port two
/// Services claim (the API server never allocates one twice).
fn resolve_health_checks(mut checks: Vec<HealthCheck>) -> Vec<HealthCheck> {
    checks.sort();
    let mut kept: Vec<HealthCheck> = Vec::with_capacity(checks.len());
    for check in checks {
        match kept.last() {
            Some(winner) if winner.port == check.port => {
                if (&winner.namespace, &winner.name) != (&check.namespace, &check.name) {
                    tracing::warn!(
                        port = check.port,
                        kept = %format_args!("{}/{}", winner.namespace, winner.name),
                        ignored = %format_args!("{}/{}", check.namespace, check.name),
                        "two Services claim the same healthCheckNodePort; fix one of them"
                    );
                }
            }
            _ => kept.push(check),
        }
    }
    kept
}

/// Whether kproxy handles this Service at all (SPEC 1.1). Headless and
/// ExternalName Services have no frontends; labelled ones belong to another
/// proxy (or, when we have a proxy name, only those with our name are ours).
/// A Service without any clusterIP is skipped whole, NodePorts, externalIPs
/// and LoadBalancer IPs included, as kube-proxy's `ShouldSkipService` does.
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
    let spec = service.spec.as_ref();
    if spec.and_then(|spec| spec.type_.as_deref()) == Some("ExternalName") {
        return false;
    }
    let listed = spec.map(listed_cluster_ips).unwrap_or_default();
    let headless = spec.and_then(|spec| spec.cluster_ip.as_deref()) == Some("None")
        || listed.contains(&"None");
    if headless {
        return false;
    }
    if listed.is_empty() {
        // The API server always allocates one; a Service without it was
        // written by hand, most likely for `--source dir:`.
        tracing::warn!(
            service = %qualified_name(&service.metadata),
            "Service has no clusterIP: none of its frontends is served (NodePorts, externalIPs and LoadBalancer IPs neither), as with kube-proxy; set spec.clusterIP to an address of the service CIDR"
        );
        return false;
    }
    true
}

/// The clusterIPs as written, empty entries left out: `clusterIPs`, or
/// `clusterIP` for objects written before dual-stack.
fn listed_cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<&str> {
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    listed.into_iter().filter(|ip| !ip.is_empty()).collect()
}

/// The ClusterIP frontend addresses ([`listed_cluster_ips`]). Unparseable
/// entries are skipped.
fn cluster_ips(service: &Service) -> BTreeSet<IpAddr> {
    let Some(spec) = &service.spec else {
        return BTreeSet::new();
    };
    listed_cluster_ips(spec)
        .into_iter()
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
/// `terminating`.
///
/// Topology hints (SPEC 8) narrow the ready endpoints to those hinted for
/// this node, only when every ready endpoint carries that kind of hint and at
/// least one names this node (or its zone); `forNodes` is tried before
/// `forZones`. kube-proxy reads `forNodes` behind its
/// PreferSameTrafficDistribution gate (on by default since 1.33); kproxy
/// always does. When hints apply, some ready endpoint survives, so the
/// terminating fallback never follows from hints.
pub fn cluster_endpoints(endpoints: &[Endpoint]) -> Vec<Backend> {
    match topology_hint(endpoints) {
        Some(hint) => usable(endpoints.iter().filter(|e| hint(e) == Hint::Here)),
        None => usable(endpoints.iter()),
    }
}

/// Which kind of hint narrows the cluster set, if any (SPEC 8).
fn topology_hint(endpoints: &[Endpoint]) -> Option<fn(&Endpoint) -> Hint> {
    let node_hint: fn(&Endpoint) -> Hint = |endpoint| endpoint.node_hint;
    let zone_hint: fn(&Endpoint) -> Hint = |endpoint| endpoint.zone_hint;
    let ready = || endpoints.iter().filter(|endpoint| endpoint.ready);
    [node_hint, zone_hint].into_iter().find(|hint| {
        ready().all(|endpoint| hint(endpoint) != Hint::Unset)
            && ready().any(|endpoint| hint(endpoint) == Hint::Here)
    })
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

/// Several Services claim one frontend: a misconfiguration (or two copies of
/// one object). Keep the lowest namespace/name/port so the winner never
/// depends on input order, and say so.
fn resolve_claims(key: FrontendKey, mut claimants: Vec<Frontend>) -> Frontend {
    // The full order, not just the Service: one Service can claim one key
    // twice with different frontends (an externalIP equal to an LB IP).
    claimants.sort();
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

    /// An EndpointSlice `addressType`; FQDN (and anything else) has no
    /// family.
    fn of_address_type(address_type: &str) -> Option<Family> {
        match address_type {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

/// The merged endpoints of one Service port in one address family, from
/// the Service's slices, sorted by ip:port, one per ip:port (SPEC 1.2 to
/// 1.4).
fn merged_endpoints(
    slices: &[Arc<EndpointSlice>],
    port_name: &str,
    protocol: Protocol,
    family: Family,
    node: &ThisNode,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
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
                let Some(endpoint) = read_endpoint(slice, endpoint, port, family, node) else {
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

fn read_endpoint(
    slice: &EndpointSlice,
    endpoint: &k8s_openapi::api::discovery::v1::Endpoint,
    port: u16,
    family: Family,
    node: &ThisNode,
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
    let local = !node.name.is_empty() && endpoint.node_name.as_deref() == Some(node.name);
    let hints = endpoint.hints.as_ref();
    let zones = hints.and_then(|hints| hints.for_zones.as_ref());
    let nodes = hints.and_then(|hints| hints.for_nodes.as_ref());
    let this_node = Some(node.name).filter(|name| !name.is_empty());
    Some(Endpoint {
        ip,
        port,
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        local,
        zone_hint: Hint::of(
            zones.into_iter().flatten().map(|z| z.name.as_str()),
            node.zone,
        ),
        node_hint: Hint::of(
            nodes.into_iter().flatten().map(|n| n.name.as_str()),
            this_node,
        ),
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
