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
const BACKEND_POD: &str = "b1";
/// 60 bytes: a minimum-size Ethernet frame (64 on the wire with the FCS).
const FRAME_LEN: usize = 60;
/// Ethernet + IPv4 + UDP: what NAT rewrites, and what the wrapper restores.
const HEADER_LEN: usize = 42;
/// Below this, a configuration's rate is not reported as a forwarding rate.
const MIN_DELIVERED: f64 = 0.9;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Floor,
    Kproxy,
    Iptables,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Floor, Kind::Kproxy, Kind::Iptables];

    fn label(self) -> &'static str {
        match self {
            Kind::Floor => "empty XDP_DROP (floor)",
            Kind::Kproxy => "kproxy XDP (DNAT + SNAT, XDP_TX)",
            Kind::Iptables => "iptables DNAT + MASQUERADE (XDP_PASS)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Kind::Floor => "floor (XDP_DROP)",
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
    delivered: u64,
    /// kproxy's `xdp_forward` counter on node-a, rise during the run.
    xdp_forwarded: u64,
}

impl Sample {
    fn pps(&self) -> f64 {
        f64::from(self.frames) / self.wall.as_secs_f64()
    }
    fn delivered_fraction(&self) -> f64 {
        self.delivered as f64 / f64::from(self.frames)
    }
}

/// The lab: fields drop in order, so the programs go before the namespaces.
struct Bed {
    /// Slot `i` of `targets` holds the program of `Kind::ALL[i]`.
    wrappers: Vec<OwnedFd>,
    _targets: OwnedFd,
    _programs: Vec<OwnedFd>,
    iptables_node: lab::Netns,
    cluster: Cluster,
    kproxy_frame: Vec<u8>,
    iptables_frame: Vec<u8>,
}

/// Part 4: measures, writes the plots into `docs`, renders the section.
pub fn run(config: &Config, docs: &Path) -> Result<Section> {
    // The whole chain runs at tens of thousands of frames per second here
    // (see the section), so these counts keep part 4 near 1 / 2 minutes.
    let (runs, repeat) = if config.quick {
        (3, 100_000)
    } else {
        (5, 300_000)
    };
    eprintln!("bench: XDP forwarding ({runs} x {repeat} frames per configuration)");
    let kproxy = kproxy_binary()?;
    let bed = Bed::new(&kproxy)?;

    // Warm-up (not counted): fills conntrack (kproxy's and the node's) and
    // checks every path once.
    let mut warmup = Vec::new();
    for kind in Kind::ALL {
        warmup.push(bed.inject(kind, 10_000)?);
    }
    let mut samples: Vec<Vec<Sample>> = Kind::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..runs {
        // Interleaved, the order rotated each round.
        for k in 0..Kind::ALL.len() {
            let i = (k + round) % Kind::ALL.len();
            samples[i].push(bed.inject(Kind::ALL[i], repeat)?);
        }
    }
    drop(bed);
    render(config, docs, runs, repeat, &warmup, &samples)
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
        let mut wrappers = Vec::new();
        for (i, kind) in Kind::ALL.iter().enumerate() {
            let template = match kind {
                Kind::Iptables => &iptables_frame,
                _ => &kproxy_frame,
            };
            let insns = wrapper_insns(template, targets.as_raw_fd(), i as i32);
            wrappers.push(raw::load_program(
                raw::BPF_PROG_TYPE_XDP,
                raw::BPF_XDP,
                &insns,
                "bench_xdp_wrap",
            )?);
        }
        Ok(Self {
            wrappers,
            _targets: targets,
            _programs: programs,
            iptables_node,
            cluster,
            kproxy_frame,
            iptables_frame,
        })
    }

    /// Injects `frames` copies of `kind`'s frame at its node's `ext0` and
    /// waits until the backend's counter settles.
    fn inject(&self, kind: Kind, frames: u32) -> Result<Sample> {
        let (netns, frame) = match kind {
            Kind::Iptables => (&self.iptables_node, &self.iptables_frame),
            _ => (&self.cluster.node(NODE_A).netns, &self.kproxy_frame),
        };
        let prog = self.wrappers[Kind::ALL.iter().position(|k| *k == kind).unwrap()].as_fd();
        let pod = &self.cluster.pod(BACKEND_POD).netns.name;
        let node_a = self.cluster.node(NODE_A);
        let rx_before = rx_packets(pod, "lab0")?;
        let forwarded_before = node_a.stat(stat::XDP_FORWARD);
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
        // pod's counter stops moving (bounded).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = rx_packets(pod, "lab0")?;
        let mut still = 0;
        while still < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(30));
            let now = rx_packets(pod, "lab0")?;
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        Ok(Sample {
            frames,
            wall,
            kernel_ns: run.kernel_ns,
            delivered: last.saturating_sub(rx_before),
            xdp_forwarded: node_a.stat(stat::XDP_FORWARD) - forwarded_before,
        })
    }
}

