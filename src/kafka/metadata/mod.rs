//! The topics the brokers have, cached: a known topic costs a hash lookup, an unknown one gets a
//! fast 404 instead of librdkafka's 30 s wait for metadata that never comes.
//! A name not in the cache is looked up in a listing of the whole cluster ([`super::listing`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer as _;

use super::poller::Polled;

mod refresh;
mod refused;

pub use refused::WriteRefusals;

use super::listing::Listings;
use super::partition::Rotation;

/// What kafboy knows of one topic.
#[derive(Debug, Default)]
pub struct TopicInfo {
    /// Partitions records go to.
    pub partitions: i32,
    /// Partitions the brokers list, when more than `partitions`: added since the refresh
    /// before, and used from the next refresh on. librdkafka refuses a record for a partition
    /// its producer does not know yet, and each producer learns of new partitions at its own
    /// refresh, as often as kafboy's; records spread over partitions some producer lacks would
    /// be refused midway through a request, after others of it were queued.
    pub added: i32,
    /// `added` was set by a lookup, not a refresh: it waits for the refresh after the next,
    /// since the next one may come at any moment after the lookup.
    pub(super) added_by_lookup: bool,
    /// State of the round-robin and sticky strategies.
    pub rotation: Rotation,
    /// What a listing said of the topic when a request named a partition past `partitions`
    /// (`None`: not listed), and when: one listing per `unknown_topic_ttl` settles the
    /// requests that do so.
    pub(super) listed: std::sync::Mutex<Option<(Instant, Option<Listed>)>>,
}

impl TopicInfo {
    /// A topic of `partitions` partitions, none added since.
    pub fn with_partitions(partitions: i32) -> TopicInfo {
        TopicInfo {
            partitions,
            ..TopicInfo::default()
        }
    }
}

#[derive(Debug)]
enum Entry {
    Known(Arc<TopicInfo>),
    /// A topic the brokers do not have, refuse kafboy (Kafka also says so of names that do not
    /// exist when kafboy may not describe them), or list without partitions yet: the answer,
    /// remembered for `unknown_topic_ttl`, so such names cost one lookup per TTL.
    Refused(Instant, LookupError),
}

/// A topic as a metadata answer lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listed {
    Partitions(i32),
    /// The brokers refuse kafboy the topic (Kafka lists it with no partitions then).
    Denied,
    /// Listed with another error and no partitions: being created (auto-create answers the
    /// request that creates a topic with `LEADER_NOT_AVAILABLE`) or between leaders. It exists,
    /// or is about to; librdkafka treats this as temporary too. (No error and no partitions
    /// is a topic on its way out, as a deleted one may be listed: missing.)
    Settling(RDKafkaErrorCode),
}

impl Listed {
    /// A topic of a metadata answer, from its error and partition count; `None` for a topic
    /// the brokers do not have.
    fn of(error: Option<RDKafkaErrorCode>, partitions: i32) -> Option<Listed> {
        Some(match error {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return None,
            Some(RDKafkaErrorCode::TopicAuthorizationFailed) => Listed::Denied,
            Some(error) if partitions == 0 => Listed::Settling(error),
            _ => Listed::Partitions(partitions),
        })
    }
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

/// A lookup's hold on its turn ([`Topics::turn`]).
type Turn = Option<tokio::sync::OwnedMutexGuard<()>>;

/// Remembered missing topics beyond this are forgotten early, so random names cannot grow memory.
const MAX_MISSING: usize = 10_000;

/// Misses between two counts of the remembered ones, on a cache past [`MAX_MISSING`] entries:
/// at most this many more are remembered.
const COUNT_EVERY: usize = 1_000;

/// The cache, shared by all requests.
pub struct Topics {
    entries: RwLock<HashMap<String, Entry>>,
    client: RwLock<Polled>,
    /// One lookup at a time; owned, so that a by-name fetch holds it to its end.
    lookup: Arc<tokio::sync::Mutex<()>>,
    /// Listings of the whole cluster, for lookups.
    listings: Arc<Listings>,
    /// A refresh asked for by [`Topics::refresh_soon`] is under way.
    refreshing: AtomicBool,
    fetched: AtomicBool,
    timeout: Duration,
    missing_ttl: Duration,
    /// Lookups ask for the topic by name, so that the brokers create it (`auto_create_topics`):
    /// every name becomes a topic then, and a topic object in librdkafka is the lesser cost.
    by_name: bool,
    /// Topics the producers found the brokers refuse kafboy to write.
    refusals: Arc<WriteRefusals>,
    /// Misses remembered since [`make_room`] last counted them.
    misses: AtomicUsize,
    /// Topics known once that the brokers no longer list, with the partitions they were used
    /// with: created again, they start from those ([`refresh::listed_anew`]).
    gone: std::sync::Mutex<HashMap<String, i32>>,
}

impl Topics {
    /// A cache that asks the brokers through `client`; `by_name` when a lookup should make the
    /// brokers create the topic.
    pub fn new(
        client: Polled,
        timeout: Duration,
        missing_ttl: Duration,
        by_name: bool,
        refusals: Arc<WriteRefusals>,
    ) -> Self {
        Topics {
            entries: RwLock::default(),
            client: RwLock::new(client),
            lookup: Arc::default(),
            listings: Arc::default(),
            refreshing: AtomicBool::new(false),
            fetched: AtomicBool::new(false),
            timeout,
            missing_ttl,
            by_name,
            refusals,
            misses: AtomicUsize::new(0),
            gone: std::sync::Mutex::default(),
        }
    }

