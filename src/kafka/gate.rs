//! The gate that closes every producer to new records before the final flush of a shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What closes every producer to new records before the final flush of a shutdown. A send
/// holds a pass while it hands records to librdkafka (no await in between); closing waits for
/// the passes out, so each send either queued its records before the flush looks at the queues
/// or is refused (503, nothing written). Without it, a request still running at the shutdown
/// deadline could queue records after the flush, and dropping the producers would purge them.
#[derive(Debug, Default)]
pub struct Gate {
    closed: AtomicBool,
    passing: AtomicUsize,
    /// The flush's deadline passed: what it left was counted undelivered, and is purged.
    given_up: AtomicBool,
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

    /// Marks what is left after the flush's deadline as given up (counted undelivered):
    /// its purge reports are not failures on top.
    pub fn give_up(&self) {
        self.given_up.store(true, Ordering::SeqCst);
    }

    /// Whether [`Gate::give_up`] was called.
    pub fn given_up(&self) -> bool {
        self.given_up.load(Ordering::SeqCst)
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
