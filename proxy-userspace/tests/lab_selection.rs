//! End to end: how new flows pick their backend. Every algorithm of
//! `kproxy.io/lb-algorithm` over >= 1000 new flows, and session affinity.

mod lab;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lab::{service_yaml, slice_yaml, Ep, Hello, Lab};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORTS: &[(&str, &str, u16)] = &[("tcp", "TCP", 80), ("udp", "UDP", 53)];
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];

fn tcp_vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// The echo Service with optional annotation / affinity lines.
fn echo_yaml(
    lab: &Lab,
    algorithm: Option<&str>,
    affinity: Option<u32>,
    backends: &[&str],
) -> String {
    let mut service = service_yaml("echo", VIP, PORTS);
    if let Some(a) = algorithm {
        service = service.replace(
            "  namespace: lab\n",
            &format!("  namespace: lab\n  annotations:\n    kproxy.io/lb-algorithm: {a}\n"),
        );
    }
    if let Some(t) = affinity {
        service = service.replace(
            "spec:\n",
            &format!("spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n"),
        );
    }
    let eps: Vec<Ep> = backends.iter().map(|b| Ep::ready(lab.pod(b).ip)).collect();
    format!(
        "{service}---\n{}",
        slice_yaml("echo", "echo-1", PORTS, &eps)
    )
}

fn lab_with(clients: &[&str], algorithm: Option<&str>, affinity: Option<u32>) -> Lab {
    let mut pods: Vec<&str> = clients.to_vec();
    pods.extend_from_slice(&BACKENDS);
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &pods);
    lab.start_servers(&BACKENDS);
    lab.write_manifest(
        "echo.yaml",
        &echo_yaml(&lab, algorithm, affinity, &BACKENDS),
    );
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    lab
}

fn names(hellos: &[io::Result<Hello>]) -> Vec<String> {
    hellos
        .iter()
        .map(|h| {
            h.as_ref()
                .expect("connection through the VIP")
                .backend
                .clone()
        })
        .collect()
}

fn counts(backends: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for b in backends {
        *out.entry(b.clone()).or_insert(0) += 1;
    }
    out
}

/// Waits until the frontend's slot 0 carries `algorithm`.
fn wait_algorithm(lab: &Lab, algorithm: u8) {
    lab.wait_maps("algorithm programmed", Duration::from_secs(5), |m| {
        m.services
            .iter()
            .any(|(k, v)| k.slot == 0 && k.port == 80 && v.algorithm == algorithm)
    });
}

#[test]
fn random_spreads_within_binomial_bounds() {
    let lab = lab_with(&["c"], Some("random"), None);
    let got = counts(&names(&lab.tcp_hellos("c", tcp_vip(), 1200)));
    println!("random, 1200 flows: {got:?}");
    // Mean 400, sd 16.3: five sd either way.
    for b in BACKENDS {
        let n = got.get(b).copied().unwrap_or(0);
        assert!(
            (318..=482).contains(&n),
            "{b}: {n} outside binomial bounds: {got:?}"
        );
    }
}

#[test]
fn round_robin_is_even_within_one_per_round() {
    let lab = lab_with(&["c"], Some("rr"), None);
    wait_algorithm(&lab, proxy_common::ALG_RR);
    let order = names(&lab.tcp_hellos("c", tcp_vip(), 1002));
    let got = counts(&order);
    println!("rr, 1002 flows: {got:?}");
    for b in BACKENDS {
        assert_eq!(got.get(b), Some(&334), "{got:?}");
    }
    for round in order.chunks(3) {
        let distinct: BTreeSet<&String> = round.iter().collect();
        assert_eq!(distinct.len(), 3, "a round repeated a backend: {round:?}");
    }
}

#[test]
fn source_and_destination_hashing_are_stable() {
    let clients = ["c1", "c2", "c3", "c4"];
    let mut lab = lab_with(&clients, Some("sh"), None);
    wait_algorithm(&lab, proxy_common::ALG_SH);
    let mut chosen = BTreeSet::new();
    for c in clients {
        let got = counts(&names(&lab.tcp_hellos(c, tcp_vip(), 250)));
        println!("sh, 250 flows from {c}: {got:?}");
        assert_eq!(got.len(), 1, "one source, one backend: {got:?}");
        chosen.extend(got.into_keys());
    }
    println!("sh: 4 sources used backends {chosen:?}");

    lab.write_manifest("echo.yaml", &echo_yaml(&lab, Some("dh"), None, &BACKENDS));
    wait_algorithm(&lab, proxy_common::ALG_DH);
    let mut all = BTreeSet::new();
    for c in clients {
        all.extend(counts(&names(&lab.tcp_hellos(c, tcp_vip(), 250))).into_keys());
    }
    println!("dh: 1000 flows to one destination used {all:?}");
    assert_eq!(all.len(), 1, "one destination, one backend: {all:?}");
    let _ = &mut lab;
}

