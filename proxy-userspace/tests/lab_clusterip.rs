//! End to end: the real `kproxy` binary in a netns lab, driven by YAML
//! files, checked with real TCP and UDP connections from a client pod.

mod lab;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lab::{service_yaml, slice_yaml, Ep, Hello, Lab};
use proxy_userspace::sync::MapContents;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORTS: &[(&str, &str, u16)] = &[("tcp", "TCP", 80), ("udp", "UDP", 53)];
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];

fn kproxy() -> &'static str {
    env!("CARGO_BIN_EXE_kproxy")
}

/// Client `c` (198.18.1.2) and backends b1..b3 (198.18.2-4.2), all serving.
fn lab_with_echo_service() -> Lab {
    let mut lab = Lab::new(kproxy(), &["c", "b1", "b2", "b3"]);
    lab.start_servers(&BACKENDS);
    write_echo(&lab, &BACKENDS);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    lab
}

fn write_echo(lab: &Lab, backends: &[&str]) {
    lab.write_echo_service(VIP, PORTS, backends);
}

fn tcp_vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// Backend addresses the TCP frontend holds in the pinned maps.
fn frontend_backends(maps: &MapContents, port: u16) -> Vec<Ipv4Addr> {
    let listing = proxy_userspace::inspect::services(maps);
    listing
        .iter()
        .find(|s| s.ip == std::net::IpAddr::V4(VIP) && s.port == port)
        .map(|s| {
            s.backends
                .iter()
                // A dump is not atomic: a backend deleted between reading
                // the slots and the backends shows as `<missing>`.
                .filter_map(|b| b.address.split(':').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn counts(hellos: &[io::Result<Hello>]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for h in hellos {
        let h = h.as_ref().expect("connection through the VIP failed");
        *counts.entry(h.backend.clone()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn clusterip_spreads_tcp_and_udp_and_keeps_the_client_address() {
    let lab = lab_with_echo_service();
    let client_ip = lab.pod("c").ip;

    let hellos = lab.tcp_hellos("c", tcp_vip(), 300);
    let spread = counts(&hellos);
    println!("300 TCP connections to {VIP}:80 -> {spread:?}");
    assert_eq!(spread.len(), 3, "every backend must be reached: {spread:?}");
    for (backend, n) in &spread {
        assert!(
            (60..=150).contains(n),
            "{backend} got {n} of 300 connections, outside 20-50%: {spread:?}"
        );
    }
    for h in hellos.iter().flatten() {
        assert_eq!(
            h.peer.ip(),
            std::net::IpAddr::V4(client_ip),
            "the backend must see the client pod's own address"
        );
    }

    let udp = lab.udp_requests("c", SocketAddrV4::new(VIP, 53), 90);
    let spread = counts(&udp);
    println!("90 UDP flows to {VIP}:53 -> {spread:?}");
    assert_eq!(
        spread.len(),
        3,
        "UDP flows must reach every backend: {spread:?}"
    );
    for h in udp.iter().flatten() {
        assert_eq!(h.peer.ip(), std::net::IpAddr::V4(client_ip));
    }

    // `kproxy services -o json` lists the frontends with their backends.
    let json = lab.kproxy_json(&["services"]);
    let frontends: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["frontend"].as_str().unwrap())
        .collect();
    assert_eq!(frontends, ["198.19.0.10:53/UDP", "198.19.0.10:80/TCP"]);
    for f in json.as_array().unwrap() {
        assert_eq!(f["backends"].as_array().unwrap().len(), 3, "{f}");
    }

    // bpftool prints named fields (BTF), not hex.
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(lab.pin_dir.join(proxy_common::SERVICES_MAP))
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    for field in [
        "\"addr\"",
        "\"port\"",
        "\"proto\"",
        "\"scope\"",
        "\"slot\"",
        "\"backend_id\"",
        "\"rev_nat_id\"",
        "\"count\"",
    ] {
        assert!(text.contains(field), "bpftool dump lacks {field}:\n{text}");
    }
}

/// A pod's packets reach the tc hook as CHECKSUM_PARTIAL: their TCP and
/// UDP checksum field holds only the pseudo-header's sum, for the device
/// or the stack to finish, and a rewrite must move it with the addresses
/// but not with the ports. With checksum offload on everywhere nothing
/// would ever check that (the stack trusts a partial checksum across a
/// veth), so here the node-side interfaces have tx checksumming off: the
/// node finishes every checksum in software from what the rewrite left
/// (segmenting large sends too), and the receiving pod verifies it.
#[test]
fn checksums_finished_in_software_are_right() {
    let mut lab = Lab::new(kproxy(), &["c", "b1"]);
    let ethtool = |ns: &str, args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ethtool"])
            .args(args)
            .output()
            .expect("ethtool is installed by `cargo xtask setup`");
        assert!(out.status.success(), "ethtool {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for pod in ["c", "b1"] {
        let ifname = lab.pod(pod).ifname.clone();
        ethtool(&lab.node.name, &["-K", &ifname, "tx", "off"]);
        // The pods' own side still offloads: what they send is partial.
        let features = ethtool(&lab.pod(pod).netns.name, &["-k", "lab0"]);
        assert!(
            features.contains("tx-checksumming: on"),
            "{pod} lab0:\n{features}"
        );
    }
    lab.start_servers(&["b1"]);
    write_echo(&lab, &["b1"]);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    let log = lab.kproxy_log_since_start();
    assert!(
        log.contains("read the skb checksum state"),
        "kproxy must update checksums in place on this kernel:\n{log}"
    );

    let mut conversation = lab
        .tcp_connect("c", tcp_vip())
        .expect("TCP through the VIP with checksums finished in software");
    assert_eq!(conversation.hello.backend, "b1");
    assert_eq!(conversation.echo("small").unwrap(), "b1 small");
    // Larger than one segment both ways: segmented in software, each
    // segment's checksum finished from the rewritten one.
    let large = "0123456789abcdef".repeat(4096);
    assert_eq!(conversation.echo(&large).unwrap(), format!("b1 {large}"));
    let udp = lab.udp_requests("c", SocketAddrV4::new(VIP, 53), 3);
    for reply in udp {
        assert_eq!(reply.expect("UDP through the VIP").backend, "b1");
    }
}

#[test]
fn endpoint_changes_reach_the_datapath_within_two_seconds() {
    let lab = lab_with_echo_service();
    let b3 = lab.pod("b3").ip;

    write_echo(&lab, &["b1", "b2"]);
    let took = lab.wait_maps("b3 removed", Duration::from_secs(5), |m| {
        let b = frontend_backends(m, 80);
        b.len() == 2 && !b.contains(&b3)
    });
    println!("endpoint removal reached the datapath in {took:?}");
    assert!(took < Duration::from_secs(2), "removal took {took:?}");
    let spread = counts(&lab.tcp_hellos("c", tcp_vip(), 60));
    assert!(
        !spread.contains_key("b3"),
        "removed endpoint got traffic: {spread:?}"
    );

    write_echo(&lab, &BACKENDS);
    let took = lab.wait_maps("b3 added", Duration::from_secs(5), |m| {
        frontend_backends(m, 80).contains(&b3)
    });
    println!("endpoint addition reached the datapath in {took:?}");
    assert!(took < Duration::from_secs(2), "addition took {took:?}");
    let spread = counts(&lab.tcp_hellos("c", tcp_vip(), 90));
    assert!(
        spread.contains_key("b3"),
        "added endpoint got no traffic: {spread:?}"
    );
}

#[test]
fn long_lived_connection_survives_drain_sigkill_restart_and_sigterm() {
    let mut lab = lab_with_echo_service();
    let mut conn = lab.tcp_connect("c", tcp_vip()).expect("connect via VIP");
    let backend = conn.hello.backend.clone();
    assert_eq!(conn.echo("one").unwrap(), format!("{backend} one"));

    // The backend leaves the slice but keeps running: the flow stays.
    let remaining: Vec<&str> = BACKENDS.iter().copied().filter(|b| *b != backend).collect();
    write_echo(&lab, &remaining);
    let gone = lab.pod(&backend).ip;
    lab.wait_maps("backend drained", Duration::from_secs(5), |m| {
        !frontend_backends(m, 80).contains(&gone)
    });
    assert_eq!(conn.echo("two").unwrap(), format!("{backend} two"));
    let spread = counts(&lab.tcp_hellos("c", tcp_vip(), 30));
    assert!(
        !spread.contains_key(&backend),
        "drained backend got new flows"
    );

    // SIGKILL: the pinned datapath keeps forwarding while kproxy is gone.
    lab.stop_kproxy(libc::SIGKILL);
    assert_eq!(conn.echo("three").unwrap(), format!("{backend} three"));
    let spread = counts(&lab.tcp_hellos("c", tcp_vip(), 20));
    assert!(!spread.contains_key(&backend));

    // A new kproxy on the same pins reuses maps and links.
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    let log = lab.kproxy_log_since_start();
    assert!(
        !log.contains("entries=0"),
        "the restarted kproxy must find the previous state:\n{log}"
    );
    assert_eq!(conn.echo("four").unwrap(), format!("{backend} four"));
    let spread = counts(&lab.tcp_hellos("c", tcp_vip(), 30));
    assert_eq!(spread.len(), 2, "{spread:?}");

    // SIGTERM: a clean exit that leaves the datapath in place.
    let status = lab.stop_kproxy(libc::SIGTERM);
    assert!(status.success(), "kproxy exited with {status} on SIGTERM");
    assert_eq!(conn.echo("five").unwrap(), format!("{backend} five"));
    let spread = counts(&lab.tcp_hellos("c", tcp_vip(), 20));
    assert_eq!(spread.len(), 2, "{spread:?}");
}

#[test]
fn deleted_service_is_refused_and_leaves_no_trace() {
    let lab = lab_with_echo_service();
    assert!(lab.tcp_hellos("c", tcp_vip(), 3).iter().all(|h| h.is_ok()));
    // The daemon announced the address filter, which has the VIP's bit.
    let filter_flag = proxy_common::CONFIG_FLAG_ADDRESS_FILTER;
    assert_ne!(lab.datapath_config().flags & filter_flag, 0);
    let vip_in_filter = |m: &MapContents| {
        let filter = m.address_filter.as_ref().expect("the address filter");
        filter.may_hold(VIP)
    };
    assert!(vip_in_filter(&lab.maps()));

    lab.remove_manifest("echo.yaml");
    lab.wait_maps("service gone", Duration::from_secs(5), |m| {
        m.services.is_empty() && m.backends.is_empty() && m.rev_nat.is_empty()
    });
    lab.wait_maps("VIP's bit cleared", Duration::from_secs(5), |m| {
        !vip_in_filter(m)
    });
    assert_ne!(lab.datapath_config().flags & filter_flag, 0);

    // No trace: kproxy services and bpftool agree.
    let json = lab.kproxy_json(&["services"]);
    assert_eq!(json, serde_json::json!([]));
    for map in [
        proxy_common::SERVICES_MAP,
        proxy_common::BACKENDS_MAP,
        proxy_common::REV_NAT_MAP,
    ] {
        let dump = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(lab.pin_dir.join(map))
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&dump.stdout)
            .unwrap_or_else(|e| panic!("bpftool json for {map}: {e}"));
        assert_eq!(json, serde_json::json!([]), "{map} still holds entries");
    }

    // A connection to the VIP now fails: not forwarded, not accepted.
    let started = Instant::now();
    let result = lab.tcp_hellos("c", tcp_vip(), 1).pop().unwrap();
    assert!(
        result.is_err(),
        "the deleted Service still answered: {result:?}"
    );
    println!(
        "connect after delete failed in {:?}: {:?}",
        started.elapsed(),
        result
    );
}

#[test]
fn service_without_endpoints_and_unknown_port_are_refused() {
    let mut lab = Lab::new(kproxy(), &["c", "b1"]);
    lab.start_servers(&["b1"]);
    let yaml = format!(
        "{}---\n{}",
        service_yaml("empty", VIP, PORTS),
        slice_yaml("empty", "empty-1", PORTS, &[])
    );
    lab.write_manifest("empty.yaml", &yaml);
    lab.start_kproxy();
    lab.wait_kproxy_ready();

    let started = Instant::now();
    let err = lab
        .tcp_hellos("c", tcp_vip(), 1)
        .pop()
        .unwrap()
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");

    let err = lab
        .udp_requests("c", SocketAddrV4::new(VIP, 53), 1)
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "UDP: {err}");

    // Known VIP, unknown port: rejected too.
    let err = lab
        .tcp_hellos("c", SocketAddrV4::new(VIP, 81), 1)
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    // Endpoints appear: the same frontend starts answering.
    let ep = Ep::ready(lab.pod("b1").ip);
    let yaml = format!(
        "{}---\n{}",
        service_yaml("empty", VIP, PORTS),
        slice_yaml("empty", "empty-1", PORTS, &[ep])
    );
    lab.write_manifest("empty.yaml", &yaml);
    lab.wait_maps("endpoint added", Duration::from_secs(5), |m| {
        frontend_backends(m, 80).len() == 1
    });
    let hello = lab.tcp_hellos("c", tcp_vip(), 1).pop().unwrap().unwrap();
    assert_eq!(hello.backend, "b1");
}

#[test]
fn broken_yaml_keeps_the_last_good_state_and_reports_file_and_line() {
    let lab = lab_with_echo_service();
    lab.write_manifest("broken.yaml", "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  ports:\n    - port: [not, a, number]\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.kproxy_log_since_start().contains("broken.yaml:7") {
        assert!(
            Instant::now() < deadline,
            "kproxy did not report broken.yaml:7:\n{}",
            lab.kproxy_log_since_start()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Meanwhile an edit to the good file is not applied either (the source
    // as a whole is inconsistent), and what was programmed keeps working.
    assert_eq!(frontend_backends(&lab.maps(), 80).len(), 3);
    assert_eq!(counts(&lab.tcp_hellos("c", tcp_vip(), 30)).len(), 3);

    lab.remove_manifest("broken.yaml");
    write_echo(&lab, &["b1"]);
    lab.wait_maps("fixed source applied", Duration::from_secs(5), |m| {
        frontend_backends(m, 80).len() == 1
    });
}

#[test]
fn new_pod_interfaces_are_picked_up_and_cleanup_removes_everything() {
    let mut lab = lab_with_echo_service();
    // A pod created after kproxy started is a client like any other.
    lab.add_pod("late");
    let late_ip = lab.pod("late").ip;
    let deadline = Instant::now() + Duration::from_secs(10);
    let hello = loop {
        if let Some(Ok(h)) = lab.tcp_hellos("late", tcp_vip(), 1).pop() {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "the new pod interface was not picked up"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(hello.peer.ip(), std::net::IpAddr::V4(late_ip));

    lab.stop_kproxy(libc::SIGTERM);
    let out = lab.kproxy_cli(&["cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (A fresh bpffs shows the kernel's own maps.debug/progs.debug.)
    let left: Vec<_> = std::fs::read_dir(&lab.pin_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".debug"))
        .collect();
    assert!(left.is_empty(), "pins left after cleanup: {left:?}");
    // Programs are detached: the VIP is no longer translated.
    let result = lab.tcp_hellos("c", tcp_vip(), 1).pop().unwrap();
    assert!(
        result.is_err(),
        "VIP still served after cleanup: {result:?}"
    );
}
