//! End to end, two nodes: traffic from outside the cluster (NodePort,
//! LoadBalancer ingress IPs, externalIPs, arriving at XDP/tc on `ext0`) and
//! traffic between nodes (ClusterIP to a backend on the other node,
//! traffic policies, topology hints, hairpin). See `cluster/mod.rs` for the
//! topology: clients 198.18.100.21/.22, node-a 198.18.100.11 with pods
//! a1/a2, node-b 198.18.100.12 with pods b1/b2; 198.18.200.0/24 (LB IPs,
//! externalIPs) is routed from the clients via node-a.

mod cluster;
mod lab;

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use cluster::{
    frontends_at, maps_mention, service_with_endpoints, wait_until, Cluster, Endpoint, Outcome,
    Port, ServiceSpec, CLIENT_1, CLIENT_1_IP, CLIENT_2, NODE_A, NODE_A_IP, NODE_B, NODE_B_IP,
    PROBE_TIMEOUT,
};
use lab::Hello;

const SYNC: Duration = Duration::from_secs(5);

fn cluster_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, last)
}

fn lb_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 200, last)
}

/// Pods a1, a2 on node-a and b1, b2 on node-b; servers in `servers`;
/// `svc.yaml` from `manifest`; both kprocesses started (with `xdp_mode`)
/// and ready.
fn up_with(xdp_mode: &str, servers: &[&str], manifest: impl FnOnce(&Cluster) -> String) -> Cluster {
    let mut c = Cluster::new(env!("CARGO_BIN_EXE_kproxy"), &["a1", "a2"], &["b1", "b2"]);
    c.xdp_mode = Some(xdp_mode.to_owned());
    c.start_servers(servers);
    let yaml = manifest(&c);
    c.write_manifest("svc.yaml", &yaml);
    c.start();
    c
}

fn up(servers: &[&str], manifest: impl FnOnce(&Cluster) -> String) -> Cluster {
    up_with("native", servers, manifest)
}

/// Every attempt answered; the answers.
fn answered(what: &str, results: Vec<io::Result<Hello>>) -> Vec<Hello> {
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("{what}: attempt {i} failed: {e}")))
        .collect()
}

fn backends(hellos: &[Hello]) -> BTreeSet<String> {
    hellos.iter().map(|h| h.backend.clone()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn v4(ip: Ipv4Addr) -> IpAddr {
    IpAddr::V4(ip)
}

/// The node's address on a pod's veth (the pod's default gateway).
fn gateway_of(c: &Cluster, pod: &str) -> Ipv4Addr {
    let o = c.pod(pod).ip.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 1)
}

/// External traffic policy Cluster through `entry` (a node) is source-NATed
/// whatever the backend (SPEC 5), with masquerade semantics: the address of
/// the entry node's interface towards the backend, its side of the pod's
/// veth for a backend on that node, its external address for one on the
/// other node. The client's address never reaches a backend.
fn assert_cluster_policy_sources(c: &Cluster, entry: &str, client_ip: Ipv4Addr, hellos: &[Hello]) {
    let entry_ip = c.node(entry).ip;
    for h in hellos {
        let backend_node = c.pod(&h.backend).node;
        let expected = if backend_node == entry {
            gateway_of(c, &h.backend)
        } else {
            entry_ip
        };
        assert_ne!(h.peer.ip(), v4(client_ip), "{} saw the client", h.backend);
        assert_eq!(
            h.peer.ip(),
            v4(expected),
            "via {entry}: backend {} (on {backend_node}) saw {}",
            h.backend,
            h.peer
        );
    }
}

#[test]
fn lab_wires_two_nodes_pods_and_clients() {
    // The lab itself, without kproxy: pods reach pods on the other node,
    // clients reach the nodes but not the pods, checksum offload is off.
    let mut c = Cluster::new(env!("CARGO_BIN_EXE_kproxy"), &["a1", "a2"], &["b1", "b2"]);
    c.start_servers(&["a1", "b1"]);
    let to_b1 = SocketAddrV4::new(c.pod("b1").ip, lab::BACKEND_PORT);
    let hello = c.tcp_hellos("a2", to_b1, 1).remove(0).expect("a2 -> b1");
    assert_eq!(hello.backend, "b1");
    assert_eq!(hello.peer.ip(), v4(c.pod("a2").ip));
    let to_a1 = SocketAddrV4::new(c.pod("a1").ip, lab::BACKEND_PORT);
    let hello = c.udp_requests("b2", to_a1, 1).remove(0).expect("b2 -> a1");
    assert_eq!(hello.peer.ip(), v4(c.pod("b2").ip));
    // Nothing listens on the node's 8080: the wire works, the node resets.
    let outcome = c.tcp_probe(CLIENT_1, SocketAddrV4::new(NODE_B_IP, 8080), PROBE_TIMEOUT);
    assert!(outcome.is_refused(), "client-1 -> node-b:8080: {outcome}");
    let outcome = c.udp_probe(CLIENT_2, SocketAddrV4::new(NODE_A_IP, 8080), PROBE_TIMEOUT);
    assert!(
        outcome.is_refused(),
        "client-2 -> node-a:8080/udp: {outcome}"
    );
    // Clients have no route to pods.
    let outcome = c.tcp_probe(CLIENT_1, to_b1, PROBE_TIMEOUT);
    assert!(
        matches!(outcome, Outcome::Unreachable(_)),
        "client-1 -> b1: {outcome}"
    );
    let features = |ns: &str, ifname: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ethtool", "-k", ifname])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (ns, ifname) in [
        (&c.client(CLIENT_1).netns, "ext0"),
        (&c.node(NODE_A).netns, "ext0"),
        (&c.node(NODE_B).netns, "ext0"),
        (&c.pod("b1").netns, "lab0"),
    ] {
        let text = features(&ns.name, ifname);
        assert!(
            text.contains("tx-checksumming: off"),
            "{} {ifname}:\n{text}",
            ns.name
        );
    }
    for peer in [NODE_A, NODE_B] {
        let out = std::process::Command::new("ip")
            .args(["-n", &c.bridge.name, "link", "show", "dev", peer])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("xdp"),
            "bridge-side {peer} needs its pass-through XDP program:\n{text}"
        );
    }
}

