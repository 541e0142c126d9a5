//! Part 2: new-connection setup latency (p50/p99) and request throughput
//! from a client pod through kproxy, kube-proxy's iptables mode and its
//! nftables mode, in a lab of network namespaces of the bench's own.
//!
//! Topology, one per mode (all alike, all up at the same time so rounds can
//! interleave): a node namespace; a client pod and three backend pods, each
//! a namespace joined to the node by a veth pair (`pod-c` / `pod-bK` on the
//! node, `lab0` in the pod), pod k on 198.18.k.0/24 (node .1, pod .2). The
//! lab has no link to the root namespace; everything is deleted by guards
//! on drop, also on error or panic.

use super::*;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

const BACKENDS: usize = 3;
const BACKEND_PORT: u16 = 8080;
/// Bytes of one request and of its response.
const REQUEST: usize = 64;
const RESPONSE: usize = 128;
/// Client threads (keep-alive connections, or new-connection loops) in the
/// throughput runs.
const PARALLEL: usize = 4;
/// Server threads per backend pod (each serves one connection at a time).
const WORKERS: usize = PARALLEL + 2;
/// "No worse than" allows this much for round-to-round noise.
const NOISE: f64 = 0.05;
const NODE_NAME: &str = "bench-node";
const IO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// No proxy: the client connects to a backend pod's address directly.
    Direct,
    Iptables,
    Nftables,
    Kproxy,
}

const MODES: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::Nftables, Mode::Kproxy];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct (no proxy)",
            Mode::Iptables => "iptables mode",
            Mode::Nftables => "nftables mode",
            Mode::Kproxy => "kproxy",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Mode::Direct => "dir",
            Mode::Iptables => "ipt",
            Mode::Nftables => "nft",
            Mode::Kproxy => "kp",
        }
    }
}

/// Every mode is measured in `rounds` short slices, the modes taking turns
/// (order rotated each round), so a burst of load from other tenants of
/// this shared VM lands on all modes alike instead of on one mode's run.
struct Plan {
    counts: Vec<usize>,
    rounds: usize,
    /// Sequential connections per round and mode (each round its own
    /// p50/p99; the figure is the median over the rounds).
    latency_conns: usize,
    /// Per round and mode, for each of the two throughput runs.
    run_for: Duration,
}

impl Plan {
    fn new(config: &Config) -> Self {
        if config.quick {
            Self {
                counts: vec![1, 10_000],
                rounds: 10,
                latency_conns: 200,
                run_for: Duration::from_millis(200),
            }
        } else {
            Self {
                counts: vec![1, 1_000, 10_000],
                rounds: 15,
                // A round's p99 is then its 11th-slowest connection, not
                // its 3rd: far steadier between runs.
                latency_conns: 1000,
                run_for: Duration::from_millis(200),
            }
        }
    }
}

/// One measurement round of one mode at one Service count.
struct Round {
    /// Connection setup times with one thread as client and server
    /// (`one_thread_setup`): the network path, no wake-ups. Sorted.
    one_thread: Vec<Duration>,
    /// Requests/s on one keep-alive connection, one thread as both ends
    /// (`one_thread_requests`).
    one_thread_requests_per_s: f64,
    /// Connection setup times from a client thread to the backends' server
    /// threads: the path plus thread wake-ups on this VM's 2 vCPUs. Sorted.
    threads: Vec<Duration>,
    /// PARALLEL client threads to the server threads.
    threads_requests_per_s: f64,
    conns_per_s: f64,
    failures: usize,
}

/// Which connection setup measurement a figure is from.
#[derive(Clone, Copy)]
enum Setup {
    OneThread,
    Threads,
}

impl Round {
    /// This round's percentile `p` of connection setup time, in µs.
    fn percentile_us(&self, setup: Setup, p: f64) -> f64 {
        let sorted = match setup {
            Setup::OneThread => &self.one_thread,
            Setup::Threads => &self.threads,
        };
        percentile(sorted, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    }
    fn p50_us(&self) -> f64 {
        self.percentile_us(Setup::OneThread, 0.50)
    }
    fn p99_us(&self) -> f64 {
        self.percentile_us(Setup::OneThread, 0.99)
    }
    fn threads_p50_us(&self) -> f64 {
        self.percentile_us(Setup::Threads, 0.50)
    }
    fn threads_p99_us(&self) -> f64 {
        self.percentile_us(Setup::Threads, 0.99)
    }
    fn requests(&self) -> f64 {
        self.one_thread_requests_per_s
    }
    fn threads_requests(&self) -> f64 {
        self.threads_requests_per_s
    }
    fn conns(&self) -> f64 {
        self.conns_per_s
    }
}

/// A mode at a Service count: programming time and rounds, or why not.
/// Time to program a mode: the tool's wall time, or kproxy's start to its
/// first full sync plus the sync's own time from its log.
#[derive(Clone, Copy)]
struct Programming {
    wall: Duration,
    sync: Option<Duration>,
}

struct Cell {
    programming: Option<Programming>,
    rounds: Vec<Round>,
    unavailable: Option<String>,
}

/// A figure of one round (`Round::p99_us`, `Round::requests`, ...).
type Figure = fn(&Round) -> f64;

impl Cell {
    /// Median over the rounds of a round's figure (for a percentile: a
    /// burst from another tenant spoils one round's tail, not the figure).
    fn median(&self, f: Figure) -> f64 {
        let mut v: Vec<f64> = self.rounds.iter().map(f).collect();
        median(&mut v)
    }
    /// The interquartile range of `f` over the rounds, relative to its
    /// median: how much a figure moves between rounds on this machine.
    fn spread(&self, f: Figure) -> f64 {
        let mut v: Vec<f64> = self.rounds.iter().map(f).collect();
        if v.len() < 4 {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.75) - at(0.25)) / median(&mut v)
    }
    fn failures(&self) -> usize {
        self.rounds.iter().map(|r| r.failures).sum()
    }
    fn ok(&self) -> bool {
        self.unavailable.is_none() && !self.rounds.is_empty()
    }
}

/// Part 2: measures, writes the plots into `docs`, renders the section.
pub fn run(config: &Config, docs: &Path) -> Result<Section> {
    let plan = Plan::new(config);
    match measure(&plan) {
        Ok(results) => Ok(render(&plan, &results, docs)),
        Err(err) => {
            eprintln!("bench: connections: {err:#}");
            Ok(Section {
                markdown: format!(
                    "## 2. Connections through a lab node\n\nNot measured in this run: {err:#}\n\n"
                ),
                not_measured: vec![format!(
                    "Part 2 (connection setup latency and throughput, kproxy vs iptables vs \
                     nftables mode) failed in this run: {err:#}"
                )],
                ..Section::default()
            })
        }
    }
}

/// (count, mode) -> cell.
type Results = BTreeMap<(usize, usize), Cell>;

