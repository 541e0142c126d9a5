//! A Kubernetes API server double for tests: real HTTP/1.1 on a real socket, so the real kube-rs
//! client (reflectors, watchers, paging, backoff) runs against it unchanged. Test tree only.
//!
//! Implements, for Services (`/api/v1`), EndpointSlices (`/apis/discovery.k8s.io/v1`) and Nodes
//! (`/api/v1`, cluster-scoped):
//! - GET collection, all namespaces or `/namespaces/{ns}/...`; GET one object by name.
//! - List: items sorted by etcd key (`ns/name`, or `name` for Nodes); `limit` + `continue` paging,
//!   every page served from the same resourceVersion snapshot (the double keeps a change history
//!   and rebuilds older snapshots from it). `limit` is always honoured: the real apiserver serves
//!   `resourceVersion=0` lists from its watch cache and may ignore `limit`; the double always pages.
//!   `resourceVersion` unset/0/NotOlderThan serve the current state; `resourceVersionMatch=Exact`
//!   serves the historical state; a version from before the last compaction answers 410 Gone;
//!   a version from the future answers 504 (the real one waits ~3 s first).
//! - `labelSelector`: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, ANDed by commas.
//!   `fieldSelector`: `metadata.name` and `metadata.namespace` with `=`, `==`, `!=`.
//! - Watch (`watch=true|1`): chunked newline-delimited `{"type":..,"object":..}` events after the
//!   given resourceVersion (replayed from history, then live). resourceVersion unset or "0" starts
//!   with synthetic ADDED events for the current state, as documented upstream; `sendInitialEvents`
//!   (streaming lists) adds the `k8s.io/initial-events-end` BOOKMARK after them. Selectors apply to
//!   events: an object that starts matching is ADDED, one that stops matching is DELETED (previous
//!   content, new resourceVersion), as the apiserver's watch cache does. `allowWatchBookmarks`
//!   gives a BOOKMARK after ~1 s without events (the real one: about once a minute).
//!   `timeoutSeconds` ends the stream cleanly (default 1800 s). A resourceVersion older than the
//!   retained history gets one ERROR event (Status 410 Expired) and the stream ends.
//! - One global resourceVersion counter bumped by every mutation; DELETED events carry the final
//!   object with the new resourceVersion. `uid` is assigned on create and kept on replace.
//! - `/version`; `Status` JSON errors (400, 404, 405, 410, 504) for everything else.
//! - Test controls: outage (`stop`/`restart`, connections aborted at once, state kept),
//!   compaction (`expire_watches`), one kind's lists and watches refused with 503
//!   (`refuse_collection`), a request log, an open-watch count.
//!
//! Does NOT implement: authentication/authorization (any token or none is accepted), admission,
//! defaulting, field validation, writes over HTTP (POST/PUT/PATCH/DELETE answer 405: tests mutate
//! through the methods below), other resources or API discovery (`/api`, `/apis`), protobuf, table
//! output, `remainingItemCount`, `deletionTimestamp`/finalizers, generation, managedFields, TLS,
//! HTTP/2, watch of a future resourceVersion (answers ERROR 504 at once instead of waiting).
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Query;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// Idle time after which a watch that asked for bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Watch length when the client gives no `timeoutSeconds` (the real one picks 30-60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Changes kept for watch replay and old snapshots; older ones are compacted away.
const MAX_HISTORY: usize = 100_000;
/// A watch sends at most about this many bytes per chunk.
const MAX_CHUNK: usize = 1 << 20;

pub struct ApiServer {
    shared: Arc<Shared>,
    bind: Box<dyn Fn() -> TcpListener + Send + Sync>,
    runtime: tokio::runtime::Handle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    serving: Mutex<Option<Serving>>,
    addr: Mutex<SocketAddr>,
}

/// The running listener. Its accept task and every connection task hold a clone of the sender
/// whose receiver is `closed`: the channel disconnects once all of them are gone.
struct Serving {
    accept: tokio::task::JoinHandle<()>,
    closed: mpsc::Receiver<()>,
}

