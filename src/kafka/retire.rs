//! Producers that hit a fatal error: replaced, and the old ones drained before they go.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer, PurgeConfig};

use super::{Producers, ffi};
use crate::lock;

/// How long a replaced producer's flush waits for requests that still hold the producer to
/// let go of it: longer than a request holds it (`server.enqueue_timeout`, 100 ms by default).
const LAST_HOLDER_WAIT: Duration = Duration::from_secs(5);

/// The first wait before a producer that failed again soon after its replacement is replaced
/// once more, and the longest.
const FIRST_WAIT: Duration = Duration::from_secs(1);
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// A replacement this long after the one before starts over with no wait.
const STABLE: Duration = Duration::from_secs(60);

/// When a slot may replace its producer again: at once the first time, then after a wait that
/// doubles (1 s to 30 s) while its producers keep failing within a minute of each other. A
/// cause that lasts (brokers that refuse idempotent writes) would otherwise have a new client
/// connect and ask for a producer id every 100 ms, each logging a replacement.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    last: Option<Instant>,
    wait: Duration,
}

impl Backoff {
    /// Whether a replacement may happen at `now`; if so, it is counted.
    fn take(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now.duration_since(last) < STABLE => {
                if now < last + self.wait {
                    return false;
                }
                self.wait = (self.wait * 2).min(LONGEST_WAIT);
            }
            _ => self.wait = FIRST_WAIT,
        }
        self.last = Some(now);
        true
    }
}

impl Producers {
    /// Replaces every producer that hit a fatal error or that the brokers fenced. After a fatal
    /// error librdkafka has already purged its queue (those records were answered 503); what
    /// the producer had in flight is flushed before it goes. Not during a shutdown, whose
    /// flush takes what the producers hold.
    ///
    /// Blocks: for a blocking thread of the runtime.
    pub fn replace_failed(&self) {
        let _replacing = self.replacing.blocking_lock();
        if self.gate.is_closed() {
            return;
        }
        for (index, slot) in self.slots().enumerate() {
            let current = slot.current();
            if !current.is_fatal() {
                // Kept from a fenced producer that was replaced before all its refusals came
                // back (it was stopped too).
                slot.resend_kept(&current);
                continue;
            }
            // A fenced producer still sends what it holds (Kafka takes the epoch librdkafka
            // raised; tansu refuses it at once): replaced once that is done, so that its
            // records and its replacement's do not interleave in a partition, nor their queues
            // add up. Meanwhile it takes no new records.
            if !current.stopped() && current.queued() > 0 {
                continue;
            }
            if !lock(&slot.backoff).take(Instant::now()) {
                // Until its replacement, as after it: records that come back from a stopped
                // producer's failed requests are answered at once, not after the message
                // timeout.
                // Not blocking: a broker thread stuck in a connect (a DNS lookup) would hold
                // the purge, and this slot's lock, which a shutdown's flush waits for.
                if current.stopped() {
                    current
                        .inner
                        .purge(PurgeConfig::default().queue().non_blocking());
                }
                continue;
            }
            match slot.replace(&self.retiring) {
                Ok(old) => {
                    tracing::warn!(producer = %slot.name, "producer replaced");
                    old.retire();
                    if index == 0 {
                        self.topics.set_client(slot.current().inner.clone());
                    }
                    let (retiring, gate) = (self.retiring.clone(), self.gate.clone());
                    tokio::task::spawn_blocking(move || {
                        // In short steps: once a shutdown closes the gate, its own flush (under
                        // its deadline) takes this producer over, and the process must not
                        // wait out the message timeout here.
                        // Until it is drained: librdkafka reports every record by the message
                        // timeout, and a producer that left the list here with records still
                        // held would stay for the life of the process.
                        while old.queued() > 0 && !gate.is_closed() {
                            // A stopped producer sends nothing more: records that come back
                            // from its requests in flight (to be retried after those failed)
                            // would wait out the message timeout in its queue. Purged, they
                            // are reported at once, with what librdkafka knows of them kept
                            // (never sent: 503; maybe written: 504).
                            if old.stopped() {
                                old.inner
                                    .purge(PurgeConfig::default().queue().non_blocking());
                            }
                            ffi::flush(&old.inner, Duration::from_millis(100));
                        }
                        // Only a drained producer leaves the list (a fatal one takes no new
                        // records). One that still holds records stays for a shutdown's flush,
                        // which reads the list once the gate is closed, and is never dropped
                        // here with records in flight: dropping purges them, uncounted.
                        {
                            let mut list = lock(&retiring);
                            if old.queued() > 0 {
                                return;
                            }
                            list.retain(|p| !Arc::ptr_eq(p, &old));
                        }
                        // A request that took this producer just before the swap may still
                        // hold it. The last reference is best dropped here: librdkafka's
                        // destroy joins its threads, which would stall an async worker.
                        // (A shutdown's flush holds it too, and lets it go itself.)
                        let until = Instant::now() + LAST_HOLDER_WAIT;
                        while Arc::strong_count(&old) > 1
                            && Instant::now() < until
                            && !gate.is_closed()
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    });
                }
                Err(error) => {
                    tracing::error!(producer = %slot.name, %error, "cannot replace producer")
                }
            }
        }
    }

    /// Checks for fatal producer errors every `period` for as long as the producers live.
    pub fn spawn_supervisor(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(producers) = weak.upgrade() else {
                    return;
                };
                // Building a producer reads files and starts threads: off the async workers.
                let pending = producers.slots().any(|slot| !slot.shared.rescue.is_empty());
                if pending || producers.all().iter().any(|p| p.is_fatal()) {
                    let _ = tokio::task::spawn_blocking(move || producers.replace_failed()).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacements_that_keep_failing_wait_longer_each_time_and_start_over_once_stable() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = Backoff::default();
        assert!(b.take(at(0)), "the first replacement is at once");
        assert!(!b.take(at(200)), "the next waits 1 s");
        assert!(b.take(at(1000)));
        assert!(!b.take(at(2900)), "then 2 s");
        assert!(b.take(at(3000)));
        assert!(!b.take(at(6900)));
        assert!(b.take(at(7000)));
        let mut now = 7000;
        for _ in 0..10 {
            now += 30_000;
            assert!(b.take(at(now)), "never more than 30 s");
        }
        assert!(!b.take(at(now + 29_000)));
        // A producer that lasted a minute: its replacement is at once, the next after 1 s.
        now += 90_000;
        assert!(b.take(at(now)));
        assert!(!b.take(at(now + 999)));
        assert!(b.take(at(now + 1000)));
    }
}
