//! The API server double (tests/apiserver) driven by the real kube-rs client over real HTTP.

mod apiserver;

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

const NOT_OTHER_PROXY: &str = "!service.kubernetes.io/service-proxy-name";
const NOT_HEADLESS: &str = "!service.kubernetes.io/headless";

/// Binds 127.0.0.1 on a free port the first time and on that same port afterwards.
fn loopback() -> impl Fn() -> TcpListener + Send + Sync + 'static {
    let port = Mutex::new(0u16);
    move || {
        let mut port = port.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(("127.0.0.1", *port)) {
                Ok(listener) => {
                    *port = listener.local_addr().unwrap().port();
                    return listener;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding port {}: {e}; retrying", *port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("bind 127.0.0.1:{}: {e}", *port),
            }
        }
    }
}

fn client(server: &ApiServer) -> Client {
    let config = kube::Config::new(server.url().parse().expect("url parses"));
    Client::try_from(config).expect("kube client")
}

fn service(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    let labels: serde_json::Map<_, _> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "namespace": namespace, "name": name, "labels": labels },
        "spec": { "clusterIP": "198.18.100.1", "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }] },
    }))
    .unwrap()
}

fn slice(namespace: &str, name: &str, labels: &[(&str, &str)]) -> EndpointSlice {
    let mut labels: serde_json::Map<_, _> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    labels.insert(
        "kubernetes.io/service-name".into(),
        json!(name.split('-').next().unwrap()),
    );
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "namespace": namespace, "name": name, "labels": labels },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["198.18.1.10"], "conditions": { "ready": true } }],
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
    }))
    .unwrap()
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    let labels: serde_json::Map<_, _> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": labels },
    }))
    .unwrap()
}

