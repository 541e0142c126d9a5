//! `kproxy run`: the long-running loop. Reads the source, computes the
//! desired state, syncs it into the maps, keeps pod interfaces attached,
//! and serves health and metrics.
//!
//! Coalescing follows kube-proxy's BoundedFrequencyRunner: a change syncs at
//! once unless the last sync was less than `min_sync_period` ago; a full
//! resync (maps re-read, drift repaired) runs every `sync_period`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::Watcher as _;
use tokio::sync::mpsc;

use crate::address_filter::AddressFilterBits;
use crate::conntrack;
use crate::datapath::{Datapath, MapSizes, XdpMode};
use crate::healthcheck::{HealthCheckServers, HealthCheckSpec};
use crate::model::{self, namespace_of, DesiredState, ModelConfig, Snapshot};
use crate::server::{self, FrontendServices, Health, KindLabel, Metrics};
use crate::source::{dir, kube as kube_source};
use crate::sync::{Changes, SyncReport, Syncer};

/// Where Services and endpoints come from.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    Dir(PathBuf),
    Kube { kubeconfig: Option<PathBuf> },
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub source: SourceSpec,
    pub model: ModelConfig,
    pub pin_dir: PathBuf,
    pub pod_interfaces: Vec<glob::Pattern>,
    /// `--interfaces`: where traffic from outside arrives.
    pub external_interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub map_sizes: MapSizes,
    /// How often the interface list is checked for new pod interfaces.
    pub interface_poll: Duration,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    /// Conntrack timeouts, written to the datapath's CONFIG map.
    pub datapath_config: proxy_common::DatapathConfig,
    /// How often expired conntrack entries are swept.
    pub conntrack_gc_interval: Duration,
    /// `--nodeport-addresses`: CIDRs or `primary`; empty: every node address.
    pub nodeport_addresses: Vec<String>,
}

/// A running source, asked for a snapshot at each sync.
enum Source {
    /// With what the watcher saw since the last load.
    Dir(dir::DirSource, Arc<Mutex<dir::DirChanges>>),
    Kube(kube_source::KubeSource),
}

enum Loaded {
    Ready(Snapshot),
    /// Initial lists not complete yet: program nothing.
    NotReady,
    /// The source is unreadable now; keep what is programmed.
    Failed(String),
}

