//! Part 1: per-packet cost through BPF_PROG_TEST_RUN against an empty
//! program measured in the same run, at several Service counts.

use super::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

// Lab addresses only (DESIGN.md section 5): VIPs in 198.19.0.0/16,
// endpoints and clients in 198.18.0.0/16.
const CLIENT: [u8; 4] = [198, 18, 255, 2];
const CLIENT_PORT: u16 = 40000;
/// Service A (port 80): its one backend is service B's VIP and port.
const VIP_A: [u8; 4] = [198, 19, 255, 1];
const PORT_A: u16 = 80;
/// Service B (port 81): its one backend is service A's VIP and port.
const VIP_B: [u8; 4] = [198, 19, 255, 2];
const PORT_B: u16 = 81;
/// The new-flow Service: ten backends, random selection.
const VIP_NEW: [u8; 4] = [198, 19, 255, 3];
/// Programmed nowhere, and not in any Service.
const NOT_A_SERVICE: [u8; 4] = [198, 18, 254, 9];
/// The source-NATed Service: an externalIPs Service whose one backend is
/// on another node, behind `ROUTED_IF` (see `RoutedNetns`).
const VIP_SNAT: [u8; 4] = [198, 19, 255, 4];
/// The node's address on `ROUTED_IF`: the source the route gives.
const ROUTED_NODE: [u8; 4] = [198, 18, 250, 1];
const ROUTED_BACKEND: ([u8; 4], u16) = ([198, 18, 250, 10], 8080);
/// The interface the source-NATed path's frames arrive on and leave by.
const ROUTED_IF: &str = "pp0";
/// Services the per-packet lab programs besides the fillers.
pub const MEASURED_SERVICES: usize = 4;
/// Map capacities for the per-packet runs: the same at every Service count,
/// so only the number of entries changes. 100 000 Services need 2 entries
/// each in the services map (slot 0 and one backend slot) plus one VIP
/// marker per address, and one rev-NAT entry each: above the defaults.
fn per_packet_sizes() -> MapSizes {
    MapSizes {
        services: 524_288,
        rev_nat: 131_072,
        ..MapSizes::default()
    }
}

/// Runs a frame once and returns the verdict and the output frame.
fn run_once(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let run = raw::test_run(prog, frame, &mut out, repeat).context("BPF_PROG_TEST_RUN")?;
    out.truncate(run.out_len);
    Ok((run.retval, out))
}

// ---------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Tcp {
    Syn,
    SynAck,
    Ack,
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), kind: Tcp) -> Vec<u8> {
    let mut header = TcpHeader::new(src.1, dst.1, 0x1000_0000, 64240);
    match kind {
        Tcp::Syn => header.syn = true,
        Tcp::SynAck => {
            header.syn = true;
            header.ack = true;
            header.acknowledgment_number = 0x1000_0001;
        }
        Tcp::Ack => {
            header.ack = true;
            header.psh = true;
            header.acknowledgment_number = 0x2000_0001;
        }
    }
    let payload: &[u8] = match kind {
        Tcp::Ack => &[0x42; 64],
        _ => &[],
    };
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(src.0, dst.0, 64)
        .tcp_header(header);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("building a TCP frame");
    frame
}

/// A UDP datagram with 64 bytes of payload and its checksum.
fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let payload = [0x42u8; 64];
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, &payload)
        .expect("building a UDP frame");
    frame
}

fn new_flow_backends() -> Vec<([u8; 4], u16)> {
    (10..20).map(|n| ([198, 18, 254, n], 8080)).collect()
}

/// An externalIPs frontend (so both hooks serve it: the pod hook with its
/// internal entry, the XDP program with its external one) whose backends
/// are on this node, with `externalTrafficPolicy: Local`: the external path
/// DNATs and passes (with policy Cluster, or to a remote backend, it is
/// also source-NATed and routed, which a repeated run cannot replay as a
/// conntrack hit).
fn measured_frontend(name: &str, backends: &[([u8; 4], u16)]) -> Frontend {
    let mut fe = frontend(name.to_owned(), backends);
    fe.kind = FrontendKind::ExternalIp;
    fe.policy_local = true;
    fe.snat = false;
    for b in fe.backends.iter_mut().chain(fe.cluster_backends.iter_mut()) {
        b.local = true;
    }
    fe
}

/// The measured Services plus `total - 3` fillers with one endpoint each.
fn per_packet_state(total: usize) -> DesiredState {
    let mut state = DesiredState::default();
    filler_state(&mut state, total.saturating_sub(MEASURED_SERVICES), 1);
    // A and B serve TCP and UDP on the same ports, each pointing at the
    // other.
    for key in [tcp_key, udp_key] {
        state.frontends.insert(
            key(VIP_A, PORT_A),
            measured_frontend("measured-a", &[(VIP_B, PORT_B)]),
        );
        state.frontends.insert(
            key(VIP_B, PORT_B),
            measured_frontend("measured-b", &[(VIP_A, PORT_A)]),
        );
    }
    state.frontends.insert(
        tcp_key(VIP_NEW, 80),
        measured_frontend("measured-new", &new_flow_backends()),
    );
    let mut routed = frontend("measured-snat".to_owned(), &[ROUTED_BACKEND]);
    routed.kind = FrontendKind::ExternalIp;
    routed.snat = true;
    state.frontends.insert(tcp_key(VIP_SNAT, 80), routed);
    state
}

/// The network namespace every part-1 run happens in: BPF_PROG_TEST_RUN's
/// route lookups (`bpf_fib_lookup`) use the caller's namespace. It holds a
/// veth pair, `ROUTED_IF` with the node's address, routes to the backend's
/// and the client's subnets through it and static neighbours for both, so
/// the external programs find a complete route for the source-NATed path
/// (XDP forwards only out of the interface a frame came in on: that path's
/// frames arrive on `ROUTED_IF`). Forwarding is on, as on a node.
fn routed_netns() -> Result<Ns> {
    let ns = Ns::new("per-packet")?;
    let name = ns.name().to_owned();
    let node = format!("{}/24", dotted(ROUTED_NODE));
    let (backend, client) = (dotted(ROUTED_BACKEND.0), dotted(CLIENT));
    let client_net = format!("{}/24", dotted([CLIENT[0], CLIENT[1], CLIENT[2], 0]));
    for args in [
        &[
            "link", "add", ROUTED_IF, "type", "veth", "peer", "name", "pp1",
        ][..],
        &["addr", "add", &node, "dev", ROUTED_IF],
        &["link", "set", ROUTED_IF, "up"],
        &["link", "set", "pp1", "up"],
        &["link", "set", "lo", "up"],
        &["route", "add", &client_net, "dev", ROUTED_IF],
        &[
            "neigh",
            "replace",
            &backend,
            "lladdr",
            "02:00:00:00:fa:0a",
            "dev",
            ROUTED_IF,
            "nud",
            "permanent",
        ],
        &[
            "neigh",
            "replace",
            &client,
            "lladdr",
            "02:00:00:00:ff:02",
            "dev",
            ROUTED_IF,
            "nud",
            "permanent",
        ],
    ] {
        ip(&[&["-n", &name][..], args].concat())?;
    }
    // After the links exist, so each takes it: the FIB lookup answers
    // "forwarding disabled" otherwise.
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(ns)
}

/// One call (repeat 1) of an external program on `frame` arriving on
/// interface `ifindex`, as the source-NATed path needs (XDP: `struct
/// xdp_md`; tc: `struct __sk_buff` up to `ifindex`).
fn run_routed(
    hook: Hook,
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ifindex: u32,
    out: &mut [u8],
) -> Result<raw::Run> {
    let words: Vec<u32> = match hook {
        // data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        Hook::Xdp => vec![0, frame.len() as u32, 0, ifindex, 0, 0],
        // Zero up to ingress_ifindex (offset 36), then ifindex.
        Hook::Tc | Hook::TcExternal => [vec![0; 9], vec![ifindex, ifindex]].concat(),
    };
    let ctx: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let options = raw::RunOptions {
        repeat: 1,
        ctx: Some(&ctx),
        ..Default::default()
    };
    raw::test_run_with(prog, frame, out, &options)
        .with_context(|| format!("BPF_PROG_TEST_RUN of {} on {ROUTED_IF}", hook.program()))
}

/// Opens a source-NATed flow through `hook`'s program (client SYN to
/// `VIP_SNAT`, the backend's SYN-ACK to the node's port) and returns the
/// client's ACK, checked to be DNATed and source-NATed and sent out.
fn prepare_routed(hook: Hook, prog: BorrowedFd<'_>, ifindex: u32) -> Result<Vec<u8>> {
    let name = hook.program();
    let c = (CLIENT, hook.client_port() + 10);
    let vip = (VIP_SNAT, 80);
    let mut out = vec![0u8; 512];
    // Addresses and ports of an IPv4 frame without options.
    let tuple = |f: &[u8]| f[26..38].to_vec();
    let run = run_routed(hook, prog, &tcp(c, vip, Tcp::Syn), ifindex, &mut out)?;
    let snat_port = u16::from_be_bytes([out[34], out[35]]);
    let forwarded = tcp((ROUTED_NODE, snat_port), ROUTED_BACKEND, Tcp::Syn);
    ensure!(
        run.retval == hook.forward() && tuple(&out) == tuple(&forwarded),
        "{name}: the source-NATed SYN was not sent to the backend (verdict {})",
        run.retval
    );
    let syn_ack = tcp(ROUTED_BACKEND, (ROUTED_NODE, snat_port), Tcp::SynAck);
    let run = run_routed(hook, prog, &syn_ack, ifindex, &mut out)?;
    ensure!(
        run.retval == hook.forward() && tuple(&out) == tuple(&tcp(vip, c, Tcp::SynAck)),
        "{name}: the backend's SYN-ACK was not sent back to the client (verdict {})",
        run.retval
    );
    let ack = tcp(c, vip, Tcp::Ack);
    let run = run_routed(hook, prog, &ack, ifindex, &mut out)?;
    ensure!(
        run.retval == hook.forward() && tuple(&out) == tuple(&forwarded),
        "{name}: the measured ACK does not take the source-NATed path (verdict {})",
        run.retval
    );
    Ok(ack)
}

