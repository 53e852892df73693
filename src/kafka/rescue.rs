//! Records that a fenced producer's brokers refused after their clients had a `202`: kept, and
//! sent again through the producer that replaces it. The brokers refused them, so nothing of
//! them was written and sending them again cannot duplicate. A record keeps its first time
//! through every resend, and fails once it is older than `kafka.message_timeout`: brokers that
//! keep fencing cannot keep it going round for ever.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Message};

use super::delivery::Report;
use super::producer::{Producer, SendError};
use super::record::{First, Record};
use crate::lock;

/// A slot's refused records, in the order their reports came, each with its topic.
#[derive(Debug, Default)]
pub struct Rescue(Mutex<VecDeque<(String, Record)>>);

/// librdkafka's name for a record that outlived `message.timeout.ms`, as its reports give it.
const TIMED_OUT: &str = "MessageTimedOut";

impl Rescue {
    /// Keeps a copy of `message`, bound to the partition it was refused for (so that keyed
    /// records stay where their key put them), with the time it was first handed over: `first`
    /// for a record sent again, else when librdkafka took it in.
    pub fn keep(&self, message: &BorrowedMessage<'_>, first: Option<First>) {
        let taken = || {
            let age = super::ffi::age(message).unwrap_or_default();
            let now = Instant::now();
            First {
                stamp: crate::unix_ms() as i64 - age.as_millis() as i64,
                at: now.checked_sub(age).unwrap_or(now),
            }
        };
        let record = Record {
            key: message.key().map(Bytes::copy_from_slice),
            partition: Some(message.partition()),
            headers: message.headers().map(|h| Arc::new(h.detach())),
            value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            first: Some(first.unwrap_or_else(taken)),
        };
        lock(&self.0).push_back((message.topic().to_string(), record));
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }

    /// Whether no record is kept.
    pub fn is_empty(&self) -> bool {
        lock(&self.0).is_empty()
    }

    /// Sends the kept records through `to`, in the order they were kept. A new producer gets
    /// them before any request can reach it, so they keep their place ahead of later records.
    /// What `to` does not take now (a shutdown began, its queue is full, it failed) stays kept,
    /// for the next try or the shutdown's count. A record first handed over more than
    /// `message_timeout` ago fails as a record librdkafka timed out would, and is not sent
    /// again. (One sent again gets librdkafka's whole timeout anew: it may still be refused
    /// once more up to twice that after it was first handed over, and is given up at the next
    /// resend.) Blocks: for a blocking thread of the runtime.
    pub fn resend(&self, to: &Producer, message_timeout: Duration) {
        let mut kept = lock(&self.0);
        if kept.is_empty() {
            return;
        }
        let runtime = tokio::runtime::Handle::current();
        let (mut sent, mut lost, mut expired) = (0, 0, 0);
        while let Some((topic, record)) = kept.front() {
            if record
                .first
                .is_some_and(|f| f.at.elapsed() > message_timeout)
            {
                expired += 1;
                to.count_lost(topic, TIMED_OUT);
                kept.pop_front();
                continue;
            }
            // A copy (shared bytes): the record stays kept until `to` has taken it.
            let sending = to.send(topic, vec![record.clone()], Report::None, Duration::ZERO);
            match runtime.block_on(sending) {
                Ok(_) => sent += 1,
                Err(
                    SendError::Closed
                    | SendError::QueueFull
                    | SendError::Fatal
                    | SendError::Credentials,
                ) => break,
                // Refused for what it is (too large, a partition gone): it would be refused
                // again. Counted under librdkafka's name for it, as a failed report is.
                Err(e) => {
                    lost += 1;
                    let reason = match e {
                        SendError::Refused { error, .. } => format!("{error:?}"),
                        other => other.reason().to_string(),
                    };
                    to.count_lost(topic, &reason);
                }
            }
            kept.pop_front();
        }
        // Not a line per try while `to` has no room.
        if sent + lost + expired > 0 {
            let left = kept.len();
            tracing::warn!(producer = %to.name(), sent, lost, expired, left, "records refused to a fenced producer sent again");
        }
    }
}