#[test]
fn nodeport_cluster_policy_reaches_backends_on_both_nodes() {
    let svc = ServiceSpec::new("np", "NodePort", cluster_ip(1))
        .port(Port::tcp(80).node_port(30080))
        .port(Port::udp(80).node_port(30080));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        )
    });
    for entry in [NODE_A, NODE_B] {
        let to = SocketAddrV4::new(c.node(entry).ip, 30080);
        let tcp = answered(&format!("TCP via {entry}"), c.tcp_hellos(CLIENT_1, to, 40));
        assert_eq!(backends(&tcp), set(&["a1", "b1"]), "TCP via {entry}");
        assert_cluster_policy_sources(&c, entry, CLIENT_1_IP, &tcp);

        let udp = answered(
            &format!("UDP via {entry}"),
            c.udp_requests(CLIENT_1, to, 30),
        );
        assert_eq!(backends(&udp), set(&["a1", "b1"]), "UDP via {entry}");
        assert_cluster_policy_sources(&c, entry, CLIENT_1_IP, &udp);
    }
}

#[test]
fn nodeport_local_policy() {
    let svc = ServiceSpec::new("np", "NodePort", cluster_ip(2))
        .etp("Local")
        .port(Port::tcp(80).node_port(30080))
        .port(Port::udp(80).node_port(30080));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(&svc, &[Endpoint::of(c.pod("a1"))])
    });
    // Via node-a (the endpoint's node): reached, client address preserved.
    let to_a = SocketAddrV4::new(NODE_A_IP, 30080);
    for h in answered("TCP via node-a", c.tcp_hellos(CLIENT_1, to_a, 10))
        .into_iter()
        .chain(answered(
            "UDP via node-a",
            c.udp_requests(CLIENT_1, to_a, 5),
        ))
    {
        assert_eq!(h.backend, "a1");
        assert_eq!(h.peer.ip(), v4(CLIENT_1_IP), "no SNAT with policy Local");
    }
    // node-b has the frontend, with no local endpoint for outside traffic.
    c.wait_maps(NODE_B, "node-b's external NodePort frontends", SYNC, |m| {
        let external: Vec<_> = frontends_at(m, NODE_B_IP, 30080)
            .into_iter()
            .filter(|s| s.scope == "external")
            .collect();
        !external.is_empty() && external.iter().all(|s| s.backends.is_empty())
    });
    // Via node-b: dropped silently (no RST, no ICMP).
    let to_b = SocketAddrV4::new(NODE_B_IP, 30080);
    let outcome = c.tcp_probe(CLIENT_1, to_b, PROBE_TIMEOUT);
    assert!(outcome.is_timed_out(), "TCP via node-b: {outcome}");
    let outcome = c.udp_probe(CLIENT_1, to_b, PROBE_TIMEOUT);
    assert!(
        outcome.is_timed_out(),
        "UDP via node-b (no ICMP expected): {outcome}"
    );
}