// ---------------------------------------------------------------------------
// Part 1: per-packet cost
// ---------------------------------------------------------------------------

/// The programs measured.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Hook {
    /// `kproxy_tc_pod`: the tc program on pod interfaces.
    Tc,
    /// `kproxy_xdp_external`: the XDP program on external interfaces.
    Xdp,
    /// `kproxy_tc_external`: the tc program on external interfaces (what
    /// XDP passes on, or the whole external path with `--xdp-mode off`).
    TcExternal,
}

const HOOKS: [Hook; 3] = [Hook::Tc, Hook::Xdp, Hook::TcExternal];

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Tc => "kproxy_tc_pod",
            Hook::Xdp => "kproxy_xdp_external",
            Hook::TcExternal => "kproxy_tc_external",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Hook::Tc => "tc",
            Hook::Xdp => "XDP",
            Hook::TcExternal => "tc external",
        }
    }
    /// The verdict of a packet sent out of an interface.
    fn forward(self) -> u32 {
        match self {
            Hook::Tc | Hook::TcExternal => TC_ACT_REDIRECT,
            Hook::Xdp => raw::XDP_TX,
        }
    }
    /// Paths measured one call per frame (repeat = 1): new flows, and the
    /// established path again for a like-for-like ratio; at the external
    /// hooks also a source-NATed flow's packet (route lookup, both sides
    /// rewritten, sent out), whose output a repeat could not replay.
    fn single_paths(self) -> &'static [&'static str] {
        match self {
            Hook::Tc => &SINGLE_PATHS[..2],
            Hook::Xdp | Hook::TcExternal => &SINGLE_PATHS,
        }
    }
    /// The verdict of a packet handed on to the stack.
    fn pass(self) -> u32 {
        match self {
            Hook::Tc | Hook::TcExternal => TC_ACT_OK,
            Hook::Xdp => raw::XDP_PASS,
        }
    }
    /// Each hook opens its own flows (the conntrack map is shared).
    fn client_port(self) -> u16 {
        match self {
            Hook::Tc => CLIENT_PORT,
            Hook::Xdp => CLIENT_PORT + 1,
            Hook::TcExternal => CLIENT_PORT + 2,
        }
    }
    /// Its place in `HOOKS`: each hook's new flows come from clients of
    /// their own.
    fn index(self) -> usize {
        self as usize
    }
}

/// Paths measured with `repeat` runs of one frame each.
/// "established" and "reply" are TCP (an ACK with 64 bytes of data).
/// The two "conntrack" paths are the established ones with the flow cache
/// off (`--no-flow-cache`): what a packet costs whose flow has no slot on
/// its CPU (the first after 100 ms, or one of many flows sharing a slot).
const REPEAT_PATHS: [&str; 7] = [
    "established",
    "reply",
    "non-service",
    "UDP established",
    "UDP reply",
    CONNTRACK_PATHS[0].0,
    CONNTRACK_PATHS[1].0,
];
/// The established paths measured again with the flow cache off, and the
/// path whose frame each uses.
const CONNTRACK_PATHS: [(&str, &str); 2] = [
    ("established, conntrack", "established"),
    ("UDP established, conntrack", "UDP established"),
];
/// Paths measured one call per frame (see `Hook::single_paths`).
const SINGLE_PATHS: [&str; 3] = ["new flow", "established", ROUTED_PATH];
const ROUTED_PATH: &str = "source-NATed";

#[derive(Clone, Copy, Default)]
struct Stat {
    kernel_ns: f64,
    wall_ns: f64,
}

/// What one program looks like to the verifier and the JIT.
#[derive(Clone, Copy, Default)]
struct ProgramSize {
    verified_insns: Option<u32>,
    xlated_bytes: Option<u32>,
    jited_bytes: u32,
}