    /// Asks through `client` from now on (after the old one was replaced).
    pub fn set_client(&self, client: Polled) {
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
    }

    /// Up to `limit` known topics with their partition counts, by name.
    pub fn known(&self, limit: usize) -> Vec<(String, i32)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut known: Vec<(&str, i32)> = entries
            .iter()
            .filter_map(|(name, e)| match e {
                Entry::Known(info) => Some((name.as_str(), info.partitions)),
                Entry::Refused(..) => None,
            })
            .collect();
        // The first `limit` by name, without sorting them all: a status page open on a cluster
        // of many topics asks every 2 s, while requests wait to read the same map.
        if known.len() > limit && limit > 0 {
            known.select_nth_unstable(limit - 1);
        }
        known.truncate(limit);
        known.sort_unstable();
        known.into_iter().map(|(n, p)| (n.to_string(), p)).collect()
    }

    /// Whether metadata was fetched from the brokers at least once.
    pub fn fetched(&self) -> bool {
        self.fetched.load(Ordering::Acquire)
    }

    fn cached(&self, topic: &str) -> Option<Result<Arc<TopicInfo>, LookupError>> {
        self.take_refusals();
        // A poisoned lock only means a panic elsewhere mid-insert; the map itself stays usable.
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(topic)? {
            Entry::Known(info) => Some(Ok(info.clone())),
            Entry::Refused(at, answer) if at.elapsed() < self.missing_ttl => {
                Some(Err(answer.clone()))
            }
            Entry::Refused(..) => None,
        }
    }

    /// The topic's metadata, asking the brokers on a miss (one lookup at a time, bounded wait).
    pub async fn lookup(self: &Arc<Self>, topic: &str) -> Result<Arc<TopicInfo>, LookupError> {
        if let Some(hit) = self.cached(topic) {
            return hit;
        }
        // One deadline for waiting our turn and for the request itself.
        let arrived = Instant::now();
        let deadline = arrived + self.timeout;
        let mut turn = self
            .turn(deadline)
            .await
            .map_err(|_| LookupError::Unavailable("metadata lookup timed out".into()))?;
        if let Some(hit) = self.cached(topic) {
            return hit;
        }
        let listed = self
            .listed(topic, arrived, deadline, &mut turn)
            .await
            .map_err(LookupError::Unavailable)?;
        self.take_refusals();
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // A refresh or a producer's report may have settled the topic while the listing ran:
        // that answer is at least as new as this one (a refresh listing the topic just
        // created, a refusal to write it), so it stands.
        match entries.get(topic) {
            Some(Entry::Known(info)) => return Ok(info.clone()),
            Some(Entry::Refused(at, answer)) if at.elapsed() < self.missing_ttl => {
                return Err(answer.clone());
            }
            _ => {}
        }
        let listed = listed.map(|l| (topic, l));
        if !matches!(listed, Some((_, Listed::Partitions(p))) if p > 0) {
            make_room(&mut entries, self.missing_ttl, &self.misses);
        }
        let answer = match listed {
            Some((_, Listed::Partitions(partitions))) if partitions > 0 => {
                let mut info =
                    refresh::listed_anew(&mut crate::lock(&self.gone), topic, partitions);
                info.added_by_lookup = info.added > 0;
                let info = Arc::new(info);
                entries.insert(topic.to_string(), Entry::Known(info.clone()));
                return Ok(info);
            }
            Some((_, Listed::Denied)) => LookupError::Denied,
            Some((_, Listed::Settling(error))) => LookupError::Unavailable(format!(
                "topic {topic:?} has no usable partitions yet: {error}"
            )),
            _ => LookupError::Unknown,
        };
        entries.insert(
            topic.to_string(),
            Entry::Refused(Instant::now(), answer.clone()),
        );
        Err(answer)
    }

