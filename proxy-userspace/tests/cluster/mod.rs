//! A two-node network-namespace lab for external traffic (NodePort,
//! LoadBalancer, externalIPs) and traffic between nodes.
//!
//! Topology (every namespace name carries the lab's unique id):
//!
//! ```text
//!   client-1 198.18.100.21 ext0 ─┐                 ┌─ ext0 198.18.100.11 node-a ─ pod-a1 ─ lab0 198.18.11.2 (a1)
//!   client-2 198.18.100.22 ext0 ─┤ br0 (bridge ns) ├                            └ pod-a2 ─ lab0 198.18.12.2 (a2)
//!                                │                 └─ ext0 198.18.100.12 node-b ─ pod-b1 ─ lab0 198.18.21.2 (b1)
//!                                                                               └ pod-b2 ─ lab0 198.18.22.2 (b2)
//! ```
//!
//! Pod `i` (1-based) of node-a is on 198.18.(10+i).0/24, of node-b on
//! 198.18.(20+i).0/24, node side .1, pod .2. Each node routes the other
//! node's pod networks via the other node's ext0 address. Clients have no
//! route to pods or ClusterIPs; the "LB VIP" network 198.18.200.0/24 is
//! routed from both clients via node-a. TX checksum offload is off on every
//! interface whose packets cross the wire (clients' and nodes' ext0, pods'
//! lab0), so XDP sees full checksums as from a NIC; GRO is on for the
//! bridge-side peers of the nodes' ext0 (native XDP_TX on a veth needs NAPI
//! on the receiving peer).
//!
//! One kproxy per node, both reading the same manifest directory (one
//! cluster), which starts with two Node objects (InternalIP, zone label).
//! `Drop` stops both, removes their pins and bpffs mounts and all
//! namespaces, and prints both logs when the test panicked. Nothing is ever
//! attached to a root-namespace interface.
#![allow(dead_code)]

#[path = "../raw_bpf/mod.rs"]
mod raw_bpf;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proxy_userspace::datapath::PinnedMaps;
use proxy_userspace::inspect::ServiceListing;
use proxy_userspace::sync::{addr_bytes, MapContents};

use super::lab::{
    self, ip, parse_hello, require_lab, veth_pair, Hello, Netns, Server, BACKEND_PORT,
};

pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 12);
pub const ZONE_A: &str = "zone-a";
pub const ZONE_B: &str = "zone-b";
pub const CLIENT_1: &str = "client-1";
pub const CLIENT_2: &str = "client-2";
pub const CLIENT_1_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 21);
pub const CLIENT_2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 22);
/// Routed from both clients via node-a: LoadBalancer ingress IPs and
/// externalIPs come from here.
pub const LB_NETWORK: &str = "198.18.200.0/24";
/// The interface facing the "wire" in node and client namespaces.
pub const EXT_IF: &str = "ext0";

/// How long a probe waits before calling the target silent.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A node namespace and the kproxy that runs in it.
pub struct ClusterNode {
    /// The Kubernetes Node name (`--hostname-override`).
    pub name: &'static str,
    pub zone: &'static str,
    pub ip: Ipv4Addr,
    pub netns: Netns,
    pub pin_dir: PathBuf,
    pub log_path: PathBuf,
    /// Names of this node's pods.
    pub pods: Vec<String>,
    kproxy: Option<Child>,
    log_offset: u64,
}

impl ClusterNode {
    /// One datapath counter (`proxy_common::stat` index), summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        PinnedMaps::open(&self.pin_dir)
            .and_then(|m| m.stats())
            .expect("read the datapath counters")[index as usize]
    }

    /// The kproxy log written since its last start.
    pub fn log_since_start(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut text);
        }
        text.get(self.log_offset as usize..)
            .unwrap_or_default()
            .to_owned()
    }

    /// What this node's pinned maps hold.
    pub fn maps(&self) -> MapContents {
        PinnedMaps::open(&self.pin_dir)
            .and_then(|m| m.contents())
            .unwrap_or_else(|e| panic!("read {}'s pinned maps: {e}", self.name))
    }

    /// Frontends with their backends, as `kproxy services` lists them.
    pub fn services(&self) -> Vec<ServiceListing> {
        proxy_userspace::inspect::services(&self.maps())
    }

    pub fn kproxy_pid(&self) -> Option<u32> {
        self.kproxy.as_ref().map(|c| c.id())
    }
}

