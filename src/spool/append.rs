//! An append's records, encoded for the writer, and the writer's confirmation to come.

use rdkafka::message::Headers as _;
use tokio::sync::oneshot;

use super::SpoolError;
use super::segment::{self, FRAME_HEADER, Fields};
use crate::kafka::Record;

/// Records handed to the spool's writer ([`super::Spool::submit`]), not yet confirmed.
#[derive(Debug)]
pub struct Appending(pub(super) Option<oneshot::Receiver<Result<(), SpoolError>>>);

impl Appending {
    /// Once the records are fsynced: as [`super::Spool::append`].
    pub async fn confirmed(self) -> Result<(), SpoolError> {
        match self.0 {
            None => Ok(()),
            Some(answer) => answer.await.unwrap_or(Err(SpoolError::Closed)),
        }
    }
}

/// `records` for `topic` as the writer frames them, numbered and stamped later, and the bytes
/// they take in a segment; a record no segment can hold is [`SpoolError::TooLarge`].
pub(super) fn encode(
    origin: u64,
    topic: &str,
    records: &[Record],
) -> Result<(Vec<Vec<u8>>, u64), SpoolError> {
    let mut payloads = Vec::with_capacity(records.len());
    let mut bytes = 0u64;
    for r in records {
        let headers: Vec<(&str, Option<&[u8]>)> = r
            .headers
            .as_ref()
            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
            .unwrap_or_default();
        let fields = Fields {
            seq: 0,
            origin,
            appended_ms: 0,
            topic,
            key: r.key.as_deref(),
            partition: r.partition,
            value: &r.value,
        };
        let size = segment::payload_size(&fields, headers.iter().copied())
            .map_err(|e| SpoolError::TooLarge(e.to_string()))?;
        let mut payload = Vec::with_capacity(size);
        segment::encode_payload(&mut payload, &fields, headers.iter().copied());
        bytes += (FRAME_HEADER + payload.len()) as u64;
        payloads.push(payload);
    }
    Ok((payloads, bytes))
}
