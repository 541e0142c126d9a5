//! The address filter (`ADDRESS_FILTER_V1`): one bit per hash of every
//! IPv4 frontend address. A packet no flow knows whose destination's bit is
//! clear is no Service's, and the datapath passes it after one array load
//! instead of hash lookups of its frontend and address marker. Pure: `sync` decides
//! when to write it, `datapath` writes it.

use std::net::{Ipv4Addr, Ipv6Addr};

use proxy_common::{address_filter_slot, AddressFilter, ADDRESS_FILTER_WORDS};

/// The bits for one set of frontend addresses, as the map holds them.
#[derive(Clone, PartialEq, Eq)]
pub struct AddressFilterBits {
    words: Box<[u64]>,
    /// How many of them are set.
    set: u32,
}

impl std::fmt::Debug for AddressFilterBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AddressFilterBits({} bits set)", self.set)
    }
}

impl AddressFilterBits {
    /// Bits in all.
    pub const BITS: u32 = (ADDRESS_FILTER_WORDS * 64) as u32;

    /// The filter of `addresses` (16-byte map form). IPv6 addresses have no
    /// bit: the datapath tests IPv4 destinations only.
    pub fn of<'a>(addresses: impl IntoIterator<Item = &'a [u8; 16]>) -> Self {
        let mut filter = Self::from_words(vec![0u64; ADDRESS_FILTER_WORDS]);
        for addr in addresses {
            filter.insert(addr);
        }
        filter
    }

    /// The filter as read from the map (`ADDRESS_FILTER_WORDS` words).
    pub fn from_words(words: Vec<u64>) -> Self {
        assert_eq!(
            words.len(),
            ADDRESS_FILTER_WORDS,
            "an address filter's words"
        );
        let set = words.iter().map(|w| w.count_ones()).sum();
        Self {
            words: words.into_boxed_slice(),
            set,
        }
    }

    /// This filter with the bits of `addresses` set too; `None` when it has
    /// them all already (no copy made).
    pub fn with<'a>(&self, addresses: impl IntoIterator<Item = &'a [u8; 16]>) -> Option<Self> {
        let mut missing = addresses.into_iter().filter(|a| !self.holds(a)).peekable();
        missing.peek()?;
        let mut wider = self.clone();
        for addr in missing {
            wider.insert(addr);
        }
        Some(wider)
    }

    /// Whether the datapath would take `addr` for a possible frontend.
    pub fn may_hold(&self, addr: Ipv4Addr) -> bool {
        self.holds(&proxy_common::ipv4_mapped(addr.octets()))
    }

    /// Whether `addr` (16-byte map form) has its bit; an IPv6 address
    /// needs none.
    fn holds(&self, addr: &[u8; 16]) -> bool {
        slot(addr).is_none_or(|(word, bit)| self.words[word] & bit != 0)
    }

    fn insert(&mut self, addr: &[u8; 16]) {
        if let Some((word, bit)) = slot(addr) {
            if self.words[word] & bit == 0 {
                self.words[word] |= bit;
                self.set += 1;
            }
        }
    }

    /// Bits set: over the 2^22 in all, the share of other addresses that
    /// take the frontend and address-marker lookups.
    pub fn bits_set(&self) -> u32 {
        self.set
    }

    /// The map value.
    pub fn value(&self) -> &AddressFilter {
        bytemuck::from_bytes(bytemuck::cast_slice(&self.words))
    }
}

/// An IPv4-mapped address's word and bit; `None` for IPv6.
fn slot(addr: &[u8; 16]) -> Option<(usize, u64)> {
    let v4 = Ipv6Addr::from(*addr).to_ipv4_mapped()?;
    Some(address_filter_slot(u32::from(v4)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::ipv4_mapped;

    #[test]
    fn every_ipv4_address_in_the_set_has_its_bit_and_ipv6_ones_none() {
        let v4: Vec<[u8; 16]> = (0..1000u32)
            .map(|i| ipv4_mapped((0xc613_0000 + i).to_be_bytes()))
            .collect();
        let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets();
        let filter = AddressFilterBits::of(v4.iter().chain([&v6]));
        for i in 0..1000u32 {
            assert!(filter.may_hold(Ipv4Addr::from(0xc613_0000 + i)));
        }
        // 1000 addresses: at most 1000 bits, fewer only where two collide.
        let set = filter.bits_set();
        assert!((990..=1000).contains(&set), "{set} bits set");
        assert_eq!(AddressFilterBits::of([&v6]).bits_set(), 0);
    }

    #[test]
    fn other_addresses_mostly_find_their_bit_clear() {
        let frontends: Vec<[u8; 16]> = (0..100_000u32)
            .map(|i| ipv4_mapped((0xc613_0000 + i).to_be_bytes()))
            .collect();
        let filter = AddressFilterBits::of(&frontends);
        // Addresses of no frontend (198.18.0.0/16): about 2.4% share a bit.
        let shared = (0..65_536u32)
            .filter(|i| filter.may_hold(Ipv4Addr::from(0xc612_0000 + i)))
            .count();
        assert!(shared < 65_536 * 4 / 100, "{shared} of 65536 share a bit");
        assert!(!AddressFilterBits::of([]).may_hold(Ipv4Addr::new(198, 18, 0, 1)));
    }

    #[test]
    fn the_map_value_is_the_words_in_order() {
        let addr = Ipv4Addr::new(198, 19, 255, 1);
        let filter = AddressFilterBits::of([&ipv4_mapped(addr.octets())]);
        let (word, bit) = address_filter_slot(u32::from(addr));
        let value = filter.value();
        assert_eq!(value.words[word], bit);
        assert_eq!(value.words.iter().filter(|w| **w != 0).count(), 1);
    }
}