/// (namespace, name, resourceVersion) of each object: equal sets mean equal states.
fn keys<K: Resource>(
    objects: impl IntoIterator<Item = impl Borrow<K>>,
) -> BTreeSet<(String, String, String)> {
    objects
        .into_iter()
        .map(|o| {
            let o = o.borrow();
            let meta = o.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
                meta.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn names<K: Resource>(objects: &[K]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

fn has_label<K: Resource>(o: &K, key: &str) -> bool {
    o.meta()
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(key))
}

/// Polls `check` until it holds; panics with `what` and the last `state` after `timeout`.
async fn eventually<S: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), S>,
) -> Duration {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return start.elapsed(),
            Err(state) if start.elapsed() > timeout => {
                panic!("{what}: not reached within {timeout:?}; last state: {state:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until the reflector's store holds exactly `expected`.
async fn converge<K: Resource + Clone>(
    what: &str,
    store: &Store<K>,
    expected: impl Fn() -> BTreeSet<(String, String, String)>,
) -> Duration
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    eventually(what, Duration::from_secs(30), || {
        let want = expected();
        let have = keys::<K>(store.state());
        if have == want {
            Ok(())
        } else {
            Err(format!(
                "missing {:?}, extra {:?}",
                want.difference(&have).collect::<Vec<_>>(),
                have.difference(&want).collect::<Vec<_>>()
            ))
        }
    })
    .await
}

/// A running `watcher(..).default_backoff()` feeding a reflector store.
struct Reflected<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    /// Number of `Init` events: 1 for the first list, +1 for every relist.
    inits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Reflected<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    fn start(api: Api<K>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let inits = Arc::new(AtomicUsize::new(0));
        let counted = inits.clone();
        let task = tokio::spawn(
            watcher(api, config)
                .default_backoff()
                .reflect(writer)
                .for_each(move |event| {
                    if matches!(event, Ok(watcher::Event::Init)) {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    futures::future::ready(())
                }),
        );
        Reflected { store, inits, task }
    }

    fn inits(&self) -> usize {
        self.inits.load(Ordering::SeqCst)
    }
}

impl<K: Resource + Clone + 'static> Drop for Reflected<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn list_requests(server: &ApiServer, path: &str) -> Vec<String> {
    let prefix = format!("GET {path}");
    server
        .requests()
        .into_iter()
        .filter(|r| {
            (r.starts_with(&format!("{prefix}?")) || *r == prefix) && !r.contains("watch=true")
        })
        .collect()
}

fn kube_status(err: kube::Error) -> u16 {
    match err {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API status error, got {other:?}"),
    }
}

#[tokio::test]
async fn list_pages_with_limit_and_continue() {
    let server = ApiServer::start(loopback());
    for (ns, name) in [
        ("b", "one"),
        ("a", "two"),
        ("a", "one"),
        ("c", "x"),
        ("b", "zz"),
    ] {
        server.apply_service(service(ns, name, &[]));
    }
    let api: Api<Service> = Api::all(client(&server));

    let mut pages = Vec::new();
    let mut params = ListParams::default().limit(2);
    loop {
        let page = api.list(&params).await.expect("list page");
        if pages.is_empty() {
            // A change between pages must not show up in later pages of the same list.
            server.apply_service(service("a", "zzz-late", &[]));
        }
        let token = page.metadata.continue_.clone().filter(|t| !t.is_empty());
        pages.push(page);
        match token {
            Some(token) => params = ListParams::default().limit(2).continue_token(&token),
            None => break,
        }
        assert!(pages.len() <= 5, "paging does not end");
    }

    let sizes: Vec<usize> = pages.iter().map(|p| p.items.len()).collect();
    assert_eq!(sizes, [2, 2, 1]);
    let rvs: BTreeSet<_> = pages
        .iter()
        .map(|p| p.metadata.resource_version.clone())
        .collect();
    assert_eq!(
        rvs.len(),
        1,
        "every page is served from one snapshot: {rvs:?}"
    );
    let all: Vec<(String, String)> = pages
        .iter()
        .flat_map(|p| {
            p.items
                .iter()
                .map(|s| (s.namespace().unwrap(), s.name_any()))
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("a", "one"),
        ("a", "two"),
        ("b", "one"),
        ("b", "zz"),
        ("c", "x"),
    ]
    .iter()
    .map(|(n, s)| (n.to_string(), s.to_string()))
    .collect();
    assert_eq!(
        all, expected,
        "all five exactly once, sorted by namespace/name"
    );

    let lists = list_requests(&server, "/api/v1/services");
    assert_eq!(lists.len(), 3, "{lists:?}");
    assert!(lists.iter().all(|r| r.contains("limit=2")), "{lists:?}");
    assert!(
        lists[1..].iter().all(|r| r.contains("continue=")),
        "{lists:?}"
    );

    // A fresh list sees the late Service; a namespaced list only its namespace.
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        6
    );
    let in_a: Api<Service> = Api::namespaced(client(&server), "a");
    assert_eq!(
        names(&in_a.list(&ListParams::default()).await.unwrap().items),
        ["one", "two", "zzz-late"]
    );
}

#[tokio::test]
async fn label_and_field_selectors() {
    let server = ApiServer::start(loopback());
    server.apply_service(service("default", "plain", &[("app", "web")]));
    server.apply_service(service(
        "default",
        "other-proxy",
        &[("service.kubernetes.io/service-proxy-name", "foo")],
    ));
    server.apply_service(service("default", "db", &[("app", "db")]));
    server.apply_endpoint_slice(slice("default", "plain-abc", &[]));
    server.apply_endpoint_slice(slice(
        "default",
        "headless-abc",
        &[("service.kubernetes.io/headless", "")],
    ));
    server.apply_node(node("node-a", &[]));
    server.apply_node(node("node-b", &[]));
    let client = client(&server);
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());

    let listed = |selector: &'static str| {
        let services = services.clone();
        async move {
            names(
                &services
                    .list(&ListParams::default().labels(selector))
                    .await
                    .expect(selector)
                    .items,
            )
        }
    };
    assert_eq!(listed(NOT_OTHER_PROXY).await, ["db", "plain"]);
    assert_eq!(
        listed("service.kubernetes.io/service-proxy-name").await,
        ["other-proxy"]
    );
    assert_eq!(listed("app=web").await, ["plain"]);
    assert_eq!(listed("app==db").await, ["db"]);
    assert_eq!(listed("app!=web").await, ["db", "other-proxy"]);
    assert_eq!(
        listed("app in (web, db),!service.kubernetes.io/service-proxy-name").await,
        ["db", "plain"]
    );
    assert_eq!(listed("app notin (web)").await, ["db", "other-proxy"]);
    assert_eq!(listed("app,app!=db").await, ["plain"]);

    let listed_slices = slices
        .list(&ListParams::default().labels(NOT_HEADLESS))
        .await
        .unwrap();
    assert_eq!(names(&listed_slices.items), ["plain-abc"]);

    let node_a = nodes
        .list(&ListParams::default().fields("metadata.name=node-a"))
        .await
        .unwrap();
    assert_eq!(names(&node_a.items), ["node-a"]);
    let not_a = nodes
        .list(&ListParams::default().fields("metadata.name!=node-a"))
        .await
        .unwrap();
    assert_eq!(names(&not_a.items), ["node-b"]);
    assert_eq!(nodes.get("node-b").await.unwrap().name_any(), "node-b");
    assert_eq!(kube_status(nodes.get("node-c").await.unwrap_err()), 404);

    let bad = services
        .list(&ListParams::default().labels("app in web"))
        .await
        .unwrap_err();
    assert_eq!(kube_status(bad), 400);
    let bad = nodes
        .list(&ListParams::default().fields("spec.unschedulable=true"))
        .await
        .unwrap_err();
    assert_eq!(kube_status(bad), 400);
}

