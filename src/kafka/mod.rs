//! The producers: one for `sync` (no linger), one for `async` (a short linger), one batching
//! producer for the batch modes plus one per group of topics with their own batch settings. Built
//! once, shared by every request.

pub mod admission;
pub mod delivery;
pub mod metadata;
pub mod partition;
mod poller;
mod producer;

pub use producer::{Producer, Record, SendError, Shared, set_queue_limits};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

use crate::config::{Acks, BatchConfig, Compression, Config, KafkaConfig, Mode};
use metadata::Topics;

/// A producer that is replaced when librdkafka reports a fatal error. Requests take the current
/// one; a replaced producer keeps delivering what it had in flight, then goes.
pub struct Slot {
    name: String,
    recipe: ClientConfig,
    kafka: Arc<KafkaConfig>,
    shared: Shared,
    current: RwLock<Arc<Producer>>,
}

impl Slot {
    fn new(
        name: &str,
        kafka: &Arc<KafkaConfig>,
        recipe: ClientConfig,
        topics: &Arc<crate::metrics::Topics>,
    ) -> Result<Slot, String> {
        let shared = Shared {
            tally: Arc::default(),
            topics: topics.clone(),
            brokers: Arc::default(),
        };
        let producer = Producer::build(name, kafka, recipe.clone(), &shared)
            .map_err(|e| format!("{} ({name} producer)", describe(&e)))?;
        Ok(Slot {
            name: name.to_string(),
            recipe,
            kafka: kafka.clone(),
            shared,
            current: RwLock::new(Arc::new(producer)),
        })
    }

