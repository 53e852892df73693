//! The one place where an outcome becomes an HTTP status. Every failed request ends here, so the
//! contract in the README (503 = not written, 504 = maybe written) is decided in one function.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rdkafka::error::RDKafkaErrorCode;
use serde::Serialize;

use crate::decode::DecodeError;
use crate::kafka::SendError;
use crate::kafka::delivery::Persisted;

/// Per-record result in a failed multi-record sync reply.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RecordReport {
    /// Written here.
    Written {
        /// Partition.
        partition: i32,
        /// Offset (`null` when not known).
        #[serde(serialize_with = "crate::reply::known_offset")]
        offset: i64,
    },
    /// Not acknowledged.
    Failed {
        /// Why.
        error: String,
        /// `"no"` when librdkafka knows the record was not written (retrying it cannot
        /// duplicate it), else `"maybe"`.
        written: &'static str,
    },
}

/// Why a request was not (fully) served.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// 400: the request itself is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no API key, or an unknown one.
    #[error("{0}")]
    Unauthenticated(String),
    /// 429: over a rate limit; retry after this many seconds.
    #[error("rate limit exceeded; retry in {0} s")]
    Limited(u64),
    /// 403: the brokers refuse kafboy this topic, or the key may not use it.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such path.
    #[error("not found")]
    NoRoute,
    /// 404: no such topic, or not on the allowlist.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// 408: the body stopped arriving, or took too long in all.
    #[error("{0}")]
    BodyTimeout(String),
    /// 413: too large.
    #[error("{0}")]
    TooLarge(String),
    /// 415: a body type this route does not read.
    #[error("{0}")]
    UnsupportedType(String),
    /// 503 + Retry-After: no room in the producer queue within the wait; nothing queued.
    #[error("producer queue full")]
    QueueFull,
    /// 503 + Retry-After: not accepted; definitely not written.
    #[error("{0}")]
    Unavailable(String),
    /// 503 + Retry-After, and `Connection: close`: the node is stopping; nothing written. A
    /// client that kept the connection would send its next request into the close.
    #[error("shutting down")]
    ShuttingDown,
    /// 504: the outcome is unknown; the record may have been written.
    #[error("{0}")]
    Unknown(String),
    /// Refused by a hook, with the hook's status and message; nothing produced.
    #[error("{message}")]
    Rejected {
        /// Status chosen by the hook.
        status: StatusCode,
        /// Message chosen by the hook.
        message: String,
    },
    /// 500: the hook failed or ran out of time; nothing produced.
    #[error("{0}")]
    HookFailed(String),
    /// A sync request with several records where some were not acknowledged.
    #[error("{message}")]
    Partial {
        /// Status decided by [`client_status`] over all records.
        status: StatusCode,
        /// Summary.
        message: String,
        /// One entry per record, in request order.
        records: Vec<RecordReport>,
    },
}

impl IngestError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            IngestError::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            IngestError::Forbidden(_) => StatusCode::FORBIDDEN,
            IngestError::NoRoute | IngestError::UnknownTopic(_) => StatusCode::NOT_FOUND,
            IngestError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::UnsupportedType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Unavailable(_) | IngestError::QueueFull | IngestError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            IngestError::Unknown(_) => StatusCode::GATEWAY_TIMEOUT,
            IngestError::Rejected { status, .. } | IngestError::Partial { status, .. } => *status,
            IngestError::HookFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error for one record that librdkafka reported as failed.
    pub fn from_delivery(error: RDKafkaErrorCode, persisted: Persisted) -> IngestError {
        let message = format!("not delivered: {error}");
        match client_status(error, persisted) {
            StatusCode::PAYLOAD_TOO_LARGE => IngestError::TooLarge(message),
            StatusCode::NOT_FOUND => IngestError::UnknownTopic(message),
            StatusCode::FORBIDDEN => IngestError::Forbidden(message),
            StatusCode::BAD_REQUEST => IngestError::BadRequest(message),
            StatusCode::SERVICE_UNAVAILABLE => IngestError::Unavailable(message),
            _ => IngestError::Unknown(format!("{message}; the record may have been written")),
        }
    }
}

