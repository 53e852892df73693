//! Where a request's records go: the topic (from the path or the route), its metadata, and a
//! named partition checked against it.

use std::sync::Arc;

use axum::RequestPartsExt;
use axum::extract::RawPathParams;
use axum::http::request::Parts;

use crate::error::IngestError;
use crate::kafka::metadata::{LookupError, TopicInfo};
use crate::routes::{Route, TopicSource};
use crate::state::AppState;

pub(super) async fn lookup(app: &AppState, topic: &str) -> Result<Arc<TopicInfo>, IngestError> {
    app.producers
        .topics
        .lookup(topic)
        .await
        .map_err(|e| refused(topic, e))
}

/// The answer to a topic the brokers do not have, refuse kafboy, or could not be asked about.
fn refused(topic: &str, error: LookupError) -> IngestError {
    match error {
        LookupError::Unknown => IngestError::UnknownTopic(topic.to_string()),
        LookupError::Denied => {
            IngestError::Forbidden(format!("kafka refuses kafboy the topic {topic}"))
        }
        LookupError::Unavailable(why) => IngestError::Unavailable(format!("kafka metadata: {why}")),
    }
}

/// A partition past the cached count may have been added since the last metadata refresh: a
/// listing made now settles whether it is out of range (left to [`RecordMeta::into_records`]:
/// `400`), not yet known to every producer (`503`; used from the next refreshes on), or in a
/// topic that is gone (`404`).
pub(super) async fn check_partition(
    app: &AppState,
    topic: &str,
    info: &TopicInfo,
    partition: Option<i32>,
) -> Result<(), IngestError> {
    let Some(p) = partition else { return Ok(()) };
    if p < info.partitions.max(info.added) {
        return Ok(());
    }
    // Boxed: the listing's future is large, and every request's future would carry its room.
    match Box::pin(app.producers.topics.listed_partitions(topic, info)).await {
        Ok(n) if p < n => Err(IngestError::Unavailable(format!(
            "partition {p} was just added; kafboy writes to it from its next metadata refresh"
        ))),
        Ok(_) => Ok(()),
        // Deleted (or refused) since the last refresh: as a lookup would answer.
        Err(error) => Err(refused(topic, error)),
    }
}

pub(super) async fn topic_of(route: &Route, parts: &mut Parts) -> Result<String, IngestError> {
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
