//! Part 4: XDP forwarding in the lab: packets per second a NodePort
//! forwards against the same frames dropped by an empty XDP program and
//! against iptables DNAT of the same flows.
//!
//! The kernel is the load generator (a userspace generator on two vCPUs
//! would be the bottleneck): BPF_PROG_TEST_RUN with
//! BPF_F_TEST_XDP_LIVE_FRAMES runs an XDP program on `repeat` copies of a
//! frame as if received on a node's `ext0` and acts on the verdict for real
//! (XDP_TX goes out of `ext0`, XDP_PASS enters the node's stack, XDP_DROP
//! drops). The frame pages are recycled without being copied again, so a
//! program that rewrites the frame (kproxy's NAT, or iptables' NAT on the
//! skb built on the same page) would see its own output on the next
//! repetition. Every configuration therefore runs behind the same wrapper,
//! which writes the 42 header bytes of the template back and tail-calls the
//! program measured.
//!
//! The syscall's time includes the softirq work its frames cause on the
//! injecting CPU, downstream included. Two measurements therefore:
//! - wire (the main one): the bridge-side end of the node's wire runs a
//!   tap, an XDP program that counts and drops every frame, so only the
//!   node's own work (plus the wire's receive end) is timed; the pass
//!   program is put back afterwards;
//! - end to end: the lab as it is, frames counted at the pod.
//!
//! Topology: the two-node lab of `tests/cluster` (node-a, node-b and pod b1
//! behind node-b, one kproxy per node), plus a node of this part's own,
//! node-i, on the same bridge with no kproxy and kube-proxy-like iptables
//! NAT rules, so kproxy's tc programs never see the iptables traffic.

use std::os::fd::{AsRawFd as _, OwnedFd};

use super::*;

// The cluster includes raw_bpf itself (as main.rs does, as `raw`).
#[allow(clippy::duplicate_mod)]
#[path = "../../tests/cluster/mod.rs"]
mod cluster;
#[path = "../../tests/lab/mod.rs"]
mod lab;

use cluster::{
    frontends_at, service_with_endpoints, Cluster, Endpoint, Port, ServiceSpec, CLIENT_1_IP,
    EXT_IF, NODE_A, NODE_A_IP, NODE_B, NODE_B_IP,
};
use proxy_common::stat;

const NODE_PORT: u16 = 30080;
const SERVICE_PORT: u16 = 80;
const CLIENT_PORT: u16 = 40000;
/// node-i: the same node as node-a, but iptables instead of kproxy.
const IPTABLES_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 13);
/// node-i's wire end on the bridge (node-a's is called `NODE_A`).
const NODE_I_PEER: &str = "node-i";
const BACKEND_POD: &str = "b1";
/// 60 bytes: a minimum-size Ethernet frame (64 on the wire with the FCS).
const FRAME_LEN: usize = 60;
/// Ethernet + IPv4 + UDP: what NAT rewrites, and what the wrapper restores.
const HEADER_LEN: usize = 42;
/// Below this, a configuration's rate is not reported as a forwarding rate.
const MIN_DELIVERED: f64 = 0.9;
/// Flows of the many-flows measurement: client ports `CLIENT_PORT` up,
/// in turn. Below the 4536 SNAT ports kproxy has per backend and node
/// address, so every flow gets one.
const MANY_FLOWS: u32 = 4000;
/// The payload's first 16-bit word in the template (bytes 0x5a 0x5a): the
/// many-flows wrapper lowers it by as much as it raises the client port,
/// so the UDP checksum stays valid with no arithmetic on it.
const PAYLOAD_WORD: u16 = 0x5a5a;
// Neither the port nor the word wraps around.
const _: () =
    assert!(CLIENT_PORT as u32 + MANY_FLOWS <= 0xffff && PAYLOAD_WORD as u32 >= MANY_FLOWS);

/// Frames of each configuration's warm-up (not counted): every one of the
/// many flows at least twice, the first frame of each opening it.
const WARMUP_FRAMES: u32 = 10_000;
const _: () = assert!(WARMUP_FRAMES >= 2 * MANY_FLOWS);

/// One flow, or `MANY_FLOWS` in turn.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flows {
    One,
    Many,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Floor,
    Tx,
    Kproxy,
    Iptables,
}

impl Kind {
    /// The wire measurement; also the slots of the prog array.
    const ALL: [Kind; 4] = [Kind::Floor, Kind::Tx, Kind::Kproxy, Kind::Iptables];
    /// The end-to-end measurement: the two floors end on node-a either way.
    const END_TO_END: [Kind; 2] = [Kind::Kproxy, Kind::Iptables];

    fn slot(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap()
    }

    /// The wire its frames leave on: 0 node-a's, 1 node-i's.
    fn wire(self) -> usize {
        usize::from(self == Kind::Iptables)
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Floor => "empty XDP_DROP (floor)",
            Kind::Tx => "bare XDP_TX (no NAT, same frame back out)",
            Kind::Kproxy => "kproxy XDP (DNAT + SNAT, XDP_TX)",
            Kind::Iptables => "iptables DNAT + MASQUERADE (XDP_PASS)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Kind::Floor => "floor (XDP_DROP)",
            Kind::Tx => "bare XDP_TX",
            Kind::Kproxy => "kproxy (XDP_TX)",
            Kind::Iptables => "iptables (stack)",
        }
    }
}

/// One injection: frames, wall time of the syscall, what arrived.
struct Sample {
    frames: u32,
    wall: Duration,
    kernel_ns: u32,
    /// Wire: frames the tap saw leave the node translated (from the node
    /// to the pod; for the bare XDP_TX, the untouched frames too). End to
    /// end: the pod's rx packets.
    delivered: u64,
    /// Wire: any other frame the tap saw on that wire.
    other: u64,
    /// kproxy's `xdp_forward` counter on node-a, rise during the run.
    xdp_forwarded: u64,
    /// kproxy's `fib_lookup` counter on node-a (FIB lookups the route
    /// cache did not answer), rise during the run.
    fib_lookups: u64,
    /// kproxy's `flow_cache_fill` counter on node-a (frames that read
    /// conntrack and refilled their flow cache slot), rise.
    cache_fills: u64,
    /// kproxy's `ct_created` counter on node-a (flows opened), rise.
    flows_opened: u64,
}

impl Sample {
    fn pps(&self) -> f64 {
        f64::from(self.frames) / self.wall.as_secs_f64()
    }
    fn delivered_fraction(&self) -> f64 {
        self.delivered as f64 / f64::from(self.frames)
    }
}

