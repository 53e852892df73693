//! What a request asks of its records besides the value: key, partition and headers, from the
//! query string or `X-Kafka-*` headers; and the records themselves, partition chosen.

use axum::http::HeaderName;
use axum::http::request::Parts;
use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};

use crate::config::Partitioner;
use crate::error::IngestError;
use crate::kafka::Record;
use crate::kafka::metadata::TopicInfo;
use crate::kafka::partition;

/// The record key, as a request header. Named once: a lookup by a `&str` parses the name first.
const KEY_HEADER: HeaderName = HeaderName::from_static("x-kafka-key");
/// The partition, as a request header.
const PARTITION_HEADER: HeaderName = HeaderName::from_static("x-kafka-partition");

/// Prefix of request headers copied into Kafka record headers.
const HEADER_PREFIX: &str = "x-kafka-header-";

/// Key, partition and headers asked for by query string or request headers.
pub struct RecordMeta {
    /// Record key.
    pub key: Option<Bytes>,
    /// Explicit partition.
    pub partition: Option<i32>,
    /// Record headers, name and value.
    pub headers: Vec<(String, Bytes)>,
}

impl RecordMeta {
    /// Reads `?key=`, `?partition=`, `X-Kafka-Key`, `X-Kafka-Partition` and
    /// `X-Kafka-Header-*`.
    pub fn from_parts(parts: &Parts) -> Result<RecordMeta, IngestError> {
        let mut query_key = None;
        let mut query_partition = None;
        if let Some(q) = parts.uri.query() {
            // Decoded to bytes, not strings: a key is any bytes, and `%FF` must stay 0xFF.
            for (name, value) in q
                .split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            {
                match form_decode(name).as_slice() {
                    b"key" => query_key = Some(Bytes::from(form_decode(value))),
                    b"partition" => query_partition = Some(form_decode(value)),
                    _ => {}
                }
            }
        }
        let header = |name: &HeaderName| parts.headers.get(name).map(|v| v.as_bytes());
        let key = match (query_key, header(&KEY_HEADER)) {
            (Some(q), Some(h)) if q != h => {
                return Err(IngestError::BadRequest(
                    "key given twice, differently".into(),
                ));
            }
            (Some(q), _) => Some(q),
            (None, h) => h.map(Bytes::copy_from_slice),
        };
        let partition = match (query_partition, header(&PARTITION_HEADER)) {
            (Some(q), _) => Some(parse_partition(&q)?),
            (None, Some(h)) => Some(parse_partition(h)?),
            (None, None) => None,
        };
        let headers = parts
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let name = name
                    .as_str()
                    .strip_prefix(HEADER_PREFIX)
                    .filter(|n| !n.is_empty())?;
                Some((name.to_string(), Bytes::copy_from_slice(value.as_bytes())))
            })
            .collect();
        Ok(RecordMeta {
            key,
            partition,
            headers,
        })
    }

    /// One record per value, with the partition chosen by `strategy` unless one was given.
    pub fn into_records(
        self,
        values: Vec<Bytes>,
        strategy: Partitioner,
        info: &TopicInfo,
    ) -> Result<Vec<Record>, IngestError> {
        // Negative too: librdkafka would read -1 as "no partition chosen" (a Rust hook may set it).
        if let Some(p) = self.partition
            && !(0..info.partitions).contains(&p)
        {
            return Err(IngestError::BadRequest(format!(
                "partition {p} out of range; the topic has {} partitions",
                info.partitions
            )));
        }
        values
            .into_iter()
            .map(|value| {
                let partition = match self.partition {
                    Some(p) => Some(p),
                    None => partition::choose(
                        strategy,
                        self.key.as_deref(),
                        info.partitions,
                        &info.rotation,
                    )
                    .map_err(|_| {
                        IngestError::BadRequest(
                            "this route partitions by key: send ?key= or X-Kafka-Key".into(),
                        )
                    })?,
                };
                Ok(Record {
                    key: self.key.clone(),
                    partition,
                    headers: self.owned_headers(),
                    value,
                })
            })
            .collect()
    }

    fn owned_headers(&self) -> Option<OwnedHeaders> {
        if self.headers.is_empty() {
            return None;
        }
        let mut owned = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            owned = owned.insert(Header {
                key,
                value: Some(&value[..]),
            });
        }
        Some(owned)
    }
}

/// `application/x-www-form-urlencoded` decoding of one query component: `+` is a space, `%XX` a
/// byte.
fn form_decode(component: &str) -> Vec<u8> {
    let spaced = component.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced).collect()
}

fn parse_partition(raw: &[u8]) -> Result<i32, IngestError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p >= 0)
        .ok_or_else(|| IngestError::BadRequest("partition must be a non-negative integer".into()))
}