/// node-i: a node namespace like node-a (same sysctls, wire, offloads and
/// pass-through program on its bridge-side peer), no kproxy, and the NAT a
/// NodePort gets from iptables: DNAT to the backend, MASQUERADE towards it.
fn plain_node(cluster: &Cluster, netns: &lab::Netns) -> Result<()> {
    let peer = "node-i";
    let bridge = &cluster.bridge.name;
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
    ] {
        netns.sysctl(key, value);
    }
    lab::ip(&[
        "link",
        "add",
        "name",
        EXT_IF,
        "netns",
        &netns.name,
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        bridge,
    ]);
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
    let pin = cluster.root.join("xdp-pass").join(format!("pass-{peer}"));
    raw::obj_pin(pass.as_fd(), &pin).context("pinning node-i's pass program")?;
    let attached = Command::new("ip")
        .args(["-n", bridge, "link", "set", "dev", peer, "xdpdrv", "pinned"])
        .arg(&pin)
        .status();
    let _ = std::fs::remove_file(&pin);
    ensure!(attached?.success(), "attaching the pass program to {peer}");
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
    let payload = [0x5au8; FRAME_LEN - HEADER_LEN];
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
fn wrapper_insns(template: &[u8], prog_array: i32, index: i32) -> Vec<u64> {
    use raw::insn;
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),                 // r6 = r1 (ctx)
        insn(0x61, 2, 6, 0, 0),                 // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),                 // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),                 // r4 = r2
        insn(0x07, 4, 0, 0, HEADER_LEN as i32), // r4 += HEADER_LEN
    ];
    let bounds_check = p.len();
    p.push(0); // if r4 > r3 goto out (patched below)
    for off in (0..HEADER_LEN - 2).step_by(4) {
        let word = i32::from_le_bytes(template[off..off + 4].try_into().unwrap());
        p.push(insn(0x62, 2, 0, off as i16, word)); // *(u32 *)(r2 + off) = word
    }
    let off = HEADER_LEN - 2;
    let half = u16::from_le_bytes(template[off..off + 2].try_into().unwrap());
    p.push(insn(0x6a, 2, 0, off as i16, i32::from(half))); // *(u16 *)(r2 + off) = half
    p.push(insn(0xbf, 1, 6, 0, 0)); // r1 = ctx
    p.push(insn(0x18, 2, raw::BPF_PSEUDO_MAP_FD, 0, prog_array)); // r2 = prog_array
    p.push(insn(0, 0, 0, 0, 0)); // (second half of the 64-bit load)
    p.push(insn(0xb7, 3, 0, 0, index)); // r3 = index
    p.push(insn(0x85, 0, 0, 0, raw::BPF_FUNC_TAIL_CALL)); // tail call
    let out = p.len();
    p.push(insn(0xb7, 0, 0, 0, raw::XDP_DROP as i32)); // out: r0 = XDP_DROP
    p.push(insn(0x95, 0, 0, 0, 0)); // exit
    p[bounds_check] = insn(0x2d, 4, 3, (out - bounds_check - 1) as i16, 0);
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

