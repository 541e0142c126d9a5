//! End to end: restarts and upgrades under load. 200 new connections a
//! second plus 20 long-lived connections through a ClusterIP for 60 s,
//! while kproxy is SIGKILLed and restarted every 10 s, once as a different
//! binary file whose program is swapped into the pinned links: nothing may
//! fail or reset.

mod lab;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::programs::links::{FdLink, PinnedLink};
use lab::{service_yaml, slice_yaml, tcp_hello, Ep, Lab};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORTS: &[(&str, &str, u16)] = &[("tcp", "TCP", 80)];
const TEST_SECONDS: u64 = 60;
const RATE: u64 = 200;

/// Program ids attached through the pinned links, by link.
fn linked_programs(pin_dir: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(pin_dir.join("links"))
        .unwrap()
        .flatten()
        .map(|e| {
            let link = PinnedLink::from_pin(e.path()).expect("pinned link");
            FdLink::from(link).info().expect("link info").program_id()
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn restarts_and_an_upgrade_under_load_lose_nothing() {
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c", "b1", "b2", "b3"]);
    lab.start_servers(&["b1", "b2", "b3"]);
    let eps: Vec<Ep> = ["b1", "b2", "b3"]
        .iter()
        .map(|b| Ep::ready(lab.pod(b).ip))
        .collect();
    lab.write_manifest(
        "echo.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("echo", VIP, PORTS),
            slice_yaml("echo", "echo-1", PORTS, &eps)
        ),
    );
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    let vip = SocketAddrV4::new(VIP, 80);

    // The "new build": another binary file (a copy: the test cannot build
    // one), started like an upgrade would be.
    let upgraded = lab.root.join("kproxy-upgraded");
    std::fs::copy(&lab.kproxy_bin, &upgraded).unwrap();

    let mut long_lived: Vec<_> = (0..20)
        .map(|_| lab.tcp_connect("c", vip).expect("long-lived"))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = lab.pod("c");
        let file = std::fs::File::open(format!("/var/run/netns/{}", client.netns.name)).unwrap();
        std::thread::spawn(move || {
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Paced at RATE per second.
                let due = start + Duration::from_micros(n * 1_000_000 / RATE);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                n += 1;
                match tcp_hello(vip) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("request {n} failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        })
    };

    let started = Instant::now();
    let programs_at_start = linked_programs(&lab.pin_dir);
    let mut restarts = 0;
    let mut echo_failures = 0;
    let mut round = 0u64;
    let mut upgraded_programs = None;
    while started.elapsed() < Duration::from_secs(TEST_SECONDS) {
        // Every long-lived connection answers, every second.
        for (i, conn) in long_lived.iter_mut().enumerate() {
            let expect = format!("{} r{round}c{i}", conn.hello.backend);
            match conn.echo(&format!("r{round}c{i}")) {
                Ok(answer) if answer == expect => {}
                other => {
                    echo_failures += 1;
                    eprintln!("long-lived connection {i} failed in round {round}: {other:?}");
                }
            }
        }
        round += 1;
        let elapsed = started.elapsed().as_secs();
        if elapsed >= 10 * (restarts + 1) && elapsed < TEST_SECONDS {
            lab.stop_kproxy(libc::SIGKILL);
            restarts += 1;
            if restarts == 3 {
                lab.kproxy_bin = upgraded.clone();
            }
            lab.start_kproxy();
            lab.wait_kproxy_ready();
            if restarts == 3 {
                upgraded_programs = Some(linked_programs(&lab.pin_dir));
                lab.kproxy_bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kproxy"));
            }
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();

    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let rate = (ok + failed) as f64 / started.elapsed().as_secs_f64();
    println!(
        "{TEST_SECONDS} s under load: {restarts} SIGKILL restarts (one as an upgrade), \
         {ok} requests ok, {failed} failed ({rate:.0}/s), {} long-lived connections, \
         {round} echo rounds, {echo_failures} echo failures",
        long_lived.len()
    );
    let upgraded_programs = upgraded_programs.expect("the upgrade happened");
    println!("link programs: start {programs_at_start:?}, after the upgrade {upgraded_programs:?}");
    assert!(restarts >= 5, "only {restarts} restarts");
    assert_eq!(failed, 0, "requests failed during restarts");
    assert_eq!(echo_failures, 0, "long-lived connections broke");
    assert!(rate > 150.0, "the load generator only reached {rate:.0}/s");
    assert_eq!(programs_at_start.len(), upgraded_programs.len());
    assert!(
        programs_at_start
            .iter()
            .all(|p| !upgraded_programs.contains(p)),
        "the upgrade did not swap the program into the pinned links"
    );
}
