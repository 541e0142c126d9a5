//! Table-driven packet fixtures for the tc pod program (`kproxy_tc_pod`)
//! and the XDP program of the external interfaces (`kproxy_xdp_external`),
//! run through BPF_PROG_TEST_RUN (DESIGN.md section 5).
//!
//! The XDP fixtures (section 8) run inside a network namespace of their
//! own (a veth pair, routes and permanent neighbour entries), entered by
//! the thread that issues the test runs: the program's FIB lookups see that
//! namespace, and its ingress interface is set through the `xdp_md` context.
//!
//! Every fixture is an input frame, the expected verdict and the expected
//! output. Expected outputs are built here and their checksums recomputed
//! from scratch (etherparse, plus an independent one's-complement sum); the
//! checksums the program wrote are never trusted.
//!
//! The tests need root and a kernel with BTF. Without them they fail with a
//! message saying so: they are never skipped silently.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::programs::{ProgramError, SchedClassifier};
use aya::{TestRun as _, TestRunOptions};
use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Header, Icmpv4Type, IpHeaders,
    IpNumber, Ipv4Extensions, Ipv4Header, NetHeaders, PacketBuilder, PacketHeaders, PayloadSlice,
    TcpHeader, TcpOptionElement, TransportHeader, UdpHeader,
};
use nix::mount::{umount2, MntFlags};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use proxy_common::{stat, SNAT_PORT_MAX, SNAT_PORT_MIN};
use proxy_userspace::datapath::{self, Datapath, MapSizes, PinnedMaps, SkbChecksum};
use proxy_userspace::model::{
    Backend, DesiredState, Frontend, FrontendKey, FrontendKind, Protocol, ServicePortName,
};
use proxy_userspace::sync::Syncer;

mod raw_bpf;

// tc verdicts (linux/pkt_cls.h).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const ETH_LEN: usize = 14;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// An IPv4 address and a port.
type Addr = ([u8; 4], u16);

// The lab (DESIGN.md section 5: 198.18.0.0/15 and 2001:db8::/32 only).
const CLIENT_IP: [u8; 4] = [198, 18, 1, 2];
/// TCP 80 -> one backend, UDP 53 -> one backend.
const VIP: [u8; 4] = [198, 19, 0, 10];
/// TCP 80 -> three backends.
const VIP_MULTI: [u8; 4] = [198, 19, 0, 11];
/// TCP 80 and UDP 53, both without endpoints.
const VIP_EMPTY: [u8; 4] = [198, 19, 0, 12];
/// TCP 80 -> the pod that also is a client (hairpin).
const VIP_HAIRPIN: [u8; 4] = [198, 19, 0, 13];
/// Programmed nowhere.
const UNKNOWN_VIP: [u8; 4] = [198, 19, 0, 99];
/// An ordinary pod address.
const NOT_A_VIP: [u8; 4] = [198, 18, 3, 3];
const WEB_BACKEND: Addr = ([198, 18, 2, 2], 8080);
/// Behind VIP:8443, on the same port number (no port rewrite).
const SAME_PORT_BACKEND: Addr = ([198, 18, 2, 2], 8443);
const HAIRPIN_POD: Addr = ([198, 18, 1, 3], 8080);
const DNS_BACKEND: Addr = ([198, 18, 2, 5], 5353);
const MULTI_BACKENDS: [Addr; 3] = [
    ([198, 18, 2, 10], 8080),
    ([198, 18, 2, 11], 8080),
    ([198, 18, 2, 12], 8080),
];
const CLIENT_IP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
];
const SERVER_IP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x01];

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

fn client(port: u16) -> Addr {
    (CLIENT_IP, port)
}

/// Adds a ClusterIP frontend `ip:port` with `backends` to `state`.
fn add_cluster_ip(
    state: &mut DesiredState,
    ip: [u8; 4],
    port: u16,
    protocol: Protocol,
    backends: &[Addr],
) {
    let mut backends: Vec<Backend> = backends
        .iter()
        .map(|&(ip, port)| Backend {
            ip: IpAddr::V4(Ipv4Addr::from(ip)),
            port,
            terminating: false,
            local: false,
        })
        .collect();
    backends.sort();
    let key = FrontendKey {
        ip: IpAddr::V4(Ipv4Addr::from(ip)),
        port,
        protocol,
    };
    let frontend = Frontend::new(
        ServicePortName {
            namespace: "fixtures".to_owned(),
            name: format!("svc-{}", ip[3]),
            port_name: format!("{}-{port}", protocol.as_str().to_lowercase()),
        },
        FrontendKind::ClusterIp,
        backends,
    );
    state.frontends.insert(key, frontend);
}

/// The Services every fixture lab is programmed with.
fn lab_services() -> DesiredState {
    let mut state = DesiredState::default();
    let mut add = |ip: [u8; 4], port: u16, protocol: Protocol, backends: &[Addr]| {
        add_cluster_ip(&mut state, ip, port, protocol, backends)
    };
    add(VIP, 80, Protocol::Tcp, &[WEB_BACKEND]);
    add(VIP, 53, Protocol::Udp, &[DNS_BACKEND]);
    add(VIP, 8443, Protocol::Tcp, &[SAME_PORT_BACKEND]);
    add(VIP_HAIRPIN, 80, Protocol::Tcp, &[HAIRPIN_POD]);
    add(VIP_MULTI, 80, Protocol::Tcp, &MULTI_BACKENDS);
    add(VIP_EMPTY, 80, Protocol::Tcp, &[]);
    add(VIP_EMPTY, 53, Protocol::Udp, &[]);
    state
}

/// Every frontend a reverse-NATed reply may come from.
const FRONTENDS: [Addr; 5] = [
    (VIP, 80),
    (VIP, 53),
    (VIP, 8443),
    (VIP_MULTI, 80),
    (VIP_HAIRPIN, 80),
];

fn all_backends() -> Vec<Addr> {
    let mut all = vec![WEB_BACKEND, DNS_BACKEND, SAME_PORT_BACKEND, HAIRPIN_POD];
    all.extend(MULTI_BACKENDS);
    all
}

// ---------------------------------------------------------------------------
// The lab: a loaded datapath under a private pin dir, removed even on panic.
// ---------------------------------------------------------------------------

fn require_root_and_btf() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the packet fixtures need root (loading eBPF, BPF_PROG_TEST_RUN, mounting bpffs) and \
         are never skipped: run them as root, e.g. `sudo -E cargo test -p proxy-userspace \
         --test packet_fixtures` or `cargo xtask test`"
    );
    assert!(
        Path::new(BTF_PATH).exists(),
        "the packet fixtures need a kernel with BTF ({BTF_PATH} is missing; \
         CONFIG_DEBUG_INFO_BTF=y) and are never skipped"
    );
}

static NEXT_PIN_DIR: AtomicU32 = AtomicU32::new(0);

/// A pin dir of our own. Dropping it removes the pins, unmounts the bpffs
/// `Datapath::load` mounted there and removes the directory.
struct PinDir {
    path: PathBuf,
}

impl PinDir {
    fn new() -> Self {
        let n = NEXT_PIN_DIR.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/run/kproxy-fixtures-{}-{n}", std::process::id()));
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Best effort and never a panic (this also runs while unwinding);
        // each step may find nothing left to do.
        let _ = datapath::cleanup(&self.path);
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

struct Lab {
    // Declared first so it is dropped first: program and map fds close
    // before the pins are removed.
    datapath: Datapath,
    _pins: PinDir,
}

impl Lab {
    /// Loads a fresh datapath (empty conntrack) programmed with
    /// [`lab_services`].
    fn new() -> Self {
        Self::with_services(&lab_services())
    }

    /// Loads a fresh datapath (empty conntrack) programmed with `services`.
    fn with_services(services: &DesiredState) -> Self {
        Self::with_checksum(services, SkbChecksum::Read)
    }

    /// The same, its tc programs updating checksums as `skb_checksum` says.
    fn with_checksum(services: &DesiredState, skb_checksum: SkbChecksum) -> Self {
        require_root_and_btf();
        let pins = PinDir::new();
        let mut datapath = Datapath::load_with(&pins.path, MapSizes::default(), skb_checksum)
            .unwrap_or_else(|e| panic!("loading the datapath at {}: {e}", pins.path.display()));
        let flags;
        {
            let mut maps = datapath
                .maps()
                .unwrap_or_else(|e| panic!("opening the datapath maps: {e}"));
            let mut syncer = Syncer::new();
            let report = syncer.apply(&mut maps, services);
            assert!(
                report.failed.is_empty()
                    && report.failed_deletes.is_empty()
                    && report.failed_writes.is_empty(),
                "programming the lab Services failed: {:?} {:?} {:?}",
                report.failed,
                report.failed_deletes,
                report.failed_writes
            );
            flags = syncer.datapath_flags();
        }
        // As the daemon does after a clean sync: every fixture runs the
        // datapath that trusts the address filter and a missing marker.
        assert_eq!(
            flags,
            proxy_common::CONFIG_FLAG_ADDRESS_MARKERS | proxy_common::CONFIG_FLAG_ADDRESS_FILTER,
            "a clean sync completes the markers and the address filter"
        );
        set_datapath_flags(&mut datapath, flags);
        Self {
            datapath,
            _pins: pins,
        }
    }

    fn program(&mut self) -> &SchedClassifier {
        self.datapath.pod_program()
    }

    fn delete_service_entry(&mut self, key: &proxy_common::ServiceKey) {
        use proxy_userspace::sync::MapWriter as _;
        let mut maps = self.datapath.maps().expect("the datapath maps");
        maps.delete_service(key)
            .expect("deleting a services-map entry");
    }

    fn run(&mut self, frame: &[u8]) -> Outcome {
        run_program(self.program(), frame)
    }
}

#[derive(Debug)]
struct Outcome {
    verdict: u32,
    frame: Vec<u8>,
}

/// What a test run did with a frame.
#[derive(Debug)]
enum Run {
    Ran(Outcome),
    /// The kernel refused the input before running the program: current
    /// kernels (bpf_prog_test_run_skb, also in stable releases) want an
    /// IPv4 frame to hold a full 20-byte IP header (IPv6: 40 bytes), or
    /// fail with EINVAL.
    Refused,
}

/// Whether the kernel refuses this frame as test-run input (see [`Run`]).
/// The datapath config with these `CONFIG_FLAG_*` bits.
fn set_datapath_flags(datapath: &mut Datapath, flags: u64) {
    let config = proxy_common::DatapathConfig {
        flags,
        ..Default::default()
    };
    datapath
        .write_config(&config)
        .unwrap_or_else(|e| panic!("writing the datapath config: {e}"));
}

fn kernel_refuses(frame: &[u8]) -> bool {
    match frame[12..14] {
        [0x08, 0x00] => frame.len() < ETH_LEN + 20,
        [0x86, 0xdd] => frame.len() < ETH_LEN + 40,
        _ => false,
    }
}

fn try_run(program: &SchedClassifier, frame: &[u8]) -> Run {
    // Test runs also refuse a frame that is only an Ethernet header.
    assert!(
        frame.len() > ETH_LEN,
        "BPF_PROG_TEST_RUN needs more than an Ethernet header"
    );
    // Room for the largest growth the program makes (a reject adds 28 bytes).
    let mut out = vec![0u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    });
    match result {
        Ok(result) => {
            out.truncate(result.data_size_out as usize);
            Run::Ran(Outcome {
                verdict: result.return_value,
                frame: out,
            })
        }
        Err(ProgramError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EINVAL) && kernel_refuses(frame) =>
        {
            Run::Refused
        }
        Err(e) => panic!(
            "BPF_PROG_TEST_RUN on a {}-byte frame: {e} ({e:?})",
            frame.len()
        ),
    }
}

fn run_program(program: &SchedClassifier, frame: &[u8]) -> Outcome {
    match try_run(program, frame) {
        Run::Ran(outcome) => outcome,
        Run::Refused => panic!(
            "the kernel refuses a {}-byte frame as test-run input",
            frame.len()
        ),
    }
}

// ---------------------------------------------------------------------------
// Packet builders (etherparse computes the input checksums).
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Tcp {
    Syn,
    SynAck,
    Ack,
    Rst,
}

fn ipv4_header(src: [u8; 4], dst: [u8; 4], options: &[u8]) -> Ipv4Header {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, src, dst).expect("a valid IPv4 header");
    ip.identification = 0x1234;
    ip.options = options
        .try_into()
        .expect("IPv4 options are a multiple of 4 bytes, at most 40");
    ip
}

fn tcp_header(sport: u16, dport: u16, kind: Tcp) -> TcpHeader {
    let mut tcp = TcpHeader::new(sport, dport, 0x1000_0000, 64240);
    let mss = [
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ];
    match kind {
        Tcp::Syn => {
            tcp.syn = true;
            tcp.set_options(&mss).expect("TCP options fit");
        }
        Tcp::SynAck => {
            tcp.syn = true;
            tcp.ack = true;
            tcp.acknowledgment_number = 0x1000_0001;
            tcp.set_options(&mss).expect("TCP options fit");
        }
        Tcp::Ack => {
            tcp.ack = true;
            tcp.psh = true;
            tcp.acknowledgment_number = 0x2000_0001;
        }
        Tcp::Rst => {
            tcp.rst = true;
            tcp.ack = true;
            tcp.acknowledgment_number = 0x2000_0001;
        }
    }
    tcp
}

fn tcp_with_options(src: Addr, dst: Addr, ip_options: &[u8], kind: Tcp, payload: &[u8]) -> Vec<u8> {
    let ip = ipv4_header(src.0, dst.0, ip_options);
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()))
        .tcp_header(tcp_header(src.1, dst.1, kind));
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("building a TCP frame");
    frame
}

fn tcp(src: Addr, dst: Addr, kind: Tcp, payload: &[u8]) -> Vec<u8> {
    tcp_with_options(src, dst, &[], kind, payload)
}

fn udp_with_options(src: Addr, dst: Addr, ip_options: &[u8], payload: &[u8]) -> Vec<u8> {
    let ip = ipv4_header(src.0, dst.0, ip_options);
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()))
        .udp(src.1, dst.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("building a UDP frame");
    frame
}

fn udp(src: Addr, dst: Addr, payload: &[u8]) -> Vec<u8> {
    udp_with_options(src, dst, &[], payload)
}

fn icmp_echo(dst: [u8; 4]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(CLIENT_IP, dst, 64)
        .icmpv4_echo_request(0x4242, 1);
    let payload = b"kproxy ping";
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("building an ICMP frame");
    frame
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CLIENT_MAC,
        &CLIENT_IP,
        &[0; 6],
        &target,
    )
    .expect("a valid ARP request");
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6]).arp(arp);
    let mut frame = Vec::with_capacity(builder.size());
    builder.write(&mut frame).expect("building an ARP frame");
    frame
}

fn ipv6_udp(dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(CLIENT_IP6, SERVER_IP6, 64)
        .udp(40000, dport);
    let payload = b"an IPv6 datagram";
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("building an IPv6 frame");
    frame
}

fn ipv6_tcp_syn(dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(CLIENT_IP6, SERVER_IP6, 64)
        .tcp_header(tcp_header(40000, dport, Tcp::Syn));
    let mut frame = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut frame, &[])
        .expect("building an IPv6 frame");
    frame
}

// IPv4 options: NOP (1), EOL (0), Router Alert (148, length 4).
const OPTIONS_IHL6: [u8; 4] = [1, 1, 1, 0];
fn options_ihl15() -> Vec<u8> {
    let mut options = vec![148, 4, 0, 0];
    options.extend([1; 35]);
    options.push(0);
    options
}

// Byte surgery on fixtures.

fn set_u16(frame: &mut [u8], offset: usize, value: u16) {
    frame[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
}

fn ip_total_len(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[ETH_LEN + 2], frame[ETH_LEN + 3]])
}

/// Rewrites the IPv4 header checksum over IHL*4 bytes (at least 20) so a
/// malformed fixture is malformed in one respect only.
fn fix_ip_checksum(frame: &mut [u8]) {
    let ihl = (((frame[ETH_LEN] & 0x0f) as usize) * 4).max(20);
    let end = (ETH_LEN + ihl).min(frame.len());
    set_u16(frame, ETH_LEN + 10, 0);
    let sum = ones_sum(&[&frame[ETH_LEN..end]]);
    set_u16(frame, ETH_LEN + 10, !sum);
}

// ---------------------------------------------------------------------------
// Checking: an independent view of the headers and checksums.
// ---------------------------------------------------------------------------

/// Folded one's-complement sum of big-endian 16-bit words (not inverted).
/// Only the last part may have an odd length.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        for word in part.chunks(2) {
            sum += match *word {
                [hi, lo] => u64::from(u16::from_be_bytes([hi, lo])),
                [hi] => u64::from(hi) << 8,
                _ => unreachable!(),
            };
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// 0x0000 and 0xffff are the same number in one's complement.
fn same_ones(a: u16, b: u16) -> bool {
    let norm = |x: u16| if x == 0xffff { 0 } else { x };
    norm(a) == norm(b)
}

/// The IPv4 packet in a frame, parsed as strictly as the datapath must.
#[derive(Clone, Copy, Debug)]
struct Ipv4View {
    ihl: usize,
    total: usize,
    proto: u8,
    frag_offset: u16,
    l4: usize,
}

impl Ipv4View {
    fn parse(frame: &[u8]) -> Option<Self> {
        if frame.len() < ETH_LEN + 20 || frame[12..14] != [0x08, 0x00] {
            return None;
        }
        let ip = &frame[ETH_LEN..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || ETH_LEN + total > frame.len() {
            return None;
        }
        Some(Self {
            ihl,
            total,
            proto: ip[9],
            frag_offset: u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff,
            l4: ETH_LEN + ihl,
        })
    }

    fn header<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[ETH_LEN..self.l4]
    }

    fn src(&self, frame: &[u8]) -> [u8; 4] {
        frame[ETH_LEN + 12..ETH_LEN + 16].try_into().unwrap()
    }

    fn dst(&self, frame: &[u8]) -> [u8; 4] {
        frame[ETH_LEN + 16..ETH_LEN + 20].try_into().unwrap()
    }

    /// The L4 bytes the IP header accounts for.
    fn segment<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[self.l4..ETH_LEN + self.total]
    }

    fn ports(&self, frame: &[u8]) -> (u16, u16) {
        let l4 = self.l4;
        (
            u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
            u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
        )
    }

    fn l4_check_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    /// The bytes the L4 checksum covers, when the TCP/UDP header is
    /// complete: the whole TCP segment, or the UDP datagram by its length.
    fn l4_covered<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        if self.frag_offset != 0 {
            return None;
        }
        let segment = self.segment(frame);
        match self.proto {
            PROTO_TCP if segment.len() >= 20 && segment[12] >> 4 >= 5 => Some(segment),
            PROTO_UDP if segment.len() >= 8 => {
                let len = usize::from(u16::from_be_bytes([segment[4], segment[5]]));
                (8..=segment.len()).contains(&len).then(|| &segment[..len])
            }
            _ => None,
        }
    }

    /// One's-complement sum over the pseudo header and the covered L4
    /// bytes: 0xffff when the L4 checksum is right.
    fn l4_residual(&self, frame: &[u8]) -> Option<u16> {
        let covered = self.l4_covered(frame)?;
        let len = u16::try_from(covered.len()).ok()?;
        Some(ones_sum(&[
            &self.src(frame),
            &self.dst(frame),
            &[0, self.proto],
            &len.to_be_bytes(),
            covered,
        ]))
    }

    fn udp_checksum(&self, frame: &[u8]) -> u16 {
        u16::from_be_bytes([frame[self.l4 + 6], frame[self.l4 + 7]])
    }
}

fn addr(ip: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(ip)
}

/// Our own check of the IPv4 header checksum: the header's words sum to
/// 0xffff. Byte-faithful, so it also holds for headers with odd bits set.
fn ipv4_sum_ok(frame: &[u8]) -> Result<(), String> {
    let view = Ipv4View::parse(frame).ok_or("not a well-formed IPv4 frame")?;
    let sum = ones_sum(&[view.header(frame)]);
    if sum != 0xffff {
        return Err(format!(
            "IPv4 header checksum wrong (header sums to {sum:#06x}, not 0xffff)"
        ));
    }
    Ok(())
}

/// Checks the IPv4 header checksum twice: our own sum, and etherparse's
/// recomputation from the parsed fields (which drops reserved bits, so only
/// for well-formed fixtures).
fn verify_ipv4_checksum(frame: &[u8]) -> Result<(), String> {
    ipv4_sum_ok(frame)?;
    let (ip, _) = Ipv4Header::from_slice(&frame[ETH_LEN..])
        .map_err(|e| format!("etherparse rejects the IPv4 header: {e}"))?;
    let recomputed = ip.calc_header_checksum();
    if ip.header_checksum != recomputed {
        return Err(format!(
            "IPv4 header checksum {:#06x}, recomputed {recomputed:#06x}",
            ip.header_checksum
        ));
    }
    Ok(())
}

/// Our own check of the TCP/UDP checksum over the pseudo header and the
/// covered bytes. A UDP checksum of 0 means "none".
fn l4_sum_ok(frame: &[u8]) -> Result<(), String> {
    let view = Ipv4View::parse(frame).ok_or("not a well-formed IPv4 frame")?;
    let residual = view
        .l4_residual(frame)
        .ok_or("no complete TCP/UDP header")?;
    if view.proto == PROTO_UDP && view.udp_checksum(frame) == 0 {
        return Ok(());
    }
    if residual != 0xffff {
        return Err(format!(
            "L4 checksum wrong (pseudo header + segment sum to {residual:#06x}, not 0xffff)"
        ));
    }
    Ok(())
}

/// Checks the TCP or UDP checksum twice: our own sum, and etherparse's
/// recomputation (well-formed fixtures only, as for IPv4).
fn verify_l4_checksum(frame: &[u8]) -> Result<(), String> {
    l4_sum_ok(frame)?;
    let view = Ipv4View::parse(frame).ok_or("not a well-formed IPv4 frame")?;
    if view.proto == PROTO_UDP && view.udp_checksum(frame) == 0 {
        return Ok(());
    }
    let (ip, _) = Ipv4Header::from_slice(&frame[ETH_LEN..])
        .map_err(|e| format!("etherparse rejects the IPv4 header: {e}"))?;
    let segment = view.segment(frame);
    let (stored, recomputed) = match view.proto {
        PROTO_TCP => {
            let (tcp, payload) = TcpHeader::from_slice(segment)
                .map_err(|e| format!("etherparse rejects the TCP header: {e}"))?;
            let recomputed = tcp
                .calc_checksum_ipv4(&ip, payload)
                .map_err(|e| e.to_string())?;
            (tcp.checksum, recomputed)
        }
        _ => {
            let (udp, rest) = UdpHeader::from_slice(segment)
                .map_err(|e| format!("etherparse rejects the UDP header: {e}"))?;
            let payload = &rest[..usize::from(udp.length) - UdpHeader::LEN];
            let recomputed = udp
                .calc_checksum_ipv4(&ip, payload)
                .map_err(|e| e.to_string())?;
            (udp.checksum, recomputed)
        }
    };
    if stored != recomputed {
        return Err(format!(
            "L4 checksum {stored:#06x}, recomputed {recomputed:#06x}"
        ));
    }
    Ok(())
}

