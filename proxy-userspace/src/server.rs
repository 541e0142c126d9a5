//! `/healthz`, `/livez` (on `--healthz-bind-address`) and `/metrics`,
//! `/proxyMode` (on `--metrics-bind-address`), with kube-proxy's semantics
//! and names where they apply.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::datapath::PinnedMaps;
use crate::model::{FrontendKey, ServicePortName};

/// Proxy health as kube-proxy's ProxierHealthServer defines it: unhealthy
/// when a queued change has waited longer than `timeout` (2 x syncPeriod)
/// without reaching the datapath, or (for /healthz only) when the Node is
/// being deleted or drained by the cluster autoscaler.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    last_updated: Option<SystemTime>,
    oldest_queued: Option<SystemTime>,
    node_eligible: bool,
}

/// A health answer: status and kube-proxy's JSON body.
#[derive(Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub healthy: bool,
    pub body: String,
}

impl Health {
    pub fn new(sync_period: Duration) -> Self {
        Self {
            timeout: sync_period * 2,
            state: Mutex::new(HealthState {
                node_eligible: true,
                ..HealthState::default()
            }),
        }
    }

    /// A change is waiting for the datapath (keeps the oldest).
    pub fn queued(&self, at: SystemTime) {
        let mut s = self.state.lock().unwrap();
        s.oldest_queued.get_or_insert(at);
    }

    /// Everything queued so far reached the datapath.
    pub fn updated(&self, at: SystemTime) {
        let mut s = self.state.lock().unwrap();
        s.last_updated = Some(at);
        s.oldest_queued = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.state.lock().unwrap().node_eligible = eligible;
    }

