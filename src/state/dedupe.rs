//! Bounded memory of inbound message ids already seen (Meta retries for up
//! to 7 days): one inbound message → at most one run of the rules.

use parking_lot::Mutex;
use std::collections::VecDeque;

use dashmap::DashMap;

use crate::domain::Millis;

/// Ids seen within `ttl`, at most `capacity` of them (oldest forgotten first).
pub struct Dedupe {
    seen: DashMap<Box<str>, Millis>,
    order: Mutex<VecDeque<(Box<str>, Millis)>>,
    capacity: usize,
    ttl_ms: Millis,
}

impl Dedupe {
    pub fn new(capacity: usize, ttl_ms: Millis) -> Self {
        Dedupe {
            seen: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            ttl_ms,
        }
    }

    /// Record `id` as seen at `now`; false if it was seen before (and not
    /// yet forgotten).
    pub fn first_time(&self, id: &str, now: Millis) -> bool {
        use dashmap::mapref::entry::Entry;
        match self.seen.entry(id.into()) {
            Entry::Occupied(mut e) => {
                if now - *e.get() <= self.ttl_ms {
                    return false;
                }
                e.insert(now);
            }
            Entry::Vacant(e) => {
                e.insert(now);
            }
        }
        let mut order = self.order.lock();
        order.push_back((id.into(), now));
        while order.len() > self.capacity
            || order.front().is_some_and(|(_, at)| now - at > self.ttl_ms)
        {
            let Some((old, at)) = order.pop_front() else {
                break;
            };
            self.seen.remove_if(&old, |_, seen_at| *seen_at == at);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl Dedupe {
    /// Every remembered id with the time it was seen, oldest first.
    pub fn entries(&self) -> Vec<(String, Millis)> {
        let order = self.order.lock();
        order
            .iter()
            .filter(|(id, at)| self.seen.get(id).is_some_and(|s| *s == *at))
            .map(|(id, at)| (id.to_string(), *at))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_new_once() {
        let d = Dedupe::new(10, 1000);
        assert!(d.first_time("a", 0));
        assert!(!d.first_time("a", 10));
        assert!(d.first_time("b", 10));
    }

    #[test]
    fn memory_is_bounded_by_capacity_and_age() {
        let d = Dedupe::new(3, 1000);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(d.first_time(id, i as Millis));
        }
        assert_eq!(d.len(), 3);
        assert!(d.first_time("a", 5), "the oldest id was forgotten");
        assert!(d.first_time("z", 5000));
        assert_eq!(d.len(), 1, "ids older than the ttl are dropped");
    }
}
