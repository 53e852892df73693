//! The producer context: delivery reports, librdkafka's logs and errors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::oneshot;

use super::admission::Admission;
use crate::throttle::{Level, Throttle};

/// Who waits for the delivery reports of the records of a [`super::Producer::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Nobody (async routes): a report gives the room back and is counted.
    None,
    /// The caller, through one receiver per record (sync routes).
    Caller,
    /// The same, for records a client was answered for already (a hook's reply before its
    /// records' acknowledgements): one that fails is lost, as an async record is.
    AfterReply,
    /// The spool, through one receiver per record. The records are also on disk, so a
    /// shutdown that leaves them unreported does not count them as undelivered.
    Spool,
}

impl Report {
    /// Whether records reported so are covered ([`super::admission::Admission::hand`]): the
    /// spool keeps them, or a requester waits for them and gets no `2xx` without them.
    pub fn covers(self) -> bool {
        matches!(self, Report::Spool | Report::Caller)
    }
}

/// Whether a record that failed may be on the broker anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persisted {
    /// It was never sent, or the broker refused it: retrying cannot duplicate.
    No,
    /// It was sent and no answer came: a retry may duplicate.
    Possibly,
}

impl Persisted {
    /// Its value as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Persisted::No => "no",
            Persisted::Possibly => "possibly",
        }
    }
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the broker.
    Delivered {
        /// Partition written.
        partition: i32,
        /// Offset written.
        offset: i64,
    },
    /// Not acknowledged.
    Failed {
        /// librdkafka's error.
        error: RDKafkaErrorCode,
        /// Whether it may have been written anyway.
        persisted: Persisted,
    },
}

/// Per-record tag handed through librdkafka: who waits for the outcome, if anyone does.
/// `None` (async records) costs no allocation: it travels as a null pointer.
pub struct Waiter(pub Option<Box<Waiting>>);

/// Someone waiting for a record's outcome, or a record sent again that carries its first time.
pub struct Waiting {
    /// Where the outcome goes.
    pub tx: oneshot::Sender<Outcome>,
    /// Who waits: the caller, the caller after its client's answer, or the spool; nobody for
    /// a record sent again.
    pub report: Report,
    /// For a record sent again after a fenced producer's brokers refused it: when it was first
    /// handed over. A failed record's report has no timestamp.
    pub first: Option<super::record::First>,
}

/// Counters of what happened to the records a producer accepted.
#[derive(Debug, Default)]
pub struct Tally {
    /// Records acknowledged by the broker.
    pub delivered: AtomicU64,
    /// Records that failed after they were accepted.
    pub failed: AtomicU64,
    /// Of those, the ones only kafboy's memory held, whose client had a 2xx before their
    /// outcome (a `202`, or a hook's own reply): lost.
    pub lost: AtomicU64,
}

