//! Listings of the whole cluster's topics, for lookups of names the cache does not know. A name
//! is looked up in a listing, not by asking the brokers for that one topic: librdkafka keeps a
//! topic object for every name a client asked about, for the client's life, and asks the
//! brokers about each one without partitions every second, so names that clients make up must
//! not reach it.
//!
//! A lookup is answered from a listing asked for after it arrived (a topic created just before
//! is in it). Lookups that wait at once share the next one; listings follow each other no
//! faster than [`SPACING`], or the time the last one took if that is longer, so a flood of
//! made-up names costs a bounded share of the brokers' time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::metadata::Listed;
use crate::lock;

/// Least time between two listings (or half of `kafka.metadata_timeout`, if that is less). A
/// listing of a cluster of thousands of topics is a megabyte: a flood of made-up names costs
/// the brokers and kafboy at most four a second.
const SPACING: Duration = Duration::from_millis(250);

/// The cluster's topics as one listing gave them.
pub(super) type Map = Arc<HashMap<String, Listed>>;

/// The listings lookups make, one at a time.
#[derive(Default)]
pub(super) struct Listings {
    state: Mutex<State>,
    /// Told when a listing ends, made or failed.
    done: Notify,
    /// Listings made.
    made: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The last listing made, and when it was asked for.
    last: Option<(Instant, Map)>,
    /// When the last listing (made or failed) was asked for, and how long it took.
    asked: Option<(Instant, Duration)>,
    /// A listing is under way. Its lookup may be gone (a client that hung up): the task that
    /// makes it still records it, and the next lookup waits for it rather than start another.
    running: bool,
}

impl Listings {
    /// Listings made so far.
    pub(super) fn made(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }

    /// The cluster's topics as listed after `arrived`: the listing another lookup started
    /// since, or one made now by `fetch` (given the time left before `deadline`). Lookups call
    /// this one at a time.
    pub(super) async fn after<F>(
        self: &Arc<Self>,
        arrived: Instant,
        deadline: Instant,
        fetch: F,
    ) -> Result<Map, String>
    where
        F: FnOnce(Duration) -> Result<Vec<(String, Listed)>, String> + Send + 'static,
    {
        let timed_out = || "metadata lookup timed out".to_string();
        // Within half the lookup's own time, however short `kafka.metadata_timeout` is: a
        // lookup must not time out waiting for its turn behind the spacing alone.
        let spacing = SPACING.min(deadline.saturating_duration_since(arrived) / 2);
        loop {
            let ended = self.done.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let next = {
                let state = lock(&self.state);
                if let Some((asked, map)) = &state.last
                    && *asked >= arrived
                {
                    return Ok(map.clone());
                }
                if state.running {
                    None
                } else {
                    Some(
                        state
                            .asked
                            .map_or(Instant::now(), |(at, took)| at + took.max(spacing)),
                    )
                }
            };
            match next {
                None => {
                    tokio::time::timeout_at(deadline.into(), ended)
                        .await
                        .map_err(|_| timed_out())?;
                }
                Some(next) => {
                    tokio::time::sleep_until(next.min(deadline).into()).await;
                    break;
                }
            }
        }
        let asked = Instant::now();
        if asked >= deadline {
            return Err(timed_out());
        }
        lock(&self.state).running = true;
        // Ends the listing whatever becomes of the task: done, panicked, or never run (a
        // runtime shutting down drops it), so that no later lookup waits for nothing.
        let running = Running(self.clone());
        let this = self.clone();
        let made = tokio::task::spawn_blocking(move || {
            let left = deadline.saturating_duration_since(Instant::now());
            let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fetch(left)))
                .unwrap_or_else(|_| Err("metadata listing failed".into()));
            let mut state = lock(&this.state);
            state.asked = Some((asked, asked.elapsed()));
            let map = found.map(|found| Arc::new(found.into_iter().collect::<HashMap<_, _>>()));
            if let Ok(map) = &map {
                state.last = Some((asked, map.clone()));
                this.made.fetch_add(1, Ordering::Relaxed);
            }
            drop(state);
            drop(running);
            map
        });
        // The task records its listing even when this lookup stops waiting for it.
        tokio::time::timeout_at(deadline.into(), made)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| e.to_string())?
    }
}

/// A listing under way; its end is recorded and told when this is dropped.
struct Running(Arc<Listings>);

impl Drop for Running {
    fn drop(&mut self) {
        lock(&self.0.state).running = false;
        self.0.done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_whose_lookup_went_away_is_kept_and_shared() {
        let listings = Arc::new(Listings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = |calls: Arc<AtomicUsize>| {
            move |_left| {
                calls.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                Ok(vec![("t".to_string(), Listed::Partitions(1))])
            }
        };
        let arrived = Instant::now();
        let deadline = arrived + Duration::from_secs(10);
        let first = tokio::spawn({
            let (listings, fetch) = (listings.clone(), fetch(calls.clone()));
            async move { listings.after(arrived, deadline, fetch).await }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The client hung up while its listing ran.
        first.abort();
        // The next lookup waits for that listing instead of starting a second one beside it,
        // and, having arrived before it was asked for, is answered from it.
        let map = listings
            .after(arrived, deadline, fetch(calls.clone()))
            .await
            .unwrap();
        assert_eq!(map.get("t"), Some(&Listed::Partitions(1)));
        assert_eq!((calls.load(Ordering::SeqCst), listings.made()), (1, 1));
        // One that arrives later gets a listing of its own.
        let later = Instant::now();
        listings
            .after(later, later + Duration::from_secs(10), fetch(calls.clone()))
            .await
            .unwrap();
        assert_eq!(listings.made(), 2);
    }

    #[tokio::test]
    async fn a_listing_that_panicked_leaves_the_next_lookup_free() {
        let listings = Arc::new(Listings::default());
        let now = Instant::now();
        let deadline = now + Duration::from_secs(10);
        let failed = listings
            .after(
                now,
                deadline,
                |_| -> Result<Vec<(String, Listed)>, String> { panic!("listing") },
            )
            .await;
        assert!(failed.is_err());
        let later = Instant::now();
        let map = listings
            .after(later, later + Duration::from_secs(10), |_| Ok(Vec::new()))
            .await
            .unwrap();
        assert!(map.is_empty());
    }
}