#[test]
fn health_check_node_port() {
    const HC: u16 = 30999;
    let lb = |policy: &str| {
        ServiceSpec::new("lb", "LoadBalancer", cluster_ip(3))
            .etp(policy)
            .health_check_node_port(HC)
            .port(Port::tcp(80).node_port(30080))
            .ingress(lb_ip(10), None)
    };
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(&lb("Local"), &[Endpoint::of(c.pod("a1"))])
    });
    let hc_a = SocketAddrV4::new(NODE_A_IP, HC);
    let hc_b = SocketAddrV4::new(NODE_B_IP, HC);
    // Polls the health check from client-1 until it answers `status`.
    let wait_status = |addr: SocketAddrV4, status: u16| -> serde_json::Value {
        let mut body = String::new();
        wait_until(
            &format!("{addr} answering {status}"),
            Duration::from_secs(10),
            || match c.http_get(CLIENT_1, addr, "/") {
                Ok((code, text)) if code == status => {
                    body = text;
                    true
                }
                _ => false,
            },
        );
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{addr}: {e}: {body:?}"))
    };

    let body = wait_status(hc_a, 200);
    assert_eq!(body["localEndpoints"], 1, "{body}");
    assert_eq!(
        body["service"],
        serde_json::json!({"namespace": "lab", "name": "lb"})
    );
    let body = wait_status(hc_b, 503);
    assert_eq!(body["localEndpoints"], 0, "{body}");

    // The endpoint starts terminating: node-a fails its health check (the
    // load balancer stops sending new clients), but traffic still flows.
    let terminating = [Endpoint::of(c.pod("a1")).terminating()];
    c.write_manifest(
        "svc.yaml",
        &service_with_endpoints(&lb("Local"), &terminating),
    );
    let body = wait_status(hc_a, 503);
    assert_eq!(body["localEndpoints"], 0, "{body}");
    let vip = SocketAddrV4::new(lb_ip(10), 80);
    for h in answered("TCP to the LB IP", c.tcp_hellos(CLIENT_1, vip, 5)) {
        assert_eq!(h.backend, "a1");
        assert_eq!(h.peer.ip(), v4(CLIENT_1_IP));
    }

    // Policy Cluster: no health check server at all (even with the field
    // still set).
    c.write_manifest(
        "svc.yaml",
        &service_with_endpoints(&lb("Cluster"), &[Endpoint::of(c.pod("a1"))]),
    );
    for addr in [hc_a, hc_b] {
        wait_until(
            &format!("{addr} refusing connections"),
            Duration::from_secs(10),
            || {
                matches!(c.http_get(CLIENT_1, addr, "/"),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
            },
        );
    }
}

#[test]
fn load_balancer_source_ranges() {
    let svc = ServiceSpec::new("lb", "LoadBalancer", cluster_ip(4))
        .port(Port::tcp(80).node_port(30084))
        .port(Port::udp(80).node_port(30084))
        .source_range("198.18.100.21/32")
        .ingress(lb_ip(11), None);
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        )
    });
    let vip = SocketAddrV4::new(lb_ip(11), 80);
    answered("client-1 to the LB IP", c.tcp_hellos(CLIENT_1, vip, 5));
    answered(
        "client-1 to the LB IP (UDP)",
        c.udp_requests(CLIENT_1, vip, 3),
    );
    // Outside the ranges: dropped, not rejected.
    let outcome = c.tcp_probe(CLIENT_2, vip, PROBE_TIMEOUT);
    assert!(
        outcome.is_timed_out(),
        "client-2 TCP to the LB IP: {outcome}"
    );
    let outcome = c.udp_probe(CLIENT_2, vip, PROBE_TIMEOUT);
    assert!(
        outcome.is_timed_out(),
        "client-2 UDP to the LB IP: {outcome}"
    );
    // The ranges never apply to NodePorts.
    for client in [CLIENT_1, CLIENT_2] {
        for entry in [NODE_A_IP, NODE_B_IP] {
            let to = SocketAddrV4::new(entry, 30084);
            answered(
                &format!("{client} to the NodePort {to}"),
                c.tcp_hellos(client, to, 3),
            );
        }
    }
}

