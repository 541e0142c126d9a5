//! The `kproxy` command line.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_userspace::config;
use proxy_userspace::daemon::{self, DaemonConfig, SourceSpec};
use proxy_userspace::datapath::{self, MapSizes, PinnedMaps, XdpMode};
use proxy_userspace::inspect;
use proxy_userspace::model::{Algorithm, ModelConfig, NodePortAddress};

const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/kproxy";

#[derive(Parser)]
#[command(
    name = "kproxy",
    version,
    about = "A kube-proxy replacement on eBPF (XDP and tc)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: watch the source, program the datapath.
    Run(Box<RunArgs>),
    /// List frontends and their backends from the pinned maps.
    Services {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        bpf_pin_path: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List tracked flows from the pinned conntrack map.
    Conntrack {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        bpf_pin_path: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Datapath counters and map fill.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        bpf_pin_path: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Remove everything kproxy pinned or attached under the pin path.
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        bpf_pin_path: PathBuf,
    },
}

/// Flags that a `--config` file may also set are `Option`s here: a flag
/// given on the command line wins over the file, the file over the default.
#[derive(clap::Args)]
struct RunArgs {
    /// `dir:PATH` (a directory of Service/EndpointSlice/Node YAML) or `kube`.
    #[arg(long)]
    source: String,
    /// This node's name; decides which endpoints are local. [default: the
    /// config file's `hostnameOverride`, else $NODE_NAME, else the hostname]
    #[arg(long)]
    hostname_override: Option<String>,
    /// External interfaces (NodePort, LoadBalancer, externalIPs from
    /// outside): XDP plus tc ingress. Must exist at start.
    #[arg(long, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// XDP on --interfaces: native (in the driver), generic (any driver,
    /// slower) or off (tc only). Never falls back by itself.
    #[arg(long, default_value = "native")]
    xdp_mode: XdpMode,
    /// Pod-facing interfaces (globs, e.g. `veth*,cali*`); new ones are picked up.
    #[arg(long, value_delimiter = ',')]
    pod_interfaces: Vec<String>,
    /// Where maps and links are pinned (bpffs; mounted if it is not).
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    bpf_pin_path: PathBuf,
    /// Address for /healthz and /livez. [default: 0.0.0.0:10256]
    #[arg(long)]
    healthz_bind_address: Option<String>,
    /// Address for /metrics and /proxyMode. [default: 127.0.0.1:10249]
    #[arg(long)]
    metrics_bind_address: Option<String>,
    /// kubeconfig for `--source kube` (default: in-cluster, then $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A KubeProxyConfiguration file; the fields that apply are used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Accepted for kube-proxy compatibility and not used: pods' traffic is
    /// told apart by the interface it arrives on (--pod-interfaces), and
    /// ClusterIP traffic arriving on --interfaces is always source-NATed.
    #[arg(long)]
    cluster_cidr: Option<String>,
    /// Source-NAT every flow to a ClusterIP to this node's address (pods'
    /// flows too), as kube-proxy's --masquerade-all. Needs --interfaces:
    /// replies from backends on other nodes arrive there.
    #[arg(long)]
    masquerade_all: bool,
    /// Addresses NodePorts answer on: CIDRs or `primary`.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Option<Vec<String>>,
    /// Shortest time between two syncs (bursts coalesce), e.g. `1s`, `0s`. [default: 1s]
    #[arg(long, value_parser = parse_duration)]
    min_sync_period: Option<Duration>,
    /// Full resync period: maps are re-read and drift repaired. [default: 30s]
    #[arg(long, value_parser = parse_duration)]
    sync_period: Option<Duration>,
    /// Idle timeout of established TCP flows. [default: 24h]
    #[arg(long, value_parser = parse_duration)]
    conntrack_tcp_timeout: Option<Duration>,
    /// Idle timeout of TCP flows after a FIN. [default: 1h]
    #[arg(long, value_parser = parse_duration)]
    conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Idle timeout of UDP flows. [default: 60s]
    #[arg(long, value_parser = parse_duration)]
    conntrack_udp_timeout: Option<Duration>,
    /// Idle timeout of TCP flows still in their handshake.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    conntrack_tcp_syn_timeout: Duration,
    /// Turns the datapath's per-CPU flow cache off: every packet of a
    /// tracked flow then reads its conntrack entry (slower; for comparison
    /// or troubleshooting).
    #[arg(long)]
    no_flow_cache: bool,
    /// How often idle flows are swept from the conntrack map.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    conntrack_gc_interval: Duration,
    /// Backend selection for Services without a `kproxy.io/lb-algorithm`
    /// annotation: random, maglev, rr, lc, sh, dh, sed or nq.
    #[arg(long, default_value = "random", value_parser = parse_algorithm)]
    lb_algorithm: Algorithm,
    #[arg(long, default_value_t = proxy_common::SERVICES_MAX_ENTRIES)]
    services_map_size: u32,
    #[arg(long, default_value_t = proxy_common::BACKENDS_MAX_ENTRIES)]
    backends_map_size: u32,
    #[arg(long, default_value_t = proxy_common::CONNTRACK_MAX_ENTRIES)]
    conntrack_map_size: u32,
    /// Maglev table entries, all Services together (each Maglev Service
    /// needs 65,537 or more, twice while its table is being replaced).
    #[arg(long, default_value_t = proxy_common::MAGLEV_MAX_ENTRIES)]
    maglev_map_size: u32,
    #[arg(long, default_value_t = proxy_common::AFFINITY_MAX_ENTRIES)]
    affinity_map_size: u32,
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    Algorithm::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Algorithm::NAMES.iter().map(|(n, _)| *n).collect();
        format!("`{s}` is not one of {}", names.join(", "))
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    proxy_userspace::config::parse_go_duration(s)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KPROXY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Services {
            bpf_pin_path,
            output,
        } => {
            let maps = PinnedMaps::open(&bpf_pin_path)?;
            let listing = inspect::services(&maps.contents()?);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&listing)?),
                Output::Table => print!("{}", inspect::services_table(&listing)),
            }
            Ok(())
        }
        Command::Conntrack {
            bpf_pin_path,
            output,
        } => {
            let maps = PinnedMaps::open(&bpf_pin_path)?;
            let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
            let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
            let listing = inspect::conntrack(&maps.conntrack()?, now_ns);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&listing)?),
                Output::Table => print!("{}", inspect::conntrack_table(&listing)),
            }
            Ok(())
        }
        Command::Status {
            bpf_pin_path,
            output,
        } => {
            let maps = PinnedMaps::open(&bpf_pin_path)?;
            let contents = maps.contents()?;
            let stats = inspect::stats(&maps.stats()?);
            match output {
                Output::Json => {
                    let json = serde_json::json!({
                        "pinPath": bpf_pin_path,
                        "services": contents.services.len(),
                        "backends": contents.backends.len(),
                        "revNat": contents.rev_nat.len(),
                        "conntrack": maps.conntrack()?.len(),
                        "counters": stats.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                    });
                    println!("{}", serde_json::to_string_pretty(&json)?);
                }
                Output::Table => {
                    println!("pin path:                {}", bpf_pin_path.display());
                    println!("service entries:         {}", contents.services.len());
                    println!("backends:                {}", contents.backends.len());
                    println!("conntrack entries:       {}", maps.conntrack()?.len());
                    for (name, value) in stats {
                        println!("{name:<24} {value}");
                    }
                }
            }
            Ok(())
        }
        Command::Cleanup { bpf_pin_path } => {
            let removed = datapath::cleanup(&bpf_pin_path)
                .with_context(|| format!("cleaning up {}", bpf_pin_path.display()))?;
            for path in &removed {
                println!("removed {}", path.display());
            }
            if removed.is_empty() {
                println!("nothing pinned under {}", bpf_pin_path.display());
            }
            Ok(())
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => {
            let loaded = config::load(path)?;
            if !loaded.ignored.is_empty() {
                tracing::warn!(
                    fields = %loaded.ignored.join(", "),
                    "config fields that kproxy does not use are ignored"
                );
            }
            loaded.config
        }
        None => config::FileConfig::default(),
    };
    let source = match args.source.split_once(':') {
        Some(("dir", path)) => SourceSpec::Dir(PathBuf::from(path)),
        _ if args.source == "kube" => SourceSpec::Kube {
            kubeconfig: args.kubeconfig.clone().or(file.kubeconfig.clone()),
        },
        _ => bail!(
            "--source must be `dir:PATH` or `kube`, not `{}`",
            args.source
        ),
    };
    for interface in &args.interfaces {
        if nix::net::if_::if_nametoindex(interface.as_str()).is_err() {
            bail!("--interfaces: no interface `{interface}` here (see `ip link`)");
        }
    }
    if args.interfaces.is_empty() {
        tracing::warn!("no --interfaces given: NodePorts, LoadBalancer IPs and externalIPs are not served to traffic from outside");
    } else if args.xdp_mode == XdpMode::Generic {
        tracing::warn!(
            "--xdp-mode generic: XDP runs in the kernel stack (slower than native), as asked"
        );
    }
    let pod_interfaces = args
        .pod_interfaces
        .iter()
        .map(|g| glob::Pattern::new(g).with_context(|| format!("--pod-interfaces: bad glob `{g}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if pod_interfaces.is_empty() {
        tracing::warn!("no --pod-interfaces given: ClusterIP traffic from pods is not intercepted");
    }
    let node_name = match first_set([
        args.hostname_override.clone(),
        file.hostname_override.clone(),
        std::env::var("NODE_NAME").ok(),
    ]) {
        Some(n) => n,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let healthz = first_set([
        args.healthz_bind_address.clone(),
        file.healthz_bind_address.clone(),
    ]);
    let metrics = first_set([
        args.metrics_bind_address.clone(),
        file.metrics_bind_address.clone(),
    ]);
    if let Some(cidrs) = first_set([
        args.cluster_cidr.clone(),
        Some(file.cluster_cidrs.join(",")),
    ]) {
        tracing::info!(
            cluster_cidr = %cidrs,
            "--cluster-cidr / clusterCIDR is accepted and not used: pods' traffic is told apart by its interface (--pod-interfaces), and ClusterIP traffic arriving on --interfaces is always source-NATed"
        );
    }
    // `--nodeport-addresses=` is unset, as empty values of the other flags
    // are (and as kube-proxy reads it: an empty list).
    let (nodeport_addresses, origin) = match args.nodeport_addresses.clone() {
        Some(entries) if entries != [""] => (entries, "--nodeport-addresses"),
        _ => (
            file.nodeport_addresses.clone(),
            "nodePortAddresses (--config)",
        ),
    };
    check_nodeport_addresses(&nodeport_addresses, origin)?;
    let masquerade_all =
        masquerade_all(args.masquerade_all || file.masquerade_all, &args.interfaces)?;
    let config = DaemonConfig {
        source,
        model: ModelConfig {
            node_name: node_name.to_lowercase(),
            proxy_name: None,
            default_algorithm: args.lb_algorithm,
            masquerade_all,
            ..ModelConfig::default()
        },
        pin_dir: args.bpf_pin_path,
        pod_interfaces,
        external_interfaces: args.interfaces.clone(),
        xdp_mode: args.xdp_mode,
        min_sync_period: args
            .min_sync_period
            .or(file.min_sync_period)
            .unwrap_or(Duration::from_secs(1)),
        sync_period: args
            .sync_period
            .or(file.sync_period)
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_millis(100)),
        map_sizes: MapSizes {
            services: args.services_map_size,
            backends: args.backends_map_size,
            conntrack: args.conntrack_map_size,
            maglev: args.maglev_map_size,
            affinity: args.affinity_map_size,
            ..MapSizes::default()
        },
        interface_poll: Duration::from_secs(1),
        datapath_config: {
            let ns = |d: Duration, default: u64| -> u64 {
                u64::try_from(d.as_nanos()).unwrap_or(default).max(1)
            };
            let or = |flag: Option<Duration>, file: Option<Duration>, default: u64| {
                flag.or(file).map_or(default, |d| ns(d, default))
            };
            proxy_common::DatapathConfig {
                tcp_syn_timeout_ns: ns(
                    args.conntrack_tcp_syn_timeout,
                    proxy_common::DEFAULT_TCP_SYN_TIMEOUT_NS,
                ),
                tcp_established_timeout_ns: or(
                    args.conntrack_tcp_timeout,
                    file.conntrack_tcp_established_timeout,
                    proxy_common::DEFAULT_TCP_ESTABLISHED_TIMEOUT_NS,
                ),
                tcp_close_wait_timeout_ns: or(
                    args.conntrack_tcp_timeout_close_wait,
                    file.conntrack_tcp_close_wait_timeout,
                    proxy_common::DEFAULT_TCP_CLOSE_WAIT_TIMEOUT_NS,
                ),
                tcp_closed_timeout_ns: proxy_common::DEFAULT_TCP_CLOSED_TIMEOUT_NS,
                udp_timeout_ns: or(
                    args.conntrack_udp_timeout,
                    file.conntrack_udp_timeout,
                    proxy_common::DEFAULT_UDP_TIMEOUT_NS,
                ),
                // The address-marker flag is set by the daemon once a sync
                // wrote every marker.
                flags: if args.no_flow_cache {
                    proxy_common::CONFIG_FLAG_NO_FLOW_CACHE
                } else {
                    0
                },
                // Measured by `Datapath::load`, added by `write_config`.
                clock_tick_ns: 0,
                clock_offset_ns: 0,
            }
        },
        conntrack_gc_interval: args.conntrack_gc_interval.max(Duration::from_millis(100)),
        nodeport_addresses: nodeport_addresses.clone(),
        healthz_bind_address: bind_address(healthz, "--healthz-bind-address", HEALTHZ_DEFAULT)?,
        metrics_bind_address: bind_address(metrics, "--metrics-bind-address", METRICS_DEFAULT)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(daemon::run(config))
}

/// Refuses, as kube-proxy does at startup, a `--nodeport-addresses` entry
/// that is neither a CIDR nor `primary`: the model skips such an entry, so
/// a typo would otherwise leave NodePorts unserved without a word.
fn check_nodeport_addresses(entries: &[String], origin: &str) -> anyhow::Result<()> {
    match entries
        .iter()
        .find(|entry| NodePortAddress::parse(entry).is_none())
    {
        Some(bad) => bail!("{origin}: `{bad}` is neither a CIDR (like 192.0.2.0/24 or 2001:db8::/64; one address is 192.0.2.1/32) nor `primary`"),
        None => Ok(()),
    }
}

/// `--masquerade-all` (flag or file) if kproxy can serve it: the replies
/// of flows source-NATed to this node from backends on other nodes arrive
/// on the external interfaces and are translated there.
fn masquerade_all(asked: bool, interfaces: &[String]) -> anyhow::Result<bool> {
    if asked && interfaces.is_empty() {
        bail!(
            "--masquerade-all (or masqueradeAll in --config) needs --interfaces: the replies of flows source-NATed to this node from backends on other nodes arrive on the external interfaces, and kproxy translates them there"
        );
    }
    Ok(asked)
}

/// The first of `values` that is set and not empty: a flag, then the
/// config file (where kube-proxy reads "" as its default), then the rest.
fn first_set<const N: usize>(values: [Option<String>; N]) -> Option<String> {
    values.into_iter().flatten().find(|v| !v.trim().is_empty())
}

const HEALTHZ_DEFAULT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 10256);
const METRICS_DEFAULT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 10249);

