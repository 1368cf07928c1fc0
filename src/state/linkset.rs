//! A set of (key, position) pairs, several positions a key, kept in about
//! 8 bytes a pair: the links of [`super::contacts`], one per contact with a
//! BSUID.
//!
//! A hash table of the pairs took 18 bytes a pair at 1,000,000 (9 a
//! bucket, and a table is half empty right after it doubles). Here most
//! pairs sit in one sorted vector of `u64`s (key in the high half) of
//! exactly their size; the pairs added and removed since the last merge
//! wait in two small hash tables and are folded in, in one linear pass,
//! once they number an eighth of the sorted ones (so each pair is moved
//! about eight times over its life). A directory of where each run of
//! keys starts (one `u32` for about eight pairs) takes a lookup straight to
//! the cache line that holds it: a binary search over the whole vector
//! missed the cache at each of its last steps (perf: 6 % of a restart with
//! 1,000,000 links).

use hashbrown::HashTable;

/// Below this many pending changes no merge is worth its pass.
const MIN_PENDING: usize = 1024;
/// Pairs a directory entry covers, about.
const PER_SLOT: usize = 8;

fn pair(key: u32, position: u32) -> u64 {
    (u64::from(key) << 32) | u64::from(position)
}

fn key_of(pair: u64) -> u32 {
    (pair >> 32) as u32
}

