//! The producers: one for `sync` (no linger), one for `async` (a short linger), one batching
//! producer for the batch modes plus one per group of topics with their own batch settings. Built
//! once, shared by every request.

pub mod admission;
mod client;
mod credentials;
pub mod delivery;
mod ffi;
mod flush;
mod gate;
mod listing;
pub mod metadata;
pub mod partition;
mod poller;
mod producer;
mod record;
mod rescue;
mod retire;
mod slot;
mod unnumbered;

pub use client::{check, client_config};
pub use delivery::Report;
pub use flush::Flushed;
pub use gate::Gate;
pub use producer::{Producer, SendError, set_queue_limits};
pub use record::{First, Record};
pub use slot::{Shared, Slot};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;

use crate::config::{Config, Mode};
use crate::lock;
use client::Plan;
use metadata::{Topics, WriteRefusals};

/// A librdkafka error without the property's value (it may be a secret).
pub fn describe(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, _) => format!("kafka property {key:?}: {desc}"),
        other => format!("kafka: {other}"),
    }
}

/// Every producer kafboy runs, and the topic cache.
pub struct Producers {
    /// First: its client also serves topic metadata.
    sync: Slot,
    asynchronous: Slot,
    batch: Slot,
    /// Batching producers for topics with their own batch settings.
    groups: Vec<Slot>,
    /// Topic → index in `groups`.
    batch_by_topic: HashMap<String, usize>,
    /// Metadata of the topics the brokers have.
    pub topics: Arc<Topics>,
    /// Closes them all for the final flush.
    gate: Arc<Gate>,
    /// Producers replaced after a fatal error, until what they had in flight is done: the
    /// final flush waits for them too, and counts what they still hold.
    retiring: Arc<Mutex<Vec<Arc<Producer>>>>,
    /// Records lost before the shutdown began: the ones after count against its exit code.
    lost_at_stop: std::sync::OnceLock<u64>,
    /// Held while producers are replaced (and kept records sent again), and by the shutdown's
    /// flush before it looks at the producers: it then finds every record either kept or in
    /// a producer it sees.
    replacing: tokio::sync::Mutex<()>,
}

impl Producers {
    /// Builds the producers. Errors name the config key at fault.
    pub fn build(
        config: &Config,
        topics: &Arc<crate::metrics::Topics>,
    ) -> Result<Producers, String> {
        let kafka = Arc::new(config.kafka.clone());
        let plan = Plan::new(config)?;
        let gate = Arc::new(Gate::default());
        let refusals = Arc::new(WriteRefusals::default());
        let slot = |name: &str, recipe| Slot::new(name, &kafka, recipe, topics, &gate, &refusals);
        let sync = slot("sync", plan.sync)?;
        let asynchronous = slot("async", plan.asynchronous)?;
        let batch = slot("batch", plan.batch)?;
        let groups = plan
            .groups
            .into_iter()
            .enumerate()
            .map(|(i, recipe)| slot(&format!("batch-{}", i + 1), recipe))
            .collect::<Result<Vec<_>, _>>()?;
        let batch_by_topic = plan.batch_by_topic;
        let topics = Arc::new(Topics::new(
            sync.current().inner.clone(),
            kafka.metadata_timeout,
            kafka.unknown_topic_ttl,
            kafka.auto_create_topics,
            refusals,
        ));
        Ok(Producers {
            sync,
            asynchronous,
            batch,
            groups,
            batch_by_topic,
            topics,
            gate,
            retiring: Arc::default(),
            replacing: tokio::sync::Mutex::default(),
            lost_at_stop: std::sync::OnceLock::new(),
        })
    }

    /// How long a record may take to be delivered, retries included, before it fails
    /// (`kafka.message_timeout`; the sync producer's may be shorter).
    pub fn message_timeout(&self) -> Duration {
        self.batch.kafka().message_timeout
    }

    /// The producer that serves `mode` for `topic`.
    pub fn for_mode(&self, mode: Mode, topic: &str) -> Arc<Producer> {
        match mode {
            Mode::Sync => self.sync.current(),
            Mode::Async => self.asynchronous.current(),
            Mode::BatchAsync | Mode::BatchSync => match self.batch_by_topic.get(topic) {
                Some(&i) => self.groups[i].current(),
                None => self.batch.current(),
            },
        }
    }

    /// Every slot.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        [&self.sync, &self.asynchronous, &self.batch]
            .into_iter()
            .chain(self.groups.iter())
    }

    /// Records queued and in flight in `slot`'s producers: the current one, and any replaced
    /// after a fatal error that still holds records.
    pub fn held(&self, slot: &Slot) -> (usize, usize) {
        let current = slot.current();
        let mut held = (current.queued(), current.in_flight());
        for old in lock(&self.retiring)
            .iter()
            .filter(|p| p.name() == slot.name())
        {
            held.0 += old.queued();
            held.1 += old.in_flight();
        }
        held
    }

    /// The current producer of every slot, for flushing and reporting.
    pub fn all(&self) -> Vec<Arc<Producer>> {
        self.slots().map(Slot::current).collect()
    }

    /// Records delivered and failed since start, over all producers (replaced ones included).
    pub fn tally(&self) -> (u64, u64) {
        self.slots().fold((0, 0), |(d, f), slot| {
            let (sd, sf) = slot.shared.tally.counts();
            (d + sd, f + sf)
        })
    }

    /// Raises a fatal error in the producer of `mode` (the shared batch one for the batch
    /// modes), for fault tests.
    #[doc(hidden)]
    pub fn inject_fatal_error(&self, mode: Mode) {
        ffi::inject_fatal_error(&self.for_mode(mode, "").inner);
    }

    /// Why the server is not ready, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        // First: at start, it is also why there is no metadata.
        if self.all().iter().any(|p| p.credentials_refused()) {
            Some("the brokers refuse kafboy's TLS or SASL credentials")
        } else if !self.topics.fetched() {
            Some("no broker metadata yet")
        } else if self.all().iter().any(|p| p.is_fatal()) {
            Some("fatal producer error")
        } else {
            None
        }
    }

    /// Notes that a shutdown began: records answered `202` that fail from now on (during the
    /// drain, or the flush) are lost with the shutdown, and make its exit code 1.
    pub fn note_stop(&self) {
        let _ = self.lost_at_stop.set(self.lost());
    }

    /// Records failed since start that only memory held (a spool's dead-letters are on disk).
    fn lost(&self) -> u64 {
        self.slots()
            .map(|slot| slot.shared.tally.lost.load(Ordering::Relaxed))
            .sum()
    }
}
