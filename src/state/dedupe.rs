//! Bounded memory of inbound message ids already seen (Meta retries for up
//! to 7 days): one inbound message → at most one run of the rules.
//!
//! An id is kept as the first 64 bits of its SHA-256 with the second it
//! was seen. With a million ids kept, a new id is mistaken for a seen one
//! with a chance of 10^6 / 2^64 ≈ 5 × 10^-14: at a million messages a day,
//! once in some 50,000 years.
//!
//! Most ids sit in two sorted arrays (digests, and the seconds at the same
//! index): 12 bytes an id, dense. A hash table of the same ids is at most
//! 7/8 full and, just past a doubling, half empty — some 27 bytes an id at
//! a million. New ids go to a small hash table first; when it holds
//! [`RECENT_MAX`] they are sorted and merged into the arrays in one pass,
//! which also forgets what expired (and the oldest, over capacity).

use std::collections::HashMap;

use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use crate::domain::Millis;

/// The digest an id is remembered by.
pub type Digest = [u8; 8];

pub fn digest(id: &str) -> Digest {
    let full = Sha256::digest(id.as_bytes());
    let mut d = [0u8; 8];
    d.copy_from_slice(&full[..8]);
    d
}

/// A digest as a snapshot holds it (hex; older snapshots kept 16 bytes,
/// of which the first 8 are this digest).
pub fn digest_from_hex(hex_digest: &str) -> Option<Digest> {
    let bytes = hex::decode(hex_digest).ok()?;
    bytes.get(..8)?.try_into().ok()
}

/// New ids held in the hash table before they are merged into the sorted
/// arrays: a merge rewrites the arrays (a million ids: a few ms), so it
/// happens once per this many new ids.
const RECENT_MAX: usize = 32_768;

/// Ids seen within `ttl`, at most `capacity` of them (the oldest are
/// forgotten first, a tenth at a time).
pub struct Dedupe {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl_ms: Millis,
}

struct Inner {
    /// Digest → second seen, for ids not yet merged.
    /// (foldhash, seeded per process: the digests are already uniform.)
    recent: HashMap<u64, u32, foldhash::fast::RandomState>,
    /// Merged ids, ascending; `seen[i]` is the second `sorted[i]` was seen.
    sorted: Vec<u64>,
    seen: Vec<u32>,
    /// The second past which a merge is due to forget expired ids.
    next_expiry: u32,
}

fn secs(ms: Millis) -> u32 {
    (ms.max(0) / 1000).min(u32::MAX as Millis) as u32
}

impl Inner {
    fn len(&self) -> usize {
        self.recent.len() + self.sorted.len()
    }

    /// Merge the recent ids into the sorted arrays, forgetting those seen
    /// more than `ttl` seconds before `now`, then the oldest while more
    /// than `keep` remain.
    fn merge(&mut self, now: u32, ttl: u32, keep: usize) {
        let mut fresh: Vec<(u64, u32)> = self.recent.drain().collect();
        fresh.sort_unstable_by_key(|(d, _)| *d);
        let total = self.sorted.len() + fresh.len();
        let mut sorted = Vec::with_capacity(total);
        let mut seen = Vec::with_capacity(total);
        let old = std::mem::take(&mut self.sorted);
        let old_seen = std::mem::take(&mut self.seen);
        let live = |at: u32| now.saturating_sub(at) <= ttl;
        let mut old = old.into_iter().zip(old_seen).peekable();
        let mut fresh = fresh.into_iter().peekable();
        loop {
            let next = match (old.peek(), fresh.peek()) {
                (Some(a), Some(b)) if a.0 < b.0 => old.next(),
                (Some(_), Some(_)) | (None, Some(_)) => fresh.next(),
                (Some(_), None) => old.next(),
                (None, None) => break,
            };
            if let Some((d, at)) = next.filter(|(_, at)| live(*at)) {
                sorted.push(d);
                seen.push(at);
            }
        }
        if sorted.len() > keep {
            forget_oldest(&mut sorted, &mut seen, keep);
        }
        sorted.shrink_to_fit();
        seen.shrink_to_fit();
        // The oldest expires then; expiry merges come at most ten times a
        // ttl (an id may be kept up to a tenth of the ttl longer).
        self.next_expiry = seen
            .iter()
            .min()
            .map_or(u32::MAX, |m| m.saturating_add(ttl).saturating_add(1))
            .max(now.saturating_add(ttl / 10));
        self.sorted = sorted;
        self.seen = seen;
    }
}