#[test]
fn load_balancer_ip_mode_and_node_ports() {
    let proxied = ServiceSpec::new("proxied", "LoadBalancer", cluster_ip(5))
        .port(Port::tcp(80).node_port(30085))
        .ingress(lb_ip(12), Some("Proxy"));
    let no_node_ports = ServiceSpec::new("direct", "LoadBalancer", cluster_ip(6))
        .allocate_load_balancer_node_ports(false)
        .port(Port::tcp(80))
        .ingress(lb_ip(13), None);
    let c = up(&["a1", "b1"], |c| {
        let eps = [Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))];
        format!(
            "{}---\n{}",
            service_with_endpoints(&proxied, &eps),
            service_with_endpoints(&no_node_ports, &eps)
        )
    });
    for node in [NODE_A, NODE_B] {
        let n = c.node(node);
        let maps = n.maps();
        assert!(
            !maps_mention(&maps, lb_ip(12)),
            "{node}: an ipMode Proxy ingress IP must not be intercepted"
        );
        assert!(
            !frontends_at(&maps, lb_ip(13), 80).is_empty(),
            "{node}: the VIP-mode ingress IP has a frontend"
        );
        // The only NodePort is the Proxy-mode Service's.
        let node_ports: BTreeSet<u16> = proxy_userspace::inspect::services(&maps)
            .into_iter()
            .filter(|s| s.ip == v4(n.ip))
            .map(|s| s.port)
            .collect();
        assert_eq!(node_ports, BTreeSet::from([30085]), "{node}");
    }
    let direct = SocketAddrV4::new(lb_ip(13), 80);
    let hellos = answered("client-1 to the LB IP", c.tcp_hellos(CLIENT_1, direct, 10));
    assert_cluster_policy_sources(&c, NODE_A, CLIENT_1_IP, &hellos);
    // Proxy mode: the load balancer would deliver to the node; nothing
    // answers on the ingress IP itself.
    let outcome = c.tcp_probe(CLIENT_1, SocketAddrV4::new(lb_ip(12), 80), PROBE_TIMEOUT);
    assert!(
        !outcome.is_answered(),
        "the ipMode Proxy ingress IP answered: {outcome}"
    );
    // ... and the Proxy-mode Service's NodePort works.
    answered(
        "client-1 to the NodePort of the Proxy-mode Service",
        c.tcp_hellos(CLIENT_1, SocketAddrV4::new(NODE_B_IP, 30085), 3),
    );
}

#[test]
fn external_ips() {
    let svc = ServiceSpec::new("ext", "ClusterIP", cluster_ip(7))
        .external_ip(lb_ip(20))
        .port(Port::tcp(80))
        .port(Port::udp(80));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        )
    });
    let to = SocketAddrV4::new(lb_ip(20), 80);
    let tcp = answered("TCP to the externalIP", c.tcp_hellos(CLIENT_1, to, 30));
    assert_eq!(backends(&tcp), set(&["a1", "b1"]));
    assert_cluster_policy_sources(&c, NODE_A, CLIENT_1_IP, &tcp);
    let udp = answered("UDP to the externalIP", c.udp_requests(CLIENT_1, to, 10));
    assert_cluster_policy_sources(&c, NODE_A, CLIENT_1_IP, &udp);
}

#[test]
fn hairpin() {
    let svc = ServiceSpec::new("self", "ClusterIP", cluster_ip(8))
        .port(Port::tcp(80))
        .port(Port::udp(80));
    let c = up(&["a1"], |c| {
        service_with_endpoints(&svc, &[Endpoint::of(c.pod("a1"))])
    });
    let to = SocketAddrV4::new(cluster_ip(8), 80);
    let a1 = v4(c.pod("a1").ip);
    for h in answered("a1 to its own Service (TCP)", c.tcp_hellos("a1", to, 5))
        .into_iter()
        .chain(answered(
            "a1 to its own Service (UDP)",
            c.udp_requests("a1", to, 3),
        ))
    {
        assert_eq!(h.backend, "a1");
        assert_ne!(
            h.peer.ip(),
            a1,
            "hairpin traffic must be SNATed, or the pod answers itself directly"
        );
    }
}

#[test]
fn cluster_ip_to_a_backend_on_the_other_node() {
    let svc = ServiceSpec::new("remote", "ClusterIP", cluster_ip(9))
        .port(Port::tcp(80))
        .port(Port::udp(80));
    let c = up(&["b1"], |c| {
        service_with_endpoints(&svc, &[Endpoint::of(c.pod("b1"))])
    });
    let source_nat: Vec<bool> = proxy_userspace::inspect::services(&c.node(NODE_A).maps())
        .into_iter()
        .filter(|s| s.ip == v4(cluster_ip(9)))
        .map(|s| s.source_nat)
        .collect();
    assert_eq!(source_nat, [false, false], "`kproxy services`: TCP and UDP");
    let to = SocketAddrV4::new(cluster_ip(9), 80);
    let a2 = v4(c.pod("a2").ip);
    for h in answered("a2 -> b1 (TCP)", c.tcp_hellos("a2", to, 5))
        .into_iter()
        .chain(answered("a2 -> b1 (UDP)", c.udp_requests("a2", to, 3)))
    {
        assert_eq!(h.backend, "b1");
        assert_eq!(h.peer.ip(), a2, "no SNAT from a pod to a ClusterIP");
    }
}

#[test]
fn internal_traffic_policy_local() {
    let svc = ServiceSpec::new("itp", "ClusterIP", cluster_ip(10))
        .itp("Local")
        .port(Port::tcp(80));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        )
    });
    let to = SocketAddrV4::new(cluster_ip(10), 80);
    for (client, local) in [("a2", "a1"), ("b2", "b1")] {
        let hellos = answered(&format!("{client} (TCP)"), c.tcp_hellos(client, to, 30));
        assert_eq!(backends(&hellos), set(&[local]), "from {client}");
    }
}

