//! Backend selection for a new flow: session affinity first, then the
//! frontend's algorithm (random, Maglev, and IPVS's rr, lc, sh, dh, sed, nq).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use proxy_common::{
    mix, AffinityKey, AffinityValue, MaglevKey, ServiceKey, ServiceValue, ALG_DH, ALG_LC,
    ALG_MAGLEV, ALG_NQ, ALG_RR, ALG_SED, ALG_SH, LC_SCAN_MAX, MAGLEV_GEN_BIT, NS_PER_SEC,
    SVC_FLAG_MAGLEV_GEN,
};

use crate::maps::{AFFINITY, BACKENDS, BACKEND_CONNS, MAGLEV, RR, SERVICES};
use crate::parse::Flow;

/// Picks the backend id for a new flow of `frontend` (slot 0 at `key`).
/// `None`: the table pointed at nothing (counted by the caller).
#[inline(always)]
pub fn select(
    flow: &Flow,
    key: &ServiceKey,
    frontend: &ServiceValue,
    client: &[u8; 16],
    now: u64,
) -> Option<u32> {
    if frontend.affinity_timeout == 0 {
        return by_algorithm(flow, key, frontend);
    }
    let akey = AffinityKey {
        client: *client,
        service_port_id: frontend.backend_id,
        _pad: 0,
    };
    let timeout = frontend.affinity_timeout as u64 * NS_PER_SEC;
    if let Some(entry) = AFFINITY.get_ptr_mut(&akey) {
        // SAFETY: a valid map value pointer for the duration of the program.
        let entry = unsafe { &mut *entry };
        // Userspace deletes entries whose backend left the Service; the
        // BACKENDS check covers the moment in between.
        let fresh = now.saturating_sub(entry.last_used_ns) <= timeout;
        if fresh && unsafe { BACKENDS.get(entry.backend_id) }.is_some() {
            entry.last_used_ns = now;
            return Some(entry.backend_id);
        }
    }
    let backend_id = by_algorithm(flow, key, frontend)?;
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = AFFINITY.insert(&akey, &value, 0);
    Some(backend_id)
}

#[inline(always)]
fn by_algorithm(flow: &Flow, key: &ServiceKey, frontend: &ServiceValue) -> Option<u32> {
    let count = frontend.count as u32;
    let index = match frontend.algorithm {
        ALG_MAGLEV => return maglev(flow, frontend),
        ALG_RR => round_robin(frontend.rev_nat_id) % count,
        ALG_SH => mix(u32::from_be(flow.saddr)) % count,
        ALG_DH => mix(u32::from_be(flow.daddr)) % count,
        ALG_LC | ALG_SED | ALG_NQ => return least_loaded(key, count, frontend.algorithm),
        _ => (unsafe { bpf_get_prandom_u32() }) % count,
    };
    slot_backend(key, index as u16 + 1)
}

#[inline(always)]
fn slot_backend(key: &ServiceKey, slot: u16) -> Option<u32> {
    let slot_key = ServiceKey { slot, ..*key };
    unsafe { SERVICES.get(&slot_key) }.map(|s| s.backend_id)
}

/// The flow's 5-tuple hash: every packet of a flow, and every kproxy on
/// every node, maps it to the same table entry.
#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    let ports = ((flow.sport as u32) << 16) | flow.dport as u32;
    let mut h = mix(u32::from_be(flow.saddr));
    h = h
        .wrapping_mul(31)
        .wrapping_add(mix(u32::from_be(flow.daddr)));
    h = h.wrapping_mul(31).wrapping_add(mix(ports));
    h.wrapping_mul(31).wrapping_add(flow.proto as u32)
}

#[inline(always)]
fn maglev(flow: &Flow, frontend: &ServiceValue) -> Option<u32> {
    if frontend.maglev_size == 0 {
        return None;
    }
    let generation = if frontend.flags & SVC_FLAG_MAGLEV_GEN != 0 {
        MAGLEV_GEN_BIT
    } else {
        0
    };
    let key = MaglevKey {
        rev_nat_id: frontend.rev_nat_id,
        index: (flow_hash(flow) % frontend.maglev_size) | generation,
    };
    unsafe { MAGLEV.get(&key) }.copied()
}