/// A pod namespace joined to its node (`pod-<name>` on the node, `lab0` in
/// the pod).
pub struct ClusterPod {
    pub name: String,
    /// The Node name it runs on.
    pub node: &'static str,
    pub netns: Netns,
    pub ip: Ipv4Addr,
    /// The node-side interface.
    pub ifname: String,
}

/// An external client on the bridge.
pub struct Client {
    pub name: &'static str,
    pub netns: Netns,
    pub ip: Ipv4Addr,
}

pub struct Cluster {
    pub id: String,
    pub root: PathBuf,
    pub yaml_dir: PathBuf,
    pub kproxy_bin: PathBuf,
    /// `--xdp-mode` for both kprocesses (`native` unless a test changes it
    /// before `start`). `None`: no `--interfaces`/`--xdp-mode` at all, only
    /// the pod programs (useful to check the lab itself).
    pub xdp_mode: Option<String>,
    /// Extra `kproxy run` arguments for both nodes.
    pub kproxy_args: Vec<String>,
    pub bridge: Netns,
    pub nodes: Vec<ClusterNode>,
    pub pods: Vec<ClusterPod>,
    pub clients: Vec<Client>,
    servers: Vec<Server>,
}

impl Cluster {
    /// Builds the whole topology (no kproxy yet; see `start`) and writes
    /// `nodes.yaml`. Pod names must be short (interface `pod-<name>`).
    pub fn new(kproxy_bin: impl Into<PathBuf>, pods_a: &[&str], pods_b: &[&str]) -> Self {
        require_lab();
        assert!(
            Command::new("ethtool").arg("--version").output().is_ok(),
            "`ethtool` is missing: run `cargo xtask setup`"
        );
        assert!(
            pods_a.len() <= 9 && pods_b.len() <= 9,
            "up to 9 pods a node"
        );
        let id = format!(
            "kpc{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let root = PathBuf::from("/run/kproxy-lab").join(&id);
        let yaml_dir = root.join("manifests");
        fs::create_dir_all(&yaml_dir).unwrap();

        let bridge = Netns::create(format!("{id}-br"));
        let mut cluster = Self {
            id,
            root,
            yaml_dir,
            kproxy_bin: kproxy_bin.into(),
            xdp_mode: Some("native".to_owned()),
            kproxy_args: Vec::new(),
            bridge,
            nodes: Vec::new(),
            pods: Vec::new(),
            clients: Vec::new(),
            servers: Vec::new(),
        };
        // From here on, a panic drops `cluster`, which removes what exists.
        ip(&["-n", &cluster.bridge.name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &cluster.bridge.name,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
        ]);
        ip(&["-n", &cluster.bridge.name, "link", "set", "br0", "up"]);

        for (name, zone, node_ip, subnet_base, pods) in [
            (NODE_A, ZONE_A, NODE_A_IP, 10u8, pods_a),
            (NODE_B, ZONE_B, NODE_B_IP, 20u8, pods_b),
        ] {
            cluster.add_node(name, zone, node_ip);
            for (i, pod) in pods.iter().enumerate() {
                cluster.add_pod(name, pod, subnet_base + 1 + i as u8);
            }
        }
        // Each node reaches the other node's pods via the other node.
        for pod in &cluster.pods {
            let (via_node, from_node) = if pod.node == NODE_A {
                (NODE_A_IP, NODE_B)
            } else {
                (NODE_B_IP, NODE_A)
            };
            let o = pod.ip.octets();
            let net = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
            ip(&[
                "-n",
                &cluster.node(from_node).netns.name,
                "route",
                "add",
                &net,
                "via",
                &via_node.to_string(),
            ]);
        }
        for (name, client_ip) in [(CLIENT_1, CLIENT_1_IP), (CLIENT_2, CLIENT_2_IP)] {
            cluster.add_client(name, client_ip);
        }
        cluster.write_manifest("nodes.yaml", &nodes_yaml());
        cluster
    }

    /// A veth from `netns` (`ext0`, with `addr`) to the bridge (`peer`,
    /// enslaved to br0), TX checksum offload off on `ext0`.
    fn wire(&self, netns: &Netns, peer: &str, addr: Ipv4Addr) {
        assert!(peer.len() <= 15, "interface name {peer} too long");
        veth_pair(EXT_IF, &netns.name, peer, &self.bridge.name);
        ip(&[
            "-n",
            &self.bridge.name,
            "link",
            "set",
            peer,
            "master",
            "br0",
        ]);
        ip(&["-n", &self.bridge.name, "link", "set", peer, "up"]);
        ip(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            EXT_IF,
        ]);
        netns.exec("ethtool", &["-K", EXT_IF, "tx", "off"]);
        ip(&["-n", &netns.name, "link", "set", EXT_IF, "up"]);
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
    }

