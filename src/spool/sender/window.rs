//! The window of records in flight: handing what is due to the producer in order, retries
//! with backoff, delivery reports, and popping the acknowledged prefix.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use tokio::time::Instant;

use super::dead_letter::{refusal_of_delivery, refusal_of_send};
use super::{Event, Sender, State};
use crate::kafka::delivery::Outcome;
use crate::kafka::{Record, Report, SendError};
use crate::spool::ID_HEADER;
use crate::spool::segment::Entry;
use crate::throttle::{Level, Throttle};

/// How long one send waits for room in the producer's queue before it counts as a retriable
/// failure.
const SEND_WAIT: Duration = Duration::from_millis(100);

impl Sender {
    /// When the first record waiting for a retry is due, if one waits.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        // Closed producers take nothing: a retry due would wake the sender in a busy loop.
        if self.unsent == 0 || self.closed {
            return None;
        }
        self.window.iter().find_map(|f| match f.state {
            State::Retry(at) => Some(at),
            State::Unsent => Some(Instant::now()),
            _ => None,
        })
    }

    pub(super) fn set_state(&mut self, i: usize, state: State) {
        let f = &mut self.window[i];
        let was = matches!(f.state, State::Unsent | State::Retry(_));
        let is = matches!(state, State::Unsent | State::Retry(_));
        f.state = state;
        match (was, is) {
            (true, false) => self.unsent -= 1,
            (false, true) => self.unsent += 1,
            _ => {}
        }
    }

    /// Hands every record that is due to the producer, in order; stops at the first one that
    /// must wait (so nothing overtakes a record waiting for its retry).
    pub(super) async fn send_due(&mut self) {
        if self.unsent == 0 || self.closed {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.window.len() && self.unsent > 0 {
            match self.window[i].state {
                State::Unsent => {}
                State::Retry(at) if at <= now => {}
                State::Retry(_) => return,
                State::Sent | State::Done => {
                    i += 1;
                    continue;
                }
            }
            let flight = &mut self.window[i];
            flight.attempts += 1;
            flight.sent = Instant::now();
            let seq = flight.seq;
            let record = to_record(&flight.entry);
            let topic = flight.entry.topic.clone();
            let producer = (self.producer_for)(&topic);
            match producer
                .send(&topic, vec![record], Report::Spool, SEND_WAIT)
                .await
            {
                Ok(mut receivers) => {
                    self.set_state(i, State::Sent);
                    let events = self.events_tx.clone();
                    match receivers.pop() {
                        Some(rx) => {
                            tokio::spawn(async move {
                                let outcome = rx.await;
                                let _ = events.send(Event { seq, outcome });
                            });
                        }
                        None => self.retry(i, "no delivery report receiver"),
                    }
                }
                Err(error) => match refusal_of_send(&error) {
                    Some(refusal) if !self.waits(i, &refusal) => {
                        // Not written to the dead-letter file: it goes back to Kafka later,
                        // and holds back the records behind it as any retry does.
                        if !self.dead_letter(i, refusal).await {
                            return;
                        }
                    }
                    Some(refusal) => {
                        let why = self.missing_why(&refusal);
                        self.retry(i, &why);
                        return;
                    }
                    None => {
                        self.closed |= matches!(error, SendError::Closed);
                        let why = format!("{error:?}");
                        self.retry(i, &why);
                        return;
                    }
                },
            }
            i += 1;
        }
    }

    /// Counts what finally became of record `i` in the producers' delivered and failed counts,
    /// as for a record that never went through the spool; not for a record replayed from an
    /// earlier run, which this process never counted as accepted.
    pub(super) fn count_outcome(&self, i: usize, failed: Option<&str>) {
        let entry = &self.window[i].entry;
        if entry.origin == self.inner.origin {
            (self.producer_for)(&entry.topic).count_spooled(&entry.topic, failed);
        }
    }

    /// Schedules record `i` to be sent again after its backoff.
    pub(super) fn retry(&mut self, i: usize, why: &str) {
        let c = &self.inner.config;
        let f = &self.window[i];
        let exp = f.attempts.saturating_sub(1).min(16);
        let backoff = c
            .retry_backoff
            .saturating_mul(1u32 << exp)
            .min(c.retry_backoff_max);
        // A line every 10 s at most: a spool that keeps retrying (brokers away, or refusing
        // its producer) shows why in the log, not only in its gauges.
        static RETRIES: LazyLock<Throttle> = LazyLock::new(|| {
            let what = "spool: sends failing; retrying";
            Throttle::new(Duration::from_secs(10), Level::Warn, what, None)
        });
        if let Some(suppressed) = RETRIES.pass() {
            let topic = &f.entry.topic;
            tracing::warn!(%topic, why, suppressed, "spool: sends failing; retrying");
        }
        tracing::debug!(
            id = %f.entry.id(),
            topic = %f.entry.topic,
            attempts = f.attempts,
            ?backoff,
            why,
            "spool: send failed; will retry"
        );
        self.inner.retried.fetch_add(1, Ordering::Relaxed);
        self.set_state(i, State::Retry(Instant::now() + backoff));
    }

    /// Applies a delivery report.
    pub(super) async fn apply(&mut self, event: Event) {
        let Ok(i) = self.window.binary_search_by_key(&event.seq, |f| f.seq) else {
            return;
        };
        if self.window[i].state != State::Sent {
            return;
        }
        match event.outcome {
            Ok(Outcome::Delivered { .. }) => {
                self.found(i);
                self.inner.delivered.fetch_add(1, Ordering::Relaxed);
                self.count_outcome(i, None);
                self.set_state(i, State::Done);
            }
            Ok(Outcome::Failed { error, persisted }) => {
                match refusal_of_delivery(error, persisted) {
                    Some(refusal) if !self.waits(i, &refusal) => {
                        self.dead_letter(i, refusal).await;
                    }
                    Some(refusal) => {
                        let why = self.missing_why(&refusal);
                        self.retry(i, &why);
                    }
                    None => self.retry(i, &format!("{error} ({persisted:?})")),
                }
            }
            Err(_) => self.retry(i, "delivery report lost"),
        }
    }

    /// Pops the acknowledged prefix of the window.
    pub(super) fn pop_done(&mut self) {
        let mut popped = 0u64;
        while self.window.front().is_some_and(|f| f.state == State::Done) {
            if let Some(f) = self.window.pop_front() {
                self.acked = f.seq + 1;
                self.window_bytes -= f.framed;
                popped += 1;
            }
        }
        if popped == 0 {
            return;
        }
        let before = self
            .inner
            .records
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(popped))
            })
            .unwrap_or(0);
        let left = before.saturating_sub(popped);
        match self.window.front() {
            Some(f) => self
                .inner
                .oldest_ms
                .store(f.entry.appended_ms, Ordering::Release),
            None if left == 0 => self.inner.oldest_ms.store(0, Ordering::Release),
            None => {}
        }
    }
}

