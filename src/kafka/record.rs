//! A record as kafboy hands it to librdkafka, and what it counts of it: its room in the queue
//! accounting and its size on the wire.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};

/// One record ready to produce. The value is a slice of the request body.
#[derive(Debug, Clone)]
pub struct Record {
    /// Record key.
    pub key: Option<Bytes>,
    /// Partition, or `None` for librdkafka's choice.
    pub partition: Option<i32>,
    /// Record headers, one copy for all the records of a request: librdkafka gets a copy of
    /// its own for each record only as the record is handed over, once the record's room in
    /// the queue (headers included) is taken. Copies made earlier would be outside every limit:
    /// 10,000 records with 60 KiB of headers each are 600 MB.
    pub headers: Option<Arc<OwnedHeaders>>,
    /// Record value.
    pub value: Bytes,
    /// For a record sent again after a fenced producer's brokers refused it: when it was first
    /// handed to librdkafka. `None` for every other record, which librdkafka stamps itself.
    pub first: Option<First>,
}

/// When a record was first handed to librdkafka, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct First {
    /// Its time as librdkafka stamped it (CreateTime, ms since the epoch, to the millisecond):
    /// the time it keeps when sent again.
    pub stamp: i64,
    /// The same moment on the monotonic clock, which the age that gives a record up is
    /// measured on: a step of the wall clock must not expire kept records, nor keep them.
    pub at: Instant,
}

impl Record {
    /// Bytes the record holds in kafboy's queue accounting: value, key and headers. Its
    /// delivery report gives back as many ([`super::delivery::record_bytes`]).
    pub fn queued_bytes(&self) -> usize {
        use rdkafka::message::Headers;
        self.value.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.headers.as_ref().map_or(0, |h| header_bytes(h.iter()))
    }

    /// Bytes librdkafka counts against `message.max.bytes` for this record: value, key,
    /// headers with their varint lengths, and the most a record's framing can take. A record
    /// over the limit is refused by librdkafka when it is handed over, after the records before
    /// it in the same request were queued; checked first, nothing of the request is queued.
    pub fn wire_size(&self) -> usize {
        use rdkafka::message::Headers;
        // Length, attributes, timestamp delta, offset delta, key length, value length and
        // header count at their widest (librdkafka's RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD).
        const MAX_OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;
        let varint = |n: usize| {
            let zigzag = (n as u64) << 1;
            1 + (63 - (zigzag | 1).leading_zeros() as usize) / 7
        };
        let headers: usize = self.headers.as_ref().map_or(0, |h| {
            h.iter()
                .map(|h| {
                    let value = h.value.map_or(0, <[u8]>::len);
                    h.key.len() + value + varint(h.key.len()) + varint(value)
                })
                .sum()
        });
        MAX_OVERHEAD + self.value.len() + self.key.as_ref().map_or(0, Bytes::len) + headers
    }
}

/// What librdkafka holds for each header besides its name and value: its `rd_kafka_header_t`
/// (three sizes and a pointer), the two terminating NULs, malloc's chunk header and rounding,
/// and the header list's slot. Measured at ~73 bytes: without it, records of many empty
/// headers held 35 times what the queue accounting counted (700 MB against 19 MB).
pub const HEADER_OVERHEAD: usize = 80;

/// Header names and values, in bytes, with librdkafka's own [`HEADER_OVERHEAD`] for each: what
/// the queue accounting counts of a record's headers.
pub fn header_bytes<'a>(headers: impl Iterator<Item = Header<'a, &'a [u8]>>) -> usize {
    headers
        .map(|h| HEADER_OVERHEAD + h.key.len() + h.value.map_or(0, <[u8]>::len))
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::error::RDKafkaErrorCode;
    use rdkafka::producer::BaseProducer;
    use rdkafka::producer::BaseRecord;
    use rdkafka::producer::DefaultProducerContext;

    /// librdkafka's own verdict on `record` under `message.max.bytes = limit` (no broker is
    /// needed: the size is checked when the record is handed over).
    fn librdkafka_takes(record: &Record, limit: usize) -> bool {
        let producer: BaseProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.max.bytes", limit.to_string())
            .create()
            .unwrap();
        let mut base = BaseRecord::<[u8], [u8]>::to("t").payload(&record.value[..]);
        if let Some(key) = &record.key {
            base = base.key(&key[..]);
        }
        if let Some(headers) = &record.headers {
            base = base.headers((**headers).clone());
        }
        match producer.send(base) {
            Ok(()) => true,
            Err((e, _)) => {
                assert_eq!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::MessageSizeTooLarge)
                );
                false
            }
        }
    }

    #[test]
    fn wire_size_is_what_librdkafka_counts() {
        const LIMIT: usize = 1000;
        /// Header name length and value length (`None`: a null value).
        type Headers = &'static [(usize, Option<usize>)];
        let shapes: [(usize, Headers); 4] = [
            (0, &[]),
            (5, &[]),
            (3, &[(4, Some(70))]),
            (70, &[(1, None), (80, Some(1)), (2, Some(0))]),
        ];
        for (key_len, headers) in shapes {
            let record = |value_len: usize| {
                let mut owned = OwnedHeaders::new();
                for (name_len, value_len) in headers {
                    let value = value_len.map(|n| vec![b'v'; n]);
                    owned = owned.insert(Header {
                        key: &"h".repeat(*name_len),
                        value: value.as_deref(),
                    });
                }
                Record {
                    key: (key_len > 0).then(|| Bytes::from(vec![b'k'; key_len])),
                    partition: None,
                    headers: (!headers.is_empty()).then(|| Arc::new(owned)),
                    value: Bytes::from(vec![b'x'; value_len]),
                    first: None,
                }
            };
            let fits = LIMIT - record(0).wire_size();
            assert_eq!(record(fits).wire_size(), LIMIT);
            assert!(
                librdkafka_takes(&record(fits), LIMIT),
                "{key_len} {headers:?}"
            );
            assert!(
                !librdkafka_takes(&record(fits + 1), LIMIT),
                "{key_len} {headers:?}"
            );
        }
    }
}