struct CountResult {
    services: usize,
    program_time: Duration,
    /// The empty XDP program, repeat (the floor) and repeat 1.
    floor: Stat,
    floor_single: Stat,
    /// The empty tc program, repeat: what a tc test run costs by itself.
    tc_floor: Stat,
    repeat: BTreeMap<(Hook, &'static str), Stat>,
    single: BTreeMap<(Hook, &'static str), Stat>,
    new_flow_spread: BTreeMap<Hook, Spread>,
}

/// How the kernel-measured times of one path's repeat-1 calls spread.
#[derive(Clone, Copy, Default)]
struct Spread {
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
    /// The share of calls that took more than three times the median.
    over_3x: f64,
}

impl Spread {
    fn of(sorted: &[f64]) -> Self {
        let p = |q| percentile(sorted, q).unwrap_or(f64::NAN);
        let p50 = p(0.5);
        let n = sorted.len() as f64;
        Self {
            p50,
            p90: p(0.9),
            p99: p(0.99),
            mean: sorted.iter().sum::<f64>() / n,
            over_3x: sorted.iter().filter(|&&t| t > 3.0 * p50).count() as f64 / n,
        }
    }
}

impl CountResult {
    fn ns(&self, hook: Hook, path: &str, single: bool) -> f64 {
        let map = if single { &self.single } else { &self.repeat };
        map.iter()
            .find(|((h, p), _)| *h == hook && *p == path)
            .map_or(f64::NAN, |(_, s)| s.kernel_ns)
    }
    fn ratio(&self, hook: Hook, path: &str, single: bool) -> f64 {
        let floor = if single {
            self.floor_single
        } else {
            self.floor
        };
        self.ns(hook, path, single) / floor.kernel_ns
    }
}

struct PerPacket {
    counts: Vec<CountResult>,
    sizes: BTreeMap<Hook, ProgramSize>,
    /// Where the time goes, per hook and path, at the largest count.
    profiles: Vec<Profile>,
    profile_error: Option<String>,
    /// The tc paths with the L4 checksum in place and through the helper.
    checksum: ChecksumComparison,
}

/// The tc rewrite paths both ways, and the floor measured beside them.
struct ChecksumComparison {
    floor: Stat,
    rows: Vec<ChecksumRow>,
}

/// One tc path, its checksum updated in place (the skb's checksum state
/// read) and through `bpf_l4_csum_replace`, side by side.
struct ChecksumRow {
    path: &'static str,
    in_place: Stat,
    helper: Stat,
}

/// The tc paths whose rewrite the checksum update is part of.
const CHECKSUM_PATHS: [&str; 4] = ["established", "reply", "UDP established", "UDP reply"];

/// Part 1: measures, writes the plots into `docs`, renders the section.
pub fn run(config: &Config, docs: &Path) -> Result<Section> {
    eprintln!(
        "bench: per-packet cost at {:?} Services",
        config.service_counts
    );
    let pp = per_packet(config)?;
    write_plots(docs, &pp)?;
    Ok(render(config, &pp))
}

fn program_size(info: &aya::programs::ProgramInfo) -> ProgramSize {
    ProgramSize {
        verified_insns: info.verified_instruction_count(),
        xlated_bytes: info.size_translated(),
        jited_bytes: info.size_jitted(),
    }
}

fn per_packet(config: &Config) -> Result<PerPacket> {
    let ns = routed_netns()?;
    ns.run(|| {
        let ifindex = nix::net::if_::if_nametoindex(ROUTED_IF)
            .with_context(|| format!("{ROUTED_IF} in {}", ns.name()))?;
        per_packet_in_netns(config, ifindex)
    })?
}

/// One Service count's datapath, programmed, with its programs and the
/// frames its paths are measured with (flows established through it).
struct CountLab {
    /// Index into `Config::service_counts`.
    count: usize,
    program_time: Duration,
    lab: Lab,
    programs: Vec<(Hook, std::os::fd::OwnedFd)>,
    frames: BTreeMap<Hook, Frames>,
    /// The source-NATed path's frame, for the hooks that have it.
    routed: BTreeMap<Hook, Vec<u8>>,
}

impl CountLab {
    fn programs(&self) -> Vec<(Hook, BorrowedFd<'_>)> {
        self.programs
            .iter()
            .map(|(h, fd)| (*h, fd.as_fd()))
            .collect()
    }
}

/// `ifindex`: `ROUTED_IF`'s, in the namespace this thread is in.
fn per_packet_in_netns(config: &Config, ifindex: u32) -> Result<PerPacket> {
    let floors = Floors {
        xdp: raw::load_xdp_return_program(raw::XDP_PASS, "bench_xdp_floor")
            .context("loading the empty XDP program")?,
        tc: raw::load_empty_tc_program().context("loading the empty tc program")?,
    };
    let mut sizes = BTreeMap::new();
    // Every count's datapaths are up at once, so that the repeat runs can
    // take turns between the counts; several per count, because one load
    // can run a path 10-30% slower or faster than another load of the same
    // object with the same maps (where its code and data land), which is
    // not what the counts compare.
    let mut labs = Vec::new();
    for (count, &services) in config.service_counts.iter().enumerate() {
        for instance in 0..config.datapaths_per_count {
            eprintln!(
                "bench:   {services} Services: programming datapath {}",
                instance + 1
            );
            let mut lab = Lab::load(&format!("pp{services}-{instance}"), per_packet_sizes())?;
            let state = per_packet_state(services);
            let start = Instant::now();
            lab.apply(&mut Syncer::new(), &state)?;
            let program_time = start.elapsed();
            let mut programs = Vec::new();
            for hook in HOOKS {
                let info = match hook {
                    Hook::Tc => lab.datapath.pod_program().info(),
                    Hook::Xdp => lab.datapath.xdp_program().info(),
                    Hook::TcExternal => lab.datapath.external_tc_program().info(),
                };
                let info = info.with_context(|| format!("reading {}'s info", hook.program()))?;
                sizes.insert(hook, program_size(&info));
                let fd = match hook {
                    Hook::Tc => lab.datapath.pod_program().fd(),
                    Hook::Xdp => lab.datapath.xdp_program().fd(),
                    Hook::TcExternal => lab.datapath.external_tc_program().fd(),
                };
                let fd = fd.with_context(|| format!("{}'s fd", hook.program()))?;
                programs.push((hook, fd.as_fd().try_clone_to_owned()?));
            }
            let mut frames = BTreeMap::new();
            let mut routed = BTreeMap::new();
            for (hook, fd) in &programs {
                frames.insert(*hook, prepare(*hook, fd.as_fd())?);
                if hook.single_paths().contains(&ROUTED_PATH) {
                    routed.insert(*hook, prepare_routed(*hook, fd.as_fd(), ifindex)?);
                }
            }
            labs.push(CountLab {
                count,
                program_time,
                lab,
                programs,
                frames,
                routed,
            });
        }
    }
    eprintln!(
        "bench:   repeat = {}, {} runs, every datapath in turn",
        config.repeat, config.runs
    );
    let repeats = measure_repeat(config, &mut labs, &floors)?;
    let mut counts = Vec::new();
    for (count, (&services, repeat)) in config.service_counts.iter().zip(repeats).enumerate() {
        eprintln!("bench:   {services} Services: new flows");
        let mut single = Samples::new();
        let mut program_times = Vec::new();
        for lab in labs.iter().filter(|l| l.count == count) {
            let flows = config.new_flows.div_ceil(config.datapaths_per_count);
            measure_single(lab, flows, &floors, ifindex, &mut single)?;
            program_times.push(lab.program_time);
        }
        program_times.sort();
        let single = single_medians(&mut single);
        counts.push(CountResult {
            services,
            program_time: program_times[program_times.len() / 2],
            floor: repeat.floor,
            tc_floor: repeat.tc_floor,
            repeat: repeat.paths,
            floor_single: single.floor,
            single: single.paths,
            new_flow_spread: single.new_flow_spread,
        });
    }
    let mut profiles = Vec::new();
    let mut profile_error = None;
    if let Some(last) = labs.last() {
        match profile_paths(config, &last.programs(), ifindex) {
            Ok(p) => profiles = p,
            Err(e) => profile_error = Some(format!("{e:#}")),
        }
    }
    // Their maps are large: unloaded before the comparison loads two more.
    drop(labs);
    let checksum = checksum_paths(config, &floors)?;
    Ok(PerPacket {
        counts,
        sizes,
        profiles,
        profile_error,
        checksum,
    })
}

/// `kproxy_tc_pod`'s rewrite paths on two datapaths of the smallest count,
/// one reading the skb's checksum state (the default) and one always
/// updating the L4 checksum through `bpf_l4_csum_replace` (what a kernel
/// without BTF or the kfunc gets), the runs interleaved.
fn checksum_paths(config: &Config, floors: &Floors) -> Result<ChecksumComparison> {
    let services = config.service_counts[0];
    eprintln!("bench:   {services} Services: tc checksum in place and through the helper");
    let mut labs = Vec::new();
    for (mode, tag) in [
        (SkbChecksum::Read, "csum-read"),
        (SkbChecksum::Helpers, "csum-helper"),
    ] {
        let mut lab = Lab::load_with(tag, per_packet_sizes(), mode)?;
        ensure!(
            (mode == SkbChecksum::Read) == lab.datapath.skb_checksum_state().is_some(),
            "the in-place datapath must read the skb's checksum state on this kernel (see the log)"
        );
        lab.apply(&mut Syncer::new(), &per_packet_state(services))?;
        let fd = lab
            .datapath
            .pod_program()
            .fd()
            .context("kproxy_tc_pod's fd")?
            .as_fd()
            .try_clone_to_owned()?;
        let frames = prepare(Hook::Tc, fd.as_fd())?;
        labs.push((lab, fd, frames));
    }
    let mut out = vec![0u8; 512];
    let mut samples = Samples::new();
    for _ in 0..config.runs {
        for (mode, (_, fd, frames)) in ["in place", "helper"].into_iter().zip(&labs) {
            for (path, frame) in frames.paths() {
                if !CHECKSUM_PATHS.contains(&path) {
                    continue;
                }
                let run = raw::test_run(fd.as_fd(), frame, &mut out, config.repeat)?;
                ensure!(
                    run.retval == TC_ACT_OK,
                    "tc {path} ({mode}): verdict {}",
                    run.retval
                );
                record(&mut samples, format!("{mode} {path}"), &run);
            }
        }
        // The floor beside them, as in every other table.
        let reference = &labs[0].2.established;
        let run = raw::test_run(floors.xdp.as_fd(), reference, &mut out, config.repeat)?;
        record(&mut samples, "XDP floor".into(), &run);
    }
    let mut take = |name: &str| samples.get_mut(name).map(median_stat).unwrap_or_default();
    let floor = take("XDP floor");
    let rows = CHECKSUM_PATHS
        .into_iter()
        .map(|path| ChecksumRow {
            path,
            in_place: take(&format!("in place {path}")),
            helper: take(&format!("helper {path}")),
        })
        .collect();
    Ok(ChecksumComparison { floor, rows })
}

/// Adds one run's kernel and wall-clock times to `name`'s samples.
fn record(samples: &mut Samples, name: String, run: &raw::Run) {
    let entry = samples.entry(name).or_default();
    entry.0.push(f64::from(run.kernel_ns));
    entry.1.push(run.wall_ns);
}

/// Turns a datapath's flow cache on or off.
fn set_flow_cache(datapath: &mut Datapath, on: bool) -> Result<()> {
    let mut c = datapath.read_config()?;
    c.flags &= !proxy_common::CONFIG_FLAG_NO_FLOW_CACHE;
    if !on {
        c.flags |= proxy_common::CONFIG_FLAG_NO_FLOW_CACHE;
    }
    Ok(datapath.write_config(&c)?)
}

struct Floors {
    xdp: std::os::fd::OwnedFd,
    tc: std::os::fd::OwnedFd,
}

/// The frames a hook's paths are measured with, checked to take them.
struct Frames {
    established: Vec<u8>,
    reply: Vec<u8>,
    non_service: Vec<u8>,
    udp_established: Vec<u8>,
    udp_reply: Vec<u8>,
}

impl Frames {
    /// Each path measured with repeat, and its frame.
    fn paths(&self) -> [(&'static str, &Vec<u8>); 5] {
        [
            ("established", &self.established),
            ("reply", &self.reply),
            ("non-service", &self.non_service),
            ("UDP established", &self.udp_established),
            ("UDP reply", &self.udp_reply),
        ]
    }
}

/// Opens the two flows that DNAT into each other (client -> A goes to B's
/// address, client -> B to A's) through `hook`'s program and checks that
/// each measured frame takes its path on every repeat. Repeated runs of
/// BPF_PROG_TEST_RUN reuse the rewritten packet, so each run of the same
/// frame is a real conntrack hit plus a real address and port rewrite (the
/// program skips rewrites that change nothing, so an identity DNAT would
/// flatter it).
fn prepare(hook: Hook, prog: BorrowedFd<'_>) -> Result<Frames> {
    let a = (VIP_A, PORT_A);
    let b = (VIP_B, PORT_B);
    let c = (CLIENT, hook.client_port());
    let name = hook.program();
    for (syn, expect) in [(tcp(c, a, Tcp::Syn), b), (tcp(c, b, Tcp::Syn), a)] {
        let (verdict, out) = run_once(prog, &syn, 1)?;
        ensure!(
            verdict == hook.pass() && out == tcp(c, expect, Tcp::Syn),
            "{name}: the measured SYN was not DNATed as expected (verdict {verdict})"
        );
    }
    // The backends' SYN-ACKs establish both flows.
    let (verdict, out) = run_once(prog, &tcp(b, c, Tcp::SynAck), 2)?;
    ensure!(
        verdict == hook.pass() && out == tcp(b, c, Tcp::SynAck),
        "{name}: the SYN-ACKs were not reverse-NATed as expected"
    );
    // UDP: the first datagram each way opens the flow (no handshake).
    for (first, expect) in [(udp(c, a), b), (udp(c, b), a)] {
        let (verdict, out) = run_once(prog, &first, 1)?;
        ensure!(
            verdict == hook.pass() && out == udp(c, expect),
            "{name}: the first UDP datagram was not DNATed as expected (verdict {verdict})"
        );
    }
    let frames = Frames {
        established: tcp(c, a, Tcp::Ack),
        reply: tcp(b, c, Tcp::Ack),
        non_service: tcp(c, (NOT_A_SERVICE, 80), Tcp::Ack),
        udp_established: udp(c, a),
        udp_reply: udp(b, c),
    };
    // One run gives the partner frame, two runs the frame itself.
    for (frame, partner) in [
        (&frames.established, tcp(c, b, Tcp::Ack)),
        (&frames.reply, tcp(a, c, Tcp::Ack)),
        (&frames.non_service, frames.non_service.clone()),
        (&frames.udp_established, udp(c, b)),
        (&frames.udp_reply, udp(a, c)),
    ] {
        let (v1, once) = run_once(prog, frame, 1)?;
        let (v2, twice) = run_once(prog, frame, 2)?;
        ensure!(
            v1 == hook.pass() && v2 == hook.pass() && once == partner && &twice == frame,
            "{name}: a measured frame does not take the path it is meant to measure"
        );
    }
    Ok(frames)
}

fn median_stat(samples: &mut (Vec<f64>, Vec<f64>)) -> Stat {
    Stat {
        kernel_ns: median(&mut samples.0),
        wall_ns: median(&mut samples.1),
    }
}

/// One measured case: a program, a frame and the verdict it must give.
/// `key` is the hook and path (none for the floors).
type Case<'a> = (
    Option<(Hook, &'static str)>,
    &'static str,
    BorrowedFd<'a>,
    &'a [u8],
    u32,
    // Run with the flow cache off.
    bool,
);

/// Kernel and wall-clock times per case name.
type Samples = BTreeMap<String, (Vec<f64>, Vec<f64>)>;

/// Medians of one count's repeat runs.
struct RepeatResult {
    floor: Stat,
    tc_floor: Stat,
    paths: BTreeMap<(Hook, &'static str), Stat>,
}

/// Every path of every count with repeat, the floors beside each count's:
/// each run measures every case of every count once, so drift and bursts
/// of load on this shared machine hit all counts alike instead of
/// whichever count was being measured at the time.
fn measure_repeat(
    config: &Config,
    labs: &mut [CountLab],
    floors: &Floors,
) -> Result<Vec<RepeatResult>> {
    let mut out = vec![0u8; 512];
    // Pooled per count: every datapath of a count adds its runs.
    let mut samples: Vec<Samples> = config
        .service_counts
        .iter()
        .map(|_| Samples::new())
        .collect();
    for _ in 0..config.runs {
        for count in labs.iter_mut() {
            let CountLab {
                count,
                lab,
                programs,
                frames,
                ..
            } = count;
            let samples = &mut samples[*count];
            for (key, label, fd, frame, verdict, cache_off) in
                repeat_cases(programs, frames, floors)?
            {
                if cache_off {
                    set_flow_cache(&mut lab.datapath, false)?;
                }
                let run = raw::test_run(fd, frame, &mut out, config.repeat);
                if cache_off {
                    set_flow_cache(&mut lab.datapath, true)?;
                }
                let run = run?;
                ensure!(run.retval == verdict, "{label}: verdict {}", run.retval);
                let name = key.map_or(label.to_string(), |(h, p)| format!("{} {p}", h.short()));
                record(samples, name, &run);
            }
        }
    }
    let mut results = Vec::new();
    for mut samples in samples {
        let mut take = |name: &str| samples.get_mut(name).map(median_stat).unwrap_or_default();
        let mut paths = BTreeMap::new();
        for hook in HOOKS {
            for path in REPEAT_PATHS {
                paths.insert((hook, path), take(&format!("{} {path}", hook.short())));
            }
        }
        results.push(RepeatResult {
            floor: take("XDP floor"),
            tc_floor: take("tc floor"),
            paths,
        });
    }
    Ok(results)
}

/// One count's repeat cases: the floors (which run the tc established
/// frame, which they do not look at), then every path of every program.
fn repeat_cases<'a>(
    programs: &'a [(Hook, std::os::fd::OwnedFd)],
    frames: &'a BTreeMap<Hook, Frames>,
    floors: &'a Floors,
) -> Result<Vec<Case<'a>>> {
    let reference = &frames[&Hook::Tc].established;
    let mut cases: Vec<Case<'a>> = vec![
        (
            None,
            "XDP floor",
            floors.xdp.as_fd(),
            reference,
            raw::XDP_PASS,
            false,
        ),
        (
            None,
            "tc floor",
            floors.tc.as_fd(),
            reference,
            TC_ACT_OK,
            false,
        ),
    ];
    for (hook, fd) in programs {
        let (hook, fd) = (*hook, fd.as_fd());
        let paths = frames[&hook].paths();
        let mut push = |path, frame: &'a [u8], cache_off| {
            cases.push((Some((hook, path)), path, fd, frame, hook.pass(), cache_off));
        };
        for (path, frame) in paths {
            push(path, frame, false);
        }
        for (path, like) in CONNTRACK_PATHS {
            let frame = paths.iter().find(|(p, _)| *p == like).map(|(_, f)| *f);
            push(path, frame.context("the frame of a conntrack path")?, true);
        }
    }
    Ok(cases)
}

