//! Room in a producer's queue, counted by kafboy itself: a request takes room for all its records
//! at once (so an NDJSON request is queued whole or not at all), waits a bounded time for it, and
//! delivery reports give it back. librdkafka's own limits sit above these, so its QueueFull is
//! not the normal path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

/// Record and byte budgets of one producer queue.
#[derive(Debug)]
pub struct Admission {
    records: Semaphore,
    bytes: Semaphore,
    max_records: usize,
    max_bytes: usize,
    /// Records handed to librdkafka and not yet reported that a shutdown leaving them unreported
    /// would lose: not covered (see [`Admission::hand`]). One count, read in one load. Not the
    /// room taken: a request waiting for room may hold some of it before it is refused at a
    /// closed gate.
    uncovered: AtomicUsize,
}

/// Why room could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The wait ran out; the queue is full.
    Full,
    /// The request alone is bigger than the whole queue.
    TooBig,
}

impl Admission {
    /// A queue of at most `max_records` records and `max_bytes` value, key and header bytes.
    pub fn new(max_records: usize, max_bytes: usize) -> Admission {
        let max_records = max_records.min(Semaphore::MAX_PERMITS);
        let max_bytes = max_bytes.min(Semaphore::MAX_PERMITS);
        Admission {
            records: Semaphore::new(max_records),
            bytes: Semaphore::new(max_bytes),
            max_records,
            max_bytes,
            uncovered: AtomicUsize::new(0),
        }
    }

    /// Takes room for `records` records of `bytes` bytes in all, waiting at most `wait`.
    pub async fn acquire(
        &self,
        records: usize,
        bytes: usize,
        wait: Duration,
    ) -> Result<(), Refused> {
        if records > self.max_records || bytes > self.max_bytes {
            return Err(Refused::TooBig);
        }
        let (Ok(n), Ok(b)) = (u32::try_from(records), u32::try_from(bytes)) else {
            return Err(Refused::TooBig);
        };
        // Fast path without a timer: most requests find room at once.
        if let Ok(permit) = self.records.try_acquire_many(n) {
            if let Ok(bytes_permit) = self.bytes.try_acquire_many(b) {
                permit.forget();
                bytes_permit.forget();
                return Ok(());
            }
            drop(permit);
        }
        let both = async {
            // Closing is never done, so acquiring can only wait, not fail.
            let r = self
                .records
                .acquire_many(n)
                .await
                .map_err(|_| Refused::Full)?;
            let b = self
                .bytes
                .acquire_many(b)
                .await
                .map_err(|_| Refused::Full)?;
            r.forget();
            b.forget();
            Ok(())
        };
        tokio::time::timeout(wait, both)
            .await
            .unwrap_or(Err(Refused::Full))
    }

    /// Gives back room taken by [`Admission::acquire`].
    pub fn release(&self, records: usize, bytes: usize) {
        self.records.add_permits(records);
        self.bytes.add_permits(bytes);
    }

    /// Share of the queue in use, 0 to 1: of the record budget or of the byte budget, whichever
    /// is further along (with large records the bytes run out first).
    pub fn fill(&self) -> f64 {
        let records = self.queued() as f64 / self.max_records.max(1) as f64;
        // Saturating: a librdkafka interceptor that adds headers would give back more than
        // was taken.
        let used_bytes = self
            .max_bytes
            .saturating_sub(self.bytes.available_permits());
        let bytes = used_bytes as f64 / self.max_bytes.max(1) as f64;
        records.max(bytes)
    }

    /// Whether not even one more record fits (no record left, or no byte).
    pub fn full(&self) -> bool {
        self.records.available_permits() == 0 || self.bytes.available_permits() == 0
    }

    /// Records currently holding room.
    pub fn queued(&self) -> usize {
        self.max_records
            .saturating_sub(self.records.available_permits())
    }

    /// Notes `records` more records handed to librdkafka (before the hand-over: a report may
    /// come at once). `covered` ones a shutdown that leaves them unreported does not lose: the
    /// spool keeps them (and sends them again at the next start), or their requester still
    /// waits for the outcome and gets no `2xx` without it.
    pub fn hand(&self, records: usize, covered: bool) {
        if !covered {
            self.uncovered.fetch_add(records, Ordering::Relaxed);
        }
    }

    /// Undoes [`Admission::hand`] for records librdkafka refused, or reported. Release: what
    /// a report counted before (failed, given up) is seen by whoever sees this.
    pub fn unhand(&self, records: usize, covered: bool) {
        if !covered {
            self.uncovered.fetch_sub(records, Ordering::Release);
        }
    }

    /// Records handed over and not yet reported that are not covered: the ones a shutdown
    /// would lose after their clients' `2xx`.
    pub fn uncovered(&self) -> usize {
        self.uncovered.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn full_queue_refuses_after_the_wait_and_reopens_on_release() {
        let a = Admission::new(3, 100);
        let wait = Duration::from_millis(100);
        a.acquire(2, 10, wait).await.unwrap();
        assert_eq!(a.acquire(2, 10, wait).await, Err(Refused::Full));
        a.acquire(1, 10, wait).await.unwrap();
        assert_eq!(a.queued(), 3);
        a.release(2, 10);
        a.acquire(2, 10, wait).await.unwrap();
        assert_eq!(a.acquire(1, 1000, wait).await, Err(Refused::TooBig));
        assert_eq!(a.acquire(4, 1, wait).await, Err(Refused::TooBig));
    }

    #[tokio::test(start_paused = true)]
    async fn fill_counts_whichever_budget_is_further_along() {
        let a = Admission::new(100, 1000);
        a.acquire(1, 990, Duration::ZERO).await.unwrap();
        assert!(a.fill() >= 0.99 && !a.full(), "{}", a.fill());
        a.acquire(1, 10, Duration::ZERO).await.unwrap();
        assert!(a.full());
        a.release(2, 1000);
        a.acquire(50, 1, Duration::ZERO).await.unwrap();
        assert!((a.fill() - 0.5).abs() < 1e-9 && !a.full());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_room_released_during_its_wait() {
        let a = std::sync::Arc::new(Admission::new(1, 100));
        a.acquire(1, 1, Duration::ZERO).await.unwrap();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.acquire(1, 1, Duration::from_secs(1)).await })
        };
        // Halfway through its wait (the clock is paused: no real time passes).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "still waiting for room");
        a.release(1, 1);
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }
}
