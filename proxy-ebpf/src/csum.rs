//! Internet checksum over small, fixed-size stack buffers (for packets we
//! build ourselves; rewrites use the kernel's incremental helpers).

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

/// RFC 1624 incremental update of checksum `check` for a 16-bit word
/// changing from `old` to `new` (both in network byte order).
#[inline(always)]
pub fn update2(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!u16::from_be_bytes(old)) as u32;
    sum += u16::from_be_bytes(new) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The same for a 32-bit field (an IPv4 address).
#[inline(always)]
pub fn update4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let check = update2(check, [old[0], old[1]], [new[0], new[1]]);
    update2(check, [old[2], old[3]], [new[2], new[3]])
}
