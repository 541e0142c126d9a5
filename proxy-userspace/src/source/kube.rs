//! `--source kube`: kube-rs reflectors for Services, EndpointSlices and this
//! node's Node, with the label selectors kube-proxy uses.
//!
//! Each reflector keeps a store; any watch event (including a relist's
//! Init/InitDone, which swaps the store wholesale) wakes the sync loop,
//! which then reads a snapshot of all three stores. Nothing is offered to
//! the model until every store has completed its initial list, so a restart
//! never programs a half-loaded world. While the API server is away the
//! stores keep their last contents and the datapath keeps serving.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::model::{ModelConfig, Snapshot, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "no Kubernetes client configuration: {0}; pass --kubeconfig, or run in a pod with a service account"
    )]
    Infer(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// Builds a client from `--kubeconfig` (or the config file's
/// clientConnection.kubeconfig), else in-cluster config or $KUBECONFIG.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                KubeSourceError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| KubeSourceError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeSourceError::Infer(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubeSourceError::Client(e.to_string()))
}

/// The label selector for Services: kube-proxy's, i.e. not headless and
/// not claimed by another proxy (or, with a proxy name, claimed by us).
pub fn service_selector(config: &ModelConfig) -> String {
    match &config.proxy_name {
        None => format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
        Some(name) => format!("{LABEL_SERVICE_PROXY_NAME}={name},!{LABEL_HEADLESS}"),
    }
}

pub fn endpoint_slice_selector() -> String {
    format!("!{LABEL_HEADLESS}")
}

/// The three reflector stores and whether each finished its first list.
#[derive(Clone)]
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    ready: [Arc<AtomicBool>; 3],
}

impl KubeSource {
    /// Starts the reflectors; every event sends a wake-up on `changed`.
    pub fn start(client: Client, config: &ModelConfig, changed: mpsc::Sender<()>) -> Self {
        let services = run_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&service_selector(config)),
            "services",
            changed.clone(),
        );
        let slices = run_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&endpoint_slice_selector()),
            "endpointslices",
            changed.clone(),
        );
        let nodes = run_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={}", config.node_name)),
            "nodes",
            changed,
        );
        Self {
            services: services.0,
            slices: slices.0,
            nodes: nodes.0,
            ready: [services.1, slices.1, nodes.1],
        }
    }

    /// True once every initial list has completed.
    pub fn is_ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::SeqCst))
    }

    /// What the stores hold now, or `None` before the initial lists.
    pub fn snapshot(&self) -> Option<Snapshot> {
        if !self.is_ready() {
            return None;
        }
        Some(Snapshot {
            // The stores' own `Arc`s: an object that did not change is the
            // same `Arc` as in the last snapshot, so the model skips it.
            services: self.services.state(),
            endpoint_slices: self.slices.state(),
            nodes: self.nodes.state(),
        })
    }
}

/// A node is eligible for traffic unless it is being deleted or the
/// cluster autoscaler tainted it for removal (kube-proxy's /healthz rule).
pub fn node_eligible(node: Option<&Node>) -> bool {
    let Some(node) = node else {
        return true;
    };
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TAINT_TO_BE_DELETED))
}

fn run_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: mpsc::Sender<()>,
) -> (Store<K>, Arc<AtomicBool>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let ready = Arc::new(AtomicBool::new(false));
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let ready_flag = ready.clone();
    let waiter = reader.clone();
    let wake = changed.clone();
    tokio::spawn(async move {
        if waiter.wait_until_ready().await.is_ok() {
            tracing::info!(
                resource = what,
                objects = waiter.len(),
                "initial list complete"
            );
            ready_flag.store(true, Ordering::SeqCst);
            let _ = wake.try_send(());
        }
    });
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    // A full channel already holds a wake-up.
                    let _ = changed.try_send(());
                }
                Err(err) => {
                    tracing::warn!(resource = what, error = %err, "watch failed; retrying with backoff, the datapath keeps its state");
                }
            }
        }
    });
    (reader, ready)
}

/// Publishes kube-proxy's "Starting" event on this node (best effort).
pub async fn publish_starting_event(client: Client, node_name: String) {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "kproxy".into(),
            instance: Some(node_name.clone()),
        },
    );
    let node = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node_name.clone()),
        uid: Some(node_name),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: "Starting".into(),
        note: Some("Starting kproxy.".into()),
        action: "Starting".into(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, &node).await {
        tracing::debug!(error = %err, "could not publish the Starting event");
    }
}