/// The next position of this frontend's round robin. Concurrent new flows
/// on two CPUs may share a position; the rotation stays even.
#[inline(always)]
fn round_robin(rev_nat_id: u32) -> u32 {
    match RR.get_ptr_mut(rev_nat_id) {
        Some(counter) => {
            // SAFETY: a valid map value pointer for the duration of the program.
            let position = unsafe { *counter };
            unsafe { *counter = position.wrapping_add(1) };
            position as u32
        }
        None => {
            let _ = RR.insert(rev_nat_id, 1u64, 0);
            0
        }
    }
}

/// State of a least-loaded scan, passed to the `bpf_loop` callback.
struct Scan {
    key: ServiceKey,
    count: u32,
    start: u32,
    algorithm: u8,
    best: u32,
    best_load: u64,
    ties: u32,
}

/// lc, sed, nq: the backend with the fewest open flows, scanning up to
/// `LC_SCAN_MAX` slots from a random start, ties broken uniformly at random;
/// nq takes the first idle backend it meets. The
/// scan runs in `bpf_loop`, so the verifier checks one iteration, not 32.
#[inline(always)]
fn least_loaded(key: &ServiceKey, count: u32, algorithm: u8) -> Option<u32> {
    let mut scan = Scan {
        key: *key,
        count,
        start: (unsafe { bpf_get_prandom_u32() }) % count,
        algorithm,
        best: 0,
        best_load: u64::MAX,
        ties: 0,
    };
    let rounds = if count < LC_SCAN_MAX {
        count
    } else {
        LC_SCAN_MAX
    };
    // SAFETY: the callback only touches `scan`, which outlives the call.
    unsafe {
        bpf_loop(
            rounds,
            scan_one as *mut core::ffi::c_void,
            (&mut scan as *mut Scan).cast(),
            0,
        );
    }
    if scan.best == 0 {
        None
    } else {
        Some(scan.best)
    }
}

extern "C" fn scan_one(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Scan` passed by `least_loaded`.
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    if scan.count == 0 {
        return 1;
    }
    // The slot's key in place in `scan` (which lives in the caller's frame):
    // a copy would give this callback a stack frame that adds to the
    // caller's chain.
    scan.key.slot = ((scan.start + i as u32) % scan.count) as u16 + 1;
    let Some(id) = (unsafe { SERVICES.get(&scan.key) }).map(|s| s.backend_id) else {
        return 0;
    };
    let active = unsafe { BACKEND_CONNS.get(id) }.copied().unwrap_or(0);
    if scan.algorithm == ALG_NQ && active == 0 {
        scan.best = id;
        return 1; // stop: an idle backend
    }
    // With equal weights lc (active) and sed (active + 1) order alike.
    let load = if scan.algorithm == ALG_LC {
        active
    } else {
        active + 1
    };
    if load < scan.best_load {
        scan.best_load = load;
        scan.best = id;
        scan.ties = 1;
    } else if load == scan.best_load {
        // Reservoir sampling: each of the k equally loaded backends ends up
        // chosen with probability 1/k.
        scan.ties = scan.ties.wrapping_add(1);
        let ties = scan.ties;
        if ties != 0 && (unsafe { bpf_get_prandom_u32() }) % ties == 0 {
            scan.best = id;
        }
    }
    0
}

/// One more open flow on `backend_id`. The counts steer lc/sed/nq; two
/// CPUs racing on one counter cost a count now and then, which only nudges
/// the choice (this target has no atomic read-modify-write in `core`).
#[inline(always)]
pub fn flow_opened(backend_id: u32) {
    match BACKEND_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: a valid map value pointer for the duration of the program.
        Some(n) => unsafe { *n = (*n).wrapping_add(1) },
        None => {
            let _ = BACKEND_CONNS.insert(backend_id, 1u64, 0);
        }
    }
}

/// One open flow less on `backend_id` (never below zero).
#[inline(always)]
pub fn flow_closed(backend_id: u32) {
    if let Some(n) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: as in `flow_opened`.
        unsafe {
            if *n > 0 {
                *n -= 1;
            }
        }
    }
}