/// Medians of one count's repeat-1 runs.
struct SingleResult {
    floor: Stat,
    paths: BTreeMap<(Hook, &'static str), Stat>,
    new_flow_spread: BTreeMap<Hook, Spread>,
}

/// New flows: one call per SYN, each from a new source port, so every
/// call creates a flow (repeat would turn the 2nd run into an established
/// hit). The floor, the established path and the source-NATed path are
/// measured the same way, interleaved, for a like-for-like ratio.
/// `flows` SYNs through `lab`'s programs; the times go to `single`.
fn measure_single(
    lab: &CountLab,
    flows: usize,
    floors: &Floors,
    ifindex: u32,
    single: &mut Samples,
) -> Result<()> {
    let programs = lab.programs();
    let (frames, routed) = (&lab.frames, &lab.routed);
    let reference = &frames[&Hook::Tc].established;
    let mut out = vec![0u8; 512];
    let backends = new_flow_backends();
    for i in 0..flows {
        for &(hook, fd) in &programs {
            // Distinct clients per hook: each SYN is new to the shared map.
            let n = i * HOOKS.len() + hook.index();
            let sport = 1024 + (n % 60_000) as u16;
            let client = [198, 18, 255, 10 + (n / 60_000) as u8];
            let syn = tcp((client, sport), (VIP_NEW, 80), Tcp::Syn);
            let run = raw::test_run(fd, &syn, &mut out, 1)?;
            ensure!(
                run.retval == hook.pass(),
                "{}: new flow: verdict {}",
                hook.program(),
                run.retval
            );
            if i < 16 {
                // Spot-check that each is a fresh DNAT to one of the backends.
                let dst = [out[30], out[31], out[32], out[33]];
                ensure!(
                    backends.iter().any(|b| b.0 == dst),
                    "{}: a new flow was not DNATed to a backend",
                    hook.program()
                );
            }
            record(single, format!("{} new flow", hook.short()), &run);
            let run = raw::test_run(fd, &frames[&hook].established, &mut out, 1)?;
            record(single, format!("{} established", hook.short()), &run);
            if let Some(frame) = routed.get(&hook) {
                let run = run_routed(hook, fd, frame, ifindex, &mut out)?;
                ensure!(
                    run.retval == hook.forward(),
                    "{}: {ROUTED_PATH}: verdict {}",
                    hook.program(),
                    run.retval
                );
                record(single, format!("{} {ROUTED_PATH}", hook.short()), &run);
            }
        }
        let run = raw::test_run(floors.xdp.as_fd(), reference, &mut out, 1)?;
        record(single, "XDP floor".into(), &run);
    }
    Ok(())
}

/// The spread of the new-flow calls' times, and what makes their tail.
fn new_flow_spread_table(pp: &PerPacket) -> String {
    let mut md = String::from(
        "\n### New flows: the spread of one call's time (repeat = 1, kernel-measured ns)\n\n",
    );
    let _ = write!(md, "| Services |");
    for hook in HOOKS {
        let h = hook.short();
        let _ = write!(
            md,
            " {h} p50 | {h} p90 | {h} p99 | {h} mean | {h} calls over 3x p50 |"
        );
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(5 * HOOKS.len()));
    for c in &pp.counts {
        let _ = write!(md, "| {} |", c.services);
        for hook in HOOKS {
            let s = c.new_flow_spread.get(&hook).copied().unwrap_or_default();
            let _ = write!(
                md,
                " {:.0} | {:.0} | {:.0} | {:.0} | {:.2}% |",
                s.p50,
                s.p90,
                s.p99,
                s.mean,
                100.0 * s.over_3x
            );
        }
        let _ = writeln!(md);
    }
    let shares = || {
        pp.counts
            .iter()
            .flat_map(|c| c.new_flow_spread.values())
            .map(|s| 100.0 * s.over_3x)
    };
    let (least, most) = (
        shares().fold(f64::INFINITY, f64::min),
        shares().fold(0.0, f64::max),
    );
    let at_p99 = if least >= 1.0 {
        " (so p99 falls among them)"
    } else {
        ""
    };
    let _ = writeln!(
        md,
        "\nThe targets use the median. The tail above it is the conntrack LRU's refill: \
         the LRU hash (`BPF_MAP_TYPE_LRU_HASH`, one LRU for all CPUs) hands each CPU free \
         elements in batches of 128 (`LOCAL_FREE_TARGET` in the kernel's \
         `kernel/bpf/bpf_lru_list.c`). Taking a batch holds the global LRU lock while it moves \
         the CPU's recently used elements to the global lists, rotates them (checking up to \
         128 elements' reference bits) and moves 128 free elements over, all cold in the \
         cache. A new flow takes two elements, so one new flow in 64 ({:.2}%) pays for a \
         refill: here {least:.2}% to {most:.2}% of the calls took more than three times the \
         median{at_p99}, and the mean carries the refills shared out over every flow. \
         With `BPF_F_NO_COMMON_LRU` (a separate LRU per CPU) the refills go: in a diagnostic \
         build (not kept; four `--quick` runs interleaved with the build as it is) the tc new \
         flow's p99 was 2.2-2.3 µs instead of 8.1, its mean the same (1216-1347 ns against \
         1257-1309), its median 2-15% higher. kproxy keeps the common LRU, as Cilium does for \
         its conntrack maps: a per-CPU LRU splits the preallocated elements between the CPUs \
         for good, so a CPU that takes a burst of new flows (one busy NIC queue) evicts its \
         own live flows while the table as a whole has room, and a connection whose entry is \
         evicted breaks.",
        100.0 / 64.0,
    );
    md
}

/// The medians of one count's repeat-1 samples.
fn single_medians(single: &mut Samples) -> SingleResult {
    let mut take = |name: &str| single.get_mut(name).map(median_stat).unwrap_or_default();
    let floor = take("XDP floor");
    let mut paths = BTreeMap::new();
    for hook in HOOKS {
        for &path in hook.single_paths() {
            paths.insert((hook, path), take(&format!("{} {path}", hook.short())));
        }
    }
    // `take` sorted the samples.
    let new_flow_spread = HOOKS
        .iter()
        .filter_map(|&hook| {
            let (kernel, _) = single.get(&format!("{} new flow", hook.short()))?;
            Some((hook, Spread::of(kernel)))
        })
        .collect();
    SingleResult {
        floor,
        paths,
        new_flow_spread,
    }
}
fn write_plots(docs: &Path, pp: &PerPacket) -> Result<()> {
    let groups: Vec<String> = pp
        .counts
        .iter()
        .map(|c| format!("{} Services", c.services))
        .collect();
    let series = |label: &str, f: &dyn Fn(&CountResult) -> f64| -> (String, Vec<f64>) {
        (label.to_owned(), pp.counts.iter().map(f).collect())
    };
    let mut repeat = vec![series("empty XDP (floor)", &|c| c.floor.kernel_ns)];
    let mut single = vec![series("empty XDP (floor)", &|c| c.floor_single.kernel_ns)];
    for hook in HOOKS {
        for path in REPEAT_PATHS {
            repeat.push(series(&format!("{} {path}", hook.short()), &|c| {
                c.ns(hook, path, false)
            }));
        }
        for &path in hook.single_paths() {
            single.push(series(&format!("{} {path}", hook.short()), &|c| {
                c.ns(hook, path, true)
            }));
        }
    }
    std::fs::write(
        docs.join("bench-per-packet.svg"),
        bar_chart(
            "Per packet, kproxy_tc_pod, kproxy_xdp_external, kproxy_tc_external (BPF_PROG_TEST_RUN, repeat, median)",
            "ns per packet (kernel-measured)",
            &groups,
            &repeat,
        ),
    )?;
    std::fs::write(
        docs.join("bench-new-flow.svg"),
        bar_chart(
            "New flows: one call per SYN (repeat 1, median)",
            "ns per call (kernel-measured)",
            &groups,
            &single,
        ),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Profile: `perf record -e cpu-clock` on the thread running one path.
// ---------------------------------------------------------------------------

/// Where one path's time goes.
struct Profile {
    hook: Hook,
    path: &'static str,
    samples: u64,
    /// (symbol, share of samples in percent), largest first.
    symbols: Vec<(String, f64)>,
}

/// How long each path is profiled.
const PROFILE_TIME: Duration = Duration::from_millis(1500);

fn profile_paths(
    config: &Config,
    programs: &[(Hook, BorrowedFd<'_>)],
    ifindex: u32,
) -> Result<Vec<Profile>> {
    ensure!(
        which("perf"),
        "perf is not installed (`cargo xtask setup` installs linux-perf)"
    );
    let time = if config.quick {
        PROFILE_TIME / 2
    } else {
        PROFILE_TIME
    };
    let mut profiles = Vec::new();
    let mut out = vec![0u8; 512];
    for &(hook, fd) in programs {
        // The flows exist already; this only re-checks the frames.
        let frames = prepare(hook, fd)?;
        for (path, frame) in frames.paths() {
            let start = Instant::now();
            let (samples, symbols) = profile_one(|| {
                raw::test_run(fd, frame, &mut out, 100_000)?;
                Ok(start.elapsed() < time)
            })
            .with_context(|| format!("profiling {} {path}", hook.program()))?;
            profiles.push(Profile {
                hook,
                path,
                samples,
                symbols,
            });
        }
        if hook.single_paths().contains(&ROUTED_PATH) {
            // One call per frame, as measured (its output cannot be replayed).
            let frame = prepare_routed(hook, fd, ifindex)?;
            let start = Instant::now();
            let (samples, symbols) = profile_one(|| {
                run_routed(hook, fd, &frame, ifindex, &mut out)?;
                Ok(start.elapsed() < time)
            })
            .with_context(|| format!("profiling {} {ROUTED_PATH}", hook.program()))?;
            profiles.push(Profile {
                hook,
                path: ROUTED_PATH,
                samples,
                symbols,
            });
        }
        // New flows: SYNs from clients no measurement used, built before
        // perf starts, one call each (so the syscall around each program
        // run is in the samples too).
        let syns: Vec<Vec<u8>> = (0..PROFILE_NEW_FLOWS)
            .map(|n| {
                let client = [198, 18, 253 - hook.index() as u8, (n / 60_000) as u8];
                tcp(
                    (client, 1024 + (n % 60_000) as u16),
                    (VIP_NEW, 80),
                    Tcp::Syn,
                )
            })
            .collect();
        let mut next = syns.iter();
        let (samples, symbols) = profile_one(|| {
            let Some(syn) = next.next() else {
                return Ok(false);
            };
            let run = raw::test_run(fd, syn, &mut out, 1)?;
            ensure!(
                run.retval == hook.pass(),
                "a new flow: verdict {}",
                run.retval
            );
            Ok(true)
        })
        .with_context(|| format!("profiling {} new flow", hook.program()))?;
        profiles.push(Profile {
            hook,
            path: "new flow",
            samples,
            symbols,
        });
    }
    Ok(profiles)
}

/// SYNs per program in the new-flow profile: each opens two conntrack
/// entries, and with the measurement's flows they stay below the map's
/// capacity (an LRU eviction would change what is measured).
const PROFILE_NEW_FLOWS: usize = 30_000;

/// Samples this thread (kernel side included: BPF_PROG_TEST_RUN runs the
/// program in our syscall) with the software cpu-clock event, since this VM
/// has no PMU, while it calls `work` until that returns false.
fn profile_one(mut work: impl FnMut() -> Result<bool>) -> Result<(u64, Vec<(String, f64)>)> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let data = tempfile_path("perf.data");
    let _ = std::fs::remove_file(&data);
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "10000", "-t"])
        .arg(tid.to_string())
        .arg("-o")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    // perf writes the file header once it records.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&data).map_or(true, |m| m.len() == 0) {
        ensure!(Instant::now() < deadline, "perf record did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let worked = loop {
        match work() {
            Ok(true) => {}
            done => break done,
        }
    };
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    perf.wait()?;
    worked?;
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--sort",
            "sym",
            "--percent-limit",
            "1",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("perf report")?;
    let _ = std::fs::remove_file(&data);
    let text = String::from_utf8_lossy(&report.stdout);
    let samples = text
        .lines()
        .find_map(|l| l.strip_prefix("# Samples: "))
        .and_then(|l| l.split_whitespace().next())
        .map_or(0, parse_count);
    let symbols = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let share: f64 = fields.next()?.strip_suffix('%')?.parse().ok()?;
            let _mode = fields.next()?;
            let symbol: Vec<&str> = fields.collect();
            Some((readable_symbol(&symbol.join(" ")), share))
        })
        .collect();
    Ok((samples, symbols))
}

