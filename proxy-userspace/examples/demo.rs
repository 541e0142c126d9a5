//! `cargo xtask demo`: a self-contained lab (network namespaces, real TCP/UDP
//! backends), kproxy driven by `manifests/examples/`, traffic from a client
//! pod, and what the pinned maps hold. Everything is removed at the end.
//!
//! Usage: demo <path to kproxy> <manifest dir>

#[path = "../tests/lab/mod.rs"]
mod lab;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;

use lab::{Hello, Lab};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);

fn main() {
    let mut args = std::env::args().skip(1);
    let kproxy = PathBuf::from(args.next().expect("usage: demo <kproxy> <manifest dir>"));
    let manifests = PathBuf::from(args.next().expect("usage: demo <kproxy> <manifest dir>"));

    // Pod i gets 198.18.i.2: the client is .1, the backends .2-.4, as in
    // manifests/examples/echo-service.yaml.
    let mut lab = Lab::new(&kproxy, &["client", "echo1", "echo2", "echo3"]);
    println!("lab {}: node namespace {}, pods:", lab.id, lab.node.name);
    for pod in &lab.pods {
        println!(
            "  {:<7} {:<12} (node side {})",
            pod.name, pod.ip, pod.ifname
        );
    }
    for entry in std::fs::read_dir(&manifests)
        .expect("manifest dir")
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            lab.write_manifest(&name, &std::fs::read_to_string(&path).unwrap());
            println!("manifest: {}", path.display());
        }
    }
    lab.start_servers(&["echo1", "echo2", "echo3"]);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    println!(
        "kproxy running in {} (pins under {})\n",
        lab.node.name,
        lab.pin_dir.display()
    );

    let tcp = lab.tcp_hellos("client", SocketAddrV4::new(VIP, 80), 60);
    report("60 TCP connections to 198.19.0.10:80", &tcp);
    let udp = lab.udp_requests("client", SocketAddrV4::new(VIP, 53), 60);
    report("60 UDP flows (fresh source ports) to 198.19.0.10:53", &udp);

    match lab
        .tcp_hellos("client", SocketAddrV4::new(EMPTY_VIP, 80), 1)
        .pop()
        .unwrap()
    {
        Err(e) => println!("TCP to 198.19.0.11:80 (Service without endpoints): {e}"),
        Ok(h) => println!(
            "TCP to 198.19.0.11:80 unexpectedly answered by {}",
            h.backend
        ),
    }
    match lab
        .tcp_hellos("client", SocketAddrV4::new(VIP, 8443), 1)
        .pop()
        .unwrap()
    {
        Err(e) => println!("TCP to 198.19.0.10:8443 (known VIP, unknown port): {e}"),
        Ok(h) => println!(
            "TCP to 198.19.0.10:8443 unexpectedly answered by {}",
            h.backend
        ),
    }

    println!(
        "\n$ kproxy services --bpf-pin-path {}",
        lab.pin_dir.display()
    );
    print!(
        "{}",
        String::from_utf8_lossy(&lab.kproxy_cli(&["services"]).stdout)
    );
    println!("\n$ kproxy status --bpf-pin-path {}", lab.pin_dir.display());
    print!(
        "{}",
        String::from_utf8_lossy(&lab.kproxy_cli(&["status"]).stdout)
    );

    let services = lab.pin_dir.join(proxy_common::SERVICES_MAP);
    println!("\n$ bpftool map dump pinned {}", services.display());
    match Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&services)
        .output()
    {
        Ok(out) => print!("{}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => println!("bpftool failed: {e} (run `cargo xtask setup`)"),
    }
    println!("\ndemo done; removing the lab");
}

fn report(what: &str, results: &[io::Result<Hello>]) {
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = BTreeMap::new();
    let mut failed = 0;
    for r in results {
        match r {
            Ok(h) => {
                *per_backend.entry(h.backend.clone()).or_default() += 1;
                *seen.entry(h.peer.ip()).or_insert(0) += 1;
            }
            Err(_) => failed += 1,
        }
    }
    println!("{what}:");
    for (backend, n) in &per_backend {
        println!("  {backend:<6} {n:>3} {}", "#".repeat(*n));
    }
    let seen: Vec<String> = seen.keys().map(|ip| ip.to_string()).collect();
    println!(
        "  failed: {failed}; source address the backends saw: {}\n",
        seen.join(", ")
    );
}
