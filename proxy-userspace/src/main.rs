//! The `kproxy` command line.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_userspace::daemon::{self, DaemonConfig, Source};
use proxy_userspace::datapath::{self, MapSizes, PinnedMaps};
use proxy_userspace::inspect;
use proxy_userspace::model::ModelConfig;

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

#[derive(clap::Args)]
struct RunArgs {
    /// `dir:PATH` (a directory of Service/EndpointSlice/Node YAML) or `kube`.
    #[arg(long)]
    source: String,
    /// This node's name; decides which endpoints are local.
    #[arg(long, env = "NODE_NAME")]
    hostname_override: Option<String>,
    /// External interfaces for XDP (NodePort, LoadBalancer, externalIPs).
    #[arg(long, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Pod-facing interfaces (globs, e.g. `veth*,cali*`); new ones are picked up.
    #[arg(long, value_delimiter = ',')]
    pod_interfaces: Vec<String>,
    /// Where maps and links are pinned (bpffs; mounted if it is not).
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    bpf_pin_path: PathBuf,
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Shortest time between two syncs (bursts coalesce), e.g. `1s`, `0s`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    min_sync_period: Duration,
    /// Full resync period: maps are re-read and drift repaired.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    sync_period: Duration,
    #[arg(long, default_value_t = proxy_common::SERVICES_MAX_ENTRIES)]
    services_map_size: u32,
    #[arg(long, default_value_t = proxy_common::BACKENDS_MAX_ENTRIES)]
    backends_map_size: u32,
    #[arg(long, default_value_t = proxy_common::CONNTRACK_MAX_ENTRIES)]
    conntrack_map_size: u32,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 1s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unit must be ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
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
                    println!("pin path:          {}", bpf_pin_path.display());
                    println!("service entries:   {}", contents.services.len());
                    println!("backends:          {}", contents.backends.len());
                    println!("conntrack entries: {}", maps.conntrack()?.len());
                    for (name, value) in stats {
                        println!("{name:<18} {value}");
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
    let source = match args.source.split_once(':') {
        Some(("dir", path)) => Source::Dir(PathBuf::from(path)),
        _ if args.source == "kube" => {
            bail!("--source kube is not implemented yet; use --source dir:PATH")
        }
        _ => bail!(
            "--source must be `dir:PATH` or `kube`, not `{}`",
            args.source
        ),
    };
    if !args.interfaces.is_empty() {
        bail!("--interfaces (XDP for NodePort/LoadBalancer) is not implemented yet; leave it out");
    }
    if args.kubeconfig.is_some() || args.config.is_some() {
        bail!("--kubeconfig and --config are not implemented yet; leave them out");
    }
    let pod_interfaces = args
        .pod_interfaces
        .iter()
        .map(|g| glob::Pattern::new(g).with_context(|| format!("--pod-interfaces: bad glob `{g}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if pod_interfaces.is_empty() {
        tracing::warn!("no --pod-interfaces given: ClusterIP traffic from pods is not intercepted");
    }
    let node_name = match args.hostname_override {
        Some(n) => n,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    tracing::info!(
        healthz = %args.healthz_bind_address,
        metrics = %args.metrics_bind_address,
        "health and metrics servers are not served yet"
    );
    let config = DaemonConfig {
        source,
        model: ModelConfig {
            node_name: node_name.to_lowercase(),
            proxy_name: None,
        },
        pin_dir: args.bpf_pin_path,
        pod_interfaces,
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        map_sizes: MapSizes {
            services: args.services_map_size,
            backends: args.backends_map_size,
            conntrack: args.conntrack_map_size,
            ..MapSizes::default()
        },
        interface_poll: Duration::from_secs(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(daemon::run(config))
}