impl ApiServer {
    /// Starts serving. `bind` is called now and on every `restart()` to create the listening
    /// socket, on the calling thread.
    pub fn start(bind: impl Fn() -> TcpListener + Send + Sync + 'static) -> Self {
        let (handle_tx, handle_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("apiserver-double".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("apiserver double: build tokio runtime");
                handle_tx.send(runtime.handle().clone()).unwrap();
                runtime.block_on(async {
                    let _ = shutdown_rx.await;
                });
                // Dropping the runtime cancels the listener, connections and watches.
            })
            .expect("apiserver double: spawn runtime thread");
        let runtime = handle_rx
            .recv()
            .expect("apiserver double: runtime thread died");
        let server = ApiServer {
            shared: Arc::new(Shared::new()),
            bind: Box::new(bind),
            runtime,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            serving: Mutex::new(None),
            addr: Mutex::new(SocketAddr::from(([127, 0, 0, 1], 0))),
        };
        server.restart();
        server
    }

    /// `http://ADDR:PORT` of the current (or last) listener.
    pub fn url(&self) -> String {
        format!("http://{}", lock(&self.addr))
    }

    /// Writes a kubeconfig whose current context points at this server (plain HTTP, a dummy
    /// bearer token that the double ignores).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: apiserver-double
  cluster:
    server: {url}
    insecure-skip-tls-verify: true
users:
- name: apiserver-double
  user:
    token: apiserver-double-token
contexts:
- name: apiserver-double
  context:
    cluster: apiserver-double
    user: apiserver-double
    namespace: default
current-context: apiserver-double
",
            url = self.url()
        );
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
    }

    /// Creates or replaces a Service (namespace defaults to "default").
    pub fn apply_service(&self, svc: Service) {
        self.mutate(|state| state.apply(Kind::Service, to_value(&svc)));
    }

    pub fn delete_service(&self, namespace: &str, name: &str) {
        self.mutate(|state| state.delete(Kind::Service, namespace, name));
    }

    /// Creates or replaces an EndpointSlice (namespace defaults to "default").
    pub fn apply_endpoint_slice(&self, s: EndpointSlice) {
        self.mutate(|state| state.apply(Kind::EndpointSlice, to_value(&s)));
    }

    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) {
        self.mutate(|state| state.delete(Kind::EndpointSlice, namespace, name));
    }

    pub fn apply_node(&self, n: Node) {
        self.mutate(|state| state.apply(Kind::Node, to_value(&n)));
    }

    pub fn delete_node(&self, name: &str) {
        self.mutate(|state| state.delete(Kind::Node, "", name));
    }

    /// Applies everything under one lock with one wake-up of the watches (each object still gets
    /// its own resourceVersion and event).
    pub fn apply_many(&self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let values: Vec<(Kind, Value)> = services
            .iter()
            .map(|s| (Kind::Service, to_value(s)))
            .chain(slices.iter().map(|s| (Kind::EndpointSlice, to_value(s))))
            .collect();
        self.mutate(|state| {
            for (kind, value) in values {
                state.apply(kind, value);
            }
        });
    }

    /// Outage: closes the listener and aborts every open connection and watch; returns once they
    /// are all closed. State is kept and may still be mutated.
    pub fn stop(&self) {
        assert!(
            self.close_all(),
            "apiserver double: connections still open 10 s after stop()"
        );
    }

    /// Aborts the listener and connections; false if they did not all close within 10 s.
    fn close_all(&self) -> bool {
        let Some(serving) = lock(&self.serving).take() else {
            return true;
        };
        serving.accept.abort();
        match serving.closed.recv_timeout(Duration::from_secs(10)) {
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Ok(()) => unreachable!("nothing sends on the close channel"),
            Err(mpsc::RecvTimeoutError::Timeout) => false,
        }
    }

    /// Listens again (calls `bind` again). No-op while serving.
    pub fn restart(&self) {
        let mut serving = lock(&self.serving);
        if serving.is_some() {
            return;
        }
        let listener = (self.bind)();
        let addr = listener
            .local_addr()
            .expect("apiserver double: listener address");
        listener
            .set_nonblocking(true)
            .expect("apiserver double: set_nonblocking");
        *lock(&self.addr) = addr;
        let (closed_tx, closed_rx) = mpsc::channel();
        let accept = self
            .runtime
            .spawn(accept_loop(listener, self.shared.clone(), closed_tx));
        *serving = Some(Serving {
            accept,
            closed: closed_rx,
        });
    }

    /// Compaction: every open watch gets ERROR 410 Expired and ends; history is dropped, so a
    /// watch from an older resourceVersion, an Exact list of one, or a continue token issued
    /// before now answers 410 too.
    pub fn expire_watches(&self) {
        self.mutate(|state| {
            state.epoch += 1;
            state.compacted_rv = state.rv;
            state.history.clear();
        });
    }

    /// While `refuse` holds, every list and watch of `kind` ("services", "endpointslices",
    /// "nodes") answers 503 ServiceUnavailable, as an apiserver whose storage for that resource
    /// is not ready yet does; the other kinds are served.
    pub fn refuse_collection(&self, kind: &str, refuse: bool) {
        let index = Kind::ALL
            .iter()
            .position(|k| k.plural() == kind)
            .unwrap_or_else(|| panic!("no collection {kind}"));
        self.shared.lock().refused[index] = refuse;
    }

    /// Request lines received so far, e.g. `GET /api/v1/services?limit=500`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Number of watch streams currently open.
    pub fn watch_count(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> String {
        self.shared.lock().rv.to_string()
    }

    /// Current Services as stored (with resourceVersion, uid), sorted by namespace/name.
    pub fn services(&self) -> Vec<Service> {
        self.objects(Kind::Service)
    }

    pub fn endpoint_slices(&self) -> Vec<EndpointSlice> {
        self.objects(Kind::EndpointSlice)
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.objects(Kind::Node)
    }

    fn objects<K: DeserializeOwned>(&self, kind: Kind) -> Vec<K> {
        let store = self.shared.lock().stores[kind.index()].clone();
        store
            .values()
            .map(|o| serde_json::from_value(o.value.clone()).expect("stored object deserializes"))
            .collect()
    }

    fn mutate(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.shared.lock());
        self.shared.changed.send_replace(());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // No panic here: Drop may run while a failed test unwinds. The runtime's shutdown below
        // closes whatever is left.
        self.close_all();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn to_value(object: &impl serde::Serialize) -> Value {
    serde_json::to_value(object).expect("k8s object serializes")
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn index(self) -> usize {
        self as usize
    }

    fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Service | Kind::Node => "",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Service | Kind::Node => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The object's key in the store, ordered like the real apiserver's etcd keys.
    fn key(self, namespace: &str, name: &str) -> String {
        if self.namespaced() {
            format!("{namespace}/{name}")
        } else {
            name.to_string()
        }
    }
}

/// One stored object version.
struct Obj {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: Value,
    /// `value` serialized once, reused by every list page and watch event.
    json: String,
}

impl Obj {
    fn new(namespace: String, name: String, value: Value) -> Self {
        let labels = value["metadata"]["labels"]
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let json = value.to_string();
        Obj {
            namespace,
            name,
            labels,
            value,
            json,
        }
    }

    /// This object's content with another resourceVersion.
    fn at_version(&self, rv: u64) -> Obj {
        let mut value = self.value.clone();
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        Obj::new(self.namespace.clone(), self.name.clone(), value)
    }
}

type Objects = BTreeMap<String, Arc<Obj>>;

/// One mutation. `next` is the new content, or for a deletion the final content at `rv`.
struct Change {
    rv: u64,
    kind: Kind,
    key: String,
    prev: Option<Arc<Obj>>,
    next: Arc<Obj>,
    deleted: bool,
}

struct State {
    rv: u64,
    /// `history` holds every change with a resourceVersion above this one.
    compacted_rv: u64,
    /// Bumped by `expire_watches`; watches and continue tokens from an older epoch are expired.
    epoch: u64,
    stores: [Arc<Objects>; 3],
    history: VecDeque<Change>,
    requests: Vec<String>,
    /// Kinds whose lists and watches answer 503 (`refuse_collection`).
    refused: [bool; 3],
}

impl State {
    fn apply(&mut self, kind: Kind, mut value: Value) {
        let name = value["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("apiserver double: {} without metadata.name", kind.kind()))
            .to_string();
        let namespace = if kind.namespaced() {
            let ns = value["metadata"]["namespace"]
                .as_str()
                .filter(|ns| !ns.is_empty())
                .unwrap_or("default")
                .to_string();
            value["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            if let Some(meta) = value["metadata"].as_object_mut() {
                meta.remove("namespace");
            }
            String::new()
        };
        let key = kind.key(&namespace, &name);
        self.rv += 1;
        let rv = self.rv;
        let prev = self.stores[kind.index()].get(&key).cloned();
        if value["metadata"]["uid"].as_str().is_none() {
            let uid = prev
                .as_ref()
                .and_then(|p| p.value["metadata"]["uid"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012x}"));
            value["metadata"]["uid"] = json!(uid);
        }
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        value["apiVersion"] = json!(kind.api_version());
        value["kind"] = json!(kind.kind());
        let next = Arc::new(Obj::new(namespace, name, value));
        Arc::make_mut(&mut self.stores[kind.index()]).insert(key.clone(), next.clone());
        self.record(Change {
            rv,
            kind,
            key,
            prev,
            next,
            deleted: false,
        });
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) {
        let key = kind.key(namespace, name);
        let Some(prev) = Arc::make_mut(&mut self.stores[kind.index()]).remove(&key) else {
            return;
        };
        self.rv += 1;
        let next = Arc::new(prev.at_version(self.rv));
        self.record(Change {
            rv: self.rv,
            kind,
            key,
            prev: Some(prev),
            next,
            deleted: true,
        });
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        if self.history.len() > MAX_HISTORY {
            let dropped = self.history.pop_front().expect("history is not empty");
            self.compacted_rv = dropped.rv;
        }
    }

    /// The store of `kind` as it was at `rv`, rebuilt by undoing later changes; None once
    /// compacted.
    fn objects_at(&self, kind: Kind, rv: u64) -> Option<Arc<Objects>> {
        if rv < self.compacted_rv || rv > self.rv {
            return None;
        }
        let mut objects = self.stores[kind.index()].clone();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if change.kind != kind {
                continue;
            }
            let objects = Arc::make_mut(&mut objects);
            match &change.prev {
                Some(prev) => objects.insert(change.key.clone(), prev.clone()),
                None => objects.remove(&change.key),
            };
        }
        Some(objects)
    }
}

struct Shared {
    state: Mutex<State>,
    /// Poked after every mutation and compaction; watches wait on it.
    changed: tokio::sync::watch::Sender<()>,
    open_watches: AtomicUsize,
}

impl Shared {
    fn new() -> Self {
        Shared {
            state: Mutex::new(State {
                rv: 1,
                compacted_rv: 1,
                epoch: 0,
                stores: Default::default(),
                history: VecDeque::new(),
                requests: Vec::new(),
                refused: [false; 3],
            }),
            changed: tokio::sync::watch::Sender::new(()),
            open_watches: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, closed: mpsc::Sender<()>) {
    let listener = tokio::net::TcpListener::from_std(listener)
        .expect("apiserver double: register listener with tokio");
    // Dropped with this task on stop(), which aborts every connection task.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let closed = closed.clone();
                connections.spawn(async move {
                    let _closed = closed;
                    let service = hyper::service::service_fn(move |req| {
                        let response = handle(&shared, req);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

fn handle<B>(shared: &Arc<Shared>, req: Request<B>) -> Response<Body> {
    shared
        .lock()
        .requests
        .push(format!("{} {}", req.method(), req.uri()));
    if req.method() != Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the apiserver double does not implement {}", req.method()),
        );
    }
    let params = match Params::parse(req.uri()) {
        Ok(params) => params,
        Err(message) => return status_response(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    match route(req.uri().path()) {
        Route::Version => json_response(StatusCode::OK, version_json()),
        Route::Collection { kind, namespace } => {
            if shared.lock().refused[kind.index()] {
                return status_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the apiserver double refuses this collection (refuse_collection)",
                );
            }
            let filter = Filter {
                namespace,
                labels: params.labels.clone(),
                fields: params.fields.clone(),
            };
            if params.watch {
                watch(shared, kind, filter, &params)
            } else {
                list(shared, kind, &filter, &params)
            }
        }
        Route::Item {
            kind,
            namespace,
            name,
        } => {
            if params.watch {
                // The apiserver turns a watch on one name into a field selector.
                let mut fields = params.fields.clone();
                fields.push(FieldReq {
                    field: Field::Name,
                    value: name,
                    equal: true,
                });
                let filter = Filter {
                    namespace,
                    labels: params.labels.clone(),
                    fields,
                };
                return watch(shared, kind, filter, &params);
            }
            let key = kind.key(namespace.as_deref().unwrap_or_default(), &name);
            let found = shared.lock().stores[kind.index()].get(&key).cloned();
            match found {
                Some(obj) => json_response(StatusCode::OK, obj.json.clone()),
                None => not_found(kind, &name),
            }
        }
        Route::Unknown => status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

enum Route {
    Version,
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Item {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
    Unknown,
}

fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["version"] => return Route::Version,
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io", rest),
        _ => return Route::Unknown,
    };
    let kind_of = |plural: &str, namespaced: bool| {
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural && k.namespaced() == namespaced)
    };
    let route = match rest {
        [plural] => Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == *plural)
            .map(|kind| Route::Collection {
                kind,
                namespace: None,
            }),
        [plural, name] => kind_of(plural, false).map(|kind| Route::Item {
            kind,
            namespace: None,
            name: name.to_string(),
        }),
        ["namespaces", ns, plural] => kind_of(plural, true).map(|kind| Route::Collection {
            kind,
            namespace: Some(ns.to_string()),
        }),
        ["namespaces", ns, plural, name] => kind_of(plural, true).map(|kind| Route::Item {
            kind,
            namespace: Some(ns.to_string()),
            name: name.to_string(),
        }),
        _ => None,
    };
    route.unwrap_or(Route::Unknown)
}

struct Params {
    watch: bool,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
    /// None: no limit (absent or 0).
    limit: Option<usize>,
    continue_token: Option<String>,
    /// None: unset; Some(0): "0", any version.
    resource_version: Option<u64>,
    exact: bool,
    not_older_than: bool,
    timeout: Duration,
    bookmarks: bool,
    send_initial_events: bool,
}

impl Params {
    fn parse(uri: &Uri) -> Result<Params, String> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|e| format!("invalid query string: {e}"))?;
        let get = |name: &str| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let flag = |name: &str| match get(name) {
            None | Some("" | "false" | "0") => Ok(false),
            Some("true" | "1") => Ok(true),
            Some(other) => Err(format!("invalid {name}: {other:?}")),
        };
        let limit = match get("limit") {
            None | Some("") => None,
            Some(text) => match text.parse::<i64>() {
                Ok(n) if n > 0 => Some(n as usize),
                Ok(_) => None,
                Err(_) => return Err(format!("invalid limit: {text:?}")),
            },
        };
        let timeout = match get("timeoutSeconds") {
            None | Some("") => DEFAULT_WATCH_TIMEOUT,
            Some(text) => Duration::from_secs(
                text.parse()
                    .map_err(|_| format!("invalid timeoutSeconds: {text:?}"))?,
            ),
        };
        let resource_version = match get("resourceVersion") {
            None | Some("") => None,
            Some(text) => Some(
                text.parse::<u64>()
                    .map_err(|_| format!("invalid resource version: {text:?}"))?,
            ),
        };
        let (exact, not_older_than) = match get("resourceVersionMatch") {
            None | Some("") => (false, false),
            Some("Exact") => (true, false),
            Some("NotOlderThan") => (false, true),
            Some(other) => return Err(format!("invalid resourceVersionMatch: {other:?}")),
        };
        if (exact || not_older_than) && resource_version.is_none() {
            return Err(
                "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
            );
        }
        if exact && resource_version == Some(0) {
            return Err(
                "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"".into(),
            );
        }
        Ok(Params {
            watch: flag("watch")?,
            labels: parse_label_selector(get("labelSelector").unwrap_or_default())?,
            fields: parse_field_selector(get("fieldSelector").unwrap_or_default())?,
            limit,
            continue_token: get("continue")
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            resource_version,
            exact,
            not_older_than,
            timeout,
            bookmarks: flag("allowWatchBookmarks")?,
            send_initial_events: flag("sendInitialEvents")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Clone, Debug)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelReq {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            LabelReq::Exists(k) => labels.contains_key(k),
            LabelReq::NotExists(k) => !labels.contains_key(k),
            LabelReq::Equals(k, v) => labels.get(k) == Some(v),
            LabelReq::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelReq::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            LabelReq::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
        }
    }
}

fn valid_label_part(s: &str, allow_empty: bool) -> bool {
    (allow_empty || !s.is_empty())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelReq>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    // Split on commas outside parentheses: `a in (x,y),!b`.
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    let bad =
        |part: &str| format!("unable to parse requirement: {part:?} in labelSelector {selector:?}");
    parts
        .into_iter()
        .map(|raw| {
            let part = raw.trim();
            let key_value = |op: &str, build: fn(String, String) -> LabelReq| {
                let (k, v) = part.split_once(op).expect("operator present");
                let (k, v) = (k.trim(), v.trim());
                if valid_label_part(k, false) && valid_label_part(v, true) && !v.contains('/') {
                    Ok(build(k.to_string(), v.to_string()))
                } else {
                    Err(bad(raw))
                }
            };
            if let Some(key) = part.strip_prefix('!') {
                let key = key.trim();
                return if valid_label_part(key, false) {
                    Ok(LabelReq::NotExists(key.to_string()))
                } else {
                    Err(bad(raw))
                };
            }
            if part.contains("!=") {
                return key_value("!=", LabelReq::NotEquals);
            }
            if part.contains("==") {
                return key_value("==", LabelReq::Equals);
            }
            if part.contains('=') {
                return key_value("=", LabelReq::Equals);
            }
            let key_end = part
                .find(|c: char| c.is_whitespace() || c == '(')
                .unwrap_or(part.len());
            let (key, rest) = (&part[..key_end], part[key_end..].trim_start());
            if !valid_label_part(key, false) {
                return Err(bad(raw));
            }
            if rest.is_empty() {
                return Ok(LabelReq::Exists(key.to_string()));
            }
            let (negated, set) = if let Some(set) = rest.strip_prefix("notin") {
                (true, set)
            } else if let Some(set) = rest.strip_prefix("in") {
                (false, set)
            } else {
                return Err(bad(raw));
            };
            let values: Vec<String> = set
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| bad(raw))?
                .split(',')
                .map(|v| v.trim().to_string())
                .collect();
            if values
                .iter()
                .any(|v| !valid_label_part(v, true) || v.contains('/'))
                || values == [""]
            {
                return Err(bad(raw));
            }
            Ok(if negated {
                LabelReq::NotIn(key.to_string(), values)
            } else {
                LabelReq::In(key.to_string(), values)
            })
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Field {
    Name,
    Namespace,
}

#[derive(Clone, Debug)]
struct FieldReq {
    field: Field,
    value: String,
    equal: bool,
}

fn parse_field_selector(selector: &str) -> Result<Vec<FieldReq>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    selector
        .split(',')
        .map(|part| {
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!("invalid selector: {part:?}; can't understand"));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(format!("field label not supported: {other}")),
            };
            Ok(FieldReq {
                field,
                value: value.trim().to_string(),
                equal,
            })
        })
        .collect()
}

/// What one request selects: path namespace, label and field selectors.
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn matches(&self, obj: &Obj) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == obj.namespace)
            && self.labels.iter().all(|r| r.matches(&obj.labels))
            && self.fields.iter().all(|r| {
                let actual = match r.field {
                    Field::Name => &obj.name,
                    Field::Namespace => &obj.namespace,
                };
                (*actual == r.value) == r.equal
            })
    }

    /// How `change` looks through this filter, as the watch cache converts it.
    fn event(&self, change: &Change) -> Option<(&'static str, String)> {
        if change.deleted {
            return change
                .prev
                .as_ref()
                .filter(|p| self.matches(p))
                .map(|_| ("DELETED", change.next.json.clone()));
        }
        let before = change.prev.as_ref().is_some_and(|p| self.matches(p));
        match (before, self.matches(&change.next)) {
            (false, true) => Some(("ADDED", change.next.json.clone())),
            (true, true) => Some(("MODIFIED", change.next.json.clone())),
            (true, false) => {
                let prev = change.prev.as_ref().expect("matched before");
                Some(("DELETED", prev.at_version(change.rv).json))
            }
            (false, false) => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// List and watch

fn list(shared: &Arc<Shared>, kind: Kind, filter: &Filter, params: &Params) -> Response<Body> {
    let state = shared.lock();
    let (rv, objects, after) = if let Some(token) = &params.continue_token {
        if params.resource_version.is_some_and(|rv| rv != 0) {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "specifying resource version is not allowed when using continue",
            );
        }
        let Some((epoch, rv, after)) = parse_continue(token) else {
            return status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("invalid continue token {token:?}"),
            );
        };
        match state.objects_at(kind, rv).filter(|_| epoch == state.epoch) {
            Some(objects) => (rv, objects, Some(after)),
            None => {
                return status_response(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter, or use the \
                     continue value from the response.",
                )
            }
        }
    } else {
        match params.resource_version {
            None | Some(0) => (state.rv, state.stores[kind.index()].clone(), None),
            Some(asked) => {
                if asked > state.rv {
                    return too_large(asked, state.rv);
                }
                if !params.exact {
                    (state.rv, state.stores[kind.index()].clone(), None)
                } else {
                    match state.objects_at(kind, asked) {
                        Some(objects) => (asked, objects, None),
                        None => {
                            return status_response(
                                StatusCode::GONE,
                                "Expired",
                                &format!(
                                    "The resourceVersion for the provided list is too old: \
                                     {asked} ({})",
                                    state.compacted_rv
                                ),
                            )
                        }
                    }
                }
            }
        }
    };
    let epoch = state.epoch;
    drop(state);

    let start = match &after {
        Some(key) => Bound::Excluded(key.as_str()),
        None => Bound::Unbounded,
    };
    let mut matching = objects
        .range::<str, _>((start, Bound::Unbounded))
        .filter(|(_, obj)| filter.matches(obj));
    let limit = params.limit.unwrap_or(usize::MAX);
    let mut items = String::new();
    let mut last_key = None;
    for (key, obj) in matching.by_ref().take(limit) {
        if !items.is_empty() {
            items.push(',');
        }
        items.push_str(&obj.json);
        last_key = Some(key);
    }
    let continue_token = match (last_key, matching.next()) {
        (Some(last), Some(_)) => Some(format!("{epoch}:{rv}:{last}")),
        _ => None,
    };
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json_response(
        StatusCode::OK,
        format!(
            r#"{{"apiVersion":"{}","kind":"{}List","metadata":{},"items":[{}]}}"#,
            kind.api_version(),
            kind.kind(),
            metadata,
            items
        ),
    )
}

/// `epoch:rv:key` — the snapshot the list was served from and the last key sent.
fn parse_continue(token: &str) -> Option<(u64, u64, String)> {
    let mut parts = token.splitn(3, ':');
    let epoch = parts.next()?.parse().ok()?;
    let rv = parts.next()?.parse().ok()?;
    let key = parts.next()?.to_string();
    Some((epoch, rv, key))
}

fn watch(shared: &Arc<Shared>, kind: Kind, filter: Filter, params: &Params) -> Response<Body> {
    if params.send_initial_events && !(params.bookmarks && params.not_older_than) {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "sendInitialEvents requires allowWatchBookmarks=true and \
             resourceVersionMatch=NotOlderThan",
        );
    }
    let state = shared.lock();
    let asked = params.resource_version.filter(|rv| *rv != 0);
    let initial_state = asked.is_none() || params.send_initial_events;
    let mut first = String::new();
    let cursor = if initial_state {
        if asked.is_some_and(|rv| rv > state.rv) {
            return single_event(error_event(&too_large_status(asked.unwrap_or(0), state.rv)));
        }
        for obj in state.stores[kind.index()].values() {
            if filter.matches(obj) {
                push_event(&mut first, "ADDED", &obj.json);
            }
        }
        if params.send_initial_events {
            let bookmark = json!({
                "apiVersion": kind.api_version(),
                "kind": kind.kind(),
                "metadata": {
                    "resourceVersion": state.rv.to_string(),
                    "annotations": { "k8s.io/initial-events-end": "true" },
                },
            });
            push_event(&mut first, "BOOKMARK", &bookmark.to_string());
        }
        state.rv
    } else {
        let asked = asked.expect("resourceVersion given");
        if asked < state.compacted_rv {
            return single_event(error_event(&too_old_status(asked, state.compacted_rv)));
        }
        if asked > state.rv {
            return single_event(error_event(&too_large_status(asked, state.rv)));
        }
        asked
    };
    // Subscribed under the lock: every mutation after `cursor` wakes this watch.
    let changed = shared.changed.subscribe();
    let stream = WatchStream {
        shared: shared.clone(),
        kind,
        filter,
        cursor,
        epoch: state.epoch,
        changed,
        deadline: tokio::time::Instant::now() + params.timeout,
        bookmarks: params.bookmarks,
        first: (!first.is_empty()).then(|| Bytes::from(first)),
        finished: false,
        _open: OpenWatch::new(shared.clone()),
    };
    drop(state);
    let body = futures::stream::unfold(stream, |mut stream| async move {
        let chunk = stream.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), stream))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .expect("valid response")
}

/// Counts an open watch for as long as its stream lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        OpenWatch(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

struct WatchStream {
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    /// Every change up to here has been sent (or filtered out).
    cursor: u64,
    epoch: u64,
    changed: tokio::sync::watch::Receiver<()>,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    first: Option<Bytes>,
    finished: bool,
    _open: OpenWatch,
}

enum Drained {
    Events(Bytes),
    Gone(Bytes),
    Nothing,
}

impl WatchStream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            self.changed.borrow_and_update();
            match self.drain() {
                Drained::Events(chunk) => return Some(chunk),
                Drained::Gone(chunk) => {
                    self.finished = true;
                    return Some(chunk);
                }
                Drained::Nothing => {}
            }
            let now = tokio::time::Instant::now();
            if now >= self.deadline {
                return None;
            }
            let wake = if self.bookmarks {
                (now + BOOKMARK_INTERVAL).min(self.deadline)
            } else {
                self.deadline
            };
            tokio::select! {
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if self.bookmarks && tokio::time::Instant::now() < self.deadline {
                        return Some(self.bookmark());
                    }
                }
            }
        }
    }

    fn drain(&mut self) -> Drained {
        let state = self.shared.lock();
        if state.epoch != self.epoch {
            return Drained::Gone(error_event(&status_json(
                410,
                "Expired",
                "The resourceVersion for the provided watch is too old.",
            )));
        }
        if self.cursor < state.compacted_rv {
            return Drained::Gone(error_event(&too_old_status(
                self.cursor,
                state.compacted_rv,
            )));
        }
        let start = state.history.partition_point(|c| c.rv <= self.cursor);
        let mut out = String::new();
        let mut drained_all = true;
        for change in state.history.range(start..) {
            if out.len() >= MAX_CHUNK {
                drained_all = false;
                break;
            }
            self.cursor = change.rv;
            if change.kind != self.kind {
                continue;
            }
            if let Some((event_type, json)) = self.filter.event(change) {
                push_event(&mut out, event_type, &json);
            }
        }
        if drained_all {
            self.cursor = self.cursor.max(state.rv);
        }
        if out.is_empty() {
            Drained::Nothing
        } else {
            Drained::Events(Bytes::from(out))
        }
    }

    fn bookmark(&self) -> Bytes {
        let object = json!({
            "apiVersion": self.kind.api_version(),
            "kind": self.kind.kind(),
            "metadata": { "resourceVersion": self.cursor.to_string() },
        });
        let mut line = String::new();
        push_event(&mut line, "BOOKMARK", &object.to_string());
        Bytes::from(line)
    }
}

