//! `cargo xtask setup | build | run | demo | test | bench`.
//!
//! xtask only orchestrates: the eBPF object is built by proxy-userspace's
//! build.rs (aya-build); tests are ordinary cargo tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.0";
/// Debian packages the lab, the demo and the tests use, by the command that
/// proves each is there.
const DEBIAN_PACKAGES: [(&str, &str); 4] = [
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    // The two-node lab turns checksum offload off on its veths.
    ("ethtool", "ethtool"),
];
/// What only the bench needs: it compares against kube-proxy's iptables and
/// nftables modes (installed by `cargo xtask bench`, not by every test run).
/// perf: the bench profiles each per-packet path with `perf record -e cpu-clock`.
const BENCH_PACKAGES: [(&str, &str); 3] = [
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("perf", "linux-perf"),
];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (idempotent, quick when done).
    Setup,
    /// Build kproxy (with its embedded eBPF object) in release mode.
    Build,
    /// Build and run the daemon: `cargo xtask run -- --source dir:manifests/examples ...`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, start a self-contained lab, send traffic, show the result.
    Demo,
    /// Run every test: unit, packet fixtures, end-to-end lab tests, lints.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: writes docs/BENCHMARKS.md and docs/bench-*.svg.
    Bench {
        /// Fewer Service counts and a smaller control-plane set (under 5 minutes).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            cargo(&["build", "--release", "-p", "proxy-userspace"])
        }
        Cmd::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "-p", "proxy-userspace"])?;
            let mut run = vec!["run".to_owned()];
            if args.first().map(String::as_str) == Some("run") {
                run.clear();
            }
            run.extend(args);
            check(Command::new(root.join("target/release/kproxy")).args(&run))
        }
        Cmd::Demo => {
            setup()?;
            require_root("the demo creates network namespaces and loads eBPF programs")?;
            cargo(&["build", "-p", "proxy-userspace", "--bin", "kproxy"])?;
            let kproxy = root.join("target/debug/kproxy");
            check(
                Command::new("cargo")
                    .args([
                        "run",
                        "-q",
                        "-p",
                        "proxy-userspace",
                        "--example",
                        "demo",
                        "--",
                    ])
                    .arg(&kproxy)
                    .arg(root.join("manifests/examples")),
            )
        }
        Cmd::Test { no_lint, args } => {
            setup()?;
            require_root("the packet fixtures and lab tests load eBPF programs and create network namespaces")?;
            if !no_lint {
                cargo(&["fmt", "--all", "--check"])?;
                cargo(&[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "proxy-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])?;
            }
            let mut test = vec!["test", "--workspace", "--exclude", "proxy-ebpf"];
            test.extend(args.iter().map(String::as_str));
            // The lab tests are heavy; two at a time suits these 2-core machines.
            let mut cmd = Command::new("cargo");
            cmd.args(&test)
                .env("RUST_TEST_THREADS", "2")
                .env("KPROXY_REQUIRE_LAB", "1");
            check(&mut cmd)
        }
        Cmd::Bench { quick } => {
            setup()?;
            install_packages(&BENCH_PACKAGES)?;
            require_root("the bench loads eBPF programs and creates network namespaces")?;
            // The bench runs the kproxy binary in its labs: build it with
            // the bench, so it is never stale.
            cargo(&[
                "build",
                "--release",
                "-p",
                "proxy-userspace",
                "--bin",
                "kproxy",
                "--example",
                "bench",
            ])?;
            let mut run = vec![
                "run",
                "--release",
                "-p",
                "proxy-userspace",
                "--example",
                "bench",
                "--",
            ];
            if quick {
                run.push("--quick");
            }
            run.extend(["--out", "docs/BENCHMARKS.md"]);
            cargo(&run)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    check(Command::new("cargo").args(args))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("run this as root: {why}");
    }
    Ok(())
}

/// Installs rust-src for nightly, bpf-linker, and the Debian tools; mounts
/// bpffs at /sys/fs/bpf. Each step checks first, so a second run is quick.
/// Installs the Debian packages whose command is missing.
fn install_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(cmd, _)| !succeeds(Command::new("sh").args(["-c", &format!("command -v {cmd}")])))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root("installing Debian packages needs root")?;
    eprintln!("setup: installing {}", missing.join(" "));
    check(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn setup() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: installing rust-src for the nightly toolchain");
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("is the nightly toolchain installed (`rustup toolchain install nightly`)?")?;
    }

    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        cargo(&[
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])?;
    }

    install_packages(&DEBIAN_PACKAGES)?;

    if is_root() && Path::new("/sys/fs/bpf").is_dir() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
        {
            eprintln!("setup: mounting bpffs at /sys/fs/bpf");
            check(Command::new("mount").args(["-t", "bpf", "bpffs", "/sys/fs/bpf"]))?;
        }
    }
    Ok(())
}
