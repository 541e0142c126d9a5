//! Header parsing with bounds-checked direct packet access. The parser only
//! reads; it returns a copy of what the service path needs.

use proxy_common::{ipv4_mapped, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::packet::Packet;

pub const PROTO_ICMP: u8 = 1;

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_LEN: usize = 20;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// SCTP's common header: ports, verification tag, checksum.
const SCTP_COMMON_LEN: usize = 12;
/// Offset of the CRC32c in the SCTP common header.
pub const SCTP_CHECK_OFF: usize = 8;
/// Largest header span we ever need linear: Ethernet + IPv4 with options + TCP.
const MAX_HEADERS: usize = ETH_LEN + 60 + TCP_MIN_LEN;

/// Offsets inside the IPv4 header.
pub const IP_TTL_OFF: usize = ETH_LEN + 8;
pub const IP_CHECK_OFF: usize = ETH_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_LEN + 12;
pub const IP_DST_OFF: usize = ETH_LEN + 16;

/// Why a packet was not parsed into a `Flow`.
pub enum Skip {
    /// Not IPv4 TCP/UDP/SCTP: not ours, pass untouched.
    NotService,
    /// Headers truncated or inconsistent: pass untouched, count it.
    Malformed,
    /// A non-first IP fragment: no L4 header; translated by the record
    /// its first fragment left (see `frag.rs`).
    Fragment(FragmentId),
    /// An ICMP message (errors about a translated flow are handled in `icmp.rs`).
    Icmp { l4_off: usize },
}

/// What identifies the fragments of one datagram (RFC 791).
#[derive(Clone, Copy)]
pub struct FragmentId {
    pub saddr: Ipv4,
    pub daddr: Ipv4,
    pub id: u16,
    pub proto: u8,
}

/// An IPv4 address as the datapath handles it: its four bytes loaded as
/// one native `u32`, in network byte order like C's `__be32`. One
/// register, where `[u8; 4]` is taken apart byte by byte by LLVM.
pub type Ipv4 = u32;

/// `addr` in the maps' 16-byte form (IPv4-mapped IPv6).
#[inline(always)]
pub fn mapped(addr: Ipv4) -> [u8; 16] {
    ipv4_mapped(addr.to_ne_bytes())
}

/// The IPv4 address in a map's 16-byte (IPv4-mapped) address.
#[inline(always)]
pub fn unmapped(addr: &[u8; 16]) -> Ipv4 {
    u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]])
}

/// Zeroes a map's 16-byte address in place with two word stores.
/// Volatile: LLVM merges plain zero stores of 16 bytes or more into a
/// `memset`, which the BPF backend emits as a call to a byte-at-a-time
/// loop (as it does every `memset` and `memmove`).
#[inline(always)]
pub fn clear_addr(addr: &mut [u8; 16]) {
    let words = addr.as_mut_ptr().cast::<u64>();
    // SAFETY: 16 writable bytes. Every caller's address is a field at an
    // 8-byte offset of an 8-byte-aligned map value (the verifier refuses
    // a misaligned stack store at load time, so a layout that broke this
    // could not go unnoticed).
    unsafe {
        core::ptr::write_volatile(words, 0);
        core::ptr::write_volatile(words.add(1), 0);
    }
}

/// The parts of an IPv4 TCP/UDP packet the datapath reads.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: Ipv4,
    pub daddr: Ipv4,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: u8,
    /// IPv4 header length in bytes (20 without options).
    pub ip_hdr_len: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The first fragment of a fragmented datagram (MF set, offset 0):
    /// later fragments need a record of the translation.
    pub first_fragment: bool,
    pub ip_id: u16,
}

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

impl Flow {
    /// Offset of the L4 header, visibly bounded: the verifier may lose
    /// track of a value that went through a struct in another stack frame,
    /// and refuses packet pointer arithmetic with an unbounded offset.
    #[inline(always)]
    pub fn l4_start(&self) -> usize {
        // At most 14 + 60; the mask changes no valid value.
        (self.l4_off & 0x7f) as usize
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_start() + 16
        } else {
            self.l4_start() + 6
        }
    }

    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// The address of `len` bytes at `offset` when the packet's linear data
/// holds them: one bounds check for a whole header, whose fields are then
/// read with `field` and written with `set_field`.
#[inline(always)]
pub fn bytes_at<P: Packet>(ctx: &P, offset: usize, len: usize) -> Option<usize> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some(start + offset)
}

/// The frame's Ethernet and fixed IPv4 headers: the span whose fields sit
/// at the `IP_*_OFF` offsets, read with `field` from the address returned.
#[inline(always)]
pub fn ipv4_header<P: Packet>(ctx: &P) -> Option<usize> {
    bytes_at(ctx, 0, ETH_LEN + IPV4_MIN_LEN)
}

/// One field at `at + off`, read with a single load of its size (a `u16`
/// or `u32` keeps network byte order: a raw value, as C's `__be16`). Also
/// for map values read word by word (the flow cache's slots).
///
/// # Safety
/// `at` came from `bytes_at` with a length that covers `off + size_of::<T>()`,
/// or is a map value that long, with `at + off` aligned for `T`.
#[inline(always)]
pub unsafe fn field<T: Copy>(at: usize, off: usize) -> T {
    // The field need not be aligned for `T`: the BPF ISA has no alignment
    // rule for packet access and the verifier allows misaligned packet
    // loads where the CPU does them (x86-64, arm64). `read_unaligned` would
    // be split into byte loads by LLVM's BPF backend (several instructions
    // per byte); a volatile load stays one instruction.
    unsafe { core::ptr::read_volatile((at + off) as *const T) }
}