fn render(
    _config: &Config,
    docs: &Path,
    runs: usize,
    repeat: u32,
    warmup: &[Sample],
    samples: &[Vec<Sample>],
) -> Result<Section> {
    let med = |i: usize, f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples[i].iter().map(f).collect();
        median(&mut v)
    };
    let pps: Vec<f64> = (0..3).map(|i| med(i, &Sample::pps)).collect();
    let delivered: Vec<f64> = (0..3)
        .map(|i| med(i, &Sample::delivered_fraction))
        .collect();
    let kernel_ns: Vec<f64> = (0..3)
        .map(|i| med(i, &|s| f64::from(s.kernel_ns)))
        .collect();
    let (floor, kproxy, iptables) = (0, 1, 2);
    let forwarding = |i: usize| i == floor || delivered[i] >= MIN_DELIVERED;
    let xdp_forwarded: u64 = samples[kproxy].iter().map(|s| s.xdp_forwarded).sum();
    let kproxy_frames: u64 = samples[kproxy].iter().map(|s| u64::from(s.frames)).sum();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## XDP forwarding in the lab (NodePort, remote backend)\n"
    );
    let _ = writeln!(
        md,
        "One UDP flow (client 198.18.100.21:{CLIENT_PORT} to a NodePort, {FRAME_LEN}-byte \
         frames, i.e. 64 bytes on the wire) whose only endpoint is pod {BACKEND_POD} on the \
         other node, injected by the kernel itself at the node's `ext0` (BPF_PROG_TEST_RUN, \
         `BPF_F_TEST_XDP_LIVE_FRAMES`, batches of 64): the verdict is acted on for real. \
         {runs} interleaved runs of {repeat} frames per configuration (rotating order), \
         medians. Rate = frames / wall time of the injecting syscall.\n"
    );
    let _ = writeln!(
        md,
        "| configuration | frames/s | ns per frame | kernel ns per frame | of the floor's rate \
         | vs iptables | delivered to the pod | delivered frames/s |\n|---|---|---|---|---|---|---|---|"
    );
    for (i, kind) in Kind::ALL.iter().enumerate() {
        let rate = if forwarding(i) {
            format!("{:.2} M", pps[i] / 1e6)
        } else {
            format!("not forwarding ({:.0} % delivered)", delivered[i] * 100.0)
        };
        let ns = if forwarding(i) {
            format!("{:.0}", 1e9 / pps[i])
        } else {
            "–".into()
        };
        let of_floor = if forwarding(i) {
            format!("{:.2}", pps[i] / pps[floor])
        } else {
            "–".into()
        };
        let vs_iptables = if i != floor && forwarding(i) && forwarding(iptables) {
            format!("{:.2}x", pps[i] / pps[iptables])
        } else {
            "–".into()
        };
        let (fraction, delivered_pps) = if i == floor {
            ("– (dropped)".to_owned(), "–".to_owned())
        } else {
            (
                format!("{:.1} %", delivered[i] * 100.0),
                format!("{:.2} M", pps[i] * delivered[i] / 1e6),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {rate} | {ns} | {:.0} | {of_floor} | {vs_iptables} | {fraction} | {delivered_pps} |",
            kind.label(),
            kernel_ns[i],
        );
    }
    let _ = writeln!(
        md,
        "\nkproxy's `xdp_forward` counter on node-a rose by {xdp_forwarded} for {kproxy_frames} \
         frames injected (every frame sent back out by XDP itself, none left to tc or the \
         stack, when the two are equal). Warm-up (10 000 frames each, not in the table): \
         delivered {}.\n",
        Kind::ALL
            .iter()
            .zip(warmup)
            .filter(|(k, _)| **k != Kind::Floor)
            .map(|(k, s)| format!("{} {:.1} %", k.short(), s.delivered_fraction() * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "How: the two-node lab of the end-to-end tests (node-a, node-b with pod {BACKEND_POD}, \
         a bridge between the nodes' `ext0`, one kproxy per node started with \
         `--interfaces ext0`). **kproxy**: the XDP program kproxy attached to node-a's `ext0` \
         (the same program, found by the id on the interface) DNATs to the pod, SNATs to \
         node-a and sends the frame back out `ext0` (XDP_TX) towards node-b, which routes it \
         to the pod. **floor**: `r0 = XDP_DROP`, injected the same way: what injection alone \
         costs. **iptables**: `r0 = XDP_PASS` on node-i, a namespace wired like node-a \
         (same bridge, sysctls, offloads) without kproxy, where `iptables -t nat` DNATs the \
         NodePort to the same pod and MASQUERADEs it (one rule each, fewer than kube-proxy's \
         chains) and the kernel forwards it to node-b. All three run behind the same wrapper \
         program, which writes the template's 42 header bytes back into the frame (live mode \
         recycles pages without copying the frame again, so the NAT of the previous round \
         would otherwise still be in it) and tail-calls the program measured. Neighbours are \
         static; the pod has no socket on the port, so frames are counted at its interface \
         (`lab0` rx packets, after the counter settles).\n"
    );
    let _ = writeln!(
        md,
        "What this shows: the cost of forwarding one established flow on this 2-vCPU VM, \
         kproxy's XDP path against the node's own stack with iptables, both against the \
         cost of injection. The syscall's time includes the softirq work its frames cause \
         on the injecting CPU (the bridge, node-b's routing and the pod's interface run \
         when each batch re-enables bottom halves), the same work for kproxy and iptables. \
         What it does not show: a NIC (veth here: XDP_TX is a redirect into the peer's \
         ring), many flows or new-flow setup (one flow, in both conntracks after the \
         warm-up), multi-queue scaling, or kube-proxy's full iptables chains.\n"
    );
    let _ = writeln!(md, "![XDP forwarding](bench-xdp-forward.svg)\n");

    let groups: Vec<String> = Kind::ALL.iter().map(|k| k.short().to_owned()).collect();
    let injected: Vec<f64> = pps.iter().map(|p| p / 1e6).collect();
    let delivered_series: Vec<f64> = (0..3)
        .map(|i| {
            if i == floor {
                f64::NAN
            } else {
                pps[i] * delivered[i] / 1e6
            }
        })
        .collect();
    let svg = bar_chart(
        "XDP forwarding, one UDP flow, 64-byte frames (higher is better)",
        "million frames per second",
        &groups,
        &[
            ("injected (syscall rate)".into(), injected),
            ("delivered to the pod".into(), delivered_series),
        ],
    );
    let svg_path = docs.join("bench-xdp-forward.svg");
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;

    let mut section = Section {
        markdown: md,
        not_measured: vec![
            "XDP forwarding with many flows and new-flow setup (part 4 measures one \
             established UDP flow), on a real NIC, and against kube-proxy's full iptables \
             chains."
                .into(),
        ],
        ..Section::default()
    };
    if !forwarding(kproxy) {
        section.misses.push(format!(
            "XDP forwarding: kproxy delivered {:.0} %",
            delivered[kproxy] * 100.0
        ));
        section.why = format!(
            "### XDP forwarding\n\nkproxy delivered {:.1} % of the frames injected at node-a \
             to the pod; its `xdp_forward` counter rose by {xdp_forwarded} for {kproxy_frames} \
             frames.\n",
            delivered[kproxy] * 100.0
        );
    }
    Ok(section)
}