/// Recomputes both checksums of an IPv4 TCP/UDP frame from scratch with
/// etherparse (a zero UDP checksum stays "none").
fn recompute_checksums(frame: &mut [u8]) {
    let view = Ipv4View::parse(frame).expect("an IPv4 fixture");
    let (ip, _) = Ipv4Header::from_slice(&frame[ETH_LEN..]).expect("an IPv4 fixture");
    set_u16(frame, ETH_LEN + 10, ip.calc_header_checksum());
    let end = ETH_LEN + view.total;
    let checksum = match view.proto {
        PROTO_TCP => {
            let (tcp, payload) = TcpHeader::from_slice(&frame[view.l4..end]).expect("TCP");
            Some(tcp.calc_checksum_ipv4(&ip, payload).expect("TCP fits"))
        }
        PROTO_UDP => {
            let (udp, rest) = UdpHeader::from_slice(&frame[view.l4..end]).expect("UDP");
            let payload = &rest[..usize::from(udp.length) - UdpHeader::LEN];
            (udp.checksum != 0).then(|| udp.calc_checksum_ipv4(&ip, payload).expect("UDP fits"))
        }
        other => panic!("no L4 checksum for protocol {other}"),
    };
    if let Some(checksum) = checksum {
        set_u16(frame, view.l4_check_off(), checksum);
    }
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Source,
    Destination,
}

/// What a correct NAT makes of `frame`: one side's address and port
/// replaced, everything else (MACs, other side, IP fields, options,
/// payload, padding) unchanged, checksums recomputed from scratch.
fn translated(frame: &[u8], side: Side, to: Addr) -> Vec<u8> {
    let view = Ipv4View::parse(frame).expect("an IPv4 fixture");
    let mut out = frame.to_vec();
    let (addr_off, port_off) = match side {
        Side::Source => (ETH_LEN + 12, view.l4),
        Side::Destination => (ETH_LEN + 16, view.l4 + 2),
    };
    out[addr_off..addr_off + 4].copy_from_slice(&to.0);
    set_u16(&mut out, port_off, to.1);
    recompute_checksums(&mut out);
    out
}

/// A hex dump of the first 128 bytes (where every header lives).
fn hex(bytes: &[u8]) -> String {
    let mut rows: Vec<String> = bytes
        .chunks(16)
        .take(8)
        .enumerate()
        .map(|(row, chunk)| {
            let words: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            format!("    {:04x}: {}", row * 16, words.join(" "))
        })
        .collect();
    if bytes.len() > 128 {
        rows.push(format!("    ... ({} bytes in all)", bytes.len()));
    }
    rows.join("\n")
}

fn diff(expected: &[u8], actual: &[u8]) -> String {
    let offsets: Vec<String> = (0..expected.len().max(actual.len()))
        .filter(|&i| expected.get(i) != actual.get(i))
        .take(16)
        .map(|i| {
            let show = |b: Option<&u8>| b.map_or("--".to_owned(), |b| format!("{b:02x}"));
            format!("@{i}: {} -> {}", show(expected.get(i)), show(actual.get(i)))
        })
        .collect();
    format!(
        "expected {} bytes, got {}; first differences: {}\n  expected:\n{}\n  got:\n{}",
        expected.len(),
        actual.len(),
        offsets.join(", "),
        hex(expected),
        hex(actual)
    )
}

