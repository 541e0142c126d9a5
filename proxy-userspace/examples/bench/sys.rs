//! Processes and network namespaces: timed children, temp files.

use super::*;

use std::os::fd::AsRawFd as _;

pub fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace of the bench's own, deleted on drop (also on error):
/// the root namespace's iptables and nftables are never touched.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("kproxy-bench-{}-{tag}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &name]).status()?;
        ensure!(status.success(), "ip netns add {name} failed");
        Ok(Self(name))
    }

    /// Runs `cmd args` inside the namespace, stdin from `input` if given;
    /// returns the wall time and the child's max RSS (KiB).
    pub fn run(&self, cmd: &[&str], input: Option<&Path>) -> Result<(Duration, u64)> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .stdout(Stdio::null());
        if let Some(input) = input {
            command.stdin(File::open(input)?);
        }
        // `ip netns exec` execs the command in the same process, so the
        // child's rusage is the tool's.
        wait_timed(&mut command, &format!("{cmd:?} in {}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A namespace plus an open handle for setns.
pub struct Ns {
    pub file: File,
    pub netns: Netns,
}

impl Ns {
    pub fn new(tag: &str) -> Result<Self> {
        let netns = Netns::new(tag)?;
        let file = File::open(format!("/var/run/netns/{}", netns.0))
            .with_context(|| format!("opening netns {}", netns.0))?;
        Ok(Self { file, netns })
    }
    pub fn name(&self) -> &str {
        &self.netns.0
    }
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        ip(&[
            "netns",
            "exec",
            self.name(),
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
    }
    /// Runs `f` on a new thread inside this namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&self.file)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a lab thread panicked"))?
        })
    }
}

pub fn enter(file: &File) -> Result<()> {
    // SAFETY: setns on an open namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(rc == 0, "setns: {}", io::Error::last_os_error());
    Ok(())
}

pub fn tempfile_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kproxy-bench-{}-{tag}", std::process::id()))
}

/// Spawns `command`, waits for it with wait4; returns the wall time and the
/// child's max RSS (KiB). Fails with its stderr if it fails.
pub fn wait_timed(command: &mut Command, what: &str) -> Result<(Duration, u64)> {
    let stderr = tempfile_path("stderr");
    command.stderr(File::create(&stderr)?);
    let start = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // The std Child is never waited on: wait4 reaps it and reports its rusage.
    // SAFETY: a pid we spawned and have not reaped.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let elapsed = start.elapsed();
    ensure!(pid > 0, "wait4: {}", io::Error::last_os_error());
    let message = std::fs::read_to_string(&stderr).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr);
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what} failed: {}",
        message.lines().take(5).collect::<Vec<_>>().join(" / ")
    );
    Ok((elapsed, usage.ru_maxrss as u64))
}

pub fn write_input(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The kproxy binary next to the bench's own (`target/release/kproxy` for
/// `target/release/examples/bench`). `cargo run --example` does not build
/// a package's binaries: `cargo xtask bench` builds both first. (No
/// freshness check: cargo does not relink a kproxy that did not change.)
pub fn kproxy_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench is not in target/<profile>/examples")?
        .join("kproxy");
    ensure!(
        bin.exists(),
        "{} not found: run the bench with `cargo xtask bench`, which builds it \
         (or `cargo build --release -p proxy-userspace --bin kproxy` first)",
        bin.display()
    );
    Ok(bin)
}
