//! The one module that calls librdkafka directly: for the message status that rust-rdkafka's
//! `FutureProducer` throws away (it is what tells "definitely not written" (503) from "maybe
//! written" (504)), for the per-record tag handed through librdkafka, for a flush that keeps
//! librdkafka's flushing state on, and for the main-queue wake-up the `poller` thread sleeps on.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::util::IntoOpaque;

use super::delivery::{Context, Persisted, Waiter};

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

/// Whether a failed record may have been written, from librdkafka's message status.
pub fn persisted(message: &BorrowedMessage<'_>) -> Persisted {
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

/// How long ago librdkafka took `message` in. Its reports give this for a failed record too,
/// where they give no timestamp.
pub fn age(message: &BorrowedMessage<'_>) -> Option<std::time::Duration> {
    // SAFETY: as in `persisted`; rd_kafka_message_latency only reads the message.
    let micros = unsafe { rdkafka::bindings::rd_kafka_message_latency(message.ptr()) };
    u64::try_from(micros)
        .ok()
        .map(std::time::Duration::from_micros)
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
