//! The produce handler: request → records → producer → reply. Cheap checks come first (topic name,
//! allowlist, content type, declared length, metadata), so a bad request costs no body read and
//! never reaches Kafka.

use std::sync::Arc;

use axum::RequestPartsExt;
use axum::body::Body;
use axum::extract::{RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::Mode;
use crate::decode::{self, BodyKind};
use crate::error::{IngestError, RecordReport, delivery_status};
use crate::kafka::Record;
use crate::kafka::delivery::{Outcome, Persisted};
use crate::kafka::metadata::{LookupError, TopicInfo};
use crate::kafka::partition;
use crate::routes::{Route, TopicSource, validate_topic};
use crate::server::AppState;

/// Prefix of request headers copied into Kafka record headers.
const HEADER_PREFIX: &str = "x-kafka-header-";

/// What a successful request answers.
#[derive(Debug)]
pub enum Reply {
    /// 202: queued, not yet delivered.
    Accepted(usize),
    /// 200: every record acknowledged.
    Acked {
        /// Topic written.
        topic: String,
        /// Partition and offset of each record, in request order.
        written: Vec<(i32, i64)>,
        /// Answer with a `records` list even for one record (NDJSON bodies).
        list: bool,
    },
}

/// Serves one produce request on `route`.
pub async fn handle(app: Arc<AppState>, route: Arc<Route>, request: Request) -> Response {
    match ingest(&app, &route, request).await {
        Ok(reply) => reply.into_response(),
        Err(error) => {
            let status = error.status();
            if status.is_server_error() {
                tracing::warn!(path = %route.path, %status, %error, "request failed");
            } else {
                tracing::debug!(path = %route.path, %status, %error, "request refused");
            }
            error.into_response()
        }
    }
}

async fn ingest(app: &AppState, route: &Route, request: Request) -> Result<Reply, IngestError> {
    let (mut parts, body) = request.into_parts();
    let topic = topic_of(route, &mut parts).await?;
    validate_topic(&topic).map_err(|e| IngestError::BadRequest(e.into()))?;
    if !app.allow.allows(&topic) {
        return Err(IngestError::UnknownTopic(topic));
    }
    if app.shutting_down() {
        return Err(IngestError::Unavailable("shutting down".into()));
    }
    let meta = RecordMeta::from_parts(&parts)?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = BodyKind::of(route.payload, content_type)?;
    let limit = app.server.max_body_bytes;
    if declared_length(&parts).is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let info = app
        .producers
        .topics
        .lookup(&topic)
        .await
        .map_err(|e| match e {
            LookupError::Unknown => IngestError::UnknownTopic(topic.clone()),
            LookupError::Unavailable(why) => {
                IngestError::Unavailable(format!("kafka metadata: {why}"))
            }
        })?;
    let body = read_body(body, limit).await?;
    let values = decode::decode(kind, body, app.server.max_records)?;
    let strategy = app.partitioner_for(route, &topic);
    let records = meta.into_records(values, strategy, &info)?;
    let count = records.len();
    let sync = matches!(route.mode, Mode::Sync | Mode::BatchSync);
    let producer = app.producers.for_mode(route.mode, &topic);
    let receivers = producer
        .send(&topic, records, sync, app.server.enqueue_timeout)
        .await?;
    if !sync {
        return Ok(Reply::Accepted(count));
    }
    let list = kind == BodyKind::Ndjson;
    let written = await_acks(receivers, app.server.sync_timeout).await?;
    Ok(Reply::Acked {
        topic,
        written,
        list,
    })
}

async fn topic_of(route: &Route, parts: &mut Parts) -> Result<String, IngestError> {
    match &route.topic {
        TopicSource::Fixed(topic) => Ok(topic.clone()),
        TopicSource::Path => {
            let params = parts
                .extract::<RawPathParams>()
                .await
                .map_err(|e| IngestError::BadRequest(format!("topic: {}", e.body_text())))?;
            params
                .iter()
                .find(|(name, _)| *name == "topic")
                .map(|(_, value)| value.to_string())
                .ok_or_else(|| IngestError::BadRequest("no topic in path".into()))
        }
    }
}

fn declared_length(parts: &Parts) -> Option<usize> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn too_large(limit: usize) -> IngestError {
    IngestError::TooLarge(format!("body larger than {limit} bytes"))
}

/// Reads the whole body, refusing it as soon as it passes `limit` (chunked bodies included).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, IngestError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over {
            too_large(limit)
        } else {
            IngestError::BadRequest(format!("reading body: {e}"))
        }
    })
}

/// Key, partition and headers asked for by query string or request headers.
struct RecordMeta {
    key: Option<Bytes>,
    partition: Option<i32>,
    headers: Vec<(String, Bytes)>,
}

