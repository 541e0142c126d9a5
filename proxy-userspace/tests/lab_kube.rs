//! End to end with `--source kube`: the real kproxy binary and the real
//! kube-rs client, over HTTP, against the API server double (tests/apiserver)
//! listening inside the lab's node namespace.

mod apiserver;
mod lab;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lab::{Lab, BACKEND_PORT, NODE_NAME};
use proxy_userspace::sync::MapContents;
use serde_json::json;

const API_ADDR: &str = "127.0.0.1:6443";

fn service(name: &str, vip: Ipv4Addr) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "lab"},
        "spec": {"type": "ClusterIP", "clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                 "ports": [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": BACKEND_PORT}]}
    }))
    .unwrap()
}

fn slice(service: &str, name: &str, ips: &[Ipv4Addr]) -> EndpointSlice {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": NODE_NAME}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "lab", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "protocol": "TCP", "port": BACKEND_PORT}],
        "endpoints": endpoints
    }))
    .unwrap()
}

fn node() -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": "zone-a"}}
    }))
    .unwrap()
}

/// A lab whose kproxy reads the API server double.
fn kube_lab(pods: &[&str], servers: &[&str], setup: impl FnOnce(&ApiServer)) -> (Lab, ApiServer) {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), pods);
    lab.start_servers(servers);
    let api = ApiServer::start(
        lab.node
            .listener_factory(API_ADDR.parse::<SocketAddr>().unwrap()),
    );
    api.apply_node(node());
    setup(&api);
    let kubeconfig = lab.root.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    lab.source = Some("kube".into());
    lab.kproxy_args = vec!["--kubeconfig".into(), kubeconfig.display().to_string()];
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    (lab, api)
}

fn has_frontend(maps: &MapContents, vip: Ipv4Addr, backends: usize) -> bool {
    proxy_userspace::inspect::services(maps)
        .iter()
        .any(|s| s.ip == std::net::IpAddr::V4(vip) && s.port == 80 && s.backends.len() == backends)
}

fn no_frontend(maps: &MapContents, vip: Ipv4Addr) -> bool {
    !proxy_userspace::inspect::services(maps)
        .iter()
        .any(|s| s.ip == std::net::IpAddr::V4(vip))
}

const VIP_A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);

#[test]
fn a_service_created_through_the_api_serves_traffic_within_two_seconds() {
    let (lab, api) = kube_lab(&["c", "b1", "b2"], &["b1", "b2"], |_| {});
    let created = Instant::now();
    api.apply_service(service("echo", VIP_A));
    api.apply_endpoint_slice(slice(
        "echo",
        "echo-1",
        &[lab.pod("b1").ip, lab.pod("b2").ip],
    ));
    let programmed = lab.wait_maps("echo programmed", Duration::from_secs(5), |m| {
        has_frontend(m, VIP_A, 2)
    });
    let hellos = lab.tcp_hellos("c", SocketAddrV4::new(VIP_A, 80), 20);
    let reached = created.elapsed();
    println!(
        "Service created -> programmed in {programmed:?}, -> traffic flowing after {reached:?}"
    );
    assert!(programmed < Duration::from_secs(2), "took {programmed:?}");
    assert!(hellos.iter().all(|h| h.is_ok()), "{hellos:?}");
    // The reflectors page their lists and watch with bookmarks.
    let requests = api.requests();
    assert!(requests
        .iter()
        .any(|r| r.contains("/api/v1/services") && r.contains("limit=")));
    assert!(requests
        .iter()
        .any(|r| r.contains("watch=") && r.contains("endpointslices")));
    assert!(requests.iter().any(|r| r
        .contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name")
        || r.contains("labelSelector=!service.kubernetes.io/service-proxy-name")));
}

