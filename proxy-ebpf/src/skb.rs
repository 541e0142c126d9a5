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
//! returns `None`, and the rewrite takes the checksum helpers as before.

use core::arch::asm;

use aya_ebpf::programs::TcContext;
use proxy_common::{KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER, SKB_IP_SUMMED_OFF_PLACEHOLDER};

/// `skb->ip_summed` values (include/linux/skbuff.h); the fourth,
/// `CHECKSUM_COMPLETE` (2), is left to the checksum helper.
pub const CHECKSUM_NONE: u64 = 0;
pub const CHECKSUM_UNNECESSARY: u64 = 1;
pub const CHECKSUM_PARTIAL: u64 = 3;

/// The skb's `ip_summed`, or `None` where userspace could not patch the
/// placeholders in (no BTF, no kfunc).
#[inline(always)]
pub fn ip_summed(ctx: &TcContext) -> Option<u64> {
    let skb: u64;
    // SAFETY: the placeholder `call` becomes `bpf_cast_to_kern_ctx(ctx)`
    // (r1 in, r0 out; r1-r5 clobbered as for any call) or `r0 = 0`.
    unsafe {
        asm!(
            "call {placeholder}",
            placeholder = const KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER,
            inlateout("r1") ctx.skb.skb as u64 => _,
            lateout("r0") skb,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, pure, nomem),
        );
    }
    if skb == 0 {
        return None;
    }
    let byte: u64;
    // SAFETY: a load from the kernel's sk_buff, which the verifier checks
    // against its BTF (and turns into a fault-safe load); the offset and
    // the shift are patched to `ip_summed`'s byte and bit position.
    unsafe {
        asm!(
            "{byte} = *(u8 *)({skb} + {off})",
            "{byte} >>= 0",
            skb = in(reg) skb,
            byte = out(reg) byte,
            off = const SKB_IP_SUMMED_OFF_PLACEHOLDER,
            options(nostack, pure, readonly),
        );
    }
    Some(byte & 3)
}
