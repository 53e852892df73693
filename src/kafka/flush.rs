//! The producers' end at a shutdown: the final flush, the acks that still come in the last
//! second after it, and what was left undelivered or failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer as _, PurgeConfig};

use super::{Producer, Producers, ffi};
use crate::lock;

/// What a shutdown left of the records whose clients had a `2xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Records given up at the flush's deadline, or still in flight after the last second,
    /// whose clients had a `2xx` (those the spool keeps, and those a requester still waits
    /// for, aside): neither delivered nor counted failed.
    pub undelivered: usize,
    /// Of those, the records sent with no answer (still in flight, or sent before and given up
    /// while queued for another try): a broker may have written them, or may yet.
    pub maybe_written: usize,
    /// Records reported failed since the shutdown began (refused, past their message timeout
    /// with the brokers away, or purged from a producer a fatal error stopped; during the
    /// drain or the flush): accepted, and lost.
    pub failed: u64,
}

impl Producers {
    /// For shutdown: closes the producers to new records (later sends get `Closed`), then waits
    /// until every queued record is delivered or failed, or `deadline` passes; what is still
    /// queued then is purged (given up: counted undelivered, not failed), and what is in
    /// flight keeps its last chance ([`Producers::outcome`]).
    pub async fn flush(&self, deadline: Duration) {
        // Nothing may be queued behind the flush's back: after it, dropping a producer purges.
        self.gate.close().await;
        // A replacement under way ends first (none starts with the gate closed).
        let _replaced = self.replacing.lock().await;
        // Failures from here on count against the shutdown (unless `note_stop` came first).
        self.note_stop();
        let producers = self.everyone();
        let flushes: Vec<_> = producers
            .iter()
            .map(|p| {
                let p = p.clone();
                tokio::task::spawn_blocking(move || flush_one(&p, deadline))
            })
            .collect();
        for f in flushes {
            let _ = f.await;
        }
        // What the deadline left unsent is given up now, not when the producers are dropped
        // after the last answers: a sync request waiting for such a record gets its `503`
        // while it can still write it. Records in flight keep their last second: an ack may
        // still come (a `200`), and a purge would make it a `504`. Not blocking: a broker
        // thread stuck in a connect would hold the purge, and the exit, with it.
        self.gate.give_up();
        for p in &producers {
            p.inner.purge(PurgeConfig::default().queue().non_blocking());
        }
        let_go(producers);
    }

    /// After [`Producers::flush`]: waits at most `wait` for the records still in flight (an
    /// ack that comes makes one delivered after all) and for the reports of those the flush
    /// gave up (a sync record whose requester already had its `504` is counted by its report),
    /// then counts what the shutdown left.
    pub async fn outcome(&self, wait: Duration) -> Flushed {
        let producers = self.everyone();
        let handed = || producers.iter().map(|p| p.uncovered()).sum::<usize>();
        let held = || producers.iter().map(|p| p.queued()).sum::<usize>();
        let until = Instant::now() + wait;
        while held() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // librdkafka#4103: flush's return code is not trusted. Nor is its queue length, which
        // counts waiting events (statistics, errors) as well: the records still holding room,
        // handed over and not yet reported, decide, with those given up and those kept from a
        // fenced producer that no replacement sent. Those the spool also holds are not lost
        // (they are sent again at the next start), nor those a requester still waits for: it
        // is never answered `2xx` without them (`503` once given up; no answer if in flight
        // at the exit).
        // In this order: a report counts its record before it stops counting it as handed
        // over, so one reported between two reads is counted twice, never missed.
        let in_flight = handed();
        let kept: usize = self.slots().map(|slot| slot.shared.rescue.len()).sum();
        let (given_up, given_up_maybe_written) = self.gate.records_given_up();
        let failed_before = self.lost_at_stop.get().copied().unwrap_or_default();
        let_go(producers);
        Flushed {
            undelivered: in_flight + kept + given_up,
            maybe_written: in_flight + given_up_maybe_written,
            failed: self.lost().saturating_sub(failed_before),
        }
    }

    /// The current producer of every slot, and those replaced that still hold records.
    fn everyone(&self) -> Vec<Arc<Producer>> {
        let mut producers = self.all();
        // A producer replaced since `all` read the slots is in both.
        for old in lock(&self.retiring).iter() {
            if !producers.iter().any(|p| Arc::ptr_eq(p, old)) {
                producers.push(old.clone());
            }
        }
        producers
    }
}

/// Flushes `p` for at most `deadline`. A producer stopped by a fatal error sends nothing more:
/// what comes back to its queue from its failed requests would wait there for the whole
/// deadline, then count as undelivered. It is purged as it comes (reported at once: failed,
/// never sent or maybe written), in steps, as a retiring producer's is.
fn flush_one(p: &Producer, deadline: Duration) {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if !p.stopped() {
            ffi::flush(&p.inner, left);
            return;
        }
        p.inner.purge(PurgeConfig::default().queue().non_blocking());
        if left.is_zero() || p.in_flight() == 0 {
            return;
        }
        ffi::flush(&p.inner, left.min(STEP));
    }
}

/// How often a stopped producer's queue is purged during the flush.
const STEP: Duration = Duration::from_millis(100);

/// Drops `producers` off the async workers: a replaced producer drained during the shutdown
/// has left the list, and the last reference to it may be here. Dropping that one destroys
/// its librdkafka client, which joins its threads.
fn let_go(producers: Vec<Arc<Producer>>) {
    tokio::task::spawn_blocking(move || drop(producers));
}
