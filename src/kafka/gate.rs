//! The gate that closes every producer to new records before the final flush of a shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::delivery::Persisted;

/// What closes every producer to new records before the final flush of a shutdown. A send
/// holds a pass while it hands records to librdkafka (no await in between); closing waits for
/// the passes out, so each send either queued its records before the flush looks at the queues
/// or is refused (503, nothing written). Without it, a request still running at the shutdown
/// deadline could queue records after the flush, and dropping the producers would purge them.
#[derive(Debug, Default)]
pub struct Gate {
    closed: AtomicBool,
    passing: AtomicUsize,
    /// The flush's deadline passed: what it left is purged, and counted undelivered.
    given_up: AtomicBool,
    /// Records that failed since then whose clients had a `2xx`: undelivered. Those sent
    /// before, with no answer, may have been written.
    records_given_up: AtomicUsize,
    maybe_written: AtomicUsize,
}

/// Leave to hand records over; see [`Gate`].
pub(super) struct Pass<'a>(&'a Gate);

impl Gate {
    pub(super) fn enter(&self) -> Option<Pass<'_>> {
        // SeqCst on both sides: either this send sees the gate closed, or `close` sees the pass.
        self.passing.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.passing.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Pass(self))
    }

    /// Marks what is left after the flush's deadline as given up: its failures (the purge's
    /// reports) count as undelivered, not failed.
    pub fn give_up(&self) {
        self.given_up.store(true, Ordering::SeqCst);
    }

    /// Whether [`Gate::give_up`] was called.
    pub fn given_up(&self) -> bool {
        self.given_up.load(Ordering::SeqCst)
    }

    /// Counts a record whose client had a `2xx` that failed once the flush gave up.
    pub(super) fn count_given_up(&self, persisted: Persisted) {
        if persisted == Persisted::Possibly {
            self.maybe_written.fetch_add(1, Ordering::SeqCst);
        }
        self.records_given_up.fetch_add(1, Ordering::SeqCst);
    }

    /// Records counted by [`Gate::count_given_up`], and how many of them may have been written.
    pub(super) fn records_given_up(&self) -> (usize, usize) {
        // This order: a record is counted maybe written before it is counted given up.
        let given_up = self.records_given_up.load(Ordering::SeqCst);
        let maybe_written = self.maybe_written.load(Ordering::SeqCst);
        (given_up, maybe_written.min(given_up))
    }

    /// Whether a shutdown closed it.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Refuses every send from now on and waits (briefly: passes are held for a hand-over
    /// only) until the ones under way are done.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        while self.passing.load(Ordering::SeqCst) > 0 {
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.passing.fetch_sub(1, Ordering::SeqCst);
    }
}