    fn add_node(&mut self, name: &'static str, zone: &'static str, node_ip: Ipv4Addr) {
        let netns = Netns::create(format!("{}-{name}", self.id));
        netns.sysctl("net.ipv4.ip_forward", "1");
        netns.sysctl("net.ipv4.conf.all.rp_filter", "0");
        netns.sysctl("net.ipv4.conf.default.rp_filter", "0");
        let node = ClusterNode {
            name,
            zone,
            ip: node_ip,
            netns,
            pin_dir: self.root.join(format!("bpf-{name}")),
            log_path: self.root.join(format!("kproxy-{name}.log")),
            pods: Vec::new(),
            kproxy: None,
            log_offset: 0,
        };
        fs::create_dir_all(&node.pin_dir).unwrap();
        // Pushed first so that a failure below still cleans the namespace up.
        self.nodes.push(node);
        let node = self.nodes.last().unwrap();
        self.wire(&node.netns, name, node_ip);
        node.netns
            .sysctl(&format!("net.ipv4.conf.{EXT_IF}.rp_filter"), "0");
        // Native XDP_TX / redirect into a veth hands frames to the peer's
        // XDP ring, and the kernel (veth_xdp_flush) wakes the peer only when
        // the peer has an XDP program itself: without one the frames wait
        // until something else wakes it (seconds). A real NIC has no such
        // peer; the lab's bridge-side ends get a pass-through program.
        attach_xdp_pass(&self.bridge.name, name, &self.root.join("xdp-pass"));
    }

