//! `cargo xtask bench`: measures kproxy side by side with a floor and with
//! kube-proxy's iptables and nftables rule sets, and writes
//! docs/BENCHMARKS.md plus SVG plots (DESIGN.md section 6).
//!
//! Usage: bench [--quick] [--parts 1,2,3,4] --out docs/BENCHMARKS.md   (as root)
//!
//! `--parts` runs only some of the four parts (a quicker loop while working
//! on one of them); such a report says which parts it leaves out, so write
//! it somewhere other than docs/.
//!
//! Every comparison is a ratio of numbers measured in this one run on this
//! one machine. Nothing here asserts a time; targets are reported as
//! PASS/MISS in the document.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use etherparse::{PacketBuilder, TcpHeader};
use nix::mount::{umount2, MntFlags};
use proxy_userspace::datapath::{self, Datapath, MapSizes, SkbChecksum};
use proxy_userspace::model::{
    Backend, DesiredState, Frontend, FrontendKey, FrontendKind, Protocol, ServicePortName,
};
use proxy_userspace::sync::Syncer;

struct Config {
    quick: bool,
    /// Which of the four parts run (1-based); all by default.
    parts: Vec<usize>,
    out: PathBuf,
    service_counts: Vec<usize>,
    repeat: u32,
    runs: usize,
    /// Part 1: datapaths loaded per Service count; each run measures
    /// every one.
    datapaths_per_count: usize,
    new_flows: usize,
    cp_services: usize,
    cp_endpoints: usize,
    cp_changes: usize,
}

fn parse_args() -> Result<Config> {
    let mut quick = false;
    let mut parts = vec![1, 2, 3, 4];
    let mut out = PathBuf::from("docs/BENCHMARKS.md");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(args.next().context("--out needs a path")?),
            "--parts" => {
                let list = args.next().context("--parts needs a list such as 1,3")?;
                parts = list
                    .split(',')
                    .map(|p| match p.trim().parse() {
                        Ok(n @ 1..=4) => Ok(n),
                        _ => bail!("--parts takes numbers 1 to 4, not {p:?}"),
                    })
                    .collect::<Result<_>>()?;
            }
            "--kproxy-control-plane" => {
                let mut number = || -> Result<usize> {
                    Ok(args.next().context("--kproxy-control-plane S E")?.parse()?)
                };
                let (services, endpoints) = (number()?, number()?);
                control_plane::child(services, endpoints)?;
                std::process::exit(0);
            }
            other => {
                bail!("unknown argument {other:?}; usage: bench [--quick] [--parts 1,2,3,4] --out FILE")
            }
        }
    }
    Ok(if quick {
        Config {
            quick,
            parts,
            out,
            service_counts: vec![per_packet::MEASURED_SERVICES, 10_000],
            repeat: 1_000_000,
            runs: 3,
            datapaths_per_count: 2,
            new_flows: 10_000,
            cp_services: 2_000,
            cp_endpoints: 10,
            cp_changes: 3,
        }
    } else {
        Config {
            quick,
            parts,
            out,
            service_counts: vec![per_packet::MEASURED_SERVICES, 1_000, 10_000, 100_000],
            repeat: 1_000_000,
            runs: 5,
            datapaths_per_count: 3,
            new_flows: 20_000,
            cp_services: 10_000,
            cp_endpoints: 10,
            cp_changes: 5,
        }
    })
}

/// One part of the report, rendered by the module that measured it.
#[derive(Default)]
struct Section {
    /// The part's heading, method, figures and targets.
    markdown: String,
    /// Targets missed in this run, short names.
    misses: Vec<String>,
    /// Why the misses happen (profile, work per path), shown under
    /// "Misses, and why" when `misses` is not empty.
    why: String,
    /// What this part does not measure yet.
    not_measured: Vec<String>,
}