/// One measurement: `samples[i]` are the runs of `kinds[i]`.
struct Measured {
    kinds: Vec<Kind>,
    runs: usize,
    repeat: u32,
    warmup: Vec<Sample>,
    samples: Vec<Vec<Sample>>,
}

impl Measured {
    fn pos(&self, kind: Kind) -> Option<usize> {
        self.kinds.iter().position(|k| *k == kind)
    }
    fn median(&self, kind: Kind, f: impl Fn(&Sample) -> f64) -> f64 {
        let Some(i) = self.pos(kind) else {
            return f64::NAN;
        };
        let mut v: Vec<f64> = self.samples[i].iter().map(f).collect();
        median(&mut v)
    }
    fn pps(&self, kind: Kind) -> f64 {
        self.median(kind, Sample::pps)
    }
    fn delivered(&self, kind: Kind) -> f64 {
        self.median(kind, Sample::delivered_fraction)
    }
    fn forwarding(&self, kind: Kind) -> bool {
        kind == Kind::Floor || self.delivered(kind) >= MIN_DELIVERED
    }
    fn sum(&self, kind: Kind, f: impl Fn(&Sample) -> u64) -> (u64, u64) {
        self.pos(kind).map_or((0, 0), |i| {
            let s = &self.samples[i];
            (
                s.iter().map(&f).sum(),
                s.iter().map(|s| u64::from(s.frames)).sum(),
            )
        })
    }
}

/// The lab: fields drop in order, so the programs go before the namespaces.
struct Bed {
    /// Wrapper `i` tail-calls slot `i` of `targets`: `Kind::ALL[i]`'s;
    /// `[0]` sends one flow, `[1]` `MANY_FLOWS`.
    wrappers: [Vec<OwnedFd>; 2],
    /// The many-flows wrappers' frame counter (one u64).
    _flow_counter: OwnedFd,
    _targets: OwnedFd,
    _programs: Vec<OwnedFd>,
    iptables_node: lab::Netns,
    cluster: Cluster,
    kproxy_frame: Vec<u8>,
    iptables_frame: Vec<u8>,
}

/// Part 4: measures, writes the plots into `docs`, renders the section.
pub fn run(config: &Config, docs: &Path) -> Result<Section> {
    // Wire: around a million frames per second; end to end: the whole
    // chain runs at tens of thousands (see the section). These counts keep
    // part 4 under 1 / 3 minutes.
    let (wire_runs, wire_repeat, e2e_runs, e2e_repeat) = if config.quick {
        (5, 500_000, 3, 100_000)
    } else {
        (7, 2_000_000, 5, 300_000)
    };
    eprintln!(
        "bench: XDP forwarding (wire: {wire_runs} x {wire_repeat} frames per configuration, \
         end to end: {e2e_runs} x {e2e_repeat})"
    );
    let kproxy = kproxy_binary()?;
    let bed = Bed::new(&kproxy)?;
    let (wire, wire_many) = {
        // The tap puts the pass programs back when it drops (also on an
        // error), so the end-to-end measurement finds the lab as it was.
        let tap = WireTap::attach(&bed)?;
        let one = bed.measure(&Kind::ALL, Flows::One, wire_runs, wire_repeat, Some(&tap))?;
        let many = bed.measure(&Kind::ALL, Flows::Many, wire_runs, wire_repeat, Some(&tap))?;
        (one, many)
    };
    let e2e = bed.measure(&Kind::END_TO_END, Flows::One, e2e_runs, e2e_repeat, None)?;
    drop(bed);
    render(config, docs, &wire, &wire_many, &e2e)
}

impl Bed {
    fn new(kproxy: &Path) -> Result<Self> {
        let mut cluster = Cluster::new(kproxy, &[], &[BACKEND_POD]);
        let backend = cluster.pod(BACKEND_POD);
        let svc = ServiceSpec::new("fwd", "NodePort", Ipv4Addr::new(198, 19, 0, 40))
            .port(Port::udp(SERVICE_PORT).node_port(NODE_PORT));
        cluster.write_manifest(
            "svc.yaml",
            &service_with_endpoints(&svc, &[Endpoint::of(backend)]),
        );
        // No server in the pod: frames end at its interface (an ICMP port
        // unreachable now and then, rate-limited by the pod's kernel).
        for netns in [&cluster.node(NODE_B).netns, &cluster.pod(BACKEND_POD).netns] {
            netns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        }
        cluster.start();
        cluster.wait_maps(NODE_A, "the NodePort", Duration::from_secs(10), |m| {
            !frontends_at(m, NODE_A_IP, NODE_PORT).is_empty()
        });

        let iptables_node = lab::Netns::create(format!("{}-node-i", cluster.id));
        plain_node(&cluster, &iptables_node)?;

        // Static neighbours: no ARP during a run, the same for every path.
        let node_b_mac = mac(&cluster.node(NODE_B).netns.name, EXT_IF)?;
        for netns in [&cluster.node(NODE_A).netns.name, &iptables_node.name] {
            lab::ip(&[
                "-n",
                netns,
                "neigh",
                "replace",
                &NODE_B_IP.to_string(),
                "lladdr",
                &node_b_mac,
                "dev",
                EXT_IF,
                "nud",
                "permanent",
            ]);
        }
        // And a static bridge entry: the bridge never floods node-b's frames.
        lab::run(Command::new("bridge").args([
            "-n",
            &cluster.bridge.name,
            "fdb",
            "replace",
            &node_b_mac,
            "dev",
            NODE_B,
            "master",
            "static",
        ]));
        let pod = cluster.pod(BACKEND_POD);
        lab::ip(&[
            "-n",
            &cluster.node(NODE_B).netns.name,
            "neigh",
            "replace",
            &pod.ip.to_string(),
            "lladdr",
            &mac(&pod.netns.name, "lab0")?,
            "dev",
            &pod.ifname,
            "nud",
            "permanent",
        ]);

        let client_mac = [0x02, 0, 0x5e, 0x10, 0, 0x21];
        let kproxy_frame = udp_frame(
            client_mac,
            parse_mac(&mac(&cluster.node(NODE_A).netns.name, EXT_IF)?)?,
            NODE_A_IP,
        )?;
        let iptables_frame = udp_frame(
            client_mac,
            parse_mac(&mac(&iptables_node.name, EXT_IF)?)?,
            IPTABLES_NODE_IP,
        )?;

        // The programs measured, in a prog array, and one wrapper per slot.
        let kproxy_id = xdp_prog_id(&cluster.node(NODE_A).netns.name, EXT_IF)?;
        let programs = vec![
            raw::load_program(
                raw::BPF_PROG_TYPE_XDP,
                raw::BPF_XDP,
                &return_insns(raw::XDP_DROP),
                "bench_xdp_drop",
            )?,
            raw::load_program(
                raw::BPF_PROG_TYPE_XDP,
                raw::BPF_XDP,
                &return_insns(raw::XDP_TX),
                "bench_xdp_tx",
            )?,
            raw::prog_fd_by_id(kproxy_id)
                .with_context(|| format!("no program with id {kproxy_id} (node-a's ext0)"))?,
            raw::load_program(
                raw::BPF_PROG_TYPE_XDP,
                raw::BPF_XDP,
                &return_insns(raw::XDP_PASS),
                "bench_xdp_pass",
            )?,
        ];
        let targets = raw::create_prog_array(programs.len() as u32)?;
        for (i, prog) in programs.iter().enumerate() {
            raw::prog_array_set(targets.as_fd(), i as u32, prog.as_fd()).with_context(|| {
                format!(
                    "putting the {} program into the prog array (kproxy's XDP program \
                     must be a plain XDP program without frags)",
                    Kind::ALL[i].short()
                )
            })?;
        }
        let flow_counter = raw::create_u64_array(1).context("the wrappers' frame counter")?;
        let mut wrappers = [Vec::new(), Vec::new()];
        for (flows, wrappers) in [Flows::One, Flows::Many].into_iter().zip(&mut wrappers) {
            for (i, kind) in Kind::ALL.iter().enumerate() {
                let template = match kind {
                    Kind::Iptables => &iptables_frame,
                    _ => &kproxy_frame,
                };
                let many = (flows == Flows::Many).then(|| flow_counter.as_raw_fd());
                let insns = wrapper_insns(template, targets.as_raw_fd(), i as i32, many);
                wrappers.push(raw::load_program(
                    raw::BPF_PROG_TYPE_XDP,
                    raw::BPF_XDP,
                    &insns,
                    "bench_xdp_wrap",
                )?);
            }
        }
        Ok(Self {
            wrappers,
            _flow_counter: flow_counter,
            _targets: targets,
            _programs: programs,
            iptables_node,
            cluster,
            kproxy_frame,
            iptables_frame,
        })
    }

