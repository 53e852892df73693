//! One librdkafka producer with kafboy's queue accounting: records go in all or nothing, each
//! optionally with a receiver for its delivery outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use tokio::sync::oneshot;

use super::admission::{Admission, Refused};
use super::credentials::Credentials;
use super::delivery::{Context, Outcome, Persisted, Report, Tally, Waiter, Waiting};
use super::gate::Gate;
use super::poller::Polled;
use super::record::Record;
use super::slot::Shared;
use crate::config::KafkaConfig;

/// Why records were not (all) queued.
#[derive(Debug)]
pub enum SendError {
    /// No room in the queue within the wait; nothing queued.
    QueueFull,
    /// The request is bigger than the whole queue; nothing queued.
    TooBig,
    /// The producer hit a fatal error, or the brokers fenced it; nothing queued.
    Fatal,
    /// The brokers refuse the producer's TLS or SASL credentials, and none is up; nothing
    /// queued.
    Credentials,
    /// The producers are closed for the final flush of a shutdown; nothing queued.
    Closed,
    /// librdkafka refused record number `accepted` (0-based); the ones before it are queued.
    Refused {
        /// Records queued before the refusal.
        accepted: usize,
        /// librdkafka's error.
        error: RDKafkaErrorCode,
    },
}

impl SendError {
    /// A short, bounded name for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SendError::QueueFull => "queue_full",
            SendError::TooBig => "too_big",
            SendError::Fatal => "fatal",
            SendError::Credentials => "credentials",
            SendError::Closed => "shutting_down",
            SendError::Refused { .. } => "refused",
        }
    }
}

/// librdkafka's own queue limits, twice kafboy's accounting and a little more, so its QueueFull
/// stays an exception: a delivery report gives its record's room back as it is handed over,
/// and requests waiting for room take it at once, while librdkafka counts the record until it
/// has handed over the whole batch of reports it came in (up to a queue's worth).
pub fn set_queue_limits(client: &mut ClientConfig, kafka: &KafkaConfig) {
    // Saturating: a huge configured queue must not wrap around to a small one.
    let slack_msgs = kafka
        .queue_max_messages
        .saturating_mul(2)
        .saturating_add(1000);
    let slack_kb = kafka.queue_max_bytes.saturating_mul(2) / 1024 + 1024;
    client
        .set(
            "queue.buffering.max.messages",
            slack_msgs.min(i32::MAX as usize).to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            slack_kb.min(i32::MAX as usize).to_string(),
        );
}

/// One librdkafka producer with kafboy's queue accounting.
pub struct Producer {
    pub(super) inner: Polled,
    admission: Arc<Admission>,
    tally: Arc<Tally>,
    error_seen: Arc<AtomicBool>,
    fenced: Arc<AtomicBool>,
    fatal: AtomicBool,
    gate: Arc<Gate>,
    credentials: Arc<Credentials>,
}

impl Producer {
    pub(super) fn build(
        name: &str,
        kafka: &KafkaConfig,
        mut client: ClientConfig,
        shared: &Shared,
    ) -> Result<Self, KafkaError> {
        let admission = Arc::new(Admission::new(
            kafka.queue_max_messages,
            kafka.queue_max_bytes,
        ));
        let error_seen = Arc::new(AtomicBool::new(false));
        let fenced = Arc::new(AtomicBool::new(false));
        let credentials = Arc::new(Credentials::default());
        set_queue_limits(&mut client, kafka);
        let [client_errors, log_lines, failures] = Context::throttles(name);
        let context = Context {
            name: name.to_string(),
            admission: admission.clone(),
            tally: shared.tally.clone(),
            error_seen: error_seen.clone(),
            fenced: fenced.clone(),
            topics: shared.topics.clone(),
            brokers: shared.brokers.clone(),
            client_errors,
            log_lines,
            failures,
            retired: AtomicBool::new(false),
            broker_totals: Mutex::default(),
            exported: shared.exported.clone(),
            refusals: shared.refusals.clone(),
            gate: shared.gate.clone(),
            rescue: shared.rescue.clone(),
            credentials: credentials.clone(),
            unnumbered: Default::default(),
        };
        let inner = BaseProducer::from_config_and_context(&client, context)?;
        let inner = Polled::new(inner, name).map_err(|e| {
            KafkaError::ClientCreation(format!("cannot start the report thread: {e}"))
        })?;
        Ok(Producer {
            inner,
            admission,
            tally: shared.tally.clone(),
            error_seen,
            fenced,
            fatal: AtomicBool::new(false),
            gate: shared.gate.clone(),
            credentials,
        })
    }

