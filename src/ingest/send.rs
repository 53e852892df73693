//! From checked records to the spool or a producer: the size check, the hand-over
//! ([`enqueue`]), and the answer that waits for acknowledgements on the sync modes
//! ([`Queued::answer`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::Mode;
use crate::decode::BodyKind;
use crate::error::IngestError;
use crate::kafka::delivery::Outcome;
use crate::kafka::metadata::TopicInfo;
use crate::kafka::{Record, Report};
use crate::record::RecordMeta;
use crate::reply::{Reply, await_acks};
use crate::routes::Route;
use crate::spool::SpoolError;
use crate::state::AppState;

/// The records of a request, partitions chosen, each checked against
/// `kafka.message_max_bytes` (with the id header the spool adds, when spooled): everything
/// that can refuse them before any is queued.
pub(super) fn records_for(
    app: &AppState,
    route: &Route,
    mode: Mode,
    topic: &str,
    info: &TopicInfo,
    meta: RecordMeta,
    values: Vec<Bytes>,
) -> Result<Vec<Record>, IngestError> {
    let strategy = app.partitioner_for(route, topic);
    let records = meta.into_records(values, strategy, info)?;
    let (added, with) = if spooled(app, route, mode) {
        (
            crate::spool::ID_HEADER_WIRE_BYTES,
            ", framing and the spool's id header",
        )
    } else {
        (0, " and framing")
    };
    if let Some((i, size)) = records
        .iter()
        .map(|r| r.wire_size() + added)
        .enumerate()
        .find(|&(_, size)| size > app.message_max_bytes)
    {
        return Err(IngestError::TooLarge(format!(
            "record {} takes {size} bytes with its key, headers{with}; \
             kafka.message_max_bytes is {}",
            i + 1,
            app.message_max_bytes
        )));
    }
    Ok(records)
}

/// Whether the records of this request go to the disk spool rather than straight to a producer.
pub(super) fn spooled(app: &AppState, route: &Route, mode: Mode) -> bool {
    route.spool && matches!(mode, Mode::Async | Mode::BatchAsync) && app.spool.is_some()
}

/// Records handed over, to the spool or a producer's queue.
pub(super) enum Queued {
    /// Nothing more to wait for.
    Accepted(usize),
    /// On a sync mode: the acknowledgements to wait for.
    Acks {
        topic: String,
        receivers: Vec<oneshot::Receiver<Outcome>>,
        list: bool,
    },
}

impl Queued {
    /// The answer: at once on the async modes, once acknowledged (or at `sync_timeout`) on the
    /// sync ones.
    pub(super) async fn answer(self, app: &AppState) -> Result<Reply, IngestError> {
        match self {
            Queued::Accepted(count) => Ok(Reply::Accepted(count)),
            Queued::Acks {
                topic,
                receivers,
                list,
            } => {
                let written = await_acks(receivers, app.server.sync_timeout).await?;
                Ok(Reply::Acked {
                    topic,
                    written,
                    list,
                })
            }
        }
    }
}

/// What else stands behind a request's answer, for what [`enqueue`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stake {
    /// Nothing: the answer is the records' outcome.
    Own,
    /// A full queue's refusal may yet be served by a peer: the caller counts the drop if none
    /// does.
    PeerMayTake,
    /// A peer forwarded the request here: a refusal it declines (`503`, and the others that
    /// write nothing) it serves itself, and counts the drop if it cannot.
    Forwarded,
    /// The client was answered already (a hook's reply): a record that fails is lost.
    Replied,
}

/// A spool append's records, counted when its outcome comes: accepted, or dropped.
struct Appended {
    accepted: metrics::Counter,
    label: Arc<str>,
    total: Arc<AtomicU64>,
    count: usize,
}

impl Appended {
    fn count(self, done: Result<(), SpoolError>) -> Result<(), IngestError> {
        let n = self.count as u64;
        match done {
            Ok(()) => {
                count_accepted(&self.accepted, &self.total, n);
                Ok(())
            }
            Err(error) => {
                crate::metrics::dropped(&self.label, error.reason(), n);
                Err(error.into())
            }
        }
    }
}

