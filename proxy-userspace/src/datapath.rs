//! The only module that touches the kernel: loads the eBPF object, pins its
//! maps and links under the pin path, attaches to interfaces, and implements
//! [`MapWriter`] over the real maps.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::xdp::XdpLink;
use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp,
};
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfError, EbpfLoader};
use proxy_common::{
    AddressFilter, AffinityKey, AffinityValue, BackendValue, ConntrackKey, ConntrackKey4,
    ConntrackKeyV2, ConntrackValue, DatapathConfig, FrontendStats, MaglevKey, RevNatValue,
    ServiceKey, ServiceValue, SourceRange, ADDRESS_FILTER_MAP, AFFINITY_MAP, ALL_MAPS,
    BACKENDS_MAP, BACKEND_CONNS_MAP, CLOCK_PROGRAM, CONFIG_MAP, CONNTRACK_MAP, CONNTRACK_V2_MAP,
    CONNTRACK_V3_MAP, FRONTEND_STATS_MAP, LEGACY_MAPS, MAGLEV_MAP, REV_NAT_MAP, RR_MAP,
    SERVICES_MAP, SOURCE_RANGES_MAP, STATS_MAP, TC_EXTERNAL_PROGRAM, TC_POD_PROGRAM,
    XDP_EXTERNAL_PROGRAM,
};
use thiserror::Error;

use crate::address_filter::AddressFilterBits;
use crate::sync::{MapContents, MapWriter, SourceRangeKey, WriteError};

mod batch;
mod kfunc;

pub use kfunc::{KfuncError, SkbChecksumState};

/// The eBPF object built by build.rs (aya-build) and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const LINKS_DIR: &str = "links";

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "this kproxy binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it with `cargo xtask build`"
    )]
    NoObject,
    #[error("cannot prepare the pin path {path}: {source}; run as root on a kernel with bpffs")]
    PinPath { path: PathBuf, source: io::Error },
    #[error(
        "loading the eBPF object failed: {0}; if a pinned map has an incompatible layout, run `kproxy cleanup --bpf-pin-path ...` first"
    )]
    Load(#[from] EbpfError),
    #[error("preparing the eBPF object for this kernel: {0}")]
    Kfunc(#[from] KfuncError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("attaching to interface {interface}: {source}")]
    Attach {
        interface: String,
        source: ProgramError,
    },
    #[error(
        "attaching XDP in {mode} mode to {interface}: {source}; if its driver has no native XDP, run with --xdp-mode generic (slower) or --xdp-mode off (tc only)"
    )]
    AttachXdp {
        interface: String,
        mode: XdpMode,
        source: ProgramError,
    },
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error(
        "no kproxy maps under {path}: is this the --bpf-pin-path kproxy runs with, and has it started?"
    )]
    NotPinned { path: PathBuf },
    #[error("map {name}: {source}; is the pin path right and kproxy's datapath loaded?")]
    Map {
        name: &'static str,
        source: MapError,
    },
}

/// Map capacities (flags may override the compiled-in defaults).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub rev_nat: u32,
    pub conntrack: u32,
    pub maglev: u32,
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: proxy_common::SERVICES_MAX_ENTRIES,
            backends: proxy_common::BACKENDS_MAX_ENTRIES,
            rev_nat: proxy_common::REV_NAT_MAX_ENTRIES,
            conntrack: proxy_common::CONNTRACK_MAX_ENTRIES,
            maglev: proxy_common::MAGLEV_MAX_ENTRIES,
            affinity: proxy_common::AFFINITY_MAX_ENTRIES,
        }
    }
}

/// How the external interfaces run XDP (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before an skb exists (the fast path).
    Native,
    /// In the kernel stack, for drivers without native XDP (slower).
    Generic,
    /// No XDP: the tc program on the same interfaces does the whole job.
    Off,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Off => "off",
        })
    }
}

impl std::str::FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown XDP mode `{other}`: use native, generic or off"
            )),
        }
    }
}

/// Which program a pinned link attaches, by pin name prefix.
const POD_LINK: &str = "tc-pod-ingress";
const EXTERNAL_TC_LINK: &str = "tc-external-ingress";
const HOST_LINK: &str = "tc-host-ingress";
const XDP_LINK_PREFIX: &str = "xdp-external-";

/// The loaded datapath: programs, pinned maps, and pinned links.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// How the datapath reads the time; `None`: `bpf_ktime_get_coarse_ns`.
    clock: Option<JiffyClock>,
    /// The backend epoch every config write carries (see
    /// `proxy_common::CONFIG_BACKEND_EPOCH_SHIFT`).
    backend_epoch: u8,
    /// Where the tc programs read an skb's checksum state; `None`: they
    /// update L4 checksums through helpers (see `kfunc`).
    skb_checksum: Option<SkbChecksumState>,
}

/// How the tc programs keep an L4 checksum right when they rewrite a
/// packet (see `datapath/kfunc.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SkbChecksum {
    /// Read the skb's checksum state and update the checksum in place,
    /// where the kernel allows it (its BTF and the `bpf_cast_to_kern_ctx`
    /// kfunc); through the `bpf_l4_csum_replace` helper otherwise.
    #[default]
    Read,
    /// Always through the helper (what a kernel without BTF gets).
    Helpers,
}

/// The datapath's clock: CLOCK_MONOTONIC at tick resolution as
/// `jiffies * tick_ns + offset_ns`. Jiffies are one load for a BPF program
/// (the verifier inlines `bpf_jiffies64`); a clock helper is a call and a
/// return, a fair share of an established packet's cost. With a tickless
/// kernel (NO_HZ, the common configuration) jiffies are counted on a grid
/// of CLOCK_MONOTONIC and do not drift from it; with a periodic tick they
/// count timer interrupts and may, so the daemon re-checks the scale at
/// every conntrack sweep ([`Datapath::check_clock`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyClock {
    /// Nanoseconds per jiffy (the kernel's TICK_NSEC, about 1e9 / HZ).
    pub tick_ns: u64,
    /// CLOCK_MONOTONIC at jiffy zero (wrapping).
    pub offset_ns: u64,
}

/// A jiffy edge seen by `CLOCK_PROGRAM`: jiffies became `jiffies` right
/// after a read at CLOCK_MONOTONIC `before_ns` (the next read, close
/// behind it, saw the new value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyEdge {
    pub jiffies: u64,
    pub before_ns: u64,
}

/// Why the jiffies clock could not be measured. The datapath then reads
/// `bpf_ktime_get_coarse_ns`: the same clock, a few ns more per packet.
#[derive(Debug, Error)]
pub enum ClockError {
    #[error("clock_getres(CLOCK_MONOTONIC_COARSE): {0}")]
    Resolution(nix::Error),
    #[error("the coarse clock's resolution {0} ns is no kernel tick (HZ between 24 and 10000)")]
    OddTick(u64),
    #[error(
        "the eBPF object has no {CLOCK_PROGRAM} program; rebuild kproxy (`cargo xtask build`)"
    )]
    Missing,
    #[error("loading {CLOCK_PROGRAM}: {0}")]
    Load(ProgramError),
    #[error("test-running {CLOCK_PROGRAM}: {0}")]
    Run(ProgramError),
    #[error("jiffies did not advance twice within {0:?}")]
    NoTicks(Duration),
    #[error(
        "jiffies advanced {jiffies} ticks in {elapsed_ns} ns, which does not fit a tick of {tick_ns} ns"
    )]
    Mismatch {
        jiffies: u64,
        elapsed_ns: u64,
        tick_ns: u64,
    },
}