/// lc, sed and nq send new flows away from a backend that holds 20
/// long-lived connections.
#[test]
fn least_connection_schedulers_avoid_the_loaded_backend() {
    for algorithm in ["lc", "sed", "nq"] {
        let lab = lab_with(&["c"], Some(algorithm), None);
        // Only b1 first: it collects 20 long-lived connections.
        lab.write_manifest(
            "echo.yaml",
            &echo_yaml(&lab, Some(algorithm), None, &["b1"]),
        );
        let b1 = lab.pod("b1").ip;
        lab.wait_maps("b1 alone", Duration::from_secs(5), |m| {
            proxy_userspace::inspect::services(m).iter().any(|s| {
                s.port == 80
                    && s.backends.len() == 1
                    && s.backends[0].address.starts_with(&b1.to_string())
            })
        });
        let held: Vec<_> = (0..20)
            .map(|_| {
                lab.tcp_connect("c", tcp_vip())
                    .expect("long-lived connection")
            })
            .collect();
        assert!(held.iter().all(|c| c.hello.backend == "b1"));
        lab.write_manifest(
            "echo.yaml",
            &echo_yaml(&lab, Some(algorithm), None, &BACKENDS),
        );
        lab.wait_maps("all three", Duration::from_secs(5), |m| {
            proxy_userspace::inspect::services(m)
                .iter()
                .any(|s| s.port == 80 && s.backends.len() == 3)
        });
        let got = counts(&names(&lab.tcp_hellos("c", tcp_vip(), 1000)));
        println!("{algorithm}, 1000 short flows with b1 holding 20 long ones: {got:?}");
        let to_b1 = got.get("b1").copied().unwrap_or(0);
        assert!(
            to_b1 < 20,
            "{algorithm} sent {to_b1} new flows to the loaded backend: {got:?}"
        );
        // lc and sed break ties uniformly: about 500 each. nq takes the
        // first idle backend from a random start (as IPVS takes the first
        // in its list), so the one after the loaded b1 gets the starts at
        // b1 too: about 667 and 333, and a bar at 300 would fail about one
        // run in 80 (the standard deviation over 1000 flows is 15).
        let least = if algorithm == "nq" { 250 } else { 300 };
        assert!(
            got.get("b2").is_some_and(|n| *n > least) && got.get("b3").is_some_and(|n| *n > least),
            "{algorithm}: {got:?}"
        );
        drop(held);
    }
}

#[test]
fn maglev_spreads_and_established_flows_keep_their_backend_across_a_change() {
    let lab = lab_with(&["c"], Some("maglev"), None);
    wait_algorithm(&lab, proxy_common::ALG_MAGLEV);
    let maps = lab.maps();
    let size = maps
        .services
        .iter()
        .find(|(k, v)| k.slot == 0 && k.port == 80 && v.maglev_size > 0)
        .map(|(_, v)| v.maglev_size)
        .expect("a Maglev table");
    assert!(size >= 65_537, "table size {size} below the minimum");
    let got = counts(&names(&lab.tcp_hellos("c", tcp_vip(), 1200)));
    println!("maglev (table {size}), 1200 flows: {got:?}");
    for b in BACKENDS {
        let n = got.get(b).copied().unwrap_or(0);
        assert!((300..=500).contains(&n), "{b}: {n}: {got:?}");
    }

    let mut held: Vec<_> = (0..30)
        .map(|_| lab.tcp_connect("c", tcp_vip()).unwrap())
        .collect();
    lab.write_manifest(
        "echo.yaml",
        &echo_yaml(&lab, Some("maglev"), None, &["b1", "b2"]),
    );
    lab.wait_maps("table rebuilt", Duration::from_secs(5), |m| {
        proxy_userspace::inspect::services(m)
            .iter()
            .any(|s| s.port == 80 && s.backends.len() == 2)
    });
    for (i, conn) in held.iter_mut().enumerate() {
        let backend = conn.hello.backend.clone();
        assert_eq!(
            conn.echo(&format!("m{i}")).unwrap(),
            format!("{backend} m{i}")
        );
    }
    let got = counts(&names(&lab.tcp_hellos("c", tcp_vip(), 100)));
    assert!(
        !got.contains_key("b3"),
        "new flows to a removed backend: {got:?}"
    );
    // Only one table generation stays in the map (per frontend: TCP and UDP
    // each have their own table).
    let maps = lab.maps();
    let (id, size) = maps
        .services
        .iter()
        .find(|(k, v)| k.slot == 0 && k.port == 80 && v.maglev_size > 0)
        .map(|(_, v)| (v.rev_nat_id, v.maglev_size as usize))
        .unwrap();
    let live = maps.maglev.keys().filter(|k| k.rev_nat_id == id).count();
    assert_eq!(live, size, "old Maglev generation not removed");
}

