//! The 24-hour customer-service windows (SPEC §4, CLOUD_API.md §11): the
//! rules of one window ([`Window::extend`], [`Window::close`]), read before
//! every send. The router keeps each window in its conversation's entry.
//!
//! Invariant: a window is only ever extended by inbound messages; only
//! Meta's word (131047) closes it early.

use crate::domain::Millis;

/// 24 hours.
pub const WINDOW_MS: Millis = 24 * 3600 * 1000;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_extend_and_never_shrink() {
        let mut w = None;
        let now = 10 * WINDOW_MS;
        assert!(
            Window::extend(&mut w, now - 1000, now),
            "first message opens"
        );
        assert!(
            !Window::extend(&mut w, now, now),
            "second message refreshes, does not open"
        );
        assert_eq!(w.unwrap().expires, now + WINDOW_MS);
        assert!(
            !Window::extend(&mut w, now - 5000, now),
            "an older retry does not shrink"
        );
        assert_eq!(w.unwrap().expires, now + WINDOW_MS);
    }

    #[test]
    fn timestamps_are_clamped_and_stale_ones_open_nothing() {
        let now = 10 * WINDOW_MS;
        let mut future = None;
        Window::extend(&mut future, now + 7 * WINDOW_MS, now);
        assert_eq!(future.unwrap().expires, now + WINDOW_MS);
        let mut stale = None;
        assert!(!Window::extend(&mut stale, now - 2 * WINDOW_MS, now));
        assert!(!stale.is_some_and(|w| w.is_open(now)));
    }

    #[test]
    fn meta_can_close_a_window() {
        let mut w = None;
        Window::extend(&mut w, 1000, 1000);
        let mut w = w.unwrap();
        assert!(w.is_open(2000));
        w.close(2000);
        assert!(!w.is_open(2000));
    }
}
