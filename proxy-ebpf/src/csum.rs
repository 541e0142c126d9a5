//! Internet checksum: whole, over small fixed-size stack buffers (for
//! packets we build ourselves), and incremental (RFC 1624, for rewrites).

/// One's-complement sum of `bytes`, folded and inverted. Callers pass
/// slices of fixed-size buffers, so the loop bound is a constant.
#[inline(always)]
pub fn checksum(bytes: &[u8]) -> u16 {
    let n = bytes.len();
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < n {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    if n % 2 == 1 {
        sum += (bytes[n - 1] as u32) << 8;
    }
    // Two folds always suffice for a sum of fewer than 65536 words, and a
    // fixed count keeps the verifier from exploring a data-dependent loop.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// RFC 1624 incremental update of checksum `check` for a 16-bit field (a
/// TTL and protocol word) changing from `old` to `new`. All three are raw,
/// as loaded from the packet (network byte order read natively): the one's
/// complement sum does not depend on byte order, so nothing is swapped.
#[inline(always)]
pub fn update2(check: u16, old: u16, new: u16) -> u16 {
    apply(check, change2(old, new))
}

/// What a 32-bit field changing from `old` to `new` adds to a checksum
/// (unfolded: changes add up, and `apply` folds once for all of them).
#[inline(always)]
pub fn change4(old: u32, new: u32) -> u64 {
    // A 32-bit word adds up like its two 16-bit halves once folded.
    (!old) as u64 + new as u64
}

/// The same for a 16-bit field.
#[inline(always)]
pub fn change2(old: u16, new: u16) -> u64 {
    (!old) as u64 + new as u64
}

/// Checksum `check` updated by the sum of some `change4` / `change2`.
#[inline(always)]
pub fn apply(check: u16, change: u64) -> u16 {
    fold((!check) as u64 + change)
}

/// A CHECKSUM_PARTIAL skb's L4 checksum field `sum` (the pseudo-header's
/// sum, not inverted: the device or the stack finishes it) updated by the
/// sum of some `change4`, as the kernel's `inet_proto_csum_replace4` does.
#[inline(always)]
pub fn add_to_sum(sum: u16, change: u64) -> u16 {
    !fold(sum as u64 + change)
}

/// The one's complement sum of two 32-bit words, as one 32-bit word (the
/// carry added back in): what the pair adds to a checksum.
#[inline(always)]
pub fn add32(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(carry as u32)
}

/// Folds a sum of a few 32-bit words (below 2^48) to 16 bits and inverts
/// it.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    // Below 2^48 in: three folds always reach 16 bits; a fixed count keeps
    // the verifier from exploring a data-dependent loop.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
