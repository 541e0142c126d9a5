//! Whole-map reads and deletes of hash maps in a few syscalls
//! (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`, Linux 5.6; kproxy needs
//! 6.6), which aya 0.14 does not wrap. Its map iterator costs two syscalls
//! per entry (next key, then the value): the conntrack sweep read a full
//! map of 262 144 entries in about 0.7 s of CPU that way, every 10 s.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use bytemuck::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs one batch command; the kernel writes the number of entries it
/// handled back into `attr.count`, on success and on error.
fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the
    // pointers in it name buffers of `count` keys (and values) that
    // outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every entry of the hash map `fd`, `chunk` at a time (grown when one
/// hash bucket holds more). Entries the datapath adds or removes meanwhile
/// may or may not be in it, as with any walk of a live map.
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>, chunk: usize) -> io::Result<Vec<(K, V)>> {
    let mut chunk = chunk.max(1);
    let mut keys = vec![K::zeroed(); chunk];
    let mut values = vec![V::zeroed(); chunk];
    let mut out = Vec::new();
    // The position to go on from (for hash maps, a bucket index), which
    // the kernel writes into `out_batch`; none on the first call.
    let mut position: Option<u64> = None;
    loop {
        let mut next = 0u64;
        let mut attr = BatchAttr {
            in_batch: position.as_ref().map_or(0, |p| p as *const u64 as u64),
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = (attr.count as usize).min(chunk);
        out.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        match result {
            Ok(()) => position = Some(next),
            // The end of the map (with the last entries, if any, read).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            // One bucket holds more entries than fit: ask again for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && read == 0 => {
                chunk *= 2;
                keys.resize(chunk, K::zeroed());
                values.resize(chunk, V::zeroed());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Deletes `keys` from the map `fd`; returns how many were there. A key
/// already gone (evicted, or deleted by the datapath) is skipped.
pub fn delete_all<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The kernel stops at the first key it cannot delete; the ones
        // before it are gone.
        let done = (attr.count as usize).min(rest.len());
        deleted += done;
        match result {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = rest.get(done + 1..).unwrap_or_default()
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