impl Tally {
    /// (delivered, failed).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The context every kafboy producer runs with.
pub struct Context {
    /// Name of the producer, for logs.
    pub name: String,
    /// Queue room, given back as reports arrive.
    pub admission: Arc<Admission>,
    /// Delivery counters.
    pub tally: Arc<Tally>,
    /// Set by every error event. The event carries the underlying code, not "fatal", so the
    /// producer asks librdkafka whether it is fatal when this is set.
    pub error_seen: Arc<AtomicBool>,
    /// Set when the brokers fenced the producer ([`fenced`]). librdkafka does not count that
    /// as fatal: it raises the producer's epoch itself and goes on. Kafka takes the raised
    /// epoch; other brokers (tansu) refuse every later request of the producer so. Either way
    /// the producer takes no new records and is replaced, and what it holds is still sent.
    pub fenced: Arc<AtomicBool>,
    /// Per-topic delivery counters.
    pub topics: Arc<crate::metrics::Topics>,
    /// Broker states from the latest statistics, for the status page.
    pub brokers: Arc<Mutex<Vec<crate::metrics::BrokerState>>>,
    /// Client errors: at most one line per 10 s. They come and go with broker restarts and
    /// librdkafka retries them itself; during an outage they arrive dozens a second.
    pub client_errors: Throttle,
    /// librdkafka's own error and warning lines: at most one per 10 s, the rest at debug (its
    /// critical ones always). A broker that refuses a handshake gets one every reconnect (each
    /// second), with details that differ each time, so librdkafka's suppression of identical
    /// lines does not catch them.
    pub log_lines: Throttle,
    /// Replaced after a fatal error and still flushing: its statistics are no longer the
    /// slot's (they would overwrite the new producer's broker states).
    pub retired: AtomicBool,
    /// Each broker's retry and timeout totals at the last statistics, to count their growth
    /// (a replacement producer's totals start again from 0).
    pub broker_totals: Mutex<HashMap<String, [u64; 2]>>,
    /// The slot's brokers with a `kafboy_broker_up` series.
    pub exported: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Accepted records that failed: at most one line a second. Past `message_timeout` with
    /// the brokers down, a whole queue fails at once.
    pub failures: Throttle,
    /// Where a topic the brokers refuse to let kafboy write is reported.
    pub refusals: Arc<super::metadata::WriteRefusals>,
    /// The shutdown's gate: past the flush's deadline, a failure was counted undelivered.
    pub gate: Arc<super::gate::Gate>,
    /// Where records refused to a fenced producer wait for its replacement.
    pub rescue: Arc<super::rescue::Rescue>,
    /// Whether the brokers refuse the producer's TLS or SASL credentials.
    pub credentials: Arc<super::credentials::Credentials>,
    /// Offsets librdkafka made up for records acknowledged without one.
    pub unnumbered: super::unnumbered::Unnumbered,
}

impl ClientContext for Context {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let states = statistics.brokers.values().map(|b| b.state.as_str());
        self.credentials.brokers(states);
        self.log_credentials();
        let mut totals = crate::lock(&self.broker_totals);
        let mut exported = crate::lock(&self.exported);
        let seen = crate::metrics::Seen {
            totals: &mut totals,
            exported: &mut exported,
        };
        crate::metrics::statistics(&self.name, &statistics, &self.topics, &self.brokers, seen);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let name = &self.name;
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(producer = %name, fac, "{message}")
            }
            RDKafkaLogLevel::Error => match self.log_lines.pass() {
                Some(suppressed) => tracing::error!(producer = %name, fac, suppressed, "{message}"),
                None => tracing::debug!(producer = %name, fac, "{message}"),
            },
            RDKafkaLogLevel::Warning => match self.log_lines.pass() {
                Some(suppressed) => tracing::warn!(producer = %name, fac, suppressed, "{message}"),
                None => tracing::debug!(producer = %name, fac, "{message}"),
            },
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(producer = %name, fac, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(producer = %name, fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.error_seen.store(true, Ordering::Release);
        self.credentials.error(error.rdkafka_error_code(), reason);
        self.log_credentials();
        match self.client_errors.pass() {
            Some(suppressed) => {
                tracing::warn!(producer = %self.name, %error, %reason, suppressed, "kafka client error")
            }
            None => tracing::debug!(producer = %self.name, %error, %reason, "kafka client error"),
        }
    }
}

impl Context {
    /// The throttles of producer `name`'s lines: client errors, librdkafka's own log lines,
    /// failed records.
    pub(crate) fn throttles(name: &str) -> [Throttle; 3] {
        let throttle = |every, what| Throttle::new(every, Level::Warn, what, Some(name));
        [
            throttle(Duration::from_secs(10), "kafka client error"),
            throttle(Duration::from_secs(10), "librdkafka log"),
            throttle(Duration::from_secs(1), "accepted record not delivered"),
        ]
    }

    /// One line each way as the brokers start or stop refusing the producer's credentials.
    fn log_credentials(&self) {
        match self.credentials.changed() {
            Some(true) => tracing::error!(
                producer = %self.name,
                "the brokers refuse this producer's TLS or SASL credentials: not ready, refusing records"
            ),
            Some(false) => tracing::warn!(
                producer = %self.name,
                "the brokers no longer refuse this producer's credentials"
            ),
            None => {}
        }
    }