/// The producer record for a spooled entry: its headers (less any `kafboy-id`) and the stable
/// id.
fn to_record(entry: &Entry) -> Record {
    let mut headers = OwnedHeaders::new_with_capacity(entry.headers.len() + 1);
    for (name, value) in &entry.headers {
        if name == ID_HEADER {
            continue;
        }
        headers = headers.insert(Header {
            key: name,
            value: value.as_deref(),
        });
    }
    let id = entry.id();
    headers = headers.insert(Header {
        key: ID_HEADER,
        value: Some(id.as_bytes()),
    });
    Record {
        key: entry.key.clone(),
        partition: entry.partition,
        headers: Some(std::sync::Arc::new(headers)),
        value: entry.value.clone(),
        first: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_id_header_takes_what_ingest_allows_for_it() {
        let entry = Entry {
            seq: u64::MAX,
            origin: 7,
            appended_ms: 0,
            topic: "t".into(),
            key: Some(Bytes::from_static(b"k")),
            partition: None,
            headers: vec![("a".into(), Some(Bytes::from_static(b"b")))],
            value: Bytes::from_static(b"{}"),
        };
        let mut without = to_record(&entry);
        let with = without.wire_size();
        without.headers = Some(std::sync::Arc::new(OwnedHeaders::new().insert(Header {
            key: "a",
            value: Some(&b"b"[..]),
        })));
        assert_eq!(
            with - without.wire_size(),
            crate::spool::ID_HEADER_WIRE_BYTES
        );
    }

    #[test]
    fn the_id_header_replaces_a_client_one() {
        let entry = Entry {
            seq: 1,
            origin: 2,
            appended_ms: 0,
            topic: "t".into(),
            key: None,
            partition: None,
            headers: vec![
                (ID_HEADER.into(), Some(Bytes::from_static(b"forged"))),
                ("a".into(), None),
            ],
            value: Bytes::new(),
        };
        use rdkafka::message::Headers as _;
        let record = to_record(&entry);
        let headers = record.headers.unwrap();
        let all: Vec<(String, Option<Vec<u8>>)> = headers
            .iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            all,
            [
                ("a".to_string(), None),
                (ID_HEADER.to_string(), Some(entry.id().into_bytes()))
            ]
        );
    }
}
