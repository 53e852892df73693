//! Topics the brokers refuse kafboy to write, and partitions past the cached count: what the
//! cache learns from requests rather than from its listings.
//!
//! Kafka lists a topic a client may describe but not write like any other, so only a delivery
//! report (`TOPIC_AUTHORIZATION_FAILED`) tells; without this an async request would get `202`
//! for every record the brokers go on refusing. The report thread only queues the name: the
//! next lookup takes it into the cache, as `Denied` until `unknown_topic_ttl` runs out.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{Entry, Listed, LookupError, TopicInfo, Topics};
use crate::lock;

/// Names waiting beyond this are dropped: each is a topic a broker refused within one
/// lookup's time, and the next refused record reports its topic again.
const MAX_PENDING: usize = 1024;

/// Refusals reported by the producers, waiting for the next lookup.
#[derive(Debug, Default)]
pub struct WriteRefusals {
    /// Set while `pending` has names: the one check on the lookups' fast path.
    any: AtomicBool,
    pending: Mutex<Vec<(String, Instant)>>,
}

impl WriteRefusals {
    /// The brokers refused to write a record to `topic`. (A refused batch reports each of its
    /// records: the first one queues the name.)
    pub fn refused(&self, topic: &str) {
        let mut pending = lock(&self.pending);
        if pending.len() < MAX_PENDING && !pending.iter().any(|(t, _)| t == topic) {
            pending.push((topic.to_string(), Instant::now()));
        }
        // Under the lock: `take` clears it under the same lock, so no name is left unseen.
        self.any.store(true, Ordering::Release);
    }

    fn take(&self) -> Vec<(String, Instant)> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut pending = lock(&self.pending);
        self.any.store(false, Ordering::Release);
        std::mem::take(&mut *pending)
    }
}

impl Topics {
    /// Takes the refusals reported since into the cache. A refused batch reports every record
    /// of it, and the report thread queues the name again after each take: a topic already
    /// marked keeps its mark (and its time), without a write lock.
    pub(super) fn take_refusals(&self) {
        let mut refused = self.refusals.take();
        if refused.is_empty() {
            return;
        }
        let ttl = self.missing_ttl;
        {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            refused.retain(|(topic, at)| {
                let marked = matches!(entries.get(topic),
                    Some(Entry::Refused(when, LookupError::Denied)) if when.elapsed() < ttl);
                // One reported longer than a TTL ago (no lookup since) has run out already.
                !marked && at.elapsed() < ttl
            });
        }
        if refused.is_empty() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        for (topic, at) in refused {
            entries.insert(topic, Entry::Refused(at, LookupError::Denied));
        }
    }

    /// The partition count of `topic` as the brokers list it now, for a request that names a
    /// partition past the cached count (it may have been added since the last refresh): from
    /// a listing made for it, or one made for another such request within `unknown_topic_ttl`.
    /// A topic the listing does not have (deleted since the last refresh) or refuses is an
    /// error as a lookup's would be, and remembered as long: such requests cost no listing
    /// each. So is one listed without partitions for now (being made again, or between
    /// leaders): whether the partition will exist is not known.
    pub async fn listed_partitions(
        self: &Arc<Self>,
        topic: &str,
        info: &TopicInfo,
    ) -> Result<i32, LookupError> {
        let answer = |seen: Option<Listed>| match seen {
            // No error and no partitions: a topic on its way out, which `lookup` calls missing.
            Some(Listed::Partitions(0)) | None => Err(LookupError::Unknown),
            Some(Listed::Partitions(n)) => Ok(n),
            Some(Listed::Settling(_)) => Err(LookupError::Unavailable(format!(
                "topic {topic:?} has no usable partitions now"
            ))),
            Some(Listed::Denied) => Err(LookupError::Denied),
        };
        if let Some((at, seen)) = *lock(&info.listed)
            && at.elapsed() < self.missing_ttl
        {
            return answer(seen);
        }
        let arrived = Instant::now();
        let deadline = arrived + self.timeout;
        let mut turn = self
            .turn(deadline)
            .await
            .map_err(|_| LookupError::Unavailable("metadata lookup timed out".into()))?;
        // Requests that waited together for the turn share the first one's listing.
        if let Some((at, seen)) = *lock(&info.listed)
            && at >= arrived
        {
            return answer(seen);
        }
        let seen = self
            .listed(topic, arrived, deadline, &mut turn)
            .await
            .map_err(LookupError::Unavailable)?;
        *lock(&info.listed) = Some((Instant::now(), seen));
        answer(seen)
    }
}