    /// Listings of the whole cluster lookups have made.
    pub fn listings(&self) -> u64 {
        self.listings.made()
    }

    /// This lookup's turn (one at a time), waited for until `deadline`; in an `Option`, so that
    /// a by-name fetch can take it along (see [`Topics::listed`]).
    async fn turn(&self, deadline: Instant) -> Result<Turn, tokio::time::error::Elapsed> {
        let guard = tokio::time::timeout_at(deadline.into(), self.lookup.clone().lock_owned());
        Ok(Some(guard.await?))
    }

    /// How the brokers list `topic`, if at all, for a lookup that `arrived` then: from a
    /// listing of the whole cluster asked for since; by name with auto-create. A by-name
    /// fetch takes the lookup's `turn` along: a lookup given up (its client gone) must not
    /// let the next one start a fetch beside a fetch that goes on blocking a thread.
    async fn listed(
        self: &Arc<Self>,
        topic: &str,
        arrived: Instant,
        deadline: Instant,
        turn: &mut Turn,
    ) -> Result<Option<Listed>, String> {
        let this = self.clone();
        if !self.by_name {
            let fetch = move |left| this.fetch(None, left);
            let map = self.listings.after(arrived, deadline, fetch).await?;
            return Ok(map.get(topic).copied());
        }
        let name = topic.to_string();
        let left = deadline.saturating_duration_since(Instant::now());
        let held = turn.take();
        let (found, held) =
            tokio::task::spawn_blocking(move || (this.fetch(Some(&name), left), held))
                .await
                .map_err(|e| e.to_string())?;
        *turn = held;
        let found = found?;
        Ok(found.into_iter().find(|(n, _)| n == topic).map(|(_, l)| l))
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
                let error = t.error().map(RDKafkaErrorCode::from);
                let listed = Listed::of(error, t.partitions().len() as i32)?;
                Some((t.name().to_string(), listed))
            })
            .collect())
    }
}

/// Room for one more miss: past [`MAX_MISSING`] remembered, misses are forgotten, all but
/// refusals to write within their TTL (which random names cannot be). Known topics do not
/// count: on a cluster of more topics than that, every miss would forget the others. On such
/// a cluster they are counted once per [`COUNT_EVERY`] misses (`since` counts them), not at
/// every one: a count reads the whole cache, under its write lock.
fn make_room(entries: &mut HashMap<String, Entry>, ttl: Duration, since: &AtomicUsize) {
    let missing = |entries: &HashMap<String, Entry>| {
        entries
            .values()
            .filter(|e| matches!(e, Entry::Refused(..)))
            .count()
    };
    if entries.len() <= MAX_MISSING || since.fetch_add(1, Ordering::Relaxed) + 1 < COUNT_EVERY {
        return;
    }
    since.store(0, Ordering::Relaxed);
    if missing(entries) <= MAX_MISSING {
        return;
    }
    entries.retain(|_, e| match e {
        Entry::Known(_) => true,
        Entry::Refused(at, LookupError::Denied) => at.elapsed() < ttl,
        Entry::Refused(..) => false,
    });
}

