//! A producer's place: the producer requests take now, replaced after a fatal error or a
//! fence, and what it shares with the producers that replace it.

use std::sync::{Arc, Mutex, RwLock};

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

use super::delivery::Tally;
use super::gate::Gate;
use super::metadata::WriteRefusals;
use super::producer::Producer;
use super::{describe, retire};
use crate::config::KafkaConfig;
use crate::lock;

/// What a producer shares with the producers that replace it after a fatal error or a fence.
#[derive(Clone)]
pub struct Shared {
    /// Delivery counts.
    pub tally: Arc<Tally>,
    /// Per-topic counters.
    pub topics: Arc<crate::metrics::Topics>,
    /// Broker states from statistics.
    pub brokers: Arc<std::sync::Mutex<Vec<crate::metrics::BrokerState>>>,
    /// Brokers the slot's producers have given a `kafboy_broker_up` series, the replaced ones
    /// included: a series outlives the producer that made it.
    pub exported: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Closed for the final flush.
    pub gate: Arc<Gate>,
    /// Where topics the brokers refuse to let kafboy write are reported.
    pub refusals: Arc<super::metadata::WriteRefusals>,
    /// Records a fenced producer's brokers refused, for its replacement to send again.
    pub rescue: Arc<super::rescue::Rescue>,
}

/// A producer that is replaced when librdkafka reports a fatal error or the brokers fence it.
/// Requests take the current one; a replaced producer keeps delivering what it had in flight,
/// then goes.
pub struct Slot {
    pub(super) name: String,
    recipe: ClientConfig,
    kafka: Arc<KafkaConfig>,
    pub(super) shared: Shared,
    current: RwLock<Arc<Producer>>,
    /// When the producer may be replaced again after a fatal error.
    pub(super) backoff: Mutex<retire::Backoff>,
}

impl Slot {
    pub(super) fn new(
        name: &str,
        kafka: &Arc<KafkaConfig>,
        recipe: ClientConfig,
        topics: &Arc<crate::metrics::Topics>,
        gate: &Arc<Gate>,
        refusals: &Arc<WriteRefusals>,
    ) -> Result<Slot, String> {
        let shared = Shared {
            tally: Arc::default(),
            topics: topics.clone(),
            brokers: Arc::default(),
            exported: Arc::default(),
            gate: gate.clone(),
            refusals: refusals.clone(),
            rescue: Arc::default(),
        };
        let producer = Producer::build(name, kafka, recipe.clone(), &shared)
            .map_err(|e| format!("{} ({name} producer)", describe(&e)))?;
        Ok(Slot {
            name: name.to_string(),
            recipe,
            kafka: kafka.clone(),
            shared,
            current: RwLock::new(Arc::new(producer)),
            backoff: Mutex::default(),
        })
    }

    /// The settings its producers are built with.
    pub(super) fn kafka(&self) -> &KafkaConfig {
        &self.kafka
    }

    /// The producer's name (`sync`, `async`, `batch`, `batch-N`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Brokers as the latest statistics saw them.
    pub fn brokers(&self) -> Vec<crate::metrics::BrokerState> {
        lock(&self.shared.brokers).clone()
    }

    /// The producer requests use now.
    pub fn current(&self) -> Arc<Producer> {
        // A poisoned lock only means a panic elsewhere during a swap; the Arc in it is whole.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends the records kept from a fenced producer through `to` ([`super::rescue::Rescue::resend`]).
    pub(super) fn resend_kept(&self, to: &Producer) {
        self.shared.rescue.resend(to, self.kafka.message_timeout);
    }

    /// Builds a fresh producer and puts it in place of the current one; returns the old one,
    /// which joins `retiring` before the new one can be seen: a shutdown's flush that finds
    /// the new producer finds the old one too.
    /// The records its brokers refused to a fenced producer go into the new one first.
    pub(super) fn replace(
        &self,
        retiring: &Mutex<Vec<Arc<Producer>>>,
    ) -> Result<Arc<Producer>, KafkaError> {
        let fresh = Producer::build(&self.name, &self.kafka, self.recipe.clone(), &self.shared)?;
        self.resend_kept(&fresh);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *current, Arc::new(fresh));
        lock(retiring).push(old.clone());
        Ok(old)
    }
}
