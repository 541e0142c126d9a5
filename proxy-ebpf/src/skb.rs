//! What tc needs of its skb beyond `__sk_buff`: the checksum state
//! (`ip_summed`), which decides how a rewrite keeps the L4 checksum right.
//!
//! The kernel's `struct sk_buff` is reached through the
//! `bpf_cast_to_kern_ctx` kfunc, which the verifier turns into a register
//! move, and the field is one byte load from it: no helper call. aya 0.14
//! emits neither a kfunc call nor a CO-RE field offset, so both are
//! placeholders here (`KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER`,
//! `SKB_IP_SUMMED_OFF_PLACEHOLDER`) that userspace patches from the
//! running kernel's BTF before loading (`datapath/kfunc.rs`). On a kernel
//! without them it patches the call into `r0 = 0`: `ip_summed` then
//! returns `NOT_READ`, and the rewrite takes the checksum helpers as
//! before.

use core::arch::asm;

use aya_ebpf::programs::TcContext;
use proxy_common::{KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER, SKB_IP_SUMMED_OFF_PLACEHOLDER};

/// `skb->ip_summed` values (include/linux/skbuff.h); the fourth,
/// `CHECKSUM_COMPLETE` (2), is left to the checksum helper, like
/// [`NOT_READ`].
pub const CHECKSUM_NONE: u64 = 0;
pub const CHECKSUM_UNNECESSARY: u64 = 1;
pub const CHECKSUM_PARTIAL: u64 = 3;
/// What [`ip_summed`] returns where userspace could not patch the
/// placeholders in (no BTF, no kfunc).
pub const NOT_READ: u64 = 4;

/// The skb's `ip_summed`, or [`NOT_READ`].
///
/// One `asm!` block, so the call, the null test, the load and the shift
/// always come out together and in this order, which is what userspace
/// looks for: `call PLACEHOLDER; out = NOT_READ; if r0 == 0 goto +3;
/// out = *(u8 *)(r0 + PLACEHOLDER); out >>= 0; out &= 3`.
#[inline(always)]
pub fn ip_summed(ctx: &TcContext) -> u64 {
    let state: u64;
    // SAFETY: the placeholder `call` becomes `bpf_cast_to_kern_ctx(ctx)`
    // (r1 in, r0 out, r1-r5 clobbered as for any call) or `r0 = 0`; the
    // load reads the kernel's sk_buff, which the verifier checks against
    // its BTF (and turns into a fault-safe load), at the offset and shift
    // patched to `ip_summed`'s byte and bit position. `state` is written
    // after the call only, so any register but r0 will do.
    unsafe {
        asm!(
            "call {placeholder}",
            "{state} = {not_read}",
            "if r0 == 0 goto +3",
            "{state} = *(u8 *)(r0 + {off})",
            "{state} >>= 0",
            "{state} &= 3",
            placeholder = const KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER,
            off = const SKB_IP_SUMMED_OFF_PLACEHOLDER,
            not_read = const NOT_READ,
            state = out(reg) state,
            inlateout("r1") ctx.skb.skb as u64 => _,
            lateout("r0") _,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, readonly),
        );
    }
    state
}