#[cfg(test)]
mod tests {
    use super::refresh::merged;
    use super::*;
    use RDKafkaErrorCode as E;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_topic_refused_for_writes_stays_refused_until_its_ttl_though_listed() {
        let mut entries = HashMap::from([(
            "t".to_string(),
            Entry::Refused(Instant::now(), LookupError::Denied),
        )]);
        let found = || vec![("t".to_string(), Listed::Partitions(3))];
        let mut fresh = merged(&mut entries, found(), TTL);
        assert!(matches!(
            fresh.get("t"),
            Some(Entry::Refused(_, LookupError::Denied))
        ));
        let fresh = merged(&mut fresh, found(), Duration::ZERO);
        assert!(
            matches!(fresh.get("t"), Some(Entry::Known(_))),
            "past its TTL"
        );
    }

    #[test]
    fn only_misses_count_toward_the_cap_on_misses() {
        let info = Arc::new(TopicInfo::with_partitions(1));
        let known = || Entry::Known(info.clone());
        let miss = || Entry::Refused(Instant::now(), LookupError::Unknown);
        let mut entries: HashMap<String, Entry> = (0..MAX_MISSING + 2000)
            .map(|i| (format!("t{i}"), known()))
            .collect();
        entries.insert("ordrs".into(), miss());
        let since = AtomicUsize::new(COUNT_EVERY - 1);
        make_room(&mut entries, TTL, &since);
        assert!(
            entries.contains_key("ordrs"),
            "a big cluster forgot its miss"
        );
        entries.extend((0..MAX_MISSING).map(|i| (format!("x{i}"), miss())));
        entries.insert(
            "denied".into(),
            Entry::Refused(Instant::now(), LookupError::Denied),
        );
        // Counted once per COUNT_EVERY misses, not at every one.
        let all = entries.len();
        for _ in 0..COUNT_EVERY - 1 {
            make_room(&mut entries, TTL, &since);
        }
        assert_eq!(entries.len(), all, "not counted yet");
        make_room(&mut entries, TTL, &since);
        assert_eq!(
            entries.len(),
            MAX_MISSING + 2000 + 1,
            "misses forgotten, the rest kept"
        );
        assert!(entries.contains_key("denied"));
    }

    #[test]
    fn a_topic_listed_with_an_error_and_no_partitions_is_settling() {
        assert_eq!(Listed::of(None, 3), Some(Listed::Partitions(3)));
        assert_eq!(Listed::of(Some(E::UnknownTopicOrPartition), 0), None);
        assert_eq!(
            Listed::of(Some(E::TopicAuthorizationFailed), 0),
            Some(Listed::Denied)
        );
        assert_eq!(
            Listed::of(Some(E::LeaderNotAvailable), 0),
            Some(Listed::Settling(E::LeaderNotAvailable))
        );
        assert_eq!(
            Listed::of(Some(E::LeaderNotAvailable), 2),
            Some(Listed::Partitions(2))
        );
    }

    #[test]
    fn a_refresh_keeps_known_topics_between_leaders_and_remembered_misses() {
        let known = Arc::new(TopicInfo::with_partitions(4));
        let mut entries = HashMap::from([
            ("a".to_string(), Entry::Known(known.clone())),
            ("b".to_string(), Entry::Known(known.clone())),
            (
                "gone".to_string(),
                Entry::Refused(Instant::now(), LookupError::Unknown),
            ),
            ("dropped".to_string(), Entry::Known(known.clone())),
        ]);
        let found = vec![
            ("a".to_string(), Listed::Settling(E::LeaderNotAvailable)),
            ("b".to_string(), Listed::Partitions(6)),
            ("new".to_string(), Listed::Settling(E::LeaderNotAvailable)),
        ];
        let fresh = merged(&mut entries, found, TTL);
        let partitions = |name: &str| match fresh.get(name) {
            Some(Entry::Known(info)) => Some(info.partitions),
            _ => None,
        };
        assert_eq!(partitions("a"), Some(4), "kept as it was");
        assert_eq!(
            partitions("b"),
            Some(4),
            "6 listed: used from the next refresh"
        );
        assert!(matches!(
            fresh.get("gone"),
            Some(Entry::Refused(_, LookupError::Unknown))
        ));
        assert!(!fresh.contains_key("new") && !fresh.contains_key("dropped"));
    }