/// A reject must be a well-formed ICMP port unreachable back to the sender
/// that quotes the offending datagram.
fn check_reject(original: &[u8], out: &[u8]) -> Result<(), String> {
    let orig = Ipv4View::parse(original).ok_or("the rejected input is not IPv4")?;
    let orig_l4_header = match orig.proto {
        PROTO_TCP => usize::from(original[orig.l4 + 12] >> 4) * 4,
        PROTO_UDP => 8,
        other => return Err(format!("rejected a packet of protocol {other}")),
    };
    if out.len() < ETH_LEN + 20 + 8 + 20 + 8 {
        return Err(format!("reject too short: {} bytes", out.len()));
    }
    if out[0..6] != original[6..12] || out[6..12] != original[0..6] {
        return Err(format!(
            "Ethernet addresses not swapped: dst {:02x?} src {:02x?}",
            &out[0..6],
            &out[6..12]
        ));
    }
    let view = Ipv4View::parse(out)
        .ok_or_else(|| format!("reject is not a well-formed IPv4 frame:\n{}", hex(out)))?;
    if view.total != out.len() - ETH_LEN {
        return Err(format!(
            "IPv4 total length {} but the frame carries {} bytes after Ethernet",
            view.total,
            out.len() - ETH_LEN
        ));
    }
    if view.proto != PROTO_ICMP {
        return Err(format!("reject has IP protocol {}", view.proto));
    }
    if view.src(out) != orig.dst(original) || view.dst(out) != orig.src(original) {
        return Err(format!(
            "reject goes {} -> {}, expected {} -> {}",
            addr(view.src(out)),
            addr(view.dst(out)),
            addr(orig.dst(original)),
            addr(orig.src(original))
        ));
    }
    let flags_fragment = u16::from_be_bytes([out[ETH_LEN + 6], out[ETH_LEN + 7]]);
    if flags_fragment & 0x3fff != 0 {
        return Err(format!("reject is a fragment ({flags_fragment:#06x})"));
    }
    if out[ETH_LEN + 8] == 0 {
        return Err("reject has TTL 0".to_owned());
    }
    verify_ipv4_checksum(out).map_err(|e| format!("reject: {e}"))?;

    let icmp = &out[view.l4..];
    if icmp[0] != 3 || icmp[1] != 3 {
        return Err(format!(
            "ICMP type {} code {}, expected 3/3 (port unreachable)",
            icmp[0], icmp[1]
        ));
    }
    if icmp[4..8] != [0; 4] {
        return Err(format!("ICMP unused field not zero: {:02x?}", &icmp[4..8]));
    }
    let sum = ones_sum(&[icmp]);
    if sum != 0xffff {
        return Err(format!(
            "ICMP checksum wrong (message sums to {sum:#06x}, not 0xffff)"
        ));
    }
    let (header, payload) =
        Icmpv4Header::from_slice(icmp).map_err(|e| format!("etherparse rejects ICMP: {e}"))?;
    if header.icmp_type != Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port) {
        return Err(format!("ICMP type {:?}", header.icmp_type));
    }
    let recomputed = header.icmp_type.calc_checksum(payload);
    if header.checksum != recomputed {
        return Err(format!(
            "ICMP checksum {:#06x}, recomputed {recomputed:#06x}",
            header.checksum
        ));
    }

    // The quote: the original IP header and the first bytes (at least 8) of
    // its L4 header, byte for byte.
    let quote = &icmp[8..];
    let orig_ip = &original[ETH_LEN..ETH_LEN + orig.total];
    let min = orig.ihl + 8;
    let max = (orig.ihl + orig_l4_header).clamp(min, orig.total);
    if !(min..=max).contains(&quote.len()) {
        return Err(format!(
            "quote of {} bytes, expected the IP header and {}..={} bytes of L4 header",
            quote.len(),
            min - orig.ihl,
            max - orig.ihl
        ));
    }
    if quote != &orig_ip[..quote.len()] {
        return Err(format!(
            "quote differs from the original datagram: {}",
            diff(&orig_ip[..quote.len()], quote)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Table-driven fixtures.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Verdict OK and the frame byte for byte as it came in.
    Untouched,
    /// Verdict OK, destination rewritten to this backend.
    Dnat(Addr),
    /// Verdict OK, source rewritten to this frontend.
    RevNat(Addr),
    /// Verdict REDIRECT and an ICMP port unreachable back to the sender.
    Reject,
    /// Untouched, or refused by the kernel as test-run input (see [`Run`]):
    /// the program cannot be shown such a frame on current kernels.
    UntouchedOrRefused,
    /// A reject the program cannot build (IP options) may be dropped
    /// instead; if it is sent, it must be well-formed.
    RejectOrDrop,
    /// Verdict SHOT (e.g. a TCP segment of no tracked flow).
    Drop,
}

struct Fixture {
    name: String,
    frame: Vec<u8>,
    expect: Expect,
}

fn fixture(name: impl Into<String>, frame: Vec<u8>, expect: Expect) -> Fixture {
    Fixture {
        name: name.into(),
        frame,
        expect,
    }
}

fn expect_verdict(out: &Outcome, verdict: u32) -> Result<(), String> {
    if out.verdict == verdict {
        Ok(())
    } else {
        Err(format!(
            "verdict {}, expected {verdict}; output:\n{}",
            out.verdict,
            hex(&out.frame)
        ))
    }
}

fn check(fixture: &Fixture, out: &Outcome) -> Result<(), String> {
    let translation = |side, to| -> Result<(), String> {
        expect_verdict(out, TC_ACT_OK)?;
        let expected = translated(&fixture.frame, side, to);
        if out.frame != expected {
            return Err(format!("wrong rewrite: {}", diff(&expected, &out.frame)));
        }
        // Equal to a frame with recomputed checksums; say it outright too.
        verify_ipv4_checksum(&out.frame)?;
        verify_l4_checksum(&out.frame)
    };
    match fixture.expect {
        Expect::Untouched | Expect::UntouchedOrRefused => {
            expect_verdict(out, TC_ACT_OK)?;
            if out.frame != fixture.frame {
                return Err(format!(
                    "a packet that must pass untouched was changed: {}",
                    diff(&fixture.frame, &out.frame)
                ));
            }
            Ok(())
        }
        Expect::Dnat(to) => translation(Side::Destination, to),
        Expect::RevNat(from) => translation(Side::Source, from),
        Expect::Reject => {
            expect_verdict(out, TC_ACT_REDIRECT)?;
            check_reject(&fixture.frame, &out.frame)
        }
        Expect::Drop => match out.verdict {
            TC_ACT_SHOT => Ok(()),
            other => Err(format!("verdict {other}, expected SHOT")),
        },
        Expect::RejectOrDrop => match out.verdict {
            TC_ACT_SHOT => Ok(()),
            TC_ACT_REDIRECT => check_reject(&fixture.frame, &out.frame),
            other => Err(format!("verdict {other}, expected SHOT or REDIRECT")),
        },
    }
}

/// Runs the fixtures in order (conntrack state carries over) and reports
/// every failure, not just the first.
fn run_fixtures(lab: &mut Lab, fixtures: &[Fixture]) {
    let failures: Vec<String> = fixtures
        .iter()
        .filter_map(|f| {
            let result = match try_run(lab.program(), &f.frame) {
                Run::Ran(out) => check(f, &out),
                Run::Refused if matches!(f.expect, Expect::UntouchedOrRefused) => Ok(()),
                Run::Refused => Err("the kernel refused the frame as test-run input".to_owned()),
            };
            result.err().map(|why| format!("- {}: {why}", f.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

/// Panics with the message as written (not Debug-escaped).
fn ok(result: Result<(), String>, what: &str) {
    if let Err(why) = result {
        panic!("{what}: {why}");
    }
}

fn destination(frame: &[u8]) -> Addr {
    let view = Ipv4View::parse(frame).expect("an IPv4 frame");
    (view.dst(frame), view.ports(frame).1)
}

// ---------------------------------------------------------------------------
// 1. DNAT of a new TCP connection.
// ---------------------------------------------------------------------------

#[test]
fn tcp_syn_to_a_vip_is_dnated_to_its_backend() {
    let mut lab = Lab::new();
    let syn = tcp(client(40000), (VIP, 80), Tcp::Syn, &[]);
    let out = lab.run(&syn);
    assert_eq!(out.verdict, TC_ACT_OK, "SYN to {}:80", addr(VIP));

    // Field by field first, for a readable failure.
    let headers = PacketHeaders::from_ethernet_slice(&out.frame).expect("output parses");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("output is not IPv4: {:?}", headers.net);
    };
    let Some(TransportHeader::Tcp(tcp_out)) = &headers.transport else {
        panic!("output is not TCP: {:?}", headers.transport);
    };
    assert_eq!(addr(ip.destination), addr(WEB_BACKEND.0), "DNAT address");
    assert_eq!(tcp_out.destination_port, WEB_BACKEND.1, "DNAT port");
    assert_eq!(addr(ip.source), addr(CLIENT_IP), "source address kept");
    assert_eq!(tcp_out.source_port, 40000, "source port kept");
    assert!(tcp_out.syn && !tcp_out.ack, "flags kept");
    assert_eq!(headers.payload, PayloadSlice::Tcp(&[]), "payload kept");
    ok(verify_ipv4_checksum(&out.frame), "IPv4 checksum after DNAT");
    ok(verify_l4_checksum(&out.frame), "TCP checksum after DNAT");

    // The flow is recorded both ways, and its entries hold the NAT and
    // nothing else: a flow that is not source-NATed has no other address.
    use proxy_common::{ipv4_mapped, ConntrackKey, CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_TCP};
    let entries = lab.datapath.conntrack_entries().expect("conntrack entries");
    let entry = |(saddr, sport): Addr, (daddr, dport): Addr| {
        let key = ConntrackKey::new(
            ipv4_mapped(saddr),
            ipv4_mapped(daddr),
            sport,
            dport,
            PROTO_TCP,
        );
        *entries
            .get(&key)
            .unwrap_or_else(|| panic!("no entry {key:?} in {entries:?}"))
    };
    let forward = entry(client(40000), (VIP, 80));
    let reply = entry(WEB_BACKEND, client(40000));
    assert_eq!(
        (forward.direction, forward.nat_addr, forward.nat_port),
        (CT_DIR_FORWARD, ipv4_mapped(WEB_BACKEND.0), WEB_BACKEND.1),
        "forward entry {forward:?}"
    );
    assert_eq!(
        (reply.direction, reply.nat_addr, reply.nat_port),
        (CT_DIR_REPLY, ipv4_mapped(VIP), 80),
        "reply entry {reply:?}"
    );
    for value in [forward, reply] {
        assert_eq!(
            (value.flags, value.other_addr, value.other_port),
            (0, [0; 16], 0),
            "{value:?}"
        );
    }

    // Then the whole frame, and a few more new connections.
    let same = fixture(
        "the same SYN, byte for byte",
        syn,
        Expect::Dnat(WEB_BACKEND),
    );
    ok(check(&same, &out), &same.name);
    run_fixtures(
        &mut lab,
        &[
            fixture(
                "SYN to a Service whose target port is its own port (no port rewrite)",
                tcp(client(40009), (VIP, 8443), Tcp::Syn, &[]),
                Expect::Dnat(SAME_PORT_BACKEND),
            ),
            fixture(
                "SYN carrying data",
                tcp(
                    client(40010),
                    (VIP, 80),
                    Tcp::Syn,
                    b"GET / HTTP/1.1\r\n\r\n",
                ),
                Expect::Dnat(WEB_BACKEND),
            ),
            fixture(
                "mid-stream ACK of an untracked flow: dropped, not sent to a random backend",
                tcp(client(40011), (VIP, 80), Tcp::Ack, &[0xa5; 333]),
                Expect::Drop,
            ),
        ],
    );

    // Three backends: checked against the one actually chosen.
    let syn = tcp(client(40012), (VIP_MULTI, 80), Tcp::Syn, &[]);
    let out = lab.run(&syn);
    let chosen = destination(&out.frame);
    assert!(
        MULTI_BACKENDS.contains(&chosen),
        "SYN to {}:80 went to {}:{}, not a backend",
        addr(VIP_MULTI),
        addr(chosen.0),
        chosen.1
    );
    let multi = fixture(
        "SYN to a VIP with three backends",
        syn,
        Expect::Dnat(chosen),
    );
    ok(check(&multi, &out), &multi.name);
}

// ---------------------------------------------------------------------------
// 2. Reverse NAT of replies; established flows keep their backend.
// ---------------------------------------------------------------------------

#[test]
fn replies_are_reverse_nated_and_flows_keep_their_backend() {
    let mut lab = Lab::new();
    let c = client(40000);
    run_fixtures(
        &mut lab,
        &[
            fixture(
                "SYN client -> VIP:80",
                tcp(c, (VIP, 80), Tcp::Syn, &[]),
                Expect::Dnat(WEB_BACKEND),
            ),
            fixture(
                "SYN-ACK backend -> client",
                tcp(WEB_BACKEND, c, Tcp::SynAck, &[]),
                Expect::RevNat((VIP, 80)),
            ),
            fixture(
                "ACK with data client -> VIP:80",
                tcp(
                    c,
                    (VIP, 80),
                    Tcp::Ack,
                    b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
                ),
                Expect::Dnat(WEB_BACKEND),
            ),
            fixture(
                "response backend -> client",
                tcp(WEB_BACKEND, c, Tcp::Ack, &[0x5a; 700]),
                Expect::RevNat((VIP, 80)),
            ),
            fixture(
                "retransmitted SYN keeps its backend",
                tcp(c, (VIP, 80), Tcp::Syn, &[]),
                Expect::Dnat(WEB_BACKEND),
            ),
            fixture(
                "SYN client -> VIP:8443 (same port behind)",
                tcp(client(40002), (VIP, 8443), Tcp::Syn, &[]),
                Expect::Dnat(SAME_PORT_BACKEND),
            ),
            fixture(
                "SYN-ACK same-port backend -> client",
                tcp(SAME_PORT_BACKEND, client(40002), Tcp::SynAck, &[]),
                Expect::RevNat((VIP, 8443)),
            ),
            fixture(
                "backend -> a client port it never heard from",
                tcp(WEB_BACKEND, client(40999), Tcp::SynAck, &[]),
                Expect::Untouched,
            ),
            fixture(
                "another port of the backend -> client",
                tcp((WEB_BACKEND.0, 8081), c, Tcp::Ack, b"x"),
                Expect::Untouched,
            ),
            fixture(
                "the client itself -> backend, not through the VIP",
                tcp(client(40001), WEB_BACKEND, Tcp::Syn, &[]),
                Expect::Untouched,
            ),
        ],
    );

    // With three backends, an established flow must stay where its SYN went.
    let c = client(42000);
    let out = lab.run(&tcp(c, (VIP_MULTI, 80), Tcp::Syn, &[]));
    assert_eq!(out.verdict, TC_ACT_OK);
    let chosen = destination(&out.frame);
    assert!(
        MULTI_BACKENDS.contains(&chosen),
        "SYN went to {}:{}",
        addr(chosen.0),
        chosen.1
    );
    let mut flow = vec![fixture(
        "reply from the chosen backend",
        tcp(chosen, c, Tcp::SynAck, &[]),
        Expect::RevNat((VIP_MULTI, 80)),
    )];
    for i in 0..50u8 {
        let payload = vec![i; 10 + usize::from(i) * 7];
        flow.push(fixture(
            format!("established packet {i} of the flow"),
            tcp(c, (VIP_MULTI, 80), Tcp::Ack, &payload),
            Expect::Dnat(chosen),
        ));
        flow.push(fixture(
            format!("reply {i} of the flow"),
            tcp(chosen, c, Tcp::Ack, &payload),
            Expect::RevNat((VIP_MULTI, 80)),
        ));
    }
    for i in 0..5 {
        flow.push(fixture(
            format!("retransmitted SYN {i}"),
            tcp(c, (VIP_MULTI, 80), Tcp::Syn, &[]),
            Expect::Dnat(chosen),
        ));
    }
    run_fixtures(&mut lab, &flow);

    // The stickiness above comes from conntrack, not from a choice that
    // never varies: new flows spread over the backends.
    let chosen: BTreeSet<Addr> = (0..60)
        .map(|i| {
            let out = lab.run(&tcp(client(43000 + i), (VIP_MULTI, 80), Tcp::Syn, &[]));
            assert_eq!(out.verdict, TC_ACT_OK);
            destination(&out.frame)
        })
        .collect();
    assert!(
        chosen.len() >= 2 && chosen.iter().all(|b| MULTI_BACKENDS.contains(b)),
        "60 new flows went to {chosen:?}, expected a spread over {MULTI_BACKENDS:?}"
    );
}

// ---------------------------------------------------------------------------
// 3. UDP.
// ---------------------------------------------------------------------------

/// A UDP datagram to VIP:53 whose checksum, once translated to
/// `DNS_BACKEND`, computes to 0 and so must be sent as 0xffff.
fn udp_translating_to_checksum_zero(src: Addr) -> Vec<u8> {
    let mut payload = vec![0u8; 16];
    payload[2..].copy_from_slice(b"zero-checksum!");
    let len = u16::try_from(8 + payload.len()).unwrap();
    let mut header = [0u8; 8];
    set_u16(&mut header, 0, src.1);
    set_u16(&mut header, 2, DNS_BACKEND.1);
    set_u16(&mut header, 4, len);
    let sum = ones_sum(&[
        &src.0,
        &DNS_BACKEND.0,
        &[0, PROTO_UDP],
        &len.to_be_bytes(),
        &header,
        &payload,
    ]);
    // sum + !sum == 0xffff: the translated datagram's checksum computes to 0.
    payload[0..2].copy_from_slice(&(!sum).to_be_bytes());
    udp(src, (VIP, 53), &payload)
}

fn with_udp_checksum(mut frame: Vec<u8>, checksum: u16) -> Vec<u8> {
    let view = Ipv4View::parse(&frame).expect("an IPv4 fixture");
    set_u16(&mut frame, view.l4 + 6, checksum);
    frame
}

/// One TCP and one UDP flow through `VIP`, both ways, as the tc program's
/// rewrites see them: a new flow, established packets (flow cache) and
/// replies (reverse NAT), and a datagram whose checksum becomes zero.
fn checksum_flows() -> Vec<(&'static str, Vec<u8>)> {
    let (t, u) = (client(41000), client(46000));
    vec![
        ("SYN", tcp(t, (VIP, 80), Tcp::Syn, &[])),
        ("SYN-ACK", tcp(WEB_BACKEND, t, Tcp::SynAck, &[])),
        (
            "ACK with data",
            tcp(t, (VIP, 80), Tcp::Ack, b"GET / HTTP/1.1\r\n\r\n"),
        ),
        ("response", tcp(WEB_BACKEND, t, Tcp::Ack, &[0x5a; 700])),
        ("ACK", tcp(t, (VIP, 80), Tcp::Ack, &[])),
        ("UDP query", udp(u, (VIP, 53), b"\x12\x34 query")),
        ("UDP answer", udp(DNS_BACKEND, u, b"\x12\x34 answer")),
        (
            "UDP whose checksum becomes zero",
            udp_translating_to_checksum_zero(client(46001)),
        ),
    ]
}

/// BPF_PROG_TEST_RUN flag (Linux 6.11): the skb is CHECKSUM_COMPLETE, with
/// `skb->csum` the sum of the packet, and the run fails with EBADMSG when
/// the program leaves `skb->csum` out of step with the packet it returns.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// Runs `frame` through the pod program as a CHECKSUM_COMPLETE skb.
fn run_complete(lab: &mut Lab, frame: &[u8]) -> std::io::Result<Outcome> {
    use std::os::fd::AsFd as _;
    let program = lab.program();
    let fd = program.fd().expect("the pod program is loaded");
    let mut out = vec![0u8; frame.len() + 256];
    let run = raw_bpf::test_run_with(
        fd.as_fd(),
        frame,
        &mut out,
        &raw_bpf::RunOptions {
            repeat: 1,
            flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
            ..Default::default()
        },
    )?;
    out.truncate(run.out_len);
    Ok(Outcome {
        verdict: run.retval,
        frame: out,
    })
}

/// The tc programs read the skb's checksum state and write the L4
/// checksum in place where they can (CHECKSUM_NONE here, what a test run's
/// skb is), and leave a CHECKSUM_COMPLETE skb to `bpf_l4_csum_replace`,
/// which keeps `skb->csum` in step. Every packet comes out exactly as a
/// datapath that always takes the helper makes it. (CHECKSUM_PARTIAL, a
/// local socket's packet, cannot be made by a test run: the lab test
/// `checksums_finished_in_software_are_right` covers it.)
#[test]
fn tc_rewrites_keep_checksums_right_in_place_and_through_the_helper() {
    let mut in_place = Lab::new();
    assert!(
        in_place.datapath.skb_checksum_state().is_some(),
        "this kernel has BTF and the bpf_cast_to_kern_ctx kfunc: the tc programs must read the skb's checksum state"
    );
    let mut helper = Lab::with_checksum(&lab_services(), SkbChecksum::Helpers);
    assert_eq!(helper.datapath.skb_checksum_state(), None);
    let (mut complete, mut complete_helper) = (
        Lab::new(),
        Lab::with_checksum(&lab_services(), SkbChecksum::Helpers),
    );
    let flows = checksum_flows();
    for (what, frame) in &flows {
        let (what, frame) = (*what, frame.clone());
        let out = in_place.run(&frame);
        assert_eq!(out.verdict, TC_ACT_OK, "{what}");
        assert_ne!(out.frame, frame, "{what} is rewritten");
        ok(verify_ipv4_checksum(&out.frame), what);
        ok(verify_l4_checksum(&out.frame), what);
        let by_helper = helper.run(&frame);
        assert_eq!(
            (by_helper.verdict, hex(&by_helper.frame)),
            (out.verdict, hex(&out.frame)),
            "{what}: in place and through the helper"
        );
        for (lab, how) in [
            (&mut complete, "read state"),
            (&mut complete_helper, "helper"),
        ] {
            let done = run_complete(lab, &frame).unwrap_or_else(|e| match e.raw_os_error() {
                Some(libc::EBADMSG) => {
                    panic!("{what} as a CHECKSUM_COMPLETE skb ({how}): skb->csum left stale")
                }
                Some(libc::EINVAL) => panic!(
                    "{what}: this kernel cannot test-run a CHECKSUM_COMPLETE skb (BPF_F_TEST_SKB_CHECKSUM_COMPLETE, Linux 6.11): {e}"
                ),
                _ => panic!("{what} as a CHECKSUM_COMPLETE skb ({how}): {e}"),
            });
            assert_eq!(
                (done.verdict, hex(&done.frame)),
                (out.verdict, hex(&out.frame)),
                "{what} as a CHECKSUM_COMPLETE skb ({how})"
            );
        }
    }
    // Which way each rewrite went (`csum_helper`): in place for every
    // CHECKSUM_NONE packet, through the helper for every CHECKSUM_COMPLETE
    // one and wherever the state is not read.
    let helper_calls = |lab: &Lab| {
        PinnedMaps::open(&lab._pins.path)
            .and_then(|maps| maps.stats())
            .expect("the datapath counters")[stat::CSUM_HELPER as usize]
    };
    let n = flows.len() as u64;
    assert_eq!(
        [&in_place, &helper, &complete, &complete_helper].map(helper_calls),
        [0, n, n, n],
        "rewrites through the helper: in place (none), helper only, CHECKSUM_COMPLETE (read state, helper only)"
    );
}

/// A UDP flow re-checks that its backend is still programmed once per
/// backend epoch, not for every datagram: a backend deleted behind the
/// datapath's back keeps its flows until a new epoch starts (userspace
/// starts one after every sync that deleted map entries, and deletes such
/// flows itself), and the next datagram then finds it gone.
#[test]
fn udp_flows_recheck_their_backend_once_per_backend_epoch() {
    use proxy_common::{ipv4_mapped, ConntrackKey, PROTO_UDP as UDP};
    let mut lab = Lab::new();
    let dgram = udp(client(40053), (VIP, 53), b"a query");
    let forwarded =
        |out: &Outcome| out.verdict == TC_ACT_OK && destination(&out.frame) == DNS_BACKEND;
    let out = lab.run(&dgram);
    assert!(
        forwarded(&out),
        "the first datagram goes to {DNS_BACKEND:?}"
    );
    let out = lab.run(&dgram);
    assert!(forwarded(&out), "and the second");

    let key = ConntrackKey::new(ipv4_mapped(CLIENT_IP), ipv4_mapped(VIP), 40053, 53, UDP);
    let entries = lab.datapath.conntrack_entries().expect("conntrack entries");
    let backend_id = entries
        .get(&key)
        .expect("the flow's forward entry")
        .backend_id;
    let map = lab._pins.path.join(proxy_common::BACKENDS_MAP);
    let id: Vec<String> = backend_id
        .to_ne_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut args = vec![
        "map",
        "delete",
        "pinned",
        map.to_str().expect("a UTF-8 path"),
        "key",
        "hex",
    ];
    args.extend(id.iter().map(String::as_str));
    bpftool(&args);

    // The datagram takes its conntrack entry, not the flow cache's copy.
    retire_flow_cache(&lab._pins.path);
    let out = lab.run(&dgram);
    assert!(
        forwarded(&out),
        "within the epoch the flow keeps its backend without a lookup: verdict {}",
        out.verdict
    );
    lab.datapath
        .new_backend_epoch()
        .expect("a new backend epoch");
    let out = lab.run(&dgram);
    assert_eq!(
        out.verdict, TC_ACT_SHOT,
        "in a new epoch the datagram finds its backend gone (and the Service's slot pointing at \
         the missing id: dropped)"
    );
}

/// A property-test runner with `cases` cases unless `PROPTEST_CASES` asks
/// for more (or fewer), and no failure files.
fn proptest_runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Keeps the calling thread on the CPU it runs on: a test run executes the
/// program on the caller's CPU, so every packet of the test meets the flow
/// cache slot its predecessor left (each CPU has its own).
fn stay_on_this_cpu() {
    use nix::sched::{sched_getcpu, sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(sched_getcpu().expect("the current CPU"))
        .expect("a CPU number in range");
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pinning the test thread");
}

/// Rewrites the conntrack entry of `key` behind the datapath's back:
/// `change` edits its value in place.
fn edit_conntrack_entry(
    pins: &Path,
    key: proxy_common::ConntrackKey4,
    change: impl FnOnce(&mut proxy_common::ConntrackValue),
) {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    let data =
        MapData::from_pin(pins.join(proxy_common::CONNTRACK_MAP)).expect("the conntrack map");
    let mut map: BpfHashMap<MapData, proxy_common::ConntrackKey4, proxy_common::ConntrackValue> =
        BpfHashMap::try_from(Map::LruHashMap(data)).expect("an LRU hash map");
    let mut value = map.get(&key, 0).expect("the flow's entry");
    change(&mut value);
    map.insert(key, value, 0).expect("rewriting the entry");
}

/// Retires every CPU's cached translations, as a new conntrack entry does
/// for its own tuple: bumps every generation in `FLOW_GEN_V1`.
fn retire_flow_cache(pins: &Path) {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(pins.join(proxy_common::FLOW_GEN_MAP)).expect("the generations");
    let mut generations: Array<MapData, u32> =
        Array::try_from(Map::Array(data)).expect("an array map");
    for i in 0..generations.len() {
        let g = generations.get(&i, 0).expect("a generation");
        generations
            .set(i, g.wrapping_add(1), 0)
            .expect("bumping a generation");
    }
}

/// SPEC 7: a flow idle past its timeout is gone. Its reply is dropped, not
/// reverse-NATed (un-NATing it would show the client the backend's
/// address); a client segment other than a SYN is invalid; a new SYN opens
/// a new flow, whose reply is translated again.
#[test]
fn a_reply_of_an_expired_flow_is_dropped_not_leaked() {
    use proxy_common::{ConntrackKey4, PROTO_TCP as TCP};
    let mut lab = Lab::new();
    let pins = lab.datapath.pin_dir().to_owned();
    let c = client(41_700);
    let reply = tcp(WEB_BACKEND, c, Tcp::Ack, b"answer");
    let stats = |what: u32| {
        PinnedMaps::open(&pins)
            .and_then(|maps| maps.stats())
            .expect("the datapath counters")[what as usize]
    };
    lab.run(&tcp(c, (VIP, 80), Tcp::Syn, &[]));
    lab.run(&tcp(WEB_BACKEND, c, Tcp::SynAck, &[]));
    lab.run(&tcp(c, (VIP, 80), Tcp::Ack, b"data"));
    ok(
        check(
            &fixture("reply", reply.clone(), Expect::RevNat((VIP, 80))),
            &lab.run(&reply),
        ),
        "a reply of the live flow",
    );

    // Established flows time out after 1 s, and both directions of this
    // one were last seen at boot.
    lab.datapath
        .write_config(&proxy_common::DatapathConfig {
            tcp_established_timeout_ns: 1_000_000_000,
            ..Default::default()
        })
        .expect("writing the datapath config");
    for key in [
        ConntrackKey4::new(CLIENT_IP, VIP, c.1, 80, TCP),
        ConntrackKey4::new(WEB_BACKEND.0, CLIENT_IP, WEB_BACKEND.1, c.1, TCP),
    ] {
        edit_conntrack_entry(&pins, key, |v| v.last_seen_ns = 1);
    }
    retire_flow_cache(&pins);

    let expired = stats(stat::CT_EXPIRED);
    let out = lab.run(&reply);
    assert_eq!(
        out.verdict, TC_ACT_SHOT,
        "the expired flow's reply is dropped"
    );
    assert_eq!(
        stats(stat::CT_EXPIRED),
        expired + 1,
        "counted as ct_expired"
    );
    let invalid = stats(stat::INVALID);
    let out = lab.run(&tcp(c, (VIP, 80), Tcp::Ack, b"late data"));
    assert_eq!(out.verdict, TC_ACT_SHOT, "mid-stream without a flow");
    assert_eq!(stats(stat::INVALID), invalid + 1, "counted as invalid");

    ok(
        check(
            &fixture(
                "SYN again",
                tcp(c, (VIP, 80), Tcp::Syn, &[]),
                Expect::Dnat(WEB_BACKEND),
            ),
            &lab.run(&tcp(c, (VIP, 80), Tcp::Syn, &[])),
        ),
        "a new SYN opens a new flow",
    );
    ok(
        check(
            &fixture(
                "its SYN-ACK",
                tcp(WEB_BACKEND, c, Tcp::SynAck, &[]),
                Expect::RevNat((VIP, 80)),
            ),
            &lab.run(&tcp(WEB_BACKEND, c, Tcp::SynAck, &[])),
        ),
        "the new flow's reply",
    );
}

/// Established packets are translated from the flow cache, each CPU's copy
/// of its flows' last translations, without reading conntrack; a new
/// backend epoch, a packet that changes the flow's state (RST), a new
/// entry for the tuple and the slot's age each send the packet back to
/// conntrack. Shown by editing the entry behind the datapath's back: a
/// packet that read it would see the edit.
#[test]
fn established_packets_use_the_flow_cache_until_something_retires_it() {
    use proxy_common::{ConntrackKey4, PROTO_TCP as TCP};
    stay_on_this_cpu();
    let mut lab = Lab::new();
    let pins = lab.datapath.pin_dir().to_owned();
    let c = client(41_000);
    let key = ConntrackKey4::new(CLIENT_IP, VIP, c.1, 80, TCP);
    let ack = tcp(c, (VIP, 80), Tcp::Ack, b"data");
    let port_of = |lab: &mut Lab, frame: &[u8]| {
        let out = lab.run(frame);
        assert_eq!(out.verdict, TC_ACT_OK, "translated and passed");
        destination(&out.frame).1
    };
    let backend_port = WEB_BACKEND.1;
    lab.run(&tcp(c, (VIP, 80), Tcp::Syn, &[]));
    lab.run(&tcp(WEB_BACKEND, c, Tcp::SynAck, &[]));
    assert_eq!(port_of(&mut lab, &ack), backend_port);

    let stats = |what: u32| {
        PinnedMaps::open(&pins)
            .and_then(|maps| maps.stats())
            .expect("the datapath counters")[what as usize]
    };
    edit_conntrack_entry(&pins, key, |v| v.nat_port = 9_001);
    let (dnat, fills) = (stats(stat::DNAT), stats(stat::FLOW_CACHE_FILL));
    assert_eq!(
        port_of(&mut lab, &ack),
        backend_port,
        "the next packet is translated from the cache, not from the edited entry"
    );
    assert_eq!(
        (stats(stat::DNAT), stats(stat::FLOW_CACHE_FILL)),
        (dnat + 1, fills),
        "counted as a DNAT, with no fill"
    );
    lab.datapath
        .new_backend_epoch()
        .expect("a new backend epoch");
    assert_eq!(
        port_of(&mut lab, &ack),
        9_001,
        "a new backend epoch retires the cache: the packet reads its entry"
    );
    assert_eq!(
        stats(stat::FLOW_CACHE_FILL),
        fills + 1,
        "and refills the slot"
    );

    edit_conntrack_entry(&pins, key, |v| v.nat_port = 9_002);
    assert_eq!(port_of(&mut lab, &ack), 9_001, "cached again");
    retire_flow_cache(&pins);
    assert_eq!(
        port_of(&mut lab, &ack),
        9_002,
        "a new generation for the tuple retires its slot"
    );

    edit_conntrack_entry(&pins, key, |v| v.nat_port = 9_003);
    assert_eq!(port_of(&mut lab, &ack), 9_002, "cached again");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while port_of(&mut lab, &ack) != 9_003 {
        assert!(
            std::time::Instant::now() < deadline,
            "a slot is used for FLOW_CACHE_TTL_NS ({} ms), then the entry is read again",
            proxy_common::FLOW_CACHE_TTL_NS / 1_000_000
        );
        std::thread::yield_now();
    }

    edit_conntrack_entry(&pins, key, |v| v.nat_port = 9_004);
    assert_eq!(
        port_of(&mut lab, &tcp(c, (VIP, 80), Tcp::Rst, &[])),
        9_004,
        "a RST changes the flow's state: it reads the entry"
    );
    // The flow is closed; a SYN from the same port opens a new one, to the
    // Service's backend, and its next packet must not meet the closed
    // flow's slot (the RST just refilled it with 9004).
    assert_eq!(
        port_of(&mut lab, &tcp(c, (VIP, 80), Tcp::Syn, &[])),
        backend_port
    );
    assert_eq!(
        port_of(&mut lab, &ack),
        backend_port,
        "the new flow's entry retired the old flow's slot"
    );

    // Off (`kproxy run --no-flow-cache`): every packet reads its entry.
    let mut config = lab.datapath.read_config().expect("the datapath config");
    config.flags |= proxy_common::CONFIG_FLAG_NO_FLOW_CACHE;
    lab.datapath
        .write_config(&config)
        .expect("turning the cache off");
    edit_conntrack_entry(&pins, key, |v| v.nat_port = 9_005);
    assert_eq!(
        port_of(&mut lab, &ack),
        9_005,
        "with the cache off the packet reads its entry"
    );
}

/// One of two datapaths fed the same packets and Service changes: with
/// the flow cache, or without (`CONFIG_FLAG_NO_FLOW_CACHE`).
struct Twin {
    lab: Lab,
    syncer: Syncer,
}

impl Twin {
    fn new(services: &DesiredState, cache: bool) -> Self {
        let mut lab = Lab::with_services(services);
        let mut syncer = Syncer::new();
        {
            let maps = lab.datapath.maps().expect("the datapath maps");
            syncer.reload(&maps).expect("reading the programmed maps");
        }
        let mut config = lab.datapath.read_config().expect("the datapath config");
        if !cache {
            config.flags |= proxy_common::CONFIG_FLAG_NO_FLOW_CACHE;
        }
        lab.datapath
            .write_config(&config)
            .expect("writing the config");
        Self { lab, syncer }
    }

    /// Syncs `services` as the daemon does: a sync that deleted entries
    /// starts a new backend epoch.
    fn sync(&mut self, services: &DesiredState) {
        let report = {
            let mut maps = self.lab.datapath.maps().expect("the datapath maps");
            self.syncer.apply(&mut maps, services)
        };
        assert!(report.failed.is_empty() && report.failed_deletes.is_empty());
        if report.deletes > 0 {
            self.lab
                .datapath
                .new_backend_epoch()
                .expect("a new backend epoch");
        }
    }
}

/// The flow cache is invisible: two datapaths, one with the cache and one
/// without, given the same random packets of a few TCP and UDP flows
/// (client and backend sides, SYN, ACK, RST) and the same changes of the
/// Services' backends, answer every packet with the same verdict and the
/// same bytes. Each Service has one backend at a time, so backend
/// selection is not random; a changed backend set makes new connections,
/// reused ports and UDP flows go elsewhere, which a stale cached
/// translation would not.
/// `FRONTEND_STATS_V1`: the packets and bytes a frontend's translated
/// traffic carried, summed over its entries and CPUs, as the metrics read it.
fn frontend_stats(pins: &Path, frontend: Addr, proto: u8) -> (u64, u64) {
    let (ip, port) = frontend;
    PinnedMaps::open(pins)
        .and_then(|maps| maps.frontend_stats())
        .expect("the per-frontend counters")
        .into_iter()
        .filter(|(f, _)| f.addr[12..] == ip && f.port == port && f.proto == proto)
        .fold((0, 0), |(p, b), (_, s)| (p + s.packets, b + s.bytes))
}

#[test]
fn every_translated_packet_counts_in_its_frontends_stats() {
    use proxy_common::PROTO_TCP as TCP;
    stay_on_this_cpu();
    let mut lab = Lab::new();
    let pins = lab.datapath.pin_dir().to_owned();
    let c = client(41_500);
    let ack = tcp(c, (VIP, 80), Tcp::Ack, b"data");
    let reply = tcp(WEB_BACKEND, c, Tcp::Ack, &[0x5a; 300]);
    // A new flow, a reply on the conntrack path, a client packet that
    // reads conntrack and fills the flow cache, one that hits the cache,
    // and a reply from the cache.
    let frames = [
        tcp(c, (VIP, 80), Tcp::Syn, &[]),
        tcp(WEB_BACKEND, c, Tcp::SynAck, &[]),
        ack.clone(),
        ack.clone(),
        reply.clone(),
        reply,
    ];
    let mut expected = (0, 0);
    for frame in &frames {
        let out = lab.run(frame);
        assert_eq!(out.verdict, TC_ACT_OK, "translated and passed");
        assert_ne!(&out.frame, frame, "translated");
        expected = (expected.0 + 1, expected.1 + frame.len() as u64);
        assert_eq!(frontend_stats(&pins, (VIP, 80), TCP), expected);
    }
    // Other frontends' and non-service packets are not counted here.
    let other = tcp(client(41_501), (VIP, 8443), Tcp::Syn, &[]);
    lab.run(&other);
    lab.run(&tcp(c, (NOT_A_VIP, 80), Tcp::Ack, &[]));
    let other_stats = (1, other.len() as u64);
    assert_eq!(frontend_stats(&pins, (VIP, 8443), TCP), other_stats);
    assert_eq!(frontend_stats(&pins, (VIP, 80), TCP), expected);

    // A frontend removed and programmed again counts from zero.
    {
        let mut maps = lab.datapath.maps().expect("the datapath maps");
        let mut syncer = Syncer::new();
        syncer.reload(&maps).expect("reading the maps");
        let mut without = lab_services();
        without.frontends.retain(|k, _| k.port != 80);
        syncer.apply(&mut maps, &without);
        syncer.apply(&mut maps, &lab_services());
    }
    assert_eq!(frontend_stats(&pins, (VIP, 80), TCP), (0, 0));
    assert_eq!(frontend_stats(&pins, (VIP, 8443), TCP), other_stats);
}

/// CRC32c (RFC 9260 appendix A) by the `crc` crate, independent of the
/// datapath's update.
fn crc32c(data: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(data)
}

/// An SCTP packet `src` -> `dst` (verification tag 0x01020304) carrying
/// `chunk`, with its CRC32c.
fn sctp(src: Addr, dst: Addr, chunk: &[u8]) -> Vec<u8> {
    let mut segment = Vec::with_capacity(12 + chunk.len());
    segment.extend_from_slice(&src.1.to_be_bytes());
    segment.extend_from_slice(&dst.1.to_be_bytes());
    segment.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    segment.extend_from_slice(&[0; 4]);
    segment.extend_from_slice(chunk);
    let crc = crc32c(&segment);
    segment[8..12].copy_from_slice(&crc.to_le_bytes());
    let mut ip = ipv4_header(src.0, dst.0, &[]);
    ip.protocol = IpNumber(132);
    ip.set_payload_len(segment.len()).expect("a small packet");
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = Vec::new();
    frame.extend_from_slice(&NODE_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    ip.write(&mut frame).expect("an IPv4 header");
    frame.extend_from_slice(&segment);
    frame
}

/// An SCTP chunk of `kind` with `value` (padded to whole words).
fn sctp_chunk(kind: u8, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut chunk = vec![kind, 0];
    chunk.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    chunk.extend_from_slice(value);
    chunk.resize(len.next_multiple_of(4), 0);
    chunk
}

/// `frame` is an SCTP packet `src` -> `dst` whose CRC32c and IPv4 header
/// checksum hold.
fn check_sctp(frame: &[u8], src: Addr, dst: Addr) -> Result<(), String> {
    ipv4_sum_ok(frame)?;
    let view = Ipv4View::parse(frame).ok_or("not IPv4")?;
    let segment = &frame[view.l4..ETH_LEN + view.total];
    let port = |at: usize| u16::from_be_bytes([segment[at], segment[at + 1]]);
    same_ends(
        "",
        ((view.src(frame), port(0)), (view.dst(frame), port(2))),
        (src, dst),
    )?;
    sctp_crc_ok(frame)
}

/// The SCTP packet's stored CRC32c is its CRC.
fn sctp_crc_ok(frame: &[u8]) -> Result<(), String> {
    let view = Ipv4View::parse(frame).ok_or("not IPv4")?;
    let segment = &frame[view.l4..ETH_LEN + view.total];
    let stored = u32::from_le_bytes(segment[8..12].try_into().unwrap());
    let mut zeroed = segment.to_vec();
    zeroed[8..12].fill(0);
    let computed = crc32c(&zeroed);
    if stored != computed {
        return Err(format!(
            "SCTP CRC32c {stored:#010x}, recomputed {computed:#010x}"
        ));
    }
    Ok(())
}

/// SPEC 7: SCTP Services are served. Addresses are rewritten as for TCP
/// and UDP; a port rewrite updates the CRC32c, which covers the whole
/// packet (no pseudo-header); flows are tracked like UDP's.
#[test]
fn sctp_is_load_balanced_and_its_crc_follows_a_port_rewrite() {
    const SCTP_BACKEND: Addr = ([198, 18, 2, 7], 13_868);
    const SAME_PORT_SCTP_BACKEND: Addr = ([198, 18, 2, 7], 2905);
    let mut services = lab_services();
    add_cluster_ip(&mut services, VIP, 3868, Protocol::Sctp, &[SCTP_BACKEND]);
    add_cluster_ip(
        &mut services,
        VIP,
        2905,
        Protocol::Sctp,
        &[SAME_PORT_SCTP_BACKEND],
    );
    let mut lab = Lab::with_services(&services);
    let c = client(42_000);
    // INIT: tag, a_rwnd, streams, initial TSN.
    let init = sctp_chunk(1, &[1, 2, 3, 4, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    let init_ack = sctp_chunk(2, &[5, 6, 7, 8, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    // A DATA chunk whose length is no whole word (padded).
    let data = sctp_chunk(0, &[0x5a; 301]);
    let cases = [
        (
            "INIT to the VIP",
            sctp(c, (VIP, 3868), &init),
            c,
            SCTP_BACKEND,
        ),
        (
            "INIT-ACK from the backend",
            sctp(SCTP_BACKEND, c, &init_ack),
            (VIP, 3868),
            c,
        ),
        (
            "DATA to the VIP",
            sctp(c, (VIP, 3868), &data),
            c,
            SCTP_BACKEND,
        ),
        (
            "DATA again (flow cache)",
            sctp(c, (VIP, 3868), &data),
            c,
            SCTP_BACKEND,
        ),
        ("DATA back", sctp(SCTP_BACKEND, c, &data), (VIP, 3868), c),
    ];
    for (what, frame, src, dst) in &cases {
        ok(sctp_crc_ok(frame), "the fixture itself");
        let out = lab.run(frame);
        assert_eq!(out.verdict, TC_ACT_OK, "{what}: translated and passed");
        ok(check_sctp(&out.frame, *src, *dst), what);
    }
    // The same port behind: only the addresses change, and the CRC with
    // them not at all.
    let frame = sctp(client(42_001), (VIP, 2905), &init);
    let out = lab.run(&frame);
    ok(
        check_sctp(&out.frame, client(42_001), SAME_PORT_SCTP_BACKEND),
        "INIT to a same-port backend",
    );
    assert_eq!(
        out.frame[ETH_LEN + 28..ETH_LEN + 32],
        frame[ETH_LEN + 28..ETH_LEN + 32]
    );
    // An SCTP port no Service has on a known VIP is rejected like TCP's.
    let out = lab.run(&sctp(client(42_002), (VIP, 9999), &init));
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "ICMP port unreachable");
}

#[test]
fn the_flow_cache_never_changes_what_a_packet_gets() {
    stay_on_this_cpu();
    const WEB: [Addr; 2] = [WEB_BACKEND, ([198, 18, 2, 3], 8081)];
    const DNS: [Addr; 2] = [DNS_BACKEND, ([198, 18, 2, 6], 5354)];
    // The measured Service has one backend of each set at a time; a second
    // Service keeps all four programmed, so a switch deletes nothing and
    // starts no new epoch (which would retire every cached translation and
    // hide a stale one).
    let services = |set: usize| {
        let mut state = DesiredState::default();
        add_cluster_ip(&mut state, VIP, 80, Protocol::Tcp, &[WEB[set]]);
        add_cluster_ip(&mut state, VIP, 53, Protocol::Udp, &[DNS[set]]);
        add_cluster_ip(&mut state, VIP_MULTI, 80, Protocol::Tcp, &WEB);
        add_cluster_ip(&mut state, VIP_MULTI, 53, Protocol::Udp, &DNS);
        state
    };
    // `TestRunner::run` takes an `Fn`.
    let twins = std::cell::RefCell::new([
        Twin::new(&services(0), true),
        Twin::new(&services(0), false),
    ]);
    // About 3 s. A stale translation needs a handful of steps in one order
    // (a flow cached, a switch, a RST, a SYN, an ACK): with the generation
    // bump of new entries left out, 3 000 cases found it in each of three
    // runs.
    let mut runner = proptest_runner(3_000);
    // A step: (what, flow, backend set). What: 0-2 the client's SYN, ACK,
    // RST; 3-5 a backend's SYN-ACK, ACK, RST; 6 a datagram; 7 its reply;
    // 8 a sync to backend set `set`.
    let steps = prop::collection::vec((0u8..9, 0usize..3, 0usize..2), 1..40);
    let case = AtomicU32::new(0);
    let result = runner.run(&steps, |steps| {
        // Each case's flows are its own: fresh client ports.
        let base = 20_000 + 8 * (case.fetch_add(1, Ordering::Relaxed) % 5_000) as u16;
        let mut twins = twins.borrow_mut();
        for (i, &(what, flow, set)) in steps.iter().enumerate() {
            let c = client(base + flow as u16);
            let frame = match what {
                0 => tcp(c, (VIP, 80), Tcp::Syn, &[]),
                1 => tcp(c, (VIP, 80), Tcp::Ack, b"data"),
                2 => tcp(c, (VIP, 80), Tcp::Rst, &[]),
                3 => tcp(WEB[set], c, Tcp::SynAck, &[]),
                4 => tcp(WEB[set], c, Tcp::Ack, b"data"),
                5 => tcp(WEB[set], c, Tcp::Rst, &[]),
                6 => udp(c, (VIP, 53), b"a query"),
                7 => udp(DNS[set], c, b"an answer"),
                _ => {
                    for twin in twins.iter_mut() {
                        twin.sync(&services(set));
                    }
                    continue;
                }
            };
            let [cached, uncached] = &mut *twins;
            let (a, b) = (cached.lab.run(&frame), uncached.lab.run(&frame));
            prop_assert_eq!(
                (a.verdict, &a.frame),
                (b.verdict, &b.frame),
                "step {} {:?}: the cached datapath answered differently",
                i,
                (what, flow, set)
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn udp_to_a_vip_is_dnated_and_a_zero_checksum_stays_zero() {
    let mut lab = Lab::new();
    let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01";
    let with_checksum = udp(client(45000), (VIP, 53), query);
    let without_checksum = with_udp_checksum(udp(client(45001), (VIP, 53), query), 0);
    let to_zero = udp_translating_to_checksum_zero(client(45002));
    assert_ne!(
        Ipv4View::parse(&with_checksum)
            .unwrap()
            .udp_checksum(&with_checksum),
        0,
        "fixture precondition: a real checksum"
    );
    run_fixtures(
        &mut lab,
        &[
            fixture(
                "UDP client -> VIP:53 with a checksum",
                with_checksum.clone(),
                Expect::Dnat(DNS_BACKEND),
            ),
            fixture(
                "UDP reply backend -> client",
                udp(DNS_BACKEND, client(45000), b"\x12\x34\x81\x80 answer"),
                Expect::RevNat((VIP, 53)),
            ),
            fixture(
                "UDP client -> VIP:53 without a checksum (0)",
                without_checksum.clone(),
                Expect::Dnat(DNS_BACKEND),
            ),
            fixture(
                "UDP reply without a checksum",
                with_udp_checksum(udp(DNS_BACKEND, client(45001), b"answer"), 0),
                Expect::RevNat((VIP, 53)),
            ),
            fixture(
                "UDP whose translated checksum computes to 0 (sent as 0xffff)",
                to_zero.clone(),
                Expect::Dnat(DNS_BACKEND),
            ),
            fixture(
                "second datagram of the UDP flow",
                udp(client(45000), (VIP, 53), b"another query"),
                Expect::Dnat(DNS_BACKEND),
            ),
        ],
    );

    // The zero-checksum rules, stated outright.
    let out = lab.run(&without_checksum);
    let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
    assert_eq!(destination(&out.frame), DNS_BACKEND);
    assert_eq!(view.udp_checksum(&out.frame), 0, "no checksum stays none");
    ok(verify_ipv4_checksum(&out.frame), "IPv4 checksum");

    let out = lab.run(&to_zero);
    let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
    assert_eq!(destination(&out.frame), DNS_BACKEND);
    assert_eq!(
        view.udp_checksum(&out.frame),
        0xffff,
        "a computed UDP checksum of 0 must go out as 0xffff (0 means none)"
    );
    ok(verify_l4_checksum(&out.frame), "UDP checksum");
}

// ---------------------------------------------------------------------------
// 4. Traffic that is not for a Service passes byte for byte.
// ---------------------------------------------------------------------------

#[test]
fn non_service_traffic_passes_byte_identical() {
    let mut lab = Lab::new();
    run_fixtures(
        &mut lab,
        &[
            fixture(
                "TCP SYN to a pod address",
                tcp(client(41000), (NOT_A_VIP, 80), Tcp::Syn, &[]),
                Expect::Untouched,
            ),
            fixture(
                "TCP data to a pod address",
                tcp(client(41001), (NOT_A_VIP, 8080), Tcp::Ack, b"hello"),
                Expect::Untouched,
            ),
            fixture(
                "UDP to a pod address",
                udp(client(41002), (NOT_A_VIP, 53), b"query"),
                Expect::Untouched,
            ),
            fixture(
                "TCP from a Service port of a pod address",
                tcp((NOT_A_VIP, 80), client(41003), Tcp::SynAck, &[]),
                Expect::Untouched,
            ),
            fixture("ICMP echo to a VIP", icmp_echo(VIP), Expect::Untouched),
            fixture(
                "ICMP echo to a VIP without endpoints",
                icmp_echo(VIP_EMPTY),
                Expect::Untouched,
            ),
            fixture(
                "ICMP echo to a pod address",
                icmp_echo(NOT_A_VIP),
                Expect::Untouched,
            ),
            fixture("ARP who-has a VIP", arp_request(VIP), Expect::Untouched),
            fixture("IPv6 UDP to port 53", ipv6_udp(53), Expect::Untouched),
            fixture(
                "IPv6 TCP SYN to port 80",
                ipv6_tcp_syn(80),
                Expect::Untouched,
            ),
        ],
    );
}

/// A SYN from `client_port` to the VIP's `port` gets `expect`.
fn syn_to_vip_port(lab: &mut Lab, client_port: u16, port: u16, expect: Expect, what: &str) {
    let syn = tcp(client(client_port), (VIP, port), Tcp::Syn, &[]);
    let out = lab.run(&syn);
    ok(check(&fixture("SYN to a VIP", syn, expect), &out), what);
}

/// A SYN from `client_port` to the VIP's port 80 gets `expect`.
fn syn_to_vip(lab: &mut Lab, client_port: u16, expect: Expect, what: &str) {
    syn_to_vip_port(lab, client_port, 80, expect, what);
}

/// The entry point looks a new flow's frontend up first (the new flow
/// needs it anyway); only when that misses does the address marker decide,
/// with `CONFIG_FLAG_ADDRESS_MARKERS`, that a packet to an address without
/// one is no Service's and passes at once. Without the flag (a datapath
/// loaded over an older kproxy's maps, before the first sync wrote the
/// markers) the new-flow path decides, and rejects an unknown port of a
/// VIP, as before.
#[test]
fn the_address_marker_decides_only_after_a_frontend_miss() {
    let mut lab = Lab::new();
    syn_to_vip_port(
        &mut lab,
        41100,
        81,
        Expect::Reject,
        "an unknown port of a VIP with its address marker: rejected",
    );
    lab.delete_service_entry(&proxy_common::ServiceKey::address_marker(
        proxy_common::ipv4_mapped(VIP),
    ));
    syn_to_vip_port(
        &mut lab,
        41101,
        81,
        Expect::Untouched,
        "without its address marker, the VIP's unknown port is taken for no Service's",
    );
    syn_to_vip(
        &mut lab,
        41102,
        Expect::Dnat(WEB_BACKEND),
        "the frontend is found before the marker is asked",
    );
    set_datapath_flags(&mut lab.datapath, 0);
    syn_to_vip_port(
        &mut lab,
        41103,
        81,
        Expect::Reject,
        "markers not announced: the new-flow path rejects the unknown port",
    );
}

/// With `CONFIG_FLAG_ADDRESS_FILTER` a packet to an address whose bit is
/// clear passes at once, before any hash lookup. The bits the
/// syncer writes are the ones the datapath tests (every frontend of the
/// lab is served with the filter on), and the datapath does test them: an
/// empty filter hides a VIP whose entries are all there.
#[test]
fn a_destination_whose_address_filter_bit_is_clear_is_no_service() {
    use proxy_userspace::{address_filter::AddressFilterBits, sync::MapWriter as _};
    let mut lab = Lab::new();
    syn_to_vip(
        &mut lab,
        41200,
        Expect::Dnat(WEB_BACKEND),
        "served: the syncer set the VIP's bit where the datapath looks",
    );
    lab.datapath
        .maps()
        .expect("the datapath maps")
        .put_address_filter(AddressFilterBits::of([]).value())
        .expect("emptying the address filter");
    syn_to_vip(
        &mut lab,
        41201,
        Expect::Untouched,
        "with its bit clear, the VIP is taken for no Service's",
    );
    set_datapath_flags(&mut lab.datapath, proxy_common::CONFIG_FLAG_ADDRESS_MARKERS);
    syn_to_vip(
        &mut lab,
        41202,
        Expect::Dnat(WEB_BACKEND),
        "filter not announced: the frontend lookup decides",
    );
}

// ---------------------------------------------------------------------------
// 5. Truncated and malformed headers.
// ---------------------------------------------------------------------------

#[test]
fn malformed_headers_pass_untouched_and_ip_options_are_handled() {
    let mut lab = Lab::new();
    let syn = |port: u16| tcp(client(port), (VIP, 80), Tcp::Syn, &[]);
    let dgram = |port: u16| udp(client(port), (VIP, 53), b"0123456789abcdef");
    let l4 = ETH_LEN + 20;

    let mut cases = Vec::new();
    // The kernel refuses IPv4 frames shorter than 14+20 bytes as test-run
    // input, so these two only reach the program on older kernels...
    cases.push(fixture(
        "Ethernet header and one byte of IPv4 (15 bytes)",
        syn(44000)[..ETH_LEN + 1].to_vec(),
        Expect::UntouchedOrRefused,
    ));
    cases.push(fixture(
        "frame cut inside the IPv4 header (14+10 bytes)",
        syn(44001)[..ETH_LEN + 10].to_vec(),
        Expect::UntouchedOrRefused,
    ));
    // ...while a cut inside the IPv4 options always does.
    let mut cut_in_options = |port: u16, options: &[u8], keep: usize, what: &str| {
        let f = tcp_with_options(client(port), (VIP, 80), options, Tcp::Syn, &[]);
        cases.push(fixture(
            what,
            f[..ETH_LEN + keep].to_vec(),
            Expect::Untouched,
        ));
    };
    cut_in_options(
        44005,
        &options_ihl15(),
        40,
        "frame cut inside the IPv4 options (IHL 15, 14+40 bytes)",
    );
    cut_in_options(
        44006,
        &OPTIONS_IHL6,
        20,
        "frame cut after 20 of 24 IPv4 header bytes (IHL 6)",
    );
    let mut untouched = |name: &str, frame: Vec<u8>| {
        cases.push(fixture(name, frame, Expect::Untouched));
    };
    untouched(
        "frame cut right after the IPv4 header",
        syn(44002)[..l4].to_vec(),
    );
    for ihl in [0u8, 4] {
        let mut f = syn(44003 + u16::from(ihl));
        f[ETH_LEN] = 0x40 | ihl;
        fix_ip_checksum(&mut f);
        untouched(&format!("IHL {ihl} (< 5)"), f);
    }
    let mut f = syn(44010);
    f[ETH_LEN] = 0x65;
    fix_ip_checksum(&mut f);
    untouched("IP version 6 under the IPv4 ethertype", f);

    let mut f = syn(44011);
    set_u16(&mut f, ETH_LEN + 2, 16);
    fix_ip_checksum(&mut f);
    untouched("IP total length shorter than its header", f);

    let mut f = syn(44012);
    let total = ip_total_len(&f);
    set_u16(&mut f, ETH_LEN + 2, total + 1);
    fix_ip_checksum(&mut f);
    untouched("IP total length one byte beyond the frame", f);

    let mut f = syn(44013);
    set_u16(&mut f, ETH_LEN + 2, 1500);
    fix_ip_checksum(&mut f);
    untouched("IP total length 1500 on a short frame", f);

    let mut f = syn(44014)[..l4 + 10].to_vec();
    set_u16(&mut f, ETH_LEN + 2, 30);
    fix_ip_checksum(&mut f);
    untouched("TCP header cut short (10 bytes, total length agrees)", f);

    untouched(
        "TCP header cut short by the frame (total length claims more)",
        syn(44015)[..l4 + 10].to_vec(),
    );

    let mut f = syn(44016);
    f[l4 + 12] = 0x40 | (f[l4 + 12] & 0x0f);
    untouched("TCP data offset 4 (< 5)", f);

    let mut f = dgram(44017);
    set_u16(&mut f, l4 + 4, 0);
    untouched("UDP length 0", f);

    let mut f = dgram(44018);
    set_u16(&mut f, l4 + 4, 7);
    untouched("UDP length 7 (< header)", f);

    let mut f = dgram(44019);
    let udp_len = u16::from_be_bytes([f[l4 + 4], f[l4 + 5]]);
    set_u16(&mut f, l4 + 4, udp_len + 1);
    untouched("UDP length one byte beyond the packet", f);

    let mut f = dgram(44020)[..l4 + 4].to_vec();
    set_u16(&mut f, ETH_LEN + 2, 24);
    fix_ip_checksum(&mut f);
    untouched("UDP header cut short (4 bytes, total length agrees)", f);

    for (port, flags_fragment, what) in [
        (44021, 0x0001, "non-first fragment (offset 8) to VIP:80"),
        (44022, 0x2001, "non-first fragment with more-fragments set"),
        (44023, 0x00b9, "non-first fragment (offset 1480) to VIP:80"),
    ] {
        let mut f = syn(port);
        set_u16(&mut f, ETH_LEN + 6, flags_fragment);
        fix_ip_checksum(&mut f);
        untouched(what, f);
    }
    let mut f = dgram(44024);
    set_u16(&mut f, ETH_LEN + 6, 0x0003);
    fix_ip_checksum(&mut f);
    untouched("non-first UDP fragment to VIP:53", f);

    let mut f = tcp_with_options(client(44025), (VIP, 80), &options_ihl15(), Tcp::Syn, &[]);
    let cut = ETH_LEN + 60 + 10;
    f.truncate(cut);
    set_u16(&mut f, ETH_LEN + 2, (cut - ETH_LEN) as u16);
    fix_ip_checksum(&mut f);
    untouched("IHL 15 and a TCP header cut short", f);

    cases.extend([
        fixture(
            "IPv4 options (IHL 6: NOP NOP NOP EOL), TCP SYN to VIP:80",
            tcp_with_options(client(44030), (VIP, 80), &OPTIONS_IHL6, Tcp::Syn, &[]),
            Expect::Dnat(WEB_BACKEND),
        ),
        fixture(
            "IPv4 options (IHL 15: router alert + NOPs), TCP SYN with data to VIP:80",
            tcp_with_options(
                client(44031),
                (VIP, 80),
                &options_ihl15(),
                Tcp::Syn,
                b"data",
            ),
            Expect::Dnat(WEB_BACKEND),
        ),
        fixture(
            "IPv4 options (IHL 6), UDP to VIP:53",
            udp_with_options(client(44032), (VIP, 53), &OPTIONS_IHL6, b"query"),
            Expect::Dnat(DNS_BACKEND),
        ),
        fixture(
            "IPv4 options (IHL 6), reply backend -> client",
            tcp_with_options(WEB_BACKEND, client(44030), &OPTIONS_IHL6, Tcp::SynAck, &[]),
            Expect::RevNat((VIP, 80)),
        ),
        fixture(
            "untracked ACK to VIP:80 padded to the 60-byte Ethernet minimum: dropped",
            {
                let mut f = tcp(client(44033), (VIP, 80), Tcp::Ack, &[]);
                f.resize(60, 0);
                f
            },
            Expect::Drop,
        ),
        fixture(
            "UDP to VIP:53 padded to the 60-byte Ethernet minimum",
            {
                let mut f = udp(client(44034), (VIP, 53), b"q");
                f.resize(60, 0);
                f
            },
            Expect::Dnat(DNS_BACKEND),
        ),
    ]);
    run_fixtures(&mut lab, &cases);
}

// ---------------------------------------------------------------------------
// 6. Reject: no endpoints, or an unknown port of a known VIP.
// ---------------------------------------------------------------------------

#[test]
fn service_without_endpoints_rejects_with_icmp_port_unreachable() {
    let mut lab = Lab::new();
    run_fixtures(
        &mut lab,
        &[
            fixture(
                "TCP SYN to a Service without endpoints",
                tcp(client(47000), (VIP_EMPTY, 80), Tcp::Syn, &[]),
                Expect::Reject,
            ),
            fixture(
                "UDP to a Service without endpoints",
                udp(client(47001), (VIP_EMPTY, 53), &[0x77; 64]),
                Expect::Reject,
            ),
            fixture(
                "UDP without a checksum to a Service without endpoints",
                with_udp_checksum(udp(client(47002), (VIP_EMPTY, 53), b"query"), 0),
                Expect::Reject,
            ),
            fixture(
                "TCP with 1000 bytes of data to a Service without endpoints",
                tcp(client(47003), (VIP_EMPTY, 80), Tcp::Ack, &[0x42; 1000]),
                Expect::Reject,
            ),
            fixture(
                "padded 60-byte UDP frame to a Service without endpoints",
                {
                    let mut f = udp(client(47004), (VIP_EMPTY, 53), &[]);
                    f.resize(60, 0);
                    f
                },
                Expect::Reject,
            ),
            fixture(
                "TCP SYN to a known VIP on an unknown port (:81)",
                tcp(client(47005), (VIP, 81), Tcp::Syn, &[]),
                Expect::Reject,
            ),
            fixture(
                "UDP to a known VIP on an unknown port (:54)",
                udp(client(47006), (VIP, 54), b"query"),
                Expect::Reject,
            ),
            fixture(
                "UDP to a known VIP on its TCP-only port (:80)",
                udp(client(47007), (VIP, 80), b"query"),
                Expect::Reject,
            ),
            fixture(
                "TCP SYN to a known multi-backend VIP on an unknown port",
                tcp(client(47008), (VIP_MULTI, 443), Tcp::Syn, &[]),
                Expect::Reject,
            ),
            fixture(
                "TCP SYN with IPv4 options to a Service without endpoints",
                tcp_with_options(client(47009), (VIP_EMPTY, 80), &OPTIONS_IHL6, Tcp::Syn, &[]),
                Expect::RejectOrDrop,
            ),
            fixture(
                "TCP SYN to an unknown VIP",
                tcp(client(47010), (UNKNOWN_VIP, 80), Tcp::Syn, &[]),
                Expect::Untouched,
            ),
            fixture(
                "UDP to an unknown VIP",
                udp(client(47011), (UNKNOWN_VIP, 53), b"query"),
                Expect::Untouched,
            ),
            fixture(
                "TCP SYN to an unknown VIP on an odd port",
                tcp(client(47012), (UNKNOWN_VIP, 81), Tcp::Syn, &[]),
                Expect::Untouched,
            ),
        ],
    );

    // The reject for the plain SYN, stated outright.
    let syn = tcp(client(47020), (VIP_EMPTY, 80), Tcp::Syn, &[]);
    let out = lab.run(&syn);
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "a reject is redirected back out"
    );
    let view = Ipv4View::parse(&out.frame).expect("reject is IPv4");
    assert_eq!(addr(view.src(&out.frame)), addr(VIP_EMPTY));
    assert_eq!(addr(view.dst(&out.frame)), addr(CLIENT_IP));
    assert_eq!(view.total, out.frame.len() - ETH_LEN);
    assert_eq!(out.frame[view.l4..view.l4 + 2], [3, 3], "port unreachable");
    ok(check_reject(&syn, &out.frame), "reject of a plain SYN");
}

// ---------------------------------------------------------------------------
// 7. Mutated and truncated packets (proptest).
// ---------------------------------------------------------------------------

/// One mutation of one base packet.
#[derive(Clone, Debug)]
struct Mutation {
    /// Below 8: the plain SYN to VIP:80; else base `n - 8`.
    base: u8,
    /// (within the first 74 bytes?, where, xor mask)
    flips: Vec<(bool, Index, u8)>,
    /// Truncate to 15..=len bytes (test runs refuse a bare Ethernet header).
    cut: Option<Index>,
    /// Make the checksums of the mutated packet right again, so the program
    /// sees packets that are valid but odd, not only corrupt ones.
    refresh_checksums: bool,
}

fn mutations() -> impl Strategy<Value = Mutation> {
    (
        0u8..(8 + PROPTEST_BASES as u8),
        prop::collection::vec((any::<bool>(), any::<Index>(), 1u8..=255), 0..5),
        prop::option::weighted(0.3, any::<Index>()),
        any::<bool>(),
    )
        .prop_map(|(base, flips, cut, refresh_checksums)| Mutation {
            base,
            flips,
            cut,
            refresh_checksums,
        })
}

/// `proptest_bases` and the hairpin reply the test builds.
const PROPTEST_BASES: usize = 10;

fn proptest_bases() -> [Vec<u8>; PROPTEST_BASES - 1] {
    [
        tcp(client(46000), (VIP, 80), Tcp::Syn, &[]),
        tcp_with_options(client(46001), (VIP, 80), &OPTIONS_IHL6, Tcp::Syn, b"hi"),
        tcp(
            client(46002),
            (VIP_MULTI, 80),
            Tcp::Syn,
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        udp(client(46003), (VIP, 53), b"a query"),
        with_udp_checksum(udp(client(46004), (VIP, 53), b"no checksum"), 0),
        tcp(client(46005), (VIP_EMPTY, 80), Tcp::Syn, &[]),
        udp(client(46006), (VIP_EMPTY, 53), b"nobody home"),
        tcp(WEB_BACKEND, client(46000), Tcp::SynAck, &[]),
        // A pod that reaches its own Service and is picked: hairpin.
        tcp((HAIRPIN_POD.0, 46007), (VIP_HAIRPIN, 80), Tcp::Syn, &[]),
    ]
}

fn mutate(m: &Mutation, bases: &[Vec<u8>]) -> Vec<u8> {
    let base = if m.base < 8 {
        0
    } else {
        usize::from(m.base - 8)
    };
    let mut frame = bases[base].clone();
    for (in_headers, at, mask) in &m.flips {
        let span = if *in_headers {
            frame.len().min(ETH_LEN + 60)
        } else {
            frame.len()
        };
        frame[at.index(span)] ^= mask;
    }
    if let Some(cut) = &m.cut {
        frame.truncate(ETH_LEN + 1 + cut.index(frame.len() - ETH_LEN));
    }
    if m.refresh_checksums {
        refresh_checksums(&mut frame);
    }
    frame
}

/// Our own checksum fix-up for whatever still parses.
fn refresh_checksums(frame: &mut [u8]) {
    let Some(view) = Ipv4View::parse(frame) else {
        return;
    };
    set_u16(frame, ETH_LEN + 10, 0);
    let sum = ones_sum(&[view.header(frame)]);
    set_u16(frame, ETH_LEN + 10, !sum);
    let is_udp = view.proto == PROTO_UDP;
    if view.l4_covered(frame).is_none() || (is_udp && view.udp_checksum(frame) == 0) {
        return;
    }
    set_u16(frame, view.l4_check_off(), 0);
    let checksum = !view.l4_residual(frame).expect("covered above");
    let checksum = if is_udp && checksum == 0 {
        0xffff
    } else {
        checksum
    };
    set_u16(frame, view.l4_check_off(), checksum);
}

/// What any output must satisfy for any input.
fn check_any(input: &[u8], out: &Outcome) -> Result<(), String> {
    match out.verdict {
        TC_ACT_SHOT => Ok(()),
        TC_ACT_REDIRECT => check_reject(input, &out.frame).map_err(|e| format!("REDIRECT: {e}")),
        TC_ACT_OK if out.frame == input => Ok(()),
        TC_ACT_OK => check_rewrite(input, &out.frame),
        other => Err(format!("verdict {other} (only 0, 2 and 7 are expected)")),
    }
}

/// A rewrite may change addresses, ports and checksums of a complete IPv4
/// TCP/UDP packet, and must leave its checksums exactly as right (or as
/// wrong) as they came in.
fn check_rewrite(input: &[u8], output: &[u8]) -> Result<(), String> {
    if output.len() != input.len() {
        return Err(format!(
            "rewrite changed the length {} -> {}",
            input.len(),
            output.len()
        ));
    }
    let view = Ipv4View::parse(input).ok_or("rewrote a frame that is not well-formed IPv4")?;
    // A later fragment (offset != 0) of a datagram whose first fragment was
    // translated gets the same address rewrite (frag.rs): only an address
    // and the IPv4 checksum may change, and the checksum stays as right (or
    // as wrong) as it was.
    let frag_offset = u16::from_be_bytes([input[ETH_LEN + 6], input[ETH_LEN + 7]]) & 0x1fff;
    if frag_offset != 0 {
        let allowed = |i: usize| (ETH_LEN + 10..ETH_LEN + 20).contains(&i);
        if let Some(i) = (0..input.len()).find(|&i| input[i] != output[i] && !allowed(i)) {
            return Err(format!(
                "a later fragment's byte {i} changed, which is no address or checksum"
            ));
        }
        let ip_in = ones_sum(&[view.header(input)]);
        let ip_out = ones_sum(&[view.header(output)]);
        if !same_ones(ip_in, ip_out) {
            return Err(format!(
                "fragment: IPv4 header checksum error changed: residual {ip_in:#06x} -> {ip_out:#06x}"
            ));
        }
        return Ok(());
    }
    if view.l4_covered(input).is_none() {
        return Err("rewrote a packet without a complete first-fragment TCP/UDP header".to_owned());
    }
    let check_off = view.l4_check_off();
    let allowed = |i: usize| {
        (ETH_LEN + 10..ETH_LEN + 12).contains(&i)
            || (ETH_LEN + 12..ETH_LEN + 20).contains(&i)
            || (view.l4..view.l4 + 4).contains(&i)
            || (check_off..check_off + 2).contains(&i)
    };
    if let Some(i) = (0..input.len()).find(|&i| input[i] != output[i] && !allowed(i)) {
        return Err(format!(
            "rewrite changed byte {i} ({:02x} -> {:02x}), which is no address, port or checksum",
            input[i], output[i]
        ));
    }
    let (sport_in, dport_in) = view.ports(input);
    let (sport_out, dport_out) = view.ports(output);
    let src_changed = view.src(input) != view.src(output) || sport_in != sport_out;
    let dst_changed = view.dst(input) != view.dst(output) || dport_in != dport_out;
    let to_dst = (view.dst(output), dport_out);
    let to_src = (view.src(output), sport_out);
    let snat_port = |port| (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port);
    // Hairpin: a backend that reached its own Service and was picked gets
    // its flow source-NATed to the VIP and a port of the SNAT range, and
    // its answers from that port back.
    let hairpin_forward = all_backends().contains(&to_dst)
        && to_dst.0 == view.src(input)
        && to_src.0 == view.dst(input)
        && snat_port(sport_out);
    let hairpin_reply = FRONTENDS.contains(&to_src)
        && to_src.0 == view.dst(input)
        && to_dst.0 == view.src(input)
        && snat_port(dport_in);
    match (src_changed, dst_changed) {
        (false, true) if all_backends().contains(&to_dst) => {}
        (true, false) if FRONTENDS.contains(&to_src) => {}
        (true, true) if hairpin_forward || hairpin_reply => {}
        (false, false) => {}
        _ => {
            return Err(format!(
                "rewrite to {}:{} -> {}:{} is neither a DNAT to a backend, a reverse NAT to a frontend nor a hairpin",
                addr(to_src.0),
                to_src.1,
                addr(to_dst.0),
                to_dst.1
            ))
        }
    }

    // Incremental updates keep the one's-complement residual: a right
    // checksum stays right, a wrong one stays exactly as wrong.
    let ip_in = ones_sum(&[view.header(input)]);
    if ip_in == 0xffff {
        ipv4_sum_ok(output)?;
    } else {
        let ip_out = ones_sum(&[view.header(output)]);
        if !same_ones(ip_in, ip_out) {
            return Err(format!(
                "IPv4 header checksum error changed: residual {ip_in:#06x} -> {ip_out:#06x}"
            ));
        }
    }
    if view.proto == PROTO_UDP && view.udp_checksum(input) == 0 {
        if view.udp_checksum(output) != 0 {
            return Err("a UDP datagram without checksum got one".to_owned());
        }
        return Ok(());
    }
    let l4_in = view.l4_residual(input).expect("covered above");
    if l4_in == 0xffff {
        l4_sum_ok(output)
    } else {
        let l4_out = view.l4_residual(output).expect("same layout");
        if same_ones(l4_in, l4_out) {
            Ok(())
        } else {
            Err(format!(
                "L4 checksum error changed: residual {l4_in:#06x} -> {l4_out:#06x}"
            ))
        }
    }
}

#[test]
fn mutated_and_truncated_packets_never_break_checksums() {
    let mut lab = Lab::new();
    let mut bases = proptest_bases().to_vec();
    // Prime conntrack so the reply bases take the reverse-NAT path, and
    // make sure each unmutated base passes the same checks.
    let mut last = None;
    for base in &bases {
        let out = lab.run(base);
        check_any(base, &out).unwrap_or_else(|e| panic!("unmutated base: {e}"));
        assert_ne!(out.frame, *base, "every base is rewritten or rejected");
        last = Some(out.frame);
    }
    // The hairpin pod's answer, to the VIP and the port its flow got.
    let hairpin = last.expect("the hairpin base ran");
    let view = Ipv4View::parse(&hairpin).expect("the hairpin SYN went out as IPv4");
    let (snat_port, _) = view.ports(&hairpin);
    let reply = tcp(HAIRPIN_POD, (VIP_HAIRPIN, snat_port), Tcp::SynAck, &[]);
    let out = lab.run(&reply);
    check_any(&reply, &out).unwrap_or_else(|e| panic!("hairpin reply: {e}"));
    assert_ne!(out.frame, reply, "the hairpin reply is reverse-NATed");
    bases.push(reply);
    assert_eq!(bases.len(), PROPTEST_BASES);

    let program = lab.program();
    // ~200 cases run in well under a second.
    let mut runner = proptest_runner(200);
    let result = runner.run(&mutations(), |m| {
        let input = mutate(&m, &bases);
        let Run::Ran(out) = try_run(program, &input) else {
            return Ok(());
        };
        check_any(&input, &out).map_err(|e| {
            TestCaseError::fail(format!(
                "{e}\n  input ({} bytes):\n{}\n  output (verdict {}):\n{}",
                input.len(),
                hex(&input),
                out.verdict,
                hex(&out.frame)
            ))
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

// ---------------------------------------------------------------------------
// 8. The XDP program of the external interfaces (`kproxy_xdp_external`).
//
// FIB lookups in a test run use the network namespace of the thread that
// issues BPF_PROG_TEST_RUN, and the ingress interface is the
// `ingress_ifindex` of the `xdp_md` passed as ctx_in. Each XDP test builds
// a namespace of its own and runs on a thread inside it:
//
//   xdpin0 198.18.50.1/24 (the node's external interface) <-veth-> xdpin1
//   198.18.60.0/24 via 198.18.50.2 (permanent neighbour): remote backends
//   198.18.61.0/24 via 198.18.50.4 (no neighbour entry)
//   198.18.70.0/24 and 198.18.71.0/24 via 198.18.50.3 (permanent
//   neighbour): clients
//   198.18.90.0/24: no route at all
// ---------------------------------------------------------------------------

// XDP verdicts (enum xdp_action).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The node's address on its external interface (NodePorts live here).
const NODE_IP: [u8; 4] = [198, 18, 50, 1];
const XDPIN0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x01];
const XDPIN1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x11];
/// The next hop towards the remote backends, and its MAC.
const BACKEND_HOP: [u8; 4] = [198, 18, 50, 2];
const BACKEND_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x02];
/// The next hop towards the clients, and its MAC.
const CLIENT_HOP: [u8; 4] = [198, 18, 50, 3];
const CLIENT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x03];
/// The local backend's MAC (behind `xdppod0`).
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x80, 0x02];
/// A next hop without a neighbour entry.
const UNRESOLVED_HOP: [u8; 4] = [198, 18, 50, 4];
const UNRESOLVED_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x50, 0x04];
/// A client outside the LoadBalancer's source range.
const EXT_CLIENT: [u8; 4] = [198, 18, 70, 2];
/// A client inside the LoadBalancer's source range (198.18.71.0/24).
const RANGE_CLIENT: [u8; 4] = [198, 18, 71, 5];
const LB_IP: [u8; 4] = [198, 18, 200, 10];
const REMOTE_BACKEND: Addr = ([198, 18, 60, 2], 8080);
const LB_BACKEND: Addr = ([198, 18, 60, 3], 8080);
const LOCAL_BACKEND: Addr = ([198, 18, 80, 2], 8080);
const UNROUTED_BACKEND: Addr = ([198, 18, 90, 2], 8080);
const UNRESOLVED_BACKEND: Addr = ([198, 18, 61, 2], 8080);
/// TCP and UDP, policy Cluster, one remote backend.
const NP_REMOTE: u16 = 30080;
/// Policy Local, no local endpoint (the cluster has one).
const NP_POLICY_LOCAL: u16 = 30081;
/// One backend on this node, policy Local.
const NP_LOCAL_BACKEND: u16 = 30082;
/// The same backend on this node, policy Cluster.
const NP_LOCAL_CLUSTER: u16 = 30086;
/// One remote backend without a route.
const NP_UNROUTED: u16 = 30083;
/// One remote backend whose next hop has no neighbour entry.
const NP_UNRESOLVED: u16 = 30084;
/// No endpoints anywhere (the tc program behind rejects).
const NP_EMPTY: u16 = 30085;
/// A ClusterIP: internal scope only, not served from outside.
const XDP_CLUSTER_IP: Addr = ([198, 19, 0, 10], 80);
/// Where source-NATed flows take their port (SPEC; independent of the
/// datapath's constants on purpose).
const SNAT_PORTS: RangeInclusive<u16> = 61000..=65535;
/// ClusterIPs programmed as with `--masquerade-all` (their frontends
/// `snat`): one whose backend is on another node, one whose is local.
const MASQ_REMOTE_VIP: Addr = ([198, 19, 0, 20], 80);
const MASQ_LOCAL_VIP: Addr = ([198, 19, 0, 21], 80);
/// A pod of this node (behind `xdppod0`, beside `LOCAL_BACKEND`).
const POD_CLIENT: [u8; 4] = [198, 18, 80, 7];

fn remote_client(port: u16) -> Addr {
    (EXT_CLIENT, port)
}

fn node_port(port: u16) -> Addr {
    (NODE_IP, port)
}

/// The Services the XDP lab is programmed with.
fn xdp_services() -> DesiredState {
    let backend = |(ip, port): Addr, local: bool| Backend {
        ip: IpAddr::V4(Ipv4Addr::from(ip)),
        port,
        terminating: false,
        local,
    };
    let frontend = |name: &str, kind: FrontendKind, backends: Vec<Backend>| {
        Frontend::new(
            ServicePortName {
                namespace: "xdp-fixtures".to_owned(),
                name: name.to_owned(),
                port_name: "p".to_owned(),
            },
            kind,
            backends,
        )
    };
    let mut state = DesiredState::default();
    let mut add = |(ip, port): Addr, protocol: Protocol, frontend: Frontend| {
        let key = FrontendKey {
            ip: IpAddr::V4(Ipv4Addr::from(ip)),
            port,
            protocol,
        };
        state.frontends.insert(key, frontend);
    };
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let mut f = frontend(
            &format!("remote-{}", protocol.as_str().to_lowercase()),
            FrontendKind::NodePort,
            vec![backend(REMOTE_BACKEND, false)],
        );
        f.snat = true;
        add(node_port(NP_REMOTE), protocol, f);
    }

    let mut f = frontend("policy-local", FrontendKind::NodePort, Vec::new());
    f.policy_local = true;
    f.drop_when_empty = true;
    f.snat = false;
    f.cluster_backends = vec![backend(REMOTE_BACKEND, false)];
    add(node_port(NP_POLICY_LOCAL), Protocol::Tcp, f);

    let mut f = frontend(
        "lb",
        FrontendKind::LoadBalancer,
        vec![backend(LB_BACKEND, false)],
    );
    f.snat = true;
    f.source_ranges = vec![(IpAddr::V4(Ipv4Addr::new(198, 18, 71, 0)), 24)];
    add((LB_IP, 80), Protocol::Tcp, f);

    let mut f = frontend(
        "local-backend",
        FrontendKind::NodePort,
        vec![backend(LOCAL_BACKEND, true)],
    );
    f.policy_local = true;
    f.snat = false;
    add(node_port(NP_LOCAL_BACKEND), Protocol::Tcp, f);
    for (name, port, b, local) in [
        ("local-cluster", NP_LOCAL_CLUSTER, LOCAL_BACKEND, true),
        ("unrouted", NP_UNROUTED, UNROUTED_BACKEND, false),
        ("unresolved", NP_UNRESOLVED, UNRESOLVED_BACKEND, false),
    ] {
        let f = frontend(name, FrontendKind::NodePort, vec![backend(b, local)]);
        add(node_port(port), Protocol::Tcp, f);
    }
    add(
        node_port(NP_EMPTY),
        Protocol::Tcp,
        frontend("empty", FrontendKind::NodePort, Vec::new()),
    );
    add(
        XDP_CLUSTER_IP,
        Protocol::Tcp,
        frontend(
            "cluster-ip",
            FrontendKind::ClusterIp,
            vec![backend(REMOTE_BACKEND, false)],
        ),
    );
    for (name, vip, b, local) in [
        ("masq-remote", MASQ_REMOTE_VIP, REMOTE_BACKEND, false),
        ("masq-local", MASQ_LOCAL_VIP, LOCAL_BACKEND, true),
    ] {
        let mut f = frontend(name, FrontendKind::ClusterIp, vec![backend(b, local)]);
        f.snat = true;
        add(vip, Protocol::Tcp, f);
    }
    state
}

static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

/// Runs a command and panics with its output unless it succeeds.
fn must_run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e} (the XDP fixtures need iproute2)"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace of our own, deleted on drop (also while unwinding;
/// the veth pair inside goes with it).
struct XdpNetns {
    name: String,
}

impl XdpNetns {
    fn create() -> Self {
        let n = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
        // The guard exists before the namespace does: a failure half-way
        // through the setup still removes it.
        let netns = Self {
            name: format!("kpx-xdpfix-{}-{n}", std::process::id()),
        };
        must_run(Command::new("ip").args(["netns", "add", &netns.name]));
        netns
    }

    /// `ip -n <this> <args>`.
    fn ip(&self, args: &str) -> String {
        must_run(
            Command::new("ip")
                .args(["-n", &self.name])
                .args(args.split_whitespace()),
        )
    }

    fn setup(&self) {
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let ip = |a: [u8; 4]| addr(a).to_string();
        self.ip("link set lo up");
        self.ip(&format!(
            "link add xdpin0 address {} type veth peer name xdpin1 address {}",
            mac(XDPIN0_MAC),
            mac(XDPIN1_MAC)
        ));
        self.ip(&format!("addr add {}/24 dev xdpin0", ip(NODE_IP)));
        self.ip("link set xdpin0 up");
        self.ip("link set xdpin1 up");
        // After the links exist: this turns forwarding on for each of them
        // (the FIB lookup answers "forwarding disabled" otherwise).
        must_run(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]));
        for (hop, hop_mac) in [(BACKEND_HOP, BACKEND_HOP_MAC), (CLIENT_HOP, CLIENT_HOP_MAC)] {
            self.ip(&format!(
                "neigh add {} lladdr {} dev xdpin0 nud permanent",
                ip(hop),
                mac(hop_mac)
            ));
        }
        for (net, hop) in [
            ("198.18.60.0/24", BACKEND_HOP),
            ("198.18.61.0/24", UNRESOLVED_HOP),
            ("198.18.70.0/24", CLIENT_HOP),
            ("198.18.71.0/24", CLIENT_HOP),
        ] {
            self.ip(&format!("route add {net} via {} dev xdpin0", ip(hop)));
        }
        // This node's pods (LOCAL_BACKEND) behind a veth of their own.
        self.ip("link add xdppod0 type veth peer name xdppod1");
        self.ip("link set xdppod0 up");
        self.ip("link set xdppod1 up");
        self.ip(&format!(
            "route add 198.18.80.0/24 dev xdppod0 src {}",
            ip(NODE_IP)
        ));
        self.ip(&format!(
            "neigh add {} lladdr {} dev xdppod0 nud permanent",
            ip(LOCAL_BACKEND.0),
            mac(POD_MAC)
        ));
    }

    /// The ifindex and MAC of a link in this namespace.
    fn link(&self, dev: &str) -> (u32, [u8; 6]) {
        let line = self.ip(&format!("-o link show dev {dev}"));
        let ifindex = line
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex in {line:?}"));
        let mut words = line.split_whitespace();
        let mac = words
            .by_ref()
            .find(|w| *w == "link/ether")
            .and_then(|_| words.next())
            .unwrap_or_else(|| panic!("no MAC in {line:?}"));
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("a hex MAC byte"))
            .collect();
        (
            ifindex,
            bytes.try_into().expect("a 6-byte Ethernet address"),
        )
    }
}

impl Drop for XdpNetns {
    fn drop(&mut self) {
        // Best effort and never a panic (this also runs while unwinding).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Which of the datapath's programs a test run runs.
#[derive(Clone, Copy, Debug)]
enum Hook {
    Xdp,
    TcExternal,
    TcPod,
}

/// A `struct __sk_buff` context for a test run: zero up to
/// `ingress_ifindex` (offset 36), then `ifindex`, the device the skb
/// arrives on.
fn skb_arriving_on(ingress: u32) -> Vec<u32> {
    [[0; 9].as_slice(), &[ingress, ingress]].concat()
}

struct XdpLab {
    lab: Lab,
    netns: String,
    /// The node's external interface: the ingress of most fixtures.
    in0: u32,
    in0_mac: [u8; 6],
    /// Its veth peer: a second interface of the node.
    in1: u32,
    /// The node's side of the local pod's veth (`xdppod0`).
    pod: u32,
}

/// Builds the namespace, then runs `test` on a thread inside it with a
/// fresh datapath programmed with [`xdp_services`]. The datapath is gone
/// before the namespace is deleted, whatever `test` does.
fn with_xdp_lab(test: impl FnOnce(&mut XdpLab) + Send) {
    require_root_and_btf();
    let netns = XdpNetns::create();
    netns.setup();
    let (in0, in0_mac) = netns.link("xdpin0");
    let (in1, _) = netns.link("xdpin1");
    let (pod, _) = netns.link("xdppod0");
    assert_eq!(in0_mac, XDPIN0_MAC, "xdpin0 has the MAC it was given");
    std::thread::scope(|s| {
        let thread = s.spawn(|| {
            let path = format!("/var/run/netns/{}", netns.name);
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: a valid namespace fd; only this thread moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let mut lab = XdpLab {
                lab: Lab::with_services(&xdp_services()),
                netns: netns.name.clone(),
                in0,
                in0_mac,
                in1,
                pod,
            };
            test(&mut lab);
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

impl XdpLab {
    /// A test run of the XDP program on a frame arriving on `ingress`.
    fn run_on(&mut self, ingress: u32, frame: &[u8]) -> Outcome {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex (must be 0 for a test run).
        let frame_len = u32::try_from(frame.len()).expect("a small frame");
        self.test_run(Hook::Xdp, frame, &[0, frame_len, 0, ingress, 0, 0])
    }

    /// A test run of the external tc program on a frame arriving on
    /// `ingress` (what XDP passed on).
    fn run_tc_on(&mut self, ingress: u32, frame: &[u8]) -> Outcome {
        self.test_run(Hook::TcExternal, frame, &skb_arriving_on(ingress))
    }

    /// A test run of the pod program on a frame a local pod sent, arriving
    /// on its veth (`xdppod0`).
    fn run_from_pod(&mut self, frame: &[u8]) -> Outcome {
        let ingress = self.pod;
        self.test_run(Hook::TcPod, frame, &skb_arriving_on(ingress))
    }

    /// One BPF_PROG_TEST_RUN of the program at `hook` on `frame`, with the
    /// context `ctx` (its 32-bit words).
    fn test_run(&mut self, hook: Hook, frame: &[u8], ctx: &[u32]) -> Outcome {
        let ctx: Vec<u8> = ctx.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        let datapath = &mut self.lab.datapath;
        let result = match hook {
            Hook::TcExternal => datapath.external_tc_program().test_run(options),
            Hook::TcPod => datapath.pod_program().test_run(options),
            Hook::Xdp => datapath.xdp_program().test_run(options),
        };
        let result = result.unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN ({hook:?}) on a {}-byte frame: {e} ({e:?})",
                frame.len()
            )
        });
        out.truncate(result.data_size_out as usize);
        Outcome {
            verdict: result.return_value,
            frame: out,
        }
    }

    /// Opens a flow from the outside client's `client_port` to the
    /// NodePort whose backend is remote (its SYN checked) and returns the
    /// flow's next packet, an ACK with data, and the SNAT port it got.
    fn open_remote_flow(&mut self, client_port: u16) -> (Vec<u8>, u16) {
        let c = remote_client(client_port);
        let syn = from_client(tcp(c, node_port(NP_REMOTE), Tcp::Syn, &[]));
        let out = self.run(&syn);
        let port = self
            .check_new_flow(&syn, &out, XDP_TX, REMOTE_BACKEND)
            .unwrap_or_else(|e| panic!("the SYN: {e}"));
        (
            from_client(tcp(c, node_port(NP_REMOTE), Tcp::Ack, &[0x5a; 64])),
            port,
        )
    }

    /// A frame arriving on xdpin0 whose route leaves by a pod's veth,
    /// where XDP cannot send it: passed on to tc untouched (`xdp_to_tc`),
    /// which translates it, lowers the TTL and redirects it. tc's output.
    fn handed_to_tc_and_redirected(&mut self, frame: &[u8], what: &str) -> Outcome {
        let before = self.stats();
        let out = self.run(frame);
        ok(
            expect_verdict(&out, XDP_PASS).and_then(|()| check_untouched(frame, &out)),
            &format!("XDP hands {what} to tc"),
        );
        assert_eq!(
            grew(&before, &self.stats(), stat::XDP_TO_TC),
            1,
            "xdp_to_tc"
        );
        let in0 = self.in0;
        let out = self.run_tc_on(in0, frame);
        assert_eq!(
            out.verdict, TC_ACT_REDIRECT,
            "{what}: redirected to the pod's veth"
        );
        assert_eq!(out.frame[ETH_LEN + 8], 63, "{what}: forwarded, TTL lowered");
        out
    }

    /// A frame arriving on xdpin0.
    fn run(&mut self, frame: &[u8]) -> Outcome {
        let ingress = self.in0;
        self.run_on(ingress, frame)
    }

    fn pin_dir(&self) -> PathBuf {
        self.lab.datapath.pin_dir().to_owned()
    }

    fn stats(&self) -> Vec<u64> {
        PinnedMaps::open(&self.pin_dir())
            .and_then(|maps| maps.stats())
            .unwrap_or_else(|e| panic!("reading the datapath counters: {e}"))
    }

    /// Whether conntrack holds any entry keyed by `ip:port` as source.
    fn tracks_source(&self, (ip, port): Addr) -> bool {
        let entries = PinnedMaps::open(&self.pin_dir())
            .and_then(|maps| maps.conntrack())
            .unwrap_or_else(|e| panic!("reading conntrack: {e}"));
        let mapped = proxy_common::ipv4_mapped(ip);
        entries
            .iter()
            .any(|(key, _)| key.saddr == mapped && key.sport == port)
    }

    /// The forwarded frame a correct XDP NAT makes of `input`: both sides
    /// rewritten, the TTL lowered by one (the program forwards it, not the
    /// kernel), the Ethernet header set for the next hop out of xdpin0,
    /// everything else as it came in; checksums recomputed from scratch.
    fn forwarded(&self, input: &[u8], src: Addr, dst: Addr, next_hop_mac: [u8; 6]) -> Vec<u8> {
        let mut lowered = input.to_vec();
        lowered[ETH_LEN + 8] -= 1;
        let out = translated(&lowered, Side::Source, src);
        let mut out = translated(&out, Side::Destination, dst);
        out[0..6].copy_from_slice(&next_hop_mac);
        out[6..12].copy_from_slice(&self.in0_mac);
        out
    }

    /// Checks the forward of a new flow from outside to a remote backend
    /// (DNAT, SNAT to the node, sent to the backend's next hop) and
    /// returns the SNAT port it got.
    fn check_new_flow(
        &self,
        input: &[u8],
        out: &Outcome,
        verdict: u32,
        backend: Addr,
    ) -> Result<u16, String> {
        expect_verdict(out, verdict)?;
        let view = Ipv4View::parse(&out.frame).ok_or("the output is not well-formed IPv4")?;
        let (sport, _) = view.ports(&out.frame);
        if !SNAT_PORTS.contains(&sport) {
            return Err(format!(
                "SNAT port {sport} outside {SNAT_PORTS:?}:\n{}",
                hex(&out.frame)
            ));
        }
        let expected = self.forwarded(input, (NODE_IP, sport), backend, BACKEND_HOP_MAC);
        check_frame(&expected, out)?;
        Ok(sport)
    }
}

/// Sets the Ethernet header of a frame arriving on xdpin0 from `from`.
fn arriving(mut frame: Vec<u8>, from: [u8; 6]) -> Vec<u8> {
    frame[0..6].copy_from_slice(&XDPIN0_MAC);
    frame[6..12].copy_from_slice(&from);
    frame
}

fn from_client(frame: Vec<u8>) -> Vec<u8> {
    arriving(frame, CLIENT_HOP_MAC)
}

fn from_backend(frame: Vec<u8>) -> Vec<u8> {
    arriving(frame, BACKEND_HOP_MAC)
}

/// The output is exactly `expected`, with checksums right by our own
/// computation (stated outright, though `expected` has them recomputed).
fn check_frame(expected: &[u8], out: &Outcome) -> Result<(), String> {
    if out.frame != expected {
        return Err(format!("wrong output: {}", diff(expected, &out.frame)));
    }
    verify_ipv4_checksum(&out.frame)?;
    verify_l4_checksum(&out.frame)
}

/// XDP_PASS and the frame byte for byte as it came in.
fn check_untouched(input: &[u8], out: &Outcome) -> Result<(), String> {
    expect_verdict(out, XDP_PASS)?;
    if out.frame != input {
        return Err(format!(
            "a frame that must pass untouched was changed: {}",
            diff(input, &out.frame)
        ));
    }
    Ok(())
}

/// What a counter did between two readings.
fn grew(before: &[u64], after: &[u64], index: u32) -> u64 {
    let i = index as usize;
    after[i] - before[i]
}

/// An ICMP error from `src` to `dst` quoting `quote` (an IPv4 packet).
fn icmp_error(src: [u8; 4], dst: [u8; 4], kind: DestUnreachableHeader, quote: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src, dst, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(kind));
    let mut error = Vec::with_capacity(builder.size(quote.len()));
    builder
        .write(&mut error, quote)
        .expect("building an ICMP error");
    error
}

/// `out` is an ICMP error from `src` to `dst`, one hop on (TTL 63), that
/// quotes a packet `quoted_src` -> `quoted_dst`, with every checksum right.
fn check_icmp_error(
    out: &[u8],
    (src, dst): ([u8; 4], [u8; 4]),
    (quoted_src, quoted_dst): (Addr, Addr),
) -> Result<(), String> {
    let view = Ipv4View::parse(out).ok_or("not IPv4")?;
    if (view.src(out), view.dst(out)) != (src, dst) {
        return Err(format!(
            "the error goes {} -> {}, expected {} -> {}",
            addr(view.src(out)),
            addr(view.dst(out)),
            addr(src),
            addr(dst)
        ));
    }
    if out[ETH_LEN + 8] != 63 {
        return Err(format!("TTL {}, expected 63 (forwarded)", out[ETH_LEN + 8]));
    }
    same_ends(
        "the quote names ",
        icmp_quote(out)?,
        (quoted_src, quoted_dst),
    )
}

/// The (source, destination) that the ICMP error `frame` quotes, once the
/// outer IPv4 header, the ICMP message and the quoted IPv4 header all have
/// right checksums.
fn icmp_quote(frame: &[u8]) -> Result<(Addr, Addr), String> {
    ipv4_sum_ok(frame)?;
    let view = Ipv4View::parse(frame).ok_or("not IPv4")?;
    let icmp = &frame[view.l4..ETH_LEN + view.total];
    if ones_sum(&[icmp]) != 0xffff {
        return Err("ICMP checksum wrong".to_owned());
    }
    let inner = &icmp[8..];
    let ihl = usize::from(inner[0] & 0x0f) * 4;
    if ones_sum(&[&inner[..ihl]]) != 0xffff {
        return Err("quoted IPv4 header checksum wrong".to_owned());
    }
    let port = |at: usize| u16::from_be_bytes([inner[at], inner[at + 1]]);
    Ok((
        (inner[12..16].try_into().unwrap(), port(ihl)),
        (inner[16..20].try_into().unwrap(), port(ihl + 2)),
    ))
}

/// `got` is the (source, destination) pair `want`; else an error that shows both.
fn same_ends(what: &str, got: (Addr, Addr), want: (Addr, Addr)) -> Result<(), String> {
    let show = |(ip, port): Addr| format!("{}:{port}", addr(ip));
    if got == want {
        return Ok(());
    }
    Err(format!(
        "{what}{} -> {}, expected {} -> {}",
        show(got.0),
        show(got.1),
        show(want.0),
        show(want.1)
    ))
}

/// An SCTP association to a NodePort whose backend is remote: XDP rewrites
/// both addresses and both ports (DNAT and SNAT), and the CRC32c follows.
#[test]
fn xdp_sctp_to_a_nodeport_is_nated_with_its_crc() {
    with_xdp_lab(|lab| {
        let c = remote_client(40_800);
        let init = sctp_chunk(1, &[1, 2, 3, 4, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
        let out = lab.run(&from_client(sctp(c, node_port(NP_REMOTE), &init)));
        assert_eq!(out.verdict, XDP_TX, "sent back out to the remote backend");
        let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
        let segment = &out.frame[view.l4..];
        let snat_port = u16::from_be_bytes([segment[0], segment[1]]);
        assert!(SNAT_PORTS.contains(&snat_port), "SNAT port {snat_port}");
        ok(
            check_sctp(&out.frame, (NODE_IP, snat_port), REMOTE_BACKEND),
            "INIT to the NodePort",
        );
        let init_ack = sctp_chunk(2, &[5, 6, 7, 8, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
        let reply = from_backend(sctp(REMOTE_BACKEND, (NODE_IP, snat_port), &init_ack));
        let out = lab.run(&reply);
        assert_eq!(out.verdict, XDP_TX, "sent back out to the client");
        ok(
            check_sctp(&out.frame, node_port(NP_REMOTE), c),
            "INIT-ACK back to the client",
        );
    });
}

/// SPEC 7: ICMP errors about a NATed flow are reverse-NATed, source-NATed
/// flows included: the error reaches the other end in the terms it knows,
/// by the route the flow's packets take.
#[test]
fn icmp_errors_about_a_source_nated_flow_reach_the_other_end() {
    with_xdp_lab(|lab| {
        let c = remote_client(40_700);
        let datagram = from_client(udp(c, node_port(NP_REMOTE), b"query"));
        let out = lab.run(&datagram);
        let snat_port = lab
            .check_new_flow(&datagram, &out, XDP_TX, REMOTE_BACKEND)
            .unwrap_or_else(|e| panic!("the datagram: {e}"));
        let snat = (NODE_IP, snat_port);
        let in0 = lab.in0;

        // The backend's port unreachable about the forwarded datagram
        // (NODE_IP:snat -> backend) goes to the client, from the NodePort,
        // about the datagram the client sent.
        let forwarded = &out.frame[ETH_LEN..];
        let error = from_backend(icmp_error(
            REMOTE_BACKEND.0,
            NODE_IP,
            DestUnreachableHeader::Port,
            forwarded,
        ));
        let out = lab.run(&error);
        assert_eq!(out.verdict, XDP_PASS, "XDP leaves ICMP errors to tc");
        let out = lab.run_tc_on(in0, &error);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed out to the client");
        ok(
            check_icmp_error(&out.frame, (NODE_IP, EXT_CLIENT), (c, node_port(NP_REMOTE))),
            "port unreachable from the backend",
        );

        // A router on the way to the backend: fragmentation needed. Its
        // own address stays the source.
        let router = [198, 18, 60, 254];
        let error = from_backend(icmp_error(
            router,
            NODE_IP,
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            forwarded,
        ));
        let out = lab.run_tc_on(in0, &error);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed out to the client");
        ok(
            check_icmp_error(&out.frame, (router, EXT_CLIENT), (c, node_port(NP_REMOTE))),
            "fragmentation needed from a router",
        );

        // The client's port unreachable about a reply (NodePort -> client)
        // goes to the backend, from the SNAT address, about the reply the
        // backend sent.
        let reply = udp(node_port(NP_REMOTE), c, b"answer");
        let error = from_client(icmp_error(
            EXT_CLIENT,
            NODE_IP,
            DestUnreachableHeader::Port,
            &reply[ETH_LEN..],
        ));
        let out = lab.run_tc_on(in0, &error);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed out to the backend");
        ok(
            check_icmp_error(
                &out.frame,
                (NODE_IP, REMOTE_BACKEND.0),
                (REMOTE_BACKEND, snat),
            ),
            "port unreachable from the client",
        );
    });
}

/// `frame` goes to `backend` from the node's address and a port of the
/// SNAT range, which this returns.
fn source_nated_to(frame: &[u8], backend: Addr) -> u16 {
    let view = Ipv4View::parse(frame).expect("IPv4 out");
    assert_eq!(destination(frame), backend, "DNAT to the backend");
    assert_eq!(
        addr(view.src(frame)),
        addr(NODE_IP),
        "SNAT to the route's source address"
    );
    let (sport, _) = view.ports(frame);
    assert!(SNAT_PORTS.contains(&sport), "SNAT port {sport}");
    sport
}

#[test]
fn xdp_nodeport_is_dnated_source_nated_and_sent_back_out() {
    with_xdp_lab(|lab| {
        let before = lab.stats();
        let syn = from_client(tcp(
            remote_client(40000),
            node_port(NP_REMOTE),
            Tcp::Syn,
            &[],
        ));
        let out = lab.run(&syn);

        // Field by field first, for a readable failure.
        assert_eq!(
            out.verdict,
            XDP_TX,
            "SYN {}:40000 -> {}:{NP_REMOTE} arriving on xdpin0, backend behind xdpin0: \
             verdict {} (expected XDP_TX), output:\n{}",
            addr(EXT_CLIENT),
            addr(NODE_IP),
            out.verdict,
            hex(&out.frame)
        );
        source_nated_to(&out.frame, REMOTE_BACKEND);
        assert_eq!(
            out.frame[0..6],
            BACKEND_HOP_MAC,
            "Ethernet destination: the backend's next hop"
        );
        assert_eq!(
            out.frame[6..12],
            lab.in0_mac,
            "Ethernet source: the egress interface"
        );
        ok(verify_ipv4_checksum(&out.frame), "IPv4 checksum after NAT");
        ok(verify_l4_checksum(&out.frame), "TCP checksum after NAT");
        // Then the whole frame.
        let first_port = lab
            .check_new_flow(&syn, &out, XDP_TX, REMOTE_BACKEND)
            .unwrap_or_else(|e| panic!("TCP SYN: {e}"));

        let after = lab.stats();
        for (index, name) in [
            (stat::SNAT, "snat"),
            (stat::XDP_FORWARD, "xdp_forward"),
            (stat::CT_CREATED, "ct_created"),
        ] {
            assert_eq!(grew(&before, &after, index), 1, "counter {name}");
        }
        // XDP counts the frame it forwarded for the NodePort.
        assert_eq!(
            frontend_stats(
                &lab.pin_dir(),
                (NODE_IP, NP_REMOTE),
                proxy_common::PROTO_TCP
            ),
            (1, syn.len() as u64)
        );

        // UDP, with and without a checksum.
        let dgram = from_client(udp(
            remote_client(40001),
            node_port(NP_REMOTE),
            b"an external datagram",
        ));
        let out = lab.run(&dgram);
        ok(
            lab.check_new_flow(&dgram, &out, XDP_TX, REMOTE_BACKEND)
                .map(|_| ()),
            "UDP with a checksum",
        );
        let no_checksum = from_client(with_udp_checksum(
            udp(remote_client(40002), node_port(NP_REMOTE), b"no checksum"),
            0,
        ));
        let out = lab.run(&no_checksum);
        ok(
            lab.check_new_flow(&no_checksum, &out, XDP_TX, REMOTE_BACKEND)
                .map(|_| ()),
            "UDP without a checksum",
        );
        let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
        assert_eq!(
            view.udp_checksum(&out.frame),
            0,
            "no UDP checksum stays none"
        );

        // Arriving on another interface than the one towards the backend:
        // XDP only sends frames back out where they came in (XDP_TX); this
        // one goes on untouched to tc, which redirects it with its
        // neighbour resolved, and nothing is recorded at XDP.
        let syn = from_client(tcp(
            remote_client(40003),
            node_port(NP_REMOTE),
            Tcp::Syn,
            b"SYN with data",
        ));
        let before = lab.stats();
        let ingress = lab.in1;
        let out = lab.run_on(ingress, &syn);
        ok(expect_verdict(&out, XDP_PASS), "SYN arriving on xdpin1");
        assert_eq!(out.frame, syn, "handed to tc byte-identical");
        assert_eq!(
            grew(&before, &lab.stats(), stat::XDP_TO_TC),
            1,
            "counter xdp_to_tc"
        );
        assert!(
            !lab.tracks_source(remote_client(40003)),
            "no flow recorded at XDP"
        );

        // A second flow to the same backend gets its own SNAT port.
        let syn = from_client(tcp(
            remote_client(40005),
            node_port(NP_REMOTE),
            Tcp::Syn,
            &[],
        ));
        let out = lab.run(&syn);
        let second_port = lab
            .check_new_flow(&syn, &out, XDP_TX, REMOTE_BACKEND)
            .unwrap_or_else(|e| panic!("a second SYN: {e}"));
        assert_ne!(
            first_port, second_port,
            "two flows to one backend share the SNAT port {first_port}: replies cannot be told apart"
        );

        // Only a SYN opens a TCP flow.
        let before = lab.stats();
        let ack = from_client(tcp(
            remote_client(40004),
            node_port(NP_REMOTE),
            Tcp::Ack,
            &[0xa5; 100],
        ));
        let out = lab.run(&ack);
        ok(expect_verdict(&out, XDP_DROP), "untracked mid-stream ACK");
        assert_eq!(
            grew(&before, &lab.stats(), stat::INVALID),
            1,
            "counter invalid"
        );
    });
}

/// The routes XDP forwards by come from a per-CPU cache of FIB answers:
/// an established flow's packets do not each pay a FIB lookup, and a
/// neighbour change still reaches them within the cache's lifetime.
#[test]
fn xdp_routes_come_from_a_cache_that_follows_neighbour_changes() {
    with_xdp_lab(|lab| {
        let (ack, port) = lab.open_remote_flow(42000);
        let went_to = |lab: &XdpLab, out: &Outcome, hop_mac: [u8; 6]| {
            let expected = lab.forwarded(&ack, (NODE_IP, port), REMOTE_BACKEND, hop_mac);
            expect_verdict(out, XDP_TX).and_then(|()| check_frame(&expected, out))
        };
        let forwarded_to = |lab: &mut XdpLab, hop_mac: [u8; 6]| {
            let out = lab.run(&ack);
            went_to(lab, &out, hop_mac)
        };

        // Each CPU looks the route up once per ROUTE_CACHE_TTL_NS; without
        // the cache every packet would.
        const PACKETS: u64 = 50;
        let before = lab.stats();
        for i in 0..PACKETS {
            ok(
                forwarded_to(lab, BACKEND_HOP_MAC),
                &format!("established packet {i}"),
            );
        }
        let lookups = grew(&before, &lab.stats(), stat::FIB_LOOKUP);
        assert!(
            lookups < PACKETS / 2,
            "{lookups} FIB lookups for {PACKETS} packets of one flow: the route cache is not used"
        );

        // The next hop moves to another MAC: within the cache's lifetime
        // the flow follows, and meanwhile every frame goes to one of the two.
        const MOVED_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        must_run(Command::new("ip").args([
            "-n",
            &lab.netns,
            "neigh",
            "replace",
            &addr(BACKEND_HOP).to_string(),
            "lladdr",
            &mac(MOVED_MAC),
            "dev",
            "xdpin0",
            "nud",
            "permanent",
        ]));
        let ttl = std::time::Duration::from_nanos(proxy_common::ROUTE_CACHE_TTL_NS);
        let deadline = std::time::Instant::now() + ttl * 20;
        loop {
            // One frame per round, checked against both: the cache may
            // expire between any two frames.
            let out = lab.run(&ack);
            if went_to(lab, &out, MOVED_MAC).is_ok() {
                break;
            }
            ok(
                went_to(lab, &out, BACKEND_HOP_MAC),
                "a frame while the cache still holds the old neighbour",
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the flow still goes to the old MAC {:?} after the neighbour changed",
                ttl * 20
            );
            std::thread::sleep(ttl / 10);
        }
    });
}

/// XDP and tc ask the route cache about the same flows (XDP hands tc a
/// flow whose route leaves by another interface), but not the same
/// question: tc leaves the neighbour to `bpf_redirect_neigh`. Each keeps
/// its own slot; sharing one, they would evict each other and every packet
/// would pay a FIB lookup at both hooks.
#[test]
fn xdp_and_tc_keep_their_own_route_cache_slots() {
    with_xdp_lab(|lab| {
        let (ack, port) = lab.open_remote_flow(42100);
        let expected = lab.forwarded(&ack, (NODE_IP, port), REMOTE_BACKEND, BACKEND_HOP_MAC);
        // tc leaves the Ethernet header to bpf_redirect_neigh.
        let mut expected_tc = expected.clone();
        expected_tc[..12].copy_from_slice(&ack[..12]);

        const PACKETS: u64 = 50;
        let before = lab.stats();
        let in0 = lab.in0;
        for i in 0..PACKETS {
            let out = lab.run(&ack);
            ok(
                expect_verdict(&out, XDP_TX).and_then(|()| check_frame(&expected, &out)),
                &format!("packet {i} at XDP"),
            );
            let out = lab.run_tc_on(in0, &ack);
            ok(
                expect_verdict(&out, TC_ACT_REDIRECT)
                    .and_then(|()| check_frame(&expected_tc, &out)),
                &format!("packet {i} at tc"),
            );
        }
        let lookups = grew(&before, &lab.stats(), stat::FIB_LOOKUP);
        assert!(
            lookups < PACKETS / 2,
            "{lookups} FIB lookups for {PACKETS} packets of one flow at each of XDP and tc: \
             the two hooks evict each other's route cache slot"
        );
    });
}

/// With most SNAT ports to one backend taken, a new flow still finds a
/// free one: the search tries enough random ports, checking each with a
/// lookup before it inserts.
#[test]
fn xdp_snat_finds_a_free_port_when_most_are_taken() {
    with_xdp_lab(|lab| {
        let ports = usize::from(SNAT_PORTS.end() - SNAT_PORTS.start()) + 1;
        let taken = ports * 85 / 100;
        let mut client_port = 10_000u16;
        let mut open = |lab: &mut XdpLab| {
            client_port += 1;
            let syn = from_client(tcp(
                remote_client(client_port),
                node_port(NP_REMOTE),
                Tcp::Syn,
                &[],
            ));
            lab.run(&syn).verdict == XDP_TX
        };
        let mut opened = 0;
        let mut tries = 0;
        while opened < taken {
            tries += 1;
            assert!(
                tries < 3 * taken,
                "only {opened} of {ports} SNAT ports taken after {tries} flows"
            );
            opened += usize::from(open(lab));
        }
        let before = lab.stats();
        let more = 100;
        let refused = (0..more).filter(|_| !open(lab)).count();
        let exhausted = grew(&before, &lab.stats(), stat::SNAT_PORTS_EXHAUSTED);
        assert_eq!(
            (refused, exhausted),
            (0, 0),
            "with {taken} of {ports} SNAT ports taken, {refused} of {more} new flows were refused"
        );
    });
}

#[test]
fn xdp_replies_are_reverse_nated_and_flows_keep_their_snat_port() {
    with_xdp_lab(|lab| {
        let c = remote_client(41000);
        let frontend = node_port(NP_REMOTE);
        let syn = from_client(tcp(c, frontend, Tcp::Syn, &[]));
        let out = lab.run(&syn);
        let port = lab
            .check_new_flow(&syn, &out, XDP_TX, REMOTE_BACKEND)
            .unwrap_or_else(|e| panic!("SYN: {e}"));
        let snat = (NODE_IP, port);

        let before = lab.stats();
        let syn_ack = from_backend(tcp(REMOTE_BACKEND, snat, Tcp::SynAck, &[]));
        let out = lab.run(&syn_ack);
        assert_eq!(
            out.verdict,
            XDP_TX,
            "SYN-ACK {}:{} -> {}:{port}: verdict {}, output:\n{}",
            addr(REMOTE_BACKEND.0),
            REMOTE_BACKEND.1,
            addr(NODE_IP),
            out.verdict,
            hex(&out.frame)
        );
        assert_eq!(destination(&out.frame), c, "reply goes back to the client");
        assert_eq!(
            out.frame[0..6],
            CLIENT_HOP_MAC,
            "Ethernet destination: the client's next hop"
        );
        let expected = lab.forwarded(&syn_ack, frontend, c, CLIENT_HOP_MAC);
        ok(check_frame(&expected, &out), "SYN-ACK");
        assert_eq!(
            grew(&before, &lab.stats(), stat::REV_NAT),
            1,
            "counter rev_nat"
        );

        // The client's next segments take the same backend and SNAT port.
        let request = from_client(tcp(
            c,
            frontend,
            Tcp::Ack,
            b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
        ));
        let out = lab.run(&request);
        ok(expect_verdict(&out, XDP_TX), "ACK with data");
        let expected = lab.forwarded(&request, snat, REMOTE_BACKEND, BACKEND_HOP_MAC);
        ok(check_frame(&expected, &out), "ACK with data");

        let response = from_backend(tcp(REMOTE_BACKEND, snat, Tcp::Ack, &[0x5a; 700]));
        let out = lab.run(&response);
        ok(expect_verdict(&out, XDP_TX), "response");
        let expected = lab.forwarded(&response, frontend, c, CLIENT_HOP_MAC);
        ok(check_frame(&expected, &out), "response");

        let retransmitted = from_client(tcp(c, frontend, Tcp::Syn, &[]));
        let out = lab.run(&retransmitted);
        let expected = lab.forwarded(&retransmitted, snat, REMOTE_BACKEND, BACKEND_HOP_MAC);
        ok(
            expect_verdict(&out, XDP_TX).and_then(|()| check_frame(&expected, &out)),
            "retransmitted SYN keeps its SNAT port",
        );

        // UDP replies.
        let uc = remote_client(41001);
        let query = from_client(udp(uc, frontend, b"query"));
        let out = lab.run(&query);
        let uport = lab
            .check_new_flow(&query, &out, XDP_TX, REMOTE_BACKEND)
            .unwrap_or_else(|e| panic!("UDP query: {e}"));
        let answer = from_backend(udp(REMOTE_BACKEND, (NODE_IP, uport), b"answer"));
        let out = lab.run(&answer);
        let expected = lab.forwarded(&answer, frontend, uc, CLIENT_HOP_MAC);
        ok(
            expect_verdict(&out, XDP_TX).and_then(|()| check_frame(&expected, &out)),
            "UDP reply",
        );

        // A SNAT port no flow holds: not ours to translate.
        let stray_port = if port == *SNAT_PORTS.start() {
            port + 1
        } else {
            port - 1
        };
        let stray = from_backend(tcp(REMOTE_BACKEND, (NODE_IP, stray_port), Tcp::SynAck, &[]));
        ok(
            check_untouched(&stray, &lab.run(&stray)),
            "backend -> a SNAT port no flow holds",
        );
    });
}

#[test]
fn xdp_without_endpoints_drops_for_policy_local_and_passes_otherwise() {
    with_xdp_lab(|lab| {
        let before = lab.stats();
        let syn = from_client(tcp(
            remote_client(42000),
            node_port(NP_POLICY_LOCAL),
            Tcp::Syn,
            &[],
        ));
        let out = lab.run(&syn);
        ok(
            expect_verdict(&out, XDP_DROP),
            "SYN to a policy-Local NodePort without a local endpoint",
        );
        let after = lab.stats();
        assert_eq!(
            grew(&before, &after, stat::DROP_NO_LOCAL_ENDPOINTS),
            1,
            "counter drop_no_local_endpoints"
        );

        // No endpoint anywhere: the tc program behind builds the reject.
        let syn = from_client(tcp(
            remote_client(42001),
            node_port(NP_EMPTY),
            Tcp::Syn,
            &[],
        ));
        ok(
            check_untouched(&syn, &lab.run(&syn)),
            "SYN to a NodePort without endpoints",
        );
        assert_eq!(
            grew(&after, &lab.stats(), stat::DROP_NO_LOCAL_ENDPOINTS),
            0,
            "a Service without endpoints anywhere is not dropped"
        );
    });
}

#[test]
fn xdp_load_balancer_source_ranges() {
    with_xdp_lab(|lab| {
        let before = lab.stats();
        let outside = from_client(tcp((EXT_CLIENT, 43000), (LB_IP, 80), Tcp::Syn, &[]));
        let out = lab.run(&outside);
        ok(
            expect_verdict(&out, XDP_DROP),
            "SYN from outside loadBalancerSourceRanges",
        );
        let after = lab.stats();
        assert_eq!(
            grew(&before, &after, stat::DROP_SOURCE_RANGE),
            1,
            "counter drop_source_range"
        );
        assert!(
            !lab.tracks_source((EXT_CLIENT, 43000)),
            "a dropped SYN opened a flow"
        );

        let c = (RANGE_CLIENT, 43001);
        let inside = from_client(tcp(c, (LB_IP, 80), Tcp::Syn, &[]));
        let out = lab.run(&inside);
        let port = lab
            .check_new_flow(&inside, &out, XDP_TX, LB_BACKEND)
            .unwrap_or_else(|e| panic!("SYN from inside the source range: {e}"));
        let after_inside = lab.stats();
        assert_eq!(
            grew(&after, &after_inside, stat::DROP_SOURCE_RANGE),
            0,
            "counter drop_source_range"
        );
        assert_eq!(grew(&after, &after_inside, stat::SNAT), 1, "counter snat");

        // The reply comes from the LoadBalancer IP, not the node.
        let syn_ack = from_backend(tcp(LB_BACKEND, (NODE_IP, port), Tcp::SynAck, &[]));
        let out = lab.run(&syn_ack);
        let expected = lab.forwarded(&syn_ack, (LB_IP, 80), c, CLIENT_HOP_MAC);
        ok(
            expect_verdict(&out, XDP_TX).and_then(|()| check_frame(&expected, &out)),
            "SYN-ACK to the client inside the source range",
        );
    });
}

/// Policy Local: the client's address is kept (DNAT only, the reply passes
/// this node anyway), and XDP hands the packet to the stack.
#[test]
fn xdp_local_backend_is_only_dnated() {
    with_xdp_lab(|lab| {
        let before = lab.stats();
        let syn = from_client(tcp(
            remote_client(44000),
            node_port(NP_LOCAL_BACKEND),
            Tcp::Syn,
            b"hello",
        ));
        let out = lab.run(&syn);
        let expected = translated(&syn, Side::Destination, LOCAL_BACKEND);
        ok(
            expect_verdict(&out, XDP_PASS).and_then(|()| check_frame(&expected, &out)),
            "SYN to a NodePort with a local backend",
        );
        let after = lab.stats();
        assert_eq!(grew(&before, &after, stat::SNAT), 0, "counter snat");
        assert_eq!(
            grew(&before, &after, stat::XDP_FORWARD),
            0,
            "counter xdp_forward"
        );
    });
}

/// SPEC 5: external traffic with policy Cluster is source-NATed to the
/// node whatever its backend, a local one too, as kube-proxy masquerades
/// it. XDP cannot send a frame into a pod's veth: it hands it to tc, which
/// rewrites both sides and redirects it there. The pod's reply is
/// translated back to NodePort -> client at the pod hook and handed to the
/// stack (which takes the node's own address as a source from a pod
/// interface: kproxy sets `accept_local` on each).
#[test]
fn xdp_local_backend_with_policy_cluster_is_source_nated() {
    with_xdp_lab(|lab| {
        let c = remote_client(44_100);
        let syn = from_client(tcp(c, node_port(NP_LOCAL_CLUSTER), Tcp::Syn, &[]));
        let out = lab.handed_to_tc_and_redirected(&syn, "the SYN");
        let snat_port = source_nated_to(&out.frame, LOCAL_BACKEND);
        ok(verify_ipv4_checksum(&out.frame), "IPv4 checksum after NAT");
        ok(verify_l4_checksum(&out.frame), "TCP checksum after NAT");

        let syn_ack = tcp(LOCAL_BACKEND, (NODE_IP, snat_port), Tcp::SynAck, &[]);
        let out = lab.run_from_pod(&syn_ack);
        assert_eq!(out.verdict, TC_ACT_OK, "translated and handed to the stack");
        let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
        assert_eq!(
            (addr(view.src(&out.frame)), view.ports(&out.frame).0),
            (addr(NODE_IP), NP_LOCAL_CLUSTER),
            "from the NodePort"
        );
        assert_eq!(destination(&out.frame), c, "to the client");
        ok(verify_l4_checksum(&out.frame), "TCP checksum of the reply");
    });
}

#[test]
fn xdp_cluster_ip_from_outside_is_source_nated() {
    // SPEC 5: an off-cluster source reaching a ClusterIP (a router sends
    // the Service range to this node) is served and source-NATed, so the
    // backend's reply comes back through this node.
    with_xdp_lab(|lab| {
        let syn = from_client(tcp(remote_client(45000), XDP_CLUSTER_IP, Tcp::Syn, &[]));
        let out = lab.run(&syn);
        lab.check_new_flow(&syn, &out, XDP_TX, REMOTE_BACKEND)
            .unwrap_or_else(|e| panic!("SYN from outside to a ClusterIP: {e}"));
        // Another port of the ClusterIP is rejected (by tc, behind XDP).
        let other = from_client(tcp(
            remote_client(45001),
            (XDP_CLUSTER_IP.0, 81),
            Tcp::Syn,
            &[],
        ));
        let out = lab.run(&other);
        ok(
            expect_verdict(&out, XDP_PASS),
            "unknown port of a ClusterIP",
        );
        assert_eq!(out.frame, other, "handed to tc byte-identical");
    });
}

/// SPEC 5, `--masquerade-all`: a pod's flow to a ClusterIP is source-NATed
/// to this node's address (the route's source towards the backend), to a
/// backend on another node and to one on this node alike, and the
/// backend's reply, to that address, is translated back to the pod. The
/// same pod's flow to a ClusterIP without the flag keeps its address.
#[test]
fn masquerade_all_source_nates_pods_flows_to_cluster_ips() {
    with_xdp_lab(|lab| {
        let syn = tcp((POD_CLIENT, 40_100), XDP_CLUSTER_IP, Tcp::Syn, &[]);
        let out = lab.run_from_pod(&syn);
        assert_eq!(out.verdict, TC_ACT_OK);
        let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
        assert_eq!(destination(&out.frame), REMOTE_BACKEND, "DNAT");
        assert_eq!(
            addr(view.src(&out.frame)),
            addr(POD_CLIENT),
            "without the flag the backend sees the pod"
        );

        for (client_port, vip, backend) in [
            (40_101, MASQ_REMOTE_VIP, REMOTE_BACKEND),
            (40_102, MASQ_LOCAL_VIP, LOCAL_BACKEND),
        ] {
            let pod = (POD_CLIENT, client_port);
            let syn = tcp(pod, vip, Tcp::Syn, &[]);
            let out = lab.run_from_pod(&syn);
            assert_eq!(out.verdict, TC_ACT_OK, "{vip:?}: handed to the stack");
            let snat_port = source_nated_to(&out.frame, backend);
            assert_eq!(out.frame[ETH_LEN + 8], 64, "the stack forwards it");
            ok(verify_ipv4_checksum(&out.frame), "IPv4 checksum after NAT");
            ok(verify_l4_checksum(&out.frame), "TCP checksum after NAT");

            let syn_ack = tcp(backend, (NODE_IP, snat_port), Tcp::SynAck, &[]);
            let out = if backend == REMOTE_BACKEND {
                // From the other node, on the external interface: XDP
                // cannot send it into the pod's veth and leaves it to tc.
                lab.handed_to_tc_and_redirected(&from_backend(syn_ack), "the reply")
            } else {
                let out = lab.run_from_pod(&syn_ack);
                assert_eq!(out.verdict, TC_ACT_OK, "translated and handed to the stack");
                out
            };
            let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
            assert_eq!(
                (addr(view.src(&out.frame)), view.ports(&out.frame).0),
                (addr(vip.0), vip.1),
                "the reply comes from the ClusterIP"
            );
            assert_eq!(destination(&out.frame), pod, "to the pod");
            ok(
                verify_ipv4_checksum(&out.frame),
                "IPv4 checksum of the reply",
            );
            ok(verify_l4_checksum(&out.frame), "TCP checksum of the reply");
        }
    });
}

#[test]
fn xdp_backend_without_route_or_neighbour_passes_untouched() {
    with_xdp_lab(|lab| {
        for (port, client_port, what) in [
            (NP_UNROUTED, 45000, "no route to the backend"),
            (NP_UNRESOLVED, 45001, "no neighbour entry for the next hop"),
        ] {
            let before = lab.stats();
            let syn = from_client(tcp(
                remote_client(client_port),
                node_port(port),
                Tcp::Syn,
                &[],
            ));
            ok(check_untouched(&syn, &lab.run(&syn)), what);
            let after = lab.stats();
            assert_eq!(
                grew(&before, &after, stat::XDP_TO_TC),
                1,
                "{what}: counter xdp_to_tc"
            );
            assert_eq!(grew(&before, &after, stat::SNAT), 0, "{what}: counter snat");
            assert!(
                !lab.tracks_source(remote_client(client_port)),
                "{what}: the SYN passed on to tc opened a flow"
            );
        }

        // Once the next hop is resolved, the same SYN is forwarded.
        must_run(
            Command::new("ip").args([
                "-n",
                &lab.netns,
                "neigh",
                "add",
                &addr(UNRESOLVED_HOP).to_string(),
                "lladdr",
                &UNRESOLVED_HOP_MAC
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
                "dev",
                "xdpin0",
                "nud",
                "permanent",
            ]),
        );
        let syn = from_client(tcp(
            remote_client(45001),
            node_port(NP_UNRESOLVED),
            Tcp::Syn,
            &[],
        ));
        let out = lab.run(&syn);
        let result = expect_verdict(&out, XDP_TX).and_then(|()| {
            let view = Ipv4View::parse(&out.frame).ok_or("not IPv4")?;
            let port = view.ports(&out.frame).0;
            let expected = lab.forwarded(
                &syn,
                (NODE_IP, port),
                UNRESOLVED_BACKEND,
                UNRESOLVED_HOP_MAC,
            );
            if !SNAT_PORTS.contains(&port) {
                return Err(format!("SNAT port {port}"));
            }
            check_frame(&expected, &out)
        });
        ok(result, "the SYN once the next hop has a neighbour entry");
    });
}

#[test]
fn xdp_non_service_traffic_passes_byte_identical() {
    with_xdp_lab(|lab| {
        let cases = [
            (
                "TCP SYN to the node's port 22",
                tcp(remote_client(46000), node_port(22), Tcp::Syn, &[]),
            ),
            (
                "TCP data to the node's port 22",
                tcp(remote_client(46000), node_port(22), Tcp::Ack, b"ssh"),
            ),
            (
                "UDP to the node's port 53",
                udp(remote_client(46001), node_port(53), b"query"),
            ),
            (
                "TCP SYN to a node port no Service has",
                tcp(remote_client(46002), node_port(30099), Tcp::Syn, &[]),
            ),
            (
                "UDP to a TCP-only NodePort",
                udp(remote_client(46003), node_port(NP_LOCAL_BACKEND), b"q"),
            ),
            (
                "TCP SYN to the LoadBalancer IP on another port",
                tcp((RANGE_CLIENT, 46005), (LB_IP, 443), Tcp::Syn, &[]),
            ),
            (
                "a backend's TCP segment to a node port below the SNAT range",
                tcp(REMOTE_BACKEND, node_port(40000), Tcp::Ack, b"x"),
            ),
            ("ICMP echo to the node", icmp_echo(NODE_IP)),
            ("ICMP echo to the LoadBalancer IP", icmp_echo(LB_IP)),
            ("ARP who-has the node", arp_request(NODE_IP)),
            ("IPv6 UDP to port 53", ipv6_udp(53)),
            ("IPv6 TCP SYN to port 80", ipv6_tcp_syn(80)),
        ];
        let failures: Vec<String> = cases
            .into_iter()
            .filter_map(|(name, frame)| {
                let frame = from_client(frame);
                check_untouched(&frame, &lab.run(&frame))
                    .err()
                    .map(|why| format!("- {name}: {why}"))
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{} fixtures failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    });
}

// ---------------------------------------------------------------------------
// Known datapath bugs and SPEC gaps. Each test is a fixture that fails
// today; it is ignored (with the reason) so the suite stays usable. Run
// them with `cargo test -p proxy-userspace --test packet_fixtures --
// --ignored`, and drop the `ignore` once the datapath is fixed.
// ---------------------------------------------------------------------------

#[test]
fn tcp_data_offset_beyond_the_segment_passes_untouched() {
    let mut lab = Lab::new();
    let mut cases = Vec::new();
    for doff in [6u8, 15] {
        // A 20-byte TCP header whose data offset claims 24 or 60 bytes: the
        // header is cut short, as the malformed fixtures above.
        let mut f = tcp(client(48000 + u16::from(doff)), (VIP, 80), Tcp::Ack, &[]);
        f[ETH_LEN + 20 + 12] = doff << 4;
        cases.push(fixture(
            format!("TCP data offset {doff} in a 20-byte segment"),
            f,
            Expect::Untouched,
        ));
    }
    run_fixtures(&mut lab, &cases);
}

/// Splits an IPv4 frame into two fragments, the first carrying
/// `first_len` bytes (a multiple of 8) of the IP payload.
fn fragments(frame: &[u8], first_len: usize) -> (Vec<u8>, Vec<u8>) {
    let view = Ipv4View::parse(frame).expect("an IPv4 frame");
    let payload = &frame[view.l4..ETH_LEN + view.total];
    let make = |part: &[u8], offset: usize, more: bool| {
        let mut f = frame[..view.l4].to_vec();
        f.extend_from_slice(part);
        set_u16(&mut f, ETH_LEN + 2, (view.ihl + part.len()) as u16);
        let flags = if more { 0x2000 } else { 0 };
        set_u16(&mut f, ETH_LEN + 6, flags | (offset / 8) as u16);
        fix_ip_checksum(&mut f);
        f
    };
    (
        make(&payload[..first_len], 0, true),
        make(&payload[first_len..], first_len, false),
    )
}

#[test]

fn fragmented_udp_datagram_reaches_the_backend() {
    let mut lab = Lab::new();
    let payload: Vec<u8> = (0..1992u32).map(|i| (i % 251) as u8).collect();
    let datagram = udp(client(48100), (VIP, 53), &payload);
    let (first, second) = fragments(&datagram, 1480);
    let expected = translated(&datagram, Side::Destination, DNS_BACKEND);
    let (first_expected, second_expected) = fragments(&expected, 1480);
    let mut failures = Vec::new();
    for (what, input, expected) in [
        ("first fragment", &first, &first_expected),
        ("second fragment", &second, &second_expected),
    ] {
        let out = lab.run(input);
        if out.verdict != TC_ACT_OK || out.frame != *expected {
            failures.push(format!(
                "{what} of a 2000-byte datagram to {}:53 (verdict {}): {}",
                addr(VIP),
                out.verdict,
                diff(expected, &out.frame)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]

fn icmp_port_unreachable_from_a_backend_is_reverse_nated() {
    let mut lab = Lab::new();
    let c = client(48200);
    let query = udp(c, (VIP, 53), b"query");
    let out = lab.run(&query);
    ok(
        check(
            &fixture("query", query.clone(), Expect::Dnat(DNS_BACKEND)),
            &out,
        ),
        "the query",
    );
    // The backend's stack answers the translated datagram with an ICMP
    // port unreachable quoting it.
    let forwarded = translated(&query, Side::Destination, DNS_BACKEND);
    let quote = &forwarded[ETH_LEN..];
    let builder = PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv4(DNS_BACKEND.0, CLIENT_IP, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ));
    let mut error = Vec::with_capacity(builder.size(quote.len()));
    builder
        .write(&mut error, quote)
        .expect("building an ICMP error");

    let out = lab.run(&error);
    let result = (|| -> Result<(), String> {
        expect_verdict(&out, TC_ACT_OK)?;
        let frame = &out.frame;
        let view = Ipv4View::parse(frame).ok_or("not IPv4")?;
        if view.src(frame) != VIP || view.dst(frame) != CLIENT_IP {
            return Err(format!(
                "ICMP error goes {} -> {}, expected {} -> {}",
                addr(view.src(frame)),
                addr(view.dst(frame)),
                addr(VIP),
                addr(CLIENT_IP)
            ));
        }
        same_ends(
            "the quote (the client's own datagram) names ",
            icmp_quote(frame)?,
            (c, (VIP, 53)),
        )
    })();
    ok(result, "ICMP port unreachable from the backend");
}

#[test]
fn icmp_error_from_the_client_about_a_reply_goes_to_the_backend() {
    let mut lab = Lab::new();
    let c = client(48300);
    let query = udp(c, (VIP, 53), b"query");
    ok(
        check(
            &fixture("query", query.clone(), Expect::Dnat(DNS_BACKEND)),
            &lab.run(&query),
        ),
        "the query",
    );
    // The reply, translated back to VIP:53 -> client, hits a closed port:
    // the client's stack answers with a port unreachable to the VIP.
    let reply = udp(DNS_BACKEND, c, b"answer");
    let translated_reply = translated(&reply, Side::Source, (VIP, 53));
    let quote = &translated_reply[ETH_LEN..];
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(CLIENT_IP, VIP, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ));
    let mut error = Vec::with_capacity(builder.size(quote.len()));
    builder
        .write(&mut error, quote)
        .expect("building an ICMP error");

    let out = lab.run(&error);
    let result = (|| -> Result<(), String> {
        expect_verdict(&out, TC_ACT_OK)?;
        let frame = &out.frame;
        let view = Ipv4View::parse(frame).ok_or("not IPv4")?;
        if view.src(frame) != CLIENT_IP || view.dst(frame) != DNS_BACKEND.0 {
            return Err(format!(
                "ICMP error goes {} -> {}, expected the client -> the backend",
                addr(view.src(frame)),
                addr(view.dst(frame))
            ));
        }
        let (quoted_src, _) = icmp_quote(frame)?;
        if quoted_src != DNS_BACKEND {
            return Err(format!(
                "the quote comes from {}:{}, expected the backend's own address",
                addr(quoted_src.0),
                quoted_src.1
            ));
        }
        Ok(())
    })();
    ok(result, "ICMP port unreachable from the client");
}

#[test]
fn hairpin_connection_is_source_nated() {
    let mut lab = Lab::new();
    let syn = tcp((HAIRPIN_POD.0, 40000), (VIP_HAIRPIN, 80), Tcp::Syn, &[]);
    let out = lab.run(&syn);
    assert_eq!(out.verdict, TC_ACT_OK);
    let view = Ipv4View::parse(&out.frame).expect("IPv4 out");
    assert_eq!(
        destination(&out.frame),
        HAIRPIN_POD,
        "DNAT to the pod itself"
    );
    ok(verify_ipv4_checksum(&out.frame), "IPv4 checksum");
    ok(verify_l4_checksum(&out.frame), "TCP checksum");
    assert_ne!(
        addr(view.src(&out.frame)),
        addr(HAIRPIN_POD.0),
        "a hairpin connection must be SNATed, or the pod answers itself directly \
         from {}:{} and the client socket (connected to {}:80) drops the reply",
        addr(HAIRPIN_POD.0),
        HAIRPIN_POD.1,
        addr(VIP_HAIRPIN)
    );
}

/// An upgrade from a kproxy whose conntrack map was `CONNTRACK_V2` (the
/// direction in the key) keeps its flows: loading the datapath carries them
/// into the current map, direction in the value, and removes the old map.
#[test]
fn an_upgrade_carries_conntrack_v2_flows_over() {
    use proxy_common::{ConntrackKeyV2, CONNTRACK_V2_MAP, CT_DIR_REPLY};
    let (key, value) = older_reply_entry();
    let old_key = ConntrackKeyV2 {
        saddr: key.saddr,
        daddr: key.daddr,
        sport: key.sport,
        dport: key.dport,
        proto: key.proto,
        direction: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    // V2 values had no direction: the key said it.
    let old_value = proxy_common::ConntrackValue {
        direction: 0,
        ..value
    };
    assert_eq!(old_key.upgrade(&old_value), (key, value));
    carries_an_older_conntrack_map_over(
        CONNTRACK_V2_MAP,
        bytemuck::bytes_of(&old_key),
        bytemuck::bytes_of(&old_value),
        (key, value),
    );
}

/// The same from `CONNTRACK_V3` (16-byte addresses in the key) into the
/// IPv4 map with its 16-byte key.
#[test]
fn an_upgrade_carries_conntrack_v3_flows_over() {
    let (key, value) = older_reply_entry();
    carries_an_older_conntrack_map_over(
        proxy_common::CONNTRACK_V3_MAP,
        bytemuck::bytes_of(&key),
        bytemuck::bytes_of(&value),
        (key, value),
    );
}

/// A reply entry: backend 198.18.2.2:8080 -> client 198.18.1.2:40000,
/// restoring the VIP 198.19.0.10:80.
fn older_reply_entry() -> (proxy_common::ConntrackKey, proxy_common::ConntrackValue) {
    use proxy_common::{ipv4_mapped, ConntrackKey, ConntrackValue, CT_DIR_REPLY};
    let key = ConntrackKey::new(
        ipv4_mapped([198, 18, 2, 2]),
        ipv4_mapped([198, 18, 1, 2]),
        8080,
        40000,
        proxy_common::PROTO_TCP,
    );
    let value = ConntrackValue {
        nat_addr: ipv4_mapped([198, 19, 0, 10]),
        nat_port: 80,
        state: proxy_common::CT_STATE_ESTABLISHED,
        backend_id: 3,
        rev_nat_id: 1,
        last_seen_ns: 12_345,
        direction: CT_DIR_REPLY,
        ..ConntrackValue::default()
    };
    (key, value)
}

fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool runs (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pins an older kproxy's conntrack map `name` with bpftool, as that kproxy
/// made it, holding one entry; loads the datapath and expects the entry in
/// the current map as `expected`, and the older map gone.
fn carries_an_older_conntrack_map_over(
    name: &str,
    key: &[u8],
    value: &[u8],
    expected: (proxy_common::ConntrackKey, proxy_common::ConntrackValue),
) {
    let pins = PinDir::new();
    datapath::ensure_bpffs(&pins.path).expect("bpffs at the pin dir");
    let old = pins.path.join(name);
    let old_path = old.to_str().unwrap();
    let (key_size, value_size) = (key.len().to_string(), value.len().to_string());
    bpftool(&[
        "map",
        "create",
        old_path,
        "type",
        "lru_hash",
        "key",
        &key_size,
        "value",
        &value_size,
        "entries",
        "1024",
        "name",
        name,
    ]);
    let hex = |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let (key_hex, value_hex) = (hex(key), hex(value));
    let mut args = vec!["map", "update", "pinned", old_path, "key", "hex"];
    args.extend(key_hex.iter().map(String::as_str));
    args.extend(["value", "hex"]);
    args.extend(value_hex.iter().map(String::as_str));
    bpftool(&args);

    let datapath = Datapath::load(&pins.path, MapSizes::default())
        .unwrap_or_else(|e| panic!("loading the datapath at {}: {e}", pins.path.display()));
    let entries = datapath.conntrack_entries().expect("conntrack entries");
    assert_eq!(entries.get(&expected.0), Some(&expected.1), "{entries:?}");
    assert_eq!(entries.len(), 1);
    assert!(!old.exists(), "the older map is removed once carried over");
}

/// A pinned hash map walked one entry at a time with aya's iterator (next
/// key, then its value): the reference for kproxy's batched reads.
fn walk<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str) -> Vec<(K, V)> {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    let data = MapData::from_pin(pins.join(name)).expect("opening the pinned map");
    let lru = data
        .info()
        .and_then(|i| i.map_type())
        .expect("the map's type")
        == aya::maps::MapType::LruHash;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    let map: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(map).expect("a hash map");
    map.iter()
        .map(|item| item.expect("walking the map"))
        .collect()
}

/// The daemon's sweep reads the conntrack map in batches
/// (`BPF_MAP_LOOKUP_BATCH`) and deletes in batches: the batched read holds
/// exactly what a walk one entry at a time holds, across several batches
/// and with a batch too small for some hash buckets (the read grows it); a
/// delete batch skips keys already gone and deletes every other one.
#[test]
fn the_sweep_reads_and_deletes_conntrack_in_batches() {
    use proxy_common::{ipv4_mapped, ConntrackKey};
    let mut lab = Lab::new();
    let flows: u16 = 3000;
    for port in 10_000..10_000 + flows {
        let out = lab.run(&tcp(client(port), (VIP, 80), Tcp::Syn, &[]));
        assert_eq!(out.verdict, TC_ACT_OK);
    }
    let one_by_one: std::collections::HashMap<_, _> =
        walk::<proxy_common::ConntrackKey4, proxy_common::ConntrackValue>(
            &lab._pins.path,
            proxy_common::CONNTRACK_MAP,
        )
        .into_iter()
        .map(|(k, v)| (k.mapped(), v))
        .collect();
    assert_eq!(
        one_by_one.len(),
        2 * usize::from(flows),
        "two entries per flow"
    );
    // The daemon's batch (two of them here), and a batch of one entry,
    // which some hash bucket of 6000 entries outgrows.
    for chunk in [datapath::MAP_READ_BATCH, 1] {
        let batched = lab
            .datapath
            .conntrack_entries_batched(chunk)
            .unwrap_or_else(|e| panic!("reading conntrack in batches of {chunk}: {e}"));
        assert!(
            batched == one_by_one,
            "batches of {chunk} read other entries"
        );
    }
    assert!(lab.datapath.conntrack_entries().expect("conntrack entries") == one_by_one);

    // Every other forward entry, with a key that was never there between
    // each two: a batch delete stops at a missing key.
    let forward = |port: u16| {
        ConntrackKey::new(
            ipv4_mapped(CLIENT_IP),
            ipv4_mapped(VIP),
            port,
            80,
            PROTO_TCP,
        )
    };
    let gone: Vec<ConntrackKey> = (10_000..10_000 + flows).step_by(2).map(forward).collect();
    let mut keys = Vec::new();
    for (i, key) in gone.iter().enumerate() {
        keys.push(*key);
        keys.push(forward(1000 + i as u16));
    }
    let deleted = lab.datapath.delete_conntrack(&keys).expect("deleting");
    assert_eq!(deleted, gone.len(), "only the keys that were there count");
    let left = lab.datapath.conntrack_entries().expect("conntrack entries");
    assert_eq!(left.len(), one_by_one.len() - gone.len());
    for key in one_by_one.keys() {
        assert_eq!(left.contains_key(key), !gone.contains(key), "{key:?}");
    }
}

/// A full resync re-reads the Service maps (`MapWriter::read_all`), and
/// `kproxy services` / `conntrack` read the pinned maps, in batches: with
/// more entries than one batch holds, they read exactly what a walk one
/// entry at a time reads.
#[test]
fn the_service_maps_are_read_in_batches() {
    use std::collections::BTreeMap;
    let mut state = lab_services();
    // 600 Services x 10 endpoints: about 7800 services-map and 6000
    // backends-map entries, two batches each.
    for i in 0..600u32 {
        let vip = [198, 19, 10 + (i / 250) as u8, (i % 250) as u8];
        let backends: Vec<Backend> = (0..10u32)
            .map(|k| Backend {
                ip: IpAddr::V4(Ipv4Addr::from([198, 18, 100 + (k as u8), (i % 250) as u8])),
                port: 8000 + (i / 250) as u16,
                terminating: false,
                local: false,
            })
            .collect();
        let key = FrontendKey {
            ip: IpAddr::V4(Ipv4Addr::from(vip)),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let service = ServicePortName {
            namespace: "fixtures".to_owned(),
            name: format!("bulk-{i}"),
            port_name: "http".to_owned(),
        };
        let frontend = Frontend::new(service, FrontendKind::ClusterIp, backends);
        state.frontends.insert(key, frontend);
    }
    let mut lab = Lab::with_services(&state);
    // Flows too, for `kproxy conntrack`'s listing.
    for port in 20_000..20_100 {
        lab.run(&tcp(client(port), (VIP, 80), Tcp::Syn, &[]));
    }
    let pins = lab._pins.path.clone();
    let services: BTreeMap<proxy_common::ServiceKey, proxy_common::ServiceValue> =
        walk(&pins, proxy_common::SERVICES_MAP)
            .into_iter()
            .collect();
    let backends: BTreeMap<u32, proxy_common::BackendValue> =
        walk(&pins, proxy_common::BACKENDS_MAP)
            .into_iter()
            .collect();
    let rev_nat: BTreeMap<u32, proxy_common::RevNatValue> =
        walk(&pins, proxy_common::REV_NAT_MAP).into_iter().collect();
    assert!(
        services.len() > datapath::MAP_READ_BATCH,
        "{}",
        services.len()
    );
    assert!(
        backends.len() > datapath::MAP_READ_BATCH,
        "{}",
        backends.len()
    );

    use proxy_userspace::sync::MapWriter as _;
    let read = lab
        .datapath
        .maps()
        .expect("the maps")
        .read_all()
        .expect("read_all");
    assert!(
        read.services == services,
        "read_all: other services-map entries"
    );
    assert!(
        read.backends == backends,
        "read_all: other backends-map entries"
    );
    assert!(read.rev_nat == rev_nat, "read_all: other rev-NAT entries");
    let maglev: BTreeMap<proxy_common::MaglevKey, u32> =
        walk(&pins, proxy_common::MAGLEV_MAP).into_iter().collect();
    assert!(read.maglev == maglev, "read_all: other Maglev entries");

    let pinned = PinnedMaps::open(&pins).expect("the pinned maps");
    let contents = pinned.contents().expect("kproxy services' read");
    assert!(contents.services == services && contents.backends == backends);
    let mut flows: Vec<(proxy_common::ConntrackKey, proxy_common::ConntrackValue)> =
        walk::<proxy_common::ConntrackKey4, proxy_common::ConntrackValue>(
            &pins,
            proxy_common::CONNTRACK_MAP,
        )
        .into_iter()
        .map(|(k, v)| (k.mapped(), v))
        .collect();
    assert_eq!(flows.len(), 200);
    let listed = pinned.conntrack().expect("kproxy conntrack's read");
    // Listed in key order (IPv4 key bytes); the walk is in hash order.
    flows.sort_by_key(|(k, _)| {
        bytemuck::bytes_of(&proxy_common::ConntrackKey4::from_mapped(k).unwrap()).to_vec()
    });
    assert!(
        listed == flows,
        "kproxy conntrack lists other flows or another order"
    );
}

/// Purging session affinity (a Service lost backends) reads the affinity
/// map in batches, deletes exactly what the caller picks from it, and
/// counts what it deleted.
#[test]
fn purging_session_affinity_deletes_the_entries_picked() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use proxy_common::{AffinityKey, AffinityValue, AFFINITY_MAP};
    let mut lab = Lab::new();
    let pins = lab._pins.path.clone();
    let data = MapData::from_pin(pins.join(AFFINITY_MAP)).expect("the affinity map");
    let mut map: BpfHashMap<MapData, AffinityKey, AffinityValue> =
        BpfHashMap::try_from(Map::LruHashMap(data)).expect("an LRU hash map");
    // 5000 clients (more than one read batch), backends 0..4.
    for i in 0..5000u32 {
        let key = AffinityKey {
            client: proxy_common::ipv4_mapped([198, 18, 50 + (i / 250) as u8, (i % 250) as u8]),
            service_port_id: 7,
            _pad: 0,
        };
        let value = AffinityValue {
            backend_id: i % 4,
            _pad: 0,
            last_used_ns: u64::from(i),
        };
        map.insert(key, value, 0)
            .expect("inserting an affinity entry");
    }
    let mut seen = 0;
    let deleted = lab
        .datapath
        .purge_affinity(|entries| {
            seen = entries.len();
            entries
                .iter()
                .filter(|(_, v)| v.backend_id == 3)
                .map(|(k, _)| *k)
                .collect()
        })
        .expect("purging");
    assert_eq!(seen, 5000, "the purge saw every entry");
    assert_eq!(deleted, 1250);
    let left: Vec<(AffinityKey, AffinityValue)> = walk(&pins, AFFINITY_MAP);
    assert_eq!(left.len(), 3750);
    assert!(
        left.iter().all(|(_, v)| v.backend_id != 3),
        "a picked entry is left"
    );
}

/// A batch read writes whole entries of the map's own sizes into kproxy's
/// buffers, so the read checks the map's layout first: a map of another
/// layout pinned under a kproxy name (another version's pins, say) is an
/// error that names the size, not memory corruption.
#[test]
fn reading_a_pinned_map_of_another_layout_is_an_error() {
    let lab = Lab::new();
    let path = lab._pins.path.join(proxy_common::CONNTRACK_MAP);
    std::fs::remove_file(&path).expect("unpinning the conntrack map");
    let path = path.to_str().unwrap();
    let args = "type lru_hash key 16 value 8192 entries 64 name other_layout";
    let mut create = vec!["map", "create", path];
    create.extend(args.split(' '));
    bpftool(&create);
    let err = PinnedMaps::open(&lab._pins.path)
        .expect("the pinned maps")
        .conntrack()
        .expect_err("a value of 8192 bytes read as 56");
    assert!(err.to_string().contains("value size"), "{err}");
}

/// The `last_seen_ns` a SYN from `client(port)` to the VIP leaves on its
/// forward entry.
fn stamp_of_a_new_flow(lab: &mut Lab, port: u16) -> u64 {
    let out = lab.run(&tcp(client(port), (VIP, 80), Tcp::Syn, &[]));
    assert_eq!(out.verdict, TC_ACT_OK);
    let key = proxy_common::ConntrackKey::new(
        proxy_common::ipv4_mapped(CLIENT_IP),
        proxy_common::ipv4_mapped(VIP),
        port,
        80,
        PROTO_TCP,
    );
    let entries = lab.datapath.conntrack_entries().expect("conntrack entries");
    entries
        .get(&key)
        .unwrap_or_else(|| panic!("no forward entry for port {port}: {entries:?}"))
        .last_seen_ns
}

/// The datapath stamps flows from jiffies, scaled as `Datapath::load`
/// measured them: CLOCK_MONOTONIC at tick resolution, so the daemon's sweep
/// and the datapath agree on a flow's age. Shifting the measured offset
/// shifts the stamps (the jiffies clock is the one in use), and the
/// sweep's clock check catches the shift and measures again; without a
/// measured clock the datapath falls back to the coarse clock, also
/// CLOCK_MONOTONIC.
#[test]
fn flows_are_stamped_with_the_jiffies_clock_measured_at_load() {
    use proxy_userspace::daemon::monotonic_ns;
    let mut lab = Lab::new();
    let clock = lab
        .datapath
        .clock()
        .expect("Datapath::load measures the jiffies clock on this kernel");
    let tick = clock.tick_ns;
    // Behind by a tick by design, more while a busy (virtual) CPU delays
    // ticks (the kernel lets jiffies stall up to five); ahead by no more
    // than the tick interrupt's jitter.
    let slack = 6 * tick;
    let in_step = |stamp: u64, before: u64, after: u64, what: &str| {
        assert!(
            stamp + slack >= before && stamp <= after + tick / 4,
            "{what}: stamp {stamp} outside [{before} - 6 ticks, {after} + tick / 4] (tick {tick} ns)"
        );
    };

    let before = monotonic_ns();
    let stamp = stamp_of_a_new_flow(&mut lab, 41001);
    in_step(stamp, before, monotonic_ns(), "measured jiffies clock");
    let behind = lab.datapath.check_clock().expect("check_clock");
    assert!(
        behind.is_some_and(|ns| (-(tick as i64) / 4..=slack as i64).contains(&ns)),
        "a fresh clock is in step: {behind:?}"
    );
    assert_eq!(lab.datapath.clock(), Some(clock), "and stays as measured");

    const HOUR_NS: u64 = 3_600_000_000_000;
    let shifted = proxy_userspace::datapath::JiffyClock {
        offset_ns: clock.offset_ns.wrapping_add(HOUR_NS),
        ..clock
    };
    lab.datapath.set_clock(Some(shifted)).expect("set_clock");
    let before = monotonic_ns();
    let stamp = stamp_of_a_new_flow(&mut lab, 41002);
    in_step(
        stamp.wrapping_sub(HOUR_NS),
        before,
        monotonic_ns(),
        "jiffies clock shifted by an hour",
    );
    // The check sees the clock an hour ahead and measures it again.
    let behind = lab.datapath.check_clock().expect("check_clock");
    assert!(
        behind.is_some_and(|ns| ns < -(HOUR_NS as i64) + slack as i64),
        "the check reports the hour: {behind:?}"
    );
    let again = lab.datapath.clock().expect("measured again");
    assert!(
        again.offset_ns.abs_diff(clock.offset_ns) <= slack,
        "measured again: {again:?}, at load: {clock:?}"
    );
    let before = monotonic_ns();
    let stamp = stamp_of_a_new_flow(&mut lab, 41003);
    in_step(stamp, before, monotonic_ns(), "the clock measured again");

    lab.datapath.set_clock(None).expect("set_clock");
    let before = monotonic_ns();
    let stamp = stamp_of_a_new_flow(&mut lab, 41004);
    in_step(stamp, before, monotonic_ns(), "coarse clock fallback");
}