/// SPEC 1.6: nothing is programmed until the initial lists of Services and
/// EndpointSlices are both complete. With the Services listed and the
/// EndpointSlices refused, a kproxy that programmed anyway would program
/// the Service without endpoints (rejecting its clients).
#[test]
fn nothing_is_programmed_before_both_initial_lists_are_complete() {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c", "b1"]);
    lab.start_servers(&["b1"]);
    let api = ApiServer::start(
        lab.node
            .listener_factory(API_ADDR.parse::<SocketAddr>().unwrap()),
    );
    api.apply_node(node());
    api.apply_service(service("echo", VIP_A));
    api.apply_endpoint_slice(slice("echo", "echo-1", &[lab.pod("b1").ip]));
    api.refuse_collection("endpointslices", true);
    let kubeconfig = lab.root.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    lab.source = Some("kube".into());
    lab.kproxy_args = vec!["--kubeconfig".into(), kubeconfig.display().to_string()];
    lab.start_kproxy();

    // The Services are listed, the slices refused; the sync their list
    // wakes must wait rather than program (a kproxy without the gate would
    // log "synced" there).
    let deadline = Instant::now() + Duration::from_secs(20);
    let after_services = loop {
        let log = lab.kproxy_log_since_start();
        let after = log
            .split_once("initial list complete resource=\"services\"")
            .map(|(_, after)| after.to_owned());
        if let Some(after) =
            after.filter(|a| a.contains("waiting for the initial lists") || a.contains("synced"))
        {
            break after;
        }
        assert!(
            Instant::now() < deadline,
            "no sync attempt after the Services were listed:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !after_services.contains("synced"),
        "a sync ran on a half-loaded world:\n{after_services}"
    );
    assert!(api.requests().iter().any(|r| r.contains("endpointslices")));
    let pinned = proxy_userspace::datapath::PinnedMaps::open(&lab.pin_dir)
        .and_then(|m| m.contents())
        .map(|m| no_frontend(&m, VIP_A));
    assert!(
        pinned.unwrap_or(true),
        "the Service was programmed before its EndpointSlices were listed"
    );

    // Once the list succeeds, the whole world is programmed at once.
    api.refuse_collection("endpointslices", false);
    lab.wait_kproxy_ready();
    lab.wait_maps("echo with its endpoint", Duration::from_secs(10), |m| {
        has_frontend(m, VIP_A, 1)
    });
    let hellos = lab.tcp_hellos("c", SocketAddrV4::new(VIP_A, 80), 5);
    assert!(hellos.iter().all(|h| h.is_ok()), "{hellos:?}");
}

#[test]
fn an_api_outage_keeps_the_datapath_and_changes_apply_after_it() {
    let (lab, api) = kube_lab(&["c", "b1", "b2", "b3"], &["b1", "b2", "b3"], |api| {
        api.apply_service(service("a", VIP_A));
        api.apply_service(service("b", VIP_B));
    });
    let (b1, b2, b3) = (lab.pod("b1").ip, lab.pod("b2").ip, lab.pod("b3").ip);
    api.apply_endpoint_slice(slice("a", "a-1", &[b1, b2]));
    api.apply_endpoint_slice(slice("b", "b-1", &[b3]));
    lab.wait_maps("both programmed", Duration::from_secs(5), |m| {
        has_frontend(m, VIP_A, 2) && has_frontend(m, VIP_B, 1)
    });

    api.stop();
    let outage = Instant::now();
    // Changes made while the API server is away.
    api.delete_service("lab", "b");
    api.delete_endpoint_slice("lab", "b-1");
    api.apply_endpoint_slice(slice("a", "a-1", &[b1, b2, b3]));
    while outage.elapsed() < Duration::from_secs(30) {
        let hellos = lab.tcp_hellos("c", SocketAddrV4::new(VIP_A, 80), 5);
        assert!(
            hellos.iter().all(|h| h.is_ok()),
            "the datapath must keep serving: {hellos:?}"
        );
        assert!(
            has_frontend(&lab.maps(), VIP_B, 1),
            "nothing is removed while the API is away"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    api.restart();
    let back = Instant::now();
    lab.wait_maps(
        "changes applied after the outage",
        Duration::from_secs(60),
        |m| has_frontend(m, VIP_A, 3) && no_frontend(m, VIP_B),
    );
    println!(
        "after a 30 s outage, changes applied {:?} after the API returned",
        back.elapsed()
    );
    let log = lab.kproxy_log_since_start();
    assert!(
        log.contains("watch failed"),
        "the outage should be logged:\n{log}"
    );
}

#[test]
fn a_410_gone_relists_without_dropping_live_entries() {
    let (lab, api) = kube_lab(&["c", "b1"], &["b1"], |api| {
        api.apply_service(service("a", VIP_A));
        api.apply_service(service("b", VIP_B));
    });
    let b1 = lab.pod("b1").ip;
    api.apply_endpoint_slice(slice("a", "a-1", &[b1]));
    api.apply_endpoint_slice(slice("b", "b-1", &[b1]));
    lab.wait_maps("both programmed", Duration::from_secs(5), |m| {
        has_frontend(m, VIP_A, 1) && has_frontend(m, VIP_B, 1)
    });
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| r.contains("/api/v1/services") && !r.contains("watch="))
        .count();

    // B goes away and history is compacted at once: the deletion may only
    // be learnt through the relist.
    api.delete_endpoint_slice("lab", "b-1");
    api.delete_service("lab", "b");
    api.expire_watches();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let maps = lab.maps();
        assert!(
            has_frontend(&maps, VIP_A, 1),
            "a live Service was dropped during the relist"
        );
        let relisted = api
            .requests()
            .iter()
            .filter(|r| r.contains("/api/v1/services") && !r.contains("watch="))
            .count()
            > lists_before;
        if relisted && no_frontend(&maps, VIP_B) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no relist or B not removed after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lab
        .tcp_hellos("c", SocketAddrV4::new(VIP_A, 80), 3)
        .iter()
        .all(|h| h.is_ok()));
}

#[test]
fn ten_thousand_services_with_ten_endpoints_each_are_programmed() {
    const SERVICES: usize = 10_000;
    const ENDPOINTS: usize = 10;
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c"]);
    let api = ApiServer::start(lab.node.listener_factory(API_ADDR.parse().unwrap()));
    api.apply_node(node());
    let mut services = Vec::with_capacity(SERVICES);
    let mut slices = Vec::with_capacity(SERVICES);
    for i in 0..SERVICES {
        // VIPs 198.19.128.0/17, endpoints 198.18.0.0/16: lab ranges only.
        let vip = Ipv4Addr::new(198, 19, 128 + (i / 256) as u8, (i % 256) as u8);
        let name = format!("svc-{i}");
        services.push(service(&name, vip));
        let ips: Vec<Ipv4Addr> = (0..ENDPOINTS)
            .map(|j| {
                let n = (i * ENDPOINTS + j) % 65_536;
                Ipv4Addr::new(198, 18, (n / 256) as u8, (n % 256) as u8)
            })
            .collect();
        slices.push(slice(&name, &format!("{name}-1"), &ips));
    }
    api.apply_many(services, slices);
    let kubeconfig = lab.root.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    lab.source = Some("kube".into());
    lab.kproxy_args = vec!["--kubeconfig".into(), kubeconfig.display().to_string()];

    let started = Instant::now();
    lab.start_kproxy();
    let pid = lab.kproxy_pid().unwrap();
    // Slot 0 and slots, a VIP marker and an address marker per Service.
    let expected_entries = SERVICES * (1 + ENDPOINTS) + 2 * SERVICES;
    let deadline = Instant::now() + Duration::from_secs(120);
    let programmed = loop {
        let log = lab.kproxy_log_since_start();
        if log.contains(&format!("frontends={SERVICES} ")) {
            let maps = lab.maps();
            if maps.services.len() == expected_entries {
                break started.elapsed();
            }
        }
        assert!(
            Instant::now() < deadline,
            "not programmed after 120 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_owned();
    let pages = api
        .requests()
        .iter()
        .filter(|r| r.contains("endpointslices") && r.contains("limit=") && !r.contains("watch="))
        .count();
    println!(
        "{SERVICES} Services x {ENDPOINTS} endpoints: fully programmed {programmed:?} after start \
         (debug build), kproxy peak RSS {peak}, EndpointSlice list pages: {pages}"
    );
    assert!(
        pages >= SERVICES / 500,
        "lists were not paged: {pages} pages"
    );
    let maps = lab.maps();
    assert_eq!(
        proxy_userspace::inspect::services(&maps).len(),
        SERVICES,
        "every Service has its frontend"
    );
}