    fn add_pod(&mut self, node_name: &'static str, name: &str, subnet: u8) {
        let ifname = format!("pod-{name}");
        assert!(
            ifname.len() <= 15,
            "pod name {name} too long for an interface name"
        );
        let netns = Netns::create(format!("{}-{name}", self.id));
        let node_side = format!("198.18.{subnet}.1");
        let pod_ip = Ipv4Addr::new(198, 18, subnet, 2);
        self.pods.push(ClusterPod {
            name: name.to_owned(),
            node: node_name,
            netns,
            ip: pod_ip,
            ifname: ifname.clone(),
        });
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node_name)
            .expect("node exists");
        node.pods.push(name.to_owned());
        let node = self.node(node_name);
        let pod = self.pods.last().unwrap();
        veth_pair(&ifname, &node.netns.name, "lab0", &pod.netns.name);
        ip(&[
            "-n",
            &node.netns.name,
            "addr",
            "add",
            &format!("{node_side}/24"),
            "dev",
            &ifname,
        ]);
        node.netns
            .sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0");
        ip(&["-n", &node.netns.name, "link", "set", &ifname, "up"]);
        ip(&[
            "-n",
            &pod.netns.name,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "lab0",
        ]);
        pod.netns.exec("ethtool", &["-K", "lab0", "tx", "off"]);
        ip(&["-n", &pod.netns.name, "link", "set", "lab0", "up"]);
        ip(&["-n", &pod.netns.name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &pod.netns.name,
            "route",
            "add",
            "default",
            "via",
            &node_side,
        ]);
    }

    fn add_client(&mut self, name: &'static str, client_ip: Ipv4Addr) {
        let netns = Netns::create(format!("{}-{name}", self.id));
        self.clients.push(Client {
            name,
            netns,
            ip: client_ip,
        });
        let client = self.clients.last().unwrap();
        self.wire(&client.netns, name, client_ip);
        ip(&[
            "-n",
            &client.netns.name,
            "route",
            "add",
            LB_NETWORK,
            "via",
            &NODE_A_IP.to_string(),
        ]);
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> &ClusterPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn client(&self, name: &str) -> &Client {
        self.clients
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no client {name}"))
    }

    /// The namespace of a pod, client or node, by name.
    pub fn netns(&self, name: &str) -> &Netns {
        if let Some(p) = self.pods.iter().find(|p| p.name == name) {
            return &p.netns;
        }
        if let Some(c) = self.clients.iter().find(|c| c.name == name) {
            return &c.netns;
        }
        if let Some(n) = self.nodes.iter().find(|n| n.name == name) {
            return &n.netns;
        }
        panic!("no pod, client or node named {name}")
    }

    /// Starts the TCP+UDP servers (port 8080) in the named pods.
    pub fn start_servers(&mut self, names: &[&str]) {
        for name in names {
            let server = lab::start_server(&self.pod(name).netns, name);
            self.servers.push(server);
        }
    }

    /// Writes a manifest atomically (temp file + rename) into the directory
    /// both kprocesses read.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        let tmp = self.yaml_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, self.yaml_dir.join(name)).unwrap();
    }

    pub fn remove_manifest(&self, name: &str) {
        fs::remove_file(self.yaml_dir.join(name)).unwrap();
    }

    /// Starts kproxy on both nodes and waits until both are ready.
    pub fn start(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_kproxy_at(i);
        }
        for name in [NODE_A, NODE_B] {
            self.wait_kproxy_ready(name);
        }
    }

    /// Starts `kproxy run` in one node namespace (entered with setns, so the
    /// pin path stays visible from the test).
    pub fn start_kproxy(&mut self, node: &str) {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        self.start_kproxy_at(i);
    }

    fn start_kproxy_at(&mut self, i: usize) {
        let source = format!("dir:{}", self.yaml_dir.display());
        let mut cmd = Command::new(&self.kproxy_bin);
        let node = &self.nodes[i];
        assert!(
            node.kproxy.is_none(),
            "kproxy already runs on {}",
            node.name
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .unwrap();
        let log_offset = log.metadata().unwrap().len();
        cmd.args(["run", "--source", &source])
            .args(["--hostname-override", node.name])
            .args(["--pod-interfaces", "pod-*"]);
        if let Some(mode) = &self.xdp_mode {
            cmd.args(["--interfaces", EXT_IF, "--xdp-mode", mode]);
        }
        cmd.arg("--bpf-pin-path")
            .arg(&node.pin_dir)
            .args(["--min-sync-period", "0s"])
            .args(["--healthz-bind-address", &format!("{}:10256", node.ip)])
            .args(["--metrics-bind-address", "127.0.0.1:10249"])
            .args(&self.kproxy_args)
            .env("KPROXY_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log);
        let netns_fd = node.netns.file().as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start kproxy");
        let node = &mut self.nodes[i];
        node.log_offset = log_offset;
        node.kproxy = Some(child);
    }

    /// Waits until the node's kproxy has synced once and attached to every
    /// pod interface of the node and (with an `xdp_mode`) to `ext0`.
    pub fn wait_kproxy_ready(&mut self, node: &str) {
        let external = self.xdp_mode.is_some();
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let node = &mut self.nodes[i];
            let log = node.log_since_start();
            let ready = log.contains("synced")
                && log.matches("attached pod program").count() >= node.pods.len()
                && (!external || log.contains("attached external program"));
            if ready {
                return;
            }
            if let Some(child) = node.kproxy.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("kproxy on {} exited with {status}:\n{log}", node.name);
                }
            }
            assert!(
                Instant::now() < deadline,
                "kproxy on {} not ready after 20 s:\n{log}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to a node's kproxy and waits for it to exit.
    pub fn stop_kproxy(&mut self, node: &str, signal: libc::c_int) -> std::process::ExitStatus {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        let mut child = node.kproxy.take().expect("kproxy not running");
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().expect("wait kproxy")
    }

    /// Both nodes' kproxy logs since their last start.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("---- {} ----\n{}", n.name, n.log_since_start()))
            .collect()
    }

    /// Polls `cond` on one node's pinned maps every 5 ms; returns how long
    /// it took.
    pub fn wait_maps(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&MapContents) -> bool,
    ) -> Duration {
        let node = self.node(node);
        let start = Instant::now();
        loop {
            if cond(&node.maps()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting on {} for: {what}\n{}",
                node.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until both nodes' maps satisfy `cond`.
    pub fn wait_maps_everywhere(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&MapContents) -> bool,
    ) {
        for node in [NODE_A, NODE_B] {
            self.wait_maps(node, what, timeout, &cond);
        }
    }

    /// `n` new TCP connections from `from` (a pod, client or node) to `to`,
    /// each reading the greeting (connect timeout 2 s).
    pub fn tcp_hellos(&self, from: &str, to: SocketAddrV4, n: usize) -> Vec<io::Result<Hello>> {
        self.netns(from)
            .run(|| (0..n).map(|_| lab::tcp_hello(to)).collect())
    }

    /// `n` UDP requests from `from` to `to`, each from a fresh socket (so a
    /// fresh source port), waiting 2 s for the answer.
    pub fn udp_requests(&self, from: &str, to: SocketAddrV4, n: usize) -> Vec<io::Result<Hello>> {
        self.netns(from).run(|| {
            (0..n)
                .map(|_| udp_hello(to, Duration::from_secs(2)))
                .collect()
        })
    }

    /// One TCP connection attempt, classified (see `Outcome`).
    pub fn tcp_probe(&self, from: &str, to: SocketAddrV4, timeout: Duration) -> Outcome {
        self.netns(from).run(|| tcp_probe(to, timeout))
    }

    /// One UDP request from a connected socket, classified: an ICMP port
    /// unreachable shows as `Refused`, silence as `TimedOut`.
    pub fn udp_probe(&self, from: &str, to: SocketAddrV4, timeout: Duration) -> Outcome {
        self.netns(from)
            .run(|| Outcome::of_request(udp_hello(to, timeout)))
    }

    /// A plain HTTP/1.0 GET from `from` (e.g. a client) to `addr`. Returns
    /// (status code, body).
    pub fn http_get(
        &self,
        from: &str,
        addr: SocketAddrV4,
        path: &str,
    ) -> io::Result<(u16, String)> {
        self.netns(from).run(|| lab::http_get_here(addr, path))
    }
}

/// Loads `r0 = XDP_PASS; exit` with raw bpf(2) (aya loads only from
/// objects), pins it on a bpffs of the lab's own, and attaches it in native
/// mode to `ifname` in `netns` with iproute2; the attachment keeps it alive
/// after the pin is removed.
fn attach_xdp_pass(netns: &str, ifname: &str, bpffs: &Path) {
    use std::os::fd::AsFd as _;
    const XDP_PASS: u32 = 2;
    if !bpffs.exists() {
        fs::create_dir_all(bpffs).unwrap();
        nix::mount::mount(
            Some("bpffs"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .expect("mount a bpffs for the lab's XDP pass program");
    }
    let prog = raw_bpf::load_return_program(raw_bpf::BPF_PROG_TYPE_XDP, XDP_PASS, "lab_xdp_pass")
        .expect("load the XDP pass program");
    let pin = bpffs.join(format!("pass-{ifname}"));
    raw_bpf::obj_pin(prog.as_fd(), &pin).expect("pin the XDP pass program");
    let pin_str = pin.to_str().unwrap();
    ip(&[
        "-n", netns, "link", "set", "dev", ifname, "xdpdrv", "pinned", pin_str,
    ]);
    let _ = fs::remove_file(&pin);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.kproxy.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                // The datapath's counters say where packets went.
                let cli = |command: &str| {
                    Command::new(&self.kproxy_bin)
                        .arg(command)
                        .arg("--bpf-pin-path")
                        .arg(&node.pin_dir)
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default()
                };
                let status = format!("{}{}", cli("status"), cli("conntrack"));
                eprintln!(
                    "---- kproxy log of {} ({}) ----\n{}\n---- kproxy status of {} ----\n{status}",
                    node.name,
                    self.id,
                    fs::read_to_string(&node.log_path).unwrap_or_default(),
                    node.name,
                );
            }
        }
        self.servers.clear();
        for node in &self.nodes {
            let _ = proxy_userspace::datapath::cleanup(&node.pin_dir);
            let _ = nix::mount::umount2(&node.pin_dir, nix::mount::MntFlags::MNT_DETACH);
        }
        // Namespaces go with their `Netns` (veths with their namespace).
        self.pods.clear();
        self.clients.clear();
        self.nodes.clear();
        let _ = nix::mount::umount2(
            &self.root.join("xdp-pass"),
            nix::mount::MntFlags::MNT_DETACH,
        );
        let _ = fs::remove_dir_all(&self.root);
        // `bridge` is deleted when the struct's fields drop, after this.
    }
}

