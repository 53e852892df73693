//! The producer context: delivery reports, librdkafka's logs and errors. This is the one module
//! that calls librdkafka directly: for the message status that rust-rdkafka's `FutureProducer`
//! throws away (it is what tells "definitely not written" (503) from "maybe written" (504)), for
//! a flush that keeps librdkafka's flushing state on, and for the main-queue wake-up the
//! `poller` thread sleeps on.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::IntoOpaque;
use tokio::sync::oneshot;

use super::admission::Admission;
use crate::throttle::Throttle;

/// Whether a record that failed may be on the broker anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persisted {
    /// It was never sent, or the broker refused it: retrying cannot duplicate.
    No,
    /// It was sent and no answer came: a retry may duplicate.
    Possibly,
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

/// Someone waiting for a record's outcome.
pub struct Waiting {
    /// Where the outcome goes.
    pub tx: oneshot::Sender<Outcome>,
    /// Whether the record is also kept in the spool ([`Admission::mark_spooled`]).
    pub spooled: bool,
}

impl IntoOpaque for Waiter {
    fn into_ptr(self) -> *mut c_void {
        match self.0 {
            Some(sender) => Box::into_raw(sender).cast(),
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn from_ptr(ptr: *mut c_void) -> Self {
        if ptr.is_null() {
            return Waiter(None);
        }
        // SAFETY: a non-null pointer came from `Box::into_raw` in `into_ptr`, and librdkafka hands
        // each message's opaque back exactly once (delivery report, or a failed send).
        Waiter(Some(unsafe { Box::from_raw(ptr.cast()) }))
    }
}

/// Counters of what happened to the records a producer accepted.
#[derive(Debug, Default)]
pub struct Tally {
    /// Records acknowledged by the broker.
    pub delivered: AtomicU64,
    /// Records that failed after they were accepted.
    pub failed: AtomicU64,
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
    /// Per-topic delivery counters.
    pub topics: Arc<crate::metrics::Topics>,
    /// Broker states from the latest statistics, for the status page.
    pub brokers: Arc<Mutex<Vec<crate::metrics::BrokerState>>>,
    /// Client errors: at most one line per 10 s. They come and go with broker restarts and
    /// librdkafka retries them itself; during an outage they arrive dozens a second.
    pub client_errors: Throttle,
    /// Replaced after a fatal error and still flushing: its statistics are no longer the
    /// slot's (they would overwrite the new producer's broker states).
    pub retired: AtomicBool,
    /// Each broker's retry and timeout totals at the last statistics, to count their growth
    /// (a replacement producer's totals start again from 0).
    pub broker_totals: Mutex<HashMap<String, [u64; 2]>>,
    /// Accepted records that failed: at most one line a second. Past `message_timeout` with
    /// the brokers down, a whole queue fails at once.
    pub failures: Throttle,
}

impl ClientContext for Context {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let mut totals = crate::lock(&self.broker_totals);
        crate::metrics::statistics(
            &self.name,
            &statistics,
            &self.topics,
            &self.brokers,
            &mut totals,
        );
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let name = &self.name;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(producer = %name, fac, "{message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(producer = %name, fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(producer = %name, fac, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(producer = %name, fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.error_seen.store(true, Ordering::Release);
        match self.client_errors.pass() {
            Some(suppressed) => {
                tracing::warn!(producer = %self.name, %error, %reason, suppressed, "kafka client error")
            }
            None => tracing::debug!(producer = %self.name, %error, %reason, "kafka client error"),
        }
    }
}

impl Context {
    /// Counts a record delivered: the producer's tally and the topic's counter.
    pub fn count_delivered(&self, topic: &str) {
        self.tally.delivered.fetch_add(1, Ordering::Relaxed);
        self.topics.get(topic).delivered.increment(1);
    }

    /// Counts a record failed after it was accepted, for `reason`.
    pub fn count_failed(&self, topic: &str, reason: &str) {
        self.tally.failed.fetch_add(1, Ordering::Relaxed);
        crate::metrics::failed(&self.topics.get(topic).label, reason);
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Waiter;

    fn delivery(&self, result: &DeliveryResult<'_>, waiter: Waiter) {
        let (message, error) = match result {
            Ok(m) => (m, None),
            Err((e, m)) => (m, Some(e)),
        };
        let spooled = waiter.0.as_ref().is_some_and(|w| w.spooled);
        if spooled {
            self.admission.unmark_spooled(1);
        }
        self.admission.release(1, record_bytes(message));
        // A spooled record's attempt is not its outcome: the spool sends it again after a
        // failure, and counts what finally happened to it (`Producer::count_delivered`).
        let outcome = match error {
            None => {
                if !spooled {
                    self.count_delivered(message.topic());
                }
                Outcome::Delivered {
                    partition: message.partition(),
                    offset: message.offset(),
                }
            }
            Some(error) => {
                let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                if !spooled {
                    self.count_failed(message.topic(), &format!("{code:?}"));
                }
                Outcome::Failed {
                    error: code,
                    persisted: persisted(message),
                }
            }
        };
        match (waiter.0, &outcome) {
            // The requester may have given up (deadline, disconnect); the outcome is counted anyway.
            (Some(waiting), _) => drop(waiting.tx.send(outcome)),
            (None, Outcome::Failed { error, persisted }) => {
                if let Some(suppressed) = self.failures.pass() {
                    tracing::warn!(
                        producer = %self.name,
                        topic = message.topic(),
                        error = %error,
                        ?persisted,
                        suppressed,
                        "accepted record not delivered"
                    );
                }
            }
            (None, Outcome::Delivered { .. }) => {}
        }
    }
}

/// Value, key and header bytes: what [`Admission`] counts for a record
/// ([`super::producer::Record::queued_bytes`]).
pub fn record_bytes(message: &BorrowedMessage<'_>) -> usize {
    use rdkafka::message::Headers;
    message.payload().map_or(0, <[u8]>::len)
        + message.key().map_or(0, <[u8]>::len)
        + message
            .headers()
            .map_or(0, |h| super::producer::header_bytes(h.iter()))
}

fn persisted(message: &BorrowedMessage<'_>) -> Persisted {
    // SAFETY: `ptr()` is the live rd_kafka_message_t of this delivery report, valid for the
    // duration of the callback; rd_kafka_message_status only reads it.
    let status = unsafe { rdkafka::bindings::rd_kafka_message_status(message.ptr()) };
    match status {
        rdkafka::bindings::rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED => {
            Persisted::No
        }
        _ => Persisted::Possibly,
    }
}

/// Waits until `producer` has no queued or in-flight records, or `timeout` passes, sending
/// lingering batches at once. rust-rdkafka's own `flush` calls `rd_kafka_flush` with a zero
/// timeout in a loop, so librdkafka's "flushing" state (which makes linger.ms immediate) is only
/// ever on for an instant and a long linger is waited out; one call with the real timeout
/// keeps it on. Delivery reports keep flowing through the producer's `poller` thread.
pub fn flush(producer: &BaseProducer<Context>, timeout: std::time::Duration) {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the handle is alive for the whole call (borrowed from `producer`); rd_kafka_flush
    // is thread-safe and, with event-based delivery reports, only waits on the message count.
    unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms);
    }
}

/// Raises a fatal error in `producer` the way a broker-side idempotence failure would, so tests
/// can check what kafboy does after one. Not for production use.
#[doc(hidden)]
pub fn inject_fatal_error(producer: &BaseProducer<Context>) {
    let err =
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;
    // SAFETY: the handle is alive (borrowed from `producer`) and the reason is a NUL-terminated
    // static string; librdkafka copies it.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            producer.client().native_ptr(),
            err,
            c"injected fatal error".as_ptr(),
        );
    }
}

