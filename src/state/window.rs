//! The 24-hour customer-service windows (SPEC §4, CLOUD_API.md §11): the
//! rules of one window ([`Window::extend`], [`Window::close`]), read before
//! every send. The router keeps each window in its conversation's entry.
//!
//! Invariant: a window is only ever extended by inbound messages; only
//! Meta's word (131047) closes it early.

use dashmap::DashMap;

use crate::domain::Millis;

/// 24 hours.
pub const WINDOW_MS: Millis = 24 * 3600 * 1000;

/// Conversation key: (account, contact).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConvKey {
    pub account: u16,
    pub contact: Box<str>,
}

impl ConvKey {
    pub fn new(account: u16, contact: &str) -> Self {
        ConvKey {
            account,
            contact: contact.into(),
        }
    }
}

/// The window of one conversation (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub last_inbound: Millis,
    pub expires: Millis,
}

impl Window {
    /// An inbound message at Meta's time `at` on the window `w` (none
    /// yet: `None`): clamp to `now`, extend only. Returns whether this
    /// message opened a window (none was open before it).
    pub fn extend(w: &mut Option<Window>, at: Millis, now: Millis) -> bool {
        let at = at.min(now);
        let expires = at + WINDOW_MS;
        let was_open = w.is_some_and(|w| w.expires > now);
        if w.is_none_or(|w| expires > w.expires) {
            *w = Some(Window {
                last_inbound: at,
                expires,
            });
        }
        !was_open && w.is_some_and(|w| w.expires > now)
    }

    pub fn is_open(&self, now: Millis) -> bool {
        self.expires > now
    }

    /// Meta said the window is closed (131047): believe it.
    pub fn close(&mut self, now: Millis) {
        if self.expires > now {
            self.expires = now;
        }
    }
}

/// Windows by conversation on their own (the router keeps each window in
/// its conversation's entry; this map serves the micro-benchmarks and
/// tests of the window rules).
#[derive(Debug, Default)]
pub struct WindowStore {
    map: DashMap<ConvKey, Window>,
}

impl WindowStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// An inbound message at Meta's time `at`: clamp to `now`, extend only.
    /// Returns whether this message opened a window (none was open before).
    pub fn extend(&self, key: ConvKey, at: Millis, now: Millis) -> bool {
        let mut w = self.map.entry(key).or_insert(Window {
            last_inbound: 0,
            expires: 0,
        });
        let mut window = Some(*w);
        let opened = Window::extend(&mut window, at, now);
        if let Some(new) = window {
            *w = new;
        }
        opened
    }

    pub fn get(&self, key: &ConvKey) -> Option<Window> {
        self.map.get(key).map(|w| *w)
    }

    pub fn is_open(&self, key: &ConvKey, now: Millis) -> bool {
        self.map.get(key).is_some_and(|w| w.is_open(now))
    }

    /// Meta said the window is closed (131047): believe it.
    pub fn close(&self, key: &ConvKey, now: Millis) {
        if let Some(mut w) = self.map.get_mut(key) {
            w.close(now);
        }
    }

    pub fn open_count(&self, now: Millis) -> usize {
        self.map.iter().filter(|w| w.expires > now).count()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl WindowStore {
    pub fn remove(&self, key: &ConvKey) {
        self.map.remove(key);
    }

    /// Put a window back as it was (journal replay).
    pub fn restore(&self, key: ConvKey, window: Window) {
        self.map.insert(key, window);
    }

    /// Every window, for a snapshot.
    pub fn entries(&self) -> Vec<(ConvKey, Window)> {
        self.map
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_extend_and_never_shrink() {
        let s = WindowStore::new();
        let k = ConvKey::new(0, "16315551181");
        let now = 10 * WINDOW_MS;
        assert!(s.extend(k.clone(), now - 1000, now), "first message opens");
        assert!(
            !s.extend(k.clone(), now, now),
            "second message refreshes, does not open"
        );
        assert_eq!(s.get(&k).unwrap().expires, now + WINDOW_MS);
        assert!(
            !s.extend(k.clone(), now - 5000, now),
            "an older retry does not shrink"
        );
        assert_eq!(s.get(&k).unwrap().expires, now + WINDOW_MS);
    }

    #[test]
    fn timestamps_are_clamped_and_stale_ones_open_nothing() {
        let s = WindowStore::new();
        let now = 10 * WINDOW_MS;
        let future = ConvKey::new(0, "1");
        s.extend(future.clone(), now + 7 * WINDOW_MS, now);
        assert_eq!(s.get(&future).unwrap().expires, now + WINDOW_MS);
        let stale = ConvKey::new(0, "2");
        assert!(!s.extend(stale.clone(), now - 2 * WINDOW_MS, now));
        assert!(!s.is_open(&stale, now));
    }

    #[test]
    fn meta_can_close_a_window() {
        let s = WindowStore::new();
        let k = ConvKey::new(1, "3");
        s.extend(k.clone(), 1000, 1000);
        assert!(s.is_open(&k, 2000));
        s.close(&k, 2000);
        assert!(!s.is_open(&k, 2000));
        assert_eq!(s.open_count(2000), 0);
    }
}