#[test]
fn terminating_fallback() {
    let svc =
        ServiceSpec::new("np", "NodePort", cluster_ip(11)).port(Port::tcp(80).node_port(30080));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[
                Endpoint::of(c.pod("a1")).terminating(),
                Endpoint::of(c.pod("b1")).terminating(),
            ],
        )
    });
    for entry in [NODE_A, NODE_B] {
        let to = SocketAddrV4::new(c.node(entry).ip, 30080);
        let hellos = answered(
            &format!("via {entry} with only terminating endpoints"),
            c.tcp_hellos(CLIENT_1, to, 20),
        );
        assert_eq!(backends(&hellos), set(&["a1", "b1"]), "via {entry}");
        assert_cluster_policy_sources(&c, entry, CLIENT_1_IP, &hellos);
    }
}

#[test]
fn topology_hints() {
    let svc =
        ServiceSpec::new("zonal", "NodePort", cluster_ip(12)).port(Port::tcp(80).node_port(30080));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[
                Endpoint::of(c.pod("a1")).hint_zone("zone-a"),
                Endpoint::of(c.pod("b1")).hint_zone("zone-b"),
            ],
        )
    });
    let vip = SocketAddrV4::new(cluster_ip(12), 80);
    for (client, same_zone) in [("a2", "a1"), ("b2", "b1")] {
        let hellos = answered(&format!("{client} (TCP)"), c.tcp_hellos(client, vip, 30));
        assert_eq!(backends(&hellos), set(&[same_zone]), "from {client}");
    }
    // External traffic (policy Cluster) uses the hinted set of the entry node.
    for (entry, same_zone) in [(NODE_A, "a1"), (NODE_B, "b1")] {
        let to = SocketAddrV4::new(c.node(entry).ip, 30080);
        let hellos = answered(&format!("via {entry}"), c.tcp_hellos(CLIENT_1, to, 20));
        assert_eq!(backends(&hellos), set(&[same_zone]), "via {entry}");
        assert_cluster_policy_sources(&c, entry, CLIENT_1_IP, &hellos);
    }
}

#[test]
fn service_changes_type_and_ports() {
    let vip = cluster_ip(13);
    let before = ServiceSpec::new("moving", "NodePort", vip).port(Port::tcp(80).node_port(30081));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &before,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        )
    });
    let eps = [Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))];
    for entry in [NODE_A_IP, NODE_B_IP] {
        answered(
            "the first NodePort",
            c.tcp_hellos(CLIENT_1, SocketAddrV4::new(entry, 30081), 3),
        );
    }

    // New port and nodePort: the old NodePort goes, the new one answers.
    let moved = ServiceSpec::new("moving", "NodePort", vip).port(Port::tcp(81).node_port(30082));
    c.write_manifest("svc.yaml", &service_with_endpoints(&moved, &eps));
    for node in [NODE_A, NODE_B] {
        let ip = c.node(node).ip;
        c.wait_maps(node, "the NodePort moved to 30082", SYNC, |m| {
            frontends_at(m, ip, 30081).is_empty() && !frontends_at(m, ip, 30082).is_empty()
        });
    }
    for entry in [NODE_A_IP, NODE_B_IP] {
        let outcome = c.tcp_probe(CLIENT_1, SocketAddrV4::new(entry, 30081), PROBE_TIMEOUT);
        assert!(
            outcome.is_timed_out() || outcome.is_refused(),
            "the old NodePort on {entry}: {outcome}"
        );
        answered(
            "the new NodePort",
            c.tcp_hellos(CLIENT_1, SocketAddrV4::new(entry, 30082), 3),
        );
    }
    answered(
        "the ClusterIP's new port",
        c.tcp_hellos("a2", SocketAddrV4::new(vip, 81), 3),
    );

    // Type ClusterIP: no NodePort frontend left, the ClusterIP still works.
    let clusterip = ServiceSpec::new("moving", "ClusterIP", vip).port(Port::tcp(81));
    c.write_manifest("svc.yaml", &service_with_endpoints(&clusterip, &eps));
    for node in [NODE_A, NODE_B] {
        let ip = v4(c.node(node).ip);
        c.wait_maps(node, "no NodePort frontends", SYNC, |m| {
            proxy_userspace::inspect::services(m)
                .iter()
                .all(|s| s.ip != ip)
        });
    }
    for entry in [NODE_A_IP, NODE_B_IP] {
        let outcome = c.tcp_probe(CLIENT_1, SocketAddrV4::new(entry, 30082), PROBE_TIMEOUT);
        assert!(
            outcome.is_timed_out() || outcome.is_refused(),
            "the NodePort on {entry} after the type change: {outcome}"
        );
    }
    for client in ["a2", "b2"] {
        answered(
            &format!("{client} to the ClusterIP"),
            c.tcp_hellos(client, SocketAddrV4::new(vip, 81), 3),
        );
    }
}

