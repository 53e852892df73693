//! Keeping the cache current: a full re-read every `kafka.metadata_refresh`, and a catch-up
//! with deleted or shrunk topics when a producer finds one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Entry, Listed, LookupError, TopicInfo, Topics};

impl Topics {
    /// Catches up, in the background, with topics a producer found deleted or with fewer
    /// partitions than the cache says, unless that is already under way.
    pub fn refresh_soon(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            match this.fetch(None, this.timeout) {
                Ok(found) => this.shrink(found),
                Err(error) => tracing::warn!(%error, "metadata refresh failed"),
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// Applies what a listing says of known topics that went away or have fewer partitions
    /// now; more partitions wait for the regular refresh (see [`TopicInfo::added`]).
    pub(super) fn shrink(&self, found: Vec<(String, Listed)>) {
        let listed: HashMap<String, Listed> = found.into_iter().collect();
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|name, entry| {
            let Entry::Known(info) = entry else {
                return true;
            };
            match listed.get(name) {
                None => false,
                Some(Listed::Partitions(p)) if *p > 0 && *p < info.partitions => {
                    *info = Arc::new(TopicInfo::with_partitions(*p));
                    true
                }
                Some(_) => true,
            }
        });
    }

    /// Re-reads every topic; known entries keep their rotation state while their partition
    /// count is unchanged. Blocking: run it off the async workers.
    pub fn refresh_all(&self) -> Result<usize, String> {
        let found = self.fetch(None, self.timeout)?;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let fresh = merged(&mut entries, found, self.missing_ttl);
        let count = fresh.len();
        *entries = fresh;
        self.fetched.store(true, Ordering::Release);
        Ok(count)
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

/// The cache after a full metadata answer: listed topics known (keeping their rotation state
/// while their partition count is unchanged), known topics between leaders kept as they were,
/// missing and refused ones remembered until their TTL (`ttl`) runs out, listed or not: a topic
/// kafboy may describe but not write is listed like any other.
pub(super) fn merged(
    entries: &mut HashMap<String, Entry>,
    found: Vec<(String, Listed)>,
    ttl: Duration,
) -> HashMap<String, Entry> {
    let mut fresh = HashMap::with_capacity(found.len());
    let mut usable = Vec::with_capacity(found.len());
    for (name, listed) in found {
        match listed {
            Listed::Partitions(p) if p > 0 => usable.push((name, p)),
            // A known topic between leaders stays known, with the count it had; one refused
            // for writes stays refused.
            Listed::Settling(_) => match entries.remove(&name) {
                Some(known @ Entry::Known(_)) => {
                    fresh.insert(name, known);
                }
                Some(refused @ Entry::Refused(_, LookupError::Denied)) => {
                    fresh.insert(name, refused);
                }
                _ => {}
            },
            _ => {}
        }
    }
    for (name, partitions) in usable {
        let info = match entries.remove(&name) {
            Some(refused @ Entry::Refused(at, LookupError::Denied)) if at.elapsed() < ttl => {
                fresh.insert(name, refused);
                continue;
            }
            Some(Entry::Known(old)) if old.partitions == partitions => old,
            // Added since the last refresh: used from the next one.
            Some(Entry::Known(old)) if partitions > old.partitions && old.added != partitions => {
                Arc::new(TopicInfo {
                    partitions: old.partitions,
                    added: partitions,
                    ..TopicInfo::default()
                })
            }
            _ => Arc::new(TopicInfo::with_partitions(partitions)),
        };
        fresh.insert(name, Entry::Known(info));
    }
    // Topics still missing or refused are remembered until their TTL runs out.
    for (name, entry) in entries.drain() {
        if let Entry::Refused(..) = entry {
            fresh.entry(name).or_insert(entry);
        }
    }
    fresh
}