impl JiffyClock {
    /// From the kernel tick and two jiffy edges. Each edge's `before_ns`
    /// precedes the moment jiffies changed, so the clock is anchored at the
    /// earlier of the two: the datapath's reading trails CLOCK_MONOTONIC by
    /// up to a tick plus the edge's bracket, and is ahead by no more than
    /// the tick interrupt's jitter (ages saturate at zero). Checks that the ticks
    /// between the edges took as long as `tick_ns` says (within half a
    /// tick: the brackets and the tick interrupt's latency).
    pub fn from_edges(
        tick_ns: u64,
        first: JiffyEdge,
        second: JiffyEdge,
    ) -> Result<Self, ClockError> {
        let jiffies = second.jiffies.wrapping_sub(first.jiffies);
        let elapsed_ns = second.before_ns.wrapping_sub(first.before_ns);
        let expected = jiffies.saturating_mul(tick_ns);
        if jiffies == 0 || jiffies > 1000 || elapsed_ns.abs_diff(expected) > tick_ns / 2 {
            return Err(ClockError::Mismatch {
                jiffies,
                elapsed_ns,
                tick_ns,
            });
        }
        let offset = |e: JiffyEdge| e.before_ns.wrapping_sub(e.jiffies.wrapping_mul(tick_ns));
        let (a, b) = (offset(first), offset(second));
        // The earlier anchor of the two (wrapping).
        let offset_ns = if (b.wrapping_sub(a) as i64) < 0 { b } else { a };
        Ok(Self { tick_ns, offset_ns })
    }

    /// `config` with this clock's fields (zero: no clock).
    fn apply(clock: Option<Self>, config: &DatapathConfig) -> DatapathConfig {
        let (tick, offset) = clock.map_or((0, 0), |c| (c.tick_ns, c.offset_ns));
        DatapathConfig {
            clock_tick_ns: tick,
            clock_offset_ns: offset,
            ..*config
        }
    }

    /// What the datapath reads at `jiffies`.
    pub fn reading_ns(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }

    /// Test-runs `program` until jiffies have changed twice between two
    /// close reads (at most 30 ticks, and at least 100 ms): the edges give
    /// the offset and check the tick the coarse clock reports.
    fn measure(program: &Xdp) -> Result<Self, ClockError> {
        let res = nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
            .map_err(ClockError::Resolution)?;
        let tick_ns = res.tv_sec() as u64 * 1_000_000_000 + res.tv_nsec() as u64;
        if !(100_000..=41_666_667).contains(&tick_ns) {
            return Err(ClockError::OddTick(tick_ns));
        }
        // An edge counts only when the reads around it are close (this
        // thread was not preempted between them).
        let bracket = tick_ns / 8;
        let limit = Duration::from_nanos(tick_ns * 30).max(Duration::from_millis(100));
        let deadline = std::time::Instant::now() + limit;
        let mut last = clock_sample(program)?;
        let mut edges = Vec::with_capacity(2);
        while edges.len() < 2 {
            if std::time::Instant::now() > deadline {
                return Err(ClockError::NoTicks(limit));
            }
            let (jiffies, ns) = clock_sample(program)?;
            if jiffies != last.0 && ns.wrapping_sub(last.1) <= bracket {
                edges.push(JiffyEdge {
                    jiffies,
                    before_ns: last.1,
                });
            }
            last = (jiffies, ns);
        }
        Self::from_edges(tick_ns, edges[0], edges[1])
    }
}

/// One run of `CLOCK_PROGRAM`: (jiffies, CLOCK_MONOTONIC ns) read together.
fn clock_sample(program: &Xdp) -> Result<(u64, u64), ClockError> {
    // An Ethernet header's worth of frame; the program overwrites its
    // first 16 bytes.
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .map_err(ClockError::Run)?;
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&out[at..at + 8]);
        u64::from_ne_bytes(bytes)
    };
    Ok((word(0), word(8)))
}

/// Measures the jiffies clock, trying up to `CLOCK_TRIES` times: a tick
/// interrupt delayed on a busy machine fails the tick check, and another
/// try usually finds clean edges.
fn measure_with_retries(program: &Xdp) -> Result<JiffyClock, ClockError> {
    let mut tries = 1;
    loop {
        match JiffyClock::measure(program) {
            Err(ClockError::Mismatch { .. } | ClockError::NoTicks(_)) if tries < CLOCK_TRIES => {
                tries += 1
            }
            done => break done,
        }
    }
}

/// The embedded object, patched for `state` (see `kfunc`), with its three
/// packet programs loaded; and whether its tc programs read the skb's
/// checksum state.
fn load_programs(
    loader: &mut EbpfLoader<'_>,
    state: Option<&SkbChecksumState>,
) -> Result<(Ebpf, bool), DatapathError> {
    let patched = kfunc::patch(EBPF_OBJECT, state)?;
    let object = &bytemuck::cast_slice(&patched.words)[..EBPF_OBJECT.len()];
    let mut ebpf = loader.load(object)?;
    for name in [TC_POD_PROGRAM, TC_EXTERNAL_PROGRAM] {
        program_mut::<SchedClassifier>(&mut ebpf, name)?
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
    }
    let name = XDP_EXTERNAL_PROGRAM;
    program_mut::<Xdp>(&mut ebpf, name)?
        .load()
        .map_err(|source| DatapathError::Program { name, source })?;
    Ok((ebpf, patched.reads_state))
}

/// Program `name` of `ebpf`, as the program type it must be.
fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// How often the clock is measured before the datapath falls back to the
/// coarse clock.
const CLOCK_TRIES: u32 = 5;

/// How far the datapath's reading may trail CLOCK_MONOTONIC before
/// [`Datapath::check_clock`] measures again, in ticks: one tick by design,
/// plus interrupt latency and ticks a busy (virtual) CPU delays.
const CLOCK_DRIFT_TICKS: u64 = 6;

impl Datapath {
    /// Loads the programs and opens (or creates) the pinned maps under
    /// `pin_dir`. Maps that already exist there are reused with their
    /// contents: this is how a restarted kproxy keeps established flows.
    pub fn load(pin_dir: &Path, sizes: MapSizes) -> Result<Self, DatapathError> {
        Self::load_with(pin_dir, sizes, SkbChecksum::Read)
    }