fn push_event(out: &mut String, event_type: &str, object_json: &str) {
    out.push_str(r#"{"type":""#);
    out.push_str(event_type);
    out.push_str(r#"","object":"#);
    out.push_str(object_json);
    out.push_str("}\n");
}

fn error_event(status: &Value) -> Bytes {
    let mut line = String::new();
    push_event(&mut line, "ERROR", &status.to_string());
    Bytes::from(line)
}

/// A watch response that carries one event and ends.
fn single_event(chunk: Bytes) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(chunk))
        .expect("valid response")
}

// ---------------------------------------------------------------------------------------------
// Responses

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn too_old_status(asked: u64, oldest: u64) -> Value {
    status_json(
        410,
        "Expired",
        &format!("too old resource version: {asked} ({oldest})"),
    )
}

fn too_large_status(asked: u64, current: u64) -> Value {
    let mut status = status_json(
        504,
        "Timeout",
        &format!("Too large resource version: {asked}, current: {current}"),
    );
    status["details"] = json!({
        "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }],
        "retryAfterSeconds": 1,
    });
    status
}

fn too_large(asked: u64, current: u64) -> Response<Body> {
    json_response(
        StatusCode::GATEWAY_TIMEOUT,
        too_large_status(asked, current).to_string(),
    )
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        status_json(code.as_u16(), reason, message).to_string(),
    )
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    let mut status = status_json(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.plural()),
    );
    status["details"] = json!({ "name": name, "group": kind.group(), "kind": kind.plural() });
    json_response(StatusCode::NOT_FOUND, status.to_string())
}

fn json_response(code: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("valid response")
}

fn version_json() -> String {
    json!({
        "major": "1",
        "minor": "34",
        "emulationMajor": "1",
        "emulationMinor": "34",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "33",
        "gitVersion": "v1.34.0-apiserver-double",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
    .to_string()
}
