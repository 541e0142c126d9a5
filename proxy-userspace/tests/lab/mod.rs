//! The network-namespace lab shared by the end-to-end tests and the demo.
//!
//! Topology: one node namespace; each pod is a namespace joined to the node
//! by a veth pair (`pod-<name>` on the node, `lab0` in the pod), pod `i`
//! (1-based) on 198.18.i.0/24 with the node at .1 and the pod at .2. The
//! lab has no link to the root namespace, and nothing is attached outside
//! it. Names carry a unique suffix (pid + counter); `Drop` removes the
//! namespaces, the kproxy process, its pins and its bpffs mount, even when a
//! test panics.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proxy_userspace::datapath::PinnedMaps;
use proxy_userspace::sync::MapContents;

pub const NODE_NAME: &str = "node-a";
pub const BACKEND_PORT: u16 = 8080;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Panics (never skips) when the lab cannot run here.
pub fn require_lab() {
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the lab tests need root (network namespaces, eBPF); run `cargo xtask test` as root"
    );
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "the lab tests need a kernel with BTF (/sys/kernel/btf/vmlinux)"
    );
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "`ip` (iproute2) is missing: run `cargo xtask setup`"
    );
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A veth pair: `name` in namespace `netns`, `peer` in `peer_netns`.
pub fn veth_pair(name: &str, netns: &str, peer: &str, peer_netns: &str) {
    ip(&[
        "link", "add", "name", name, "netns", netns, "type", "veth", "peer", "name", peer, "netns",
        peer_netns,
    ]);
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
    file: File,
}

impl Netns {
    pub fn create(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let file = File::open(format!("/var/run/netns/{name}")).expect("open netns");
        Self { name, file }
    }

    /// Runs `f` on a thread inside this namespace. Sockets created there
    /// stay in the namespace after the thread ends.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&self.file);
                f()
            })
            .join()
            .expect("lab thread panicked")
        })
    }

    /// A factory for listening sockets inside this namespace (callable
    /// again and again, e.g. to restart a server on the same address).
    pub fn listener_factory(
        &self,
        addr: SocketAddr,
    ) -> impl Fn() -> TcpListener + Send + Sync + 'static {
        let file = self.file.try_clone().expect("dup netns fd");
        move || {
            std::thread::scope(|s| {
                s.spawn(|| {
                    enter(&file);
                    TcpListener::bind(addr).expect("bind in lab namespace")
                })
                .join()
                .expect("bind thread")
            })
        }
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]));
    }

    /// The namespace file (e.g. for `setns` in a child's `pre_exec`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `ip netns exec <this> <program> <args>` and asserts success.
    pub fn exec(&self, program: &str, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args));
    }
}

pub fn enter(file: &File) {
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub struct Pod {
    pub name: String,
    pub netns: Netns,
    pub ip: Ipv4Addr,
    /// The node-side interface.
    pub ifname: String,
}

/// A TCP and UDP server in a pod on :8080. TCP: greets each connection with
/// `<pod> <peer>` and then echoes each line as `<pod> <line>`. UDP: answers
/// each datagram with `<pod> <peer>`.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts the TCP and UDP servers of the pod `name` on :8080 inside
/// `netns`; they stop when the returned `Server` is dropped.
pub fn start_server(netns: &Netns, name: &str) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let (tcp, udp) = netns.run(|| {
        let tcp = TcpListener::bind(("0.0.0.0", BACKEND_PORT)).expect("bind tcp");
        let udp = UdpSocket::bind(("0.0.0.0", BACKEND_PORT)).expect("bind udp");
        (tcp, udp)
    });
    tcp.set_nonblocking(true).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let pod_name = name.to_owned();
    let tcp_stop = stop.clone();
    let tcp_thread = std::thread::spawn(move || serve_tcp(tcp, pod_name, tcp_stop));
    let pod_name = name.to_owned();
    let udp_stop = stop.clone();
    let udp_thread = std::thread::spawn(move || serve_udp(udp, pod_name, udp_stop));
    Server {
        stop,
        threads: vec![tcp_thread, udp_thread],
    }
}

/// What a backend answered: its name and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub backend: String,
    pub peer: SocketAddr,
}

pub fn parse_hello(line: &str) -> io::Result<Hello> {
    let mut parts = line.split_whitespace();
    let backend = parts.next().unwrap_or_default().to_owned();
    let peer = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad hello {line:?}")))?;
    Ok(Hello { backend, peer })
}