impl Source {
    /// What the source holds now; `full` reads a directory source whole.
    fn load(&mut self, full: bool) -> Loaded {
        match self {
            Source::Dir(dir, changes) => {
                let mut changes = std::mem::take(&mut *changes.lock().expect("watcher panicked"));
                if full {
                    changes.add_everything();
                }
                match dir.load_changes(changes) {
                    Ok(s) => Loaded::Ready(s),
                    Err(e) => Loaded::Failed(e.to_string()),
                }
            }
            Source::Kube(k) => match k.snapshot() {
                Some(s) => Loaded::Ready(s),
                None => Loaded::NotReady,
            },
        }
    }
}

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(&config.pin_dir, config.map_sizes)?;
    datapath.write_config(&config.datapath_config)?;
    tracing::info!(pin_path = %config.pin_dir.display(), "datapath loaded");
    let mut syncer = Syncer::new();
    syncer
        .reload(&datapath.maps()?)
        .context("reading the pinned maps")?;
    tracing::info!(
        entries = syncer.mirror().services.len(),
        "state left by a previous kproxy (reused)"
    );

    let health = Arc::new(Health::new(config.sync_period));
    let metrics = Arc::new(Metrics::new(config.pin_dir.clone()));
    server::serve(
        config.healthz_bind_address,
        config.metrics_bind_address,
        health.clone(),
        metrics.clone(),
    )
    .await?;

    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut _watcher = None;
    let mut source = match &config.source {
        SourceSpec::Dir(path) => {
            let changes = Arc::new(Mutex::new(dir::DirChanges::everything()));
            _watcher = Some(watch_dir(path, changes.clone(), tx.clone())?);
            Source::Dir(dir::DirSource::new(path), changes)
        }
        SourceSpec::Kube { kubeconfig } => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            tokio::spawn(kube_source::publish_starting_event(
                client.clone(),
                config.model.node_name.clone(),
            ));
            Source::Kube(kube_source::KubeSource::start(
                client,
                &config.model,
                tx.clone(),
            ))
        }
    };

    let mut attached: Vec<(String, u32)> = Vec::new();
    let mut attached_external: Vec<(String, u32)> = Vec::new();
    attach_external_interfaces(&mut datapath, &config, &mut attached_external)?;
    match datapath.attach_host_loopback() {
        Ok(()) => tracing::info!(
            "attached host program (tcx ingress of lo): this node's processes reach its NodePorts"
        ),
        Err(err) => {
            tracing::warn!(error = %err, "attaching to lo failed: this node's own processes cannot reach its NodePorts")
        }
    }
    attach_interfaces(&mut datapath, &config.pod_interfaces, &mut attached);

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut interface_tick = tokio::time::interval(config.interface_poll);
    let mut resync_tick = tokio::time::interval(config.sync_period);
    resync_tick.tick().await;
    let mut gc_tick = tokio::time::interval(config.conntrack_gc_interval);
    gc_tick.tick().await;

    let mut state = SyncState::default();
    let mut health_servers =
        HealthCheckServers::new(config.healthz_bind_address.ip(), health.clone());
    let mut pending = true;
    let mut full_resync = false;
    mark_queued(&health, &metrics);

    loop {
        if pending {
            let due = state
                .last_sync
                .map_or(Instant::now(), |t| t + config.min_sync_period);
            if Instant::now() >= due {
                pending = false;
                let resync = std::mem::take(&mut full_resync);
                state.sync(
                    &mut source,
                    &mut datapath,
                    &mut syncer,
                    &config,
                    &health,
                    &metrics,
                    resync,
                )?;
                for (port, err) in health_servers.sync(&state.health_checks).await {
                    tracing::error!(port, error = %err, "healthCheckNodePort server not serving; retrying on the next sync");
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(due - Instant::now()) => {}
                Some(()) = rx.recv() => mark_queued(&health, &metrics),
                _ = interface_tick.tick() => {
                    attach_interfaces(&mut datapath, &config.pod_interfaces, &mut attached);
                    let _ = attach_external_interfaces(&mut datapath, &config, &mut attached_external);
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
            continue;
        }
        tokio::select! {
            Some(()) = rx.recv() => { pending = true; mark_queued(&health, &metrics); }
            _ = resync_tick.tick() => { pending = true; full_resync = true; }
            _ = gc_tick.tick() => sweep_conntrack(&mut datapath, &config, &metrics),
            _ = interface_tick.tick() => {
                    attach_interfaces(&mut datapath, &config.pod_interfaces, &mut attached);
                    let _ = attach_external_interfaces(&mut datapath, &config, &mut attached_external);
                }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("shutting down; the datapath stays in place (`kproxy cleanup` removes it)");
    Ok(())
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn mark_queued(health: &Health, metrics: &Metrics) {
    let now = SystemTime::now();
    health.queued(now);
    metrics.last_queued.set(unix_seconds(now));
}

/// What the loop remembers between syncs.
#[derive(Default)]
struct SyncState {
    last_sync: Option<Instant>,
    /// EndpointSlice (namespace, name) -> last-change-trigger-time seen, to
    /// measure network programming latency once per change.
    trigger_times: TriggerTimes,
    synced_once: bool,
    /// healthCheckNodePort servers the last sync asked for.
    health_checks: Vec<HealthCheckSpec>,
    /// The desired state, updated by what each sync's snapshot changed.
    model: model::Model,
    /// `Syncer::datapath_flags` as last written to the datapath config.
    flags_announced: u64,
}

const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl SyncState {
    #[allow(clippy::too_many_arguments)]
    fn sync(
        &mut self,
        source: &mut Source,
        datapath: &mut Datapath,
        syncer: &mut Syncer,
        config: &DaemonConfig,
        health: &Health,
        metrics: &Metrics,
        full_resync: bool,
    ) -> anyhow::Result<()> {
        // The whole sync is timed, reading the source included.
        let started = Instant::now();
        self.last_sync = Some(started);
        let snapshot = match source.load(full_resync) {
            Loaded::Ready(s) => s,
            Loaded::NotReady => {
                tracing::info!("waiting for the initial lists before programming anything");
                return Ok(());
            }
            Loaded::Failed(err) => {
                metrics
                    .sync_errors
                    .get_or_create(&KindLabel {
                        kind: "source".into(),
                    })
                    .inc();
                tracing::error!(error = %err, "source not applied; the last good state stays programmed");
                return Ok(());
            }
        };
        if matches!(source, Source::Kube(_)) && !self.synced_once {
            warn_if_api_via_cluster_ip(&snapshot);
        }
        let node = snapshot
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(config.model.node_name.as_str()));
        health.set_node_eligible(kube_source::node_eligible(node.map(|n| &**n)));

        let mut model_config = config.model.clone();
        model_config.node_addresses = model::nodeport_addresses(
            &snapshot.nodes,
            &config.model.node_name,
            &config.nodeport_addresses,
        );
        if full_resync {
            // The periodic full sync recomputes every Service too, as
            // kube-proxy's does; between them only changed ones are.
            self.model = model::Model::default();
        }
        let update = self.model.update(&snapshot, &model_config);
        let desired = self.model.state();
        self.health_checks = desired
            .health_checks
            .iter()
            .map(|h| HealthCheckSpec {
                port: h.port,
                namespace: h.namespace.clone(),
                name: h.name.clone(),
                local_endpoints: h.local_endpoints,
            })
            .collect();
        if full_resync {
            if let Err(err) = syncer.reload(&datapath.maps()?) {
                tracing::error!(error = %err, "re-reading maps for a full resync failed");
            }
        }
        // Which frontends lost backends is judged on the frontends the
        // apply touches only, so a change costs what it changes.
        let changes = syncer.changes(desired);
        let (udp_before, affinity_before) = members(syncer.mirror(), &changes);
        let report = syncer.apply_changes(&mut datapath.maps()?, desired, &changes);
        name_frontends(&metrics.frontend_services, desired, &changes);
        // Once every frontend address has its marker and its bit in the
        // address filter, the datapath may pass a packet to any other
        // address without a frontend lookup; while one is missing (a
        // failed write), it looks frontends up first. Right after the apply:
        // the purges below can take a while.
        let flags = syncer.datapath_flags();
        if flags != self.flags_announced {
            let mut datapath_config = config.datapath_config;
            datapath_config.flags |= flags;
            match datapath.write_config(&datapath_config) {
                Ok(()) => self.flags_announced = flags,
                Err(err) => {
                    tracing::error!(error = %err, "writing the datapath config failed; retrying on the next sync")
                }
            }
        }
        if report.deletes > 0 {
            // A backend may have gone: UDP flows re-check theirs.
            if let Err(err) = datapath.new_backend_epoch() {
                tracing::error!(error = %err, "starting a new backend epoch failed; UDP flows to a removed backend wait for the purge below");
            }
        }
        let (udp_after, affinity_after) = members(syncer.mirror(), &changes);
        if conntrack::udp_lost_backends(&udp_before, &udp_after) {
            let all = conntrack::udp_members(syncer.mirror());
            purge_stale_udp(datapath, &all, metrics);
        }
        if conntrack::affinity_lost_backends(&affinity_before, &affinity_after) {
            // Another frontend of the Service port may still have the
            // backend: confirm against all of them.
            let all = conntrack::affinity_members(syncer.mirror());
            if conntrack::affinity_lost_backends(&affinity_before, &all) {
                purge_stale_affinity(datapath, &all);
            }
        }
        let elapsed = started.elapsed();
        metrics.sync_duration.observe(elapsed.as_secs_f64());
        self.record(&report, syncer, config, metrics);
        tracing::info!(
            services_recomputed = update.recomputed,
            services_removed = update.removed,
            frontends = report.frontends,
            backends = report.backends,
            writes = report.writes,
            deletes = report.deletes,
            failed = report.failed.len(),
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "synced"
        );
        let now = SystemTime::now();
        if report.failed.is_empty() {
            health.updated(now);
            metrics.last_sync.set(unix_seconds(now));
        }
        self.observe_programming_latency(&snapshot, now, metrics);
        Ok(())
    }

    fn record(
        &self,
        report: &SyncReport,
        syncer: &Syncer,
        config: &DaemonConfig,
        metrics: &Metrics,
    ) {
        for (frontend, err) in &report.failed {
            let kind = if err.full { "map_full" } else { "map_write" };
            metrics
                .sync_errors
                .get_or_create(&KindLabel { kind: kind.into() })
                .inc();
            tracing::error!(?frontend, error = %err, "frontend keeps its previous state");
        }
        // Logged where they failed (`Syncer`).
        for _ in &report.failed_writes {
            metrics
                .sync_errors
                .get_or_create(&KindLabel {
                    kind: "map_write".into(),
                })
                .inc();
        }
        for err in &report.failed_deletes {
            tracing::warn!(error = %err, "a stale entry could not be deleted; retrying on the next sync");
        }
        let mirror = syncer.mirror();
        metrics.frontends.set(report.frontends as i64);
        metrics.backends.set(mirror.backends.len() as i64);
        metrics.set_map(
            proxy_common::SERVICES_MAP,
            mirror.services.len(),
            config.map_sizes.services,
        );
        metrics.set_map(
            proxy_common::BACKENDS_MAP,
            mirror.backends.len(),
            config.map_sizes.backends,
        );
        metrics.set_map(
            proxy_common::REV_NAT_MAP,
            mirror.rev_nat.len(),
            config.map_sizes.rev_nat,
        );
        if let Some(filter) = &mirror.address_filter {
            // Bits set over all bits: the share of other addresses whose
            // packets still take the frontend and address-marker lookups.
            metrics.set_map(
                proxy_common::ADDRESS_FILTER_MAP,
                filter.bits_set() as usize,
                AddressFilterBits::BITS,
            );
        }
    }

    /// kube-proxy's network programming latency: from the EndpointSlice
    /// controller's trigger time to now, once per changed slice.
    fn observe_programming_latency(
        &mut self,
        snapshot: &Snapshot,
        now: SystemTime,
        metrics: &Metrics,
    ) {
        for trigger in self.trigger_times.new_triggers(&snapshot.endpoint_slices) {
            if !self.synced_once {
                continue;
            }
            if let Ok(at) = humantime::parse_rfc3339_weak(&trigger) {
                if let Ok(latency) = now.duration_since(at) {
                    metrics.network_programming.observe(latency.as_secs_f64());
                }
            }
        }
        self.synced_once = true;
    }
}

/// The EndpointSlice controller's trigger times seen so far, to measure
/// each change's programming latency once. Only the slices that changed
/// since the last sync (by identity, as the model finds them) are read.
#[derive(Default)]
struct TriggerTimes {
    last_slices: Vec<Arc<EndpointSlice>>,
    /// By `namespace/name`.
    seen: HashMap<String, String>,
}

impl TriggerTimes {
    /// The trigger times in `slices` not seen before.
    fn new_triggers(&mut self, slices: &[Arc<EndpointSlice>]) -> Vec<String> {
        let key = |slice: &EndpointSlice| {
            format!(
                "{}/{}",
                namespace_of(&slice.metadata),
                slice.metadata.name.as_deref().unwrap_or("")
            )
        };
        let (gone, came) = model::changed_objects(&self.last_slices, slices);
        self.last_slices = slices.to_vec();
        let mut new = Vec::new();
        let mut present = std::collections::HashSet::new();
        for slice in &came {
            let name = key(slice);
            let trigger = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION));
            match trigger {
                Some(trigger) if self.seen.get(&name) != Some(trigger) => {
                    new.push(trigger.clone());
                    self.seen.insert(name.clone(), trigger.clone());
                }
                Some(_) => {}
                None => {
                    self.seen.remove(&name);
                }
            }
            present.insert(name);
        }
        // A slice that changed is both gone and come: keep what it came as.
        for slice in &gone {
            let name = key(slice);
            if !present.contains(&name) {
                self.seen.remove(&name);
            }
        }
        new
    }
}

/// In-cluster config reaches the API server through the `kubernetes`
/// ClusterIP (`KUBERNETES_SERVICE_HOST`). kproxy translates ClusterIPs for
/// pods, not for host-network processes like itself: without kube-proxy the
/// address is unreachable, so say how to fix it.
fn warn_if_api_via_cluster_ip(snapshot: &Snapshot) {
    let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") else {
        return;
    };
    let via_cluster_ip = snapshot.services.iter().any(|s| {
        s.metadata.name.as_deref() == Some("kubernetes")
            && s.metadata.namespace.as_deref() == Some("default")
            && s.spec.as_ref().and_then(|spec| spec.cluster_ip.as_deref()) == Some(host.as_str())
    });
    if via_cluster_ip {
        tracing::warn!(
            %host,
            "the API server is reached through the kubernetes ClusterIP, which kproxy does not translate for host-network processes; set KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT to the API server's own address (see docs/OPERATIONS.md) before removing kube-proxy"
        );
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the datapath's clock at full resolution
/// (the datapath reads it at tick resolution, from jiffies or
/// `bpf_ktime_get_coarse_ns`: up to a few ticks behind).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Deletes flows idle past their timeout (LRU eviction only handles a full
/// map; this keeps the table to live flows).
fn sweep_conntrack(datapath: &mut Datapath, daemon: &DaemonConfig, metrics: &Metrics) {
    // Flow ages below compare the datapath's stamps with CLOCK_MONOTONIC.
    if let Err(error) = datapath.check_clock() {
        tracing::warn!(%error, "checking the datapath clock failed");
    }
    let config = &daemon.datapath_config;
    let entries = match datapath.conntrack_entries() {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!(error = %err, "conntrack sweep: reading the map failed");
            return;
        }
    };
    metrics.conntrack_entries.set(entries.len() as i64);
    // A full table evicts the least recently used flows (LRU); the fill
    // ratio shows how close it is.
    metrics.set_map(
        proxy_common::CONNTRACK_MAP,
        entries.len(),
        daemon.map_sizes.conntrack,
    );
    let now = monotonic_ns();
    let mut expired = conntrack::expired_keys(&entries, config, now);
    let orphans = conntrack::orphan_keys(&entries, now, 2 * proxy_common::NS_PER_SEC);
    if !orphans.is_empty() {
        // Counted here: the kernel does not report LRU evictions.
        metrics
            .conntrack_deleted
            .get_or_create(&KindLabel {
                kind: "lru_evicted_peer".into(),
            })
            .inc_by(orphans.len() as u64);
        expired.extend(orphans);
        expired.sort_by_key(|k| bytemuck::bytes_of(k).to_vec());
        expired.dedup();
    }
    if expired.is_empty() {
        return;
    }
    let released = conntrack::open_flow_backends(&expired, &entries);
    match datapath.delete_conntrack(&expired) {
        Ok(n) => {
            if let Err(err) = datapath.release_backend_conns(&released) {
                tracing::debug!(error = %err, "open-flow counts not updated");
            }
            metrics
                .conntrack_deleted
                .get_or_create(&KindLabel {
                    kind: "expired".into(),
                })
                .inc_by(n as u64);
            tracing::debug!(deleted = n, "conntrack sweep");
        }
        Err(err) => tracing::warn!(error = %err, "conntrack sweep: deleting failed"),
    }
}

/// UDP and session-affinity membership of the frontends `changes` names
/// (all of them for a full apply).
#[allow(clippy::type_complexity)]
fn members(
    mirror: &crate::sync::MapContents,
    changes: &Changes,
) -> (
    HashMap<conntrack::Endpoint, std::collections::HashSet<conntrack::Endpoint>>,
    HashMap<u32, std::collections::HashSet<u32>>,
) {
    match changes {
        Changes::All => (
            conntrack::udp_members(mirror),
            conntrack::affinity_members(mirror),
        ),
        Changes::Frontends(keys) => (
            conntrack::udp_members_of(mirror, keys),
            conntrack::affinity_members_of(mirror, keys),
        ),
    }
}

/// Forgets session affinity to backends that left their Service port.
fn purge_stale_affinity(
    datapath: &mut Datapath,
    members: &HashMap<u32, std::collections::HashSet<u32>>,
) {
    match datapath.purge_affinity(|e| conntrack::stale_affinity_keys(e, members)) {
        Ok(n) if n > 0 => {
            tracing::info!(deleted = n, "forgot session affinity to backends that left")
        }
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(error = %err, "purging session affinity failed; the datapath re-checks backends")
        }
    }
}

/// After a UDP frontend lost backends, its flows to them are deleted at
/// once, so a client with a fixed source port moves to a live endpoint.
fn purge_stale_udp(
    datapath: &mut Datapath,
    members: &HashMap<conntrack::Endpoint, std::collections::HashSet<conntrack::Endpoint>>,
    metrics: &Metrics,
) {
    let result = datapath.conntrack_entries().and_then(|entries| {
        let stale = conntrack::stale_udp_keys(&entries, members);
        let released = conntrack::open_flow_backends(&stale, &entries);
        let n = datapath.delete_conntrack(&stale)?;
        datapath.release_backend_conns(&released)?;
        Ok(n)
    });
    match result {
        Ok(n) => {
            metrics
                .conntrack_deleted
                .get_or_create(&KindLabel {
                    kind: "udp_backend_gone".into(),
                })
                .inc_by(n as u64);
            if n > 0 {
                tracing::info!(
                    deleted = n,
                    "purged UDP flows whose backend left the Service"
                );
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "purging stale UDP flows failed; the datapath re-picks on its own")
        }
    }
}

/// Watches the directory; notes which files changed in `changes` (all of
/// them when the watcher lost track) and wakes the loop.
fn watch_dir(
    path: &Path,
    changes: Arc<Mutex<dir::DirChanges>>,
    tx: mpsc::Sender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(event) if event.kind.is_access() => return,
            Ok(event) => {
                let mut changes = changes.lock().expect("daemon loop panicked");
                if event.need_rescan() || event.paths.is_empty() {
                    changes.add_everything();
                }
                for path in event.paths {
                    changes.add(path);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "directory watch error; reading the whole directory");
                changes
                    .lock()
                    .expect("daemon loop panicked")
                    .add_everything();
            }
        }
        // A full channel already holds a wake-up.
        let _ = tx.try_send(());
    })?;
    watcher
        .watch(path, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}: does the directory exist?", path.display()))?;
    Ok(watcher)
}