    pub fn report(&self, now: SystemTime, include_node: bool) -> HealthReport {
        let s = self.state.lock().unwrap();
        let fresh = match s.oldest_queued {
            None => true,
            Some(q) => now.duration_since(q).unwrap_or_default() < self.timeout,
        };
        let healthy = fresh && (!include_node || s.node_eligible);
        let time = |t: Option<SystemTime>| {
            t.map(|t| humantime::format_rfc3339_millis(t).to_string())
                .unwrap_or_default()
        };
        let body = serde_json::json!({
            "lastUpdated": time(s.last_updated),
            "currentTime": time(Some(now)),
            "nodeEligible": s.node_eligible,
        })
        .to_string();
        HealthReport { healthy, body }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Every metric kproxy exports.
pub struct Metrics {
    pub registry: Registry,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub last_queued: Gauge<f64, AtomicU64>,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub map_fill_ratio: Family<MapLabel, Gauge<f64, AtomicU64>>,
    pub sync_errors: Family<KindLabel, Counter>,
    pub conntrack_entries: Gauge,
    pub conntrack_deleted: Family<KindLabel, Counter>,
    /// The Service port of each programmed frontend, which the daemon keeps
    /// current after every sync: the per-frontend counters' labels.
    pub frontend_services: FrontendServices,
}

/// Which Service port each frontend belongs to.
pub type FrontendServices = Arc<RwLock<HashMap<FrontendKey, ServicePortName>>>;

impl Metrics {
    /// `pin_dir`: where the datapath counters are read at each scrape.
    pub fn new(pin_dir: PathBuf) -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let network_programming = Histogram::new([
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ]);
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync.clone(),
        );
        let last_queued = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            last_queued.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "kproxy_frontends",
            "Frontends (VIP, port, protocol) programmed",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register("kproxy_backends", "Backends programmed", backends.clone());
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "kproxy_map_entries",
            "Entries in a datapath map",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register(
            "kproxy_map_capacity",
            "Capacity of a datapath map",
            map_capacity.clone(),
        );
        let map_fill_ratio = Family::<MapLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "kproxy_map_fill_ratio",
            "Entries / capacity of a datapath map",
            map_fill_ratio.clone(),
        );
        let sync_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "kproxy_sync_errors",
            "Syncs that could not apply everything, by kind (source, map_full, map_write)",
            sync_errors.clone(),
        );
        let conntrack_entries = Gauge::default();
        registry.register(
            "kproxy_conntrack_entries",
            "Conntrack entries at the last sweep (two per flow)",
            conntrack_entries.clone(),
        );
        let conntrack_deleted = Family::<KindLabel, Counter>::default();
        registry.register(
            "kproxy_conntrack_deleted",
            "Conntrack entries deleted by kproxy, by kind (expired, udp_backend_gone)",
            conntrack_deleted.clone(),
        );
        let frontend_services = FrontendServices::default();
        registry.register_collector(Box::new(DatapathCounters {
            pin_dir: pin_dir.clone(),
        }));
        registry.register_collector(Box::new(FrontendCounters {
            pin_dir,
            services: frontend_services.clone(),
        }));
        Self {
            registry,
            sync_duration,
            network_programming,
            last_sync,
            last_queued,
            frontends,
            backends,
            map_entries,
            map_capacity,
            map_fill_ratio,
            sync_errors,
            conntrack_entries,
            conntrack_deleted,
            frontend_services,
        }
    }

    pub fn set_map(&self, map: &str, entries: usize, capacity: u32) {
        let label = MapLabel {
            map: map.to_owned(),
        };
        self.map_entries.get_or_create(&label).set(entries as i64);
        self.map_capacity.get_or_create(&label).set(capacity as i64);
        let ratio = if capacity == 0 {
            0.0
        } else {
            entries as f64 / capacity as f64
        };
        self.map_fill_ratio.get_or_create(&label).set(ratio);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `kproxy_datapath_packets_total{reason}`, read from the per-CPU stats
/// map at each scrape.
#[derive(Debug)]
struct DatapathCounters {
    pin_dir: PathBuf,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(values) = PinnedMaps::open(&self.pin_dir).and_then(|m| m.stats()) else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "kproxy_datapath_packets",
            "Packets the datapath handled, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in crate::inspect::stats(&values) {
            let label = ReasonLabel {
                reason: name.to_owned(),
            };
            ConstCounter::new(value).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// `kproxy_frontend_packets_total` and `kproxy_frontend_bytes_total`,
/// read from `FRONTEND_STATS_V1` at each scrape: per frontend (address,
/// port, protocol), its traffic from pods, this node and outside together.
#[derive(Debug)]
struct FrontendCounters {
    pin_dir: PathBuf,
    services: FrontendServices,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabel {
    frontend: String,
    namespace: String,
    service: String,
    port: String,
}

impl Collector for FrontendCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(entries) = PinnedMaps::open(&self.pin_dir).and_then(|m| m.frontend_stats()) else {
            return Ok(());
        };
        let mut totals: BTreeMap<FrontendKey, proxy_common::FrontendStats> = BTreeMap::new();
        for (frontend, stats) in entries {
            let Some(protocol) = crate::model::Protocol::from_number(frontend.proto) else {
                continue;
            };
            let key = FrontendKey {
                ip: crate::sync::addr_from_bytes(frontend.addr),
                port: frontend.port,
                protocol,
            };
            let total = totals.entry(key).or_default();
            total.packets += stats.packets;
            total.bytes += stats.bytes;
        }
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        let labelled: Vec<(FrontendLabel, proxy_common::FrontendStats)> = totals
            .into_iter()
            .map(|(key, stats)| {
                let service = services.get(&key);
                let label = FrontendLabel {
                    frontend: crate::inspect::frontend_name(
                        key.ip,
                        key.port,
                        key.protocol.number(),
                    ),
                    namespace: service.map(|s| s.namespace.clone()).unwrap_or_default(),
                    service: service.map(|s| s.name.clone()).unwrap_or_default(),
                    port: service.map(|s| s.port_name.clone()).unwrap_or_default(),
                };
                (label, stats)
            })
            .collect();
        drop(services);
        let mut encode = |name, help, value: fn(&proxy_common::FrontendStats) -> u64| {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (label, stats) in &labelled {
                ConstCounter::new(value(stats)).encode(family.encode_family(label)?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        encode(
            "kproxy_frontend_packets",
            "Packets the datapath translated for a frontend, both directions",
            |s| s.packets,
        )?;
        encode(
            "kproxy_frontend_bytes",
            "Bytes of the packets the datapath translated for a frontend, both directions",
            |s| s.bytes,
        )?;
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

fn health_response(report: HealthReport) -> impl IntoResponse {
    let status = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        report.body,
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    health_response(s.health.report(SystemTime::now(), true))
}

async fn livez(State(s): State<AppState>) -> impl IntoResponse {
    health_response(s.health.report(SystemTime::now(), false))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn proxy_mode() -> &'static str {
    "ebpf"
}

/// Binds both servers (failing early with a clear error) and serves them
/// in the background. With the same address for both, one server serves all.
pub async fn serve(
    healthz_addr: SocketAddr,
    metrics_addr: SocketAddr,
    health: Arc<Health>,
    metrics_state: Arc<Metrics>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let state = AppState {
        health,
        metrics: metrics_state,
    };
    let health_routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez));
    let metrics_routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/proxyMode", get(proxy_mode));
    let mut servers = Vec::new();
    if healthz_addr == metrics_addr {
        servers.push((healthz_addr, health_routes.merge(metrics_routes)));
    } else {
        servers.push((healthz_addr, health_routes));
        servers.push((metrics_addr, metrics_routes));
    }
    for (addr, router) in servers {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}: is another kube-proxy or kproxy running?"))?;
        tracing::info!(%addr, "serving");
        let app = router.with_state(state.clone());
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(%addr, error = %err, "server stopped");
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_until_a_queued_change_waits_longer_than_twice_the_sync_period() {
        let health = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(health.report(t0, true).healthy, "nothing queued: healthy");
        health.queued(t0);
        assert!(health.report(t0 + Duration::from_secs(59), true).healthy);
        assert!(!health.report(t0 + Duration::from_secs(61), true).healthy);
        // A later queue does not reset the oldest pending change.
        health.queued(t0 + Duration::from_secs(60));
        assert!(!health.report(t0 + Duration::from_secs(61), true).healthy);
        health.updated(t0 + Duration::from_secs(62));
        let report = health.report(t0 + Duration::from_secs(63), true);
        assert!(report.healthy);
        let body: serde_json::Value = serde_json::from_str(&report.body).unwrap();
        assert_eq!(body["nodeEligible"], true);
        assert!(body["lastUpdated"]
            .as_str()
            .unwrap()
            .starts_with("1970-01-12T13:47:"));
    }

    #[test]
    fn node_eligibility_affects_healthz_not_livez() {
        let health = Health::new(Duration::from_secs(30));
        health.set_node_eligible(false);
        let now = SystemTime::now();
        assert!(!health.report(now, true).healthy);
        assert!(health.report(now, false).healthy);
        let body: serde_json::Value = serde_json::from_str(&health.report(now, true).body).unwrap();
        assert_eq!(body["nodeEligible"], false);
    }

    #[test]
    fn metrics_use_kube_proxy_names() {
        let metrics = Metrics::new(PathBuf::from("/nonexistent"));
        metrics.sync_duration.observe(0.01);
        metrics.set_map("SERVICES_V1", 10, 100);
        let text = metrics.encode();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_network_programming_duration_seconds",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kproxy_map_fill_ratio{map=\"SERVICES_V1\"} 0.1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
