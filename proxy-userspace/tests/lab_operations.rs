//! End to end: kproxy's operational surface in the lab: /healthz, /livez,
//! /metrics, /proxyMode, drift repair by the full resync, `--config`.

mod lab;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lab::{http_get, service_yaml, slice_yaml, Ep, Lab, NODE_NAME};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORTS: &[(&str, &str, u16)] = &[("tcp", "TCP", 80), ("udp", "UDP", 53)];
const HEALTHZ: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);

fn lab_with(args: &[&str]) -> Lab {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c", "b1", "b2"]);
    lab.kproxy_args = args.iter().map(|s| s.to_string()).collect();
    lab.start_servers(&["b1", "b2"]);
    lab.write_echo_service(VIP, PORTS, &["b1", "b2"]);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    lab
}

/// Polls an endpoint until it answers `status` (deadline 10 s); returns the body.
fn wait_status(lab: &Lab, addr: SocketAddrV4, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((code, body)) = http_get(lab, addr, path) {
            if code == status {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not answer {status} within 10 s; last: {:?}\nlog:\n{}",
            http_get(lab, addr, path),
            lab.kproxy_log_since_start()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric_value(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn health_metrics_and_proxy_mode_are_served() {
    let lab = lab_with(&[]);
    let body = wait_status(&lab, HEALTHZ, "/healthz", 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeEligible"], true, "{body}");
    assert!(!json["lastUpdated"].as_str().unwrap().is_empty(), "{body}");
    assert!(!json["currentTime"].as_str().unwrap().is_empty(), "{body}");
    wait_status(&lab, HEALTHZ, "/livez", 200);
    let (code, mode) = http_get(&lab, METRICS, "/proxyMode").unwrap();
    assert_eq!((code, mode.as_str()), (200, "ebpf"));

    let hellos = lab.tcp_hellos("c", SocketAddrV4::new(VIP, 80), 10);
    assert!(hellos.iter().all(|h| h.is_ok()));
    let (code, metrics) = http_get(&lab, METRICS, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metric_value(
            &metrics,
            "kubeproxy_sync_proxy_rules_duration_seconds_count"
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
        )
        .unwrap()
            > 1.7e9
    );
    assert_eq!(
        metric_value(&metrics, "kproxy_frontends"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "kproxy_backends"),
        Some(4.0),
        "{metrics}"
    );
    let ratio = metric_value(&metrics, "kproxy_map_fill_ratio{map=\"SERVICES_V1\"}").unwrap();
    assert!(ratio > 0.0 && ratio < 0.01, "{ratio}");
    // The address filter: one bit for the one frontend address, of 2^22.
    let filter = "{map=\"ADDRESS_FILTER_V1\"}";
    let bits = metric_value(&metrics, &format!("kproxy_map_entries{filter}"));
    assert_eq!(bits, Some(1.0), "{metrics}");
    let ratio = metric_value(&metrics, &format!("kproxy_map_fill_ratio{filter}")).unwrap();
    assert_eq!(ratio, 1.0 / f64::from(1u32 << 22));
    // Every connection's SYN, ACK, data... went through DNAT.
    let dnat = metric_value(&metrics, "kproxy_datapath_packets_total{reason=\"dnat\"}").unwrap();
    assert!(dnat >= 10.0, "dnat={dnat}\n{metrics}");
    // Per frontend, under its Service's name: those packets and the
    // replies (reverse NAT), and their bytes; the idle UDP frontend has none.
    let frontend = |name: &str, frontend: &str, port: &str| {
        let labels = format!(
            "{{frontend=\"{frontend}\",namespace=\"lab\",service=\"echo\",port=\"{port}\"}}"
        );
        metric_value(&metrics, &format!("{name}{labels}"))
            .unwrap_or_else(|| panic!("{name}{labels} missing:\n{metrics}"))
    };
    let rev_nat = metric_value(
        &metrics,
        "kproxy_datapath_packets_total{reason=\"rev_nat\"}",
    )
    .unwrap();
    let packets = frontend("kproxy_frontend_packets_total", "198.19.0.10:80/TCP", "tcp");
    assert_eq!(packets, dnat + rev_nat, "{metrics}");
    let bytes = frontend("kproxy_frontend_bytes_total", "198.19.0.10:80/TCP", "tcp");
    assert!(
        bytes >= packets * 54.0,
        "{bytes} bytes in {packets} packets"
    );
    assert_eq!(
        frontend("kproxy_frontend_packets_total", "198.19.0.10:53/UDP", "udp"),
        0.0
    );
}

#[test]
fn healthz_fails_when_a_change_cannot_reach_the_datapath() {
    // Health timeout = 2 x sync period = 2 s.
    let lab = lab_with(&["--sync-period", "1s"]);
    wait_status(&lab, HEALTHZ, "/healthz", 200);
    lab.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [oops\n",
    );
    wait_status(&lab, HEALTHZ, "/healthz", 503);
    wait_status(&lab, HEALTHZ, "/livez", 503);
    // Traffic still flows on the last good state.
    assert!(lab
        .tcp_hellos("c", SocketAddrV4::new(VIP, 80), 5)
        .iter()
        .all(|h| h.is_ok()));
    lab.remove_manifest("broken.yaml");
    wait_status(&lab, HEALTHZ, "/healthz", 200);
}

#[test]
fn a_node_marked_for_removal_fails_healthz_but_not_livez() {
    let lab = lab_with(&[]);
    wait_status(&lab, HEALTHZ, "/healthz", 200);
    let node = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\nspec:\n  taints:\n    - key: ToBeDeletedByClusterAutoscaler\n      value: \"1700000000\"\n      effect: NoSchedule\n"
    );
    lab.write_manifest("node.yaml", &node);
    let body = wait_status(&lab, HEALTHZ, "/healthz", 503);
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    wait_status(&lab, HEALTHZ, "/livez", 200);
    lab.write_manifest(
        "node.yaml",
        &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\n"),
    );
    wait_status(&lab, HEALTHZ, "/healthz", 200);
}

#[test]
fn the_full_resync_restores_an_entry_deleted_by_hand() {
    let lab = lab_with(&["--sync-period", "1s"]);
    let before = lab.maps();
    let slot0 = *before
        .services
        .keys()
        .find(|k| k.slot == 0 && k.port == 80)
        .expect("frontend slot 0");
    {
        let data =
            aya::maps::MapData::from_pin(lab.pin_dir.join(proxy_common::SERVICES_MAP)).unwrap();
        let mut map: aya::maps::HashMap<_, proxy_common::ServiceKey, proxy_common::ServiceValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        map.remove(&slot0).unwrap();
    }
    assert!(!lab.maps().services.contains_key(&slot0));
    let took = lab.wait_maps("slot 0 restored", Duration::from_secs(5), |m| {
        m.services.get(&slot0) == before.services.get(&slot0)
    });
    println!("entry deleted by hand restored after {took:?}");
    assert_eq!(lab.maps(), before);
}

#[test]
fn config_file_fields_apply_and_flags_win() {
    let config = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: 0.0.0.0\nhealthzBindAddress: 0.0.0.0:10301\nmetricsBindAddress: 127.0.0.1:10300\nsyncPeriod: 30s\nmode: iptables\n";
    let path = std::env::temp_dir().join(format!("kproxy-config-{}.yaml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let lab = lab_with(&[
        "--config",
        path.to_str().unwrap(),
        "--healthz-bind-address",
        "0.0.0.0:10302",
    ]);
    // The flag beats the file for healthz; the file sets metrics.
    wait_status(
        &lab,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10302),
        "/healthz",
        200,
    );
    assert!(http_get(
        &lab,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10301),
        "/healthz"
    )
    .is_err());
    let (code, _) = http_get(
        &lab,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10300),
        "/metrics",
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(http_get(&lab, METRICS, "/metrics").is_err());
    let log = lab.kproxy_log_since_start();
    assert!(
        log.contains("bindAddress") && log.contains("mode (iptables"),
        "ignored fields not reported:\n{log}"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_full_map_keeps_what_was_programmed_and_says_so() {
    const TCP: &[(&str, &str, u16)] = &[("tcp", "TCP", 80)];
    let vip_b = Ipv4Addr::new(198, 19, 0, 20);
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c", "b1", "b2", "b3"]);
    lab.kproxy_args = vec!["--backends-map-size".into(), "3".into()];
    lab.start_servers(&["b1", "b2", "b3"]);
    let a = format!(
        "{}---\n{}",
        service_yaml("a", VIP, TCP),
        slice_yaml(
            "a",
            "a-1",
            TCP,
            &[Ep::ready(lab.pod("b1").ip), Ep::ready(lab.pod("b2").ip)]
        )
    );
    lab.write_manifest("a.yaml", &a);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    // Service b needs two more backends; one fits.
    let b = format!(
        "{}---\n{}",
        service_yaml("b", vip_b, TCP),
        slice_yaml(
            "b",
            "b-1",
            TCP,
            &[
                Ep::ready(lab.pod("b3").ip),
                Ep::ready(Ipv4Addr::new(198, 18, 9, 2))
            ]
        )
    );
    lab.write_manifest("b.yaml", &b);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.kproxy_log_since_start().contains("the map is full") {
        assert!(
            Instant::now() < deadline,
            "no map-full error:\n{}",
            lab.kproxy_log_since_start()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Service a keeps working; b has no frontend (no half-written Service).
    let hellos = lab.tcp_hellos("c", SocketAddrV4::new(VIP, 80), 20);
    assert!(hellos.iter().all(|h| h.is_ok()), "{hellos:?}");
    let frontends = proxy_userspace::inspect::services(&lab.maps());
    assert!(
        !frontends
            .iter()
            .any(|f| f.ip == std::net::IpAddr::V4(vip_b)),
        "{frontends:?}"
    );
    let (_, metrics) = http_get(&lab, METRICS, "/metrics").unwrap();
    let full = metric_value(&metrics, "kproxy_sync_errors_total{kind=\"map_full\"}").unwrap_or(0.0);
    assert!(full >= 1.0, "{metrics}");
    let _ = &mut lab;
}
