//! Internet checksum over small, fixed-size stack buffers (for packets we
//! build ourselves; rewrites use the kernel's incremental helpers).

/// One's-complement sum of `words`, folded and inverted.
#[inline(always)]
pub fn checksum<const N: usize>(bytes: &[u8; N]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    if N % 2 == 1 {
        sum += (bytes[N - 1] as u32) << 8;
    }
    // Two folds always suffice for a sum of fewer than 65536 words, and a
    // fixed count keeps the verifier from exploring a data-dependent loop.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
