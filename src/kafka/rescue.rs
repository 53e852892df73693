//! Records that a fenced producer's brokers refused after their clients had a `202`: kept, and
//! sent again through the producer that replaces it. The brokers refused them, so nothing of
//! them was written and sending them again cannot duplicate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Message};

use super::delivery::Report;
use super::producer::Producer;
use super::record::Record;
use super::slot::Shared;
use crate::lock;

/// A slot's refused records, in the order their reports came.
#[derive(Debug, Default)]
pub struct Rescue(Mutex<Vec<(String, Record)>>);

impl Rescue {
    /// Keeps a copy of `message`, bound to the partition it was refused for (so that keyed
    /// records stay where their key put them).
    pub fn keep(&self, message: &BorrowedMessage<'_>) {
        let record = Record {
            key: message.key().map(Bytes::copy_from_slice),
            partition: Some(message.partition()),
            headers: message.headers().map(|h| Arc::new(h.detach())),
            value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        };
        lock(&self.0).push((message.topic().to_string(), record));
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }

    /// Sends the kept records through `to`, in the order they were kept. A new producer gets
    /// them before any request can reach it, so they keep their place ahead of later records.
    /// Called off the async workers (it waits for each send, which finds room at once).
    pub fn resend(&self, to: &Producer, shared: &Shared) {
        let kept = std::mem::take(&mut *lock(&self.0));
        if kept.is_empty() {
            return;
        }
        let (count, mut lost) = (kept.len(), 0);
        let runtime = tokio::runtime::Handle::current();
        for (topic, record) in kept {
            let sent = to.send(&topic, vec![record], Report::None, Duration::ZERO);
            // Refused (a shutdown under way, a queue that filled): lost after its 202.
            if runtime.block_on(sent).is_err() {
                lost += 1;
                shared.count_lost(&topic, "ProducerFenced");
            }
        }
        tracing::warn!(producer = %to.name(), count, lost, "records refused to a fenced producer sent again");
    }
}