/// How a connection attempt or a request ended.
#[derive(Debug)]
pub enum Outcome {
    Answered(Hello),
    /// TCP RST or ICMP port unreachable (ECONNREFUSED).
    Refused,
    /// Nothing came back: dropped silently.
    TimedOut,
    /// ICMP host/network unreachable, or no route here.
    Unreachable(io::Error),
    /// Anything else (e.g. connected, then the greeting never came).
    Failed(io::Error),
}

impl Outcome {
    /// Classifies the error of a connect or a request.
    pub fn of_error(err: io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Outcome::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::TimedOut,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Outcome::Unreachable(err)
            }
            _ => Outcome::Failed(err),
        }
    }

    pub fn of_request(result: io::Result<Hello>) -> Self {
        match result {
            Ok(hello) => Outcome::Answered(hello),
            Err(err) => Outcome::of_error(err),
        }
    }

    pub fn is_answered(&self) -> bool {
        matches!(self, Outcome::Answered(_))
    }

    pub fn is_timed_out(&self) -> bool {
        matches!(self, Outcome::TimedOut)
    }

    pub fn is_refused(&self) -> bool {
        matches!(self, Outcome::Refused)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Answered(h) => write!(f, "answered by {} (peer {})", h.backend, h.peer),
            Outcome::Refused => f.write_str("refused"),
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::Unreachable(e) => write!(f, "unreachable ({e})"),
            Outcome::Failed(e) => write!(f, "failed ({e})"),
        }
    }
}