/// A bind address as kube-proxy takes it: `IP:PORT`, `:PORT` (all
/// addresses), or an IP alone (the default port). `None`: the default.
fn bind_address(
    value: Option<String>,
    flag: &str,
    default: std::net::SocketAddr,
) -> anyhow::Result<std::net::SocketAddr> {
    let Some(value) = value else {
        return Ok(default);
    };
    let value = value.trim();
    if let Ok(ip) = value.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, default.port()));
    }
    match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}").parse(),
        None => value.parse(),
    }
    .with_context(|| format!("{flag}: `{value}` is not IP:PORT, :PORT or IP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_fall_through_to_the_next_source() {
        let set = |v: &str| Some(v.to_owned());
        assert_eq!(
            first_set([None, set(""), set("node-b")]).as_deref(),
            Some("node-b")
        );
        assert_eq!(
            first_set([set("node-a"), set("node-b")]).as_deref(),
            Some("node-a")
        );
        assert_eq!(first_set([set(" "), None]), None);
    }

    #[test]
    fn bind_addresses_take_kube_proxys_forms() {
        let bind = |v: Option<&str>| {
            bind_address(
                v.map(str::to_owned),
                "--healthz-bind-address",
                HEALTHZ_DEFAULT,
            )
            .map(|a| a.to_string())
        };
        assert_eq!(bind(None).unwrap(), "0.0.0.0:10256");
        assert_eq!(bind(Some(":9000")).unwrap(), "0.0.0.0:9000");
        assert_eq!(bind(Some("198.18.0.1")).unwrap(), "198.18.0.1:10256");
        assert_eq!(bind(Some("::")).unwrap(), "[::]:10256");
        assert_eq!(bind(Some("[2001:db8::1]:80")).unwrap(), "[2001:db8::1]:80");
        let err = bind(Some("localhost:80")).unwrap_err().to_string();
        assert!(err.contains("--healthz-bind-address"), "{err}");
    }

    #[test]
    fn masquerade_all_needs_the_external_interfaces() {
        let ext = ["ext0".to_owned()];
        assert!(masquerade_all(true, &ext).unwrap());
        assert!(!masquerade_all(false, &[]).unwrap());
        let err = masquerade_all(true, &[]).unwrap_err().to_string();
        assert!(err.contains("needs --interfaces"), "{err}");
    }

    #[test]
    fn nodeport_addresses_refuse_what_is_neither_a_cidr_nor_primary() {
        let check = |entries: &[&str]| {
            let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            check_nodeport_addresses(&entries, "--nodeport-addresses")
        };
        assert!(check(&[]).is_ok());
        assert!(check(&["primary"]).is_ok());
        assert!(check(&["192.0.2.0/24", " 2001:db8::/64 ", "0.0.0.0/0"]).is_ok());
        for bad in [
            "10.0.0.1",
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0/8",
            "primray",
            "",
        ] {
            let err = check(&["192.0.2.0/24", bad]).unwrap_err().to_string();
            assert!(err.contains("--nodeport-addresses"), "{err}");
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("CIDR") && err.contains("primary"), "{err}");
        }
    }
}
