//! Successful replies, and the wait for delivery reports that decides between a 200 and an error.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::error::{IngestError, RecordReport, client_status};
use crate::kafka::delivery::{Outcome, Persisted};

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
    /// A peer's answer to a forwarded request, relayed as it is.
    Relayed(Response),
    /// A reply chosen by a hook, sent as it is.
    Custom {
        /// Status.
        status: StatusCode,
        /// Body.
        body: bytes::Bytes,
        /// Content-Type.
        content_type: String,
    },
}

/// Waits for every record's report until `timeout`; any failure makes the request fail, with
/// 503 only when no record can have been written.
pub async fn await_acks(
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
            }) => client_status(*error, Persisted::No),
            _ => StatusCode::GATEWAY_TIMEOUT,
        })
        .collect();
    let status = match statuses.contains(&StatusCode::GATEWAY_TIMEOUT) {
        true => StatusCode::GATEWAY_TIMEOUT,
        false if statuses.windows(2).all(|w| w[0] == w[1]) => statuses[0],
        // A record refused for good (too large, not allowed) fails the same request again:
        // its 4xx says so, where a 503 would invite a retry that cannot succeed.
        false => statuses
            .iter()
            .copied()
            .find(StatusCode::is_client_error)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
    };
    let records: Vec<RecordReport> = outcomes
        .iter()
        .map(|o| match o {
            Some(Outcome::Delivered { partition, offset }) => RecordReport::Written {
                partition: *partition,
                offset: *offset,
            },
            Some(Outcome::Failed { error, persisted }) => RecordReport::Failed {
                error: error.to_string(),
                written: match persisted {
                    Persisted::No => "no",
                    _ => "maybe",
                },
            },
            None => RecordReport::Failed {
                error: timed_out.clone(),
                written: "maybe",
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
    #[serde(serialize_with = "known_offset")]
    offset: i64,
}

/// `{"ok":1,"topic":..,"partition":..,"offset":..}`, fields in that order.
#[derive(Serialize)]
struct One<'a> {
    ok: usize,
    topic: &'a str,
    partition: i32,
    #[serde(serialize_with = "known_offset")]
    offset: i64,
}

/// An offset, or `null` when librdkafka acknowledged the record without one: the idempotent
/// producer does that for a record a later request to its partition implies was written, or
/// one the broker already had (a duplicate sequence). It is written; where is not known.
pub fn known_offset<S: serde::Serializer>(offset: &i64, s: S) -> Result<S::Ok, S::Error> {
    if *offset >= 0 {
        s.serialize_i64(*offset)
    } else {
        s.serialize_none()
    }
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

impl Reply {
    /// Records the request queued or wrote (0 for a hook's own reply).
    pub fn records(&self) -> usize {
        match self {
            Reply::Accepted(n) => *n,
            Reply::Acked { written, .. } => written.len(),
            Reply::Custom { .. } | Reply::Relayed(_) => 0,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        use crate::server::json;
        match self {
            Reply::Relayed(response) => response,
            // The answer to nearly every async request, made once.
            Reply::Accepted(1) => crate::server::sized_json(
                StatusCode::ACCEPTED,
                bytes::Bytes::from_static(b"{\"ok\":1}"),
            ),
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
            Reply::Custom {
                status,
                body,
                content_type,
            } => {
                // These statuses carry no content (RFC 9110): a body would go as a stray
                // Content-Length.
                let body = match status {
                    StatusCode::NO_CONTENT
                    | StatusCode::RESET_CONTENT
                    | StatusCode::NOT_MODIFIED => bytes::Bytes::new(),
                    _ => body,
                };
                let mut response = (status, body).into_response();
                let headers = response.headers_mut();
                if let Ok(ct) = axum::http::HeaderValue::from_str(&content_type) {
                    headers.insert(axum::http::header::CONTENT_TYPE, ct);
                }
                crate::error::retry_soon(status, headers);
                response
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as E;

    fn failed(error: E, persisted: Persisted) -> Option<Outcome> {
        Some(Outcome::Failed { error, persisted })
    }

    #[test]
    fn a_hook_s_own_503_and_429_say_when_to_come_back() {
        for (code, retry) in [(503, true), (429, true), (400, false), (200, false)] {
            let response = Reply::Custom {
                status: StatusCode::from_u16(code).unwrap(),
                body: bytes::Bytes::from_static(b"{}"),
                content_type: "application/json".into(),
            }
            .into_response();
            assert_eq!(
                response
                    .headers()
                    .get(axum::http::header::RETRY_AFTER)
                    .is_some(),
                retry,
                "{code}"
            );
        }
    }

    #[test]
    fn a_hook_s_204_carries_no_body() {
        use axum::body::HttpBody;
        for (code, length) in [(204, 0), (205, 0), (304, 0), (200, 2)] {
            let response = Reply::Custom {
                status: StatusCode::from_u16(code).unwrap(),
                body: bytes::Bytes::from_static(b"{}"),
                content_type: "application/json".into(),
            }
            .into_response();
            assert_eq!(response.body().size_hint().exact(), Some(length), "{code}");
        }
    }

    #[test]
    fn an_offset_librdkafka_does_not_know_is_null() {
        let one = |offset| {
            serde_json::to_string(&One {
                ok: 1,
                topic: "t",
                partition: 2,
                offset,
            })
            .unwrap()
        };
        assert_eq!(one(5), r#"{"ok":1,"topic":"t","partition":2,"offset":5}"#);
        // RD_KAFKA_OFFSET_INVALID.
        assert_eq!(
            one(-1001),
            r#"{"ok":1,"topic":"t","partition":2,"offset":null}"#
        );
    }

    #[test]
    fn a_request_with_failed_records_gets_the_status_its_records_call_for() {
        let delivered = Some(Outcome::Delivered {
            partition: 0,
            offset: 7,
        });
        let timeout = std::time::Duration::from_secs(1);
        let status = |outcomes: Vec<Option<Outcome>>| failure(outcomes, timeout).status();
        let not_sent = failed(E::MessageTimedOut, Persisted::No);
        let too_large = failed(E::MessageSizeTooLarge, Persisted::No);
        // One written: a retry would duplicate it.
        assert_eq!(status(vec![delivered.clone(), not_sent.clone()]), 504);
        // Each failed record says whether it may be written: the client may resend the others.
        let IngestError::Partial { records, .. } =
            failure(vec![delivered.clone(), not_sent.clone(), None], timeout)
        else {
            panic!("not a partial failure")
        };
        let records = serde_json::to_value(&records).unwrap();
        let written: Vec<&serde_json::Value> = records
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["written"])
            .collect();
        assert_eq!(
            written,
            [&serde_json::Value::Null, &"no".into(), &"maybe".into()]
        );
        // None answered in time: may be written.
        assert_eq!(status(vec![not_sent.clone(), None]), 504);
        assert_eq!(
            status(vec![
                not_sent.clone(),
                failed(E::MessageTimedOut, Persisted::Possibly)
            ]),
            504
        );
        // None written, all for the same reason: that reason's status.
        assert_eq!(status(vec![not_sent.clone(), not_sent.clone()]), 503);
        assert_eq!(status(vec![too_large.clone(), too_large.clone()]), 413);
        // None written, one refused for good: the retry would fail again.
        assert_eq!(status(vec![not_sent, too_large]), 413);
        let one = failure(
            vec![failed(E::TopicAuthorizationFailed, Persisted::No)],
            timeout,
        );
        assert_eq!(one.status(), 403);
    }
}