    /// Queues `records` on `topic`, all or nothing as far as kafboy's queue accounting goes.
    /// Unless `report` is [`Report::None`], each record gets a receiver for its outcome.
    pub async fn send(
        &self,
        topic: &str,
        records: Vec<Record>,
        report: Report,
        wait: Duration,
    ) -> Result<Vec<oneshot::Receiver<Outcome>>, SendError> {
        if self.is_fatal() {
            return Err(SendError::Fatal);
        }
        // Refused now rather than `202` and expired later. Not a reason to replace the
        // producer: a new one would have the same credentials.
        if self.credentials.refused() {
            return Err(SendError::Credentials);
        }
        let bytes: usize = records.iter().map(Record::queued_bytes).sum();
        self.admission
            .acquire(records.len(), bytes, wait)
            .await
            .map_err(|r| match r {
                Refused::Full => SendError::QueueFull,
                Refused::TooBig => SendError::TooBig,
            })?;
        // Again after the wait for room: that room may be what the fenced records gave back.
        if self.is_fatal() {
            self.admission.release(records.len(), bytes);
            return Err(SendError::Fatal);
        }
        let Some(_pass) = self.gate.enter() else {
            self.admission.release(records.len(), bytes);
            return Err(SendError::Closed);
        };
        let waited = report != Report::None;
        let covered = report.covers();
        let mut receivers = Vec::with_capacity(if waited { records.len() } else { 0 });
        let total = records.len();
        self.admission.hand(total, covered);
        let mut handed_bytes = 0;
        for (i, record) in records.into_iter().enumerate() {
            // A record sent again carries its first time, for the day it is refused again.
            let waiter = if waited || record.first.is_some() {
                let (tx, rx) = oneshot::channel();
                if waited {
                    receivers.push(rx);
                }
                Waiter(Some(Box::new(Waiting {
                    tx,
                    report,
                    first: record.first,
                })))
            } else {
                Waiter(None)
            };
            let size = record.queued_bytes();
            let mut base = BaseRecord::<[u8], [u8], Waiter>::with_opaque_to(topic, waiter)
                .payload(&record.value[..]);
            if let Some(key) = &record.key {
                base = base.key(&key[..]);
            }
            if let Some(p) = record.partition {
                base = base.partition(p);
            }
            if let Some(first) = record.first {
                base = base.timestamp(first.stamp);
            }
            if let Some(h) = record.headers {
                // The last record of a request takes the shared copy itself.
                base = base.headers(Arc::unwrap_or_clone(h));
            }
            if let Err((error, _)) = self.inner.send(base) {
                // Give back the room of this record and of the ones never handed over; records
                // already queued give theirs back through their delivery reports.
                self.admission.release(total - i, bytes - handed_bytes);
                self.admission.unhand(total - i, covered);
                let error = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                return Err(SendError::Refused { accepted: i, error });
            }
            handed_bytes += size;
        }
        Ok(receivers)
    }

    /// The producer's name (`sync`, `async`, `batch`, `batch-N`), its slot's.
    pub fn name(&self) -> &str {
        &self.inner.context().name
    }

    /// Whether a shutdown's flush closed the producers to new records.
    pub fn closed(&self) -> bool {
        self.gate.is_closed()
    }

    /// Records queued or in flight.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight_count().max(0) as usize
    }

    /// Records delivered and failed since start.
    pub fn tally(&self) -> (u64, u64) {
        self.tally.counts()
    }

    /// Whether the producer takes no more records and is to be replaced: librdkafka reported a
    /// fatal error ([`Producer::stopped`]), or the brokers fenced it (see
    /// [`super::delivery::Context::fenced`]).
    pub fn is_fatal(&self) -> bool {
        self.stopped() || self.fenced.load(Ordering::Acquire)
    }

    /// Whether the brokers refuse the producer's TLS or SASL credentials, none of them up.
    pub fn credentials_refused(&self) -> bool {
        self.credentials.refused()
    }

    /// Whether librdkafka reported a fatal error: it sends nothing more, so what its queue holds
    /// would only wait out the message timeout there. Only asks librdkafka after an error event.
    pub(super) fn stopped(&self) -> bool {
        if self.fatal.load(Ordering::Relaxed) {
            return true;
        }
        // A load first: the swap is a write, and this runs on every request.
        if self.error_seen.load(Ordering::Relaxed)
            && self.error_seen.swap(false, Ordering::AcqRel)
            && let Some((code, reason)) = self.inner.client().fatal_error()
        {
            if !self.fatal.swap(true, Ordering::Relaxed) {
                tracing::error!(producer = %self.name(), %code, %reason, "fatal producer error: not ready, refusing records");
            }
            return true;
        }
        false
    }

    /// Records holding room in kafboy's queue accounting.
    pub fn queued(&self) -> usize {
        self.admission.queued()
    }

    /// Counts the final outcome of a record the spool sent (attempts are not counted as they
    /// come): delivered, or failed for `reason` when it was dead-lettered.
    pub fn count_spooled(&self, topic: &str, failed: Option<&str>) {
        let context = self.inner.context();
        match failed {
            None => context.count_delivered(topic),
            // Dead-lettered: refused for good, so not written.
            Some(reason) => context.count_failed(topic, reason, Persisted::No),
        }
    }

    /// Counts a record lost after its client's `2xx`: failed, for `reason`.
    pub(super) fn count_lost(&self, topic: &str, reason: &str) {
        self.inner
            .context()
            .count_failed(topic, reason, Persisted::No);
        self.tally.lost.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks this producer replaced: its statistics no longer speak for its slot.
    pub(super) fn retire(&self) {
        self.inner.context().retired.store(true, Ordering::Relaxed);
    }

    /// Records handed over and unreported that neither the spool keeps nor a requester waits
    /// for ([`Admission::uncovered`]).
    pub fn uncovered(&self) -> usize {
        self.admission.uncovered()
    }

    /// Share of the queue in use, 0 to 1, and whether it is full.
    pub fn fill(&self) -> (f64, bool) {
        (self.admission.fill(), self.admission.full())
    }
}
