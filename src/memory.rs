//! Memory follows live work, not the last spike (issue #9): after a load,
//! the tables that grew with the work in flight shrink again, and the
//! allocator's free pages go back to the system.
//!
//! mimalloc (the binary's allocator) keeps free pages per thread; a thread
//! that goes quiet after a spike returns them only when it allocates again
//! or collects. So every thread of the router collects when the router has
//! been idle (no request) for 1, 2, 4, 8, 16 seconds and every 16 s after
//! (when it does anything at all): the runtime's workers
//! when they park, the HTTP workers on a timer, the writer threads when
//! they wait.

use std::cell::Cell;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::domain::{Millis, now_ms};

/// When a request last came (unix ms).
static LAST_BUSY: AtomicI64 = AtomicI64::new(0);

/// A request arrived (webhook or API): the router is busy.
pub fn busy() {
    let now = now_ms();
    // Written at most once a millisecond by any thread: no cache line
    // bouncing between the workers under load.
    if LAST_BUSY.load(Ordering::Relaxed) < now {
        LAST_BUSY.store(now, Ordering::Relaxed);
    }
}

/// Give this thread's free pages back to the system while the router is
/// idle (no request): after 1, 2, 4, 8, 16 seconds of a quiet spell and
/// every 16 s after, on each thread (see the module documentation). Not
/// once only: what a load leaves behind is freed late too — the Graph
/// client drops its pooled connections when the pool's idle timeout (30 s)
/// ends them, and a thread that freed them and parked keeps their pages
/// until it collects. Cheap when it is not time.
/// Never under load: a forced collection also decommits the free pages the
/// load would fault in again.
pub fn collect_if_due() {
    // This thread's quiet spell (when its last request came) and how long
    // into it the next collection is due.
    thread_local!(static DUE: Cell<(Millis, Millis)> = const { Cell::new((Millis::MIN, 0)) });
    let busy = LAST_BUSY.load(Ordering::Relaxed);
    let quiet_for = now_ms().saturating_sub(busy);
    let (spell, due) = DUE.get();
    let due = if spell == busy { due } else { FIRST_COLLECT_MS };
    if quiet_for < due {
        DUE.set((busy, due));
        return;
    }
    DUE.set((busy, quiet_for + quiet_for.min(MAX_COLLECT_GAP_MS)));
    // SAFETY: mi_collect only frees this thread's unused pages; it is
    // harmless (and does nothing) where mimalloc is not the allocator.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// How long the router is idle before threads first collect (ms).
const FIRST_COLLECT_MS: Millis = 1000;
/// The longest gap between two collections of a quiet spell (ms).
const MAX_COLLECT_GAP_MS: Millis = 16_000;

/// Give the C allocator's free memory back to the system: SQLite (the
/// archive) allocates through it, not through mimalloc, and its page
/// caches (up to 32 MiB) stay with glibc's heap after they are released.
pub fn trim_system_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of glibc's heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Run [`collect_if_due`] on this thread every second, for as long as its
/// runtime runs (the HTTP workers: each is a thread with a runtime of its
/// own).
pub fn collect_on_this_thread() {
    actix_web::rt::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            collect_if_due();
        }
    });
}

/// Shrink `map` when a quarter or less of what it holds room for is used
/// (it grew with a spike that has passed). Returns whether it shrank.
pub fn shrink_if_sparse<K, V, S>(map: &DashMap<K, V, S>) -> bool
where
    K: Eq + Hash,
    S: BuildHasher + Clone,
{
    let capacity = map.capacity();
    if capacity > 4096 && map.len() * 4 <= capacity {
        map.shrink_to_fit();
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_shrinks_after_a_spike_and_keeps_what_it_holds() {
        let map: DashMap<u64, [u8; 64]> = DashMap::new();
        for i in 0..100_000 {
            map.insert(i, [1; 64]);
        }
        assert!(!shrink_if_sparse(&map), "full: left alone");
        let grown = map.capacity();
        map.retain(|k, _| *k < 1_000);
        assert!(shrink_if_sparse(&map));
        assert!(map.capacity() * 10 < grown, "{} of {grown}", map.capacity());
        assert_eq!(map.len(), 1_000);
        assert!((0..1_000).all(|k| map.get(&k).is_some_and(|v| v[0] == 1)));
        assert!(!shrink_if_sparse(&map), "small: left alone");
    }

    #[test]
    fn collecting_is_harmless_any_time() {
        busy();
        collect_if_due();
        collect_if_due();
        trim_system_heap();
    }
}