    /// `runs` interleaved rounds of `repeat` frames of every kind (the order
    /// rotated each round), after a warm-up (not counted) that fills
    /// conntrack (kproxy's and the node's) and checks every path once.
    fn measure(
        &self,
        kinds: &[Kind],
        flows: Flows,
        runs: usize,
        repeat: u32,
        tap: Option<&WireTap<'_>>,
    ) -> Result<Measured> {
        let mut warmup = Vec::new();
        for kind in kinds {
            // Every flow at least twice: the first frame of each opens it.
            warmup.push(self.inject(*kind, flows, WARMUP_FRAMES, tap)?);
        }
        let mut samples: Vec<Vec<Sample>> = kinds.iter().map(|_| Vec::new()).collect();
        for round in 0..runs {
            for k in 0..kinds.len() {
                let i = (k + round) % kinds.len();
                samples[i].push(self.inject(kinds[i], flows, repeat, tap)?);
            }
        }
        Ok(Measured {
            kinds: kinds.to_vec(),
            runs,
            repeat,
            warmup,
            samples,
        })
    }

    /// Injects `frames` copies of `kind`'s frame at its node's `ext0` and
    /// waits until the counter where they end settles: the tap's at the
    /// other end of the wire if there is one, else the pod's interface.
    fn inject(
        &self,
        kind: Kind,
        flows: Flows,
        frames: u32,
        tap: Option<&WireTap<'_>>,
    ) -> Result<Sample> {
        let (netns, frame) = match kind {
            Kind::Iptables => (&self.iptables_node, &self.iptables_frame),
            _ => (&self.cluster.node(NODE_A).netns, &self.kproxy_frame),
        };
        let prog = self.wrappers[usize::from(flows == Flows::Many)][kind.slot()].as_fd();
        let pod = &self.cluster.pod(BACKEND_POD).netns.name;
        let node_a = self.cluster.node(NODE_A);
        // (translated, other): the bare XDP_TX sends the frame untouched.
        let counts = || -> Result<(u64, u64)> {
            match tap {
                Some(tap) => {
                    let (translated, other) = tap.counts(kind.wire())?;
                    Ok(if kind == Kind::Tx {
                        (translated + other, 0)
                    } else {
                        (translated, other)
                    })
                }
                None => Ok((rx_packets(pod, "lab0")?, 0)),
            }
        };
        let before = counts()?;
        let forwarded_before = node_a.stat(stat::XDP_FORWARD);
        let lookups_before = node_a.stat(stat::FIB_LOOKUP);
        let opened_before = node_a.stat(stat::CT_CREATED);
        let fills_before = node_a.stat(stat::FLOW_CACHE_FILL);
        // The ingress ifindex is resolved in the caller's namespace: the run
        // happens on a thread inside the node's.
        let run = netns.run(|| -> Result<raw::Run> {
            let ifindex = nix::net::if_::if_nametoindex(EXT_IF)?;
            let ctx = raw::xdp_md_for(ifindex, frame.len());
            Ok(raw::test_run_with(
                prog,
                frame,
                &mut [],
                &raw::RunOptions {
                    repeat: frames,
                    ctx: Some(&ctx),
                    flags: raw::BPF_F_TEST_XDP_LIVE_FRAMES,
                    batch_size: 0,
                },
            )?)
        })?;
        let wall = Duration::from_secs_f64(run.wall_ns * f64::from(frames) / 1e9);
        // Frames still in queues when the syscall returns: wait until the
        // counter stops moving (bounded).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = counts()?;
        let mut still = 0;
        while still < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(30));
            let now = counts()?;
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        Ok(Sample {
            frames,
            wall,
            kernel_ns: run.kernel_ns,
            delivered: last.0.saturating_sub(before.0),
            other: last.1.saturating_sub(before.1),
            xdp_forwarded: node_a.stat(stat::XDP_FORWARD) - forwarded_before,
            fib_lookups: node_a.stat(stat::FIB_LOOKUP) - lookups_before,
            flows_opened: node_a.stat(stat::CT_CREATED) - opened_before,
            cache_fills: node_a.stat(stat::FLOW_CACHE_FILL) - fills_before,
        })
    }
}

