//! The sender task: reads the spool in order from the checkpoint, hands records to the producer
//! with delivery reports, retries what failed retriably, dead-letters what Kafka refused
//! permanently, advances the checkpoint over the acknowledged prefix and deletes acknowledged
//! segments.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::recover::{remove_if_exists, sync_dir, write_checkpoint};
use super::segment::{Entry, Item, Reader, segment_name};
use super::writer::Durable;
use super::{DEAD_LETTER_FILE, ID_HEADER, Inner, lock, unix_ms};
use crate::kafka::delivery::{Outcome, Persisted};
use crate::kafka::{Producer, Record, SendError};

/// How long one send waits for room in the producer's queue before it counts as a retriable
/// failure.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// Wait after a failed read of a segment before trying again.
const READ_RETRY: Duration = Duration::from_secs(1);

/// The producer for a topic.
pub(super) type ProducerFor = Box<dyn Fn(&str) -> Arc<Producer> + Send + Sync>;

/// Where the sender reads next.
#[derive(Debug)]
pub(super) struct Cursor {
    segment: u64,
    offset: u64,
    /// Records below this seq are acknowledged already and skipped.
    skip_below: u64,
    /// Last seq read in `segment`.
    last_seq: Option<u64>,
}

impl Cursor {
    pub(super) fn new(segment: u64, offset: u64, skip_below: u64) -> Cursor {
        Cursor {
            segment,
            offset,
            skip_below,
            last_seq: None,
        }
    }

    fn caught_up(&self, durable: Durable) -> bool {
        self.segment >= durable.segment && self.offset >= durable.offset
    }
}

/// A segment the cursor has read to its end.
#[derive(Debug, Clone, Copy)]
struct Finished {
    segment: u64,
    last_seq: Option<u64>,
    size: u64,
}

/// Records read in one go.
#[derive(Default)]
struct Batch {
    records: Vec<(u64, Entry)>,
    finished: Vec<Finished>,
}