/// Attaches the external programs to each `--interfaces` entry not attached
/// yet (again when it was recreated with a new index). At startup an error
/// is fatal (a typo must not leave NodePorts silently unserved); later it
/// is logged and retried.
fn attach_external_interfaces(
    datapath: &mut Datapath,
    config: &DaemonConfig,
    attached: &mut Vec<(String, u32)>,
) -> anyhow::Result<()> {
    let starting = attached.is_empty();
    for name in &config.external_interfaces {
        let Ok(index) = nix::net::if_::if_nametoindex(name.as_str()) else {
            if starting {
                anyhow::bail!("--interfaces: no interface `{name}`");
            }
            continue;
        };
        if attached.iter().any(|(n, i)| n == name && *i == index) {
            continue;
        }
        match datapath.attach_external_interface(name, index, config.xdp_mode) {
            Ok(()) => {
                tracing::info!(interface = %name, ifindex = index, xdp_mode = %config.xdp_mode, "attached external program (XDP and tcx ingress)");
                attached.retain(|(n, _)| n != name);
                attached.push((name.clone(), index));
            }
            Err(err) if starting => return Err(err.into()),
            Err(err) => tracing::error!(interface = %name, error = %err, "attach failed; retrying"),
        }
    }
    Ok(())
}

/// Attaches to every interface matching a pod glob that is not attached yet
/// (and re-attaches when an interface was recreated with a new index).
fn attach_interfaces(
    datapath: &mut Datapath,
    globs: &[glob::Pattern],
    attached: &mut Vec<(String, u32)>,
) {
    let present: Vec<(String, u32)> = match nix::net::if_::if_nameindex() {
        Ok(list) => list
            .iter()
            .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
            .collect(),
        Err(err) => {
            tracing::error!(error = %err, "listing interfaces failed");
            return;
        }
    };
    attached.retain(|a| present.contains(a));
    for (name, index) in &present {
        if !globs.iter().any(|g| g.matches(name)) {
            continue;
        }
        if attached.iter().any(|(n, i)| n == name && i == index) {
            continue;
        }
        match datapath.attach_pod_interface(name, *index) {
            Ok(()) => {
                crate::datapath::allow_local_sources(name);
                tracing::info!(interface = %name, ifindex = index, "attached pod program (tcx ingress)");
                attached.push((name.clone(), *index));
            }
            Err(err) => tracing::error!(interface = %name, error = %err, "attach failed; retrying"),
        }
    }
    datapath.forget_missing_interfaces(attached);
}

