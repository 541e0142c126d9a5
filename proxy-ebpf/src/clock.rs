//! The datapath's clock: CLOCK_MONOTONIC at tick resolution (timeouts are
//! seconds), read from jiffies.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::XdpContext,
};
use proxy_common::DatapathConfig;

/// Now, as `jiffies * clock_tick_ns + clock_offset_ns`: the verifier
/// inlines `bpf_jiffies64` into one load, where a clock helper costs a call
/// and its return (on CPUs with return thunks, more than the rest of an
/// established packet's bookkeeping). `bpf_ktime_get_coarse_ns` until
/// userspace has written the scale.
#[inline(always)]
pub fn now_ns(config: &DatapathConfig) -> u64 {
    if config.clock_tick_ns == 0 {
        return unsafe { bpf_ktime_get_coarse_ns() };
    }
    unsafe { bpf_jiffies64() }
        .wrapping_mul(config.clock_tick_ns)
        .wrapping_add(config.clock_offset_ns)
}

/// Writes jiffies and CLOCK_MONOTONIC (ns), read back to back, over the
/// first 16 bytes of the frame (native byte order); userspace test-runs
/// this to scale jiffies. `XDP_ABORTED` for a frame shorter than that.
#[inline(always)]
pub fn sample(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + 16 > ctx.data_end() {
        return aya_ebpf::bindings::xdp_action::XDP_ABORTED;
    }
    let (jiffies, ns) = unsafe { (bpf_jiffies64(), bpf_ktime_get_ns()) };
    // SAFETY: 16 bytes of packet, checked above.
    unsafe {
        core::ptr::write_unaligned(start as *mut u64, jiffies);
        core::ptr::write_unaligned((start + 8) as *mut u64, ns);
    }
    aya_ebpf::bindings::xdp_action::XDP_PASS
}
