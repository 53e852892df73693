//! Log lines that a flood of requests or records would repeat thousands of times a second: at
//! most one per interval, carrying the count of those left out. The log writes to stdout from
//! the async workers, so an unthrottled line per refused request would slow the server most
//! when it is already overloaded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One kind of log line, written at most once per `every`.
#[derive(Debug)]
pub struct Throttle {
    every_ms: u64,
    /// When the last line was written, in ms since start (0: never).
    last_ms: AtomicU64,
    /// Lines left out since then.
    suppressed: AtomicU64,
}

impl Throttle {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every_ms: every.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when this line may be written, else `None`
    /// (and it is counted as left out).
    pub fn pass(&self) -> Option<u64> {
        let now = crate::metrics::uptime_ms().max(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.every_ms;
        // Of the threads that find it due at once, one writes.
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.pass(), Some(0));
        assert_eq!(t.pass(), None);
        assert_eq!(t.pass(), None);
        // Due again (as if the interval had passed): the two left out are told.
        t.last_ms.store(1, Ordering::Relaxed);
        let t = Throttle { every_ms: 0, ..t };
        assert_eq!(t.pass(), Some(2));
        assert_eq!(t.pass(), Some(0));
    }
}
