//! Offsets librdkafka makes up. A batch the brokers acknowledged without its base offset (one
//! they said they already had: the retry of a request whose answer was lost; or any batch
//! sent with `acks` = none) has its records numbered from that missing base, -1, 0, 1, ...
//! (`rd_kafka_msgq_set_metadata`): only the first says it is unknown, and the others would
//! point at unrelated records.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::lock;

/// Follows the reports of such a batch. They come one after another, in one event, so the
/// records that follow one delivered at -1 on its partition, at 0, 1, ..., up to the end of the
/// event ([`Unnumbered::end_batch`]), are of its batch.
#[derive(Debug, Default)]
pub struct Unnumbered {
    run: Mutex<Option<Run>>,
    /// Whether `run` holds one: a report with an offset outside a run takes no lock.
    running: AtomicBool,
}

#[derive(Debug)]
struct Run {
    topic: String,
    partition: i32,
    next: i64,
}

impl Unnumbered {
    /// The offset of a record delivered at `offset`, or -1 when librdkafka does not know it.
    pub fn offset(&self, topic: &str, partition: i32, offset: i64) -> i64 {
        // Reports come from one thread per producer: the flag is only its own.
        if offset >= 0 && !self.running.load(Ordering::Relaxed) {
            return offset;
        }
        let mut run = lock(&self.run);
        if offset == -1 {
            *run = Some(Run {
                topic: topic.to_string(),
                partition,
                next: 0,
            });
            self.running.store(true, Ordering::Relaxed);
            return -1;
        }
        if let Some(r) = run.as_mut() {
            if r.partition == partition && r.next == offset && r.topic == topic {
                r.next += 1;
                return -1;
            }
            *run = None;
            self.running.store(false, Ordering::Relaxed);
        }
        offset.max(-1)
    }

    /// The reports of one event are done: the next report starts afresh.
    pub fn end_batch(&self) {
        if self.running.load(Ordering::Relaxed) {
            *lock(&self.run) = None;
            self.running.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_numbered_from_a_missing_base_is_unknown_throughout() {
        let u = Unnumbered::default();
        assert_eq!(u.offset("t", 0, 7), 7);
        // A duplicate batch of three: -1, 0, 1.
        assert_eq!(u.offset("t", 0, -1), -1);
        assert_eq!(u.offset("t", 0, 0), -1);
        assert_eq!(u.offset("t", 0, 1), -1);
        // The partition's next real batch.
        assert_eq!(u.offset("t", 0, 10), 10);
        assert_eq!(u.offset("t", 0, 11), 11);
        // A duplicate of one record, then the next batch, in another event: its offset 0 is
        // its own (a broker that lost the duplicate's records may number from there).
        assert_eq!(u.offset("t", 0, -1), -1);
        u.end_batch();
        assert_eq!(u.offset("t", 0, 0), 0);
        // Another partition's or topic's report ends the run.
        assert_eq!(u.offset("t", 0, -1), -1);
        assert_eq!(u.offset("t", 1, 0), 0);
        assert_eq!(u.offset("t", 0, -1), -1);
        assert_eq!(u.offset("u", 0, 0), 0);
        // Records acknowledged by a later request's success carry no offset at all.
        assert_eq!(u.offset("t", 0, -1001), -1);
    }
}
