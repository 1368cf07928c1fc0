//! Memory follows live work, not the last spike (issue #9): after a load,
//! the tables that grew with the work in flight shrink again, and the
//! allocator's free pages go back to the system.
//!
//! jemalloc (the binary's allocator) keeps freed blocks in a cache per
//! thread, which a thread that goes quiet after a spike never empties, and
//! gives free pages back to the system from its background thread only
//! as they age (10 s). So every thread of the router empties its cache and
//! has the free pages returned when the router has been idle (no request)
//! for 1, 2, 4, 8, 16 seconds and every 16 s after: the runtime's workers
//! when they park (a task wakes each of them at every step), the HTTP
//! workers on a timer, the writer threads when they wait.

use std::cell::Cell;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
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
    thread_local!(static DUE: Cell<QuietSteps> = const { Cell::new(QuietSteps::new()) });
    let mut steps = DUE.get();
    let due = steps.due();
    DUE.set(steps);
    if due {
        give_back();
    }
}

/// Empty this thread's cache of freed blocks into jemalloc's arenas and
/// return every arena's unused pages to the system (`mallctl`, jemalloc's
/// documented control interface). Harmless where jemalloc is not the
/// allocator (the tests): it starts up empty and has nothing to return.
/// Every thread purges every arena at its step: after the first, a purge
/// finds little left, and a thread's flush may leave pages in arenas of
/// threads that collected before it (idle time only).
fn give_back() {
    /// `MALLCTL_ARENAS_ALL` (4096): every arena.
    const CONTROLS: [&std::ffi::CStr; 2] = [c"thread.tcache.flush", c"arena.4096.purge"];
    for name in CONTROLS {
        // SAFETY: both controls take and return nothing (null pointers,
        // zero length); a failure only leaves the memory where it was.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
    }
}

/// When, in a quiet spell, the next collection is due: after 1, 2, 4, 8,
/// 16 s of quiet, then every 16 s.
#[derive(Clone, Copy)]
struct QuietSteps {
    /// The spell (when its last request came).
    spell: Millis,
    /// How long into it the next step is due.
    due: Millis,
}

impl QuietSteps {
    const fn new() -> Self {
        QuietSteps {
            spell: Millis::MIN,
            due: 0,
        }
    }

    /// Whether a step is due now (and if so, the next one is set).
    fn due(&mut self) -> bool {
        self.due_at(LAST_BUSY.load(Ordering::Relaxed), now_ms())
    }

    /// [`QuietSteps::due`] with the last request at `busy`, at `now`.
    fn due_at(&mut self, busy: Millis, now: Millis) -> bool {
        if self.spell != busy {
            *self = QuietSteps {
                spell: busy,
                due: FIRST_COLLECT_MS,
            };
        }
        let quiet_for = now.saturating_sub(busy);
        if quiet_for < self.due {
            return false;
        }
        self.due = quiet_for + quiet_for.min(MAX_COLLECT_GAP_MS);
        true
    }
}

/// Wake every worker of the current (multi-thread) runtime at each step
/// of a quiet spell, so that each parks again and collects. A worker that
/// sleeps through the spell never would: what it freed last (the blocks
/// of a load's last records and connections) stays in its cache (with
/// mimalloc, the allocator before, 10 MB of 58 in a benchmark). One task per
/// worker, each waiting (at most 10 ms, idle time only) until all have
/// started: a worker busy with one cannot take another, so a sleeping
/// worker is woken to take its own.
pub fn wake_workers_when_quiet() {
    tokio::spawn(async {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let mut steps = QuietSteps::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if workers < 2 || !steps.due() {
                continue;
            }
            let started = std::sync::Arc::new(AtomicUsize::new(0));
            for _ in 0..workers {
                let started = started.clone();
                tokio::spawn(async move {
                    started.fetch_add(1, Ordering::AcqRel);
                    let until = std::time::Instant::now() + Duration::from_millis(10);
                    while started.load(Ordering::Acquire) < workers
                        && std::time::Instant::now() < until
                    {
                        std::thread::yield_now();
                    }
                });
            }
        }
    });
}

/// How long the router is idle before threads first collect (ms).
const FIRST_COLLECT_MS: Millis = 1000;
/// The longest gap between two collections of a quiet spell (ms).
const MAX_COLLECT_GAP_MS: Millis = 16_000;

/// Give the C allocator's free memory back to the system: SQLite (the
/// archive) allocates through it, not through jemalloc, and its page
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
    fn collections_come_at_growing_steps_of_a_quiet_spell() {
        let mut steps = QuietSteps::new();
        let busy = 1_000_000;
        // Polled every 100 ms through 100 s of quiet: the seconds at which
        // a collection is due.
        let due: Vec<Millis> = (1..=1000)
            .map(|i| i * 100)
            .filter(|quiet| steps.due_at(busy, busy + quiet))
            .collect();
        assert_eq!(
            due,
            [
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 48_000, 64_000, 80_000, 96_000
            ]
        );
        // A request starts a new spell: the steps start over, and none is
        // due within a second of a request (under load: never).
        assert!(!steps.due_at(busy + 200_000, busy + 200_500));
        assert!(steps.due_at(busy + 200_000, busy + 201_000));
    }

    #[test]
    fn collecting_is_harmless_any_time() {
        busy();
        collect_if_due();
        collect_if_due();
        trim_system_heap();
    }
}