#[tokio::test]
async fn kubeconfig_version_and_unknown_paths() {
    let server = ApiServer::start(loopback());
    server.apply_service(service("default", "web", &[]));
    let path = std::env::temp_dir().join(format!(
        "apiserver-double-kubeconfig-{}",
        std::process::id()
    ));
    server.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig parses");
    std::fs::remove_file(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config loads");
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        server.url()
    );
    let client = Client::try_from(config).unwrap();

    let version = client.apiserver_version().await.expect("/version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "34")
    );
    let services: Api<Service> = Api::default_namespaced(client.clone());
    assert_eq!(
        names(&services.list(&ListParams::default()).await.unwrap().items),
        ["web"]
    );

    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client);
    assert_eq!(
        kube_status(pods.list(&ListParams::default()).await.unwrap_err()),
        404
    );
}

#[tokio::test]
async fn reflector_converges_and_bookmarks_arrive() {
    let server = ApiServer::start(loopback());
    server.apply_service(service("default", "a", &[]));
    server.apply_service(service(
        "default",
        "b",
        &[("service.kubernetes.io/service-proxy-name", "foo")],
    ));
    server.apply_endpoint_slice(slice("default", "a-1", &[]));
    let client = client(&server);
    let services_api: Api<Service> = Api::all(client.clone());
    let services = Reflected::start(
        services_api.clone(),
        watcher::Config::default().labels(NOT_OTHER_PROXY),
    );
    let slices = Reflected::start(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(NOT_HEADLESS),
    );
    let wanted_services = || {
        keys::<Service>(
            server
                .services()
                .iter()
                .filter(|s| !has_label(*s, "service.kubernetes.io/service-proxy-name")),
        )
    };
    let wanted_slices = || {
        keys::<EndpointSlice>(
            server
                .endpoint_slices()
                .iter()
                .filter(|s| !has_label(*s, "service.kubernetes.io/headless")),
        )
    };

    converge("initial services", &services.store, wanted_services).await;
    converge("initial slices", &slices.store, wanted_slices).await;
    eventually("both watches open", Duration::from_secs(10), || {
        if server.watch_count() >= 2 {
            Ok(())
        } else {
            Err(server.watch_count())
        }
    })
    .await;

    // Watch directly from here on to see the raw events too.
    let from = server.resource_version();
    let mut raw = services_api
        .watch(&WatchParams::default(), &from)
        .await
        .expect("watch")
        .boxed();

    server.apply_service(service("default", "c", &[]));
    server.apply_service(service("default", "a", &[("app", "changed")])); // modified
    server.apply_service(service("default", "b", &[])); // starts matching
    server.apply_service(service(
        "default",
        "c",
        &[("service.kubernetes.io/service-proxy-name", "foo")],
    )); // stops matching
    server.delete_service("default", "a");
    server.apply_endpoint_slice(slice("default", "b-1", &[]));
    server.apply_endpoint_slice(slice(
        "default",
        "a-1",
        &[("service.kubernetes.io/headless", "")],
    ));
    let took = converge("services after changes", &services.store, wanted_services).await;
    converge("slices after changes", &slices.store, wanted_slices).await;
    let reflected: Vec<String> = services
        .store
        .state()
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(reflected, ["b"]);
    assert!(slices.store.state().iter().all(|s| s.name_any() == "b-1"));
    assert_eq!(
        (services.inits(), slices.inits()),
        (1, 1),
        "no relist needed"
    );
    println!("reflector converged {took:?} after the last change");

    // The unfiltered raw watch: every change of its kind in order, then a bookmark when idle.
    let mut seen = Vec::new();
    let bookmark = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = raw.try_next().await.expect("watch stream") {
            match event {
                WatchEvent::Added(s) => seen.push(format!("ADDED {}", s.name_any())),
                WatchEvent::Modified(s) => seen.push(format!("MODIFIED {}", s.name_any())),
                WatchEvent::Deleted(s) => seen.push(format!(
                    "DELETED {} rv={}",
                    s.name_any(),
                    s.resource_version().unwrap()
                )),
                WatchEvent::Bookmark(b) => return b,
                WatchEvent::Error(e) => panic!("unexpected error event {e:?}"),
            }
        }
        panic!("watch ended without a bookmark")
    })
    .await
    .expect("a bookmark within 5 s of idleness");
    let from: u64 = from.parse().unwrap();
    assert_eq!(
        seen,
        [
            "ADDED c".to_string(),
            "MODIFIED a".into(),
            "MODIFIED b".into(),
            "MODIFIED c".into(),
            format!("DELETED a rv={}", from + 5),
        ]
    );
    assert_eq!(
        bookmark.metadata.resource_version,
        server.resource_version()
    );
    assert_eq!(bookmark.types.kind, "Service");
}

