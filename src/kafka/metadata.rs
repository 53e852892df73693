//! The topics the brokers have, cached: a known topic costs a hash lookup, an unknown one gets a
//! fast 404 instead of librdkafka's 30 s wait for metadata that never comes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer as _;

use super::poller::Polled;

use super::partition::Rotation;

/// What kafboy knows of one topic.
#[derive(Debug, Default)]
pub struct TopicInfo {
    /// Number of partitions.
    pub partitions: i32,
    /// State of the round-robin and sticky strategies.
    pub rotation: Rotation,
}

#[derive(Debug)]
enum Entry {
    Known(Arc<TopicInfo>),
    Missing(Instant),
    /// Refused by the brokers (Kafka also says so of names that do not exist when kafboy may
    /// not describe them): remembered like a missing topic, so such names cost no lookups.
    Denied(Instant),
}

/// A topic as a metadata answer lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    Partitions(i32),
    /// The brokers refuse kafboy the topic (Kafka lists it with no partitions then).
    Denied,
}

/// Why a topic could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The brokers do not have it.
    Unknown,
    /// The brokers refuse kafboy the topic (no permission to describe it).
    Denied,
    /// The brokers could not be asked.
    Unavailable(String),
}

/// Remembered missing topics beyond this are forgotten early, so random names cannot grow memory.
const MAX_MISSING: usize = 10_000;

/// The cache, shared by all requests.
pub struct Topics {
    entries: RwLock<HashMap<String, Entry>>,
    client: RwLock<Polled>,
    lookup: tokio::sync::Mutex<()>,
    fetched: AtomicBool,
    timeout: Duration,
    missing_ttl: Duration,
}

impl Topics {
    /// A cache that asks the brokers through `client`.
    pub fn new(client: Polled, timeout: Duration, missing_ttl: Duration) -> Self {
        Topics {
            entries: RwLock::default(),
            client: RwLock::new(client),
            lookup: tokio::sync::Mutex::new(()),
            fetched: AtomicBool::new(false),
            timeout,
            missing_ttl,
        }
    }

    /// Asks through `client` from now on (after the old one was replaced).
    pub fn set_client(&self, client: Polled) {
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
    }