    #[test]
    fn a_topic_created_again_with_more_partitions_starts_from_those_it_had() {
        use super::refresh::{listed_anew, merged_with};
        let known = |p| Entry::Known(Arc::new(TopicInfo::with_partitions(p)));
        let counts = |entries: &HashMap<String, Entry>| match entries.get("t") {
            Some(Entry::Known(info)) => (info.partitions, info.added),
            _ => panic!("t is not known"),
        };
        let listed = |p| vec![("t".to_string(), Listed::Partitions(p))];
        let mut gone = HashMap::new();
        let mut entries = HashMap::from([("t".to_string(), known(2))]);
        // Deleted: no longer listed, remembered with its count.
        let mut fresh = merged_with(&mut entries, vec![], TTL, &mut gone);
        assert!(!fresh.contains_key("t"));
        assert_eq!(gone.get("t"), Some(&2));
        // Created again with four: the producers may know only two until the next refresh.
        let mut fresh = merged_with(&mut fresh, listed(4), TTL, &mut gone);
        assert_eq!(counts(&fresh), (2, 4));
        let fresh = merged_with(&mut fresh, listed(4), TTL, &mut gone);
        assert_eq!(counts(&fresh), (4, 0));
        // A lookup that finds it first does the same; created with fewer, or never known, the
        // listed count holds at once.
        gone.insert("t".into(), 2);
        let info = listed_anew(&mut gone, "t", 4);
        assert_eq!((info.partitions, info.added), (2, 4));
        // Seen first by a lookup, the next refresh may come at once: the one after uses them.
        let looked_up = TopicInfo {
            added_by_lookup: true,
            ..info
        };
        let mut entries = HashMap::from([("t".to_string(), Entry::Known(Arc::new(looked_up)))]);
        let mut fresh = merged_with(&mut entries, listed(4), TTL, &mut gone);
        assert_eq!(counts(&fresh), (2, 4));
        let fresh = merged_with(&mut fresh, listed(4), TTL, &mut gone);
        assert_eq!(counts(&fresh), (4, 0));
        assert!(gone.is_empty());
        gone.insert("t".into(), 8);
        assert_eq!(listed_anew(&mut gone, "t", 4).partitions, 4);
        assert_eq!(listed_anew(&mut gone, "u", 4).partitions, 4);
    }

    #[test]
    fn added_partitions_are_used_from_the_next_refresh() {
        let mut entries = HashMap::from([(
            "t".to_string(),
            Entry::Known(Arc::new(TopicInfo::with_partitions(3))),
        )]);
        let counts = |entries: &HashMap<String, Entry>| match entries.get("t") {
            Some(Entry::Known(info)) => (info.partitions, info.added),
            _ => panic!("t is not known"),
        };
        let listed = |p| vec![("t".to_string(), Listed::Partitions(p))];
        let mut fresh = merged(&mut entries, listed(6), TTL);
        assert_eq!(counts(&fresh), (3, 6), "seen, not used yet");
        let mut fresh = merged(&mut fresh, listed(6), TTL);
        assert_eq!(counts(&fresh), (6, 0), "used from the next refresh");
        // Added again before the first addition was used: the wait starts over.
        fresh = merged(&mut fresh, listed(8), TTL);
        let mut fresh = merged(&mut fresh, listed(9), TTL);
        assert_eq!(counts(&fresh), (6, 9));
        let fresh = merged(&mut fresh, listed(9), TTL);
        assert_eq!(counts(&fresh), (9, 0));
    }

    type Mock = rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

