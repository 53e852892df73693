//! The byte budget that bodies being read share.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::IngestError;

/// A count of bytes shared by every request, with a ceiling. An atomic counter, not a
/// semaphore: handing permits back to a tokio semaphore takes its waiters' lock, on every
/// request, and nothing here ever waits.
#[derive(Debug)]
pub struct Budget {
    pub(super) used: AtomicUsize,
    max: usize,
}

/// Bytes held of a [`Budget`], given back when dropped.
pub struct Held<'a> {
    pub(super) budget: &'a Budget,
    pub(super) bytes: usize,
}

impl Budget {
    /// Up to `max` bytes.
    pub fn new(max: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Holds `bytes` until the answer is dropped; `None` when the budget has no room for them.
    pub fn hold(&self, bytes: usize) -> Option<Held<'_>> {
        let mut held = Held {
            budget: self,
            bytes: 0,
        };
        held.cover(bytes).ok()?;
        Some(held)
    }
}

impl Held<'_> {
    /// Holds at least `bytes` in all; 503 when the budget is spent.
    pub(super) fn cover(&mut self, bytes: usize) -> Result<(), IngestError> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|&m| m > 0) else {
            return Ok(());
        };
        let before = self.budget.used.fetch_add(more, Ordering::Relaxed);
        if before.saturating_add(more) > self.budget.max {
            self.budget.used.fetch_sub(more, Ordering::Relaxed);
            return Err(IngestError::Unavailable(
                "too many request bodies in flight".into(),
            ));
        }
        self.bytes += more;
        Ok(())
    }

    /// Holds no more than `bytes` from now on.
    pub(super) fn give_back_to(&mut self, bytes: usize) {
        if let Some(extra) = self.bytes.checked_sub(bytes).filter(|&e| e > 0) {
            self.budget.used.fetch_sub(extra, Ordering::Relaxed);
            self.bytes = bytes;
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Most holds a body returns hold nothing (it came as it is): no shared write for them.
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}