/// The wire taps: while one lives, the bridge-side ends of node-a's and
/// node-i's `ext0` run a program that counts and drops every frame instead
/// of the lab's pass program, so what leaves a node goes no further. Its
/// drop puts pass programs back (also on an error). Everything stays in the
/// lab's bridge namespace and bpffs.
struct WireTap<'a> {
    bridge: &'a str,
    bpffs: PathBuf,
    /// Slots `2w` and `2w + 1`: wire `w`'s translated and other frames.
    counts: OwnedFd,
    attached: Vec<&'static str>,
}

impl<'a> WireTap<'a> {
    fn attach(bed: &'a Bed) -> Result<Self> {
        let mut tap = Self {
            bridge: &bed.cluster.bridge.name,
            bpffs: bed.cluster.root.join("xdp-pass"),
            counts: raw::create_u64_array(4).context("the wire tap's counters")?,
            attached: Vec::new(),
        };
        let pod_ip = bed.cluster.pod(BACKEND_POD).ip;
        for (wire, (peer, node_ip)) in [(NODE_A, NODE_A_IP), (NODE_I_PEER, IPTABLES_NODE_IP)]
            .into_iter()
            .enumerate()
        {
            let insns = tap_insns(tap.counts.as_raw_fd(), 2 * wire as i32, node_ip, pod_ip);
            let prog = raw::load_program(
                raw::BPF_PROG_TYPE_XDP,
                raw::BPF_XDP,
                &insns,
                "bench_wire_tap",
            )?;
            // Listed first: a half-done attach is restored too.
            tap.attached.push(peer);
            attach_xdp(tap.bridge, peer, prog.as_fd(), &tap.bpffs, "tap")?;
        }
        Ok(tap)
    }

    /// (translated, other) frames the tap of wire `wire` has dropped.
    fn counts(&self, wire: usize) -> Result<(u64, u64)> {
        let get = |slot: usize| {
            raw::u64_array_get(self.counts.as_fd(), slot as u32)
                .context("reading the wire tap's counters")
        };
        Ok((get(2 * wire)?, get(2 * wire + 1)?))
    }
}

impl Drop for WireTap<'_> {
    fn drop(&mut self) {
        for peer in &self.attached {
            let restored = raw::load_xdp_return_program(raw::XDP_PASS, "lab_xdp_pass")
                .map_err(anyhow::Error::from)
                .and_then(|pass| attach_xdp(self.bridge, peer, pass.as_fd(), &self.bpffs, "pass"));
            if let Err(err) = restored {
                eprintln!("bench: putting the pass program back on {peer}: {err:#}");
            }
        }
    }
}

/// Attaches `prog` in native mode to `ifname` in `netns` with iproute2,
/// replacing what is there, through a pin on the lab's bpffs `bpffs` (the
/// attachment keeps the program alive once the pin is gone).
fn attach_xdp(
    netns: &str,
    ifname: &str,
    prog: BorrowedFd<'_>,
    bpffs: &Path,
    tag: &str,
) -> Result<()> {
    let pin = bpffs.join(format!("{tag}-{ifname}"));
    raw::obj_pin(prog, &pin).with_context(|| format!("pinning {}", pin.display()))?;
    let attached = Command::new("ip")
        .args(["-force", "-n", netns, "link", "set", "dev", ifname])
        .args(["xdpdrv", "pinned"])
        .arg(&pin)
        .status();
    let _ = std::fs::remove_file(&pin);
    ensure!(
        attached?.success(),
        "attaching an XDP program to {ifname} in {netns}"
    );
    Ok(())
}

/// node-i: a node namespace like node-a (same sysctls, wire, offloads and
/// pass-through program on its bridge-side peer), no kproxy, and the NAT a
/// NodePort gets from iptables: DNAT to the backend, MASQUERADE towards it.
fn plain_node(cluster: &Cluster, netns: &lab::Netns) -> Result<()> {
    let peer = NODE_I_PEER;
    let bridge = &cluster.bridge.name;
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        netns.sysctl(key, value);
    }
    lab::veth_pair(EXT_IF, &netns.name, peer, bridge);
    lab::ip(&["-n", bridge, "link", "set", peer, "master", "br0"]);
    lab::ip(&["-n", bridge, "link", "set", peer, "up"]);
    lab::ip(&[
        "-n",
        &netns.name,
        "addr",
        "add",
        &format!("{IPTABLES_NODE_IP}/24"),
        "dev",
        EXT_IF,
    ]);
    netns.exec("ethtool", &["-K", EXT_IF, "tx", "off"]);
    lab::ip(&["-n", &netns.name, "link", "set", EXT_IF, "up"]);
    lab::ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
    netns.sysctl(&format!("net.ipv4.conf.{EXT_IF}.rp_filter"), "0");
    // As the cluster does for node-a: the bridge-side peer runs a pass
    // program, so both nodes' frames take the same (NAPI) way into it.
    let pass = raw::load_xdp_return_program(raw::XDP_PASS, "lab_xdp_pass")?;
    attach_xdp(
        bridge,
        peer,
        pass.as_fd(),
        &cluster.root.join("xdp-pass"),
        "pass",
    )?;
    let pod = cluster.pod(BACKEND_POD);
    let o = pod.ip.octets();
    lab::ip(&[
        "-n",
        &netns.name,
        "route",
        "add",
        &format!("{}.{}.{}.0/24", o[0], o[1], o[2]),
        "via",
        &NODE_B_IP.to_string(),
    ]);
    let backend = format!("{}:{}", pod.ip, lab::BACKEND_PORT);
    let node_port = NODE_PORT.to_string();
    let backend_port = lab::BACKEND_PORT.to_string();
    let node_ip = format!("{IPTABLES_NODE_IP}/32");
    let pod_ip = format!("{}/32", pod.ip);
    netns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &node_ip,
            "-p",
            "udp",
            "--dport",
            &node_port,
            "-j",
            "DNAT",
            "--to-destination",
            &backend,
        ],
    );
    netns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            &pod_ip,
            "-p",
            "udp",
            "--dport",
            &backend_port,
            "-j",
            "MASQUERADE",
        ],
    );
    Ok(())
}

/// The client's UDP frame to `node_ip`:NodePort, `FRAME_LEN` bytes,
/// checksums filled in.
fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], node_ip: Ipv4Addr) -> Result<Vec<u8>> {
    let payload: Vec<u8> = PAYLOAD_WORD
        .to_be_bytes()
        .into_iter()
        .cycle()
        .take(FRAME_LEN - HEADER_LEN)
        .collect();
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(CLIENT_1_IP.octets(), node_ip.octets(), 64)
        .udp(CLIENT_PORT, NODE_PORT);
    let mut frame = Vec::with_capacity(FRAME_LEN);
    builder.write(&mut frame, &payload)?;
    ensure!(frame.len() == FRAME_LEN, "frame of {} bytes", frame.len());
    Ok(frame)
}