/// Keep the `keep` ids seen last (of those seen in the same second as the
/// newest forgotten one, the first in digest order).
fn forget_oldest(sorted: &mut Vec<u64>, seen: &mut Vec<u32>, keep: usize) {
    let drop = sorted.len() - keep;
    let mut ages = seen.clone();
    let (_, cutoff, _) = ages.select_nth_unstable(drop - 1);
    let cutoff = *cutoff;
    // Those before the cutoff second go; of that second, as many as needed.
    let mut at_cutoff = drop - seen.iter().filter(|at| **at < cutoff).count();
    let mut kept = 0;
    for i in 0..sorted.len() {
        let at = seen[i];
        let gone = at < cutoff || (at == cutoff && at_cutoff > 0);
        if at == cutoff && gone {
            at_cutoff -= 1;
        }
        if !gone {
            sorted[kept] = sorted[i];
            seen[kept] = at;
            kept += 1;
        }
    }
    sorted.truncate(kept);
    seen.truncate(kept);
}

/// `sorted.binary_search(&d)` for keys spread evenly over the `u64`s (the
/// digests are hash bits): each probe goes where `d` should be by its
/// value, which narrows a million keys to a few in three or four probes,
/// where halving takes twenty — most of them cache misses. A probe that
/// does not halve the range is followed by a halving step, so skewed keys
/// cost at most twice the halving's probes.
fn find_uniform(sorted: &[u64], d: u64) -> Result<usize, usize> {
    let (mut lo, mut hi) = (0, sorted.len());
    // Compare with `sorted[i]` and keep the side `d` is on; true if found.
    let narrow = |i: usize, lo: &mut usize, hi: &mut usize| match sorted[i].cmp(&d) {
        std::cmp::Ordering::Equal => true,
        std::cmp::Ordering::Less => {
            *lo = i + 1;
            false
        }
        std::cmp::Ordering::Greater => {
            *hi = i;
            false
        }
    };
    while hi - lo > 16 {
        let (first, last) = (sorted[lo], sorted[hi - 1]);
        if d <= first {
            return if d == first { Ok(lo) } else { Err(lo) };
        }
        if d > last {
            return Err(hi);
        }
        // first < d <= last, so last > first: the span is not zero.
        let offset =
            (u128::from(d - first) * (hi - 1 - lo) as u128 / u128::from(last - first)) as usize;
        let before = hi - lo;
        let probe = lo + offset;
        if narrow(probe, &mut lo, &mut hi) {
            return Ok(probe);
        }
        let mid = lo + (hi - lo) / 2;
        if hi - lo > before / 2 && narrow(mid, &mut lo, &mut hi) {
            return Ok(mid);
        }
    }
    sorted[lo..hi]
        .binary_search(&d)
        .map(|i| lo + i)
        .map_err(|i| lo + i)
}

impl Dedupe {
    pub fn new(capacity: usize, ttl_ms: Millis) -> Self {
        Dedupe {
            inner: Mutex::new(Inner {
                recent: HashMap::default(),
                sorted: Vec::new(),
                seen: Vec::new(),
                next_expiry: u32::MAX,
            }),
            capacity: capacity.max(1),
            ttl_ms,
        }
    }

    /// Record `id` as seen at `now`; false if it was seen before (and not
    /// yet forgotten).
    pub fn first_time(&self, id: &str, now: Millis) -> bool {
        self.first_time_digest(digest(id), now)
    }

