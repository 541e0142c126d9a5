//! End to end: traffic policies as seen from pods, and healthCheckNodePort.
//! (Traffic arriving from outside the node, at XDP, is not covered here.)

mod lab;

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use lab::{http_get, slice_yaml, Lab, BACKEND_PORT, NODE_NAME};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const TCP: &[(&str, &str, u16)] = &[("tcp", "TCP", 80)];

/// An endpoint on this node or on another one.
fn ep(ip: Ipv4Addr, node: &str, ready: bool, terminating: bool) -> String {
    format!(
        "  - addresses: [{ip}]\n    conditions: {{ready: {ready}, serving: true, terminating: {terminating}}}\n    nodeName: {node}\n"
    )
}

fn slice(service: &str, endpoints: &[String]) -> String {
    let mut y = slice_yaml(service, &format!("{service}-1"), TCP, &[])
        .replace("endpoints: []\n", "endpoints:\n");
    for e in endpoints {
        y.push_str(e);
    }
    y
}

/// A Service of `kind` with the given extra spec lines.
fn service(name: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: lab\nspec:\n  clusterIP: {VIP}\n  clusterIPs: [{VIP}]\n{spec_extra}  ports:\n    - name: tcp\n      protocol: TCP\n      port: 80\n      targetPort: {BACKEND_PORT}\n      nodePort: 30080\n"
    )
}

/// This node, with the client pod's gateway as its InternalIP.
fn node_yaml(lab: &Lab) -> String {
    let gateway = {
        let o = lab.pod("c").ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: {gateway}}}\n"
    )
}

fn lab(manifest: impl Fn(&Lab) -> String) -> Lab {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c", "b1", "b2"]);
    lab.start_servers(&["b1", "b2"]);
    lab.write_manifest("node.yaml", &node_yaml(&lab));
    lab.write_manifest("svc.yaml", &manifest(&lab));
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    lab
}

fn backends_reached(lab: &Lab, to: SocketAddrV4, n: usize) -> BTreeSet<String> {
    lab.tcp_hellos("c", to, n)
        .into_iter()
        .map(|h| h.expect("connection").backend)
        .collect()
}

#[test]
fn internal_traffic_policy_local_uses_local_endpoints_and_drops_without_them() {
    let lab = lab(|lab| {
        format!(
            "{}---\n{}",
            service("itp", "  type: ClusterIP\n  internalTrafficPolicy: Local\n"),
            slice(
                "itp",
                &[
                    ep(lab.pod("b1").ip, NODE_NAME, true, false),
                    ep(lab.pod("b2").ip, "node-b", true, false)
                ]
            )
        )
    });
    let reached = backends_reached(&lab, SocketAddrV4::new(VIP, 80), 30);
    assert_eq!(
        reached,
        BTreeSet::from(["b1".to_owned()]),
        "only the local endpoint"
    );

    // No local endpoint: dropped silently, the client times out (no RST, no ICMP).
    let yaml = format!(
        "{}---\n{}",
        service("itp", "  type: ClusterIP\n  internalTrafficPolicy: Local\n"),
        slice("itp", &[ep(lab.pod("b2").ip, "node-b", true, false)])
    );
    lab.write_manifest("svc.yaml", &yaml);
    lab.wait_maps("local set empty", Duration::from_secs(5), |m| {
        proxy_userspace::inspect::services(m)
            .iter()
            .any(|s| s.port == 80 && s.backends.is_empty())
    });
    let started = Instant::now();
    let result = lab.pod("c").netns.run(|| {
        TcpStream::connect_timeout(
            &SocketAddrV4::new(VIP, 80).into(),
            Duration::from_millis(1500),
        )
    });
    let err = result.expect_err("must not connect");
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ),
        "expected a silent drop (timeout), got {err} after {:?}",
        started.elapsed()
    );
    let status = lab.kproxy_cli(&["status", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        json["counters"]["drop_no_local_endpoints"]
            .as_u64()
            .unwrap()
            >= 1,
        "{json}"
    );
}

#[test]
fn pods_reaching_a_nodeport_get_cluster_behaviour_even_with_external_policy_local() {
    let lab = lab(|lab| {
        format!(
            "{}---\n{}",
            service("np", "  type: NodePort\n  externalTrafficPolicy: Local\n"),
            slice(
                "np",
                &[
                    ep(lab.pod("b1").ip, NODE_NAME, true, false),
                    ep(lab.pod("b2").ip, "node-b", true, false)
                ]
            )
        )
    });
    let node_ip = {
        let o = lab.pod("c").ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    };
    let reached = backends_reached(&lab, SocketAddrV4::new(node_ip, 30080), 40);
    assert_eq!(
        reached,
        BTreeSet::from(["b1".to_owned(), "b2".to_owned()]),
        "the short-circuit uses the cluster set"
    );
    // The external scope (for traffic from outside) holds only the local set.
    let maps = lab.maps();
    let external: Vec<_> = proxy_userspace::inspect::services(&maps)
        .into_iter()
        .filter(|s| s.scope == "external" && s.port == 30080)
        .collect();
    assert_eq!(external.len(), 1, "{external:?}");
    assert_eq!(external[0].backends.len(), 1);
    // Node addresses never get a VIP marker (other ports of the node stay
    // reachable), only the address marker every frontend address has.
    let node_addr = proxy_common::ipv4_mapped(node_ip.octets());
    assert!(!maps
        .services
        .contains_key(&proxy_common::ServiceKey::vip_marker(node_addr)));
    assert!(maps
        .services
        .contains_key(&proxy_common::ServiceKey::address_marker(node_addr)));
}

#[test]
fn health_check_node_port_reports_local_endpoints() {
    const HC: u16 = 32000;
    let lb = |extra: &str| {
        service("lb", &format!("  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {HC}\n{extra}"))
    };
    let lab = lab(|lab| {
        format!(
            "{}---\n{}",
            lb(""),
            slice("lb", &[ep(lab.pod("b1").ip, NODE_NAME, true, false)])
        )
    });
    let hc = SocketAddrV4::new(Ipv4Addr::LOCALHOST, HC);
    let wait = |status: u16| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((code, body)) = http_get(&lab, hc, "/") {
                if code == status {
                    return serde_json::from_str(&body).unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "health check never answered {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let body = wait(200);
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "lab", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );

    // Only terminating locally: 503 with 0, while traffic still flows.
    let yaml = format!(
        "{}---\n{}",
        lb(""),
        slice("lb", &[ep(lab.pod("b1").ip, NODE_NAME, false, true)])
    );
    lab.write_manifest("svc.yaml", &yaml);
    let body = wait(503);
    assert_eq!(body["localEndpoints"], 0);
    assert!(lab
        .tcp_hellos("c", SocketAddrV4::new(VIP, 80), 3)
        .iter()
        .all(|h| h.is_ok()));

    // The endpoint on another node only: 503.
    let yaml = format!(
        "{}---\n{}",
        lb(""),
        slice("lb", &[ep(lab.pod("b2").ip, "node-b", true, false)])
    );
    lab.write_manifest("svc.yaml", &yaml);
    let body = wait(503);
    assert_eq!(body["localEndpoints"], 0);

    // Policy Cluster: no health check port any more.
    let cluster = service(
        "lb",
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: Cluster\n  healthCheckNodePort: {HC}\n"
        ),
    );
    lab.write_manifest(
        "svc.yaml",
        &format!(
            "{cluster}---\n{}",
            slice("lb", &[ep(lab.pod("b1").ip, NODE_NAME, true, false)])
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&lab, hc, "/").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the health check port stayed open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
