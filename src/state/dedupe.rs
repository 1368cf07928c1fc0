//! Bounded memory of inbound message ids already seen (Meta retries for up
//! to 7 days): one inbound message → at most one run of the rules.
//!
//! An id is kept as the first 64 bits of its SHA-256 with the second it
//! was seen: 12 bytes an entry instead of the id's ~60 characters plus two
//! copies of the bookkeeping, so a million ids fit in some 30 MB. With a
//! million ids kept, a new id is mistaken for a seen one with a chance of
//! 10^6 / 2^64 ≈ 5 × 10^-14: at a million messages a day, once in some
//! 50,000 years.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
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

/// Ids seen within `ttl`, at most `capacity` of them (the oldest are
/// forgotten first, a tenth at a time).
pub struct Dedupe {
    /// digest → seconds (since the Unix epoch) it was seen.
    /// (foldhash, seeded per process: the digests are already uniform.)
    seen: DashMap<Digest, u32, foldhash::fast::RandomState>,
    capacity: usize,
    ttl_ms: Millis,
    inserts: AtomicUsize,
}

fn secs(ms: Millis) -> u32 {
    (ms.max(0) / 1000).min(u32::MAX as Millis) as u32
}

impl Dedupe {
    pub fn new(capacity: usize, ttl_ms: Millis) -> Self {
        Dedupe {
            seen: DashMap::default(),
            capacity: capacity.max(1),
            ttl_ms,
            inserts: AtomicUsize::new(0),
        }
    }

    /// Record `id` as seen at `now`; false if it was seen before (and not
    /// yet forgotten).
    pub fn first_time(&self, id: &str, now: Millis) -> bool {
        self.first_time_digest(digest(id), now)
    }

    /// [`Dedupe::first_time`] for an id already digested.
    pub fn first_time_digest(&self, d: Digest, now: Millis) -> bool {
        use dashmap::mapref::entry::Entry;
        let at = secs(now);
        let ttl = secs(self.ttl_ms);
        match self.seen.entry(d) {
            Entry::Occupied(mut e) => {
                if at.saturating_sub(*e.get()) <= ttl {
                    return false;
                }
                e.insert(at);
            }
            Entry::Vacant(e) => {
                e.insert(at);
            }
        }
        // Forget expired ids now and then (amortised: one scan per tenth
        // of the capacity), and the oldest whenever the map is full.
        let n = self.inserts.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of((self.capacity / 10).max(1)) || self.seen.len() > self.capacity {
            self.forget_old(at);
        }
        true
    }

    fn forget_old(&self, now: u32) {
        let ttl = secs(self.ttl_ms);
        self.seen.retain(|_, at| now.saturating_sub(*at) <= ttl);
        // Still full: drop the oldest tenth or more, by age.
        let mut keep_within = ttl;
        while self.seen.len() > self.capacity - self.capacity / 10 && keep_within > 0 {
            keep_within = keep_within * 9 / 10;
            self.seen
                .retain(|_, at| now.saturating_sub(*at) <= keep_within);
        }
        // All seen within the same second: drop any, not one by one later.
        let target = self.capacity - self.capacity / 10;
        let mut excess = self.seen.len().saturating_sub(target);
        if excess > 0 {
            self.seen.retain(|_, _| {
                excess = excess.saturating_sub(1);
                excess == 0
            });
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Every remembered digest with the time (ms) it was seen.
    pub fn entries(&self) -> Vec<(Digest, Millis)> {
        self.seen
            .iter()
            .map(|e| (*e.key(), Millis::from(*e.value()) * 1000))
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