fn main() -> Result<()> {
    let config = parse_args()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the bench loads eBPF programs and creates network namespaces: run it as root \
         (`cargo xtask bench`)"
    );
    let started = Instant::now();
    let machine = Machine::describe();
    let docs = config
        .out
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&docs)?;
    let part = |n: usize| config.parts.contains(&n);
    let mut sections = Vec::new();
    if part(1) {
        sections.push(per_packet::run(&config, &docs)?);
    }
    if part(2) {
        sections.push(connections::run(&config, &docs)?);
    }
    if part(3) {
        sections.push(control_plane::run(&config, &docs)?);
    }
    if part(4) {
        sections.push(xdp_forward::run(&config, &docs)?);
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = render(&config, &machine, &sections, started.elapsed(), &load_after);
    std::fs::write(&config.out, report)
        .with_context(|| format!("writing {}", config.out.display()))?;
    eprintln!(
        "bench: wrote {} in {:.0} s",
        config.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// Raw bpf(2): the floor program (`r0 = 0 (TC_ACT_OK); exit` as a tc
// program, measured exactly like kproxy's) and a symmetric
// BPF_PROG_TEST_RUN for both, shared with the lab.
// ---------------------------------------------------------------------------
#[path = "../../tests/raw_bpf/mod.rs"]
mod raw;

mod connections;
mod control_plane;
mod kube_rules;
mod lab;
mod per_packet;
mod plot;
mod services;
mod sys;
mod xdp_forward;

use kube_rules::*;
use lab::*;
use plot::*;
use services::*;
use sys::*;

fn median_duration(values: &[Duration]) -> Duration {
    let mut v: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    Duration::from_secs_f64(median(&mut v))
}
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
/// The nearest-rank percentile `p` (0..=1) of `sorted` (ascending), or
/// None when it is empty.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last as f64 * p).round() as usize])
}
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

struct Machine {
    cpu: String,
    nproc: usize,
    kernel: String,
    date: String,
    load_before: String,
    mem_total: String,
    /// The kernel's Spectre v2 and SRSO mitigations: they set what an
    /// indirect call and a return cost, so what a BPF call costs.
    call_mitigations: String,
    iptables_version: String,
    nft_version: String,
}

impl Machine {
    fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let out = |cmd: &str, args: &[&str]| {
            Command::new(cmd)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: out("uname", &["-r"]),
            date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_before: std::fs::read_to_string("/proc/loadavg").unwrap_or_default(),
            mem_total: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .unwrap_or("")
                .trim()
                .to_owned(),
            call_mitigations: ["spectre_v2", "spec_rstack_overflow"]
                .iter()
                .map(|name| {
                    let path = format!("/sys/devices/system/cpu/vulnerabilities/{name}");
                    let state = std::fs::read_to_string(path)
                        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
                    format!("{name}: {state}")
                })
                .collect::<Vec<_>>()
                .join("; "),
            iptables_version: out("iptables-restore", &["--version"]),
            nft_version: out("nft", &["--version"]),
        }
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "**MISS**"
    }
}

fn render(
    config: &Config,
    machine: &Machine,
    sections: &[Section],
    elapsed: Duration,
    load_after: &str,
) -> String {
    let mut md = String::new();
    let command = if config.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `{command}` (which runs, as root, `cargo run --release -p proxy-userspace \
         --example bench --{} --out docs/BENCHMARKS.md`). Do not edit by hand: rerun it.\n",
        if config.quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "Every comparison below is a ratio of numbers measured side by side in this one run \
         on this one machine; absolute numbers on a shared machine drift from run to run. \
         No test asserts a time.\n"
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| CPU | {} |", machine.cpu);
    let _ = writeln!(md, "| nproc | {} |", machine.nproc);
    let _ = writeln!(md, "| memory | {} |", machine.mem_total);
    let _ = writeln!(md, "| kernel | {} |", machine.kernel);
    let _ = writeln!(
        md,
        "| call and return mitigations | {} |",
        machine.call_mitigations
    );
    let _ = writeln!(md, "| date | {} |", machine.date);
    let _ = writeln!(
        md,
        "| load average (1/5/15 min) before / after | {} / {} |",
        load_fields(&machine.load_before),
        load_fields(load_after)
    );
    let _ = writeln!(
        md,
        "| mode | {}{} |",
        if config.quick { "--quick" } else { "full" },
        if config.parts.len() < 4 {
            format!(", only parts {:?} (not a complete report)", config.parts)
        } else {
            String::new()
        }
    );
    let _ = writeln!(md, "| bench wall time | {:.0} s |", elapsed.as_secs_f64());
    let _ = writeln!(
        md,
        "| iptables-restore | {} |",
        or_missing(&machine.iptables_version)
    );
    let _ = writeln!(md, "| nft | {} |\n", or_missing(&machine.nft_version));
    let _ = writeln!(
        md,
        "This is a shared 2-core virtual machine (other builds may run at the same time) \
         without hardware performance counters, so `bpftool prog profile` cannot run here.\n"
    );

    for section in sections {
        md.push_str(&section.markdown);
    }
    let misses: Vec<&String> = sections.iter().flat_map(|s| &s.misses).collect();
    let _ = writeln!(md, "\n## Misses, and why\n");
    if misses.is_empty() {
        let _ = writeln!(md, "None in this run.\n");
    } else {
        let _ = writeln!(
            md,
            "Missed in this run: {}.\n",
            misses
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
        for section in sections.iter().filter(|s| !s.misses.is_empty()) {
            let _ = writeln!(md, "{}", section.why);
        }
    }

    let _ = writeln!(md, "## Not measured yet\n");
    for section in sections {
        for item in &section.not_measured {
            let _ = writeln!(md, "- {item}");
        }
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "## Reproduce\n");
    let _ = writeln!(
        md,
        "```sh\n# as root; installs iptables and nftables if missing (cargo xtask setup)\n\
         cargo xtask bench --quick   # under 5 minutes: {{3, 10 000}} Services, 2 000 x 10 control plane\n\
         cargo xtask bench           # {{3, 1 000, 10 000, 100 000}} Services, 10 000 x 10 control plane\n\
         # both run: cargo run --release -p proxy-userspace --example bench -- [--quick] --out docs/BENCHMARKS.md\n\
         # while working on one part, run only it (a partial report, so not into docs/):\n\
         cargo run --release -p proxy-userspace --example bench -- --quick --parts 1 --out /tmp/bench/BENCHMARKS.md\n```"
    );
    md
}

fn load_fields(s: &str) -> String {
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn or_missing(s: &str) -> &str {
    if s.is_empty() {
        "not installed"
    } else {
        s
    }
}