#[tokio::test]
async fn expired_watches_make_reflectors_relist() {
    let server = ApiServer::start(loopback());
    for i in 0..5 {
        server.apply_service(service("default", &format!("svc-{i}"), &[]));
    }
    let api: Api<Service> = Api::all(client(&server));
    let services = Reflected::start(
        api.clone(),
        watcher::Config::default().labels(NOT_OTHER_PROXY),
    );
    let wanted = || keys::<Service>(server.services());
    converge("initial", &services.store, wanted).await;
    eventually("watch open", Duration::from_secs(10), || {
        if server.watch_count() == 1 {
            Ok(())
        } else {
            Err(server.watch_count())
        }
    })
    .await;
    let lists_before = list_requests(&server, "/api/v1/services").len();
    // Older than the compaction point (watching from the current version stays valid).
    let old_rv = server.services()[0].resource_version().unwrap();
    assert!(old_rv.parse::<u64>().unwrap() < server.resource_version().parse().unwrap());
    let first_page = api.list(&ListParams::default().limit(2)).await.unwrap();
    let stale_token = first_page
        .metadata
        .continue_
        .clone()
        .expect("a continue token");

    server.expire_watches();
    server.delete_service("default", "svc-1");
    server.apply_service(service("default", "svc-new", &[]));
    server.apply_service(service("default", "svc-2", &[("app", "changed")]));

    let took = converge("after expiry", &services.store, wanted).await;
    println!("reflector relisted and converged in {took:?}");
    let names_now: Vec<String> = services
        .store
        .state()
        .iter()
        .map(|s| s.name_any())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names_now, ["svc-0", "svc-2", "svc-3", "svc-4", "svc-new"]);
    assert_eq!(services.inits(), 2, "exactly one relist");
    let lists_after = list_requests(&server, "/api/v1/services").len();
    assert!(
        lists_after > lists_before + 1,
        "a new list after expiry: {:?}",
        server.requests()
    );

    // Raw: a watch from before the compaction gets one ERROR 410 and ends; so does a stale token.
    let mut stale = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch answers 200")
        .boxed();
    match stale.try_next().await.expect("stream") {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    assert!(stale.try_next().await.expect("clean end").is_none());
    let gone = api
        .list(&ListParams::default().limit(2).continue_token(&stale_token))
        .await
        .unwrap_err();
    assert_eq!(kube_status(gone), 410);
    // A watch from the current version works.
    let mut fresh = api
        .watch(&WatchParams::default(), &server.resource_version())
        .await
        .unwrap()
        .boxed();
    server.apply_service(service("default", "svc-3", &[("app", "again")]));
    let event = tokio::time::timeout(Duration::from_secs(5), fresh.try_next())
        .await
        .expect("event in time")
        .unwrap();
    assert!(
        matches!(event, Some(WatchEvent::Modified(ref s)) if s.name_any() == "svc-3"),
        "{event:?}"
    );
}