/// A TCP connect (with `timeout`) and the greeting. Errors of the connect
/// itself are classified; errors after it are `Failed`.
pub fn tcp_probe(to: SocketAddrV4, timeout: Duration) -> Outcome {
    let stream = match TcpStream::connect_timeout(&to.into(), timeout) {
        Ok(stream) => stream,
        Err(err) => return Outcome::of_error(err),
    };
    let greeting = (|| {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        parse_hello(line.trim())
    })();
    match greeting {
        Ok(hello) => Outcome::Answered(hello),
        Err(err) => Outcome::Failed(io::Error::new(
            err.kind(),
            format!("connected, then no greeting: {err}"),
        )),
    }
}

/// One UDP request from a fresh connected socket (so ICMP errors are
/// reported: port unreachable as ECONNREFUSED).
pub fn udp_hello(to: SocketAddrV4, timeout: Duration) -> io::Result<Hello> {
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.connect(to)?;
    sock.send(b"hello\n")?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf)?;
    parse_hello(String::from_utf8_lossy(&buf[..n]).trim())
}

/// Polls `cond` every 20 ms until it holds; panics after `timeout` naming
/// `what`. Returns how long it took.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The two Node objects: InternalIP and zone label.
pub fn nodes_yaml() -> String {
    [(NODE_A, NODE_A_IP, ZONE_A), (NODE_B, NODE_B_IP, ZONE_B)]
        .iter()
        .map(|(name, ip, zone)| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n    topology.kubernetes.io/zone: {zone}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: {ip}}}\n    - {{type: Hostname, address: {name}}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The zone of a node of this lab.
pub fn zone_of(node: &str) -> &'static str {
    match node {
        NODE_A => ZONE_A,
        NODE_B => ZONE_B,
        other => panic!("no node {other}"),
    }
}