fn measure(plan: &Plan) -> Result<Results> {
    let kproxy = kproxy_binary();
    let mut results = Results::new();
    for &count in &plan.counts {
        let started = Instant::now();
        // The labs are built and programmed in parallel: loading 10 000
        // Services into nftables alone takes most of a minute here.
        let built: Vec<Result<Option<Built>>> = std::thread::scope(|s| {
            let threads: Vec<_> = MODES
                .iter()
                .map(|&mode| {
                    let kproxy = kproxy.as_ref();
                    s.spawn(move || setup(mode, count, kproxy))
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("lab setup panicked")))
                })
                .collect()
        });
        let mut labs: Vec<(usize, Topology)> = Vec::new();
        for (m, (&mode, built)) in MODES.iter().zip(built).enumerate() {
            let mut cell = Cell {
                programming: None,
                rounds: Vec::new(),
                unavailable: mode_missing(mode, kproxy.as_ref()),
            };
            match built {
                Ok(Some((lab, programming))) => {
                    cell.programming = programming;
                    labs.push((m, lab));
                }
                Ok(None) => {}
                Err(err) => {
                    eprintln!(
                        "bench: connections: {} at {count} Services: {err:#}",
                        mode.name()
                    );
                    cell.unavailable = Some(format!("{err:#}"));
                }
            }
            results.insert((count, m), cell);
        }
        eprintln!(
            "bench: connections: {count} Services programmed in {} labs in {:.1} s",
            labs.len(),
            started.elapsed().as_secs_f64()
        );
        for round in 0..plan.rounds {
            // Rotate the order so drift and warm caches hit every mode alike.
            for k in 0..labs.len() {
                let (m, lab) = &labs[(k + round) % labs.len()];
                let measured = lab.measure(plan);
                let cell = results.get_mut(&(count, *m)).expect("inserted above");
                match measured {
                    Ok(r) => cell.rounds.push(r),
                    Err(err) => {
                        eprintln!(
                            "bench: connections: {} at {count} Services: {err:#}",
                            MODES[*m].name()
                        );
                        cell.unavailable = Some(format!("{err:#}"));
                    }
                }
            }
        }
        eprintln!(
            "bench: connections: {count} Services done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(results)
}