/// `r0 = verdict; exit`.
fn return_insns(verdict: u32) -> Vec<u64> {
    vec![
        raw::insn(0xb7, 0, 0, 0, verdict as i32), // r0 = verdict
        raw::insn(0x95, 0, 0, 0, 0),              // exit
    ]
}

/// The wrapper: writes the template's first `HEADER_LEN` bytes back into
/// the frame (a recycled page holds the last run's rewritten headers), then
/// tail-calls slot `index` of `prog_array`; XDP_DROP if either fails.
/// With `many` (a one-u64 array counting the frames), frame `n` is sent
/// from client port `CLIENT_PORT + n % MANY_FLOWS`, and the payload's first
/// word lowered by as much, so the UDP checksum still holds.
fn wrapper_insns(template: &[u8], prog_array: i32, index: i32, many: Option<i32>) -> Vec<u64> {
    use raw::insn;
    // The many-flows wrapper also writes the payload's first word.
    let span = if many.is_some() {
        HEADER_LEN + 2
    } else {
        HEADER_LEN
    };
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),           // r6 = r1 (ctx)
        insn(0x61, 7, 6, 0, 0),           // r7 = ctx->data
        insn(0x61, 3, 6, 4, 0),           // r3 = ctx->data_end
        insn(0xbf, 4, 7, 0, 0),           // r4 = r7
        insn(0x07, 4, 0, 0, span as i32), // r4 += span
    ];
    // Each of these jumps to `out` (patched below).
    let mut to_out = vec![p.len()];
    p.push(insn(0x2d, 4, 3, 0, 0)); // if r4 > r3 goto out
    for off in (0..HEADER_LEN - 2).step_by(4) {
        let word = i32::from_le_bytes(template[off..off + 4].try_into().unwrap());
        p.push(insn(0x62, 7, 0, off as i16, word)); // *(u32 *)(r7 + off) = word
    }
    let off = HEADER_LEN - 2;
    let half = u16::from_le_bytes(template[off..off + 2].try_into().unwrap());
    p.push(insn(0x6a, 7, 0, off as i16, i32::from(half))); // *(u16 *)(r7 + off) = half
    if let Some(counter) = many {
        // UDP source port and the payload's first word (after the headers).
        let (port_off, word_off) = (HEADER_LEN as i16 - 8, HEADER_LEN as i16);
        p.extend([
            insn(0x62, 10, 0, -4, 0),                           // *(u32 *)(r10 - 4) = 0
            insn(0xbf, 2, 10, 0, 0),                            // r2 = r10
            insn(0x07, 2, 0, 0, -4),                            // r2 += -4
            insn(0x18, 1, raw::BPF_PSEUDO_MAP_FD, 0, counter),  // r1 = counter
            insn(0, 0, 0, 0, 0),                                // (second half)
            insn(0x85, 0, 0, 0, raw::BPF_FUNC_MAP_LOOKUP_ELEM), // r0 = lookup(r1, r2)
        ]);
        to_out.push(p.len());
        p.extend([
            insn(0x15, 0, 0, 0, 0),                       // if r0 == 0 goto out
            insn(0x79, 1, 0, 0, 0),                       // r1 = *(u64 *)(r0 + 0)
            insn(0xbf, 3, 1, 0, 0),                       // r3 = r1
            insn(0x07, 3, 0, 0, 1),                       // r3 += 1
            insn(0x7b, 0, 3, 0, 0),                       // *(u64 *)(r0 + 0) = r3
            insn(0x97, 1, 0, 0, MANY_FLOWS as i32),       // r1 %= MANY_FLOWS
            insn(0xb7, 3, 0, 0, i32::from(CLIENT_PORT)),  // r3 = CLIENT_PORT
            insn(0x0f, 3, 1, 0, 0),                       // r3 += r1
            insn(0xdc, 3, 0, 0, 16),                      // r3 = be16 r3
            insn(0x6b, 7, 3, port_off, 0),                // *(u16 *)(r7 + port_off) = r3
            insn(0xb7, 3, 0, 0, i32::from(PAYLOAD_WORD)), // r3 = PAYLOAD_WORD
            insn(0x1f, 3, 1, 0, 0),                       // r3 -= r1
            insn(0xdc, 3, 0, 0, 16),                      // r3 = be16 r3
            insn(0x6b, 7, 3, word_off, 0),                // *(u16 *)(r7 + word_off) = r3
        ]);
    }
    p.extend([
        insn(0xbf, 1, 6, 0, 0),                               // r1 = ctx
        insn(0x18, 2, raw::BPF_PSEUDO_MAP_FD, 0, prog_array), // r2 = prog_array
        insn(0, 0, 0, 0, 0),                                  // (second half)
        insn(0xb7, 3, 0, 0, index),                           // r3 = index
        insn(0x85, 0, 0, 0, raw::BPF_FUNC_TAIL_CALL),         // tail call
    ]);
    let out = p.len();
    p.push(insn(0xb7, 0, 0, 0, raw::XDP_DROP as i32)); // out: r0 = XDP_DROP
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    for at in to_out {
        p[at] = (p[at] & !(0xffff << 16)) | (u64::from((out - at - 1) as u16) << 16);
    }
    p
}