/// perf's "12K" / "1M" sample counts.
fn parse_count(s: &str) -> u64 {
    let (number, scale) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1_000.0),
        Some('M') => (&s[..s.len() - 1], 1_000_000.0),
        _ => (s, 1.0),
    };
    number.parse::<f64>().map_or(0, |n| (n * scale) as u64)
}

/// `bpf_prog_<tag>_tracked_3C_false_3E_` -> `BPF tracked<false>`.
fn readable_symbol(symbol: &str) -> String {
    // A JITed program is `bpf_prog_<16 hex digits of tag>_<name>`; kernel
    // functions such as `bpf_prog_run_xdp` only share the prefix.
    let Some((_tag, name)) = symbol
        .strip_prefix("bpf_prog_")
        .and_then(|rest| rest.split_once('_'))
        .filter(|(tag, _)| tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return symbol.to_owned();
    };
    let name = name
        .replace("_3C_", "<")
        .replace("_3E_", ">")
        .replace("_3A_", ":")
        .replace("_2C_", ",")
        .replace("_20_", " ");
    // Generic parameters spell out aya's context types: keep the short name.
    let name = name
        .replace("aya_ebpf::programs::tc::TcContext", "tc")
        .replace("aya_ebpf::programs::xdp::XdpContext", "xdp");
    format!("BPF {name}")
}