/// Whether the brokers (or librdkafka) refused a record for its size: no retry can succeed.
pub fn too_large(error: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as E;
    matches!(
        error,
        E::MessageSizeTooLarge | E::InvalidMessageSize | E::MessageBatchTooLarge
    )
}

/// Status for a record librdkafka gave up on. Permanent refusals by the broker keep their
/// meaning when the record was never persisted; everything else is 503 when librdkafka says it
/// was never persisted and 504 when it may have been (a retry refused as too large may follow
/// an attempt that landed). The spool's dead-letter decision reads this; clients get
/// [`client_status`].
pub fn delivery_status(error: RDKafkaErrorCode, persisted: Persisted) -> StatusCode {
    use RDKafkaErrorCode as E;
    match (error, persisted) {
        (error, Persisted::No) if too_large(error) => StatusCode::PAYLOAD_TOO_LARGE,
        (E::UnknownTopicOrPartition | E::UnknownTopic, Persisted::No) => StatusCode::NOT_FOUND,
        (E::TopicAuthorizationFailed | E::ClusterAuthorizationFailed, Persisted::No) => {
            StatusCode::FORBIDDEN
        }
        // The broker's verdict on the record itself (a compacted topic's record without a key).
        // A corrupt message (`InvalidMessage`, a CRC mismatch) is not the client's doing.
        (E::InvalidRecord, Persisted::No) => StatusCode::BAD_REQUEST,
        (_, Persisted::No) => StatusCode::SERVICE_UNAVAILABLE,
        (_, Persisted::Possibly) => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// Status a client gets for a record librdkafka gave up on: [`delivery_status`], except that
/// librdkafka's own "unknown topic" is `503`. One broker's metadata answer makes librdkafka
/// call a topic gone (deleted and recreated, or a broker behind), for a while; the topic cache
/// answers `404` when the brokers really lack it.
pub fn client_status(error: RDKafkaErrorCode, persisted: Persisted) -> StatusCode {
    match delivery_status(error, persisted) {
        StatusCode::NOT_FOUND => StatusCode::SERVICE_UNAVAILABLE,
        status => status,
    }
}

impl From<crate::auth::Denied> for IngestError {
    fn from(d: crate::auth::Denied) -> Self {
        use crate::auth::Denied;
        match d {
            Denied::Unauthenticated(why) => IngestError::Unauthenticated(why.into()),
            Denied::Forbidden(why) => IngestError::Forbidden(why),
            Denied::Limited(secs) => IngestError::Limited(secs),
        }
    }
}

impl From<crate::spool::SpoolError> for IngestError {
    fn from(e: crate::spool::SpoolError) -> Self {
        use crate::spool::SpoolError as S;
        match e {
            S::TooLarge(m) => IngestError::TooLarge(m),
            S::Closed => IngestError::ShuttingDown,
            // Full and disk errors: not written, retry later.
            other => IngestError::Unavailable(other.to_string()),
        }
    }
}

impl From<DecodeError> for IngestError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::UnsupportedType(_)
            | DecodeError::BadContentType(_)
            | DecodeError::JsonAsForm => IngestError::UnsupportedType(e.to_string()),
            DecodeError::TooManyRecords(_) | DecodeError::TooManyFields(_) => {
                IngestError::TooLarge(e.to_string())
            }
            _ => IngestError::BadRequest(e.to_string()),
        }
    }
}