/// A handle on a producer's main queue, where its delivery reports, errors, logs and statistics
/// arrive: its length, and a wake-up written to a socket when it stops being empty. Private to
/// the crate: `wake_on`'s fd must stay open until `wake_on(None)`, and the queue must go before
/// the client. Nothing in the types enforces either; the `poller` keeps both.
pub(crate) struct MainQueue(NonNull<rdkafka::bindings::rd_kafka_queue_t>);

// SAFETY: librdkafka's queue handles may be used from any thread; this one is only destroyed in
// `Drop`, when no other reference to the `MainQueue` is left.
unsafe impl Send for MainQueue {}
// SAFETY: as above; `len` and `wake_on` are thread-safe librdkafka calls.
unsafe impl Sync for MainQueue {}

impl MainQueue {
    /// The main queue of `producer`. It holds its own reference to the queue and must be dropped
    /// before the producer's client is.
    pub fn of(producer: &BaseProducer<Context>) -> Option<MainQueue> {
        // SAFETY: the client handle is alive for the call (borrowed from `producer`); the queue
        // handle returned is ours, destroyed in `Drop`.
        let queue =
            unsafe { rdkafka::bindings::rd_kafka_queue_get_main(producer.client().native_ptr()) };
        NonNull::new(queue).map(MainQueue)
    }

    /// Whether no event is waiting.
    pub fn is_empty(&self) -> bool {
        // SAFETY: the handle is alive until `Drop`.
        unsafe { rdkafka::bindings::rd_kafka_queue_length(self.0.as_ptr()) == 0 }
    }

    /// From now on librdkafka writes a byte to `fd` (which must be non-blocking) whenever the
    /// queue stops being empty; `None` stops that, and must come before `fd` is closed.
    pub fn wake_on(&self, fd: Option<BorrowedFd<'_>>) {
        let fd = fd.map_or(-1, |fd| fd.as_raw_fd());
        // SAFETY: the handle is alive; librdkafka copies the one-byte payload.
        unsafe {
            rdkafka::bindings::rd_kafka_queue_io_event_enable(
                self.0.as_ptr(),
                fd,
                c"w".as_ptr().cast(),
                1,
            );
        }
    }
}

impl Drop for MainQueue {
    fn drop(&mut self) {
        // SAFETY: the handle came from rd_kafka_queue_get_main and is destroyed once, here.
        unsafe { rdkafka::bindings::rd_kafka_queue_destroy(self.0.as_ptr()) }
    }
}