/// Reads up to `max_records` records or `max_bytes` bytes from `cursor` on, never past
/// `durable`.
fn read_batch(
    inner: &Inner,
    cursor: &mut Cursor,
    durable: Durable,
    max_records: usize,
    max_bytes: u64,
) -> io::Result<Batch> {
    let mut out = Batch::default();
    let mut bytes = 0u64;
    loop {
        let full = |out: &Batch, bytes: u64| out.records.len() >= max_records || bytes >= max_bytes;
        let limit = if cursor.segment == durable.segment {
            durable.offset
        } else {
            lock(&inner.sealed)
                .get(&cursor.segment)
                .copied()
                .unwrap_or(0)
        };
        if cursor.offset < limit {
            if full(&out, bytes) {
                return Ok(out);
            }
            let path = inner.dir.join(segment_name(cursor.segment));
            match File::open(&path) {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(cursor.offset))?;
                    let span = limit - cursor.offset;
                    // No bigger than what is there to read: a fixed 256 KiB buffer was an
                    // mmap and munmap for every few records read.
                    let capacity = span.clamp(4 << 10, 256 << 10) as usize;
                    let mut reader = Reader::new(
                        BufReader::with_capacity(capacity, file.take(span)),
                        cursor.offset,
                    );
                    while !full(&out, bytes) {
                        match reader.read_next()? {
                            Item::Record {
                                offset,
                                framed,
                                entry,
                            } => {
                                cursor.offset = offset + framed;
                                cursor.last_seq = Some(entry.seq);
                                if entry.seq >= cursor.skip_below {
                                    bytes += framed;
                                    out.records.push((framed, entry));
                                }
                            }
                            Item::End => break,
                            Item::Corrupt(c) => {
                                // Validated at open or written by this process: damage since.
                                tracing::error!(
                                    segment = %path.display(),
                                    offset = c.offset,
                                    lost_bytes = limit - c.offset,
                                    reason = %c.reason,
                                    "spool: segment damaged while in use; skipping the rest of it"
                                );
                                cursor.offset = limit;
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::error!(segment = %path.display(), "spool: segment vanished");
                    cursor.offset = limit;
                }
                Err(e) => return Err(e),
            }
            if full(&out, bytes) {
                return Ok(out);
            }
            continue;
        }
        if cursor.segment < durable.segment {
            out.finished.push(Finished {
                segment: cursor.segment,
                last_seq: cursor.last_seq,
                size: limit,
            });
            let next = lock(&inner.sealed)
                .range(cursor.segment + 1..)
                .next()
                .map_or(durable.segment, |(id, _)| *id)
                .min(durable.segment);
            cursor.segment = next;
            cursor.offset = 0;
            cursor.last_seq = None;
            continue;
        }
        return Ok(out);
    }
}

/// The running sender.
pub(super) struct Handle {
    task: JoinHandle<()>,
    stop: watch::Sender<Option<Instant>>,
}

impl Handle {
    /// Lets the sender deliver what is spooled until `deadline`, then write the checkpoint and
    /// stop.
    pub(super) async fn drain(self, deadline: Instant) {
        self.stop.send_replace(Some(deadline));
        let mut task = self.task;
        // The checkpoint after the deadline takes a moment; a stuck disk does not hold shutdown.
        let hard = deadline + Duration::from_secs(5);
        if tokio::time::timeout_at(hard, &mut task).await.is_err() {
            tracing::warn!("spool: sender did not stop in time; aborted");
            task.abort();
        }
    }

    /// Stops the sender at once, without a checkpoint.
    pub(super) fn abort(self) {
        self.task.abort();
    }
}

pub(super) fn spawn(
    inner: Arc<Inner>,
    durable: watch::Receiver<Durable>,
    cursor: Cursor,
    producer_for: ProducerFor,
) -> Handle {
    let (stop, stop_rx) = watch::channel(None);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let acked = inner.checkpoint.load(Ordering::Acquire);
    let sender = Sender {
        inner,
        producer_for,
        durable,
        cursor: Arc::new(Mutex::new(cursor)),
        window: VecDeque::new(),
        window_bytes: 0,
        unsent: 0,
        finished: VecDeque::new(),
        acked,
        written: acked,
        events_tx,
        events_rx,
        stop: stop_rx,
        read_again_at: None,
    };
    Handle {
        task: tokio::spawn(sender.run()),
        stop,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not handed to the producer yet.
    Unsent,
    /// Waiting for its delivery report.
    Sent,
    /// Failed retriably; sent again from then on.
    Retry(Instant),
    /// Delivered or dead-lettered.
    Done,
}

struct Flight {
    seq: u64,
    framed: u64,
    entry: Entry,
    state: State,
    attempts: u32,
}

/// A delivery report, tagged with its record.
struct Event {
    seq: u64,
    outcome: Result<Outcome, oneshot::error::RecvError>,
}

/// Why a record goes to the dead-letter file.
struct Refusal {
    error: String,
    reason: String,
    status: u16,
}

struct Sender {
    inner: Arc<Inner>,
    producer_for: ProducerFor,
    durable: watch::Receiver<Durable>,
    cursor: Arc<Mutex<Cursor>>,
    /// Records read and not yet acknowledged, in seq order.
    window: VecDeque<Flight>,
    window_bytes: u64,
    /// Flights in `Unsent` or `Retry`.
    unsent: usize,
    /// Segments read to their end and not yet deleted, in order.
    finished: VecDeque<Finished>,
    /// Seq of the first record not acknowledged.
    acked: u64,
    /// What the checkpoint file holds.
    written: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    stop: watch::Receiver<Option<Instant>>,
    /// After a failed read, when to read again.
    read_again_at: Option<Instant>,
}

impl Sender {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.inner.config.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline: Option<Instant> = None;
        let mut writer_alive = true;
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        loop {
            self.send_due().await;
            self.pop_done();
            if self.read_again_at.is_some_and(|t| t <= Instant::now()) {
                self.read_again_at = None;
            }
            if self.has_room() && !self.caught_up() && self.read_again_at.is_none() {
                self.fill().await;
                continue;
            }
            if let Some(d) = deadline
                && ((self.window.is_empty() && self.caught_up()) || Instant::now() >= d)
            {
                break;
            }
            let retry_at = self.next_retry();
            let wait_for_writer = writer_alive && self.has_room();
            tokio::select! {
                Some(event) = self.events_rx.recv() => {
                    self.apply(event).await;
                    while let Ok(event) = self.events_rx.try_recv() {
                        self.apply(event).await;
                    }
                }
                changed = self.durable.changed(), if wait_for_writer => {
                    if changed.is_err() {
                        writer_alive = false;
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {}
                _ = tokio::time::sleep_until(self.read_again_at.unwrap_or(far)),
                    if self.read_again_at.is_some() => {}
                _ = tick.tick() => self.checkpoint().await,
                changed = self.stop.changed(), if deadline.is_none() => {
                    deadline = Some(match changed {
                        Ok(()) => (*self.stop.borrow()).unwrap_or_else(Instant::now),
                        Err(_) => Instant::now(),
                    });
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {}
            }
        }
        self.checkpoint().await;
    }

    fn has_room(&self) -> bool {
        let c = &self.inner.config;
        self.window.len() < c.window_records && self.window_bytes < c.window_bytes
    }

    fn caught_up(&self) -> bool {
        lock(&self.cursor).caught_up(*self.durable.borrow())
    }

    /// When the first record waiting for a retry is due, if one waits.
    fn next_retry(&self) -> Option<Instant> {
        if self.unsent == 0 {
            return None;
        }
        self.window.iter().find_map(|f| match f.state {
            State::Retry(at) => Some(at),
            State::Unsent => Some(Instant::now()),
            _ => None,
        })
    }

    fn set_state(&mut self, i: usize, state: State) {
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

    /// Reads more records into the window.
    async fn fill(&mut self) {
        let durable = *self.durable.borrow_and_update();
        let c = &self.inner.config;
        let max_records = c.window_records.saturating_sub(self.window.len());
        let max_bytes = c.window_bytes.saturating_sub(self.window_bytes);
        let (inner, cursor) = (self.inner.clone(), self.cursor.clone());
        let read = tokio::task::spawn_blocking(move || {
            let _gate = lock(&inner.fs_gate);
            let mut cursor = lock(&cursor);
            read_batch(&inner, &mut cursor, durable, max_records, max_bytes)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        match read {
            Ok(batch) => {
                if self.window.is_empty()
                    && let Some((_, first)) = batch.records.first()
                {
                    self.inner
                        .oldest_ms
                        .store(first.appended_ms, Ordering::Release);
                }
                for (framed, entry) in batch.records {
                    self.window_bytes += framed;
                    self.unsent += 1;
                    self.window.push_back(Flight {
                        seq: entry.seq,
                        framed,
                        entry,
                        state: State::Unsent,
                        attempts: 0,
                    });
                }
                self.finished.extend(batch.finished);
            }
            Err(error) => {
                self.inner.disk_error("read segment", &error);
                self.read_again_at = Some(Instant::now() + READ_RETRY);
            }
        }
    }

    /// Hands every record that is due to the producer, in order; stops at the first one that
    /// must wait (so nothing overtakes a record waiting for its retry).
    async fn send_due(&mut self) {
        if self.unsent == 0 {
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
            let seq = flight.seq;
            let record = to_record(&flight.entry);
            let topic = flight.entry.topic.clone();
            let producer = (self.producer_for)(&topic);
            match producer.send(&topic, vec![record], true, SEND_WAIT).await {
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
                    Some(refusal) => self.dead_letter(i, refusal).await,
                    None => {
                        let why = format!("{error:?}");
                        self.retry(i, &why);
                        return;
                    }
                },
            }
            i += 1;
        }
    }

    /// Schedules record `i` to be sent again after its backoff.
    fn retry(&mut self, i: usize, why: &str) {
        let c = &self.inner.config;
        let f = &self.window[i];
        let exp = f.attempts.saturating_sub(1).min(16);
        let backoff = c
            .retry_backoff
            .saturating_mul(1u32 << exp)
            .min(c.retry_backoff_max);
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
    async fn apply(&mut self, event: Event) {
        let Ok(i) = self.window.binary_search_by_key(&event.seq, |f| f.seq) else {
            return;
        };
        if self.window[i].state != State::Sent {
            return;
        }
        match event.outcome {
            Ok(Outcome::Delivered { .. }) => {
                self.inner.delivered.fetch_add(1, Ordering::Relaxed);
                self.set_state(i, State::Done);
            }
            Ok(Outcome::Failed { error, persisted }) => {
                match refusal_of_delivery(error, persisted) {
                    Some(refusal) => self.dead_letter(i, refusal).await,
                    None => self.retry(i, &format!("{error} ({persisted:?})")),
                }
            }
            Err(_) => self.retry(i, "delivery report lost"),
        }
    }

    /// Pops the acknowledged prefix of the window.
    fn pop_done(&mut self) {
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

    /// Writes record `i` to the dead-letter file (fsynced) and marks it done; if the file cannot
    /// be written, the record is retried instead.
    async fn dead_letter(&mut self, i: usize, refusal: Refusal) {
        let f = &self.window[i];
        let line = dead_letter_line(&f.entry, &refusal, f.attempts);
        let inner = self.inner.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _gate = lock(&inner.fs_gate);
            if inner.dead.load(Ordering::Acquire) {
                return Err(io::Error::other("spool closed"));
            }
            let path = inner.dir.join(DEAD_LETTER_FILE);
            let mut file = OpenOptions::new().create(true).append(true).open(path)?;
            file.write_all(&line)?;
            file.sync_data()
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        let f = &self.window[i];
        match written {
            Ok(()) => {
                tracing::warn!(
                    id = %f.entry.id(),
                    topic = %f.entry.topic,
                    error = %refusal.error,
                    reason = %refusal.reason,
                    "spool: record refused by Kafka for good; dead-lettered"
                );
                self.inner.dead_lettered.fetch_add(1, Ordering::Relaxed);
                self.set_state(i, State::Done);
            }
            Err(error) => {
                self.inner.disk_error("dead-letter file", &error);
                self.retry(i, "dead-letter file not writable");
            }
        }
    }

    /// Writes the checkpoint if it moved and deletes the segments it covers.
    async fn checkpoint(&mut self) {
        let acked = self.acked;
        let mut deletable = Vec::new();
        while let Some(f) = self.finished.front() {
            if f.last_seq.is_some_and(|s| s >= acked) {
                break;
            }
            if let Some(f) = self.finished.pop_front() {
                deletable.push(f);
            }
        }
        if acked == self.written && deletable.is_empty() {
            return;
        }
        let (inner, write) = (self.inner.clone(), acked != self.written);
        let ids: Vec<u64> = deletable.iter().map(|f| f.segment).collect();
        let done = tokio::task::spawn_blocking(move || {
            let _gate = lock(&inner.fs_gate);
            let mut done = FileWork {
                wrote: false,
                deleted: 0,
                error: None,
            };
            if inner.dead.load(Ordering::Acquire) {
                return done;
            }
            if write {
                if let Err(e) = write_checkpoint(&inner.dir, acked) {
                    done.error = Some(e);
                    return done;
                }
                done.wrote = true;
            }
            for id in &ids {
                if let Err(e) = remove_if_exists(&inner.dir.join(segment_name(*id))) {
                    done.error = Some(e);
                    return done;
                }
                done.deleted += 1;
            }
            if done.deleted > 0
                && let Err(e) = sync_dir(&inner.dir)
            {
                done.error = Some(e);
            }
            done
        })
        .await
        .unwrap_or_else(|e| FileWork {
            wrote: false,
            deleted: 0,
            error: Some(io::Error::other(e.to_string())),
        });
        if done.wrote {
            self.written = acked;
            self.inner.checkpoint.store(acked, Ordering::Release);
        }
        for f in deletable.iter().take(done.deleted) {
            lock(&self.inner.sealed).remove(&f.segment);
            self.inner.release(f.size);
        }
        for f in deletable.into_iter().skip(done.deleted).rev() {
            self.finished.push_front(f);
        }
        if let Some(error) = done.error {
            self.inner.disk_error("checkpoint", &error);
        }
    }
}

/// What a checkpoint step got done on disk.
struct FileWork {
    wrote: bool,
    deleted: usize,
    error: Option<io::Error>,
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
        headers: Some(headers),
        value: entry.value.clone(),
    }
}

/// A permanent refusal, per [`crate::error::delivery_status`]: too large, unknown topic or
/// partition, not authorized, invalid record. Everything else is retried.
fn refusal_of_delivery(error: RDKafkaErrorCode, persisted: Persisted) -> Option<Refusal> {
    let status = crate::error::delivery_status(error, persisted);
    let permanent = [
        StatusCode::PAYLOAD_TOO_LARGE,
        StatusCode::NOT_FOUND,
        StatusCode::FORBIDDEN,
        StatusCode::BAD_REQUEST,
    ];
    permanent.contains(&status).then(|| Refusal {
        error: format!("{error:?}"),
        reason: error.to_string(),
        status: status.as_u16(),
    })
}

fn refusal_of_send(error: &SendError) -> Option<Refusal> {
    match error {
        SendError::TooBig => Some(Refusal {
            error: "TooBig".into(),
            reason: "record larger than the producer queue".into(),
            status: StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
        }),
        SendError::Refused { error, .. } => refusal_of_delivery(*error, Persisted::No),
        SendError::QueueFull | SendError::Fatal => None,
    }
}

/// One line of the dead-letter file.
fn dead_letter_line(entry: &Entry, refusal: &Refusal, attempts: u32) -> Vec<u8> {
    let (key, key_encoding) = match &entry.key {
        Some(k) => {
            let (v, e) = text_or_hex(k);
            (serde_json::Value::String(v), e)
        }
        None => (serde_json::Value::Null, "utf8"),
    };
    let (value, value_encoding) = text_or_hex(&entry.value);
    let headers: Vec<serde_json::Value> = entry
        .headers
        .iter()
        .map(|(name, value)| {
            let value = value.as_ref().map(|v| text_or_hex(v));
            serde_json::json!({
                "name": name,
                "value": value.as_ref().map(|(v, _)| v),
                "encoding": value.as_ref().map_or("utf8", |(_, e)| e),
            })
        })
        .collect();
    let line = serde_json::json!({
        "id": entry.id(),
        "topic": entry.topic,
        "partition": entry.partition,
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": value_encoding,
        "headers": headers,
        "error": refusal.error,
        "reason": refusal.reason,
        "status": refusal.status,
        "attempts": attempts,
        "appended_ms": entry.appended_ms,
        "dead_lettered_ms": unix_ms(),
    });
    let mut bytes = serde_json::to_vec(&line).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    bytes
}

/// The bytes as text when they are UTF-8, else as lower-case hex.
fn text_or_hex(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => {
            let mut s = String::with_capacity(bytes.len() * 2);
            for b in bytes {
                s.push_str(&format!("{b:02x}"));
            }
            (s, "hex")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn permanent_refusals_follow_the_status_mapping() {
        use RDKafkaErrorCode as E;
        assert!(refusal_of_delivery(E::MessageSizeTooLarge, Persisted::Possibly).is_some());
        assert!(refusal_of_delivery(E::TopicAuthorizationFailed, Persisted::No).is_some());
        assert!(refusal_of_delivery(E::UnknownTopicOrPartition, Persisted::No).is_some());
        assert!(refusal_of_delivery(E::InvalidRecord, Persisted::No).is_some());
        assert!(refusal_of_delivery(E::MessageTimedOut, Persisted::No).is_none());
        assert!(refusal_of_delivery(E::MessageTimedOut, Persisted::Possibly).is_none());
        assert!(refusal_of_delivery(E::UnknownTopicOrPartition, Persisted::Possibly).is_none());
        assert!(refusal_of_send(&SendError::QueueFull).is_none());
        assert!(refusal_of_send(&SendError::Fatal).is_none());
        assert!(refusal_of_send(&SendError::TooBig).is_some());
    }

    #[test]
    fn dead_letter_lines_are_json_with_binary_as_hex() {
        let entry = Entry {
            seq: 5,
            origin: 1,
            appended_ms: 2,
            topic: "t".into(),
            key: Some(Bytes::from_static(b"k")),
            partition: Some(3),
            headers: vec![("h".into(), Some(Bytes::from_static(&[0xff, 0x00])))],
            value: Bytes::from_static(&[0xc3, 0x28]),
        };
        let refusal = Refusal {
            error: "MessageSizeTooLarge".into(),
            reason: "too large".into(),
            status: 413,
        };
        let line = dead_letter_line(&entry, &refusal, 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["id"], "0000000000000001-0000000000000005");
        assert_eq!(v["value"], "c328");
        assert_eq!(v["value_encoding"], "hex");
        assert_eq!(v["key"], "k");
        assert_eq!(v["headers"][0]["value"], "ff00");
        assert_eq!(v["status"], 413);
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
