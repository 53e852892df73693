//! The producers: one low-latency producer for `async`/`sync`, one batching producer for the batch
//! modes plus one per group of topics with their own batch settings. Built once, shared by every
//! request.

pub mod admission;
pub mod delivery;
pub mod metadata;
pub mod partition;
mod producer;

pub use producer::{Producer, Record, SendError};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

use crate::config::{Acks, BatchConfig, Compression, Config, KafkaConfig, Mode};
use metadata::Topics;

/// Every producer kafboy runs, and the topic cache.
pub struct Producers {
    latency: Producer,
    batch: Producer,
    /// Batching producers for topics with their own batch settings.
    batch_by_topic: HashMap<String, Arc<Producer>>,
    groups: Vec<Arc<Producer>>,
    /// Metadata of the topics the brokers have.
    pub topics: Arc<Topics>,
}

impl Producers {
    /// Builds the producers. Errors name the config key at fault.
    pub fn build(config: &Config) -> Result<Producers, String> {
        let kafka = &config.kafka;
        let base = client_config(kafka)?;
        let fail = |what: &str, e: KafkaError| format!("kafka: {what} producer: {e}");
        let mut latency_cfg = base.clone();
        latency_cfg.set("linger.ms", millis(kafka.linger));
        let latency =
            Producer::build("latency", kafka, latency_cfg).map_err(|e| fail("latency", e))?;
        let batch = Producer::build("batch", kafka, batch_config(&base, &config.batch))
            .map_err(|e| fail("batch", e))?;
        let mut batch_by_topic = HashMap::new();
        let mut groups: Vec<(BatchConfig, Arc<Producer>)> = Vec::new();
        for (topic, o) in &config.topics.overrides {
            if o.batch_size.is_none() && o.flush_timeout.is_none() {
                continue;
            }
            let settings = BatchConfig {
                batch_size: o.batch_size.unwrap_or(config.batch.batch_size),
                flush_timeout: o.flush_timeout.unwrap_or(config.batch.flush_timeout),
            };
            let producer = match groups.iter().find(|(s, _)| *s == settings) {
                Some((_, p)) => p.clone(),
                None => {
                    let name = format!("batch-{}", groups.len() + 1);
                    let p = Producer::build(&name, kafka, batch_config(&base, &settings))
                        .map_err(|e| fail(&name, e))?;
                    let p = Arc::new(p);
                    groups.push((settings, p.clone()));
                    p
                }
            };
            batch_by_topic.insert(topic.clone(), producer);
        }
        let topics = Arc::new(Topics::new(
            latency.inner.clone(),
            kafka.metadata_timeout,
            kafka.unknown_topic_ttl,
        ));
        let groups = groups.into_iter().map(|(_, p)| p).collect();
        Ok(Producers {
            latency,
            batch,
            batch_by_topic,
            groups,
            topics,
        })
    }

    /// The producer that serves `mode` for `topic`.
    pub fn for_mode(&self, mode: Mode, topic: &str) -> &Producer {
        match mode {
            Mode::Async | Mode::Sync => &self.latency,
            Mode::BatchAsync | Mode::BatchSync => self
                .batch_by_topic
                .get(topic)
                .map_or(&self.batch, |p| p.as_ref()),
        }
    }

    /// Every producer, for flushing and reporting.
    pub fn all(&self) -> impl Iterator<Item = &Producer> {
        [&self.latency, &self.batch]
            .into_iter()
            .chain(self.groups.iter().map(|p| p.as_ref()))
    }

    /// Raises a fatal error in the low-latency producer, for fault tests.
    #[doc(hidden)]
    pub fn inject_fatal_error(&self) {
        delivery::inject_fatal_error(&self.latency.inner);
    }

    /// Why the server is not ready, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.topics.fetched() {
            Some("no broker metadata yet")
        } else if self.all().any(Producer::is_fatal) {
            Some("fatal producer error")
        } else {
            None
        }
    }

    /// Waits until every queued record is delivered or failed, or `deadline` passes; returns
    /// how many records are still undelivered.
    pub async fn flush(self: &Arc<Self>, deadline: Duration) -> usize {
        let count = self.all().count();
        let flushes: Vec<_> = (0..count)
            .map(|i| {
                let this = self.clone();
                tokio::task::spawn_blocking(move || {
                    if let Some(p) = this.all().nth(i) {
                        delivery::flush(&p.inner, deadline);
                    }
                })
            })
            .collect();
        for f in flushes {
            let _ = f.await;
        }
        // librdkafka#4103: flush's return code is not trusted; the queue length decides.
        self.all().map(Producer::in_flight).sum()
    }
}

fn millis(d: Duration) -> String {
    // librdkafka takes fractional milliseconds for linger.ms.
    format!("{}", d.as_secs_f64() * 1000.0)
}

fn batch_config(base: &ClientConfig, batch: &BatchConfig) -> ClientConfig {
    let mut c = base.clone();
    c.set("linger.ms", millis(batch.flush_timeout))
        .set("batch.num.messages", batch.batch_size.to_string());
    c
}

/// librdkafka properties that typed settings own; `kafka.options` may not set them.
const TYPED_KEYS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "compression.type",
    "compression.codec",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "message.max.bytes",
    "batch.num.messages",
    "allow.auto.create.topics",
    "partitioner",
];

/// The settings shared by every producer.
pub fn client_config(kafka: &KafkaConfig) -> Result<ClientConfig, String> {
    if kafka.brokers.is_empty() {
        return Err("kafka.brokers: at least one broker is needed".into());
    }
    if kafka.idempotence && kafka.acks != Acks::All {
        return Err("kafka.acks: idempotence needs acks = \"all\"".into());
    }
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", kafka.brokers.join(","))
        .set("client.id", &kafka.client_id)
        .set(
            "acks",
            match kafka.acks {
                Acks::All => "all",
                Acks::Leader => "1",
                Acks::None => "0",
            },
        )
        .set("enable.idempotence", kafka.idempotence.to_string())
        .set(
            "compression.type",
            match kafka.compression {
                Compression::None => "none",
                Compression::Gzip => "gzip",
                Compression::Snappy => "snappy",
                Compression::Lz4 => "lz4",
                Compression::Zstd => "zstd",
            },
        )
        .set(
            "message.timeout.ms",
            kafka.message_timeout.as_millis().to_string(),
        )
        .set("message.max.bytes", kafka.message_max_bytes.to_string())
        .set(
            "allow.auto.create.topics",
            kafka.auto_create_topics.to_string(),
        )
        .set("partitioner", "murmur2_random");
    for (key, value) in &kafka.options {
        if TYPED_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "kafka.options.\"{key}\": set by a typed kafka setting; use that instead"
            ));
        }
        c.set(key, value);
    }
    Ok(c)
}