/// One Service port: name, protocol, port, nodePort.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub node_port: Option<u16>,
}

impl Port {
    pub fn tcp(port: u16) -> Self {
        Self {
            name: "tcp".into(),
            protocol: "TCP".into(),
            port,
            node_port: None,
        }
    }

    pub fn udp(port: u16) -> Self {
        Self {
            name: "udp".into(),
            protocol: "UDP".into(),
            port,
            node_port: None,
        }
    }

    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }
}

/// A Service manifest, built up field by field.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    /// ClusterIP, NodePort or LoadBalancer.
    pub type_: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub health_check_node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    pub source_ranges: Vec<String>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    /// `status.loadBalancer.ingress`: ip and `ipMode`.
    pub ingress: Vec<(Ipv4Addr, Option<String>)>,
}

impl ServiceSpec {
    pub fn new(name: &str, type_: &str, cluster_ip: Ipv4Addr) -> Self {
        Self {
            name: name.into(),
            type_: type_.into(),
            cluster_ip,
            ports: Vec::new(),
            external_traffic_policy: None,
            internal_traffic_policy: None,
            health_check_node_port: None,
            external_ips: Vec::new(),
            source_ranges: Vec::new(),
            allocate_load_balancer_node_ports: None,
            ingress: Vec::new(),
        }
    }

    pub fn port(mut self, port: Port) -> Self {
        self.ports.push(port);
        self
    }

    pub fn etp(mut self, policy: &str) -> Self {
        self.external_traffic_policy = Some(policy.into());
        self
    }

    pub fn itp(mut self, policy: &str) -> Self {
        self.internal_traffic_policy = Some(policy.into());
        self
    }

    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    pub fn external_ip(mut self, ip: Ipv4Addr) -> Self {
        self.external_ips.push(ip);
        self
    }

    pub fn source_range(mut self, cidr: &str) -> Self {
        self.source_ranges.push(cidr.into());
        self
    }

    pub fn allocate_load_balancer_node_ports(mut self, allocate: bool) -> Self {
        self.allocate_load_balancer_node_ports = Some(allocate);
        self
    }

    /// A `status.loadBalancer.ingress` entry; `ip_mode` `None` leaves
    /// `ipMode` unset (VIP behaviour).
    pub fn ingress(mut self, ip: Ipv4Addr, ip_mode: Option<&str>) -> Self {
        self.ingress.push((ip, ip_mode.map(str::to_owned)));
        self
    }

