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
                None => {
                    remember_gone(&mut crate::lock(&self.gone), name, info.partitions);
                    false
                }
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
        let mut gone = crate::lock(&self.gone);
        let fresh = merged_with(&mut entries, found, self.missing_ttl, &mut gone);
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

/// [`merged_with`], forgetting what went.
#[cfg(test)]
pub(super) fn merged(
    entries: &mut HashMap<String, Entry>,
    found: Vec<(String, Listed)>,
    ttl: Duration,
) -> HashMap<String, Entry> {
    merged_with(entries, found, ttl, &mut HashMap::new())
}

/// Most topics remembered as gone ([`Topics::gone`]); past it they are forgotten, and one
/// created again is used with its listed count at once.
const MAX_GONE: usize = 10_000;

/// Remembers that `name`, used with `partitions`, is gone.
pub(super) fn remember_gone(gone: &mut HashMap<String, i32>, name: &str, partitions: i32) {
    if gone.len() >= MAX_GONE {
        gone.clear();
    }
    gone.insert(name.to_string(), partitions);
}

/// A topic newly listed with `partitions`: if it was known with fewer before it went (deleted
/// and created again), the producers may still know only those, so the rest are used from the
/// next refresh, as partitions added to a topic are (see [`TopicInfo::added`]).
pub(super) fn listed_anew(
    gone: &mut HashMap<String, i32>,
    name: &str,
    partitions: i32,
) -> TopicInfo {
    match gone.remove(name) {
        Some(before) if before > 0 && before < partitions => TopicInfo {
            partitions: before,
            added: partitions,
            ..TopicInfo::default()
        },
        _ => TopicInfo::with_partitions(partitions),
    }
}

/// The cache after a full metadata answer: listed topics known (keeping their rotation state
/// while their partition count is unchanged), known topics between leaders kept as they were,
/// missing and refused ones remembered until their TTL (`ttl`) runs out, listed or not: a topic
/// kafboy may describe but not write is listed like any other.
/// Known topics the answer no longer lists go into `gone`.
pub(super) fn merged_with(
    entries: &mut HashMap<String, Entry>,
    found: Vec<(String, Listed)>,
    ttl: Duration,
    gone: &mut HashMap<String, i32>,
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
            Some(Entry::Known(old))
                if partitions > old.partitions
                    && (old.added != partitions || old.added_by_lookup) =>
            {
                Arc::new(TopicInfo {
                    partitions: old.partitions,
                    added: partitions,
                    ..TopicInfo::default()
                })
            }
            Some(Entry::Known(_)) => Arc::new(TopicInfo::with_partitions(partitions)),
            _ => Arc::new(listed_anew(gone, &name, partitions)),
        };
        fresh.insert(name, Entry::Known(info));
    }
    // Topics still missing or refused are remembered until their TTL runs out; known ones no
    // longer listed, as gone.
    for (name, entry) in entries.drain() {
        match entry {
            Entry::Refused(..) => {
                fresh.entry(name).or_insert(entry);
            }
            Entry::Known(info) if !fresh.contains_key(&name) => {
                remember_gone(gone, &name, info.partitions)
            }
            Entry::Known(_) => {}
        }
    }
    fresh
}