    /// [`Datapath::load`], choosing how the tc programs update checksums.
    pub fn load_with(
        pin_dir: &Path,
        sizes: MapSizes,
        skb_checksum: SkbChecksum,
    ) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        ensure_bpffs(pin_dir)?;
        ensure_dir(&pin_dir.join(LINKS_DIR))?;
        let pins: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(SERVICES_MAP, sizes.services)
            .map_max_entries(BACKENDS_MAP, sizes.backends)
            .map_max_entries(REV_NAT_MAP, sizes.rev_nat)
            // Indexed by rev-NAT id, which starts at 1.
            .map_max_entries(FRONTEND_STATS_MAP, sizes.rev_nat.saturating_add(1))
            .map_max_entries(CONNTRACK_MAP, sizes.conntrack)
            .map_max_entries(MAGLEV_MAP, sizes.maglev)
            .map_max_entries(AFFINITY_MAP, sizes.affinity);
        let mut state = match skb_checksum {
            SkbChecksum::Read => SkbChecksumState::probe()
                .inspect_err(|e| {
                    tracing::warn!(
                        error = %e,
                        "tc programs update L4 checksums through bpf_l4_csum_replace (slower)"
                    )
                })
                .ok(),
            SkbChecksum::Helpers => None,
        };
        let ebpf = match load_programs(&mut loader, state.as_ref()) {
            Ok((ebpf, reads_state)) => {
                if state.is_some() && !reads_state {
                    tracing::warn!(
                        "this build's eBPF object does not read the skb checksum state everywhere; tc programs update L4 checksums through bpf_l4_csum_replace (slower) where it does not"
                    );
                    state = None;
                }
                ebpf
            }
            // A kernel whose BTF names the kfunc but whose verifier does
            // not take it from a tc program: the helper path still works.
            // (Other errors, a pinned map of another layout say, would
            // only fail again.)
            Err(e @ DatapathError::Program { .. }) if state.is_some() => {
                tracing::warn!(
                    error = %e,
                    "loading with the skb checksum state read failed; tc programs update L4 checksums through bpf_l4_csum_replace (slower)"
                );
                state = None;
                load_programs(&mut loader, None)?.0
            }
            Err(e) => return Err(e),
        };
        if let Some(state) = &state {
            tracing::info!(
                ip_summed_byte = state.byte,
                ip_summed_shift = state.shift,
                "tc programs read the skb checksum state (bpf_cast_to_kern_ctx) and update L4 checksums in place"
            );
        }
        let mut ebpf = ebpf;
        let clock = measure_clock(&mut ebpf);
        let mut datapath = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            clock,
            backend_epoch: 0,
            skb_checksum: state,
        };
        // A new epoch: a restarted kproxy cannot know which backends went
        // away while none ran, so every UDP flow re-checks its backend once.
        datapath.backend_epoch = datapath
            .read_config()
            .map_or(0, |c| c.backend_epoch().wrapping_add(1));
        // Until the caller writes its tunables, the ones pinned (or the
        // defaults) run on the measured clock.
        datapath.set_clock(clock)?;
        datapath.upgrade_conntrack();
        // Maps of an older layout cannot be used by this datapath.
        for legacy in LEGACY_MAPS {
            let path = pin_dir.join(legacy);
            if path.exists() {
                tracing::warn!(
                    map = legacy,
                    "removing a map of an older kproxy layout; flows it tracked are forgotten"
                );
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(datapath)
    }

    /// Where the tc programs read an skb's checksum state (they update L4
    /// checksums in place); `None`: through the checksum helper.
    pub fn skb_checksum_state(&self) -> Option<SkbChecksumState> {
        self.skb_checksum
    }

    /// Carries the flows of the conntrack maps an older kproxy pinned
    /// (`CONNTRACK_V3`, keyed by 16-byte addresses; `CONNTRACK_V2`, whose key
    /// held the direction) over into the current IPv4 map, so an upgrade
    /// does not break established connections. Best effort: what cannot be
    /// read or written is logged, and the old maps are removed either way.
    fn upgrade_conntrack(&mut self) {
        self.carry_conntrack(CONNTRACK_V3_MAP, |data| {
            let map: BpfHashMap<MapData, ConntrackKey, ConntrackValue> =
                BpfHashMap::try_from(Map::LruHashMap(data))?;
            Ok(map.iter().filter_map(Result::ok).collect())
        });
        self.carry_conntrack(CONNTRACK_V2_MAP, |data| {
            let map: BpfHashMap<MapData, ConntrackKeyV2, ConntrackValue> =
                BpfHashMap::try_from(Map::LruHashMap(data))?;
            Ok(map
                .iter()
                .filter_map(Result::ok)
                .map(|(key, value)| key.upgrade(&value))
                .collect())
        });
    }

    /// Copies the entries `read` finds in the pinned map `name` into the
    /// current conntrack map.
    fn carry_conntrack(
        &mut self,
        name: &'static str,
        read: impl FnOnce(MapData) -> Result<Vec<(ConntrackKey, ConntrackValue)>, MapError>,
    ) {
        let path = self.pin_dir.join(name);
        if !path.exists() {
            return;
        }
        let old = match MapData::from_pin(&path).and_then(read) {
            Ok(old) => old,
            Err(error) => {
                tracing::warn!(map = name, %error, "cannot read the older conntrack map; its flows are forgotten");
                return;
            }
        };
        let Ok(mut map) = self.conntrack_map() else {
            return;
        };
        // Entries the current datapath already has stay: they are newer.
        // The IPv4 map holds IPv4 flows only (there are no others yet).
        const BPF_NOEXIST: u64 = 1;
        let copied = old
            .iter()
            .filter_map(|(key, value)| Some((ConntrackKey4::from_mapped(key)?, value)))
            .filter(|(key, value)| map.insert(key, *value, BPF_NOEXIST).is_ok())
            .count();
        tracing::info!(
            map = name,
            copied,
            of = old.len(),
            "carried the flows of an older kproxy's conntrack map over"
        );
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The loaded pod program, for BPF_PROG_TEST_RUN fixtures.
    pub fn pod_program(&mut self) -> &mut SchedClassifier {
        self.classifier(TC_POD_PROGRAM)
    }

    /// The tc program of the external interfaces.
    pub fn external_tc_program(&mut self) -> &mut SchedClassifier {
        self.classifier(TC_EXTERNAL_PROGRAM)
    }

    /// The XDP program of the external interfaces.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_EXTERNAL_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("the XDP program was loaded in Datapath::load")
    }

    fn classifier(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("the tc programs were loaded in Datapath::load")
    }

    /// Attaches the pod program at tcx ingress of `interface`, or atomically
    /// swaps it into the link a previous kproxy pinned for the same
    /// interface. The link is pinned, so it outlives this process.
    pub fn attach_pod_interface(
        &mut self,
        interface: &str,
        ifindex: u32,
    ) -> Result<(), DatapathError> {
        self.attach_tc(TC_POD_PROGRAM, POD_LINK, interface, ifindex)
    }

    /// Attaches the pod program to the loopback interface: the node's own
    /// processes reaching its NodePorts (and externalIPs / LB IPs it holds)
    /// send through `lo`, and get Cluster behaviour there like pods do.
    /// The translated packet is then forwarded from `lo` with a local
    /// source, which the kernel accepts only with `accept_local` on `lo`.
    pub fn attach_host_loopback(&mut self) -> Result<(), DatapathError> {
        let ifindex = nix::net::if_::if_nametoindex("lo").map_err(|e| DatapathError::Attach {
            interface: "lo".into(),
            source: ProgramError::IOError(io::Error::from(e)),
        })?;
        self.attach_tc(TC_POD_PROGRAM, HOST_LINK, "lo", ifindex)?;
        allow_local_sources("lo");
        Ok(())
    }

    /// Attaches the external programs to `interface`: tc ingress always
    /// (it handles what XDP passes on, or everything with `--xdp-mode
    /// off`), XDP in `mode` unless off. Pinned links are reused, their
    /// programs swapped atomically; a link of another XDP mode is replaced.
    pub fn attach_external_interface(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<(), DatapathError> {
        self.attach_tc(TC_EXTERNAL_PROGRAM, EXTERNAL_TC_LINK, interface, ifindex)?;
        let links = self.pin_dir.join(LINKS_DIR);
        let kind = format!("{XDP_LINK_PREFIX}{mode}");
        // Links of the other modes (or any, when off) go: unpinning the
        // last reference detaches them.
        for other in [XdpMode::Native, XdpMode::Generic] {
            if other != mode {
                let name = link_pin_name(&format!("{XDP_LINK_PREFIX}{other}"), interface, ifindex);
                let _ = std::fs::remove_file(links.join(name));
            }
        }
        if mode == XdpMode::Off {
            return Ok(());
        }
        remove_stale_links(&links, &kind, interface, ifindex);
        let pin = links.join(link_pin_name(&kind, interface, ifindex));
        let aya_mode = match mode {
            XdpMode::Native => aya::programs::xdp::XdpMode::Driver,
            _ => aya::programs::xdp::XdpMode::Skb,
        };
        let program = self.xdp_program();
        let attach_err = |source| DatapathError::AttachXdp {
            interface: interface.to_owned(),
            mode,
            source,
        };
        let reused = PinnedLink::from_pin(&pin)
            .ok()
            .and_then(|pinned| XdpLink::try_from(FdLink::from(pinned)).ok())
            .and_then(|link| program.attach_to_link(link).ok());
        let link_id = match reused {
            Some(id) => id,
            None => {
                let _ = std::fs::remove_file(&pin);
                program.attach(interface, aya_mode).map_err(attach_err)?
            }
        };
        pin_link(program.take_link(link_id).map_err(attach_err)?, &pin)
    }

    fn attach_tc(
        &mut self,
        program: &'static str,
        kind: &str,
        interface: &str,
        ifindex: u32,
    ) -> Result<(), DatapathError> {
        let links = self.pin_dir.join(LINKS_DIR);
        let pin = links.join(link_pin_name(kind, interface, ifindex));
        // A pin for the same name but another ifindex belongs to an interface
        // that was deleted and recreated; its link is defunct.
        remove_stale_links(&links, kind, interface, ifindex);
        let program = self.classifier(program);
        let attach_err = |source| DatapathError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let link_id = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link =
                    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                        DatapathError::Link {
                            path: pin.clone(),
                            source,
                        }
                    })?;
                match program.attach_to_link(link) {
                    Ok(id) => id,
                    Err(err) => {
                        tracing::warn!(%interface, error = %err, "pinned link unusable, attaching anew");
                        let _ = std::fs::remove_file(&pin);
                        attach_new(program, interface).map_err(attach_err)?
                    }
                }
            }
            Err(_) => {
                let _ = std::fs::remove_file(&pin);
                attach_new(program, interface).map_err(attach_err)?
            }
        };
        pin_link(program.take_link(link_id).map_err(attach_err)?, &pin)
    }

    /// Unpins every pod link except those of `keep`: interfaces that are
    /// gone (the kernel already detached them) or no longer match the pod
    /// globs (unpinning the last reference detaches the program). Links of
    /// the external interfaces are left alone.
    pub fn forget_missing_interfaces(&self, keep: &[(String, u32)]) {
        let links = self.pin_dir.join(LINKS_DIR);
        let Ok(entries) = std::fs::read_dir(&links) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = String::from_utf8_lossy(name.as_bytes()).into_owned();
            if !name.starts_with(&format!("{POD_LINK}@")) {
                continue;
            }
            let alive = keep
                .iter()
                .any(|(ifname, idx)| link_pin_name(POD_LINK, ifname, *idx) == name);
            if !alive {
                tracing::info!(link = %name, "interface gone, unpinning its link");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// One of the loaded maps, typed (`T` is an aya map type such as
    /// `HashMap<&mut MapData, K, V>`).
    fn typed_map<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        T::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }

    /// Writes the datapath's tunables (conntrack timeouts, flags), with the
    /// clock measured at load and the current backend epoch.
    pub fn write_config(&mut self, config: &DatapathConfig) -> Result<(), DatapathError> {
        let name = CONFIG_MAP;
        let config = JiffyClock::apply(self.clock, config).with_backend_epoch(self.backend_epoch);
        let mut array: Array<&mut MapData, DatapathConfig> = self.typed_map(name)?;
        let err = |source| DatapathError::Map { name, source };
        // A packet reads the two clock fields one after the other while
        // this write copies the value: a new tick with the old offset
        // (say, zero) would stamp flows months ahead. So a changed clock
        // goes in with tick zero first (the datapath reads the coarse clock
        // meanwhile), then whole.
        let clock = |c: &DatapathConfig| (c.clock_tick_ns, c.clock_offset_ns);
        let current = array.get(&0, 0).map_err(err)?;
        if config.clock_tick_ns != 0 && clock(&current) != clock(&config) {
            let interim = DatapathConfig {
                clock_tick_ns: 0,
                ..config
            };
            array.set(0, interim, 0).map_err(err)?;
        }
        array.set(0, config, 0).map_err(err)
    }

    /// The clock the datapath runs on (`None`: `bpf_ktime_get_coarse_ns`).
    pub fn clock(&self) -> Option<JiffyClock> {
        self.clock
    }

    /// Compares the datapath's clock with CLOCK_MONOTONIC (one run of
    /// `CLOCK_PROGRAM`) and, when it trails by more than
    /// `CLOCK_DRIFT_TICKS` or runs ahead by more than a quarter tick,
    /// measures it again (or falls back to the coarse clock). Returns how
    /// far the reading trailed, in ns (negative: ahead). `None`: no
    /// jiffies clock in use.
    pub fn check_clock(&mut self) -> Result<Option<i64>, DatapathError> {
        let Some(clock) = self.clock else {
            return Ok(None);
        };
        let Some(program) = self
            .ebpf
            .program(CLOCK_PROGRAM)
            .and_then(|p| <&Xdp>::try_from(p).ok())
        else {
            return Ok(None);
        };
        let (jiffies, ns) = match clock_sample(program) {
            Ok(sample) => sample,
            Err(error) => {
                tracing::warn!(%error, "cannot check the datapath clock");
                return Ok(None);
            }
        };
        let behind = ns.wrapping_sub(clock.reading_ns(jiffies)) as i64;
        // Ahead by a tick interrupt's jitter is in step too: the anchor's
        // tick may have come later than this one.
        let tick = clock.tick_ns as i64;
        if (-tick / 4..=CLOCK_DRIFT_TICKS as i64 * tick).contains(&behind) {
            return Ok(Some(behind));
        }
        let measured = measure_with_retries(program);
        tracing::warn!(
            behind_ns = behind,
            remeasured = ?measured.as_ref().ok(),
            "the datapath clock drifted from CLOCK_MONOTONIC (a periodic tick that lost interrupts?); measured again"
        );
        self.set_clock(measured.ok())?;
        Ok(Some(behind))
    }

    /// Switches the datapath to `clock`, keeping the other tunables (tests
    /// shift the clock to see which one stamps flows and that a drift is
    /// caught).
    pub fn set_clock(&mut self, clock: Option<JiffyClock>) -> Result<(), DatapathError> {
        let current = self.read_config()?;
        self.clock = clock;
        self.write_config(&current)
    }

    /// The tunables as the datapath reads them now.
    pub fn read_config(&mut self) -> Result<DatapathConfig, DatapathError> {
        let name = CONFIG_MAP;
        let array: Array<&mut MapData, DatapathConfig> = self.typed_map(name)?;
        array
            .get(&0, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Starts a new backend epoch: every UDP flow's next datagram checks
    /// that its backend is still programmed (and picks another if not), and
    /// every CPU's flow cache is retired (the next packet of each flow
    /// reads its conntrack entry). For after a sync that deleted map
    /// entries (a backend that went away is one of them), and after
    /// conntrack entries were deleted.
    pub fn new_backend_epoch(&mut self) -> Result<(), DatapathError> {
        self.backend_epoch = self.backend_epoch.wrapping_add(1);
        let current = self.read_config()?;
        self.write_config(&current)
    }

    /// The IPv4 conntrack map. Callers outside this module see
    /// [`ConntrackKey`]: keys are converted here.
    fn conntrack_map(
        &mut self,
    ) -> Result<BpfHashMap<&mut MapData, ConntrackKey4, ConntrackValue>, DatapathError> {
        self.typed_map(CONNTRACK_MAP)
    }

    /// The LRU hash map `name`, for the batch calls aya does not wrap.
    fn lru_data(&self, name: &'static str) -> Result<&MapData, DatapathError> {
        match self.ebpf.map(name) {
            Some(Map::LruHashMap(data)) => Ok(data),
            _ => Err(DatapathError::Map {
                name,
                source: MapError::InvalidName { name: name.into() },
            }),
        }
    }

    /// Every conntrack entry (a consistent-enough snapshot for housekeeping:
    /// the datapath keeps adding and refreshing entries meanwhile), read
    /// [`MAP_READ_BATCH`] entries per syscall.
    pub fn conntrack_entries(
        &self,
    ) -> Result<std::collections::HashMap<ConntrackKey, ConntrackValue>, DatapathError> {
        self.conntrack_entries_batched(MAP_READ_BATCH)
    }

    /// [`Self::conntrack_entries`] with `chunk` entries per syscall (more
    /// when one hash bucket holds more).
    pub fn conntrack_entries_batched(
        &self,
        chunk: usize,
    ) -> Result<std::collections::HashMap<ConntrackKey, ConntrackValue>, DatapathError> {
        let entries: Vec<(ConntrackKey4, ConntrackValue)> =
            batch::lookup_all(self.lru_data(CONNTRACK_MAP)?, chunk).map_err(conntrack_error)?;
        let mut out = std::collections::HashMap::with_capacity(entries.len());
        out.extend(entries.into_iter().map(|(k, v)| (k.mapped(), v)));
        Ok(out)
    }

    /// Deletes conntrack entries, in batches; returns how many were there
    /// (a key evicted or deleted by the datapath meanwhile is skipped).
    /// Then starts a new backend epoch, which retires every CPU's flow
    /// cache (`FLOW_CACHE_V2`): no packet is translated from a copy of a
    /// deleted entry.
    pub fn delete_conntrack(&mut self, keys: &[ConntrackKey]) -> Result<usize, DatapathError> {
        // A key that is not IPv4 has no entry in the IPv4 map.
        let keys: Vec<ConntrackKey4> = keys.iter().filter_map(ConntrackKey4::from_mapped).collect();
        if keys.is_empty() {
            return Ok(0);
        }
        let deleted =
            batch::delete_all(self.lru_data(CONNTRACK_MAP)?, &keys).map_err(conntrack_error);
        self.new_backend_epoch()?;
        deleted
    }

    /// One open flow less for each of `backend_ids` (for lc/sed/nq).
    pub fn release_backend_conns(&mut self, backend_ids: &[u32]) -> Result<(), DatapathError> {
        let mut conns: BpfHashMap<&mut MapData, u32, u64> = self.typed_map(BACKEND_CONNS_MAP)?;
        for id in backend_ids {
            if let Ok(n) = conns.get(id, 0) {
                let _ = conns.insert(id, n.saturating_sub(1), 0);
            }
        }
        Ok(())
    }

    /// Deletes the affinity entries `stale` picks from the current ones
    /// (both in batches); returns how many were deleted.
    pub fn purge_affinity(
        &mut self,
        stale: impl FnOnce(&std::collections::HashMap<AffinityKey, AffinityValue>) -> Vec<AffinityKey>,
    ) -> Result<usize, DatapathError> {
        let name = AFFINITY_MAP;
        let wrap = |source| DatapathError::Map { name, source };
        let map = self.lru_data(name)?;
        let entries: std::collections::HashMap<AffinityKey, AffinityValue> =
            read_hash(map).map_err(wrap)?.into_iter().collect();
        batch::delete_all(map, &stale(&entries)).map_err(wrap)
    }

    /// Map access for sync.
    pub fn maps(&mut self) -> Result<BpfMaps<'_>, DatapathError> {
        BpfMaps::from_ebpf(&mut self.ebpf)
    }
}

/// Replies to a NodePort reached from a pod are translated back to the
/// node's own address before routing, and the kernel drops packets with a
/// local source address arriving on an interface as martians unless the
/// interface accepts them. (Redirecting such replies with `bpf_fib_lookup`
/// would avoid the sysctl; see docs/ARCHITECTURE.md.)
pub fn allow_local_sources(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/accept_local");
    if let Err(err) = std::fs::write(&path, "1") {
        tracing::warn!(%interface, error = %err, "could not set accept_local; pods reaching a NodePort on this node may time out");
    }
}

/// Loads `CLOCK_PROGRAM` (it stays loaded, unattached, for
/// [`Datapath::check_clock`]) and measures the jiffies clock with it. A
/// failure is logged: the datapath then reads the coarse clock.
fn measure_clock(ebpf: &mut Ebpf) -> Option<JiffyClock> {
    let measured = match ebpf.program_mut(CLOCK_PROGRAM).map(<&mut Xdp>::try_from) {
        Some(Ok(program)) => program
            .load()
            .map_err(ClockError::Load)
            .and_then(|()| measure_with_retries(program)),
        Some(Err(e)) => Err(ClockError::Load(e)),
        None => Err(ClockError::Missing),
    };
    match measured {
        Ok(clock) => {
            tracing::info!(
                tick_ns = clock.tick_ns,
                hz = 1_000_000_000 / clock.tick_ns,
                "datapath clock: jiffies"
            );
            Some(clock)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot scale jiffies; the datapath reads bpf_ktime_get_coarse_ns instead (the same clock, a few ns more per packet); a restart measures again");
            None
        }
    }
}

fn attach_new(
    program: &mut SchedClassifier,
    interface: &str,
) -> Result<aya::programs::tc::SchedClassifierLinkId, ProgramError> {
    program.attach_with_options(
        interface,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )
}

/// Pins an attached link at `pin` (re-pinning over our own pin: the old
/// file goes first), so it outlives this process.
fn pin_link<L: TryInto<FdLink, Error = LinkError>>(
    link: L,
    pin: &Path,
) -> Result<(), DatapathError> {
    let fd_link: FdLink = link.try_into().map_err(|source| DatapathError::Link {
        path: pin.to_owned(),
        source,
    })?;
    let _ = std::fs::remove_file(pin);
    fd_link.pin(pin).map_err(|e| DatapathError::PinPath {
        path: pin.to_owned(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(())
}

fn link_pin_name(kind: &str, interface: &str, ifindex: u32) -> String {
    format!("{kind}@{interface}@{ifindex}")
}

fn remove_stale_links(links: &Path, kind: &str, interface: &str, ifindex: u32) {
    let prefix = format!("{kind}@{interface}@");
    let keep = link_pin_name(kind, interface, ifindex);
    if let Ok(entries) = std::fs::read_dir(links) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name != keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn ensure_dir(path: &Path) -> Result<(), DatapathError> {
    std::fs::create_dir_all(path).map_err(|source| DatapathError::PinPath {
        path: path.to_owned(),
        source,
    })
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `pin_dir` is on a bpffs. If it is not (for example inside
/// `ip netns exec`, which remounts /sys), mounts a bpffs at the pin path.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    ensure_dir(pin_dir)?;
    if is_bpffs(pin_dir) {
        return Ok(());
    }
    tracing::info!(path = %pin_dir.display(), "pin path is not on bpffs, mounting one");
    nix::mount::mount(
        Some("bpffs"),
        pin_dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| DatapathError::PinPath {
        path: pin_dir.to_owned(),
        source: io::Error::from(e),
    })
}

/// The maps of a loaded datapath.
pub struct BpfMaps<'a> {
    services: BpfHashMap<&'a mut MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<&'a mut MapData, u32, BackendValue>,
    rev_nat: BpfHashMap<&'a mut MapData, u32, RevNatValue>,
    maglev: BpfHashMap<&'a mut MapData, MaglevKey, u32>,
    /// Per-frontend and per-backend scheduler state, removed with them.
    rr: BpfHashMap<&'a mut MapData, u32, u64>,
    backend_conns: BpfHashMap<&'a mut MapData, u32, u64>,
    source_ranges: LpmTrie<&'a mut MapData, SourceRange, u8>,
    address_filter: Array<&'a mut MapData, AddressFilter>,
    /// Per-frontend counters, zeroed when a frontend's id is released.
    frontend_stats: PerCpuArray<&'a mut MapData, FrontendStats>,
    /// The descriptors of the hash maps `read_all` reads in batches (which
    /// aya does not wrap), owned by the maps above.
    read_fds: ReadFds,
}

struct ReadFds {
    services: RawFd,
    backends: RawFd,
    rev_nat: RawFd,
    maglev: RawFd,
    address_filter: RawFd,
}

impl<'a> BpfMaps<'a> {
    fn from_ebpf(ebpf: &'a mut Ebpf) -> Result<Self, DatapathError> {
        let mut services = None;
        let mut backends = None;
        let mut rev_nat = None;
        let mut maglev = None;
        let mut rr = None;
        let mut backend_conns = None;
        let mut source_ranges = None;
        let mut address_filter = None;
        let mut frontend_stats = None;
        for (name, map) in ebpf.maps_mut() {
            match name {
                SERVICES_MAP => services = Some(map),
                BACKENDS_MAP => backends = Some(map),
                REV_NAT_MAP => rev_nat = Some(map),
                MAGLEV_MAP => maglev = Some(map),
                RR_MAP => rr = Some(map),
                BACKEND_CONNS_MAP => backend_conns = Some(map),
                SOURCE_RANGES_MAP => source_ranges = Some(map),
                ADDRESS_FILTER_MAP => address_filter = Some(map),
                FRONTEND_STATS_MAP => frontend_stats = Some(map),
                _ => {}
            }
        }
        let missing = |name| DatapathError::Map {
            name,
            source: MapError::InvalidName {
                name: name.to_owned(),
            },
        };
        let wrap = |name| move |source| DatapathError::Map { name, source };
        let raw = |name, map: &Option<&mut Map>| match map {
            Some(Map::HashMap(data) | Map::Array(data)) => Ok(data.fd().as_fd().as_raw_fd()),
            _ => Err(missing(name)),
        };
        let read_fds = ReadFds {
            services: raw(SERVICES_MAP, &services)?,
            backends: raw(BACKENDS_MAP, &backends)?,
            rev_nat: raw(REV_NAT_MAP, &rev_nat)?,
            maglev: raw(MAGLEV_MAP, &maglev)?,
            address_filter: raw(ADDRESS_FILTER_MAP, &address_filter)?,
        };
        Ok(Self {
            read_fds,
            services: BpfHashMap::try_from(services.ok_or_else(|| missing(SERVICES_MAP))?)
                .map_err(wrap(SERVICES_MAP))?,
            backends: BpfHashMap::try_from(backends.ok_or_else(|| missing(BACKENDS_MAP))?)
                .map_err(wrap(BACKENDS_MAP))?,
            rev_nat: BpfHashMap::try_from(rev_nat.ok_or_else(|| missing(REV_NAT_MAP))?)
                .map_err(wrap(REV_NAT_MAP))?,
            maglev: BpfHashMap::try_from(maglev.ok_or_else(|| missing(MAGLEV_MAP))?)
                .map_err(wrap(MAGLEV_MAP))?,
            rr: BpfHashMap::try_from(rr.ok_or_else(|| missing(RR_MAP))?).map_err(wrap(RR_MAP))?,
            backend_conns: BpfHashMap::try_from(
                backend_conns.ok_or_else(|| missing(BACKEND_CONNS_MAP))?,
            )
            .map_err(wrap(BACKEND_CONNS_MAP))?,
            source_ranges: LpmTrie::try_from(
                source_ranges.ok_or_else(|| missing(SOURCE_RANGES_MAP))?,
            )
            .map_err(wrap(SOURCE_RANGES_MAP))?,
            address_filter: Array::try_from(
                address_filter.ok_or_else(|| missing(ADDRESS_FILTER_MAP))?,
            )
            .map_err(wrap(ADDRESS_FILTER_MAP))?,
            frontend_stats: PerCpuArray::try_from(
                frontend_stats.ok_or_else(|| missing(FRONTEND_STATS_MAP))?,
            )
            .map_err(wrap(FRONTEND_STATS_MAP))?,
        })
    }
}

/// The address filter map's one value.
fn read_address_filter(map: &MapData) -> Result<AddressFilterBits, MapError> {
    let mut words = vec![0u64; proxy_common::ADDRESS_FILTER_WORDS];
    batch::lookup_array_into(map, 0, bytemuck::cast_slice_mut(&mut words))?;
    Ok(AddressFilterBits::from_words(words))
}

fn write_err(map: &'static str, e: MapError) -> WriteError {
    let full =
        matches!(&e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
    WriteError {
        map,
        full,
        message: e.to_string(),
    }
}

impl MapWriter for BpfMaps<'_> {
    fn read_all(&self) -> Result<MapContents, WriteError> {
        /// A `MapData` of its own for a map `self`'s aya maps hold (a
        /// duplicate descriptor), which knows the map's sizes for the raw
        /// reads' layout checks.
        fn map_data(raw: RawFd, name: &'static str) -> Result<MapData, WriteError> {
            // SAFETY: the descriptor of a map that `self`'s aya maps hold,
            // borrowed from the `Ebpf` for as long as `self` lives.
            let fd = unsafe { BorrowedFd::borrow_raw(raw) };
            let dup = fd.try_clone_to_owned().map_err(|io_error| {
                let call = "fcntl(F_DUPFD_CLOEXEC)";
                write_err(
                    name,
                    MapError::SyscallError(SyscallError { call, io_error }),
                )
            })?;
            MapData::from_fd(dup).map_err(|e| write_err(name, e))
        }
        fn read<K: bytemuck::Pod + Ord, V: bytemuck::Pod>(
            raw: RawFd,
            name: &'static str,
        ) -> Result<BTreeMap<K, V>, WriteError> {
            let map = map_data(raw, name)?;
            let entries = read_hash(&map).map_err(|e| write_err(name, e))?;
            Ok(entries.into_iter().collect())
        }
        let fds = &self.read_fds;
        let name = ADDRESS_FILTER_MAP;
        let address_filter = read_address_filter(&map_data(fds.address_filter, name)?)
            .map_err(|e| write_err(name, e))?;
        let mut contents = MapContents {
            services: read(fds.services, SERVICES_MAP)?,
            backends: read(fds.backends, BACKENDS_MAP)?,
            rev_nat: read(fds.rev_nat, REV_NAT_MAP)?,
            maglev: read(fds.maglev, MAGLEV_MAP)?,
            address_filter: Some(address_filter),
            ..MapContents::default()
        };
        // An LPM trie has no batch ops.
        for key in self.source_ranges.keys() {
            let key = key.map_err(|e| write_err(SOURCE_RANGES_MAP, e))?;
            contents
                .source_ranges
                .insert((key.prefix_len(), key.data()));
        }
        Ok(contents)
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), WriteError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| write_err(SERVICES_MAP, e))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), WriteError> {
        ignore_missing(self.services.remove(key)).map_err(|e| write_err(SERVICES_MAP, e))
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), WriteError> {
        self.backends
            .insert(id, value, 0)
            .map_err(|e| write_err(BACKENDS_MAP, e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), WriteError> {
        ignore_missing(self.backends.remove(&id)).map_err(|e| write_err(BACKENDS_MAP, e))?;
        ignore_missing(self.backend_conns.remove(&id)).map_err(|e| write_err(BACKEND_CONNS_MAP, e))
    }

    fn put_rev_nat(&mut self, id: u32, value: &RevNatValue) -> Result<(), WriteError> {
        self.rev_nat
            .insert(id, value, 0)
            .map_err(|e| write_err(REV_NAT_MAP, e))
    }

    fn delete_rev_nat(&mut self, id: u32) -> Result<(), WriteError> {
        ignore_missing(self.rev_nat.remove(&id)).map_err(|e| write_err(REV_NAT_MAP, e))?;
        ignore_missing(self.rr.remove(&id)).map_err(|e| write_err(RR_MAP, e))?;
        // The next frontend given this id counts from zero.
        let zero = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .and_then(|cpus| PerCpuValues::try_from(vec![FrontendStats::default(); cpus]))
            .map_err(|e| WriteError {
                map: FRONTEND_STATS_MAP,
                full: false,
                message: format!("counting the possible CPUs: {e}"),
            })?;
        self.frontend_stats
            .set(id, zero, 0)
            .map_err(|e| write_err(FRONTEND_STATS_MAP, e))
    }

    fn put_maglev(&mut self, key: &MaglevKey, backend_id: u32) -> Result<(), WriteError> {
        self.maglev
            .insert(key, backend_id, 0)
            .map_err(|e| write_err(MAGLEV_MAP, e))
    }

    fn delete_maglev(&mut self, key: &MaglevKey) -> Result<(), WriteError> {
        ignore_missing(self.maglev.remove(key)).map_err(|e| write_err(MAGLEV_MAP, e))
    }

    fn put_source_range(&mut self, key: &SourceRangeKey) -> Result<(), WriteError> {
        self.source_ranges
            .insert(&LpmKey::new(key.0, key.1), 1, 0)
            .map_err(|e| write_err(SOURCE_RANGES_MAP, e))
    }

    fn delete_source_range(&mut self, key: &SourceRangeKey) -> Result<(), WriteError> {
        ignore_missing(self.source_ranges.remove(&LpmKey::new(key.0, key.1)))
            .map_err(|e| write_err(SOURCE_RANGES_MAP, e))
    }

    fn put_address_filter(&mut self, filter: &AddressFilter) -> Result<(), WriteError> {
        self.address_filter
            .set(0, filter, 0)
            .map_err(|e| write_err(ADDRESS_FILTER_MAP, e))
    }
}

fn conntrack_error(source: MapError) -> DatapathError {
    DatapathError::Map {
        name: CONNTRACK_MAP,
        source,
    }
}

/// Entries per syscall when kproxy reads a whole map (the conntrack sweep,
/// a full resync, the affinity purge, `kproxy services` and `conntrack`):
/// 4096 conntrack keys and values are 288 KiB.
pub const MAP_READ_BATCH: usize = 4096;

/// Every entry of a hash map, [`MAP_READ_BATCH`] per syscall.
fn read_hash<K: bytemuck::Pod, V: bytemuck::Pod>(map: &MapData) -> Result<Vec<(K, V)>, MapError> {
    batch::lookup_all(map, MAP_READ_BATCH)
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Read-only view of the pinned maps, for `kproxy services|conntrack|status`
/// (works whether or not a daemon is running).
pub struct PinnedMaps {
    pin_dir: PathBuf,
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let probe = pin_dir.join(SERVICES_MAP);
        if !probe.exists() {
            return Err(DatapathError::NotPinned {
                path: pin_dir.to_owned(),
            });
        }
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Every entry of the pinned hash map `name`.
    fn read<K: bytemuck::Pod, V: bytemuck::Pod>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(K, V)>, DatapathError> {
        let wrap = |source| DatapathError::Map { name, source };
        let data = MapData::from_pin(self.pin_dir.join(name)).map_err(wrap)?;
        read_hash(&data).map_err(wrap)
    }

    fn dump<K: bytemuck::Pod + Ord, V: bytemuck::Pod>(
        &self,
        name: &'static str,
    ) -> Result<BTreeMap<K, V>, DatapathError> {
        Ok(self.read(name)?.into_iter().collect())
    }

    pub fn contents(&self) -> Result<MapContents, DatapathError> {
        Ok(MapContents {
            services: self.dump(SERVICES_MAP)?,
            backends: self.dump(BACKENDS_MAP)?,
            rev_nat: self.dump(REV_NAT_MAP)?,
            maglev: self.dump(MAGLEV_MAP)?,
            source_ranges: self.source_ranges()?,
            address_filter: self.address_filter()?,
        })
    }

    /// `None` when pins left by an older kproxy have no filter.
    fn address_filter(&self) -> Result<Option<AddressFilterBits>, DatapathError> {
        let name = ADDRESS_FILTER_MAP;
        let path = self.pin_dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let wrap = |source| DatapathError::Map { name, source };
        let data = MapData::from_pin(path).map_err(wrap)?;
        read_address_filter(&data).map(Some).map_err(wrap)
    }

    fn source_ranges(&self) -> Result<BTreeSet<SourceRangeKey>, DatapathError> {
        let name = SOURCE_RANGES_MAP;
        let wrap = |source| DatapathError::Map { name, source };
        let data = MapData::from_pin(self.pin_dir.join(name)).map_err(wrap)?;
        let trie: LpmTrie<MapData, SourceRange, u8> =
            LpmTrie::try_from(Map::LpmTrie(data)).map_err(wrap)?;
        trie.keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())).map_err(wrap))
            .collect()
    }

    /// Every conntrack entry, in key order (stable listings).
    pub fn conntrack(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>, DatapathError> {
        let mut entries: Vec<(ConntrackKey4, ConntrackValue)> = self.read(CONNTRACK_MAP)?;
        entries.sort_unstable_by(|(a, _), (b, _)| bytemuck::bytes_of(a).cmp(bytemuck::bytes_of(b)));
        Ok(entries.into_iter().map(|(k, v)| (k.mapped(), v)).collect())
    }

    /// The tunables the datapath runs with.
    pub fn config(&self) -> Result<DatapathConfig, DatapathError> {
        let name = CONFIG_MAP;
        let wrap = |source| DatapathError::Map { name, source };
        let data = MapData::from_pin(self.pin_dir.join(name)).map_err(wrap)?;
        let array: Array<MapData, DatapathConfig> =
            Array::try_from(Map::Array(data)).map_err(wrap)?;
        array.get(&0, 0).map_err(wrap)
    }

    /// Packets and bytes of every frontend entry (traffic from pods and
    /// this node, and from outside, are entries of their own), summed over
    /// the CPUs, with the frontend each entry serves.
    pub fn frontend_stats(&self) -> Result<Vec<(RevNatValue, FrontendStats)>, DatapathError> {
        let entries: Vec<(u32, RevNatValue)> = self.read(REV_NAT_MAP)?;
        let name = FRONTEND_STATS_MAP;
        let wrap = |source| DatapathError::Map { name, source };
        let data = MapData::from_pin(self.pin_dir.join(name)).map_err(wrap)?;
        let array: PerCpuArray<MapData, FrontendStats> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(wrap)?;
        entries
            .into_iter()
            .map(|(id, frontend)| {
                let per_cpu = array.get(&id, 0).map_err(wrap)?;
                let total =
                    per_cpu
                        .iter()
                        .fold(FrontendStats::default(), |sum, cpu| FrontendStats {
                            packets: sum.packets + cpu.packets,
                            bytes: sum.bytes + cpu.bytes,
                        });
                Ok((frontend, total))
            })
            .collect()
    }

    /// Per-reason datapath counters, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<u64>, DatapathError> {
        let name = STATS_MAP;
        let data = MapData::from_pin(self.pin_dir.join(name))
            .map_err(|source| DatapathError::Map { name, source })?;
        let array: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))
            .map_err(|source| DatapathError::Map { name, source })?;
        let mut out = Vec::new();
        for i in 0..proxy_common::stat::COUNT {
            let values = array
                .get(&i, 0)
                .map_err(|source| DatapathError::Map { name, source })?;
            out.push(values.iter().sum());
        }
        Ok(out)
    }
}

/// Removes everything kproxy pinned under `pin_dir`: links (which detaches
/// the programs) and maps. Returns what was removed. The kernel releases an
/// unpinned link asynchronously (after an RCU grace period), and a link's id
/// vanishes before its program is detached; so this waits (up to 5 s) until
/// the links' programs are gone, which happens only after the detach. Stop
/// the daemon first: a running kproxy holds its program.
pub fn cleanup(pin_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut program_ids = Vec::new();
    let links = pin_dir.join(LINKS_DIR);
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            if let Ok(pinned) = PinnedLink::from_pin(entry.path()) {
                if let Ok(info) = FdLink::from(pinned).info() {
                    program_ids.push(info.program_id());
                }
            }
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
        std::fs::remove_dir(&links)?;
    }
    for name in ALL_MAPS.into_iter().chain(LEGACY_MAPS) {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let alive = aya::programs::loaded_programs()
            .flatten()
            .any(|p| program_ids.contains(&p.id()));
        if !alive {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: u64 = 4_000_000; // HZ=250

    /// An edge to `jiffies` first seen `late_ns` after the tick at
    /// `tick_at_ns`, by a read 2 µs after the one before it.
    fn edge(jiffies: u64, tick_at_ns: u64, late_ns: u64) -> JiffyEdge {
        JiffyEdge {
            jiffies,
            before_ns: tick_at_ns + late_ns - 2_000,
        }
    }

    #[test]
    fn the_jiffies_clock_is_anchored_at_the_earlier_edge() {
        // Jiffy 4294892296 (INITIAL_JIFFIES at HZ=250 plus one) ticks at
        // 1 s of uptime, the next a tick later; the first edge is read
        // 1 ms late (this thread was busy), the second 1.5 µs late.
        let j = 4_294_892_296u64;
        let t = 1_000_000_000u64;
        let clock =
            JiffyClock::from_edges(TICK, edge(j, t, 1_000_000), edge(j + 1, t + TICK, 1_500))
                .unwrap();
        assert_eq!(clock.tick_ns, TICK);
        // Anchored at the second edge's earlier read, 500 ns before its
        // tick (the late first edge would run 1 ms ahead), whatever the wrap.
        assert_eq!(clock.reading_ns(j + 1), t + TICK - 500);
        assert_eq!(clock.reading_ns(j + 10), t + 10 * TICK - 500);
        // The same edges the other way round give the same clock.
        let swapped =
            JiffyClock::from_edges(TICK, edge(j, t, 1_500), edge(j + 1, t + TICK, 1_000_000))
                .unwrap();
        assert_eq!(swapped.reading_ns(j), t - 500);
    }

    #[test]
    fn a_tick_that_does_not_fit_the_edges_is_refused() {
        let (j, t) = (1_000u64, 5_000_000_000u64);
        // HZ=1000 edges read with HZ=250's tick: 1 jiffy in 1 ms.
        assert!(matches!(
            JiffyClock::from_edges(TICK, edge(j, t, 0), edge(j + 1, t + 1_000_000, 0)),
            Err(ClockError::Mismatch { .. })
        ));
        // No change, or jiffies going back.
        assert!(JiffyClock::from_edges(TICK, edge(j, t, 0), edge(j, t + TICK, 0)).is_err());
        assert!(JiffyClock::from_edges(TICK, edge(j, t, 0), edge(j - 1, t + TICK, 0)).is_err());
        // Two ticks with some interrupt latency each are fine.
        assert!(
            JiffyClock::from_edges(TICK, edge(j, t, 0), edge(j + 2, t + 2 * TICK, TICK / 3))
                .is_ok()
        );
    }

    #[test]
    fn the_measured_clock_is_written_with_every_config() {
        let clock = JiffyClock {
            tick_ns: TICK,
            offset_ns: 7,
        };
        let config = DatapathConfig {
            udp_timeout_ns: 30,
            ..DatapathConfig::default()
        };
        let written = JiffyClock::apply(Some(clock), &config);
        assert_eq!((written.clock_tick_ns, written.clock_offset_ns), (TICK, 7));
        assert_eq!(written.udp_timeout_ns, 30);
        let fallback = JiffyClock::apply(None, &written);
        assert_eq!((fallback.clock_tick_ns, fallback.clock_offset_ns), (0, 0));
    }
}