#[tokio::test]
async fn outage_then_restart_delivers_changes_made_meanwhile() {
    let server = ApiServer::start(loopback());
    for i in 0..5 {
        server.apply_service(service("default", &format!("svc-{i}"), &[]));
    }
    server.apply_node(node("node-a", &[]));
    server.apply_node(node("node-b", &[]));
    let client = client(&server);
    let services_api: Api<Service> = Api::all(client.clone());
    let services = Reflected::start(
        services_api.clone(),
        watcher::Config::default().labels(NOT_OTHER_PROXY),
    );
    let nodes = Reflected::start(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields("metadata.name=node-a"),
    );
    let wanted_services = || keys::<Service>(server.services());
    let wanted_nodes = || {
        keys::<Node>(
            server
                .nodes()
                .into_iter()
                .filter(|n| n.name_any() == "node-a"),
        )
    };
    converge("initial services", &services.store, wanted_services).await;
    converge("initial node", &nodes.store, wanted_nodes).await;
    eventually("watches open", Duration::from_secs(10), || {
        if server.watch_count() == 2 {
            Ok(())
        } else {
            Err(server.watch_count())
        }
    })
    .await;

    let addr = server.url().trim_start_matches("http://").parse().unwrap();
    let stopped = Instant::now();
    server.stop();
    assert_eq!(
        server.watch_count(),
        0,
        "stop() closes every watch before returning"
    );
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect_err("connection while stopped");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    let attempt = Instant::now();
    let failed = tokio::time::timeout(
        Duration::from_secs(5),
        services_api.list(&ListParams::default()),
    )
    .await;
    assert!(
        matches!(failed, Ok(Err(_))),
        "a list fails fast while stopped: {failed:?}"
    );
    assert!(
        attempt.elapsed() < Duration::from_secs(2),
        "took {:?}",
        attempt.elapsed()
    );

    server.delete_service("default", "svc-1");
    server.apply_service(service("default", "svc-new", &[]));
    server.apply_service(service("default", "svc-2", &[("app", "changed")]));
    server.apply_node(node("node-a", &[("changed", "yes")]));
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself
    assert_eq!(server.watch_count(), 0);
    let outage = stopped.elapsed();
    server.restart();
    assert_eq!(server.url(), format!("http://{addr}"));

    let took = converge("services after restart", &services.store, wanted_services).await;
    converge("node after restart", &nodes.store, wanted_nodes).await;
    println!("outage lasted {outage:?}; converged {took:?} after restart");
    assert!(
        !services
            .store
            .state()
            .iter()
            .any(|s| s.name_any() == "svc-1"),
        "deleted during the outage"
    );
    assert_eq!(
        nodes.store.state()[0]
            .labels()
            .get("changed")
            .map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        (services.inits(), nodes.inits()),
        (1, 1),
        "resumed from history without a relist"
    );
    eventually("watches reopened", Duration::from_secs(10), || {
        if server.watch_count() == 2 {
            Ok(())
        } else {
            Err(server.watch_count())
        }
    })
    .await;
}

#[tokio::test]
async fn ten_thousand_services_and_slices_reflect_in_pages() {
    const N: usize = 10_000;
    let server = ApiServer::start(loopback());
    let services: Vec<Service> = (0..N)
        .map(|i| service(&format!("ns-{}", i % 10), &format!("svc{i}"), &[]))
        .collect();
    let slices: Vec<EndpointSlice> = (0..N)
        .map(|i| slice(&format!("ns-{}", i % 10), &format!("svc{i}-abcde"), &[]))
        .collect();
    let start = Instant::now();
    server.apply_many(services, slices);
    let applied = start.elapsed();

    let client = client(&server);
    let start = Instant::now();
    let services = Reflected::start(
        Api::<Service>::all(client.clone()),
        watcher::Config::default()
            .labels(NOT_OTHER_PROXY)
            .page_size(500),
    );
    let slices = Reflected::start(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default()
            .labels(NOT_HEADLESS)
            .page_size(500),
    );
    let check = |count: usize| if count == N { Ok(()) } else { Err(count) };
    eventually("10k services", Duration::from_secs(60), || {
        check(services.store.state().len())
    })
    .await;
    eventually("10k slices", Duration::from_secs(60), || {
        check(slices.store.state().len())
    })
    .await;
    let reflected = start.elapsed();
    println!("apply_many of {N} + {N}: {applied:?}; both reflectors complete: {reflected:?}");

    assert_eq!(
        keys::<Service>(services.store.state()),
        keys::<Service>(server.services())
    );
    let pages = list_requests(&server, "/api/v1/services");
    assert_eq!(pages.len(), N / 500, "{:?}", &pages[..3.min(pages.len())]);
    assert!(pages.iter().all(|r| r.contains("limit=500")));
    assert_eq!(
        list_requests(&server, "/apis/discovery.k8s.io/v1/endpointslices").len(),
        N / 500
    );
    assert!(
        reflected < Duration::from_secs(30),
        "too slow: {reflected:?}"
    );
}