    /// Up to `limit` known topics with their partition counts, by name.
    pub fn known(&self, limit: usize) -> Vec<(String, i32)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut known: Vec<(String, i32)> = entries
            .iter()
            .filter_map(|(name, e)| match e {
                Entry::Known(info) => Some((name.clone(), info.partitions)),
                Entry::Missing(_) | Entry::Denied(_) => None,
            })
            .collect();
        known.sort();
        known.truncate(limit);
        known
    }

    /// Whether metadata was fetched from the brokers at least once.
    pub fn fetched(&self) -> bool {
        self.fetched.load(Ordering::Acquire)
    }

    fn cached(&self, topic: &str) -> Option<Result<Arc<TopicInfo>, LookupError>> {
        // A poisoned lock only means a panic elsewhere mid-insert; the map itself stays usable.
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(topic)? {
            Entry::Known(info) => Some(Ok(info.clone())),
            Entry::Missing(at) if at.elapsed() < self.missing_ttl => {
                Some(Err(LookupError::Unknown))
            }
            Entry::Denied(at) if at.elapsed() < self.missing_ttl => Some(Err(LookupError::Denied)),
            Entry::Missing(_) | Entry::Denied(_) => None,
        }
    }

    /// The topic's metadata, asking the brokers on a miss (one lookup at a time, bounded wait).
    pub async fn lookup(self: &Arc<Self>, topic: &str) -> Result<Arc<TopicInfo>, LookupError> {
        if let Some(hit) = self.cached(topic) {
            return hit;
        }
        // One deadline for waiting our turn and for the request itself.
        let deadline = Instant::now() + self.timeout;
        let busy = || LookupError::Unavailable("metadata lookup timed out".into());
        let _turn = tokio::time::timeout_at(deadline.into(), self.lookup.lock())
            .await
            .map_err(|_| busy())?;
        if let Some(hit) = self.cached(topic) {
            return hit;
        }
        let this = self.clone();
        let name = topic.to_string();
        let left = deadline.saturating_duration_since(Instant::now());
        let fetched = tokio::task::spawn_blocking(move || this.fetch(Some(&name), left))
            .await
            .map_err(|e| LookupError::Unavailable(e.to_string()))?;
        let found = fetched.map_err(LookupError::Unavailable)?;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let listed = found.into_iter().find(|(name, _)| name == topic);
        if !matches!(listed, Some((_, Listed::Partitions(p))) if p > 0)
            && entries.len() > MAX_MISSING
        {
            entries.retain(|_, e| matches!(e, Entry::Known(_)));
        }
        match listed {
            Some((_, Listed::Denied)) => {
                entries.insert(topic.to_string(), Entry::Denied(Instant::now()));
                Err(LookupError::Denied)
            }
            Some((_, Listed::Partitions(partitions))) if partitions > 0 => {
                let info = Arc::new(TopicInfo {
                    partitions,
                    ..TopicInfo::default()
                });
                entries.insert(topic.to_string(), Entry::Known(info.clone()));
                Ok(info)
            }
            _ => {
                entries.insert(topic.to_string(), Entry::Missing(Instant::now()));
                Err(LookupError::Unknown)
            }
        }
    }

    /// Re-reads every topic; known entries keep their rotation state while their partition
    /// count is unchanged. Blocking: run it off the async workers.
    pub fn refresh_all(&self) -> Result<usize, String> {
        let found = self.fetch(None, self.timeout)?;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let mut fresh = HashMap::with_capacity(found.len());
        let usable = found.into_iter().filter_map(|(name, listed)| match listed {
            Listed::Partitions(p) if p > 0 => Some((name, p)),
            _ => None,
        });
        for (name, partitions) in usable {
            let info = match entries.remove(&name) {
                Some(Entry::Known(old)) if old.partitions == partitions => old,
                _ => Arc::new(TopicInfo {
                    partitions,
                    ..TopicInfo::default()
                }),
            };
            fresh.insert(name, Entry::Known(info));
        }
        // Topics still missing or refused are remembered until their TTL runs out.
        for (name, entry) in entries.drain() {
            if let Entry::Missing(_) | Entry::Denied(_) = entry {
                fresh.entry(name).or_insert(entry);
            }
        }
        let count = fresh.len();
        *entries = fresh;
        self.fetched.store(true, Ordering::Release);
        Ok(count)
    }

    /// The topics listed; a topic the broker reports as unknown is left out.
    fn fetch(
        &self,
        topic: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<(String, Listed)>, String> {
        let client = self
            .client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let metadata = client
            .client()
            .fetch_metadata(topic, timeout)
            .map_err(|e| format!("metadata request failed: {e}"))?;
        Ok(metadata
            .topics()
            .iter()
            .filter_map(|t| {
                let listed = match t.error().map(RDKafkaErrorCode::from) {
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return None,
                    Some(RDKafkaErrorCode::TopicAuthorizationFailed) => Listed::Denied,
                    _ => Listed::Partitions(t.partitions().len() as i32),
                };
                Some((t.name().to_string(), listed))
            })
            .collect())
    }

    /// Refreshes every `period` for as long as the cache lives; retries every second until the
    /// first success, which makes the server ready.
    pub fn spawn_refresher(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(topics) = weak.upgrade() else { return };
                let result = tokio::task::spawn_blocking(move || topics.refresh_all()).await;
                let wait = match result {
                    Ok(Ok(count)) => {
                        tracing::debug!(topics = count, "metadata refreshed");
                        period
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "metadata refresh failed");
                        period.min(Duration::from_secs(1))
                    }
                    Err(_) => return,
                };
                tokio::time::sleep(wait).await;
            }
        });
    }
}
