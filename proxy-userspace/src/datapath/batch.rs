//! Whole-map reads and deletes of hash maps in a few syscalls
//! (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`, Linux 5.6; kproxy needs
//! 6.6), which aya 0.14 does not wrap. Its map iterator costs two syscalls
//! per entry (next key, then the value): the conntrack sweep read a map of
//! 249 036 entries in about 0.6 s of CPU that way, every 10 s.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{MapData, MapError, MapType};
use aya::sys::SyscallError;
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

/// Runs one `bpf()` command with `attr`, a member of `union bpf_attr`
/// (`BatchAttr`, `ElemAttr`). A batch command writes how many entries it
/// handled back into `attr.count` when it succeeds and when it stops at an
/// entry (ENOENT, ENOSPC); on any other error `count` is what was passed.
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the
    // pointers in it name buffers that outlive the call and hold the keys
    // (and values) of the map's own sizes the command reads or writes (see
    // `check` and `lookup_array_into`).
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

fn syscall_error(call: &'static str, io_error: io::Error) -> MapError {
    MapError::SyscallError(SyscallError { call, io_error })
}

/// The kernel writes whole keys and values of the map's own sizes into the
/// buffers: `map` must be a hash map of `key`-byte keys (and, when given,
/// `value`-byte values), as aya checks for its typed maps.
fn check(map: &MapData, key: usize, value: Option<usize>) -> Result<(), MapError> {
    let info = map.info()?;
    let map_type = info.map_type()?;
    if !matches!(map_type, MapType::Hash | MapType::LruHash) {
        return Err(MapError::InvalidMapType {
            map_type: map_type as u32,
        });
    }
    let expected = info.key_size() as usize;
    if key != expected {
        return Err(MapError::InvalidKeySize {
            size: key,
            expected,
        });
    }
    let expected = info.value_size() as usize;
    match value {
        Some(size) if size != expected => Err(MapError::InvalidValueSize { size, expected }),
        _ => Ok(()),
    }
}

/// Every entry of the hash map `map` (`BPF_MAP_TYPE_HASH` or `LRU_HASH`
/// with `K` keys and `V` values, else an error), `chunk` entries per
/// syscall, more when one hash bucket holds more. Entries the datapath
/// adds or removes meanwhile may or may not be in it, as with any walk of a
/// live map; none is read twice (the kernel reads whole buckets).
pub(super) fn lookup_all<K: Pod, V: Pod>(
    map: &MapData,
    chunk: usize,
) -> Result<Vec<(K, V)>, MapError> {
    check(map, size_of::<K>(), Some(size_of::<V>()))?;
    let mut chunk = chunk.clamp(1, u32::MAX as usize);
    let mut keys = vec![K::zeroed(); chunk];
    let mut values = vec![V::zeroed(); chunk];
    let mut out = Vec::new();
    // Where to go on from (for hash maps, a bucket index), which the
    // kernel writes into `out_batch`; none on the first call.
    let mut position: Option<u64> = None;
    loop {
        let mut next = 0u64;
        let mut attr = BatchAttr {
            in_batch: position.as_ref().map_or(0, |p| p as *const u64 as u64),
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = (attr.count as usize).min(chunk);
        let end = match result {
            Ok(()) => false,
            // The end of the map, with its last entries (if any).
            Err(e) if errno(&e) == Some(libc::ENOENT) => true,
            // One bucket holds more entries than fit (nothing was read):
            // ask again with room for more.
            Err(e) if errno(&e) == Some(libc::ENOSPC) => {
                chunk = chunk.saturating_mul(2).min(u32::MAX as usize);
                keys.resize(chunk, K::zeroed());
                values.resize(chunk, V::zeroed());
                continue;
            }
            Err(e) => return Err(syscall_error("BPF_MAP_LOOKUP_BATCH", e)),
        };
        out.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        if end {
            return Ok(out);
        }
        position = Some(next);
    }
}

/// Deletes `keys` from the hash map `map` (of `K` keys, else an error);
/// returns how many were there. A key already gone (evicted, or deleted by
/// the datapath) is skipped.
pub(super) fn delete_all<K: Pod>(map: &MapData, keys: &[K]) -> Result<usize, MapError> {
    check(map, size_of::<K>(), None)?;
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(u32::MAX as usize)];
        let mut attr = BatchAttr {
            keys: batch.as_ptr() as u64,
            count: batch.len() as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The keys before the one the kernel stopped at are gone.
        let done = (attr.count as usize).min(batch.len());
        match result {
            // All of the batch went through.
            Ok(()) => {
                deleted += done;
                rest = &rest[batch.len()..];
            }
            // `keys[done]` is not in the map: skip it.
            Err(e) if errno(&e) == Some(libc::ENOENT) => {
                deleted += done;
                rest = rest.get(done + 1..).unwrap_or_default();
            }
            Err(e) => return Err(syscall_error("BPF_MAP_DELETE_BATCH", e)),
        }
    }
    Ok(deleted)
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// The element-op member of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads entry `index` of the array map `map` into `value`, which must be
/// the map's value size. aya's `Array::get` returns a value on the stack,
/// which the address filter (512 KiB) is too big for.
pub(super) fn lookup_array_into(
    map: &MapData,
    index: u32,
    value: &mut [u8],
) -> Result<(), MapError> {
    let info = map.info()?;
    let map_type = info.map_type()?;
    if map_type != MapType::Array {
        return Err(MapError::InvalidMapType {
            map_type: map_type as u32,
        });
    }
    let expected = info.value_size() as usize;
    if value.len() != expected {
        return Err(MapError::InvalidValueSize {
            size: value.len(),
            expected,
        });
    }
    // The key is a u32 (an array's), the value buffer the map's value
    // size (checked above).
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &index as *const u32 as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map_err(|e| syscall_error("bpf_map_lookup_elem", e))
}
