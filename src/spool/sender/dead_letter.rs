//! Permanent refusals: which failures Kafka will never accept, and the dead-letter file
//! those records go to.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use rdkafka::error::RDKafkaErrorCode;

use super::{Gone, Sender, State};
use crate::kafka::SendError;
use crate::kafka::delivery::Persisted;
use crate::spool::segment::Entry;
use crate::spool::{DEAD_LETTER_FILE, lock, unix_ms};

/// Why a record goes to the dead-letter file.
pub(super) struct Refusal {
    error: String,
    reason: String,
    status: u16,
    /// Kafka says the topic or partition does not exist: dead-lettered only once that has
    /// lasted `spool.missing_grace`.
    missing: Missing,
}

/// What Kafka says does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Missing {
    Nothing,
    Topic,
    Partition,
}

impl Sender {
    /// Whether record `i`, refused with `refusal`, is to be retried rather than dead-lettered:
    /// its topic or partition has been missing for less than `spool.missing_grace`.
    pub(super) fn waits(&mut self, i: usize, refusal: &Refusal) -> bool {
        let (entry, sent) = (&self.window[i].entry, self.window[i].sent);
        let partition = match refusal.missing {
            Missing::Nothing => return false,
            Missing::Topic => None,
            Missing::Partition => entry.partition,
        };
        let grace = self.inner.config.missing_grace;
        let now = tokio::time::Instant::now();
        let list = self.missing.entry(entry.topic.clone()).or_default();
        let at = match list.iter().position(|g| g.partition == partition) {
            Some(at) => at,
            None => {
                list.push(Gone {
                    partition,
                    since: now,
                    last: now,
                });
                list.len() - 1
            }
        };
        let gone = &mut list[at];
        let quiet = quiet(grace, self.inner.config.retry_backoff_max, self.attempt_max);
        if sent.saturating_duration_since(gone.last) > quiet {
            gone.since = now;
        }
        gone.last = now;
        now.duration_since(gone.since) < grace
    }

    /// Record `i` was delivered: its topic and partition exist.
    pub(super) fn found(&mut self, i: usize) {
        if self.missing.is_empty() {
            return;
        }
        let entry = &self.window[i].entry;
        if let Some(list) = self.missing.get_mut(&entry.topic) {
            list.retain(|g| g.partition.is_some() && g.partition != entry.partition);
            if list.is_empty() {
                self.missing.remove(&entry.topic);
            }
        }
    }

    /// Why record `i` is retried after `refusal`.
    pub(super) fn missing_why(&self, refusal: &Refusal) -> String {
        format!(
            "{} (dead-lettered if still so after spool.missing_grace, {:?})",
            refusal.reason, self.inner.config.missing_grace
        )
    }

    /// Writes record `i` to the dead-letter file (fsynced) and marks it done; if the file cannot
    /// be written, the record is retried instead. Whether it was written.
    pub(super) async fn dead_letter(&mut self, i: usize, refusal: Refusal) -> bool {
        let f = &self.window[i];
        let line = dead_letter_line(&f.entry, &refusal, f.attempts);
        let inner = self.inner.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _gate = lock(&inner.fs_gate);
            if inner.dead.load(Ordering::Acquire) {
                return Err(io::Error::other("spool closed"));
            }
            let path = inner.dir.join(DEAD_LETTER_FILE);
            append_line(&path, &line)
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
                self.count_outcome(i, Some(&refusal.error));
                self.set_state(i, State::Done);
                true
            }
            Err(error) => {
                // The record goes back to Kafka, and may yet be delivered (a topic created, an
                // ACL granted): no dead-letter write may come to clear a fault of its own. The
                // writer's probe, in the same directory, tells when the disk takes writes again.
                self.inner.disk_error("dead-letter file", &error);
                self.retry(i, "dead-letter file not writable");
                false
            }
        }
    }
}

/// Appends `line` (which ends in a newline) to the file at `path`, fsynced. A line an earlier
/// write left cut short (a crash, a full disk) is ended first, so this one is not glued to it;
/// a write that fails is cut off again, so it leaves no part of its line behind.
fn append_line(path: &std::path::Path, line: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        file.read_exact_at(&mut last, len - 1)?;
    }
    let written = (|| {
        if last[0] != b'\n' {
            file.write_all(b"\n")?;
        }
        file.write_all(line)?;
        file.sync_data()?;
        // A file just made is durable only with its directory entry.
        match path.parent() {
            Some(dir) if len == 0 => crate::spool::recover::sync_dir(dir),
            _ => Ok(()),
        }
    })();
    if written.is_err() {
        let _ = file.set_len(len);
    }
    written
}