    /// The producer's name (`sync`, `async`, `batch`, `batch-N`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Brokers as the latest statistics saw them.
    pub fn brokers(&self) -> Vec<crate::metrics::BrokerState> {
        self.shared
            .brokers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The producer requests use now.
    pub fn current(&self) -> Arc<Producer> {
        // A poisoned lock only means a panic elsewhere during a swap; the Arc in it is whole.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Builds a fresh producer and puts it in place of the current one; returns the old one.
    fn replace(&self) -> Result<Arc<Producer>, KafkaError> {
        let fresh = Producer::build(&self.name, &self.kafka, self.recipe.clone(), &self.shared)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        Ok(std::mem::replace(&mut *current, Arc::new(fresh)))
    }
}

/// The librdkafka settings of every producer kafboy will run.
struct Plan {
    sync: ClientConfig,
    asynchronous: ClientConfig,
    batch: ClientConfig,
    /// One per distinct batch setting among the topic overrides.
    groups: Vec<ClientConfig>,
    /// Topic → index in `groups`.
    batch_by_topic: HashMap<String, usize>,
}

impl Plan {
    fn new(config: &Config) -> Result<Plan, String> {
        let base = client_config(&config.kafka)?;
        let mut sync = base.clone();
        sync.set("linger.ms", millis(config.kafka.sync_linger));
        let mut asynchronous = base.clone();
        asynchronous.set("linger.ms", millis(config.kafka.linger));
        let mut batch_by_topic = HashMap::new();
        let mut settings_of: Vec<BatchConfig> = Vec::new();
        for (topic, o) in &config.topics.overrides {
            let settings = BatchConfig {
                batch_size: o.batch_size.unwrap_or(config.batch.batch_size),
                flush_timeout: o.flush_timeout.unwrap_or(config.batch.flush_timeout),
            };
            // The default batching producer already serves these settings.
            if settings == config.batch {
                continue;
            }
            let index = settings_of
                .iter()
                .position(|s| *s == settings)
                .unwrap_or_else(|| {
                    settings_of.push(settings);
                    settings_of.len() - 1
                });
            batch_by_topic.insert(topic.clone(), index);
        }
        Ok(Plan {
            sync,
            asynchronous,
            batch: batch_config(&base, &config.batch),
            groups: settings_of.iter().map(|s| batch_config(&base, s)).collect(),
            batch_by_topic,
        })
    }
}

/// Checks every producer's librdkafka settings without creating a producer (so without
/// contacting a broker).
pub fn check(config: &Config) -> Result<(), String> {
    let plan = Plan::new(config)?;
    for recipe in [&plan.sync, &plan.asynchronous, &plan.batch]
        .into_iter()
        .chain(&plan.groups)
    {
        recipe.create_native_config().map_err(|e| describe(&e))?;
    }
    // librdkafka reads these only when a producer starts.
    if let Some(tls) = &config.kafka.tls {
        for (key, path) in [
            ("ca_file", &tls.ca_file),
            ("cert_file", &tls.cert_file),
            ("key_file", &tls.key_file),
        ] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
                return Err(format!(
                    "kafka.tls.{key}: {} is not a readable file",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

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
}

impl Producers {
    /// Builds the producers. Errors name the config key at fault.
    pub fn build(
        config: &Config,
        topics: &Arc<crate::metrics::Topics>,
    ) -> Result<Producers, String> {
        let kafka = Arc::new(config.kafka.clone());
        let plan = Plan::new(config)?;
        let sync = Slot::new("sync", &kafka, plan.sync, topics)?;
        let asynchronous = Slot::new("async", &kafka, plan.asynchronous, topics)?;
        let batch = Slot::new("batch", &kafka, plan.batch, topics)?;
        let groups = plan
            .groups
            .into_iter()
            .enumerate()
            .map(|(i, recipe)| Slot::new(&format!("batch-{}", i + 1), &kafka, recipe, topics))
            .collect::<Result<Vec<_>, _>>()?;
        let batch_by_topic = plan.batch_by_topic;
        let topics = Arc::new(Topics::new(
            sync.current().inner.clone(),
            kafka.metadata_timeout,
            kafka.unknown_topic_ttl,
        ));
        Ok(Producers {
            sync,
            asynchronous,
            batch,
            groups,
            batch_by_topic,
            topics,
        })
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

    /// Raises a fatal error in the `sync` producer, for fault tests.
    #[doc(hidden)]
    pub fn inject_fatal_error(&self) {
        delivery::inject_fatal_error(&self.sync.current().inner);
    }

    /// Why the server is not ready, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.topics.fetched() {
            Some("no broker metadata yet")
        } else if self.all().iter().any(|p| p.is_fatal()) {
            Some("fatal producer error")
        } else {
            None
        }
    }

    /// Replaces every producer that hit a fatal error. librdkafka has already purged its queue
    /// (those records were answered 503); what it had in flight is flushed before it goes.
    pub fn replace_failed(&self) {
        for (index, slot) in self.slots().enumerate() {
            if !slot.current().is_fatal() {
                continue;
            }
            match slot.replace() {
                Ok(old) => {
                    tracing::warn!(producer = %slot.name, "fatal error: producer replaced");
                    if index == 0 {
                        self.topics.set_client(slot.current().inner.clone());
                    }
                    let retire_within = slot.kafka.message_timeout;
                    tokio::task::spawn_blocking(move || {
                        delivery::flush(&old.inner, retire_within);
                        drop(old);
                    });
                }
                Err(error) => {
                    tracing::error!(producer = %slot.name, %error, "cannot replace producer")
                }
            }
        }
    }

    /// Checks for fatal producer errors every `period` for as long as the producers live.
    pub fn spawn_supervisor(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(producers) = weak.upgrade() else {
                    return;
                };
                producers.replace_failed();
            }
        });
    }

    /// Waits until every queued record is delivered or failed, or `deadline` passes; returns
    /// how many records are still undelivered.
    pub async fn flush(&self, deadline: Duration) -> usize {
        let producers = self.all();
        let flushes: Vec<_> = producers
            .iter()
            .map(|p| {
                let p = p.clone();
                tokio::task::spawn_blocking(move || delivery::flush(&p.inner, deadline))
            })
            .collect();
        for f in flushes {
            let _ = f.await;
        }
        // librdkafka#4103: flush's return code is not trusted; the queue length decides.
        producers.iter().map(|p| p.in_flight()).sum()
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
    "statistics.interval.ms",
    "security.protocol",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
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
        .set("partitioner", "murmur2_random")
        .set(
            "statistics.interval.ms",
            kafka.statistics_interval.as_millis().to_string(),
        );
    // librdkafka waits up to 10 s between reconnects by default, so service came back up to 10 s
    // after the brokers did; 1 s keeps recovery within seconds (kafka.options may override).
    c.set("reconnect.backoff.max.ms", "1000");
    security(kafka, &mut c)?;
    for (key, value) in &kafka.options {
        if TYPED_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "kafka.options.\"{key}\": set by a typed kafka setting; use that instead"
            ));
        }
        // Security properties (turning certificate checks off, inline keys) only through
        // [kafka.tls] and [kafka.sasl], where secrets never sit in the file.
        if [
            "ssl.",
            "ssl_",
            "sasl.",
            "security.",
            "enable.ssl.",
            "enable.sasl.",
        ]
        .iter()
        .any(|p| key.starts_with(p))
        {
            return Err(format!(
                "kafka.options.\"{key}\": security settings go in [kafka.tls] and [kafka.sasl]"
            ));
        }
        c.set(key, value);
    }
    Ok(c)
}

