//! What a request asks of its records besides the value: key, partition and headers, from the
//! query string or `X-Kafka-*` headers; and the records themselves, partition chosen.

use std::sync::Arc;

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

/// One value given any number of times, all the same.
#[derive(Default)]
struct Agreed<T>(Option<T>);

impl<T: PartialEq> Agreed<T> {
    fn add(&mut self, value: T, what: &str) -> Result<(), IngestError> {
        match &self.0 {
            Some(seen) if *seen != value => Err(IngestError::BadRequest(format!(
                "{what} given twice, differently"
            ))),
            Some(_) => Ok(()),
            None => {
                self.0 = Some(value);
                Ok(())
            }
        }
    }
}

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
    /// A key or partition may be given more than once (query string, header, repeated) only
    /// if every occurrence says the same: the record must not go where part of the request did
    /// not ask.
    pub fn from_parts(parts: &Parts) -> Result<RecordMeta, IngestError> {
        let mut key = Agreed::default();
        let mut partition = Agreed::default();
        if let Some(q) = parts.uri.query() {
            // Decoded to bytes, not strings: a key is any bytes, and `%FF` must stay 0xFF.
            for (name, value) in q
                .split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            {
                match form_decode(name).as_slice() {
                    b"key" => key.add(Bytes::from(form_decode(value)), "key")?,
                    b"partition" => {
                        partition.add(parse_partition(&form_decode(value))?, "partition")?
                    }
                    _ => {}
                }
            }
        }
        for value in parts.headers.get_all(&KEY_HEADER) {
            key.add(Bytes::copy_from_slice(value.as_bytes()), "key")?;
        }
        for value in parts.headers.get_all(&PARTITION_HEADER) {
            partition.add(parse_partition(value.as_bytes())?, "partition")?;
        }
        let (key, partition) = (key.0, partition.0);
        let mut headers = Vec::new();
        for (name, value) in &parts.headers {
            let Some(name) = name.as_str().strip_prefix(HEADER_PREFIX) else {
                continue;
            };
            // Dropping it would answer 2xx for a record without the header the client sent.
            if name.is_empty() {
                return Err(IngestError::BadRequest(
                    "X-Kafka-Header- without a record header name".into(),
                ));
            }
            headers.push((name.to_string(), Bytes::copy_from_slice(value.as_bytes())));
        }
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
            if (0..info.added).contains(&p) {
                return Err(IngestError::Unavailable(format!(
                    "partition {p} was just added; kafboy writes to it from its next metadata refresh"
                )));
            }
            return Err(IngestError::BadRequest(format!(
                "partition {p} out of range; the topic has {} partitions",
                info.partitions
            )));
        }
        let headers = self.owned_headers().map(Arc::new);
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
                    headers: headers.clone(),
                    value,
                    first: None,
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
        // Spaces and tabs around it, as the README says; not a newline or a no-break space.
        .and_then(|s| s.trim_matches([' ', '\t']).parse::<i32>().ok())
        .filter(|p| *p >= 0)
        .ok_or_else(|| IngestError::BadRequest("partition must be a non-negative integer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uri: &str, headers: &[(&str, &str)]) -> Result<RecordMeta, IngestError> {
        let mut request = axum::http::Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        RecordMeta::from_parts(&request.body(()).unwrap().into_parts().0)
    }

    #[test]
    fn a_key_or_partition_given_twice_must_agree() {
        let m = meta(
            "/a?key=k&partition=1",
            &[("x-kafka-key", "k"), ("x-kafka-partition", "01")],
        );
        let m = m.unwrap();
        assert_eq!((m.key.as_deref(), m.partition), (Some(&b"k"[..]), Some(1)));
        for (uri, headers) in [
            ("/a?key=a&key=b", &[][..]),
            ("/a", &[("x-kafka-key", "a"), ("x-kafka-key", "b")][..]),
            ("/a?key=a", &[("x-kafka-key", "b")][..]),
            ("/a?partition=1", &[("x-kafka-partition", "2")][..]),
            ("/a?partition=1&partition=2", &[][..]),
            (
                "/a",
                &[("x-kafka-partition", "1"), ("x-kafka-partition", "2")][..],
            ),
        ] {
            let err = meta(uri, headers).err().expect(uri);
            assert!(
                err.to_string().contains("given twice, differently"),
                "{uri} {headers:?}: {err}"
            );
        }
        // A bad value is refused wherever it is, even beside a good one.
        let err = meta("/a?partition=1", &[("x-kafka-partition", "abc")])
            .err()
            .unwrap();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_partition_is_digits_with_spaces_around_at_most() {
        for (given, want) in [
            ("1", Some(1)),
            ("%201%20", Some(1)),
            ("+1", Some(1)),
            ("01", Some(1)),
        ] {
            let got = meta(&format!("/a?partition={given}"), &[])
                .ok()
                .and_then(|m| m.partition);
            assert_eq!(got, want, "{given}");
        }
        for bad in ["1%0A", "%C2%A01", "1e0", "-1", ""] {
            assert!(meta(&format!("/a?partition={bad}"), &[]).is_err(), "{bad}");
        }
    }

    #[test]
    fn record_headers_need_a_name() {
        let m = meta("/a", &[("x-kafka-header-source", "web"), ("x-other", "1")]).unwrap();
        assert_eq!(m.headers, [("source".to_string(), Bytes::from("web"))]);
        let err = meta("/a", &[("x-kafka-header-", "v")]).err().unwrap();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
    }
}