#[test]
fn client_ip_affinity_sticks_expires_and_repicks() {
    let lab = lab_with(&["c"], None, Some(1));
    // Keep the affinity entry fresh: connections come faster than 1 s apart.
    let tcp = names(&lab.tcp_hellos("c", tcp_vip(), 16));
    let tcp_backend = tcp[0].clone();
    assert!(
        tcp.iter().all(|b| *b == tcp_backend),
        "16 TCP connections: {tcp:?}"
    );
    let udp = names(&lab.udp_requests("c", SocketAddrV4::new(VIP, 53), 16));
    assert!(
        udp.iter().all(|b| *b == udp[0]),
        "16 UDP datagrams from different ports: {udp:?}"
    );

    // Idle past the timeout: a new pick (which may land on the same
    // backend by chance, 1 in 3: try a few times).
    let mut repicked = false;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1300));
        let now = names(&lab.tcp_hellos("c", tcp_vip(), 1));
        if now[0] != tcp_backend {
            repicked = true;
            break;
        }
    }
    assert!(repicked, "affinity never expired");

    // The remembered backend leaves: the next flow picks anew at once.
    let current = names(&lab.tcp_hellos("c", tcp_vip(), 1))[0].clone();
    let remaining: Vec<&str> = BACKENDS.into_iter().filter(|b| *b != current).collect();
    lab.write_manifest("echo.yaml", &echo_yaml(&lab, None, Some(1), &remaining));
    let gone = lab.pod(&current).ip;
    lab.wait_maps("backend left", Duration::from_secs(5), |m| {
        proxy_userspace::inspect::services(m).iter().any(|s| {
            s.port == 80
                && s.backends.len() == 2
                && !s
                    .backends
                    .iter()
                    .any(|b| b.address.starts_with(&gone.to_string()))
        })
    });
    let after = names(&lab.tcp_hellos("c", tcp_vip(), 16));
    assert!(
        !after.contains(&current),
        "affinity kept a backend that left: {after:?}"
    );
    assert!(after.iter().all(|b| *b == after[0]), "{after:?}");
}

#[test]
fn switching_affinity_off_spreads_flows_again() {
    let lab = lab_with(&["c"], None, Some(10_800));
    let sticky = counts(&names(&lab.tcp_hellos("c", tcp_vip(), 60)));
    assert_eq!(sticky.len(), 1, "{sticky:?}");
    lab.write_manifest("echo.yaml", &echo_yaml(&lab, None, None, &BACKENDS));
    let start = Instant::now();
    lab.wait_maps("affinity off", Duration::from_secs(5), |m| {
        m.services
            .iter()
            .any(|(k, v)| k.slot == 0 && k.port == 80 && v.affinity_timeout == 0 && v.count == 3)
    });
    let spread = counts(&names(&lab.tcp_hellos("c", tcp_vip(), 60)));
    println!("affinity off after {:?}: {spread:?}", start.elapsed());
    assert_eq!(spread.len(), 3, "{spread:?}");
}

#[test]
fn an_unknown_algorithm_warns_and_falls_back_to_the_default() {
    let lab = lab_with(&["c"], Some("fastest-please"), None);
    wait_algorithm(&lab, proxy_common::ALG_RANDOM);
    let log = lab.kproxy_log_since_start();
    assert!(
        log.contains("unknown kproxy.io/lb-algorithm") && log.contains("fastest-please"),
        "no warning:\n{log}"
    );
    let got = counts(&names(&lab.tcp_hellos("c", tcp_vip(), 60)));
    assert_eq!(got.len(), 3, "{got:?}");
}