#[test]
fn xdp_mode_off_uses_tc() {
    let svc = ServiceSpec::new("np", "NodePort", cluster_ip(14))
        .port(Port::tcp(80).node_port(30080))
        .port(Port::udp(80).node_port(30080));
    let c = up_with("off", &["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        )
    });
    for entry in [NODE_A, NODE_B] {
        let to = SocketAddrV4::new(c.node(entry).ip, 30080);
        let tcp = answered(&format!("TCP via {entry}"), c.tcp_hellos(CLIENT_1, to, 30));
        assert_eq!(backends(&tcp), set(&["a1", "b1"]), "TCP via {entry}");
        assert_cluster_policy_sources(&c, entry, CLIENT_1_IP, &tcp);
        let udp = answered(
            &format!("UDP via {entry}"),
            c.udp_requests(CLIENT_1, to, 10),
        );
        assert_cluster_policy_sources(&c, entry, CLIENT_1_IP, &udp);
    }
}

#[test]
fn external_frontends_without_endpoints_reject() {
    // SPEC section 3: no usable endpoint at all is a REJECT, from outside
    // too: the XDP program hands the packet to tc, which answers with ICMP
    // port unreachable for NodePorts and LoadBalancer IPs alike.
    let svc = ServiceSpec::new("empty", "LoadBalancer", cluster_ip(20))
        .ingress(lb_ip(30), None)
        .port(Port::tcp(80).node_port(30090))
        .port(Port::udp(80).node_port(30090));
    let c = up(&[], |_| service_with_endpoints(&svc, &[]));
    c.wait_maps(NODE_A, "the empty Service's frontends", SYNC, |m| {
        !frontends_at(m, lb_ip(30), 80).is_empty()
    });
    for to in [
        SocketAddrV4::new(NODE_A_IP, 30090),
        SocketAddrV4::new(lb_ip(30), 80),
    ] {
        let start = std::time::Instant::now();
        let outcome = c.tcp_probe(CLIENT_1, to, PROBE_TIMEOUT);
        assert!(outcome.is_refused(), "TCP to {to}: {outcome}");
        assert!(
            start.elapsed() < PROBE_TIMEOUT,
            "TCP to {to}: refused only after {:?}",
            start.elapsed()
        );
        let outcome = c.udp_probe(CLIENT_1, to, PROBE_TIMEOUT);
        assert!(outcome.is_refused(), "UDP to {to}: {outcome}");
    }
    let rejected = c.node(NODE_A).stat(proxy_common::stat::REJECT_NO_ENDPOINTS);
    assert!(rejected >= 4, "node-a counted {rejected} rejects");
}

#[test]
fn a_port_unreachable_from_a_remote_backend_reaches_the_outside_client() {
    // SPEC 7: ICMP errors about a NATed flow are reverse-NATed, here a
    // source-NATed one: node-a sends the datagram to b1 on node-b from its
    // own address and a SNAT port; b1 has nothing on the port and answers
    // port unreachable to that address and port, which node-a translates
    // and routes to the client (whose connected socket is refused).
    // The same with the backend on node-a itself (a1), source-NATed too
    // (policy Cluster): its error is translated at node-a's pod hook.
    let remote =
        ServiceSpec::new("closed", "NodePort", cluster_ip(22)).port(Port::udp(53).node_port(30054));
    let local = ServiceSpec::new("closed-local", "NodePort", cluster_ip(24))
        .port(Port::udp(53).node_port(30055));
    let c = up(&[], |c| {
        format!(
            "{}---\n{}",
            service_with_endpoints(&remote, &[Endpoint::of(c.pod("b1"))]),
            service_with_endpoints(&local, &[Endpoint::of(c.pod("a1"))])
        )
    });
    for port in [30054, 30055] {
        let to = SocketAddrV4::new(NODE_A_IP, port);
        let before = c.node(NODE_A).stat(proxy_common::stat::ICMP_REV_NAT);
        let outcome = c.udp_probe(CLIENT_1, to, PROBE_TIMEOUT);
        assert!(outcome.is_refused(), "UDP to {to}: {outcome}");
        let translated = c.node(NODE_A).stat(proxy_common::stat::ICMP_REV_NAT) - before;
        assert!(
            translated >= 1,
            "node-a translated {translated} ICMP errors"
        );
    }
}