fn render(config: &Config, pp: &PerPacket) -> Section {
    let mut md = String::new();
    let _ = writeln!(md, "## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n");
    let size = |hook: Hook| {
        let s = pp.sizes.get(&hook).copied().unwrap_or_default();
        format!(
            "verifier: {} instructions processed; {} bytes translated, {} bytes JITed",
            s.verified_insns.map_or("?".into(), |n| n.to_string()),
            s.xlated_bytes.map_or("?".into(), |n| n.to_string()),
            s.jited_bytes
        )
    };
    let _ = writeln!(
        md,
        "Programs: `kproxy_tc_pod` (tc, pod interfaces; {}), `kproxy_xdp_external` (XDP, \
         external interfaces; {}) and `kproxy_tc_external` (tc, external interfaces: what XDP \
         passes on, or the whole external path with `--xdp-mode off`; {}). Floor: an empty XDP program (`r0 = XDP_PASS; exit`, loaded \
         with raw `bpf(BPF_PROG_LOAD)`), measured in the same run with the same raw \
         `BPF_PROG_TEST_RUN` code as kproxy's programs. An empty tc program is measured too \
         (column \"tc floor\"): a tc test run builds an skb, so it starts a little higher.\n",
        size(Hook::Tc),
        size(Hook::Xdp),
        size(Hook::TcExternal)
    );
    let floors = pp.counts.iter().map(|c| c.floor.kernel_ns);
    let (low, high) = floors.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), f| {
        (lo.min(f), hi.max(f))
    });
    let floor_range = if low == high {
        format!("{low:.0}")
    } else {
        format!("{low:.0} to {high:.0}")
    };
    let _ = writeln!(
        md,
        "Method: every case is run with repeat = {} ({} runs, median). Each Service count \
         gets {} datapaths, loaded and programmed alike (one load can run a path 10-30% slower \
         or faster than another load of the same object and maps, by where its code and data \
         land, which is not what the counts compare), and all of them are up before the \
         measuring starts. Each run then measures every case on every datapath once \
         (interleaved), so drift and bursts of load on this shared machine hit all counts \
         alike; a count's figure is the median of its datapaths' runs together. The kernel \
         reports the average time per repeat in whole nanoseconds (`bpf_test_timer`, which \
         leaves out time spent rescheduled); the bench also records wall time around the \
         syscall divided by repeat (in parentheses). Ratios use the kernel numbers. The \
         scaling targets compare a path's cost at the largest and the smallest count; its \
         ratio to the floor is shown beside it (the floor: {floor_range} whole ns across \
         the counts). New flows are measured count after count, shared out between the \
         count's datapaths. The programming time is the median of the count's datapaths.\n",
        config.repeat, config.runs, config.datapaths_per_count
    );
    let _ = writeln!(
        md,
        "- **established**: a TCP ACK (64-byte payload) of a tracked flow. `BPF_PROG_TEST_RUN` \
         runs every repeat on the same packet, so the rewritten packet is what the next repeat \
         sees. Two Services therefore point at each other (A {a}:{pa} -> B {b}:{pb} as its \
         only backend, B -> A; externalIPs Services with backends on this node and \
         `externalTrafficPolicy: Local`, so the external programs serve them too, DNAT and \
         pass), and the two flows from the same client \
         port are established first (SYN, SYN-ACK) through the program measured: every repeat \
         is a tracked flow's packet and a real address and port rewrite, alternating between \
         the two flows. The bench checks that one run yields the other flow's packet and two \
         runs the original. Each flow's translation is in the CPU's flow cache after its first \
         packet, so this is the cached path.\n\
         - **established, conntrack** and **UDP established, conntrack**: the same frames with \
         the flow cache off (`CONFIG_FLAG_NO_FLOW_CACHE`, what `--no-flow-cache` sets, turned \
         on just around these runs): every packet probes the cache, finds nothing, reads its \
         conntrack entry and tries to refill its slot, as a packet whose flow has no slot does.\n\
         - **reply**: the backend's ACK of the same flows (reverse NAT), same alternation.\n\
         - **non-service**: a TCP ACK to {ns}, which is no Service (conntrack misses, its bit in \
         the address filter is clear, verdict pass, packet unchanged).\n\
         - **UDP established**, **UDP reply**: the same with UDP datagrams (64-byte payload, \
         with a checksum): A and B serve UDP on the same ports, and the first datagram each way \
         opens the flows. A UDP flow also re-checks that its backend is still programmed once \
         per backend epoch (a new one starts after every sync that deleted map entries), so the \
         measured datagrams, all in one epoch, take the same path as TCP.\n\
         - **new flow**: cannot use repeat (the second repeat would find the flow the first \
         created). Instead {nf} SYNs per program from distinct clients to a Service with 10 \
         backends (random selection), one `BPF_PROG_TEST_RUN` call each with repeat = 1, \
         median of the kernel-reported times. The floor and the established ACK are measured \
         the same way, interleaved with the SYNs, for a like-for-like ratio. With repeat = 1 \
         the kernel time also holds the timer's own overhead (two `ktime_get_ns`, bottom-half \
         disable), which is why the repeat-1 floor is higher than the repeat floor.\n\
         - **source-NATed** (external programs, repeat = 1, interleaved with the new flows): \
         a client's ACK of an established flow to an externalIPs Service ({snat}:80) whose one \
         backend ({backend}) is on another node, the path of external traffic with policy \
         Cluster: DNAT and SNAT to the node's address (both sides rewritten), the route (FIB \
         lookup, cached per CPU), the TTL lowered, and out (XDP_TX at XDP, \
         `bpf_redirect_neigh` at tc). Its output cannot be replayed by a repeat. The frames \
         arrive on `{routed_if}`, a veth in a namespace of the bench's own with the node's \
         address, routes and static neighbours (every part-1 run happens on a thread inside \
         it: the test run's FIB lookups use the caller's namespace). The bench checks each \
         call's verdict, and before measuring that the flow's packet leaves source-NATed to \
         the backend.\n",
        a = dotted(VIP_A),
        pa = PORT_A,
        b = dotted(VIP_B),
        pb = PORT_B,
        ns = dotted(NOT_A_SERVICE),
        nf = config.new_flows,
        snat = dotted(VIP_SNAT),
        backend = dotted(ROUTED_BACKEND.0),
        routed_if = ROUTED_IF,
    );
    let _ = writeln!(
        md,
        "Service counts: the smallest point is the {MEASURED_SERVICES} Services the \
         measurement needs (A, B, the new-flow Service and the source-NATed one; there is no 1-Service setup that \
         exercises every path); larger points add ClusterIP fillers with one endpoint each, \
         distinct VIPs in 198.19.0.0/16 (then the next port), endpoints in 198.18.0.0/16 \
         reused modulo the range. Map sizes, the same at every count: services {}, backends \
         {}, rev-NAT {}, conntrack {} (defaults except services and rev-NAT, raised so \
         100 000 Services fit).\n",
        per_packet_sizes().services,
        per_packet_sizes().backends,
        per_packet_sizes().rev_nat,
        per_packet_sizes().conntrack
    );
    let _ = writeln!(
        md,
        "![per-packet cost](bench-per-packet.svg)\n\n![new flows](bench-new-flow.svg)\n"
    );
    let _ = writeln!(
        md,
        "### ns per packet, repeat = {} (kernel-measured; wall-clock in parentheses)\n",
        config.repeat
    );
    let _ = write!(md, "| Services | programming time | XDP floor | tc floor |");
    for hook in HOOKS {
        for p in REPEAT_PATHS {
            let _ = write!(md, " {} {p} |", hook.short());
        }
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "|---|---|---|---|{}",
        "---|".repeat(HOOKS.len() * REPEAT_PATHS.len())
    );
    let cell = |s: Stat| format!(" {:.0} ({:.1}) |", s.kernel_ns, s.wall_ns);
    for c in &pp.counts {
        let _ = write!(
            md,
            "| {} | {:.0} ms |{}{}",
            c.services,
            ms(c.program_time),
            cell(c.floor),
            cell(c.tc_floor)
        );
        for hook in HOOKS {
            for p in REPEAT_PATHS {
                let s = c.repeat.get(&(hook, p)).copied().unwrap_or_default();
                md.push_str(&cell(s));
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\n### ns per call, repeat = 1 (kernel-measured; wall-clock in parentheses)\n"
    );
    let _ = write!(md, "| Services | XDP floor |");
    for hook in HOOKS {
        for p in hook.single_paths() {
            let _ = write!(md, " {} {p} |", hook.short());
        }
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "|---|---|{}",
        "---|".repeat(HOOKS.iter().map(|h| h.single_paths().len()).sum())
    );
    for c in &pp.counts {
        let _ = write!(md, "| {} |{}", c.services, cell(c.floor_single));
        for hook in HOOKS {
            for &p in hook.single_paths() {
                let s = c.single.get(&(hook, p)).copied().unwrap_or_default();
                md.push_str(&cell(s));
            }
        }
        let _ = writeln!(md);
    }
    md.push_str(&new_flow_spread_table(pp));
    let _ = writeln!(
        md,
        "\n### Ratios to the floor (empty XDP program) measured in the same run\n"
    );
    let _ = write!(md, "| Services |");
    for hook in HOOKS {
        for p in REPEAT_PATHS {
            let _ = write!(md, " {} {p} |", hook.short());
        }
        for &p in hook.single_paths() {
            if p != "established" {
                let _ = write!(md, " {} {p} (repeat 1) |", hook.short());
            }
        }
    }
    let _ = writeln!(md);
    let columns: usize = HOOKS
        .iter()
        .map(|h| REPEAT_PATHS.len() + h.single_paths().len() - 1)
        .sum();
    let _ = writeln!(md, "|---|{}", "---|".repeat(columns));
    for c in &pp.counts {
        let _ = write!(md, "| {} |", c.services);
        for hook in HOOKS {
            for p in REPEAT_PATHS {
                let _ = write!(md, " {:.2}x |", c.ratio(hook, p, false));
            }
            for &p in hook.single_paths() {
                if p != "established" {
                    let _ = write!(md, " {:.2}x |", c.ratio(hook, p, true));
                }
            }
        }
        let _ = writeln!(md);
    }

    // Targets.
    let _ = writeln!(md, "\n### Targets\n");
    let _ = writeln!(md, "| target | measured | result |\n|---|---|---|");
    let mut misses: Vec<String> = Vec::new();
    let worst = |f: &dyn Fn(&CountResult) -> f64| pp.counts.iter().map(f).fold(f64::NAN, f64::max);
    for hook in HOOKS {
        let name = hook.program();
        // (path, measured with repeat 1, bound, which floor)
        for (path, single, bound, floor) in [
            ("established", false, 3.0, "floor"),
            ("UDP established", false, 3.0, "floor"),
            ("new flow", true, 6.0, "floor (repeat-1 floor"),
        ] {
            let ratio = worst(&|c| c.ratio(hook, path, single));
            let every = if single {
                ", every count)"
            } else {
                " (every count)"
            };
            let _ = writeln!(
                md,
                "| `{name}` {path} <= {bound:.0}x {floor}{every} | worst {ratio:.2}x | {} |",
                verdict(ratio <= bound)
            );
            if ratio > bound {
                misses.push(format!("{} {path}", hook.short()));
            }
        }
    }
    if let (Some(first), Some(last)) = (pp.counts.first(), pp.counts.last()) {
        for hook in HOOKS {
            let paths = REPEAT_PATHS.iter().map(|p| (*p, false));
            for (path, single) in paths.chain([("new flow", true)]) {
                let (from, to) = (first.ns(hook, path, single), last.ns(hook, path, single));
                // The target's own terms: the cost itself (the verdict).
                // Relative to the floor measured beside it, the machine's
                // drift between counts would cancel, but the floor's own
                // spread between counts (1-2 ns of about 22, whole ns)
                // comes in instead: shown as a check.
                let growth = to / from - 1.0;
                let normalized =
                    last.ratio(hook, path, single) / first.ratio(hook, path, single) - 1.0;
                let pass = growth <= 0.10;
                let _ = writeln!(
                    md,
                    "| `{}` {path} at {} Services within 10% of {} Services | {:+.1}% ({from:.0} -> {to:.0} ns; {:+.1}% against the floor) | {} |",
                    hook.program(),
                    last.services,
                    first.services,
                    growth * 100.0,
                    normalized * 100.0,
                    verdict(pass)
                );
                if !pass {
                    misses.push(format!(
                        "{} {path} at {} Services",
                        hook.short(),
                        last.services
                    ));
                }
            }
        }
    }
    if config.quick {
        let _ = writeln!(
            md,
            "\n(--quick measures only {:?} Services; the full run adds 1 000 and 100 000.)",
            config.service_counts
        );
    }
    md.push_str(&checksum_text(config, pp));
    md.push_str(&profile_text(pp));
    Section {
        markdown: md,
        misses,
        why: why_text(pp),
        not_measured: vec![
            "The per-packet numbers are TCP and UDP over IPv4 (no IPv6, fragments, rejects; new \
             flows TCP only). The repeat paths are those of a local backend (DNAT, pass); a \
             remote backend's path (SNAT, route, out) is measured one call at a time (the \
             source-NATed columns), TCP only, and part 4 measures its forwarding rate."
                .into(),
        ],
    }
}

/// The tc checksum comparison's table.
fn checksum_text(config: &Config, pp: &PerPacket) -> String {
    let mut md = String::new();
    let floor = pp.checksum.floor.kernel_ns;
    let _ = writeln!(
        md,
        "\n### tc: the L4 checksum in place and through `bpf_l4_csum_replace` ({} Services)\n\n\
         `kproxy_tc_pod` reads the skb's checksum state (`skb->ip_summed`, through the \
         `bpf_cast_to_kern_ctx` kfunc, patched in from the kernel's BTF at load) and updates the \
         L4 checksum in place; on a kernel where it cannot (no BTF, no kfunc) it takes \
         `bpf_l4_csum_replace`, two calls per rewrite, for every packet. Two more datapaths of \
         the smallest count, one each way, measured side by side (repeat = {}, {} runs \
         interleaved, median; a test run's skb is CHECKSUM_NONE, whose whole checksum either \
         way updates).\n\n\
         | path | in place (ns) | helper (ns) | in place / floor | helper / floor | helper / in place |\n\
         |---|---|---|---|---|---|",
        config.service_counts[0], config.repeat, config.runs
    );
    for row in &pp.checksum.rows {
        let (a, b) = (row.in_place.kernel_ns, row.helper.kernel_ns);
        let _ = writeln!(
            md,
            "| tc {} | {a:.0} | {b:.0} | {:.2}x | {:.2}x | {:.2}x |",
            row.path,
            a / floor,
            b / floor,
            b / a
        );
    }
    let _ = writeln!(md, "\nXDP floor in these runs: {floor:.0} ns.");
    md
}

/// The profile table: the top symbols of each path.
fn profile_text(pp: &PerPacket) -> String {
    let mut md = String::new();
    let Some(last) = pp.counts.last() else {
        return md;
    };
    let _ = writeln!(
        md,
        "\n### Profile: where each path's time goes ({} Services)\n",
        last.services
    );
    if let Some(err) = &pp.profile_error {
        let _ = writeln!(md, "Not profiled: {err}.\n");
        return md;
    }
    let _ = writeln!(
        md,
        "`perf record -e cpu-clock -F 10000 -t <bench thread>` while that thread runs one \
         path with repeat = 100 000 for {:.1} s (this VM has no PMU, so `bpftool prog profile` \
         and hardware events cannot run; the software clock samples the kernel side of the \
         syscall, JITed BPF included: `bpf_jit_kallsyms` names each BPF function). New flows: \
         {} SYNs from distinct clients, one `BPF_PROG_TEST_RUN` call each, so the syscall's own \
         work (entry, copying the frame in and out, building the test context) is in those \
         samples too. Shares of the samples, symbols above 1%; `BPF <name>` is kproxy's code \
         (or the floor's), the rest are kernel helpers and the test-run loop.\n",
        PROFILE_TIME.as_secs_f64(),
        PROFILE_NEW_FLOWS
    );
    for p in &pp.profiles {
        let top: Vec<String> = p
            .symbols
            .iter()
            .take(10)
            .map(|(s, share)| format!("{s} {share:.1}%"))
            .collect();
        let _ = writeln!(
            md,
            "- **{} {}** ({} samples): {}",
            p.hook.program(),
            p.path,
            p.samples,
            top.join(", ")
        );
    }
    let _ = writeln!(md);
    md
}

/// What each path does, and what the profile says, for explaining a miss.
fn why_text(pp: &PerPacket) -> String {
    let floor = pp.counts.first().map_or(f64::NAN, |c| c.floor.kernel_ns);
    let share = |hook: Hook, path: &str, pred: &dyn Fn(&str) -> bool| -> f64 {
        pp.profiles
            .iter()
            .find(|p| p.hook == hook && p.path == path)
            .map_or(f64::NAN, |p| {
                // `+ 0.0`: an empty f64 sum is -0.0, which prints as "-0".
                p.symbols
                    .iter()
                    .filter(|(s, _)| pred(s))
                    .map(|(_, v)| v)
                    .sum::<f64>()
                    + 0.0
            })
    };
    let bpf = |s: &str| s.starts_with("BPF ");
    let maps = |s: &str| {
        s.contains("htab")
            || s.contains("lookup_nulls")
            || s.contains("jhash")
            || s.contains("memcmp")
            || s.contains("bpf_lru")
    };
    format!(
        "Per packet: against a floor of about {floor:.0} ns that is nearly all test-run loop \
         overhead (the empty program is two instructions), a ratio counts helper calls, \
         BPF-to-BPF calls and hash lookups, each of which costs a fair part of the whole floor \
         (on this machine every return goes through a return thunk: see the mitigations row \
         above). An established packet whose flow has a slot in its CPU's flow cache \
         (`FLOW_CACHE_V2`, the \"established\" columns) is translated after two array lookups \
         the verifier inlines, with no call at all. One without a slot (the \"conntrack\" \
         columns, measured with the cache off: a flow's first packet on a CPU after 100 ms, or \
         a flow whose slot another flow holds) takes the conntrack hash lookup, whose kernel \
         functions (`htab_map_hash`, jhash over the 16-byte key; `lookup_nulls_elem_raw`; \
         `memcmp`) each return through a return thunk, plus the cache probe and the refill (a \
         BPF-to-BPF call): {:.2}x the floor at XDP, {:.2}x at tc. The profile above splits \
         the established (cached) path's samples: kproxy's own BPF code {:.0}% at tc / {:.0}% \
         at XDP (header parsing with bounds checks, the cache probe, rewrite arithmetic), \
         hash-map work {:.0}% / {:.0}%, the rest the test-run loop; at tc a test run also \
         builds an skb (the tc floor column). The tc rewrite updates the L4 checksum in place \
         like XDP's: it reads the skb's checksum state (`skb->ip_summed`, through the \
         `bpf_cast_to_kern_ctx` kfunc, which the verifier turns into a register move) and \
         updates the whole checksum of a CHECKSUM_NONE or CHECKSUM_UNNECESSARY skb (a test \
         run's) and only the pseudo-header sum of a pod's CHECKSUM_PARTIAL one; a \
         CHECKSUM_COMPLETE skb still takes `bpf_l4_csum_replace`, which keeps `skb->csum` in \
         step. New flows (one syscall per SYN): hash-map work is {:.0}% at tc / {:.0}% at XDP \
         of those samples, kproxy's code {:.0}% / {:.0}%, and most of the rest is the syscall \
         (entry, copying the frame, building the test context). The map work is the \
         conntrack miss and two LRU inserts, each walking a bucket and taking an LRU element \
         that are cold in the cache (`lookup_nulls_elem_raw`, `htab_lru_map_update_elem`, \
         `bpf_lru_pop_free`). Diagnostic builds (not kept; `--quick` runs side by side with \
         the build as it is, repeat-1 floor 120 ns): skipping both inserts for the new-flow \
         Service only, a new flow took 561 ns at tc and 511 at XDP (4.7x and 4.3x the floor) \
         where the build as it is took 992 and 951 in the run after it (8.3x and 7.9x; other \
         runs of the same build gave up to 1042 and 1001). The two inserts are about 435 ns, \
         half of a new flow's cost over the floor, and without them the 6x new-flow \
         target would hold. Skipping only the reply entry's insert, which is the most a \
         design with one entry per flow could save, a new flow took 8.0-8.4x the floor at tc \
         and 7.4-7.8x at XDP where the build as it is took 8.9-10.6x and 8.4-10.1x (four \
         `--quick` runs interleaved, in an hour when this VM was slow: repeat-1 floor \
         120-160 ns): one insert is about 1.5x the floor, so such a design would still miss \
         6x. The rest is the conntrack miss, the frontend, slot, backend and \
         open-flow-count hash lookups (each with its calls and return thunks) and the calls \
         into the new-flow functions. A conntrack map that is a plain preallocated hash map \
         instead of the LRU hash took 1001-1012 ns at tc and 962-972 at XDP, no less: what an \
         insert pays is not the LRU's bookkeeping but the table's memory, a bucket and an \
         element seldom in the cache among 262144 entries (two per flow). A per-CPU LRU \
         (`BPF_F_NO_COMMON_LRU`) for conntrack makes the median new flow slower, not faster \
         (see the spread of the new flows above). Keeping the open-flow counts of the least-connection schedulers in an array the \
         verifier inlines instead of a hash map changed nothing the bench resolves (tc new \
         flow 992 ns with the array, 982-1002 without, in runs that drift by 3%) and was not \
         kept. Both entries are \
         needed: the reply entry is what reverse-NATs the backend's answers, and the conntrack \
         map is an LRU hash by \
         design (a full plain hash map would refuse new flows instead of evicting idle ones).\n\n\
         What got this far (profile-driven fixes, each checked with the packet fixtures and \
         the lab tests): the eBPF object called a byte-at-a-time `memset` to build every \
         IPv4-mapped conntrack key and to zero the parsed-header struct, and a byte-at-a-time \
         `bcmp` to compare addresses (LLVM emits calls for them in BPF); those are now word \
         stores and compares. The clock is jiffies (`bpf_jiffies64`, which the verifier \
         inlines into one load) scaled to CLOCK_MONOTONIC by a tick and an offset measured at \
         load, instead of a `bpf_ktime_get_coarse_ns` call per packet (with its return, about \
         a tenth of the established path). The XDP rewrite writes the \
         frame directly instead of through `bpf_xdp_load_bytes` / `bpf_xdp_store_bytes`, folds \
         the L4 checksum once for address and port, and \
         the tc rewrite keeps only `bpf_l4_csum_replace` (5 helper calls per rewrite down to \
         2). A client's packet of a tracked flow takes one conntrack lookup instead of two \
         (`CONNTRACK_V3`: the direction moved into the value), which also takes one miss off \
         every non-service packet; IPv4 flows have their own map with a 16-byte key \
         (`CONNTRACK4_V1`: jhash and the key compare over 16 bytes instead of 40); and a \
         packet to an address no frontend has passes after one address-marker lookup \
         (`CONFIG_FLAG_ADDRESS_MARKERS`), done in the entry point before any call, and since \
         the address filter (`CONFIG_FLAG_ADDRESS_FILTER`, one bit per frontend address in an \
         array the verifier inlines) after one load, most of the time without any hash \
         lookup: non-service from about 86 to 67 ns at tc and 79 to 58 ns at XDP in `--quick` \
         runs side by side, and no longer dependent on the services map's fill. A new flow's \
         frontend is now looked up in the entry point in place of the address marker, which \
         is asked only when that lookup misses: one hash lookup less per new flow, about 3% \
         (tc 1031-1062 ns before, 1002-1042 after; XDP 992-1021 before, 952-1001 after; two \
         `--quick` runs of each of the build before it and two builds with the change, \
         interleaved: as much as a quick run drifts from the next), at the price of a frontend miss before the marker miss for a \
         packet that is no Service's but shares its address-filter bit with a frontend's. A \
         UDP flow \
         re-checks that its backend is still programmed once per backend epoch instead of for \
         every datagram (before, each datagram paid a second hash lookup: 96 against 65 ns at \
         XDP in a `--quick` run). The flow cache took the conntrack lookup off most \
         established packets (XDP from about 3.2x to about 2x the floor, tc from about 5.5x \
         to about 4.4x, in `--quick` runs side by side with the build before it). Measuring \
         the source-NATed path (the columns of that name, one call per packet) showed XDP and \
         tc evicting each other's cached route for the same flow (the route cache slot left \
         out whether the neighbour is resolved, the one part of the question in which the two \
         hooks differ), so every such packet paid a FIB lookup at both hooks: about 420 to 150 \
         ns at XDP and 620 to 400 ns at tc external once each keeps its own slot; at tc a \
         source-NATed packet's rewrite now makes two `bpf_l4_csum_replace` calls instead of \
         four and lowers the TTL in place instead of with two helpers (400 to 230 ns; \
         `--quick` runs of the builds side by side). Reading the skb's checksum state took \
         the last two `bpf_l4_csum_replace` calls off the tc rewrite, and with them the \
         reload of every packet pointer after a helper that may move the data: tc \
         established from 117 to 62 ns (4.5x to 2.5x a floor of 26 ns), tc established \
         without a cache slot from 162 to 111 ns (`--quick` runs side by side). Header \
         fields are read and written with one load or store each: LLVM's BPF backend split \
         every unaligned read into byte loads, shifts and spills (the parser went from about \
         240 instructions to 60), addresses travel as one 32-bit word instead of four bytes, \
         and checksums are updated in network byte order with no swaps. The parser, the \
         conntrack lookup and the common rewrite are inlined into the entry points: a \
         BPF-to-BPF call and its return cost more than their work (only new flows, routed \
         packets and rare paths still call out, to keep each call chain's stack within 512 \
         bytes). Before these, the established path cost 12x the floor at tc; the XDP program \
         was first measured at 13x. What is left is mostly structural: at tc the skb the test \
         run builds, for new flows the cold cache lines of two \
         inserts, and for a packet without a cache slot the conntrack hash lookup (the data \
         structure every kube-proxy replacement uses for conntrack). The floor itself \
         is the test-run loop calling an empty program; the established path's own work (its \
         cost less the floor) is now {:.1}x that floor at XDP. `kproxy_tc_external` is the \
         external hook's code at tc: the same parse, lookup and rewrite as `kproxy_tc_pod` \
         (external scope in the frontend lookup), so its figures and their reasons are \
         tc's.\n",
        pp.counts
            .iter()
            .map(|c| c.ratio(Hook::Xdp, CONNTRACK_PATHS[0].0, false))
            .fold(f64::NAN, f64::max),
        pp.counts
            .iter()
            .map(|c| c.ratio(Hook::Tc, CONNTRACK_PATHS[0].0, false))
            .fold(f64::NAN, f64::max),
        share(Hook::Tc, "established", &bpf),
        share(Hook::Xdp, "established", &bpf),
        share(Hook::Tc, "established", &maps),
        share(Hook::Xdp, "established", &maps),
        share(Hook::Tc, "new flow", &maps),
        share(Hook::Xdp, "new flow", &maps),
        share(Hook::Tc, "new flow", &bpf),
        share(Hook::Xdp, "new flow", &bpf),
        pp.counts
            .first()
            .map_or(f64::NAN, |c| c.ratio(Hook::Xdp, "established", false) - 1.0),
    )
}