/// `security.protocol` and the TLS and SASL properties, secrets read from env or files.
fn security(kafka: &KafkaConfig, c: &mut ClientConfig) -> Result<(), String> {
    let protocol = match (&kafka.tls, &kafka.sasl) {
        (None, None) => "plaintext",
        (Some(_), None) => "ssl",
        (None, Some(_)) => "sasl_plaintext",
        (Some(_), Some(_)) => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if let Some(tls) = &kafka.tls {
        let path = |p: &std::path::PathBuf| p.display().to_string();
        if let Some(ca) = &tls.ca_file {
            c.set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &tls.cert_file {
            c.set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &tls.key_file {
            c.set("ssl.key.location", path(key));
        }
        if let Some(var) = &tls.key_password_env {
            c.set(
                "ssl.key.password",
                secret_from_env(var, "kafka.tls.key_password_env")?,
            );
        }
        let check = if tls.skip_hostname_check {
            "none"
        } else {
            "https"
        };
        c.set("ssl.endpoint.identification.algorithm", check);
    }
    if let Some(sasl) = &kafka.sasl {
        use crate::config::SaslMechanism as M;
        let mechanism = match sasl.mechanism {
            M::Plain => "PLAIN",
            M::ScramSha256 => "SCRAM-SHA-256",
            M::ScramSha512 => "SCRAM-SHA-512",
        };
        let password = match (&sasl.password_env, &sasl.password_file) {
            (Some(var), None) => secret_from_env(var, "kafka.sasl.password_env")?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| format!("kafka.sasl.password_file {}: {e}", file.display()))?,
            _ => {
                return Err("kafka.sasl: set exactly one of password_env and password_file".into());
            }
        };
        c.set("sasl.mechanisms", mechanism)
            .set("sasl.username", &sasl.username)
            .set("sasl.password", password);
    }
    Ok(())
}

fn secret_from_env(var: &str, key: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| format!("{key}: environment variable {var} is not set"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KafkaTlsConfig, SaslConfig, SaslMechanism};

    #[test]
    fn tls_and_sasl_map_to_librdkafka_properties() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let mut kafka = KafkaConfig::default();
        assert_eq!(
            client_config(&kafka).unwrap().get("security.protocol"),
            Some("plaintext")
        );
        kafka.sasl = Some(SaslConfig {
            mechanism: SaslMechanism::ScramSha512,
            username: "app".into(),
            password_env: None,
            password_file: Some(secret.clone()),
        });
        let c = client_config(&kafka).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        kafka.tls = Some(KafkaTlsConfig {
            ca_file: Some("/ca.pem".into()),
            ..Default::default()
        });
        let c = client_config(&kafka).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(
            c.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        kafka.sasl.as_mut().unwrap().password_env = Some("KAFBOY_TEST_NO_SUCH_VAR".into());
        assert!(client_config(&kafka).unwrap_err().contains("exactly one"));
        kafka.sasl.as_mut().unwrap().password_file = None;
        assert!(
            client_config(&kafka)
                .unwrap_err()
                .contains("KAFBOY_TEST_NO_SUCH_VAR")
        );
        kafka.sasl = None;
        kafka.options.insert("sasl.password".into(), "x".into());
        assert!(client_config(&kafka).unwrap_err().contains("typed"));
    }
}