/// Writes one field, the counterpart of `field`.
///
/// # Safety
/// As for `field`, and the packet is writable (XDP, or tc after the
/// verifier's unclone prologue).
#[inline(always)]
pub unsafe fn set_field<T: Copy>(at: usize, off: usize, value: T) {
    // SAFETY: as in `field`.
    unsafe { core::ptr::write_volatile((at + off) as *mut T, value) }
}

/// One field at `offset`, bounds-checked on its own.
#[inline(always)]
pub fn load<T: Copy, P: Packet>(ctx: &P, offset: usize) -> Option<T> {
    let at = bytes_at(ctx, offset, core::mem::size_of::<T>())?;
    // SAFETY: `bytes_at` checked exactly this field.
    Some(unsafe { field(at, 0) })
}

/// Fills `*flow` in place, all of it on `Ok`. The caller's slot may be
/// uninitialised (a `MaybeUninit`): zeroing it first is a byte-wise
/// `memset` call in BPF. A raw pointer, not `&mut MaybeUninit<Flow>`:
/// BTF refuses the union's name. Inlined into the entry point: every
/// packet parses, and a BPF-to-BPF call and its return (a return thunk on
/// CPUs with return-stack mitigations) cost more than the parsing.
#[inline(always)]
pub fn parse<P: Packet>(ctx: &P, flow: *mut Flow) -> Result<(), Skip> {
    // Make the headers linear when the skb carries them in fragments.
    ctx.make_linear(MAX_HEADERS);
    // One bounds check for Ethernet and the fixed IPv4 header; each field
    // is then one load (see `field`).
    let Some(ip) = ipv4_header(ctx) else {
        return Err(match load::<u16, P>(ctx, 12) {
            Some(ether_type) if u16::from_be(ether_type) == ETH_P_IP => Skip::Malformed,
            _ => Skip::NotService,
        });
    };
    // SAFETY (every `field` below): inside the checked span.
    if u16::from_be(unsafe { field::<u16>(ip, 12) }) != ETH_P_IP {
        return Err(Skip::NotService);
    }
    let version_ihl: u8 = unsafe { field(ip, ETH_LEN) };
    let version = version_ihl >> 4;
    let ip_hdr_len = ((version_ihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be(unsafe { field(ip, ETH_LEN + 2) }) as usize;
    if version != 4 || ip_hdr_len < IPV4_MIN_LEN || total_len < ip_hdr_len {
        return Err(Skip::Malformed);
    }
    if ETH_LEN + total_len > ctx.len() {
        return Err(Skip::Malformed);
    }
    let proto: u8 = unsafe { field(ip, ETH_LEN + 9) };
    let saddr: Ipv4 = unsafe { field(ip, IP_SRC_OFF) };
    let daddr: Ipv4 = unsafe { field(ip, IP_DST_OFF) };
    let ip_id = u16::from_be(unsafe { field(ip, ETH_LEN + 4) });
    let frag_field = u16::from_be(unsafe { field(ip, ETH_LEN + 6) });
    let frag_offset = frag_field & 0x1fff;
    let more_fragments = frag_field & 0x2000 != 0;
    // Bounded for the verifier: IHL is at most 15 words.
    let l4_off = ETH_LEN + (ip_hdr_len & 0x3c);
    if proto == PROTO_ICMP && frag_offset == 0 {
        return Err(Skip::Icmp { l4_off });
    }
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return Err(Skip::NotService);
    }
    if frag_offset != 0 {
        return Err(Skip::Fragment(FragmentId {
            saddr,
            daddr,
            id: ip_id,
            proto,
        }));
    }
    let l4_len = total_len - ip_hdr_len;
    let (ports, tcp_flags) = if proto == PROTO_TCP {
        let tcp = bytes_at(ctx, l4_off, TCP_MIN_LEN).ok_or(Skip::Malformed)?;
        // SAFETY: inside the checked TCP header.
        let (ports, data_offset, flags) = unsafe {
            (
                field::<u32>(tcp, 0),
                field::<u8>(tcp, 12),
                field::<u8>(tcp, 13),
            )
        };
        let tcp_hdr_len = ((data_offset >> 4) as usize) * 4;
        if l4_len < TCP_MIN_LEN || tcp_hdr_len < TCP_MIN_LEN || tcp_hdr_len > l4_len {
            return Err(Skip::Malformed);
        }
        (ports, flags)
    } else if proto == PROTO_SCTP {
        let sctp = bytes_at(ctx, l4_off, SCTP_COMMON_LEN).ok_or(Skip::Malformed)?;
        if l4_len < SCTP_COMMON_LEN {
            return Err(Skip::Malformed);
        }
        // SAFETY: inside the checked SCTP common header.
        (unsafe { field::<u32>(sctp, 0) }, 0)
    } else {
        let udp = bytes_at(ctx, l4_off, UDP_LEN).ok_or(Skip::Malformed)?;
        // SAFETY: inside the checked UDP header.
        let (ports, udp_len) = unsafe { (field::<u32>(udp, 0), field::<u16>(udp, 4)) };
        let udp_len = u16::from_be(udp_len) as usize;
        // A first fragment carries only part of the datagram.
        if udp_len < UDP_LEN || (udp_len > l4_len && !more_fragments) {
            return Err(Skip::Malformed);
        }
        (ports, 0)
    };
    let ports = ports.to_ne_bytes();
    // SAFETY: the caller's slot, valid for writes.
    unsafe {
        flow.write(Flow {
            saddr,
            daddr,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto,
            // Both below 80 (IHL is at most 15 words).
            l4_off: l4_off as u8,
            ip_hdr_len: ip_hdr_len as u8,
            tcp_flags,
            first_fragment: more_fragments,
            ip_id,
        })
    };
    Ok(())
}