/// A permanent refusal, per [`crate::error::delivery_status`]: unknown topic, not authorized,
/// invalid record; and too large even when an earlier attempt may have landed (a client is told
/// 504 then, but a retry from the spool could never succeed). Everything else is retried.
pub(super) fn refusal_of_delivery(
    error: RDKafkaErrorCode,
    persisted: Persisted,
) -> Option<Refusal> {
    let status = match crate::error::too_large(error) {
        true => StatusCode::PAYLOAD_TOO_LARGE,
        false => crate::error::delivery_status(error, persisted),
    };
    // A topic or partition librdkafka does not see may come back (see `spool.missing_grace`).
    let missing = match (error, persisted) {
        (RDKafkaErrorCode::UnknownPartition, Persisted::No) => Missing::Partition,
        (
            RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition,
            Persisted::No,
        ) => Missing::Topic,
        _ => Missing::Nothing,
    };
    let permanent = [
        StatusCode::PAYLOAD_TOO_LARGE,
        StatusCode::NOT_FOUND,
        StatusCode::FORBIDDEN,
        StatusCode::BAD_REQUEST,
    ];
    let gone = missing != Missing::Nothing;
    (gone || permanent.contains(&status)).then(|| Refusal {
        error: format!("{error:?}"),
        reason: error.to_string(),
        status: if gone { 404 } else { status.as_u16() },
        missing,
    })
}

pub(super) fn refusal_of_send(error: &SendError) -> Option<Refusal> {
    match error {
        SendError::TooBig => Some(Refusal {
            error: "TooBig".into(),
            reason: "record larger than the producer queue".into(),
            status: StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
            missing: Missing::Nothing,
        }),
        SendError::Refused { error, .. } => refusal_of_delivery(*error, Persisted::No),
        SendError::QueueFull | SendError::Fatal | SendError::Credentials | SendError::Closed => {
            None
        }
    }
}

/// How long after a record's last "missing" refusal a send of it finds a new outage (the topic
/// may have come back in between), with a grace of its own. While an outage lasts, a refused
/// record is sent again at most `backoff_max` after its refusal; but an attempt in between may
/// end otherwise, after as long as `attempt_max` (librdkafka's message timeout: it allows 30 s
/// for a topic's metadata to show it missing, and a shorter timeout ends the attempt first),
/// and be retried after another backoff. Without those, every refusal would start the grace
/// again, for ever.
fn quiet(grace: Duration, backoff_max: Duration, attempt_max: Duration) -> Duration {
    grace.max(backoff_max.saturating_mul(2).saturating_add(attempt_max))
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
    // As the record was sent: a client's own `kafboy-id` gave way to the spool's (`id`).
    let headers: Vec<serde_json::Value> = entry
        .headers
        .iter()
        .filter(|(name, _)| name != crate::spool::ID_HEADER)
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
    fn an_outage_lasts_across_an_attempt_that_timed_out() {
        let s = Duration::from_secs;
        // A grace of 15 s, retries at most 5 s apart, attempts of up to 20 s: a refusal, an
        // attempt that times out 20 s later, and a refusal again 30 s after the first are one
        // outage (they were 15 s apart at most before, and the grace started again each time).
        assert_eq!(quiet(s(15), s(5), s(20)), s(30));
        // The grace when it is longer (the defaults: 5 min, 5 s, 2 min).
        assert_eq!(quiet(s(300), s(5), s(120)), s(300));
    }

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
        for (error, missing) in [
            (E::UnknownTopic, Missing::Topic),
            (E::UnknownTopicOrPartition, Missing::Topic),
            (E::UnknownPartition, Missing::Partition),
            (E::TopicAuthorizationFailed, Missing::Nothing),
        ] {
            let refusal = refusal_of_delivery(error, Persisted::No).unwrap();
            assert_eq!(refusal.missing, missing, "{error:?}");
        }
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
            headers: vec![
                ("h".into(), Some(Bytes::from_static(&[0xff, 0x00]))),
                // A client's: the record went with the spool's id instead.
                (
                    crate::spool::ID_HEADER.into(),
                    Some(Bytes::from_static(b"forged")),
                ),
            ],
            value: Bytes::from_static(&[0xc3, 0x28]),
        };
        let refusal = Refusal {
            error: "MessageSizeTooLarge".into(),
            reason: "too large".into(),
            status: 413,
            missing: Missing::Nothing,
        };
        let line = dead_letter_line(&entry, &refusal, 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["id"], "0000000000000001-0000000000000005");
        assert_eq!(v["value"], "c328");
        assert_eq!(v["value_encoding"], "hex");
        assert_eq!(v["key"], "k");
        assert_eq!(v["headers"][0]["value"], "ff00");
        assert_eq!(v["headers"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["status"], 413);
    }
}
