//! The produce handler: request → records → producer → reply. Cheap checks come first (topic name,
//! allowlist, content type, declared length, metadata), so a bad request costs no body read and
//! never reaches Kafka.

use std::sync::Arc;

use axum::RequestPartsExt;
use axum::body::Body;
use axum::extract::{RawPathParams, Request};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::config::Mode;
use crate::decode::{self, BodyKind};
use crate::error::IngestError;
use crate::kafka::metadata::LookupError;
use crate::record::RecordMeta;
use crate::reply::{Reply, await_acks};
use crate::routes::{Route, TopicSource, validate_topic};
use crate::server::AppState;

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