    pub fn yaml(&self) -> String {
        let ip = self.cluster_ip;
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: lab\nspec:\n  type: {}\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ipFamilies: [IPv4]\n",
            self.name, self.type_
        );
        if let Some(p) = &self.external_traffic_policy {
            y.push_str(&format!("  externalTrafficPolicy: {p}\n"));
        }
        if let Some(p) = &self.internal_traffic_policy {
            y.push_str(&format!("  internalTrafficPolicy: {p}\n"));
        }
        if let Some(p) = self.health_check_node_port {
            y.push_str(&format!("  healthCheckNodePort: {p}\n"));
        }
        if let Some(a) = self.allocate_load_balancer_node_ports {
            y.push_str(&format!("  allocateLoadBalancerNodePorts: {a}\n"));
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self.external_ips.iter().map(|i| i.to_string()).collect();
            y.push_str(&format!("  externalIPs: [{}]\n", ips.join(", ")));
        }
        if !self.source_ranges.is_empty() {
            y.push_str(&format!(
                "  loadBalancerSourceRanges: [{}]\n",
                self.source_ranges.join(", ")
            ));
        }
        y.push_str("  ports:\n");
        for p in &self.ports {
            y.push_str(&format!(
                "    - name: {}\n      protocol: {}\n      port: {}\n      targetPort: {BACKEND_PORT}\n",
                p.name, p.protocol, p.port
            ));
            if let Some(np) = p.node_port {
                y.push_str(&format!("      nodePort: {np}\n"));
            }
        }
        if !self.ingress.is_empty() {
            y.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for (ip, mode) in &self.ingress {
                y.push_str(&format!("      - ip: {ip}\n"));
                if let Some(mode) = mode {
                    y.push_str(&format!("        ipMode: {mode}\n"));
                }
            }
        }
        y
    }
}

/// An endpoint of a slice.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// `nodeName` (and `zone`, derived from it for this lab's nodes).
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `hints.forZones`.
    pub zone_hints: Vec<String>,
}

impl Endpoint {
    /// A ready endpoint of the pod (ready, serving, not terminating).
    pub fn of(pod: &ClusterPod) -> Self {
        Self {
            ip: pod.ip,
            node: pod.node.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: Vec::new(),
        }
    }

    /// A pod shutting down that still serves (ready false, serving true,
    /// terminating true).
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }

    pub fn hint_zone(mut self, zone: &str) -> Self {
        self.zone_hints.push(zone.into());
        self
    }
}

/// An EndpointSlice of `service` named `<service>-1`, whose ports (the same
/// names and protocols as the Service's) point at the backends' port 8080.
pub fn endpoint_slice(service: &ServiceSpec, endpoints: &[Endpoint]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {0}-1\n  namespace: lab\n  labels:\n    kubernetes.io/service-name: {0}\naddressType: IPv4\nports:\n",
        service.name
    );
    for p in &service.ports {
        y.push_str(&format!(
            "  - name: {}\n    protocol: {}\n    port: {BACKEND_PORT}\n",
            p.name, p.protocol
        ));
    }
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
        return y;
    }
    y.push_str("endpoints:\n");
    for e in endpoints {
        y.push_str(&format!(
            "  - addresses: [{}]\n    conditions: {{ready: {}, serving: {}, terminating: {}}}\n    nodeName: {}\n",
            e.ip, e.ready, e.serving, e.terminating, e.node
        ));
        if e.node == NODE_A || e.node == NODE_B {
            y.push_str(&format!("    zone: {}\n", zone_of(&e.node)));
        }
        if !e.zone_hints.is_empty() {
            let zones: Vec<String> = e
                .zone_hints
                .iter()
                .map(|z| format!("{{name: {z}}}"))
                .collect();
            y.push_str(&format!(
                "    hints: {{forZones: [{}]}}\n",
                zones.join(", ")
            ));
        }
    }
    y
}

/// A Service and its one EndpointSlice, as one multi-document manifest.
pub fn service_with_endpoints(service: &ServiceSpec, endpoints: &[Endpoint]) -> String {
    format!(
        "{}---\n{}",
        service.yaml(),
        endpoint_slice(service, endpoints)
    )
}

/// Whether the maps hold anything at all (frontend, slot or marker) keyed
/// by `ip`.
pub fn maps_mention(maps: &MapContents, ip: Ipv4Addr) -> bool {
    let addr = addr_bytes(IpAddr::V4(ip));
    maps.services.keys().any(|k| k.addr == addr)
}

/// The frontends (`kproxy services` rows) on `ip`:`port`, any protocol and
/// scope.
pub fn frontends_at(maps: &MapContents, ip: Ipv4Addr, port: u16) -> Vec<ServiceListing> {
    proxy_userspace::inspect::services(maps)
        .into_iter()
        .filter(|s| s.ip == IpAddr::V4(ip) && s.port == port)
        .collect()
}

/// Reads a file of the lab, for diagnostics.
pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}