impl From<SendError> for IngestError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::QueueFull => IngestError::QueueFull,
            SendError::TooBig => {
                IngestError::TooLarge("request larger than the producer queue".into())
            }
            SendError::Credentials => IngestError::Unavailable(
                "the brokers refuse kafboy's TLS or SASL credentials; nothing was queued".into(),
            ),
            SendError::Fatal => IngestError::Unavailable(
                "producer hit a fatal error or was fenced; it is being replaced".into(),
            ),
            SendError::Closed => IngestError::ShuttingDown,
            SendError::Refused { accepted: 0, error } => {
                IngestError::from_delivery(error, Persisted::No)
            }
            SendError::Refused { accepted, error } => IngestError::Unknown(format!(
                "only the first {accepted} records were queued ({error}); they may be written"
            )),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    records: Option<&'a [RecordReport]>,
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.to_string();
        let records = match &self {
            IngestError::Partial { records, .. } => Some(records.as_slice()),
            _ => None,
        };
        let mut response = crate::server::json(
            status,
            &Body {
                error: &message,
                records,
            },
        );
        let headers = response.headers_mut();
        match &self {
            IngestError::Limited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            IngestError::Unauthenticated(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            IngestError::ShuttingDown => {
                retry_soon(status, headers);
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => retry_soon(status, headers),
        }
        response
    }
}

/// `Retry-After: 1` on a `503` or a `429`: every "come back later" says when, the hook's own
/// replies included.
pub(crate) fn retry_soon(status: StatusCode, headers: &mut axum::http::HeaderMap) {
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutting_down_answer_closes_the_connection() {
        let response = IngestError::ShuttingDown.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONNECTION], "close");
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let response = IngestError::QueueFull.into_response();
        assert!(!response.headers().contains_key(header::CONNECTION));
    }

    #[test]
    fn not_persisted_is_503_possibly_persisted_is_504() {
        use RDKafkaErrorCode as E;
        use StatusCode as S;
        for (error, persisted, want) in [
            (E::MessageTimedOut, Persisted::No, S::SERVICE_UNAVAILABLE),
            (E::MessageTimedOut, Persisted::Possibly, S::GATEWAY_TIMEOUT),
            (E::PurgeQueue, Persisted::No, S::SERVICE_UNAVAILABLE),
            (E::MessageSizeTooLarge, Persisted::No, S::PAYLOAD_TOO_LARGE),
            (
                E::MessageSizeTooLarge,
                Persisted::Possibly,
                S::GATEWAY_TIMEOUT,
            ),
            (E::UnknownPartition, Persisted::No, S::SERVICE_UNAVAILABLE),
            (E::UnknownTopicOrPartition, Persisted::No, S::NOT_FOUND),
            (
                E::UnknownTopicOrPartition,
                Persisted::Possibly,
                S::GATEWAY_TIMEOUT,
            ),
            (E::TopicAuthorizationFailed, Persisted::No, S::FORBIDDEN),
            (E::InvalidRecord, Persisted::No, S::BAD_REQUEST),
            (E::InvalidMessage, Persisted::No, S::SERVICE_UNAVAILABLE),
        ] {
            assert_eq!(
                delivery_status(error, persisted),
                want,
                "{error:?} {persisted:?}"
            );
        }
        // librdkafka's own "unknown topic" may pass (a broker behind, a topic recreated): a
        // client gets 503, and 404 only from the topic cache.
        for error in [E::UnknownTopic, E::UnknownTopicOrPartition] {
            assert_eq!(client_status(error, Persisted::No), S::SERVICE_UNAVAILABLE);
            let refused = IngestError::from(SendError::Refused { accepted: 0, error });
            assert_eq!(refused.status(), S::SERVICE_UNAVAILABLE);
        }
    }

    #[test]
    fn partial_enqueue_is_never_503() {
        let e = IngestError::from(SendError::Refused {
            accepted: 2,
            error: RDKafkaErrorCode::QueueFull,
        });
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        let e = IngestError::from(SendError::Refused {
            accepted: 0,
            error: RDKafkaErrorCode::QueueFull,
        });
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn error_bodies_are_escaped_json_with_retry_after_on_503() {
        let r = IngestError::Unavailable("a \"quoted\"\nline".into()).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