#[test]
fn fragmented_datagrams_through_a_nodeport_to_a_remote_backend() {
    // SPEC 7: a 2000-byte UDP datagram through a Service arrives intact,
    // here through a NodePort to a backend on the other node (DNAT + SNAT);
    // the 3000-byte answer comes back fragmented and whole. XDP hands the
    // fragments to tc, which translates the later ones like the first.
    let svc =
        ServiceSpec::new("frag", "NodePort", cluster_ip(21)).port(Port::udp(53).node_port(30053));
    let c = up(&["b1"], |c| {
        service_with_endpoints(&svc, &[Endpoint::of(c.pod("b1"))])
    });
    let to = SocketAddrV4::new(NODE_A_IP, 30053);
    let (sent, got) = c.netns(CLIENT_1).run(|| lab::big_udp_request(to));
    let text = String::from_utf8_lossy(&got);
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields.first().copied(), Some("b1"));
    assert_eq!(
        fields.get(1).map(|p| p.starts_with("198.18.100.11:")),
        Some(true),
        "SNAT: {text:.80}"
    );
    assert_eq!(
        fields.get(2).copied(),
        Some(sent.to_string().as_str()),
        "backend got: {text:.80}"
    );
    assert_eq!(
        got.len(),
        3000,
        "the 3000-byte reply came back fragmented and whole"
    );
    assert!(c.node(NODE_A).stat(proxy_common::stat::FRAGMENT_NAT) >= 2);
}

#[test]
fn the_node_itself_reaches_its_own_node_ports_with_cluster_behaviour() {
    // SPEC 4: the host of a node reaching its own external frontends gets
    // Cluster behaviour (kube-proxy's short-circuit), even with policy
    // Local and no local endpoint: node-b reaches a1 on node-a.
    let svc = ServiceSpec::new("np", "NodePort", cluster_ip(22))
        .etp("Local")
        .port(Port::tcp(80).node_port(30080))
        .port(Port::udp(80).node_port(30080));
    let c = up(&["a1"], |c| {
        service_with_endpoints(&svc, &[Endpoint::of(c.pod("a1"))])
    });
    let to = SocketAddrV4::new(NODE_B_IP, 30080);
    let tcp = answered("node-b to its own NodePort", c.tcp_hellos(NODE_B, to, 5));
    let udp = answered(
        "node-b to its own NodePort (UDP)",
        c.udp_requests(NODE_B, to, 5),
    );
    for h in tcp.iter().chain(&udp) {
        assert_eq!(h.backend, "a1");
    }
    // From outside, node-b still drops (policy Local, no local endpoint).
    let outcome = c.tcp_probe(CLIENT_1, to, PROBE_TIMEOUT);
    assert!(outcome.is_timed_out(), "client-1 via node-b: {outcome}");
}

#[test]
fn off_cluster_clients_reach_a_cluster_ip_source_nated() {
    // SPEC 5: a client outside the cluster whose router sends the Service
    // range to node-a reaches the ClusterIP; both backends (local and
    // remote) see node-a's address, so their replies come back through it.
    let svc = ServiceSpec::new("web", "ClusterIP", cluster_ip(23)).port(Port::tcp(80));
    let c = up(&["a1", "b1"], |c| {
        service_with_endpoints(
            &svc,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        )
    });
    c.netns(CLIENT_1).exec(
        "ip",
        &["route", "add", "198.19.0.0/24", "via", "198.18.100.11"],
    );
    let to = SocketAddrV4::new(cluster_ip(23), 80);
    let hellos = answered("client-1 to the ClusterIP", c.tcp_hellos(CLIENT_1, to, 30));
    assert_eq!(backends(&hellos), set(&["a1", "b1"]));
    // Masquerade semantics, as for external traffic with policy Cluster.
    assert_cluster_policy_sources(&c, NODE_A, CLIENT_1_IP, &hellos);
    // Without the route, the ClusterIP is not reachable from outside at all.
    let outcome = c.tcp_probe(CLIENT_2, to, PROBE_TIMEOUT);
    assert!(
        !matches!(outcome, Outcome::Answered(_)),
        "client-2: {outcome}"
    );
}