    /// [`Dedupe::first_time`] for an id already digested.
    pub fn first_time_digest(&self, d: Digest, now: Millis) -> bool {
        let d = u64::from_be_bytes(d);
        let at = secs(now);
        let ttl = secs(self.ttl_ms);
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        // Seen before: still remembered if within the ttl, else seen anew.
        let earlier = match find_uniform(&inner.sorted, d) {
            Ok(i) => Some(&mut inner.seen[i]),
            Err(_) => inner.recent.get_mut(&d),
        };
        if let Some(seen) = earlier {
            if at.saturating_sub(*seen) <= ttl {
                return false;
            }
            *seen = at;
            return true;
        }
        inner.recent.insert(d, at);
        // Full: the oldest tenth (or more) goes at once, not one by one.
        let full = inner.recent.len() >= RECENT_MAX.min(self.capacity);
        let over = inner.len() > self.capacity;
        if full || over || at > inner.next_expiry {
            let keep = if over {
                self.capacity - self.capacity / 10
            } else {
                self.capacity
            };
            inner.merge(at, ttl, keep);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every remembered digest with the time (ms) it was seen.
    pub fn entries(&self) -> Vec<(Digest, Millis)> {
        let inner = self.inner.lock();
        let ms = |d: u64, at: u32| (d.to_be_bytes(), Millis::from(at) * 1000);
        inner
            .sorted
            .iter()
            .zip(&inner.seen)
            .map(|(d, at)| ms(*d, *at))
            .chain(inner.recent.iter().map(|(d, at)| ms(*d, *at)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Millis = 1000;

    #[test]
    fn an_id_is_new_once() {
        let d = Dedupe::new(10, 1000 * S);
        assert!(d.first_time("a", 0));
        assert!(!d.first_time("a", 10 * S));
        assert!(d.first_time("b", 10 * S));
        assert!(!d.first_time_digest(digest("b"), 11 * S));
    }

    #[test]
    fn snapshots_of_both_digest_sizes_restore() {
        let id = "wamid.HBgLMTU1NTAwMDAwMDA";
        let full = hex::encode(Sha256::digest(id.as_bytes()));
        assert_eq!(
            digest_from_hex(&full[..32]),
            Some(digest(id)),
            "16 bytes (older snapshots)"
        );
        assert_eq!(digest_from_hex(&full[..16]), Some(digest(id)));
        assert_eq!(digest_from_hex("abc"), None);
        assert_eq!(digest_from_hex("00"), None);
    }

    #[test]
    fn the_search_by_value_finds_what_halving_finds() {
        let mut rng = fastrand::Rng::with_seed(9);
        let uniform: Vec<u64> = (0..5_000).map(|_| rng.u64(..)).collect();
        // Skewed: clustered at both ends, with runs of neighbours.
        let skewed: Vec<u64> = (0..5_000u64)
            .map(|i| match i % 3 {
                0 => i,
                1 => u64::MAX - i * i,
                _ => (1 << 40) + i,
            })
            .collect();
        for mut keys in [uniform, skewed, (0..40).collect(), vec![7], vec![]] {
            keys.sort_unstable();
            keys.dedup();
            let mut probes: Vec<u64> = keys.clone();
            probes.extend(keys.iter().map(|k| k.wrapping_add(1)));
            probes.extend(keys.iter().map(|k| k.wrapping_sub(1)));
            probes.extend([0, 1, u64::MAX, u64::MAX - 1, 1 << 63]);
            probes.extend((0..2_000).map(|_| rng.u64(..)));
            for p in probes {
                assert_eq!(find_uniform(&keys, p), keys.binary_search(&p), "{p}");
            }
        }
    }

    /// Distinct digests (not hashes of text: fast in a debug build).
    fn id(i: u64) -> Digest {
        (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555).to_be_bytes()
    }

    #[test]
    fn ids_stay_seen_across_merges() {
        let d = Dedupe::new(1_000_000, 1000 * S);
        let n = 3 * RECENT_MAX as u64 + 5;
        for i in 0..n {
            assert!(d.first_time_digest(id(i), S), "{i} is new");
        }
        assert_eq!(d.len() as u64, n);
        assert!(!d.inner.lock().sorted.is_empty(), "merged");
        for i in 0..n {
            assert!(!d.first_time_digest(id(i), 2 * S), "{i} was seen");
        }
        assert!(d.first_time_digest(id(n), 2 * S));
        let mut entries = d.entries();
        entries.sort();
        entries.dedup();
        assert_eq!(entries.len() as u64, n + 1, "a snapshot lists each once");
    }

    #[test]
    fn a_full_memory_forgets_the_oldest_tenth() {
        let cap = 50_000;
        let d = Dedupe::new(cap, 1_000_000 * S);
        for i in 0..60_000u64 {
            assert!(d.first_time_digest(id(i), (i as Millis / 10) * S));
            assert!(d.len() <= cap, "{} ids held", d.len());
        }
        assert!(d.len() >= cap - cap / 10 - RECENT_MAX);
        for i in 60_000 - 20_000..60_000 {
            assert!(!d.first_time_digest(id(i), 6_000 * S), "{i}: recent, kept");
        }
        assert!(d.first_time_digest(id(0), 6_000 * S), "the oldest went");
    }

    #[test]
    fn an_id_seen_again_after_the_ttl_is_new_again() {
        let d = Dedupe::new(1_000_000, 10 * S);
        for i in 0..RECENT_MAX as u64 + 1 {
            assert!(d.first_time_digest(id(i), 0));
        }
        // id(0) is in the sorted arrays now, the last one in the table.
        assert!(!d.first_time_digest(id(0), 10 * S));
        assert!(d.first_time_digest(id(0), 11 * S));
        assert!(!d.first_time_digest(id(0), 12 * S));
        assert!(d.first_time_digest(id(RECENT_MAX as u64), 11 * S));
    }

    #[test]
    fn memory_is_bounded_by_capacity_and_age() {
        let d = Dedupe::new(10, 1000 * S);
        for i in 0..25 {
            assert!(d.first_time(&format!("id{i}"), i * S));
            assert!(d.len() <= 10, "{} ids held", d.len());
        }
        assert!(d.first_time("id0", 26 * S), "the oldest id was forgotten");
        assert!(!d.first_time("id24", 26 * S), "the newest is kept");
        assert!(d.first_time("z", 5000 * S));
        assert!(d.first_time("q", 5000 * S));
        assert!(
            d.len() <= 3,
            "ids older than the ttl are dropped ({})",
            d.len()
        );
    }
}