/// The hash tables' hash of a key: the keys are keyed hashes already, so
/// one multiplication spreads them over the 64 bits (the tables pick
/// buckets by the low bits, control bytes by the high ones). All pairs of
/// a key share it, so one probe sequence finds them all.
fn spread(key: u32) -> u64 {
    u64::from(key).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[derive(Default)]
pub(super) struct LinkSet {
    /// High bits every key of this set shares (the shard's), ignored by
    /// the directory.
    fixed_bits: u32,
    /// Pairs as of the last merge, ascending.
    sorted: Vec<u64>,
    /// `directory[d]`: the first pair of `sorted` whose key's top
    /// `directory_bits` (after the fixed ones) are `d` or more; one entry
    /// more at the end. Empty while `sorted` is short.
    directory: Vec<u32>,
    directory_bits: u32,
    /// Pairs added since, not in `sorted`.
    added: HashTable<u64>,
    /// Pairs of `sorted` removed since.
    removed: HashTable<u64>,
}

impl LinkSet {
    /// A set whose keys all share their top `fixed_bits`.
    pub fn with_fixed_bits(fixed_bits: u32) -> Self {
        LinkSet {
            fixed_bits,
            ..LinkSet::default()
        }
    }

    /// The directory slot of `key`.
    fn slot(&self, key: u32) -> usize {
        let free = u64::from(key.checked_shl(self.fixed_bits).unwrap_or(0));
        (free >> (32 - self.directory_bits)) as usize
    }

    /// Where the pairs of `key` start (or would) in `sorted`.
    fn start(&self, key: u32) -> usize {
        let first = pair(key, 0);
        if self.directory.is_empty() {
            return self.sorted.partition_point(|&e| e < first);
        }
        let slot = self.slot(key);
        let (from, to) = (
            self.directory[slot] as usize,
            self.directory[slot + 1] as usize,
        );
        from + self.sorted[from..to].partition_point(|&e| e < first)
    }

    /// The pairs of `key` in `sorted`, removed ones included.
    fn sorted_of(&self, key: u32) -> &[u64] {
        let start = self.start(key);
        let run = self.sorted[start..]
            .iter()
            .take_while(|&&e| key_of(e) == key)
            .count();
        &self.sorted[start..start + run]
    }

    /// The pairs held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sorted.len() + self.added.len() - self.removed.len()
    }

    fn in_sorted(&self, p: u64) -> bool {
        self.sorted_of(key_of(p)).contains(&p)
    }

    fn is_removed(&self, p: u64) -> bool {
        self.removed.find(spread(key_of(p)), |&e| e == p).is_some()
    }

    pub fn contains(&self, key: u32, position: u32) -> bool {
        let p = pair(key, position);
        self.added.find(spread(key), |&e| e == p).is_some()
            || (self.in_sorted(p) && !self.is_removed(p))
    }

    /// The positions held for `key`.
    pub fn positions(&self, key: u32) -> impl Iterator<Item = u32> + '_ {
        let old = self.sorted_of(key).iter().filter(|&&e| !self.is_removed(e));
        let new = self
            .added
            .iter_hash(spread(key))
            .filter(move |&&e| key_of(e) == key);
        old.chain(new).map(|&e| e as u32)
    }

    pub fn insert(&mut self, key: u32, position: u32) {
        let p = pair(key, position);
        let hash = spread(key);
        if let Ok(e) = self.removed.find_entry(hash, |&e| e == p) {
            e.remove();
        } else if !self.in_sorted(p) && self.added.find(hash, |&e| e == p).is_none() {
            self.added.insert_unique(hash, p, |&e| spread(key_of(e)));
            self.merge_if_due();
        }
    }

    pub fn remove(&mut self, key: u32, position: u32) {
        let p = pair(key, position);
        let hash = spread(key);
        if let Ok(e) = self.added.find_entry(hash, |&e| e == p) {
            e.remove();
        } else if self.in_sorted(p) && !self.is_removed(p) {
            self.removed.insert_unique(hash, p, |&e| spread(key_of(e)));
            self.merge_if_due();
        }
    }

    fn merge_if_due(&mut self) {
        if self.added.len() + self.removed.len() >= MIN_PENDING.max(self.sorted.len() / 8) {
            self.merge();
        }
    }

    /// Fold the pending changes into `sorted`.
    fn merge(&mut self) {
        let mut added: Vec<u64> = self.added.drain().collect();
        added.sort_unstable();
        let removed = std::mem::take(&mut self.removed);
        let mut merged = Vec::with_capacity(self.sorted.len() + added.len() - removed.len());
        let mut new = added.into_iter().peekable();
        for &p in &self.sorted {
            while let Some(n) = new.next_if(|&n| n < p) {
                merged.push(n);
            }
            if removed.find(spread(key_of(p)), |&e| e == p).is_none() {
                merged.push(p);
            }
        }
        merged.extend(new);
        self.sorted = merged;
        self.index();
        // Emptied tables keep their buckets: give them back.
        self.added = HashTable::new();
    }

    /// Rebuild the directory for `sorted` (a slot for about
    /// [`PER_SLOT`] pairs; none below a few hundred pairs).
    fn index(&mut self) {
        debug_assert!(
            self.sorted
                .first()
                .zip(self.sorted.last())
                .is_none_or(|(a, b)| {
                    let shift = 32 - self.fixed_bits;
                    u64::from(key_of(*a)).checked_shr(shift)
                        == u64::from(key_of(*b)).checked_shr(shift)
                }),
            "every key shares the fixed bits"
        );
        let slots = (self.sorted.len() / PER_SLOT).next_power_of_two();
        self.directory_bits = if slots < 64 {
            0
        } else {
            slots.trailing_zeros()
        };
        let mut directory = Vec::new();
        if self.directory_bits > 0 {
            directory.reserve_exact(slots + 1);
            for (i, &e) in self.sorted.iter().enumerate() {
                let slot = self.slot(key_of(e));
                while directory.len() <= slot {
                    directory.push(i as u32);
                }
            }
            directory.resize(slots + 1, self.sorted.len() as u32);
        }
        self.directory = directory;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Checked against a plain set through several merges: adds, removes,
    /// re-adds, several positions a key, keys over the whole range the
    /// directory splits.
    #[test]
    fn holds_what_a_plain_set_holds_across_merges() {
        let mut links = LinkSet::with_fixed_bits(4);
        let mut plain = BTreeSet::new();
        let mut x: u64 = 7;
        for round in 0..40_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Few keys, so keys have several positions; all with the
            // top 4 bits 0011.
            let key = 0x3000_0000 | (((x >> 40) as u32 % 3_000) * 89_000);
            let position = (x >> 20) as u32 % 5;
            if round % 3 == 2 {
                links.remove(key, position);
                plain.remove(&(key, position));
            } else {
                links.insert(key, position);
                plain.insert((key, position));
            }
            if round % 997 == 0 {
                for k in [key, key + 1, 0x3000_0000, 0x3fff_ffff] {
                    let mut got: Vec<u32> = links.positions(k).collect();
                    got.sort_unstable();
                    let want: Vec<u32> = plain.range((k, 0)..=(k, u32::MAX)).map(|p| p.1).collect();
                    assert_eq!(got, want, "key {k} at round {round}");
                }
            }
        }
        assert!(links.sorted.len() > MIN_PENDING, "merged at least once");
        assert!(links.directory_bits > 0, "with a directory");
        assert_eq!(links.len(), plain.len());
        for &(k, p) in &plain {
            assert!(links.contains(k, p));
        }
        assert!(!links.contains(0x3000_0001, 0));
        links.merge();
        assert_eq!(
            links.sorted,
            plain.iter().map(|&(k, p)| pair(k, p)).collect::<Vec<_>>()
        );
        assert!(links.added.is_empty() && links.removed.is_empty());
    }

    /// After a merge the vector is exactly as long as the pairs.
    #[test]
    fn a_merge_leaves_no_slack() {
        let mut links = LinkSet::default();
        for k in 0..(MIN_PENDING as u32 * 3) {
            links.insert(k.wrapping_mul(2_654_435_761), k);
        }
        links.merge();
        assert_eq!(links.sorted.capacity(), links.sorted.len());
        assert_eq!(links.sorted.len(), MIN_PENDING * 3);
    }
}
