//! Raw bpf(2), for the few programs aya cannot load (it loads only from
//! objects): the bench's empty floor program and the two-node lab's
//! pass-through XDP program, plus a BPF_PROG_TEST_RUN that treats every
//! program alike. The attr structs follow union bpf_attr
//! (include/uapi/linux/bpf.h); the kernel accepts a larger attr whose tail
//! is zero. Shared by `examples/bench` and `tests/cluster` via `#[path]`.
#![allow(dead_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::Instant;

const BPF_OBJ_PIN: libc::c_long = 6;
pub const BPF_PROG_TYPE_XDP: u32 = 6;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    tail: [u32; 9],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly laid out bpf_attr prefix of the
    // size we pass; every pointer inside it outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A program of `prog_type` that only returns `verdict`:
/// `r0 = verdict; exit`.
pub fn load_return_program(prog_type: u32, verdict: u32, name: &str) -> io::Result<OwnedFd> {
    // struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }
    let insns: [u64; 2] = [
        0xb7 | (u64::from(verdict) << 32), // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm verdict
        0x95,                              // BPF_JMP | BPF_EXIT
    ];
    load_program(prog_type, 0, &insns, name)
}

/// The bench's tc floor: `r0 = 0 (TC_ACT_OK); exit` as a tc program.
pub fn load_empty_tc_program() -> io::Result<OwnedFd> {
    load_return_program(BPF_PROG_TYPE_SCHED_CLS, 0, "bench_floor")
}

/// An XDP program that only returns `verdict` (XDP_PASS, XDP_DROP, ...):
/// the bench's floor, the lab's pass-through peer.
pub fn load_xdp_return_program(verdict: u32, name: &str) -> io::Result<OwnedFd> {
    load_return_program(BPF_PROG_TYPE_XDP, verdict, name)
}

pub struct Run {
    pub retval: u32,
    /// Kernel-measured time per repeat (integer ns, bpf_test_timer).
    pub kernel_ns: u32,
    /// Wall-clock time of the whole syscall, divided by repeat.
    pub wall_ns: f64,
    pub out_len: usize,
}

pub fn test_run(prog: BorrowedFd<'_>, data: &[u8], out: &mut [u8], repeat: u32) -> io::Result<Run> {
    test_run_with(
        prog,
        data,
        out,
        &RunOptions {
            repeat,
            ..RunOptions::default()
        },
    )
}

/// BPF_PROG_TEST_RUN flag: XDP frames are really sent (XDP_TX out of the
/// ingress interface, XDP_REDIRECT, XDP_PASS up the stack): the kernel's
/// own packet generator (xdp-trafficgen uses it). Needs `repeat` > 0 and
/// an `xdp_md` context naming the ingress interface; there is no output.
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

#[derive(Default)]
pub struct RunOptions<'a> {
    pub repeat: u32,
    /// The program's context (`struct xdp_md` for XDP, see [`xdp_md`]).
    pub ctx: Option<&'a [u8]>,
    pub flags: u32,
    /// Frames per batch in live-frames mode (0: the kernel's default, 64).
    pub batch_size: u32,
}

/// `struct xdp_md` for BPF_PROG_TEST_RUN: the packet arrives on interface
/// `ingress_ifindex` (of the caller's network namespace), rx queue 0.
pub fn xdp_md(ingress_ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    // data, data_end, data_meta (u32 each, zero), then ingress_ifindex.
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

pub fn test_run_with(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out: &mut [u8],
    options: &RunOptions<'_>,
) -> io::Result<Run> {
    let repeat = options.repeat;
    let (ctx_in, ctx_len) = options
        .ctx
        .map_or((0, 0), |c| (c.as_ptr() as u64, c.len() as u32));
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: if out.is_empty() {
            0
        } else {
            out.as_mut_ptr() as u64
        },
        repeat,
        ctx_size_in: ctx_len,
        ctx_in,
        flags: options.flags,
        batch_size: options.batch_size,
        ..Default::default()
    };
    let start = Instant::now();
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    let wall = start.elapsed();
    Ok(Run {
        retval: attr.retval,
        kernel_ns: attr.duration,
        wall_ns: wall.as_nanos() as f64 / f64::from(repeat.max(1)),
        out_len: attr.data_size_out as usize,
    })
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    tail: [u32; 9],
}

/// Pins `prog` at `path` (on a bpffs).
pub fn obj_pin(prog: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

// ---------------------------------------------------------------------------
// Programs from instructions, prog arrays, programs by id: the bench's XDP
// forwarding part wraps a program in a tail call (see `load_program`).
// ---------------------------------------------------------------------------

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
/// `expected_attach_type` of an XDP program attached to an interface (aya
/// loads XDP programs with it; a tail call needs caller and callee alike).
pub const BPF_XDP: u32 = 37;
/// `src_reg` of a `BPF_LD | BPF_IMM | BPF_DW` whose imm is a map fd.
pub const BPF_PSEUDO_MAP_FD: u8 = 1;
pub const BPF_FUNC_TAIL_CALL: i32 = 12;

/// One `struct bpf_insn` as a u64 (little-endian layout: code, dst:4 |
/// src:4, off, imm).
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst & 0xf | (src & 0xf) << 4) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    tail: [u64; 14],
}

/// Loads `insns` as a program of `prog_type` with `expected_attach_type`;
/// on a verifier error the error carries the verifier's log.
pub fn load_program(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
    name: &str,
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(err) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(io::Error::new(
                err.kind(),
                format!(
                    "BPF_PROG_LOAD {name}: {err}; verifier: {}",
                    String::from_utf8_lossy(&log[..end]).trim()
                ),
            ))
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    tail: [u32; 16],
}

/// A `BPF_MAP_TYPE_PROG_ARRAY` of `max_entries` slots.
pub fn create_prog_array(max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_PROG_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Puts `prog` into slot `index` of a prog array.
pub fn prog_array_set(map: BorrowedFd<'_>, index: u32, prog: BorrowedFd<'_>) -> io::Result<()> {
    let value = prog.as_raw_fd() as u32;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        value: &value as *const u32 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
    tail: [u32; 5],
}

/// A new fd for the loaded program with id `id` (e.g. the one `ip -d link`
/// shows attached to an interface).
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: BPF_PROG_GET_FD_BY_ID returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `struct xdp_md` for a BPF_PROG_TEST_RUN of a `data_len`-byte frame
/// arriving on `ingress_ifindex`: with a context, the kernel wants
/// `data_end` to be the frame's length.
pub fn xdp_md_for(ingress_ifindex: u32, data_len: usize) -> [u8; 24] {
    let mut ctx = xdp_md(ingress_ifindex);
    ctx[4..8].copy_from_slice(&(data_len as u32).to_ne_bytes());
    ctx
}

// ---------------------------------------------------------------------------
// Array maps of u64 counters: the bench's wire tap counts what it drops.
// ---------------------------------------------------------------------------

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;

/// A `BPF_MAP_TYPE_ARRAY` of `max_entries` u64 values (all zero).
pub fn create_u64_array(max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Slot `index` of an array of u64 values.
pub fn u64_array_get(map: BorrowedFd<'_>, index: u32) -> io::Result<u64> {
    let mut value = 0u64;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        value: &mut value as *mut u64 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}