#[test]
fn masquerade_all_source_nates_pods_flows_to_cluster_ips() {
    // SPEC 5, `--masquerade-all`: a pod's flows to a ClusterIP are
    // source-NATed to its node like kube-proxy's masqueradeAll, to the
    // backend on its own node (which sees the node's side of its veth)
    // and to the one on the other node (which sees node-a's address and
    // answers through node-a's external interface). Both ways answer: TCP,
    // UDP, ICMP errors, fragmented datagrams, hairpin; pods reaching each
    // other directly keep their addresses.
    let svc = ServiceSpec::new("masq", "ClusterIP", cluster_ip(30))
        .port(Port::tcp(80))
        .port(Port::udp(80));
    let mut c = Cluster::new(
        env!("CARGO_BIN_EXE_kproxy"),
        &["a1", "a2", "a3"],
        &["b1", "b2"],
    );
    c.xdp_mode = Some("native".to_owned());
    c.kproxy_args = vec!["--masquerade-all".to_owned()];
    c.start_servers(&["a1", "b1"]);
    // No server runs in a3 and b2: their ports answer ICMP port unreachable.
    let closed_remote =
        ServiceSpec::new("masq-closed", "ClusterIP", cluster_ip(31)).port(Port::udp(53));
    let closed_local =
        ServiceSpec::new("masq-closed-local", "ClusterIP", cluster_ip(32)).port(Port::udp(53));
    let only_remote = ServiceSpec::new("masq-b1", "ClusterIP", cluster_ip(33)).port(Port::udp(80));
    let only_local = ServiceSpec::new("masq-a1", "ClusterIP", cluster_ip(34)).port(Port::udp(80));
    let yaml = [
        service_with_endpoints(
            &svc,
            &[Endpoint::of(c.pod("a1")), Endpoint::of(c.pod("b1"))],
        ),
        service_with_endpoints(&closed_remote, &[Endpoint::of(c.pod("b2"))]),
        service_with_endpoints(&closed_local, &[Endpoint::of(c.pod("a3"))]),
        service_with_endpoints(&only_remote, &[Endpoint::of(c.pod("b1"))]),
        service_with_endpoints(&only_local, &[Endpoint::of(c.pod("a1"))]),
    ]
    .join("---\n");
    c.write_manifest("svc.yaml", &yaml);
    c.start();
    // `kproxy services` shows it.
    let listed: Vec<_> = proxy_userspace::inspect::services(&c.node(NODE_A).maps())
        .into_iter()
        .filter(|s| s.ip == v4(cluster_ip(30)))
        .map(|s| (s.scope, s.source_nat))
        .collect();
    assert_eq!(
        listed,
        [("internal", true), ("internal", true)],
        "TCP and UDP"
    );
    let to = SocketAddrV4::new(cluster_ip(30), 80);
    let a2 = c.pod("a2").ip;
    let tcp = answered("a2 -> the ClusterIP (TCP)", c.tcp_hellos("a2", to, 24));
    let udp = answered("a2 -> the ClusterIP (UDP)", c.udp_requests("a2", to, 24));
    for hellos in [&tcp, &udp] {
        assert_eq!(backends(hellos), set(&["a1", "b1"]));
        assert_cluster_policy_sources(&c, NODE_A, a2, hellos);
    }
    // SPEC 7 on these flows: ICMP errors about them reach the pod, which
    // is refused, not left to time out, and fragmented datagrams arrive
    // whole both ways (the backends answer 2000 bytes with 3000).
    for vip in [cluster_ip(31), cluster_ip(32)] {
        let to = SocketAddrV4::new(vip, 53);
        let before = c.node(NODE_A).stat(proxy_common::stat::ICMP_REV_NAT);
        let outcome = c.udp_probe("a2", to, PROBE_TIMEOUT);
        assert!(outcome.is_refused(), "UDP to {to}: {outcome}");
        let translated = c.node(NODE_A).stat(proxy_common::stat::ICMP_REV_NAT) - before;
        assert!(
            translated >= 1,
            "node-a translated {translated} ICMP errors"
        );
    }
    for (vip, backend, node_address) in [
        (cluster_ip(33), "b1", c.node(NODE_A).ip),
        (cluster_ip(34), "a1", gateway_of(&c, "a1")),
    ] {
        let to = SocketAddrV4::new(vip, 80);
        let (sent, got) = c.netns("a2").run(|| lab::big_udp_request(to));
        let text = String::from_utf8_lossy(&got);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(fields.first().copied(), Some(backend), "{text:.80}");
        assert_eq!(
            fields
                .get(1)
                .map(|p| p.starts_with(&format!("{node_address}:"))),
            Some(true),
            "{backend} saw: {text:.80}"
        );
        assert_eq!(fields.get(2).copied(), Some(sent.to_string().as_str()));
        assert_eq!(
            got.len(),
            3000,
            "{backend}: the 3000-byte reply came back whole"
        );
    }
    // Hairpin too goes to the node's address, not to the Service's.
    let a1 = c.pod("a1").ip;
    let hairpin = answered("a1 -> the ClusterIP", c.tcp_hellos("a1", to, 24));
    assert_eq!(backends(&hairpin), set(&["a1", "b1"]));
    assert_cluster_policy_sources(&c, NODE_A, a1, &hairpin);
    let direct = SocketAddrV4::new(c.pod("b1").ip, lab::BACKEND_PORT);
    let hello = c.tcp_hellos("a2", direct, 1).remove(0).expect("a2 -> b1");
    assert_eq!(hello.peer.ip(), v4(a2), "no Service, no SNAT");
}
