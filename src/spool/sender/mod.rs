//! The sender task: reads the spool in order from the checkpoint, hands records to the producer
//! with delivery reports, retries what failed retriably, dead-letters what Kafka refused
//! permanently, advances the checkpoint over the acknowledged prefix and deletes acknowledged
//! segments.

mod checkpoint;
mod dead_letter;
mod read;
mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::segment::Entry;
use super::writer::Durable;
use super::{Inner, lock};
use crate::kafka::Producer;
use crate::kafka::delivery::Outcome;

pub(super) use read::Cursor;

/// The producer for a topic.
pub(super) type ProducerFor = Box<dyn Fn(&str) -> Arc<Producer> + Send + Sync>;

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
    attempt_max: Duration,
) -> Handle {
    let (stop, stop_rx) = watch::channel(None);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let acked = inner.checkpoint.load(Ordering::Acquire);
    let sender = Sender {
        inner,
        producer_for,
        attempt_max,
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
        closed: false,
        missing: HashMap::new(),
    };
    Handle {
        task: tokio::spawn(sender.run()),
        stop,
    }
}

/// A segment the cursor has read to its end.
#[derive(Debug, Clone, Copy)]
struct Finished {
    segment: u64,
    last_seq: Option<u64>,
    size: u64,
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
    /// When it was last handed to the producer.
    sent: Instant,
}

/// A delivery report, tagged with its record.
struct Event {
    seq: u64,
    outcome: Result<Outcome, oneshot::error::RecvError>,
}

struct Sender {
    inner: Arc<Inner>,
    producer_for: ProducerFor,
    /// The longest one attempt to send a record may take: the producer's message timeout.
    attempt_max: Duration,
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
    /// The producers were closed by a shutdown's flush: nothing more can be sent, and what is
    /// not sent stays on disk for the next start.
    closed: bool,
    /// Topics (partition `None`) and partitions Kafka says do not exist, by topic, for
    /// `spool.missing_grace`: one grace for all their records, not one each in turn.
    missing: HashMap<String, Vec<Gone>>,
}

/// A topic or partition Kafka says does not exist.
struct Gone {
    partition: Option<i32>,
    /// The first refusal of this outage.
    since: Instant,
    /// The latest refusal: a record sent long after it starts a new outage.
    last: Instant,
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
            if self.has_room() && !self.caught_up() && self.read_again_at.is_none() && !self.closed
            {
                self.fill().await;
                continue;
            }
            // Done when everything was sent and acknowledged, or nothing more can be sent
            // and every record sent has its report (waiting out the grace for records that
            // can only wait for the next start would hold every stop as long).
            if deadline.is_some() && !self.closed {
                // Any producer tells: the flush closes them all at once.
                let topic = self.window.front().map_or("", |f| f.entry.topic.as_str());
                self.closed = (self.producer_for)(topic).closed();
            }
            let reported = || self.window.iter().all(|f| f.state != State::Sent);
            if let Some(d) = deadline
                && ((self.window.is_empty() && self.caught_up())
                    || (self.closed && reported())
                    || Instant::now() >= d)
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
}