/// The wire tap: counts the frame in slot `base` of `counts` if it is an
/// IPv4 packet from `node_ip` to `pod_ip` (a translated NodePort frame),
/// else in slot `base + 1`, and drops it.
fn tap_insns(counts: i32, base: i32, node_ip: Ipv4Addr, pod_ip: Ipv4Addr) -> Vec<u64> {
    use raw::insn;
    // IPv4 addresses and the EtherType as the little-endian loads see them.
    let le = |ip: Ipv4Addr| u32::from_le_bytes(ip.octets()) as i32;
    let ipv4 = i32::from(u16::from_le_bytes([0x08, 0x00]));
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),        // r6 = r1 (ctx)
        insn(0x61, 2, 6, 0, 0),        // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),        // r3 = ctx->data_end
        insn(0xb7, 1, 0, 0, base + 1), // r1 = base + 1 (other)
        insn(0xbf, 4, 2, 0, 0),        // r4 = r2
        insn(0x07, 4, 0, 0, 34),       // r4 += 34 (Ethernet + IPv4)
    ];
    // Each of these jumps to `count` (patched below).
    let mut to_count = vec![p.len()];
    p.push(insn(0x2d, 4, 3, 0, 0)); // if r4 > r3 goto count
    for (code, off, value) in [
        (0x69, 12, ipv4),        // r5 = *(u16 *)(r2 + 12): EtherType
        (0x61, 26, le(node_ip)), // r5 = *(u32 *)(r2 + 26): source
        (0x61, 30, le(pod_ip)),  // r5 = *(u32 *)(r2 + 30): destination
    ] {
        p.push(insn(code, 5, 2, off, 0));
        to_count.push(p.len());
        p.push(insn(0x56, 5, 0, 0, value)); // if w5 != value goto count
    }
    p.push(insn(0xb7, 1, 0, 0, base)); // r1 = base (translated)
    let count = p.len();
    p.extend([
        insn(0x63, 10, 1, -4, 0),                           // *(u32 *)(r10 - 4) = r1
        insn(0xbf, 2, 10, 0, 0),                            // r2 = r10
        insn(0x07, 2, 0, 0, -4),                            // r2 += -4
        insn(0x18, 1, raw::BPF_PSEUDO_MAP_FD, 0, counts),   // r1 = counts
        insn(0, 0, 0, 0, 0),                                // (second half)
        insn(0x85, 0, 0, 0, raw::BPF_FUNC_MAP_LOOKUP_ELEM), // r0 = lookup(r1, r2)
    ]);
    let null_check = p.len();
    p.extend([
        0,                      // if r0 == 0 goto out (patched below)
        insn(0xb7, 1, 0, 0, 1), // r1 = 1
        insn(0xdb, 0, 1, 0, 0), // lock *(u64 *)(r0 + 0) += r1
    ]);
    let out = p.len();
    p.extend([
        insn(0xb7, 0, 0, 0, raw::XDP_DROP as i32), // out: r0 = XDP_DROP
        insn(0x95, 0, 0, 0, 0),                    // exit
    ]);
    for at in to_count {
        p[at] = (p[at] & !(0xffff << 16)) | (u64::from((count - at - 1) as u16) << 16);
    }
    p[null_check] = insn(0x15, 0, 0, (out - null_check - 1) as i16, 0);
    p
}

fn link_json(netns: &str, ifname: &str, stats: bool) -> Result<serde_json::Value> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns, "-j", "-d"]);
    if stats {
        cmd.arg("-s");
    }
    let out = cmd.args(["link", "show", "dev", ifname]).output()?;
    ensure!(
        out.status.success(),
        "ip -n {netns} link show {ifname}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    value
        .get(0)
        .cloned()
        .with_context(|| format!("no link {ifname} in {netns}"))
}

fn mac(netns: &str, ifname: &str) -> Result<String> {
    link_json(netns, ifname, false)?["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no MAC address on {ifname} in {netns}"))
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("not a MAC address: {text}"))
}

/// The id of the XDP program attached to `ifname` in `netns` (kproxy's).
fn xdp_prog_id(netns: &str, ifname: &str) -> Result<u32> {
    let link = link_json(netns, ifname, false)?;
    link["xdp"]["prog"]["id"]
        .as_u64()
        .map(|id| id as u32)
        .with_context(|| format!("no XDP program on {ifname} in {netns}: {}", link["xdp"]))
}

fn rx_packets(netns: &str, ifname: &str) -> Result<u64> {
    link_json(netns, ifname, true)?["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx counter on {ifname} in {netns}"))
}

/// The wire measurement's table: one row per configuration.
fn wire_table(md: &mut String, m: &Measured) {
    let floor_pps = m.pps(Kind::Floor);
    let kernel_ns = |k: Kind| m.median(k, |s| f64::from(s.kernel_ns));
    let ns = |k: Kind| 1e9 / m.pps(k);
    let _ = writeln!(
        *md,
        "| configuration | frames/s | ns per frame | kernel ns per frame | ns over the floor \
         | of the floor's rate | vs iptables | arrived at the wire's end |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for kind in Kind::ALL {
        let ok = m.forwarding(kind);
        let dash = || "–".to_owned();
        let rate = if ok {
            format!("{:.2} M", m.pps(kind) / 1e6)
        } else {
            format!(
                "not forwarding ({:.0} % arrived)",
                m.delivered(kind) * 100.0
            )
        };
        let per_frame = if ok {
            format!("{:.0}", ns(kind))
        } else {
            dash()
        };
        let over_floor = if ok && kind != Kind::Floor {
            format!("{:.0}", ns(kind) - ns(Kind::Floor))
        } else {
            dash()
        };
        let of_floor = if ok {
            format!("{:.2}", m.pps(kind) / floor_pps)
        } else {
            dash()
        };
        let vs_iptables = if kind == Kind::Kproxy && ok && m.forwarding(Kind::Iptables) {
            format!("{:.2}x", m.pps(kind) / m.pps(Kind::Iptables))
        } else {
            dash()
        };
        let arrived = if kind == Kind::Floor {
            let (arrived, frames) = m.sum(kind, |s| s.delivered);
            format!("{arrived} of {frames} (dropped on the node)")
        } else {
            format!("{:.1} %", m.delivered(kind) * 100.0)
        };
        let _ = writeln!(
            *md,
            "| {} | {rate} | {per_frame} | {:.0} | {over_floor} | {of_floor} | {vs_iptables} \
             | {arrived} |",
            kind.label(),
            kernel_ns(kind),
        );
    }
}

