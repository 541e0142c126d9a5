//! End to end: flow state. UDP clients with a fixed source port move on when
//! their backend leaves; idle flows are swept by their timeouts; TCP state
//! is tracked; SCTP crosses a VIP.

mod lab;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use lab::{service_yaml, slice_yaml, Ep, Lab};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORTS: &[(&str, &str, u16)] = &[("tcp", "TCP", 80), ("udp", "UDP", 53)];

fn lab_with(args: &[&str], backends: &[&str]) -> Lab {
    let mut pods = vec!["c"];
    pods.extend_from_slice(backends);
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &pods);
    lab.kproxy_args = args.iter().map(|s| s.to_string()).collect();
    lab.start_servers(backends);
    write_slice(&lab, backends);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    lab
}

fn write_slice(lab: &Lab, backends: &[&str]) {
    lab.write_echo_service(VIP, PORTS, backends);
}

fn conntrack(lab: &Lab) -> Vec<serde_json::Value> {
    let out = lab.kproxy_cli(&["conntrack", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_udp_client_with_a_fixed_source_port_moves_on_when_its_backend_leaves() {
    let lab = lab_with(&[], &["b1", "b2", "b3"]);
    // One socket, one source port, a datagram every 200 ms.
    let sock = lab
        .pod("c")
        .netns
        .run(|| UdpSocket::bind(("0.0.0.0", 40053)).unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    sock.connect(SocketAddrV4::new(VIP, 53)).unwrap();
    let ask = || -> Option<String> {
        sock.send(b"ping\n").ok()?;
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).ok()?;
        Some(
            String::from_utf8_lossy(&buf[..n])
                .split_whitespace()
                .next()?
                .to_owned(),
        )
    };
    let first = (0..10).find_map(|_| ask()).expect("UDP through the VIP");
    for _ in 0..5 {
        assert_eq!(
            ask().as_deref(),
            Some(first.as_str()),
            "a UDP flow sticks to its backend"
        );
    }

    // Its backend leaves the Service but keeps running (and would answer).
    let remaining: Vec<&str> = ["b1", "b2", "b3"]
        .into_iter()
        .filter(|b| *b != first)
        .collect();
    let epoch = lab.backend_epoch();
    write_slice(&lab, &remaining);
    let changed = Instant::now();
    let moved_to = loop {
        if let Some(answer) = ask() {
            if answer != first {
                break answer;
            }
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "still answered by {first} 5 s after it left the Service"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = changed.elapsed();
    println!("UDP client with a fixed source port moved {first} -> {moved_to} in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(remaining.contains(&moved_to.as_str()));
    // The sync that removed the backend started a new backend epoch, in
    // which the datapath re-checks every UDP flow's backend once.
    assert_ne!(
        lab.backend_epoch(),
        epoch,
        "no new backend epoch after a backend left"
    );
    // And it sticks to the new one.
    for _ in 0..5 {
        assert_eq!(ask().as_deref(), Some(moved_to.as_str()));
    }
}

#[test]
fn idle_flows_are_swept_by_their_timeouts_and_tcp_state_is_tracked() {
    let lab = lab_with(
        &[
            "--conntrack-udp-timeout",
            "2s",
            "--conntrack-gc-interval",
            "500ms",
        ],
        &["b1"],
    );
    let udp = lab.udp_requests("c", SocketAddrV4::new(VIP, 53), 1);
    assert!(udp[0].is_ok());
    let mut conn = lab.tcp_connect("c", SocketAddrV4::new(VIP, 80)).unwrap();
    conn.echo("hello").unwrap();

    let states: BTreeMap<String, String> = conntrack(&lab)
        .iter()
        .map(|e| {
            (
                format!("{} {}", e["protocol"], e["direction"]),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states.get("\"TCP\" \"forward\"").map(String::as_str),
        Some("established"),
        "{states:?}"
    );
    assert_eq!(
        states.get("\"TCP\" \"reply\"").map(String::as_str),
        Some("established"),
        "{states:?}"
    );

    // The UDP flow is idle: gone within timeout + sweep interval (+ slack).
    let start = Instant::now();
    loop {
        let udp_left = conntrack(&lab)
            .iter()
            .filter(|e| e["protocol"] == "UDP")
            .count();
        if udp_left == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "UDP entries not swept: {udp_left}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("idle UDP flow swept after {:?}", start.elapsed());
    // The established TCP flow (24 h timeout) stays and keeps working.
    assert_eq!(
        conntrack(&lab)
            .iter()
            .filter(|e| e["protocol"] == "TCP")
            .count(),
        2
    );
    assert_eq!(conn.echo("still here").unwrap(), "b1 still here");

    // Closing the connection moves the flow to closing.
    drop(conn);
    let start = Instant::now();
    loop {
        let closing = conntrack(&lab)
            .iter()
            .filter(|e| e["protocol"] == "TCP" && e["state"] != "established")
            .count();
        if closing == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "FIN not tracked");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, metrics) = lab::http_get(
        &lab,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
        "/metrics",
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kproxy_conntrack_deleted_total{kind=\"expired\"}"),
        "{metrics}"
    );
}

#[test]
fn a_2000_byte_udp_datagram_crosses_the_vip_intact_both_ways() {
    let lab = lab_with(&[], &["b1", "b2"]);
    let (sent, got) = lab
        .pod("c")
        .netns
        .run(|| lab::big_udp_request(SocketAddrV4::new(VIP, 53)));
    let text = String::from_utf8_lossy(&got);
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        fields.get(2).copied(),
        Some(sent.to_string().as_str()),
        "backend got: {text:.80}"
    );
    assert_eq!(
        got.len(),
        3000,
        "the 3000-byte reply came back fragmented and whole"
    );
    let counters = lab.kproxy_cli(&["status", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&counters.stdout).unwrap();
    assert!(
        json["counters"]["fragment_nat"].as_u64().unwrap() >= 2,
        "{json}"
    );
}

#[test]
fn an_icmp_port_unreachable_from_a_backend_reaches_the_client() {
    // The Service targets a port nothing listens on: the backend answers
    // with ICMP port unreachable about backend:9999, which the client only
    // recognises once it is translated back to VIP:5353.
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c", "b1"]);
    let yaml = format!(
        "{}---\n{}",
        service_yaml("closed", VIP, &[("udp", "UDP", 5353)]),
        slice_yaml(
            "closed",
            "closed-1",
            &[("udp", "UDP", 5353)],
            &[Ep::ready(lab.pod("b1").ip)]
        )
        .replace("port: 8080", "port: 9999")
    );
    lab.write_manifest("closed.yaml", &yaml);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    let err = lab
        .pod("c")
        .netns
        .run(|| {
            let sock = UdpSocket::bind(("0.0.0.0", 0))?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            sock.connect(SocketAddrV4::new(VIP, 5353))?;
            sock.send(b"anyone?")?;
            let mut buf = [0u8; 64];
            sock.recv(&mut buf).map(|_| ())
        })
        .unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the ICMP error was not translated back: {err}"
    );
}

#[test]
fn a_full_conntrack_map_evicts_and_the_sweep_counts_it() {
    let lab = lab_with(
        &[
            "--conntrack-map-size",
            "64",
            "--conntrack-gc-interval",
            "500ms",
        ],
        &["b1"],
    );
    // Each round of 100 UDP flows needs 200 entries: the LRU map evicts.
    // The sweep counts a half-evicted flow once its surviving entry has
    // been idle for the grace period (2 s). Whether one survives the end of
    // a round depends on the LRU's order (a reply entry, looked up by the
    // reply, usually outlives its forward entry, but not always): wait out
    // the grace period after each round, up to five rounds.
    let evicted = || {
        let (_, metrics) = lab::http_get(
            &lab,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249),
            "/metrics",
        )
        .unwrap();
        let count = metrics
            .lines()
            .find(|l| l.starts_with("kproxy_conntrack_deleted_total{kind=\"lru_evicted_peer\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        (count, metrics)
    };
    'rounds: for round in 1.. {
        let answers = lab.udp_requests("c", SocketAddrV4::new(VIP, 53), 100);
        assert!(
            answers.iter().all(|a| a.is_ok()),
            "new flows keep working on a full map"
        );
        // The grace period, one sweep interval, and a margin.
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let (count, metrics) = evicted();
            if count > 0.0 {
                println!("half-evicted flows counted after round {round}: {count}");
                break 'rounds;
            }
            if Instant::now() > deadline {
                assert!(
                    round < 5,
                    "no eviction counted in {round} rounds:\n{metrics}"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(conntrack(&lab).len() <= 64);
}

/// Packets translated (`dnat` + `rev_nat`) and flow cache refills
/// (`flow_cache_fill`) over 200 request/response round trips on one TCP
/// connection from pod `c` through kproxy started with `args`.
fn busy_connection(args: &[&str]) -> (u64, u64) {
    let lab = lab_with(args, &["b1"]);
    let counters = || {
        let json = lab.kproxy_json(&["status"]);
        let get = |name: &str| {
            json["counters"][name]
                .as_u64()
                .unwrap_or_else(|| panic!("{json}"))
        };
        (get("dnat") + get("rev_nat"), get("flow_cache_fill"))
    };
    let before = counters();
    let mut conversation = lab
        .tcp_connect("c", SocketAddrV4::new(VIP, 80))
        .expect("a connection to the VIP");
    for i in 0..200 {
        let text = format!("hello {i}");
        let answer = conversation.echo(&text).expect("an answer");
        assert!(answer.contains(&text), "{answer}");
    }
    let after = counters();
    (after.0 - before.0, after.1 - before.1)
}

/// The datapath's flow cache serves real traffic: over a busy connection
/// most packets take their translation from their CPU's cache, and only a
/// few read conntrack and refill it; `--no-flow-cache` turns it off.
#[test]
fn a_busy_connection_is_translated_from_the_flow_cache() {
    let (translated, fills) = busy_connection(&[]);
    assert!(
        translated >= 400,
        "both directions translated: {translated}"
    );
    assert!(
        fills > 0 && fills * 4 < translated,
        "a few refills, most packets from the cache: {fills} refills for {translated} packets"
    );
    let (translated, fills) = busy_connection(&["--no-flow-cache"]);
    assert!(
        translated >= 400,
        "both directions translated: {translated}"
    );
    assert_eq!(fills, 0, "with the cache off nothing is cached");
}

/// A raw IPv4 socket for SCTP (protocol 132): it sends SCTP packets the
/// test builds and receives every SCTP packet its namespace gets, IP header
/// included. Raw sockets need no SCTP support in the kernel (this one has
/// none), and kproxy itself never opens an SCTP socket (SPEC 7).
struct RawSctp(std::os::fd::OwnedFd);

impl RawSctp {
    fn open() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, 132) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid socket and option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn send(&self, to: Ipv4Addr, segment: &[u8]) -> std::io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid socket, buffer and address.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next SCTP packet for `dport` within `deadline`: its source
    /// address and its SCTP bytes.
    fn receive(&self, dport: u16, deadline: Instant) -> (Ipv4Addr, Vec<u8>) {
        let mut buf = [0u8; 2048];
        loop {
            assert!(Instant::now() < deadline, "no SCTP packet for port {dport}");
            // SAFETY: a valid socket and buffer.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                continue;
            }
            let packet = &buf[..n as usize];
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let segment = &packet[ihl..];
            if u16::from_be_bytes([segment[2], segment[3]]) == dport {
                let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                return (src, segment.to_vec());
            }
        }
    }
}

/// An SCTP packet (ports, verification tag, CRC32c) with one chunk.
fn sctp_segment(sport: u16, dport: u16, chunk_type: u8) -> Vec<u8> {
    let mut segment = Vec::new();
    segment.extend_from_slice(&sport.to_be_bytes());
    segment.extend_from_slice(&dport.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    // INIT / INIT ACK: tag, a_rwnd, streams, initial TSN.
    segment.extend_from_slice(&[chunk_type, 0, 0, 20]);
    segment.extend_from_slice(&[1, 2, 3, 4, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    let crc = sctp_crc(&segment);
    segment[8..12].copy_from_slice(&crc.to_le_bytes());
    segment
}

/// CRC32c of an SCTP packet with its checksum field zeroed.
fn sctp_crc(segment: &[u8]) -> u32 {
    let mut zeroed = segment.to_vec();
    zeroed[8..12].fill(0);
    crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&zeroed)
}

fn ports(segment: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([segment[0], segment[1]]),
        u16::from_be_bytes([segment[2], segment[3]]),
    )
}

/// SPEC 7: an SCTP Service through real veths: the INIT reaches the
/// backend's port, the INIT ACK comes back from the Service's address and
/// port, each with a valid CRC32c after the port rewrite.
#[test]
fn an_sctp_association_crosses_the_vip_with_valid_crcs() {
    const SCTP_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 30);
    let mut lab = Lab::new(env!("CARGO_BIN_EXE_kproxy"), &["c", "b1"]);
    let ports_yaml = &[("diameter", "SCTP", 3868)];
    let yaml = format!(
        "{}---\n{}",
        service_yaml("sctp", SCTP_VIP, ports_yaml),
        slice_yaml("sctp", "sctp-1", ports_yaml, &[Ep::ready(lab.pod("b1").ip)])
    );
    lab.write_manifest("sctp.yaml", &yaml);
    lab.start_kproxy();
    lab.wait_kproxy_ready();
    let client_ip = lab.pod("c").ip;
    let backend_port = lab::BACKEND_PORT;
    let client = lab
        .pod("c")
        .netns
        .run(RawSctp::open)
        .expect("raw socket in c");
    let backend = lab
        .pod("b1")
        .netns
        .run(RawSctp::open)
        .expect("raw socket in b1");
    let deadline = Instant::now() + Duration::from_secs(5);

    client
        .send(SCTP_VIP, &sctp_segment(40_000, 3868, 1))
        .expect("sending the INIT");
    let (from, init) = backend.receive(backend_port, deadline);
    assert_eq!(from, client_ip, "the backend sees the client");
    assert_eq!(
        ports(&init),
        (40_000, backend_port),
        "DNAT to the endpoint's port"
    );
    assert_eq!(
        u32::from_le_bytes(init[8..12].try_into().unwrap()),
        sctp_crc(&init),
        "the INIT's CRC32c after the port rewrite"
    );

    backend
        .send(client_ip, &sctp_segment(backend_port, 40_000, 2))
        .expect("sending the INIT ACK");
    let (from, init_ack) = client.receive(40_000, deadline);
    assert_eq!(from, SCTP_VIP, "the reply comes from the Service");
    assert_eq!(ports(&init_ack), (3868, 40_000), "from the Service's port");
    assert_eq!(
        u32::from_le_bytes(init_ack[8..12].try_into().unwrap()),
        sctp_crc(&init_ack),
        "the INIT ACK's CRC32c after the port rewrite"
    );
}
