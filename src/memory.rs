//! Memory follows live work, not the last spike (issue #9): after a load,
//! the tables that grew with the work in flight shrink again, and the
//! allocator's free pages go back to the system.
//!
//! mimalloc (the binary's allocator) keeps free pages per thread; a thread
//! that goes quiet after a spike returns them only when it allocates again
//! or collects. So every thread of the router collects now and then: the
//! runtime's workers when they park, the HTTP workers on a timer — once a
//! second when the router has been idle for a second, once every ten
//! seconds while it is busy.

use std::cell::Cell;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// When a request last came, in ms since [`epoch`].
static LAST_BUSY: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// A request arrived (webhook or API): the router is busy.
pub fn busy() {
    let now = now_ms();
    // Written at most once a millisecond by any thread: no cache line
    // bouncing between the workers under load.
    if LAST_BUSY.load(Ordering::Relaxed) < now {
        LAST_BUSY.store(now, Ordering::Relaxed);
    }
}

/// Give this thread's free pages back to the system, if it is time: see
/// the module documentation. Cheap when it is not.
pub fn collect_if_due() {
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    let now = Instant::now();
    let idle = now_ms().saturating_sub(LAST_BUSY.load(Ordering::Relaxed)) >= 1000;
    let every = if idle {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let due = LAST.with(|last| {
        let due = last.get().is_none_or(|t| now.duration_since(t) >= every);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        // SAFETY: mi_collect only frees this thread's unused pages; it is
        // harmless (and does nothing) where mimalloc is not the allocator.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

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