/// Why a mode cannot run here at all, if it cannot.
fn mode_missing(mode: Mode, kproxy: Result<&PathBuf, &anyhow::Error>) -> Option<String> {
    match mode {
        Mode::Iptables if !which("iptables-restore") => {
            Some("iptables-restore not installed (`cargo xtask setup` installs it)".into())
        }
        Mode::Nftables if !which("nft") => {
            Some("nft not installed (`cargo xtask setup` installs it)".into())
        }
        Mode::Kproxy => kproxy.err().map(|e| format!("no kproxy binary: {e:#}")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------

fn backend_ip(k: usize) -> [u8; 4] {
    [198, 18, (k + 2) as u8, 2]
}

/// The Service the client measures: in the middle of the set, so iptables'
/// KUBE-SERVICES scan passes half the rules (the average Service).
fn measured_index(count: usize) -> usize {
    count / 2
}

/// Endpoints per Service: the measured one has the backend pods, each
/// filler one endpoint (filler endpoint chains are never traversed, so
/// more would only slow down loading the rules).
fn endpoint_sets(count: usize) -> Vec<Vec<[u8; 4]>> {
    (0..count)
        .map(|i| {
            if i == measured_index(count) {
                (0..BACKENDS).map(backend_ip).collect()
            } else {
                vec![endpoint_ip(i)]
            }
        })
        .collect()
}

/// One mode's lab. Fields drop in order: the listeners close, kproxy stops
/// and its pins go, then the namespaces.
struct Topology {
    mode: Mode,
    target: Vec<SocketAddrV4>,
    /// Each backend pod's listener on :8080 (nonblocking). Server threads
    /// answer on them only while a threaded phase runs (`Servers`); the
    /// one-thread probe accepts on them itself.
    listeners: [TcpListener; BACKENDS],
    kproxy: Option<Kproxy>,
    client: Ns,
    backends: Vec<Ns>,
    node: Ns,
}

/// A programmed lab and how long programming took (None for direct).
type Built = (Topology, Option<Programming>);

/// Builds the lab for `mode` with `count` Services and programs it; returns
/// it with the programming time (None for direct), or None when the mode
/// cannot run here.
fn setup(
    mode: Mode,
    count: usize,
    kproxy: Result<&PathBuf, &anyhow::Error>,
) -> Result<Option<Built>> {
    if mode_missing(mode, kproxy).is_some() {
        return Ok(None);
    }
    let tag = format!("conn{count}-{}", mode.tag());
    let node = Ns::new(&format!("{tag}-node"))?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    ip(&["-n", node.name(), "link", "set", "lo", "up"])?;
    let client = Ns::new(&format!("{tag}-c"))?;
    let mut backends = Vec::new();
    for k in 0..BACKENDS {
        backends.push(Ns::new(&format!("{tag}-b{k}"))?);
    }
    let listeners = backends.iter().map(listen).collect::<Result<Vec<_>>>()?;
    let listeners: [TcpListener; BACKENDS] = listeners.try_into().expect("one per backend");
    let mut topo = Topology {
        mode,
        target: Vec::new(),
        listeners,
        kproxy: None,
        client,
        backends,
        node,
    };
    topo.attach_pod(None, [198, 18, 1, 2])?;
    for k in 0..BACKENDS {
        topo.attach_pod(Some(k), backend_ip(k))?;
    }
    let (vip, port) = service_vip(measured_index(count));
    topo.target = match mode {
        Mode::Direct => (0..BACKENDS)
            .map(|k| SocketAddrV4::new(backend_ip(k).into(), BACKEND_PORT))
            .collect(),
        _ => vec![SocketAddrV4::new(vip.into(), port)],
    };
    let sets = endpoint_sets(count);
    let programming = match mode {
        Mode::Direct => None,
        Mode::Iptables => {
            let rules = tempfile_path(&format!("{tag}.iptables"));
            std::fs::write(&rules, iptables_rules(&sets, None))?;
            let loaded = topo.node.netns.run(&["iptables-restore"], Some(&rules));
            let _ = std::fs::remove_file(&rules);
            Some(Programming {
                wall: loaded?.0,
                sync: None,
            })
        }
        Mode::Nftables => {
            let rules = tempfile_path(&format!("{tag}.nft"));
            std::fs::write(&rules, nft_rules(&sets))?;
            let path = rules.to_string_lossy().into_owned();
            let loaded = topo.node.netns.run(&["nft", "-f", &path], None);
            let _ = std::fs::remove_file(&rules);
            Some(Programming {
                wall: loaded?.0,
                sync: None,
            })
        }
        Mode::Kproxy => {
            let bin = kproxy.map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let started = Instant::now();
            let kp = Kproxy::start(bin, &topo.node, &tag, &sets)?;
            topo.kproxy = Some(kp);
            let kp = topo.kproxy.as_mut().expect("just set");
            let sync = kp.wait_ready(count, 1 + BACKENDS)?;
            Some(Programming {
                wall: started.elapsed(),
                sync,
            })
        }
    };
    // Every path works before anything is timed.
    let servers = Servers::start(&topo.listeners)?;
    topo.client.run(|| -> Result<()> {
        for n in 0..20 {
            let to = topo.target[n % topo.target.len()];
            let mut s = connect(to).with_context(|| format!("connecting to {to}"))?;
            exchange(&mut s).with_context(|| format!("a request to {to}"))?;
            abort(s);
        }
        Ok(())
    })??;
    drop(servers);
    Ok(Some((topo, programming)))
}

impl Topology {
    /// A veth pair `pod-c` / `pod-bK` (node) <-> `lab0` (pod) and addresses.
    fn attach_pod(&self, backend: Option<usize>, pod_ip: [u8; 4]) -> Result<()> {
        let (pod, ifname) = match backend {
            None => (&self.client, "pod-c".to_owned()),
            Some(k) => (&self.backends[k], format!("pod-b{k}")),
        };
        let node_ip = dotted([pod_ip[0], pod_ip[1], pod_ip[2], 1]);
        ip(&[
            "link",
            "add",
            "name",
            &ifname,
            "netns",
            self.node.name(),
            "type",
            "veth",
            "peer",
            "name",
            "lab0",
            "netns",
            pod.name(),
        ])?;
        let n = self.node.name();
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            &ifname,
        ])?;
        self.node
            .sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0")?;
        ip(&["-n", n, "link", "set", &ifname, "up"])?;
        let p = pod.name();
        ip(&[
            "-n",
            p,
            "addr",
            "add",
            &format!("{}/24", dotted(pod_ip)),
            "dev",
            "lab0",
        ])?;
        ip(&["-n", p, "link", "set", "lab0", "up"])?;
        ip(&["-n", p, "link", "set", "lo", "up"])?;
        ip(&["-n", p, "route", "add", "default", "via", &node_ip])?;
        Ok(())
    }

    /// One round: latency and keep-alive requests with one thread, then
    /// with server threads, and the new-connection rate.
    fn measure(&self, plan: &Plan) -> Result<Round> {
        let (one_thread, f0, one_thread_requests_per_s) = self.one_thread(plan)?;
        let _servers = Servers::start(&self.listeners)?;
        let (threads, f1) = self.timed_setups(plan, "connections", threaded_setup)?;
        let (requests, f2) = self.parallel(plan.run_for, false)?;
        let (conns, f3) = self.parallel(plan.run_for, true)?;
        Ok(Round {
            one_thread,
            one_thread_requests_per_s,
            threads,
            threads_requests_per_s: requests,
            conns_per_s: conns,
            failures: f0 + f1 + f2 + f3,
        })
    }

    /// `plan.latency_conns` connection setups from the client pod, each
    /// timed by `setup` (after 10 untimed), the targets in turn; fails when
    /// more than a tenth of them fail. Returns (setup times, sorted;
    /// failures).
    fn timed_setups(
        &self,
        plan: &Plan,
        what: &str,
        setup: impl Fn(SocketAddrV4) -> io::Result<Duration> + Sync,
    ) -> Result<(Vec<Duration>, usize)> {
        let targets = &self.target;
        let (times, failures) = self.client.run(|| {
            for n in 0..10 {
                let _ = setup(targets[n % targets.len()]);
            }
            let mut times = Vec::with_capacity(plan.latency_conns);
            let mut failures = 0;
            for n in 0..plan.latency_conns {
                match setup(targets[n % targets.len()]) {
                    Ok(took) => times.push(took),
                    Err(err) => {
                        if failures == 0 {
                            eprintln!(
                                "bench: connections: {}: one of the {what} failed: {err}",
                                self.mode.name()
                            );
                        }
                        failures += 1;
                    }
                }
            }
            times.sort();
            (times, failures)
        })?;
        ensure!(
            times.len() * 10 >= plan.latency_conns * 9,
            "{failures} of {} {what} through {} failed",
            plan.latency_conns,
            self.mode.name()
        );
        Ok((times, failures))
    }

    /// With one thread as both ends and no server threads running:
    /// connection setups (`one_thread_setup`), then requests on one
    /// keep-alive connection for `plan.run_for` (`one_thread_requests`).
    /// Returns (setup times, failures of both, requests/s).
    fn one_thread(&self, plan: &Plan) -> Result<(Vec<Duration>, usize, f64)> {
        let listeners: [&TcpListener; BACKENDS] = std::array::from_fn(|k| &self.listeners[k]);
        // Whatever the threaded phases left queued is not the probe's.
        drain(&listeners);
        let (times, failures) = self.timed_setups(plan, "one-thread connections", |to| {
            one_thread_setup(to, &listeners)
        })?;
        let (requests, request_failures) = self
            .client
            .run(|| one_thread_requests(self.target[0], &listeners, plan.run_for))?
            .with_context(|| {
                format!(
                    "one-thread keep-alive requests through {}",
                    self.mode.name()
                )
            })?;
        Ok((times, failures + request_failures, requests))
    }

    /// PARALLEL client threads for `run_for`: request/response on one
    /// keep-alive connection each, or (`fresh`) a new connection per
    /// request. Returns (operations per second, failures).
    fn parallel(&self, run_for: Duration, fresh: bool) -> Result<(f64, usize)> {
        let barrier = Barrier::new(PARALLEL + 1);
        let targets = &self.target;
        let (ops, failures, elapsed) = std::thread::scope(|s| -> Result<_> {
            let threads: Vec<_> = (0..PARALLEL)
                .map(|t| {
                    let barrier = &barrier;
                    s.spawn(move || -> Result<(u64, usize, Instant)> {
                        let entered = enter(&self.client.file);
                        let mut keep = if fresh || entered.is_err() {
                            None
                        } else {
                            connect(targets[t % targets.len()]).ok()
                        };
                        barrier.wait();
                        entered?;
                        let deadline = Instant::now() + run_for;
                        let (mut ops, mut failures) = (0u64, 0usize);
                        let mut n = t;
                        while Instant::now() < deadline && failures < 100 {
                            n += 1;
                            let ok = if fresh {
                                connect(targets[n % targets.len()])
                                    .and_then(|mut c| exchange(&mut c).map(|()| abort(c)))
                                    .is_ok()
                            } else {
                                match keep.as_mut() {
                                    Some(c) => exchange(c).is_ok(),
                                    None => {
                                        keep = connect(targets[t % targets.len()]).ok();
                                        false
                                    }
                                }
                            };
                            if ok {
                                ops += 1;
                            } else {
                                failures += 1;
                            }
                        }
                        if let Some(c) = keep {
                            abort(c);
                        }
                        Ok((ops, failures, Instant::now()))
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            let (mut ops, mut failures, mut end) = (0, 0, start);
            for t in threads {
                let (o, f, e) = t
                    .join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
                ops += o;
                failures += f;
                end = end.max(e);
            }
            Ok((ops, failures, end - start))
        })?;
        ensure!(
            ops > 0,
            "no request through {} succeeded ({failures} failures)",
            self.mode.name()
        );
        Ok((ops as f64 / elapsed.as_secs_f64(), failures))
    }
}

fn connect(to: SocketAddrV4) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to.into(), IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One new connection from this thread to the backends' server threads,
/// timed from before `connect()` to the answer read.
fn threaded_setup(to: SocketAddrV4) -> io::Result<Duration> {
    let start = Instant::now();
    let mut s = connect(to)?;
    exchange(&mut s)?;
    let took = start.elapsed();
    abort(s);
    Ok(took)
}

fn exchange(s: &mut TcpStream) -> io::Result<()> {
    s.write_all(&[b'q'; REQUEST])?;
    let mut buf = [0u8; RESPONSE];
    s.read_exact(&mut buf)
}

/// One new connection with this thread as both ends, timed from before
/// `connect()` to the answer read: connect, send the request, accept it on
/// whichever backend's listener it reached, read it, answer, read the
/// answer. The packets cross the lab in softirq on this CPU within each
/// syscall (veth delivers through the local backlog), so nothing waits for
/// another thread to be scheduled: the time is the network path (veths,
/// routing, the proxy, TCP) and the syscalls, without the wake-ups the
/// threaded measurement also pays.
fn one_thread_setup(
    to: SocketAddrV4,
    listeners: &[&TcpListener; BACKENDS],
) -> io::Result<Duration> {
    let took = one_thread_setup_once(to, listeners);
    if took.is_err() {
        // Its server side may still wait in a listener's queue: the next
        // connection must not accept it.
        drain(listeners);
    }
    took
}

fn one_thread_setup_once(
    to: SocketAddrV4,
    listeners: &[&TcpListener; BACKENDS],
) -> io::Result<Duration> {
    let start = Instant::now();
    let mut client = connect(to)?;
    client.write_all(&[b'q'; REQUEST])?;
    let mut conn = accept_probe(listeners, start + IO_TIMEOUT)?;
    answer(&mut conn, &mut client)?;
    let took = start.elapsed();
    abort(client);
    Ok(took)
}

/// Requests/s on one keep-alive connection for `run_for`, this thread as
/// both ends (after 10 untimed): send the request, read it on the server
/// side, answer, read the answer. Like `one_thread_setup`, no thread waits
/// to be scheduled, so the time per request is the established path (a
/// request and a response segment, ACKs riding on them or delayed, each
/// through the node and the proxy) and the syscalls. A failed request (a
/// reset, the timeout) is counted and the loop goes on on a new connection;
/// the rate is over the time up to each connection's last answered request.
/// Fails when no request was answered. Returns (requests/s, failures).
fn one_thread_requests(
    to: SocketAddrV4,
    listeners: &[&TcpListener; BACKENDS],
    run_for: Duration,
) -> io::Result<(f64, usize)> {
    let deadline = Instant::now() + run_for;
    let (mut done, mut busy, mut failures) = (0u64, Duration::ZERO, 0usize);
    let mut last_error = None;
    while Instant::now() < deadline && failures < 3 {
        if let Err(err) = keep_alive_requests(to, listeners, deadline, &mut done, &mut busy) {
            if failures == 0 {
                eprintln!("bench: connections: a one-thread keep-alive request failed: {err}");
            }
            failures += 1;
            last_error = Some(err);
            // Its server side may still wait in a listener's queue.
            drain(listeners);
        }
    }
    match (done, last_error) {
        (0, Some(err)) => Err(err),
        (0, None) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no keep-alive request was answered in time",
        )),
        _ => Ok((done as f64 / busy.as_secs_f64(), failures)),
    }
}

/// One connection of `one_thread_requests`: requests until `deadline`,
/// each answered one added to `done`, and the time from the first timed
/// request to the last answered one to `busy`.
fn keep_alive_requests(
    to: SocketAddrV4,
    listeners: &[&TcpListener; BACKENDS],
    deadline: Instant,
    done: &mut u64,
    busy: &mut Duration,
) -> io::Result<()> {
    let mut client = connect(to)?;
    let mut conn = accept_probe(listeners, Instant::now() + IO_TIMEOUT)?;
    let mut one = || -> io::Result<()> {
        client.write_all(&[b'q'; REQUEST])?;
        answer(&mut conn, &mut client)
    };
    for _ in 0..10 {
        one()?;
    }
    let start = Instant::now();
    let mut answered = start;
    let result = loop {
        if answered >= deadline {
            break Ok(());
        }
        if let Err(err) = one() {
            break Err(err);
        }
        *done += 1;
        answered = Instant::now();
    };
    *busy += answered - start;
    abort(client);
    result
}

/// The probe's server side: its connection accepted on whichever backend's
/// listener it reached, with TCP_NODELAY as the server threads set it, and
/// a read timeout.
fn accept_probe(listeners: &[&TcpListener; BACKENDS], deadline: Instant) -> io::Result<TcpStream> {
    let conn = accept_any(listeners, deadline)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// The server side reads the request `client` sent and answers it; the
/// client reads the answer.
fn answer(conn: &mut TcpStream, client: &mut TcpStream) -> io::Result<()> {
    let mut request = [0u8; REQUEST];
    conn.read_exact(&mut request)?;
    conn.write_all(&[b'r'; RESPONSE])?;
    let mut response = [0u8; RESPONSE];
    client.read_exact(&mut response)
}

/// Accepts and closes every connection queued on `listeners`.
fn drain(listeners: &[&TcpListener; BACKENDS]) {
    for listener in listeners {
        while listener.accept().is_ok() {}
    }
}

/// Accepts the next connection on any of `listeners` (nonblocking ones),
/// waiting in poll() until `deadline`.
fn accept_any(listeners: &[&TcpListener; BACKENDS], deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut fds = listeners.map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN));
        // At least a millisecond: a shorter wait would spin.
        let timeout =
            PollTimeout::try_from(left.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX);
        poll(&mut fds, timeout)?;
        let ready = fds.map(|fd| fd.any().unwrap_or(false));
        for (listener, ready) in listeners.iter().zip(ready) {
            if ready {
                match listener.accept() {
                    Ok((conn, _)) => return Ok(conn),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Closes with an RST (SO_LINGER 0): no TIME_WAIT, so thousands of
/// sequential connections never run out of ports.
fn abort(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A backend pod's listener on :8080, nonblocking: a server thread woken
/// for a connection another one took (or the probe did) gets WouldBlock
/// instead of blocking in accept.
fn listen(pod: &Ns) -> Result<TcpListener> {
    let listener = pod.run(|| TcpListener::bind(("0.0.0.0", BACKEND_PORT)))??;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The backend pods' servers: WORKERS threads per listener, each answering
/// every REQUEST-byte request with RESPONSE bytes until the client closes.
/// Each waits in an epoll of its own with its listener registered
/// `EPOLLEXCLUSIVE`, so a new connection wakes one idle thread, as a
/// blocking accept would (poll() on a shared listener would wake every idle
/// one), and on `stop_fd`, which wakes all of them to stop. Stopped and
/// joined on drop, so the one-thread probe has the listeners to itself.
struct Servers {
    stop: Arc<AtomicBool>,
    stop_fd: EventFd,
    threads: Vec<JoinHandle<()>>,
}

/// A safety net only: threads are woken explicitly to stop.
const WORKER_WAIT: Duration = Duration::from_secs(1);

impl Servers {
    fn start(listeners: &[TcpListener; BACKENDS]) -> Result<Self> {
        let mut servers = Self {
            stop: Arc::new(AtomicBool::new(false)),
            stop_fd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            threads: Vec::new(),
        };
        for listener in listeners {
            for _ in 0..WORKERS {
                // Everything that can fail before the thread exists: a
                // failure here drops `servers`, which stops the others.
                let listener = listener.try_clone()?;
                let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
                let readable = EpollFlags::EPOLLIN;
                epoll.add(
                    &listener,
                    EpollEvent::new(readable | EpollFlags::EPOLLEXCLUSIVE, 0),
                )?;
                epoll.add(&servers.stop_fd, EpollEvent::new(readable, 1))?;
                let stop = servers.stop.clone();
                servers.threads.push(std::thread::spawn(move || {
                    let mut events = [EpollEvent::empty(); 2];
                    let wait = EpollTimeout::try_from(WORKER_WAIT).expect("a 1 s timeout fits");
                    while !stop.load(Ordering::SeqCst) {
                        let n = epoll.wait(&mut events, wait).unwrap_or(0);
                        if !events[..n].iter().any(|e| e.data() == 0) {
                            continue;
                        }
                        if let Ok((conn, _)) = listener.accept() {
                            // The listener's O_NONBLOCK is not inherited.
                            serve(conn, &stop);
                        }
                    }
                }));
            }
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Readable from now on: every waiting thread returns and sees `stop`.
        let _ = self.stop_fd.write(1);
        // Bounded: a thread still stuck after 5 s is left behind, not waited for.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

fn serve(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut request = [0u8; REQUEST];
    let response = [b'r'; RESPONSE];
    while !stop.load(Ordering::Relaxed) {
        match conn.read_exact(&mut request) {
            Ok(()) => {
                if conn.write_all(&response).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// `kproxy run` inside a node namespace (entered with setns, so its pins
/// stay visible here), stopped and its pins removed on drop.
struct Kproxy {
    child: Child,
    root: PathBuf,
    pins: PathBuf,
    log: PathBuf,
}

impl Kproxy {
    fn start(bin: &Path, node: &Ns, tag: &str, sets: &[Vec<[u8; 4]>]) -> Result<Self> {
        let root = PathBuf::from(format!("/run/kproxy-bench-{}-{tag}", std::process::id()));
        let (manifests, pins, log) = (root.join("manifests"), root.join("bpf"), root.join("log"));
        std::fs::create_dir_all(&manifests)?;
        std::fs::create_dir_all(&pins)?;
        std::fs::write(manifests.join("services.yaml"), services_yaml(sets))?;
        let netns_fd = node.file.as_raw_fd();
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--source")
            .arg(format!("dir:{}", manifests.display()))
            .args(["--hostname-override", NODE_NAME])
            .args(["--pod-interfaces", "pod-*"])
            .arg("--bpf-pin-path")
            .arg(&pins)
            .args(["--cluster-cidr", POD_CIDR])
            .args(["--healthz-bind-address", "127.0.0.1:10256"])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(["--min-sync-period", "0s"])
            .env("KPROXY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {bin:?}"))?;
        Ok(Self {
            child,
            root,
            pins,
            log,
        })
    }

    /// Waits (bounded) for a sync that programmed every Service with no
    /// failure, and for the program on every pod interface; returns the
    /// sync's own time (`elapsed_ms` in its log line).
    fn wait_ready(&mut self, services: usize, interfaces: usize) -> Result<Option<Duration>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let attached = log.matches("attached pod program").count();
            let synced = log.lines().find(|l| {
                l.contains(" synced")
                    && field(l, "frontends=") >= Some(services)
                    && field(l, "failed=") == Some(0)
            });
            if let Some(line) = synced.filter(|_| attached >= interfaces) {
                let sync = line
                    .find("elapsed_ms=")
                    .and_then(|at| {
                        let rest = &line[at + "elapsed_ms=".len()..];
                        rest.split_whitespace().next()?.parse::<f64>().ok()
                    })
                    .map(|ms| Duration::from_secs_f64(ms / 1e3));
                return Ok(sync);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("kproxy exited with {status}: {}", tail(&log));
            }
            ensure!(
                Instant::now() < deadline,
                "kproxy not ready after 60 s ({attached} interfaces attached): {}",
                tail(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn field(line: &str, key: &str) -> Option<usize> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

impl Drop for Kproxy {
    fn drop(&mut self) {
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = datapath::cleanup(&self.pins);
        let _ = umount2(&self.pins, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The same Services as `iptables_rules` / `nft_rules` get, as Service and
/// EndpointSlice YAML for `--source dir:`.
fn services_yaml(sets: &[Vec<[u8; 4]>]) -> String {
    let mut y = String::new();
    for (i, eps) in sets.iter().enumerate() {
        let (vip, port) = service_vip(i);
        let vip = dotted(vip);
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: bench\n\
             spec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n\
             \x20   - name: http\n      protocol: TCP\n      port: {port}\n      targetPort: {BACKEND_PORT}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n\
             \x20 namespace: bench\n  labels:\n    kubernetes.io/service-name: svc-{i}\n\
             addressType: IPv4\nports:\n  - name: http\n    protocol: TCP\n    port: {BACKEND_PORT}\n\
             endpoints:\n"
        );
        for ep in eps {
            let _ = writeln!(
                y,
                "  - addresses: [{}]\n    conditions: {{ready: true, serving: true, terminating: false}}",
                dotted(*ep)
            );
        }
    }
    y
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

fn render(plan: &Plan, results: &Results, docs: &Path) -> Section {
    let mut md = String::new();
    let mut section = Section::default();
    let _ = writeln!(
        md,
        "## 2. Connections through a lab node (kproxy vs kube-proxy's iptables and nftables modes)\n"
    );
    let _ = writeln!(
        md,
        "Method: one lab per mode, all up at the same time, identical: a node namespace, a \
         client pod and {BACKENDS} backend pods (namespaces on veth pairs, 198.18.k.2/24; no \
         link to the root namespace, whose iptables and nftables are never touched). Each \
         backend runs a TCP server on :{BACKEND_PORT} that answers every {REQUEST}-byte \
         request with {RESPONSE} bytes. The measured Service (ClusterIP, TCP) has the {BACKENDS} \
         backends as endpoints and sits in the middle of the set (index N/2: iptables' \
         KUBE-SERVICES scan passes half the rules, the average Service); the other N-1 are \
         fillers with one endpoint each (their endpoint chains are never traversed).\n\n\
         - **iptables mode**: the nat-table rules kube-proxy writes (KUBE-SERVICES -> \
         KUBE-SVC-* -> KUBE-SEP-* with `statistic --mode random`, DNAT, KUBE-MARK-MASQ / \
         KUBE-POSTROUTING masquerade marks), loaded with `iptables-restore` inside the node \
         namespace ({}).\n\
         - **nftables mode**: table `ip kube-proxy` as kube-proxy's nftables mode writes it \
         (`service-ips` verdict map, `numgen random mod N vmap`, `dnat to`, masquerade marks), \
         loaded with `nft -f`.\n\
         - **kproxy**: the real `kproxy run --source dir:` binary in the node namespace \
         (`--pod-interfaces pod-*`, `--cluster-cidr {POD_CIDR}`) with Service + EndpointSlice \
         YAML for the same Services; measured once its log shows a sync of all N frontends \
         with no failure and its program attached to every pod interface.\n\
         - **direct (no proxy)**: no rules; the client connects to the backend pods' addresses \
         in turn. The floor: what every mode pays for the veths, TCP and the servers.\n\n\
         Programming: wall time of `iptables-restore` / `nft -f`, and from starting kproxy to \
         that first full sync (which includes loading and attaching its eBPF programs; in \
         parentheses the sync's own `elapsed_ms` from kproxy's log). The four labs are built \
         and programmed in parallel to save time (loading the nftables rules alone takes \
         most of it), so these times share 2 vCPUs and are only indicative; section 3 \
         measures programming on its own.\n\n\
         Measured from the client pod (threads that setns() into it) in {} rounds of short \
         slices: in each round every mode takes its turn (order rotated each round), so load \
         from other tenants of this shared VM hits all modes alike. Per round and mode:\n\n\
         - **connection setup**: {} sequential new TCP connections (after 10 untimed), each \
         timed from before `connect()` to the completed first request/response; closed with \
         SO_LINGER 0 (RST, no TIME_WAIT). One thread drives both ends: it connects from the \
         client pod, sends the request, accepts the connection on the backend's listener \
         (no server threads run meanwhile), reads and answers it, and reads the \
         answer. Every packet crosses the lab in softirq on that CPU within the syscall that \
         sent it (veth delivers through the local backlog), so the time is the network path \
         (veths, routing, the proxy, the TCP handshake) and the syscalls, with no thread \
         waiting to be scheduled. p50 and p99 of each round, then the median of the rounds \
         ({} connections per mode and count in all).\n\
         - **keep-alive requests/s**: the same thread, one connection, request/response in a \
         loop for {:.1} s: the established path (a request and a response segment through \
         the node and the proxy, ACKs riding on them or delayed) and the syscalls; median of \
         the rounds. A request that fails is counted (the failures column, with failed \
         connections) and the loop goes on on a new connection.\n\
         - **with server threads**: the same again from client threads to the backends' \
         server threads, closer to real pods: each connection setup also pays two thread \
         wake-ups on this VM's 2 shared vCPUs (the backend's workers wait in epoll with the \
         listener registered `EPOLLEXCLUSIVE`, so one of them wakes per connection, as with \
         a blocking accept), and keep-alive requests/s come from {PARALLEL} client threads, \
         one connection each, for {:.1} s ({} threads on 2 vCPUs: how much that moves \
         between rounds is under the targets).\n\
         - **new connections/s**: {PARALLEL} client threads, each a loop of new connection + \
         one request/response + RST for {:.1} s; median of the rounds.\n\n\
         Ratios and targets compare each round's turns with each other (the median over the \
         rounds of the round's ratio): the turns of one round ran within seconds of each \
         other, so load that moves whole rounds cancels out. The µs beside a ratio are the \
         medians in the table above, which can differ slightly from the median ratio.\n",
        or_missing_version(),
        plan.rounds,
        plan.latency_conns,
        plan.latency_conns * plan.rounds,
        plan.run_for.as_secs_f64(),
        plan.run_for.as_secs_f64(),
        2 * PARALLEL,
        plan.run_for.as_secs_f64(),
    );
    let _ = writeln!(
        md,
        "![connection setup latency](bench-connections.svg)\n\n\
         ![throughput](bench-connections-throughput.svg)\n"
    );
    let _ = writeln!(
        md,
        "| Services | mode | programming | setup p50 (µs) | setup p99 (µs) | keep-alive requests/s | with server threads: setup p50 (µs) | p99 (µs) | keep-alive requests/s ({PARALLEL} threads) | new connections/s ({PARALLEL} threads) | failures |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for &count in &plan.counts {
        for (m, mode) in MODES.iter().enumerate() {
            let cell = &results[&(count, m)];
            if let Some(why) = &cell.unavailable {
                let _ = writeln!(
                    md,
                    "| {count} | {} | {} |  |  |  |  |  |  |  |  |",
                    mode.name(),
                    why
                );
                continue;
            }
            let _ = writeln!(
                md,
                "| {count} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                mode.name(),
                cell.programming.map_or("-".to_owned(), |p| match p.sync {
                    Some(sync) => format!("{:.0} ms (sync {:.0} ms)", ms(p.wall), ms(sync)),
                    None => format!("{:.0} ms", ms(p.wall)),
                }),
                cell.median(Round::p50_us),
                cell.median(Round::p99_us),
                cell.median(Round::requests),
                cell.median(Round::threads_p50_us),
                cell.median(Round::threads_p99_us),
                cell.median(Round::threads_requests),
                cell.median(Round::conns),
                cell.failures()
            );
        }
    }
    let _ = writeln!(md);

    // Ratios against kproxy.
    let (ipt, nft, kp, direct) = (1, 2, 3, 0);
    let get = |count: usize, m: usize| results.get(&(count, m)).filter(|c| c.ok());
    let _ = writeln!(
        md,
        "### Ratios (other mode / kproxy, median of the rounds' ratios; for latency above 1 \
         means kproxy is faster, for throughput below 1 means kproxy does more)\n\n\
         | Services | p99 iptables / kproxy | p99 nftables / kproxy | p50 iptables / kproxy | p50 nftables / kproxy | requests/s iptables / kproxy | requests/s nftables / kproxy | with server threads: p99 iptables / kproxy | p99 nftables / kproxy | requests/s iptables / kproxy | requests/s nftables / kproxy | new conns/s iptables / kproxy | new conns/s nftables / kproxy |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let ratio = |a: Option<&Cell>, b: Option<&Cell>, f: Figure| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", paired(a, b, f)),
        _ => "n/a".to_owned(),
    };
    let figures: [Figure; 6] = [
        Round::p99_us,
        Round::p50_us,
        Round::requests,
        Round::threads_p99_us,
        Round::threads_requests,
        Round::conns,
    ];
    for &count in &plan.counts {
        let k = get(count, kp);
        let cells: Vec<String> = figures
            .iter()
            .flat_map(|&f| [ratio(get(count, ipt), k, f), ratio(get(count, nft), k, f)])
            .collect();
        let _ = writeln!(md, "| {count} | {} |", cells.join(" | "));
    }
    let _ = writeln!(md);

    // Targets.
    let big = *plan.counts.iter().max().unwrap_or(&1);
    let small = *plan.counts.iter().min().unwrap_or(&1);
    let _ = writeln!(
        md,
        "### Targets\n\n\"No worse\" allows {:.0}% for round-to-round noise on this shared VM.\n\n\
         | target | measured | result |\n|---|---|---|",
        NOISE * 100.0
    );
    let mut target = |name: &str, short: &str, measured: Option<(String, bool)>| match measured {
        Some((text, pass)) => {
            let _ = writeln!(md, "| {name} | {text} | {} |", verdict(pass));
            if !pass {
                section.misses.push(short.to_owned());
            }
        }
        None => {
            let _ = writeln!(md, "| {name} | not measured | - |");
        }
    };
    let (k_big, i_big, n_big) = (get(big, kp), get(big, ipt), get(big, nft));
    // (other / kproxy p99 with one thread, the measured text).
    let p99_vs_kproxy = |other: &Cell, k: &Cell| {
        let r = paired(other, k, Round::p99_us);
        let text = format!(
            "{r:.2}x ({:.0} vs {:.0} µs); with server threads {:.2}x ({:.0} vs {:.0} µs)",
            other.median(Round::p99_us),
            k.median(Round::p99_us),
            paired(other, k, Round::threads_p99_us),
            other.median(Round::threads_p99_us),
            k.median(Round::threads_p99_us),
        );
        (r, text)
    };
    target(
        &format!("p99 setup at {big} Services: iptables / kproxy >= 2"),
        &format!("connection p99 vs iptables at {big} Services"),
        i_big.zip(k_big).map(|(i, k)| {
            let (r, text) = p99_vs_kproxy(i, k);
            (text, r >= 2.0)
        }),
    );
    target(
        &format!("p99 setup at {big} Services: kproxy no worse than nftables"),
        &format!("connection p99 vs nftables at {big} Services"),
        n_big.zip(k_big).map(|(n, k)| {
            let (r, text) = p99_vs_kproxy(n, k);
            (text, r * (1.0 + NOISE) >= 1.0)
        }),
    );
    // The lowest kproxy / other ratio of `f` over the counts and modes.
    let worst = |f: Figure| -> Option<(f64, String)> {
        let mut worst: Option<(f64, usize, &str)> = None;
        for &count in &plan.counts {
            let k = get(count, kp)?;
            for (m, name) in [(ipt, "iptables"), (nft, "nftables")] {
                if let Some(other) = get(count, m) {
                    let r = paired(k, other, f);
                    // A NaN (no comparable rounds) is the worst of all.
                    if worst.is_none_or(|w| r.is_nan() || r < w.0) {
                        worst = Some((r, count, name));
                    }
                }
            }
        }
        worst.map(|(r, count, name)| {
            (
                r,
                format!("worst kproxy / {name} = {r:.2}x at {count} Services"),
            )
        })
    };
    target(
        "keep-alive requests/s: kproxy no worse than iptables or nftables (every count)",
        "keep-alive throughput",
        worst(Round::requests).map(|(r, text)| {
            let threads = worst(Round::threads_requests).map_or(String::new(), |(_, t)| {
                format!("; with {PARALLEL} client threads {t}")
            });
            (format!("{text}{threads}"), r >= 1.0 - NOISE)
        }),
    );
    target(
        &format!(
            "new connections/s ({PARALLEL} threads): kproxy no worse than iptables or nftables \
             (every count)"
        ),
        "new-connection rate",
        worst(Round::conns).map(|(r, text)| (text, r >= 1.0 - NOISE)),
    );
    let _ = writeln!(md);
    if let (Some(f), Some(k), Some(i)) = (get(big, direct), k_big, i_big) {
        let _ = writeln!(
            md,
            "The latency and keep-alive targets are judged on the one-thread figures: they hold \
             the network path and the proxy's work and nothing else. With server threads every \
             connection also waits for two thread wake-ups on 2 shared vCPUs: there the floor is \
             {:.0} / {:.0} µs p50 / p99 (one thread: {:.0} / {:.0}), and iptables / kproxy at \
             p99 is {:.2}x. What iptables adds over kproxy at p50 at {big} Services: {:.0} µs \
             with one thread, {:.0} µs with server threads. The keep-alive requests/s of \
             {PARALLEL} client threads move by {:.1}% between rounds (kproxy at {big} Services; \
             interquartile range over the median), against {:.1}% with one thread.\n",
            f.median(Round::threads_p50_us),
            f.median(Round::threads_p99_us),
            f.median(Round::p50_us),
            f.median(Round::p99_us),
            paired(i, k, Round::threads_p99_us),
            i.median(Round::p50_us) - k.median(Round::p50_us),
            i.median(Round::threads_p50_us) - k.median(Round::threads_p50_us),
            k.spread(Round::threads_requests) * 100.0,
            k.spread(Round::requests) * 100.0,
        );
    }

    // Plots.
    let empty_series = || -> Vec<(String, Vec<f64>)> {
        MODES
            .iter()
            .map(|m| (m.name().to_owned(), Vec::new()))
            .collect()
    };
    let mut groups = Vec::new();
    let mut latency = empty_series();
    for &count in &plan.counts {
        groups.push(format!("{count}: p50"));
        groups.push(format!("{count}: p99"));
        groups.push(format!("{count}: p99, threads"));
        for (m, s) in latency.iter_mut().enumerate() {
            let cell = get(count, m);
            for f in [Round::p50_us, Round::p99_us, Round::threads_p99_us] {
                s.1.push(cell.map_or(f64::NAN, |c| c.median(f)));
            }
        }
    }
    let svg = bar_chart(
        "New TCP connection + first request, by Service count (lower is better)",
        "microseconds",
        &groups,
        &latency,
    );
    let mut throughput_groups = Vec::new();
    let mut throughput = empty_series();
    for &count in &plan.counts {
        throughput_groups.push(format!("{count}: keep-alive req/s"));
        throughput_groups.push(format!("{count}: keep-alive req/s, {PARALLEL} threads"));
        throughput_groups.push(format!("{count}: new conn/s, {PARALLEL} threads"));
        for (m, s) in throughput.iter_mut().enumerate() {
            let cell = get(count, m);
            for f in [Round::requests, Round::threads_requests, Round::conns] {
                s.1.push(cell.map_or(f64::NAN, |c| c.median(f)));
            }
        }
    }
    let svg2 = bar_chart(
        "Throughput by Service count (higher is better)",
        "per second",
        &throughput_groups,
        &throughput,
    );
    for (name, text) in [
        ("bench-connections.svg", svg),
        ("bench-connections-throughput.svg", svg2),
    ] {
        if let Err(err) = std::fs::write(docs.join(name), text) {
            eprintln!("bench: connections: writing {name}: {err}");
        }
    }

    // Why the misses happen, from this run's figures.
    let mut why = String::new();
    if !section.misses.is_empty() {
        let _ = writeln!(why, "Connections (section 2), from this run's figures:\n");
        let floor = get(big, direct);
        let growth = |m: usize| -> Option<(f64, f64)> {
            Some((
                get(small, m)?.median(Round::p50_us),
                get(big, m)?.median(Round::p50_us),
            ))
        };
        if let Some(f) = floor {
            let _ = writeln!(
                why,
                "- The floor (no proxy at all) is {:.0} µs p50 / {:.0} µs p99 at {big} Services \
                 (with server threads {:.0} / {:.0} µs): two veth hops each way, the handshake, \
                 one request/response, the syscalls (and the wake-ups). Every mode pays it; a \
                 proxy can only add to it.",
                f.median(Round::p50_us),
                f.median(Round::p99_us),
                f.median(Round::threads_p50_us),
                f.median(Round::threads_p99_us),
            );
        }
        for (m, name) in [
            (ipt, "iptables mode"),
            (nft, "nftables mode"),
            (kp, "kproxy"),
        ] {
            if let (Some((a, b)), Some(f)) = (growth(m), floor) {
                let _ = writeln!(
                    why,
                    "- {name}: p50 {a:.0} µs at {small} Service(s), {b:.0} µs at {big} \
                     ({:+.0} µs from the Service count; {:+.0} µs over the floor at {big}).",
                    b - a,
                    b - f.median(Round::p50_us)
                );
            }
        }
        if let (Some((a, b)), Some(f), Some(k), Some(i)) = (growth(ipt), floor, k_big, i_big) {
            let per_rule = (b - a).max(0.0) * 1000.0 / (big as f64 / 2.0).max(1.0);
            let _ = writeln!(
                why,
                "- Only the first packet of a connection walks the nat chains (conntrack \
                 remembers the NAT for the rest), so iptables' cost of {big} Services is one \
                 scan of about {} KUBE-SERVICES rules per connection, about {per_rule:.0} ns a \
                 rule here (iptables-nft bytecode), while kproxy's lookup is one hash probe at \
                 any count. That makes iptables {:.2}x slower than kproxy at p50. At p99 the \
                 ratio is {:.2}x because the tail is not the proxy: the floor's own p99 is \
                 {:.0} µs, {:.1}x its p50 (interrupts and other tenants of this 2-vCPU VM; with \
                 server threads also their wake-ups), and every mode carries that tail. A 2x \
                 p99 ratio needs the scan to cost as much as the whole tail: even a proxy that \
                 cost nothing would show iptables / floor = {:.2}x here.",
                big / 2,
                paired(i, k, Round::p50_us),
                paired(i, k, Round::p99_us),
                f.median(Round::p99_us),
                f.median(Round::p99_us) / f.median(Round::p50_us),
                paired(i, f, Round::p99_us),
            );
        }
        let _ = writeln!(
            why,
            "- Established packets never reach the nat chains in iptables or nftables mode: \
             netfilter conntrack translates them, and the node namespace of those modes pays \
             for conntrack on every packet. kproxy runs its tc program on every packet of \
             both directions instead (a conntrack-map lookup and the rewrite: section 1's tc \
             established and reply paths), so keep-alive throughput compares two per-packet fast \
             paths of similar cost, a small part of each request's syscalls and veth hops; \
             on this shared VM (other tenants' builds and lab tests run at the same time) a \
             keep-alive miss within a few percent is noise unless it repeats."
        );
        // Round by round: a round measures every mode back to back, so the
        // same round's turns share the load that moves whole rounds.
        let ahead = |other: usize, f: Figure, lower_is_better: bool| {
            let (k, o) = (get(big, kp)?, get(big, other)?);
            round_pairs(k, o).map(|pairs| {
                let wins = pairs
                    .filter(|(kr, or)| {
                        let (k, o) = (f(kr), f(or));
                        if lower_is_better {
                            k < o
                        } else {
                            k > o
                        }
                    })
                    .count();
                format!("{wins} of {}", k.rounds.len())
            })
        };
        if let (Some(p_ipt), Some(p_nft), Some(r_ipt), Some(r_nft)) = (
            ahead(ipt, Round::p99_us, true),
            ahead(nft, Round::p99_us, true),
            ahead(ipt, Round::requests, false),
            ahead(nft, Round::requests, false),
        ) {
            let _ = writeln!(
                why,
                "- Round by round at {big} Services (each round's turns compared with each \
                 other): kproxy's p99 was lower than iptables' in {p_ipt} rounds and than \
                 nftables' in {p_nft}; its keep-alive requests/s were higher than iptables' in \
                 {r_ipt} and than nftables' in {r_nft}."
            );
        }
        let spreads: Vec<String> = plan
            .counts
            .iter()
            .filter_map(|&count| {
                let pct = |m: usize| {
                    get(count, m).map_or(f64::NAN, |c| c.spread(Round::requests) * 100.0)
                };
                get(count, kp)?;
                Some(format!(
                    "{count}: kproxy {:.0}%, iptables {:.0}%, nftables {:.0}%",
                    pct(kp),
                    pct(ipt),
                    pct(nft)
                ))
            })
            .collect();
        let _ = writeln!(
            why,
            "- How far one-thread keep-alive requests/s move between rounds in this run (interquartile \
             range of the {} rounds over their median), per Service count: {}.",
            plan.rounds,
            spreads.join("; ")
        );
    }
    section.markdown = md;
    section.why = why;
    section
}

/// The median over the rounds of `f(a's round) / f(b's round)` (NaN when
/// the two do not have the same rounds). The turns of a round ran within
/// seconds of each other, so the load that moves whole rounds on this
/// shared VM cancels out of each ratio.
fn paired(a: &Cell, b: &Cell, f: Figure) -> f64 {
    let Some(pairs) = round_pairs(a, b) else {
        return f64::NAN;
    };
    let mut ratios: Vec<f64> = pairs.map(|(x, y)| f(x) / f(y)).collect();
    median(&mut ratios)
}

/// Two cells' rounds side by side, or None when their counts differ.
fn round_pairs<'a>(
    a: &'a Cell,
    b: &'a Cell,
) -> Option<impl Iterator<Item = (&'a Round, &'a Round)>> {
    (a.rounds.len() == b.rounds.len()).then(|| a.rounds.iter().zip(&b.rounds))
}

fn or_missing_version() -> String {
    let out = Command::new("iptables-restore")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if out.is_empty() {
        "not installed".into()
    } else {
        out
    }
}