    /// A mock cluster with `listed` topics, and a cache on it.
    fn cache(listed: &[(&str, i32)]) -> (Mock, Topics) {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        for (name, partitions) in listed {
            cluster.create_topic(name, *partitions, 1).unwrap();
        }
        let client = crate::kafka::poller::tests::producer(&cluster.bootstrap_servers());
        let topics = Topics::new(
            Polled::new(client, "meta").unwrap(),
            Duration::from_secs(10),
            Duration::from_secs(30),
            false,
            Arc::default(),
        );
        (cluster, topics)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_topic_refused_for_writes_is_denied_until_its_ttl() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("real", 3, 1).unwrap();
        let client = crate::kafka::poller::tests::producer(&cluster.bootstrap_servers());
        let refusals = Arc::new(WriteRefusals::default());
        // Long enough to cover a refresh on a busy machine: the refusal must outlast it.
        let ttl = Duration::from_secs(3);
        let topics = Arc::new(Topics::new(
            Polled::new(client, "meta").unwrap(),
            Duration::from_secs(10),
            ttl,
            false,
            refusals.clone(),
        ));
        assert!(topics.lookup("real").await.is_ok());
        let refused_at = Instant::now();
        refusals.refused("real");
        assert_eq!(
            topics.lookup("real").await.unwrap_err(),
            LookupError::Denied
        );
        // A refresh lists it, and leaves the refusal in place.
        topics.refresh_all().unwrap();
        assert_eq!(
            topics.lookup("real").await.unwrap_err(),
            LookupError::Denied
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while topics.lookup("real").await.is_err() {
            assert!(Instant::now() < deadline, "still refused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused_at.elapsed() >= ttl);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_that_wait_together_share_one_listing_of_the_cluster() {
        let (cluster, topics) = cache(&[("real", 3)]);
        let topics = Arc::new(topics);
        assert_eq!(topics.lookup("real").await.unwrap().partitions, 3);
        assert_eq!(topics.listings(), 1);
        let lookups: Vec<_> = (0..50)
            .map(|i| {
                let topics = topics.clone();
                tokio::spawn(async move { topics.lookup(&format!("made-up-{i}")).await })
            })
            .collect();
        for lookup in lookups {
            assert_eq!(lookup.await.unwrap().err(), Some(LookupError::Unknown));
        }
        let made = topics.listings();
        assert!(made <= 4, "{made} listings for 50 names");
        // A topic created now is found by the next lookup: no listing older than the lookup
        // answers it.
        cluster.create_topic("new", 2, 1).unwrap();
        assert_eq!(topics.lookup("new").await.unwrap().partitions, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_past_the_count_of_a_topic_since_deleted_is_the_topics_404() {
        let (_cluster, topics) = cache(&[("real", 3)]);
        let topics = Arc::new(topics);
        // Known to the cache, gone from the brokers (deleted since the last refresh).
        let info = Arc::new(TopicInfo::with_partitions(3));
        let made = topics.listings();
        for _ in 0..5 {
            assert_eq!(
                topics.listed_partitions("gone", &info).await,
                Err(LookupError::Unknown)
            );
        }
        assert_eq!(topics.listings(), made + 1, "one listing answers them all");
        assert_eq!(
            topics
                .listed_partitions("real", &Arc::new(TopicInfo::with_partitions(1)))
                .await,
            Ok(3)
        );
    }

    #[test]
    fn the_status_page_gets_the_first_topics_by_name() {
        let (_cluster, topics) = cache(&[("d", 4), ("b", 2), ("a", 1), ("c", 3)]);
        topics.refresh_all().unwrap();
        let names = |n| -> Vec<(String, i32)> { topics.known(n) };
        assert_eq!(names(2), [("a".to_string(), 1), ("b".to_string(), 2)]);
        assert_eq!(names(10).len(), 4);
        assert_eq!(names(0), []);
    }

    #[test]
    fn a_catch_up_applies_deleted_and_shrunk_topics_only() {
        let (_cluster, topics) = cache(&[("kept", 4), ("grown", 2), ("shrunk", 1)]);
        let known = |name: &str, partitions| {
            let info = Arc::new(TopicInfo::with_partitions(partitions));
            (name.to_string(), Entry::Known(info))
        };
        *topics.entries.write().unwrap() = HashMap::from([
            known("kept", 4),
            known("grown", 1),
            known("shrunk", 3),
            known("deleted", 5),
        ]);
        topics.shrink(topics.fetch(None, Duration::from_secs(10)).unwrap());
        assert_eq!(
            topics.known(10),
            [
                ("grown".to_string(), 1),
                ("kept".to_string(), 4),
                ("shrunk".to_string(), 1)
            ]
        );
    }
}
