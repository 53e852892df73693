//! The librdkafka properties of every producer, from the config: what they all share (typed
//! settings first, then `kafka.options`, which may add properties but not override a typed one
//! or touch security), and each producer's own linger and batch size.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::config::{Acks, BatchConfig, Compression, Config, KafkaConfig};

mod security;

use security::security;

/// The librdkafka settings of every producer kafboy will run.
pub(super) struct Plan {
    pub(super) sync: ClientConfig,
    pub(super) asynchronous: ClientConfig,
    pub(super) batch: ClientConfig,
    /// One per distinct batch setting among the topic overrides.
    pub(super) groups: Vec<ClientConfig>,
    /// Topic → index in `groups`.
    pub(super) batch_by_topic: HashMap<String, usize>,
}

impl Plan {
    pub(super) fn new(config: &Config) -> Result<Plan, String> {
        let base = client_config(&config.kafka)?;
        let mut sync = base.clone();
        sync.set("linger.ms", millis(config.kafka.sync_linger));
        if let Some(timeout) = sync_message_timeout(config) {
            sync.set("message.timeout.ms", timeout.as_millis().to_string());
        }
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

/// Checks every producer's librdkafka settings by creating each producer without its
/// brokers, so that nothing is contacted: librdkafka checks how the properties go together
/// (`message.timeout.ms` above `linger.ms`, what idempotence requires, ...) only when a
/// producer is created, and what it refuses then must not pass a check and fail the start.
pub fn check(config: &Config) -> Result<(), String> {
    let plan = Plan::new(config)?;
    for recipe in [&plan.sync, &plan.asynchronous, &plan.batch]
        .into_iter()
        .chain(&plan.groups)
    {
        let mut recipe = recipe.clone();
        recipe.remove("bootstrap.servers");
        let producer: rdkafka::producer::BaseProducer = recipe
            .create()
            .map_err(|e: rdkafka::error::KafkaError| super::describe(&e))?;
        drop(producer);
    }
    Ok(())
}

/// How long before `server.sync_timeout` librdkafka gives up a sync record: the 1 s of its
/// timeout scan, and time for the report to reach the request.
const SYNC_REPORT_MARGIN: Duration = Duration::from_secs(2);

/// The sync producer's message timeout, when `server.sync_timeout` comes before
/// `kafka.message_timeout`. A sync record has no one to answer once its request's time is up;
/// kept queued, it would be answered `504` and could still be written after the client was
/// told so, a duplicate of its retry. Given up a little before, a record never sent gets `503`
/// (it will not be written), one sent and unanswered `504`. Not below 1 s or the sync linger.
fn sync_message_timeout(config: &Config) -> Option<Duration> {
    // In whole milliseconds, as librdkafka takes it.
    let timeout = config.server.sync_timeout.checked_sub(SYNC_REPORT_MARGIN)?;
    let timeout = Duration::from_millis(u64::try_from(timeout.as_millis()).ok()?);
    (timeout >= Duration::from_secs(1)
        && timeout > config.kafka.sync_linger
        && timeout < config.kafka.message_timeout)
        .then_some(timeout)
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

/// librdkafka properties that would break what kafboy's replies promise, and why.
const BROKEN_BY: &[(&str, &str)] = &[
    (
        "delivery.report.only.error",
        "kafboy needs a delivery report for every record: /sync replies wait for it and the \
         queue room of each record comes back with it",
    ),
    (
        "transactional.id",
        "kafboy's producers are not transactional; every send would fail",
    ),
    (
        "plugin.library.paths",
        "a plugin is loaded code, which may set any property, security ones included",
    ),
    (
        // A prefix: librdkafka's test settings (`test.mock.num.brokers` answers from an
        // in-process mock cluster).
        "test.",
        "librdkafka's test settings could make it answer from an in-process mock cluster: \
         every 200 and offset would come from it, and nothing would reach Kafka",
    ),
    (
        "log.queue",
        "librdkafka's logs would pile up in a queue nobody reads",
    ),
    (
        "internal.termination.signal",
        "librdkafka's threads would take a signal kafboy handles itself: SIGTERM would not \
         stop it, SIGHUP would not reload",
    ),
];

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
    "topic.metadata.refresh.interval.ms",
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
    // Every producer refreshes its partition counts twice per kafboy metadata refresh
    // (librdkafka's default is every 5 min). kafboy starts choosing a partition added to a
    // topic one refresh after it first saw it, by when every producer has asked at least once
    // since, with time to spare for the answer.
    c.set(
        "topic.metadata.refresh.interval.ms",
        (kafka.metadata_refresh / 2)
            .min(std::time::Duration::from_secs(3600))
            .as_millis()
            .max(1)
            .to_string(),
    );
    security(kafka, &mut c)?;
    for (key, value) in &kafka.options {
        // librdkafka takes a name it does not know globally as a topic property, with any
        // `topic.` prefix taken off: `topic.acks` sets `acks`. Both names are checked.
        for name in std::iter::once(key.as_str()).chain(key.strip_prefix("topic.")) {
            refused_option(name).map_err(|why| format!("kafka.options.\"{key}\": {why}"))?;
        }
        c.set(key, value);
    }
    Ok(c)
}

/// Why `name` may not be set through `kafka.options`, if it may not.
fn refused_option(name: &str) -> Result<(), String> {
    let broken = |k: &str| k == name || (k.ends_with('.') && name.starts_with(k));
    if let Some((_, why)) = BROKEN_BY.iter().find(|(k, _)| broken(k)) {
        return Err(format!("not allowed: {why}"));
    }
    // Security properties (turning certificate checks off, inline keys) only through
    // [kafka.tls] and [kafka.sasl], where secrets never sit in the file. (Asked before the
    // typed settings' list, which holds some of them: the message names the right place.)
    if [
        "ssl.",
        "ssl_",
        "sasl.",
        "security.",
        "enable.ssl.",
        "enable.sasl.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
    {
        return Err("security settings go in [kafka.tls] and [kafka.sasl]".into());
    }
    if TYPED_KEYS.contains(&name) {
        return Err("set by a typed kafka setting; use that instead".into());
    }
    Ok(())
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
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        kafka.tls = Some(KafkaTlsConfig {
            ca_file: Some(ca.clone()),
            ..Default::default()
        });
        let c = client_config(&kafka).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("ssl.ca.location"), ca.to_str());
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
        // An empty password would only show as failed logins at the brokers.
        std::fs::write(&secret, "\n").unwrap();
        let sasl = kafka.sasl.as_mut().unwrap();
        (sasl.password_env, sasl.password_file) = (None, Some(secret.clone()));
        assert!(client_config(&kafka).unwrap_err().contains("empty"));
        kafka.sasl = None;
        kafka.options.insert("sasl.password".into(), "x".into());
        assert!(client_config(&kafka).unwrap_err().contains("[kafka.sasl]"));
    }

    #[test]
    fn sync_records_are_given_up_just_before_their_requests_time() {
        let timeout_of = |toml: &str| {
            let plan = Plan::new(&Config::from_toml(toml).unwrap()).unwrap();
            let get = |c: &ClientConfig| c.get("message.timeout.ms").map(str::to_string);
            (get(&plan.sync), get(&plan.asynchronous), get(&plan.batch))
        };
        let (sync, other) = (Some("28000".to_string()), Some("120000".to_string()));
        assert_eq!(timeout_of(""), (sync, other.clone(), other));
        // The message timeout comes first anyway, or too little would be left.
        for toml in [
            "[kafka]\nmessage_timeout = \"20s\"\n[server]\nsync_timeout = \"30s\"",
            "[kafka]\nmessage_timeout = \"20s\"\n[server]\nsync_timeout = \"22s\"",
            "[server]\nsync_timeout = \"2500ms\"",
            "[kafka]\nsync_linger = \"4s\"\n[server]\nsync_timeout = \"5s\"",
        ] {
            let (sync, asynchronous, _) = timeout_of(toml);
            assert_eq!(sync, asynchronous, "{toml}");
        }
        let (sync, _, _) = timeout_of("[server]\nsync_timeout = \"3s\"");
        assert_eq!(sync.as_deref(), Some("1000"));
        // Whole milliseconds, above the linger.
        let (sync, _, _) = timeout_of("[server]\nsync_timeout = \"3s 500us\"");
        assert_eq!(sync.as_deref(), Some("1000"));
        let toml = "[kafka]\nsync_linger = \"1s\"\n[server]\nsync_timeout = \"3s 500us\"";
        let (sync, asynchronous, _) = timeout_of(toml);
        assert_eq!(sync, asynchronous);
    }

    #[test]
    fn the_defaults_are_the_safe_ones() {
        let c = client_config(&KafkaConfig::default()).unwrap();
        for (key, want) in [
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("message.timeout.ms", "120000"),
            ("topic.metadata.refresh.interval.ms", "15000"),
        ] {
            assert_eq!(c.get(key), Some(want), "{key}");
        }
    }

    #[test]
    fn options_that_break_the_replies_are_refused() {
        for key in [
            "delivery.report.only.error",
            "transactional.id",
            "plugin.library.paths",
            "test.mock.num.brokers",
            "log.queue",
            "internal.termination.signal",
        ] {
            let mut kafka = KafkaConfig::default();
            kafka.options.insert(key.into(), "true".into());
            let error = client_config(&kafka).unwrap_err();
            assert!(
                error.contains(key) && error.contains("not allowed"),
                "{error}"
            );
        }
        let mut kafka = KafkaConfig::default();
        kafka
            .options
            .insert("socket.keepalive.enable".into(), "true".into());
        assert!(client_config(&kafka).is_ok());
    }

    #[test]
    fn a_topic_prefix_does_not_get_past_the_typed_settings() {
        // librdkafka would set `acks` and the rest from these, in whatever order the
        // properties happen to be applied.
        for key in [
            "topic.acks",
            "topic.request.required.acks",
            "topic.message.timeout.ms",
            "topic.compression.type",
            "topic.partitioner",
        ] {
            let mut kafka = KafkaConfig::default();
            kafka.options.insert(key.into(), "0".into());
            let error = client_config(&kafka).unwrap_err();
            assert!(error.contains(key) && error.contains("typed"), "{error}");
        }
        let mut kafka = KafkaConfig::default();
        kafka
            .options
            .insert("topic.request.timeout.ms".into(), "5000".into());
        assert!(client_config(&kafka).is_ok());
    }
}
