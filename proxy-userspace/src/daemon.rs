//! `kproxy run`: the long-running loop. Reads the source, computes the
//! desired state, syncs it into the maps, and keeps pod interfaces attached.
//!
//! Coalescing follows kube-proxy's BoundedFrequencyRunner: a change syncs at
//! once unless the last sync was less than `min_sync_period` ago; a full
//! resync (maps re-read, drift repaired) runs every `sync_period`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::sync::mpsc;

use crate::datapath::{Datapath, MapSizes};
use crate::model::{self, ModelConfig, Snapshot};
use crate::source::dir;
use crate::sync::Syncer;

/// Where Services and endpoints come from.
#[derive(Clone, Debug)]
pub enum Source {
    Dir(PathBuf),
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub source: Source,
    pub model: ModelConfig,
    pub pin_dir: PathBuf,
    pub pod_interfaces: Vec<glob::Pattern>,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub map_sizes: MapSizes,
    /// How often the interface list is checked for new pod interfaces.
    pub interface_poll: Duration,
}

enum Event {
    SourceChanged,
}

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(&config.pin_dir, config.map_sizes)?;
    tracing::info!(pin_path = %config.pin_dir.display(), "datapath loaded");
    let mut syncer = Syncer::new();
    syncer
        .reload(&datapath.maps()?)
        .context("reading the pinned maps")?;
    tracing::info!(
        entries = syncer.mirror().services.len(),
        "state left by a previous kproxy (reused)"
    );

    let (tx, mut rx) = mpsc::channel::<Event>(16);
    let Source::Dir(dir_path) = &config.source;
    let _watcher = watch_dir(dir_path, tx.clone())?;

    let mut attached: Vec<(String, u32)> = Vec::new();
    attach_interfaces(&mut datapath, &config.pod_interfaces, &mut attached);

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut interface_tick = tokio::time::interval(config.interface_poll);
    let mut resync_tick = tokio::time::interval(config.sync_period);
    resync_tick.tick().await;

    // Nothing is programmed until the source has been read completely once.
    let mut snapshot: Option<Snapshot> = None;
    let mut pending = true;
    let mut last_sync: Option<Instant> = None;
    let mut full_resync = false;

    loop {
        if pending {
            let due = last_sync.map_or(Instant::now(), |t| t + config.min_sync_period);
            if Instant::now() >= due {
                pending = false;
                match dir::load_dir(dir_path) {
                    Ok(s) => snapshot = Some(s),
                    Err(err) => {
                        tracing::error!(error = %err, "source not applied; the last good state stays programmed");
                    }
                }
                if let Some(snapshot) = &snapshot {
                    let started = Instant::now();
                    let mut maps = datapath.maps()?;
                    if full_resync {
                        if let Err(err) = syncer.reload(&maps) {
                            tracing::error!(error = %err, "re-reading maps for a full resync failed");
                        }
                        full_resync = false;
                    }
                    let desired = model::desired_state(snapshot, &config.model);
                    let report = syncer.apply(&mut maps, &desired);
                    tracing::info!(
                        frontends = report.frontends,
                        backends = report.backends,
                        writes = report.writes,
                        deletes = report.deletes,
                        failed = report.failed.len(),
                        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                        "synced"
                    );
                    for err in &report.failed_deletes {
                        tracing::warn!(error = %err, "a stale entry could not be deleted; retrying on the next sync");
                    }
                }
                last_sync = Some(Instant::now());
                continue;
            }
            let wait = due - Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Some(Event::SourceChanged) = rx.recv() => {}
                _ = interface_tick.tick() => attach_interfaces(&mut datapath, &config.pod_interfaces, &mut attached),
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
            continue;
        }
        tokio::select! {
            Some(Event::SourceChanged) = rx.recv() => pending = true,
            _ = resync_tick.tick() => { pending = true; full_resync = true; }
            _ = interface_tick.tick() => attach_interfaces(&mut datapath, &config.pod_interfaces, &mut attached),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("shutting down; the datapath stays in place (`kproxy cleanup` removes it)");
    Ok(())
}

fn watch_dir(
    path: &std::path::Path,
    tx: mpsc::Sender<Event>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if !event.kind.is_access() {
                // A full channel already means "changed": dropping is fine.
                let _ = tx.try_send(Event::SourceChanged);
            }
        }
    })?;
    watcher
        .watch(path, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}: does the directory exist?", path.display()))?;
    Ok(watcher)
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
                tracing::info!(interface = %name, ifindex = index, "attached pod program (tcx ingress)");
                attached.push((name.clone(), *index));
            }
            Err(err) => tracing::error!(interface = %name, error = %err, "attach failed; retrying"),
        }
    }
    datapath.forget_missing_interfaces(attached);
}