impl RecordMeta {
    fn from_parts(parts: &Parts) -> Result<RecordMeta, IngestError> {
        let mut query_key = None;
        let mut query_partition = None;
        if let Some(q) = parts.uri.query() {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q)
                .map_err(|e| IngestError::BadRequest(format!("query string: {e}")))?;
            for (name, value) in pairs {
                match name.as_str() {
                    "key" => query_key = Some(Bytes::from(value)),
                    "partition" => query_partition = Some(value),
                    _ => {}
                }
            }
        }
        let header = |name: &str| parts.headers.get(name).map(|v| v.as_bytes());
        let key = match (query_key, header("x-kafka-key")) {
            (Some(q), Some(h)) if q != h => {
                return Err(IngestError::BadRequest(
                    "key given twice, differently".into(),
                ));
            }
            (Some(q), _) => Some(q),
            (None, h) => h.map(Bytes::copy_from_slice),
        };
        let partition = match (query_partition, header("x-kafka-partition")) {
            (Some(q), _) => Some(parse_partition(q.as_bytes())?),
            (None, Some(h)) => Some(parse_partition(h)?),
            (None, None) => None,
        };
        let headers = parts
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let name = name.as_str().strip_prefix(HEADER_PREFIX)?;
                Some((name.to_string(), Bytes::copy_from_slice(value.as_bytes())))
            })
            .collect();
        Ok(RecordMeta {
            key,
            partition,
            headers,
        })
    }

    fn into_records(
        self,
        values: Vec<Bytes>,
        strategy: crate::config::Partitioner,
        info: &TopicInfo,
    ) -> Result<Vec<Record>, IngestError> {
        if let Some(p) = self.partition
            && p >= info.partitions
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

fn parse_partition(raw: &[u8]) -> Result<i32, IngestError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p >= 0)
        .ok_or_else(|| IngestError::BadRequest("partition must be a non-negative integer".into()))
}

/// Waits for every record's report until `timeout`; any failure makes the request fail, with
/// 503 only when no record can have been written.
async fn await_acks(
    receivers: Vec<oneshot::Receiver<Outcome>>,
    timeout: std::time::Duration,
) -> Result<Vec<(i32, i64)>, IngestError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut outcomes = Vec::with_capacity(receivers.len());
    for rx in receivers {
        outcomes.push(match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(outcome)) => Some(outcome),
            // A dropped sender or the deadline: the record is somewhere between queue and broker.
            Ok(Err(_)) | Err(_) => None,
        });
    }
    if let Some(written) = outcomes
        .iter()
        .map(|o| match o {
            Some(Outcome::Delivered { partition, offset }) => Some((*partition, *offset)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
    {
        return Ok(written);
    }
    Err(failure(outcomes, timeout))
}

fn failure(outcomes: Vec<Option<Outcome>>, timeout: std::time::Duration) -> IngestError {
    let timed_out =
        format!("no acknowledgement within {timeout:?}; the record may still be written");
    if let [one] = outcomes.as_slice() {
        return match one {
            Some(Outcome::Failed { error, persisted }) => {
                IngestError::from_delivery(*error, *persisted)
            }
            _ => IngestError::Unknown(timed_out),
        };
    }
    // Only when every record was refused unwritten is there nothing a retry could duplicate.
    let statuses: Vec<StatusCode> = outcomes
        .iter()
        .map(|o| match o {
            Some(Outcome::Failed {
                error,
                persisted: Persisted::No,
            }) => delivery_status(*error, Persisted::No),
            _ => StatusCode::GATEWAY_TIMEOUT,
        })
        .collect();
    let status = match statuses.contains(&StatusCode::GATEWAY_TIMEOUT) {
        true => StatusCode::GATEWAY_TIMEOUT,
        false if statuses.windows(2).all(|w| w[0] == w[1]) => statuses[0],
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let records: Vec<RecordReport> = outcomes
        .iter()
        .map(|o| match o {
            Some(Outcome::Delivered { partition, offset }) => RecordReport::Written {
                partition: *partition,
                offset: *offset,
            },
            Some(Outcome::Failed { error, .. }) => RecordReport::Failed {
                error: error.to_string(),
            },
            None => RecordReport::Failed {
                error: timed_out.clone(),
            },
        })
        .collect();
    let failed = records
        .iter()
        .filter(|r| matches!(r, RecordReport::Failed { .. }))
        .count();
    IngestError::Partial {
        status,
        message: format!("{failed} of {} records not acknowledged", records.len()),
        records,
    }
}

#[derive(Serialize)]
struct Written {
    partition: i32,
    offset: i64,
}

/// `{"ok":1,"topic":..,"partition":..,"offset":..}`, fields in that order.
#[derive(Serialize)]
struct One<'a> {
    ok: usize,
    topic: &'a str,
    partition: i32,
    offset: i64,
}

/// `{"ok":N,"topic":..,"records":[..]}`.
#[derive(Serialize)]
struct Many<'a> {
    ok: usize,
    topic: &'a str,
    records: Vec<Written>,
}

#[derive(Serialize)]
struct AcceptedBody {
    ok: usize,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        use crate::server::json;
        match self {
            Reply::Accepted(n) => json(StatusCode::ACCEPTED, &AcceptedBody { ok: n }),
            Reply::Acked {
                topic,
                written,
                list: false,
            } if written.len() == 1 => {
                let (partition, offset) = written[0];
                json(
                    StatusCode::OK,
                    &One {
                        ok: 1,
                        topic: &topic,
                        partition,
                        offset,
                    },
                )
            }
            Reply::Acked { topic, written, .. } => {
                let records: Vec<Written> = written
                    .iter()
                    .map(|&(partition, offset)| Written { partition, offset })
                    .collect();
                json(
                    StatusCode::OK,
                    &Many {
                        ok: records.len(),
                        topic: &topic,
                        records,
                    },
                )
            }
        }
    }
}