pub struct Lab {
    pub id: String,
    pub node: Netns,
    pub pods: Vec<Pod>,
    pub root: PathBuf,
    pub yaml_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub kproxy_bin: PathBuf,
    /// Extra `kproxy run` arguments (e.g. `--sync-period 1s`).
    pub kproxy_args: Vec<String>,
    /// `--source` for kproxy; `dir:<yaml_dir>` unless a test sets it.
    pub source: Option<String>,
    kproxy: Option<Child>,
    log_offset: u64,
    servers: Vec<Server>,
}

impl Lab {
    /// A node namespace with one pod namespace per name (index i+1 gives
    /// the pod 198.18.(i+1).2). Names must be short (interface `pod-<name>`).
    pub fn new(kproxy_bin: impl Into<PathBuf>, pods: &[&str]) -> Self {
        require_lab();
        let id = format!(
            "kpl{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let root = PathBuf::from("/run/kproxy-lab").join(&id);
        let yaml_dir = root.join("manifests");
        let pin_dir = root.join("bpf");
        fs::create_dir_all(&yaml_dir).unwrap();
        fs::create_dir_all(&pin_dir).unwrap();
        let node = Netns::create(format!("{id}-node"));
        node.sysctl("net.ipv4.ip_forward", "1");
        node.sysctl("net.ipv4.conf.all.rp_filter", "0");
        node.sysctl("net.ipv4.conf.default.rp_filter", "0");
        ip(&["-n", &node.name, "link", "set", "lo", "up"]);
        let mut lab = Self {
            id,
            node,
            pods: Vec::new(),
            root,
            yaml_dir,
            pin_dir,
            kproxy_bin: kproxy_bin.into(),
            kproxy_args: Vec::new(),
            source: None,
            kproxy: None,
            log_offset: 0,
            servers: Vec::new(),
        };
        for name in pods {
            lab.add_pod(name);
        }
        lab
    }

    /// Adds a pod namespace (also while kproxy runs: its interface must be
    /// picked up).
    pub fn add_pod(&mut self, name: &str) -> usize {
        let index = self.pods.len() + 1;
        assert!(index < 200, "lab supports up to 199 pods");
        let netns = Netns::create(format!("{}-{name}", self.id));
        let ifname = format!("pod-{name}");
        assert!(
            ifname.len() <= 15,
            "pod name {name} too long for an interface name"
        );
        let node_ip = format!("198.18.{index}.1");
        let pod_ip = Ipv4Addr::new(198, 18, index as u8, 2);
        veth_pair(&ifname, &self.node.name, "lab0", &netns.name);
        ip(&[
            "-n",
            &self.node.name,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            &ifname,
        ]);
        self.node
            .sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0");
        ip(&["-n", &self.node.name, "link", "set", &ifname, "up"]);
        ip(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "lab0",
        ]);
        ip(&["-n", &netns.name, "link", "set", "lab0", "up"]);
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns.name,
            "route",
            "add",
            "default",
            "via",
            &node_ip,
        ]);
        self.pods.push(Pod {
            name: name.to_owned(),
            netns,
            ip: pod_ip,
            ifname,
        });
        index - 1
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Starts the TCP+UDP servers in the named pods.
    pub fn start_servers(&mut self, names: &[&str]) {
        for name in names {
            let pod = self.pod(name);
            let server = start_server(&pod.netns, &pod.name);
            self.servers.push(server);
        }
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("kproxy.log")
    }

    /// Starts `kproxy run` inside the node namespace (entered with setns,
    /// so the pin path stays visible from the test).
    pub fn start_kproxy(&mut self) {
        assert!(self.kproxy.is_none(), "kproxy already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        self.log_offset = log.metadata().unwrap().len();
        let netns_fd = self.node.file.as_raw_fd();
        let mut cmd = Command::new(&self.kproxy_bin);
        let source = self
            .source
            .clone()
            .unwrap_or_else(|| format!("dir:{}", self.yaml_dir.display()));
        cmd.args(["run", "--source", &source])
            .args([
                "--hostname-override",
                NODE_NAME,
                "--pod-interfaces",
                "pod-*",
            ])
            .arg("--bpf-pin-path")
            .arg(&self.pin_dir)
            .args(["--min-sync-period", "0s"])
            .args(&self.kproxy_args)
            .env("KPROXY_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.kproxy = Some(cmd.spawn().expect("start kproxy"));
    }

    /// The kproxy log written since the last start.
    pub fn kproxy_log_since_start(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        text.get(self.log_offset as usize..)
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the running kproxy has synced once and attached to every
    /// pod interface.
    pub fn wait_kproxy_ready(&mut self) {
        let pods = self.pods.len();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.kproxy_log_since_start();
            let attached = log.matches("attached pod program").count();
            if log.contains("synced") && attached >= pods {
                return;
            }
            if let Some(child) = self.kproxy.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("kproxy exited with {status}:\n{log}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "kproxy not ready after 20 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kproxy_pid(&self) -> Option<u32> {
        self.kproxy.as_ref().map(|c| c.id())
    }

    /// Sends `signal` to kproxy and waits for it to exit.
    pub fn stop_kproxy(&mut self, signal: libc::c_int) -> std::process::ExitStatus {
        let mut child = self.kproxy.take().expect("kproxy not running");
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().expect("wait kproxy")
    }

    pub fn kproxy_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.kproxy_bin)
            .args(args)
            .arg("--bpf-pin-path")
            .arg(&self.pin_dir)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run kproxy")
    }

    /// Runs a kproxy subcommand with `-o json` and parses its output,
    /// failing with its stderr if it fails.
    pub fn kproxy_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.kproxy_cli(&[args, &["-o", "json"]].concat());
        assert!(
            out.status.success(),
            "kproxy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("kproxy {args:?}: not JSON ({e})"))
    }

    /// Writes a manifest atomically (temp file + rename), as kubectl-like
    /// tools and editors do.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        let tmp = self.yaml_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, self.yaml_dir.join(name)).unwrap();
    }

    /// Writes `echo.yaml`: the Service `echo` at `vip` with `ports`, and one
    /// EndpointSlice with the named pods, all ready.
    pub fn write_echo_service(
        &self,
        vip: Ipv4Addr,
        ports: &[(&str, &str, u16)],
        backends: &[&str],
    ) {
        let eps: Vec<Ep> = backends.iter().map(|b| Ep::ready(self.pod(b).ip)).collect();
        let yaml = format!(
            "{}---\n{}",
            service_yaml("echo", vip, ports),
            slice_yaml("echo", "echo-1", ports, &eps)
        );
        self.write_manifest("echo.yaml", &yaml);
    }

    pub fn remove_manifest(&self, name: &str) {
        fs::remove_file(self.yaml_dir.join(name)).unwrap();
    }

    pub fn maps(&self) -> MapContents {
        PinnedMaps::open(&self.pin_dir)
            .and_then(|m| m.contents())
            .expect("read pinned maps")
    }

    /// The backend epoch the datapath runs in (see
    /// `proxy_common::CONFIG_BACKEND_EPOCH_SHIFT`).
    pub fn backend_epoch(&self) -> u8 {
        self.datapath_config().backend_epoch()
    }

    /// The datapath config the daemon last wrote.
    pub fn datapath_config(&self) -> proxy_common::DatapathConfig {
        PinnedMaps::open(&self.pin_dir)
            .and_then(|m| m.config())
            .expect("read the pinned config")
    }

    /// Polls `cond` on the pinned maps every 5 ms; returns how long it took.
    pub fn wait_maps(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&MapContents) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if cond(&self.maps()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for: {what}\nkproxy log:\n{}",
                self.kproxy_log_since_start()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `n` new TCP connections from `from` to `to`, each reading the greeting.
    pub fn tcp_hellos(&self, from: &str, to: SocketAddrV4, n: usize) -> Vec<io::Result<Hello>> {
        self.pod(from)
            .netns
            .run(|| (0..n).map(|_| tcp_hello(to)).collect())
    }

    /// One UDP request from a fresh socket (so a fresh source port).
    pub fn udp_requests(&self, from: &str, to: SocketAddrV4, n: usize) -> Vec<io::Result<Hello>> {
        self.pod(from).netns.run(|| {
            (0..n)
                .map(|_| {
                    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
                    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                    sock.connect(to)?;
                    sock.send(b"hello\n")?;
                    let mut buf = [0u8; 256];
                    let n = sock.recv(&mut buf)?;
                    parse_hello(String::from_utf8_lossy(&buf[..n]).trim())
                })
                .collect()
        })
    }

    /// A long-lived TCP connection from a pod (the socket lives in the
    /// pod's namespace; it can be used from any thread).
    pub fn tcp_connect(&self, from: &str, to: SocketAddrV4) -> io::Result<Conversation> {
        let stream = self
            .pod(from)
            .netns
            .run(|| TcpStream::connect_timeout(&to.into(), Duration::from_secs(2)))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let hello = parse_hello(line.trim())?;
        Ok(Conversation {
            stream,
            reader,
            hello,
        })
    }
}

/// A plain HTTP/1.0 GET from inside the node namespace (kproxy's health and
/// metrics servers listen there). Returns (status code, body).
pub fn http_get(lab: &Lab, addr: SocketAddrV4, path: &str) -> io::Result<(u16, String)> {
    lab.node.run(|| http_get_here(addr, path))
}

/// A plain HTTP/1.0 GET from the calling thread's namespace.
pub fn http_get_here(addr: SocketAddrV4, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, response.clone()))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A 2000-byte UDP datagram starting with `BIG` (fragmented on the way
/// out) from the calling thread's namespace; the lab's servers answer it
/// with 3000 bytes (fragmented on the way back). Returns (bytes sent, the
/// answer).
pub fn big_udp_request(to: SocketAddrV4) -> (usize, Vec<u8>) {
    let sock = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.connect(to).unwrap();
    let mut request = b"BIG".to_vec();
    request.resize(2000, b'x');
    sock.send(&request).unwrap();
    let mut buf = [0u8; 8192];
    let n = sock
        .recv(&mut buf)
        .expect("a reply to a fragmented datagram");
    (request.len(), buf[..n].to_vec())
}

pub fn tcp_hello(to: SocketAddrV4) -> io::Result<Hello> {
    let stream = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    parse_hello(line.trim())
}

/// A long-lived connection: each `echo` must come back from the same backend.
pub struct Conversation {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    pub hello: Hello,
}

impl Conversation {
    pub fn echo(&mut self, text: &str) -> io::Result<String> {
        self.stream.write_all(format!("{text}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim().to_owned())
    }
}

pub fn serve_tcp(listener: TcpListener, name: String, stop: Arc<AtomicBool>) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.clone();
                let stop = stop.clone();
                conns.push(std::thread::spawn(move || {
                    let _ = serve_conn(stream, peer, &name, &stop);
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => break,
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{name} {peer}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                writer.write_all(format!("{name} {}\n", line.trim()).as_bytes())?;
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers `<pod> <peer> <bytes received>`; a datagram starting with `BIG`
/// gets a 3000-byte answer (fragmented on the way back).
pub fn serve_udp(sock: UdpSocket, name: String, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let mut reply = format!("{name} {peer} {n}\n").into_bytes();
            if buf[..n].starts_with(b"BIG") {
                reply.resize(3000, b'.');
            }
            let _ = sock.send_to(&reply, peer);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.kproxy.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- kproxy log ({}) ----\n{}",
                self.id,
                fs::read_to_string(self.log_path()).unwrap_or_default()
            );
        }
        self.servers.clear();
        let _ = proxy_userspace::datapath::cleanup(&self.pin_dir);
        let _ = nix::mount::umount2(&self.pin_dir, nix::mount::MntFlags::MNT_DETACH);
        self.pods.clear();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// YAML for a ClusterIP Service with named ports `(name, protocol, port)`.
pub fn service_yaml(name: &str, vip: Ipv4Addr, ports: &[(&str, &str, u16)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: lab\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n"
    );
    for (pname, proto, port) in ports {
        y.push_str(&format!(
            "    - name: {pname}\n      protocol: {proto}\n      port: {port}\n      targetPort: {BACKEND_PORT}\n"
        ));
    }
    y
}

/// An endpoint in a slice: address and conditions.
#[derive(Clone, Copy)]
pub struct Ep {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Ep {
    pub fn ready(ip: Ipv4Addr) -> Self {
        Self {
            ip,
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// YAML for an EndpointSlice of `service` whose ports (same names and
/// protocols as the Service) all point at the backends' port 8080.
pub fn slice_yaml(service: &str, slice: &str, ports: &[(&str, &str, u16)], eps: &[Ep]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: lab\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (pname, proto, _) in ports {
        y.push_str(&format!(
            "  - name: {pname}\n    protocol: {proto}\n    port: {BACKEND_PORT}\n"
        ));
    }
    y.push_str("endpoints:\n");
    if eps.is_empty() {
        y = y.replace("endpoints:\n", "endpoints: []\n");
    }
    for ep in eps {
        y.push_str(&format!(
            "  - addresses: [{}]\n    conditions: {{ready: {}, serving: {}, terminating: {}}}\n    nodeName: {NODE_NAME}\n",
            ep.ip, ep.ready, ep.serving, ep.terminating
        ));
    }
    y
}