/// Keeps the Service labels of the per-frontend metrics in step with the
/// frontends an apply planned: all of them, or only the changed ones.
fn name_frontends(names: &FrontendServices, desired: &DesiredState, changes: &Changes) {
    let mut names = names.write().unwrap_or_else(|e| e.into_inner());
    match changes {
        Changes::All => {
            *names = desired
                .frontends
                .iter()
                .map(|(key, frontend)| (*key, frontend.service.clone()))
                .collect();
        }
        Changes::Frontends(keys) => {
            for key in keys {
                match desired.frontends.get(key) {
                    Some(frontend) => names.insert(*key, frontend.service.clone()),
                    None => names.remove(key),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn slice(name: &str, trigger: Option<&str>) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: trigger
                    .map(|t| BTreeMap::from([(TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned())])),
                ..ObjectMeta::default()
            },
            ..EndpointSlice::default()
        })
    }

    #[test]
    fn each_trigger_time_counts_once() {
        let mut times = TriggerTimes::default();
        let a = slice("a", Some("2026-11-28T10:00:00Z"));
        let b = slice("b", None);
        assert_eq!(
            times.new_triggers(&[a.clone(), b.clone()]),
            ["2026-11-28T10:00:00Z"]
        );
        // Nothing changed.
        assert!(times.new_triggers(&[a.clone(), b.clone()]).is_empty());
        // Read again (a relist: new objects, same content): nothing new.
        let a2 = slice("a", Some("2026-11-28T10:00:00Z"));
        assert!(times.new_triggers(&[a2.clone(), b.clone()]).is_empty());
        // A change of a with a new trigger time, and b gets one.
        let a3 = slice("a", Some("2026-11-28T10:00:05Z"));
        let b2 = slice("b", Some("2026-11-28T10:00:06Z"));
        let mut new = times.new_triggers(&[a3.clone(), b2.clone()]);
        new.sort();
        assert_eq!(new, ["2026-11-28T10:00:05Z", "2026-11-28T10:00:06Z"]);
        // b goes and comes back with the same time: a new slice, counted.
        assert!(times.new_triggers(std::slice::from_ref(&a3)).is_empty());
        assert_eq!(times.new_triggers(&[a3, b2]), ["2026-11-28T10:00:06Z"]);
    }
}