    /// Marks the producer fenced (refusing records, to be replaced); says so once.
    fn fence(&self, code: RDKafkaErrorCode) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(producer = %self.name, %code, "the brokers fenced this producer: not ready, refusing records");
        }
    }

    /// Counts a record delivered: the producer's tally and the topic's counter.
    pub fn count_delivered(&self, topic: &str) {
        self.tally.delivered.fetch_add(1, Ordering::Relaxed);
        self.topics.get(topic).delivered.increment(1);
    }

    /// Counts a record failed after it was accepted, for `reason`.
    pub fn count_failed(&self, topic: &str, reason: &str, persisted: Persisted) {
        self.tally.failed.fetch_add(1, Ordering::Relaxed);
        crate::metrics::failed(&self.topics.get(topic).label, reason, persisted.label());
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Waiter;

    fn delivery(&self, result: &DeliveryResult<'_>, waiter: Waiter) {
        let (message, code) = match result {
            Ok(m) => (m, None),
            Err((e, m)) => (
                m,
                Some(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail)),
            ),
        };
        if let Some(code) = code.filter(|&code| fenced(code)) {
            self.fence(code);
            // A 202 that nobody waits for (a sync requester hears of the refusal, the spool
            // sends again itself, a hook's reply after which its records are awaited counts
            // them lost): kept for the replacement to send, unless a shutdown has begun, which
            // replaces nothing, or an earlier attempt may have been written.
            let nobody_waits = waiter.0.as_ref().is_none_or(|w| w.report == Report::None);
            if nobody_waits
                && !self.gate.is_closed()
                && super::ffi::persisted(message) == Persisted::No
            {
                self.rescue
                    .keep(message, waiter.0.as_ref().and_then(|w| w.first));
                self.admission.release(1, record_bytes(message));
                self.admission.unhand(1, false);
                return;
            }
        }
        let report = waiter.0.as_ref().map_or(Report::None, |w| w.report);
        let spooled = report == Report::Spool;
        // Given up at the flush's deadline: undelivered, not failed (nor logged as such). A
        // requester that is gone (answered `504` at its deadline, or its client left) hears of
        // nothing: its record is the shutdown's to count, as an async one is.
        let given_up = code.is_some() && self.gate.given_up();
        let heard = report == Report::Spool || waiter.0.as_ref().is_some_and(|w| !w.tx.is_closed());
        if given_up && !(report.covers() && heard) {
            self.gate.count_given_up(super::ffi::persisted(message));
        }
        // A spooled record's attempt is not its outcome: the spool sends it again after a
        // failure, and counts what finally happened to it (`Producer::count_delivered`).
        let outcome = match code {
            None => {
                if !spooled {
                    self.count_delivered(message.topic());
                }
                let (topic, partition) = (message.topic(), message.partition());
                let offset = self.unnumbered.offset(topic, partition, message.offset());
                if offset < 0 {
                    crate::metrics::delivered_without_offset(&self.topics.get(topic).label);
                }
                Outcome::Delivered { partition, offset }
            }
            Some(code) => {
                if code == RDKafkaErrorCode::TopicAuthorizationFailed {
                    self.refusals.refused(message.topic());
                }
                if !spooled && !given_up {
                    let persisted = super::ffi::persisted(message);
                    self.count_failed(message.topic(), &format!("{code:?}"), persisted);
                }
                // Lost: a record whose only answer was a 2xx before its outcome, or whose sync
                // requester is gone (told `504`, maybe written, or its client left): nobody
                // hears of this failure but the counts. A requester still waiting hears of it.
                let unheard = matches!(report, Report::None | Report::AfterReply)
                    || (report == Report::Caller && !heard);
                if !given_up && unheard {
                    self.tally.lost.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Failed {
                    error: code,
                    persisted: super::ffi::persisted(message),
                }
            }
        };
        // Counted before it stops being counted as handed over: a shutdown reads what is
        // undelivered, then what failed, and must not miss a record between the two.
        self.admission.release(1, record_bytes(message));
        self.admission.unhand(1, report.covers());
        if let Outcome::Failed { error, persisted } = &outcome
            && report == Report::None
            && !given_up
            && let Some(suppressed) = self.failures.pass()
        {
            tracing::warn!(
                producer = %self.name,
                topic = message.topic(),
                error = %error,
                ?persisted,
                suppressed,
                "accepted record not delivered"
            );
        }
        // The requester may have given up (deadline, disconnect); the outcome is counted anyway.
        if let Some(waiting) = waiter.0 {
            drop(waiting.tx.send(outcome));
        }
    }
}

/// Whether the brokers refused a record because they no longer take its producer's id and
/// epoch. (After records expire, librdkafka raises an idempotent producer's epoch itself,
/// without asking the brokers: tansu answers that so.)
fn fenced(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// Value, key and header bytes: what [`Admission`] counts for a record
/// ([`super::Record::queued_bytes`]).
pub fn record_bytes(message: &BorrowedMessage<'_>) -> usize {
    use rdkafka::message::Headers;
    message.payload().map_or(0, <[u8]>::len)
        + message.key().map_or(0, <[u8]>::len)
        + message
            .headers()
            .map_or(0, |h| super::record::header_bytes(h.iter()))
}