fn render(
    _config: &Config,
    docs: &Path,
    wire: &Measured,
    many: &Measured,
    e2e: &Measured,
) -> Result<Section> {
    let floor_pps = wire.pps(Kind::Floor);
    let kernel_ns = |m: &Measured, k: Kind| m.median(k, |s| f64::from(s.kernel_ns));
    let (xdp_forwarded, kproxy_frames) = wire.sum(Kind::Kproxy, |s| s.xdp_forwarded);
    let (fib_lookups, _) = wire.sum(Kind::Kproxy, |s| s.fib_lookups);
    let (fills, _) = wire.sum(Kind::Kproxy, |s| s.cache_fills);
    let (many_fills, _) = many.sum(Kind::Kproxy, |s| s.cache_fills);
    let (e2e_forwarded, e2e_frames) = e2e.sum(Kind::Kproxy, |s| s.xdp_forwarded);
    let other: u64 = [wire, many]
        .iter()
        .flat_map(|m| m.samples.iter().flatten())
        .map(|s| s.other)
        .sum();
    let ns = |m: &Measured, k: Kind| 1e9 / m.pps(k);
    let warmups = |m: &Measured| {
        m.kinds
            .iter()
            .zip(&m.warmup)
            .filter(|(k, _)| **k != Kind::Floor)
            .map(|(k, s)| format!("{} {:.1} %", k.short(), s.delivered_fraction() * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 4. XDP forwarding in the lab (NodePort, remote backend)\n"
    );
    let _ = writeln!(
        md,
        "UDP to a NodePort (client 198.18.100.21:{CLIENT_PORT}, {FRAME_LEN}-byte frames, i.e. \
         64 bytes on the wire) whose only endpoint is pod {BACKEND_POD} on the other node, \
         one flow or {MANY_FLOWS} in turn, injected by the kernel itself at the node's `ext0` (BPF_PROG_TEST_RUN, \
         `BPF_F_TEST_XDP_LIVE_FRAMES`, batches of 64): the verdict is acted on for real. \
         Rate = frames / wall time of the injecting syscall; medians of interleaved runs \
         (rotating order). The syscall's time includes the softirq work its frames cause on \
         the injecting CPU, wherever it happens, hence two measurements.\n"
    );
    let _ = writeln!(
        md,
        "### At the wire: the node's own work\n\n\
         The other end of the node's wire (the bridge-side end of its `ext0` veth) runs a \
         tap for this measurement: an XDP program that counts each frame and drops it, in \
         place of the lab's pass program (put back afterwards). So a frame's time is the \
         node's work only: injection, the program measured, and for kproxy and iptables the \
         forwarding out of `ext0`, plus the wire's receive end (the veth peer's NAPI poll and \
         the tap: for frames sent by XDP_TX an XDP frame, for the stack's an skb turned into \
         one). Nothing reaches the bridge, node-b or the pod. Arrived = frames the tap counted \
         as translated (IPv4 from the node's address to the pod's), per frame injected; for \
         the bare XDP_TX, every frame the tap counted. {} runs of {} frames per \
         configuration.\n",
        wire.runs, wire.repeat
    );
    wire_table(&mut md, wire);
    let fwd_ok = wire.forwarding(Kind::Kproxy)
        && wire.forwarding(Kind::Tx)
        && wire.forwarding(Kind::Iptables);
    if fwd_ok {
        let _ = writeln!(
            md,
            "\nkproxy's program (parse, the translation from its per-CPU flow cache, DNAT + \
             SNAT, the route from its per-CPU cache of FIB answers) costs {:.0} ns per frame \
             over a bare XDP_TX of the same frame; iptables' path costs {:.0} ns per frame over kproxy's. kproxy's \
             `fib_lookup` counter rose by {fib_lookups} for those {kproxy_frames} frames: each \
             CPU asks the FIB again only when its cached answer is {} ms old \
             (`ROUTE_CACHE_TTL_NS`), so a route or neighbour change still reaches the flow. \
             Its `flow_cache_fill` counter rose by {fills}: the other frames took their \
             translation from the flow cache without reading conntrack.",
            ns(wire, Kind::Kproxy) - ns(wire, Kind::Tx),
            ns(wire, Kind::Iptables) - ns(wire, Kind::Kproxy),
            proxy_common::ROUTE_CACHE_TTL_NS / 1_000_000,
        );
    }
    let _ = writeln!(
        md,
        "\nkproxy's `xdp_forward` counter on node-a rose by {xdp_forwarded} for \
         {kproxy_frames} frames injected (every frame sent back out by XDP itself, none left \
         to tc or the stack, when the two are equal). Frames the taps counted besides \
         (neither translated nor a bare XDP_TX run's), one flow and {MANY_FLOWS} flows: \
         {other}. Warm-up ({WARMUP_FRAMES} frames each, not in the table): arrived {}.\n",
        warmups(wire)
    );

    let (many_forwarded, many_frames) = many.sum(Kind::Kproxy, |s| s.xdp_forwarded);
    let _ = writeln!(
        md,
        "### At the wire, {MANY_FLOWS} flows\n\n\
         The same, but frame n comes from client port {CLIENT_PORT} + n mod {MANY_FLOWS}: \
         {MANY_FLOWS} flows in turn, each with its two entries in kproxy's conntrack map and \
         one in node-i's netfilter conntrack, each source-NATed to a port of its own. One flow \
         keeps its conntrack entry, hash bucket and route in the cache; here each frame's \
         entry was last touched {MANY_FLOWS} frames ago, as on a node with many clients. The \
         wrapper counts the frames in an array map and lowers the payload's first word by as \
         much as it raises the port (so the UDP checksum holds); every configuration of this \
         table pays that, the floor included. {} runs of {} frames per configuration, after \
         the one-flow rounds.\n",
        many.runs, many.repeat
    );
    wire_table(&mut md, many);
    if fwd_ok && many.forwarding(Kind::Kproxy) && many.forwarding(Kind::Iptables) {
        let _ = writeln!(
            md,
            "\nWith {MANY_FLOWS} flows kproxy forwards {:.2} M frames/s ({:.0} ns per frame, \
             {:.0} over this table's bare XDP_TX, against {:.0} with one flow) and iptables \
             {:.2} M: kproxy / iptables = {:.2}x, against {:.2}x with one flow. kproxy's \
             `xdp_forward` counter rose by {many_forwarded} for {many_frames} frames, its \
             `flow_cache_fill` counter by {many_fills} ({:.1} % of the frames read conntrack and \
             refilled their slot). {MANY_FLOWS} flows hash into the CPU's {} slots, so some \
             share one, which serves only the flow that holds it: the others read conntrack on \
             every frame and leave the slot as it is (not counted).",
            many.pps(Kind::Kproxy) / 1e6,
            ns(many, Kind::Kproxy),
            ns(many, Kind::Kproxy) - ns(many, Kind::Tx),
            ns(wire, Kind::Kproxy) - ns(wire, Kind::Tx),
            many.pps(Kind::Iptables) / 1e6,
            many.pps(Kind::Kproxy) / many.pps(Kind::Iptables),
            wire.pps(Kind::Kproxy) / wire.pps(Kind::Iptables),
            many_fills as f64 * 100.0 / many_frames as f64,
            proxy_common::FLOW_CACHE_SLOTS,
        );
    }
    let opened = many
        .pos(Kind::Kproxy)
        .map_or(0, |i| many.warmup[i].flows_opened);
    let _ = writeln!(
        md,
        "\nWarm-up: arrived {}; kproxy's `ct_created` counter rose by {opened} in its \
         warm-up (flow 0, port {CLIENT_PORT}, is the one-flow rounds' flow).\n",
        warmups(many)
    );

    let _ = writeln!(
        md,
        "### End to end: to the pod\n\n\
         The lab as it is: the frame crosses the bridge, node-b routes it to the pod's \
         interface; all of that runs on the injecting CPU too, so the rate is the chain's, \
         not node-a's. The floor is the one above (it ends on node-a either way). Delivered = \
         the pod's `lab0` rx packets (after the counter settles) per frame injected. {} runs \
         of {} frames per configuration.\n",
        e2e.runs, e2e.repeat
    );
    let _ = writeln!(
        md,
        "| configuration | frames/s injected | ns per delivered frame | kernel ns per frame \
         | delivered rate / floor's rate | delivered rate vs iptables | delivered to the pod \
         | delivered frames/s |\n\
         |---|---|---|---|---|---|---|---|"
    );
    // End to end, the rate is what reaches the pod: a node that forwards
    // faster than the chain behind it absorbs loses the excess at the next
    // veth's ring, which is the chain's limit, not the node's (the wire
    // measurement above shows whether the node forwarded everything).
    let delivered_pps = |kind: Kind| e2e.pps(kind) * e2e.delivered(kind);
    for kind in Kind::END_TO_END {
        let pps = delivered_pps(kind);
        let vs_iptables = if kind == Kind::Kproxy {
            format!("{:.2}x", pps / delivered_pps(Kind::Iptables))
        } else {
            "–".to_owned()
        };
        let _ = writeln!(
            md,
            "| {} | {:.3} M | {:.0} | {:.0} | {:.3} | {vs_iptables} | {:.1} % | {:.3} M |",
            kind.label(),
            e2e.pps(kind) / 1e6,
            1e9 / pps,
            kernel_ns(e2e, kind),
            pps / floor_pps,
            e2e.delivered(kind) * 100.0,
            pps / 1e6,
        );
    }
    if !e2e.forwarding(Kind::Kproxy) {
        let _ = writeln!(
            md,
            "\nkproxy's frames left node-a faster than the chain behind it (bridge, node-b, \
             the pod's veth) takes them: {:.1} % reached the pod, the rest was dropped at a veth \
             ring downstream; at the wire every frame left node-a translated. The delivered \
             rate is the chain's capacity with kproxy in front of it.",
            e2e.delivered(Kind::Kproxy) * 100.0
        );
    }
    let _ = writeln!(
        md,
        "\nkproxy's `xdp_forward` counter rose by {e2e_forwarded} for {e2e_frames} frames. \
         Warm-up: delivered {}.\n",
        warmups(e2e)
    );

    let _ = writeln!(
        md,
        "How: the two-node lab of the end-to-end tests (node-a, node-b with pod {BACKEND_POD}, \
         a bridge between the nodes' `ext0`, one kproxy per node started with \
         `--interfaces ext0`). **kproxy**: the XDP program kproxy attached to node-a's `ext0` \
         (the same program, found by the id on the interface) DNATs to the pod, SNATs to \
         node-a and sends the frame back out `ext0` (XDP_TX) towards node-b. **floor**: \
         `r0 = XDP_DROP`, injected the same way: what injection alone costs. **bare \
         XDP_TX**: `r0 = XDP_TX` on node-a: injection plus sending the frame out and the \
         wire's receive end, without kproxy's work. **iptables**: `r0 = XDP_PASS` on node-i, \
         a namespace wired like node-a (same bridge, sysctls, offloads, pass program on its \
         wire's end) without kproxy, where `iptables -t nat` DNATs the NodePort to the same \
         pod and MASQUERADEs it (one rule each, fewer than kube-proxy's chains) and the \
         kernel forwards it to node-b. All run behind the same wrapper program, which writes \
         the template's 42 header bytes back into the frame (live mode recycles pages \
         without copying the frame again, so the NAT of the previous round would otherwise \
         still be in it) and tail-calls the program measured. Neighbours are static; the pod \
         has no socket on the port.\n"
    );
    let _ = writeln!(
        md,
        "What this shows: the cost of forwarding established flows on this 2-vCPU VM (one, \
         and {MANY_FLOWS} in turn), kproxy's XDP path against the node's own stack with \
         iptables, both against the cost of injection; at the wire, the node's own work, end \
         to end, the whole chain (the same downstream work for kproxy and iptables). What it \
         does not show: a NIC (veth here: XDP_TX is a redirect into the peer's ring, and the \
         wire's receive end is the same CPU's work), new-flow setup (every flow is in both \
         conntracks after the warm-up), multi-queue scaling, or kube-proxy's full iptables \
         chains.\n"
    );
    let _ = writeln!(md, "![XDP forwarding](bench-xdp-forward.svg)\n");

    let groups: Vec<String> = Kind::ALL.iter().map(|k| k.short().to_owned()).collect();
    let series = |m: &Measured| -> Vec<f64> {
        Kind::ALL
            .iter()
            .map(|k| {
                if m.pos(*k).is_some() && m.forwarding(*k) {
                    m.pps(*k) / 1e6
                } else {
                    f64::NAN
                }
            })
            .collect()
    };
    let svg = bar_chart(
        "XDP forwarding, UDP, 64-byte frames (higher is better)",
        "million frames per second",
        &groups,
        &[
            (
                "at the wire (node's own work), one flow".into(),
                series(wire),
            ),
            (format!("at the wire, {MANY_FLOWS} flows"), series(many)),
            ("end to end (to the pod), one flow".into(), series(e2e)),
        ],
    );
    let svg_path = docs.join("bench-xdp-forward.svg");
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;

    let mut section = Section {
        markdown: md,
        not_measured: vec![
            "XDP forwarding of new flows (part 4 measures established UDP flows), on a real \
             NIC, and against kube-proxy's full iptables chains."
                .into(),
        ],
        ..Section::default()
    };
    // Only the node's own forwarding can miss: end to end, frames lost
    // behind a node that forwarded them are the chain's limit.
    let misses: Vec<(&str, f64)> = [("at the wire", wire), ("at the wire, many flows", many)]
        .into_iter()
        .filter(|(_, m)| !m.forwarding(Kind::Kproxy))
        .map(|(what, m)| (what, m.delivered(Kind::Kproxy)))
        .collect();
    if !misses.is_empty() {
        let list = misses
            .iter()
            .map(|(what, d)| format!("{:.1} % {what}", d * 100.0))
            .collect::<Vec<_>>()
            .join(", ");
        section
            .misses
            .push(format!("XDP forwarding: kproxy delivered {list}"));
        section.why = format!(
            "### XDP forwarding\n\nkproxy delivered {list} of the frames injected at node-a; \
             its `xdp_forward` counter rose by {xdp_forwarded} for {kproxy_frames} frames at \
             the wire, by {e2e_forwarded} for {e2e_frames} end to end.\n"
        );
    }
    Ok(section)
}
