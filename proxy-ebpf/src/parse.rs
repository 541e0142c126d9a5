//! Header parsing with bounds-checked direct packet access. The parser only
//! reads; it returns a copy of what the service path needs.

use proxy_common::{PROTO_TCP, PROTO_UDP};

use crate::packet::Packet;

pub const PROTO_ICMP: u8 = 1;

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_MIN_LEN: usize = 20;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// Largest header span we ever need linear: Ethernet + IPv4 with options + TCP.
const MAX_HEADERS: usize = ETH_LEN + 60 + TCP_MIN_LEN;

/// Offsets inside the IPv4 header.
pub const IP_TTL_OFF: usize = ETH_LEN + 8;
pub const IP_CHECK_OFF: usize = ETH_LEN + 10;
pub const IP_SRC_OFF: usize = ETH_LEN + 12;
pub const IP_DST_OFF: usize = ETH_LEN + 16;

/// Why a packet was not parsed into a `Flow`.
pub enum Skip {
    /// Not IPv4 TCP/UDP: not ours, pass untouched.
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
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub id: u16,
    pub proto: u8,
}

/// The parts of an IPv4 TCP/UDP packet the datapath reads.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// IPv4 header length in bytes (20 without options).
    pub ip_hdr_len: usize,
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
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

#[inline(always)]
fn ptr_at<T, P: Packet>(ctx: &P, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn read<T: Copy, P: Packet>(ctx: &P, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; read_unaligned copes with any offset.
    ptr_at::<T, P>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Fills `*flow` in place, all of it on `Ok`. The caller's slot may be
/// uninitialised (a `MaybeUninit`): zeroing it first is a byte-wise
/// `memset` call in BPF. A raw pointer, not `&mut MaybeUninit<Flow>`:
/// BTF refuses the union's name. Its own BPF function: the header copies
/// live in its frame, not in the entry point's, which every other path
/// adds to.
#[inline(never)]
pub fn parse<P: Packet>(ctx: &P, flow: *mut Flow) -> Result<(), Skip> {
    // Make the headers linear when the skb carries them in fragments.
    ctx.make_linear(MAX_HEADERS);
    let ether_type: [u8; 2] = read(ctx, 12).ok_or(Skip::NotService)?;
    if u16::from_be_bytes(ether_type) != ETH_P_IP {
        return Err(Skip::NotService);
    }
    let ip: [u8; IPV4_MIN_LEN] = read(ctx, ETH_LEN).ok_or(Skip::Malformed)?;
    let version = ip[0] >> 4;
    let ip_hdr_len = ((ip[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if version != 4 || ip_hdr_len < IPV4_MIN_LEN || total_len < ip_hdr_len {
        return Err(Skip::Malformed);
    }
    if ETH_LEN + total_len > ctx.len() {
        return Err(Skip::Malformed);
    }
    let proto = ip[9];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    let ip_id = u16::from_be_bytes([ip[4], ip[5]]);
    let frag_field = u16::from_be_bytes([ip[6], ip[7]]);
    let frag_offset = frag_field & 0x1fff;
    let more_fragments = frag_field & 0x2000 != 0;
    // Bounded for the verifier: IHL is at most 15 words.
    let l4_off = ETH_LEN + (ip_hdr_len & 0x3c);
    if proto == PROTO_ICMP && frag_offset == 0 {
        return Err(Skip::Icmp { l4_off });
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
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
        let tcp: [u8; TCP_MIN_LEN] = read(ctx, l4_off).ok_or(Skip::Malformed)?;
        let tcp_hdr_len = ((tcp[12] >> 4) as usize) * 4;
        if l4_len < TCP_MIN_LEN || tcp_hdr_len < TCP_MIN_LEN || tcp_hdr_len > l4_len {
            return Err(Skip::Malformed);
        }
        ([tcp[0], tcp[1], tcp[2], tcp[3]], tcp[13])
    } else {
        let udp: [u8; UDP_LEN] = read(ctx, l4_off).ok_or(Skip::Malformed)?;
        let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
        // A first fragment carries only part of the datagram.
        if udp_len < UDP_LEN || (udp_len > l4_len && !more_fragments) {
            return Err(Skip::Malformed);
        }
        ([udp[0], udp[1], udp[2], udp[3]], 0)
    };
    // SAFETY: the caller's slot, valid for writes.
    unsafe {
        flow.write(Flow {
            saddr,
            daddr,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto,
            l4_off,
            ip_hdr_len,
            tcp_flags,
            first_fragment: more_fragments,
            ip_id,
        })
    };
    Ok(())
}