/// `n` records accepted: in `/metrics` (the topic's counter) and on the status page.
fn count_accepted(counter: &metrics::Counter, total: &AtomicU64, n: u64) {
    counter.increment(n);
    total.fetch_add(n, Ordering::Relaxed);
}

/// Hands `records` to the spool (on a spooled async route) or the producer of `mode`. Records
/// refused are counted as dropped, except as `stake` says.
#[allow(clippy::too_many_arguments)]
pub(super) async fn enqueue(
    app: &AppState,
    route: &Route,
    mode: Mode,
    topic: String,
    records: Vec<Record>,
    kind: BodyKind,
    stake: Stake,
) -> Result<Queued, IngestError> {
    let count = records.len();
    if spooled(app, route, mode)
        && let Some(spool) = &app.spool
    {
        let counters = app.topic_metrics.get(&topic);
        let appending = spool.submit(&topic, &records).inspect_err(|error| {
            crate::metrics::dropped(&counters.label, error.reason(), count as u64);
        })?;
        let outcome = Appended {
            accepted: counters.accepted.clone(),
            label: counters.label.clone(),
            total: app.stats.accepted.clone(),
            count,
        };
        let mut confirmed = Box::pin(appending.confirmed());
        // A disk that hangs answers nothing, not even an error: the client is not held past
        // `sync_timeout`. The write may still complete, and its records be sent (504); they
        // are counted when it does, so that what is delivered was accepted first.
        return match tokio::time::timeout(app.server.sync_timeout, &mut confirmed).await {
            Ok(done) => outcome.count(done).map(|()| Queued::Accepted(count)),
            Err(_) => {
                tokio::spawn(async move {
                    let _ = outcome.count(confirmed.await);
                });
                Err(IngestError::Unknown(format!(
                    "the spool did not confirm the write within {:?}; the records may have been written",
                    app.server.sync_timeout
                )))
            }
        };
    }
    let sync = matches!(mode, Mode::Sync | Mode::BatchSync);
    let report = match (sync, stake) {
        (false, _) => Report::None,
        (true, Stake::Replied) => Report::AfterReply,
        (true, _) => Report::Caller,
    };
    let producer = app.producers.for_mode(mode, &topic);
    let counters = app.topic_metrics.get(&topic);
    let receivers = match producer
        .send(&topic, records, report, app.server.enqueue_timeout)
        .await
    {
        Ok(receivers) => receivers,
        Err(error) => {
            // Records queued before a refusal are on their way; only the rest were dropped.
            let queued = match &error {
                crate::kafka::SendError::Refused { accepted, error } => {
                    // The producer knows the topic differently from the cache (deleted, or
                    // recreated with fewer partitions): the cache catches up now, not at its
                    // next refresh.
                    if matches!(
                        error,
                        rdkafka::types::RDKafkaErrorCode::UnknownPartition
                            | rdkafka::types::RDKafkaErrorCode::UnknownTopic
                            | rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                    ) {
                        app.producers.topics.refresh_soon();
                    }
                    *accepted
                }
                _ => 0,
            };
            count_accepted(&counters.accepted, &app.stats.accepted, queued as u64);
            let reason = error.reason();
            let full = matches!(error, crate::kafka::SendError::QueueFull);
            let failure = IngestError::from(error);
            let counted_elsewhere = match stake {
                Stake::PeerMayTake => full,
                Stake::Forwarded => crate::cluster::declined(failure.status()),
                Stake::Own | Stake::Replied => false,
            };
            if !counted_elsewhere {
                crate::metrics::dropped(&counters.label, reason, (count - queued) as u64);
            }
            return Err(failure);
        }
    };
    count_accepted(&counters.accepted, &app.stats.accepted, count as u64);
    if !sync {
        return Ok(Queued::Accepted(count));
    }
    Ok(Queued::Acks {
        topic,
        receivers,
        list: kind == BodyKind::Ndjson,
    })
}
