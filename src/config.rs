//! The configuration tree: defaults, then a TOML file, then `KAFBOY_*` environment variables, then
//! command-line flags. These types only describe; [`crate::server::App::build`] turns them into the
//! runtime types the handlers use, once, and rejects conflicts there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

/// Everything kafboy reads at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listener, request limits and deadlines.
    pub server: ServerConfig,
    /// The Kafka producers.
    pub kafka: KafkaConfig,
    /// Defaults of the batching path (`/batch/*` and routes in a batch mode).
    pub batch: BatchConfig,
    /// Which topics may be written, and per-topic settings.
    pub topics: TopicsConfig,
    /// Edit hooks: a Lua script for every route, and the limits hooks run under.
    pub hook: HookConfig,
    /// Logs.
    pub log: LogConfig,
    /// API keys and rate limits.
    pub auth: AuthConfig,
    /// Other kafboy nodes to hand overflow to.
    pub cluster: crate::cluster::ClusterConfig,
    /// The durable spool for async routes.
    pub spool: crate::spool::SpoolConfig,
    /// Extra routes, each with its own mode.
    pub routes: Vec<RouteConfig>,
}

/// API keys and rate limits. Auth is on as soon as a key or a key file is configured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// A TOML file of `[[keys]]` entries, re-read on SIGHUP and when it changes; a bad file keeps
    /// the keys in force and logs why. Default: none.
    pub keys_file: Option<PathBuf>,
    /// Requests per second over all clients; past it 429. Default: no limit.
    pub global_rate: Option<f64>,
    /// Requests the global limit lets through at once. Default: one second's worth.
    pub global_burst: Option<f64>,
    /// Keys given inline, as in the key file.
    pub keys: Vec<crate::auth::KeyConfig>,
}

/// Logs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for a terminal, `json` (one object per line) for a log pipeline. Default `text`.
    pub format: LogFormat,
    /// tracing filter, e.g. `info` or `warn,kafboy=debug`; `KAFBOY_LOG` wins. Default `info`.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Hooks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HookConfig {
    /// Lua script run on every produce route (a route's own `hook` wins). Default: none.
    pub script: Option<PathBuf>,
    /// Time budget of one hook call; past it the request fails with 500. Default 1s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Lua VM instructions one call may run. Default 10000000.
    pub max_instructions: u64,
    /// Memory one Lua state (one per worker thread and script) may use, in bytes. Default 64 MiB.
    pub max_memory_bytes: usize,
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            script: None,
            timeout: Duration::from_secs(1),
            max_instructions: 10_000_000,
            max_memory_bytes: 64 << 20,
        }
    }
}

/// HTTP side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8000` (the original's port, loopback only).
    pub listen: SocketAddr,
    /// A second address for `/metrics` and the status page (`/`, `/status.json`), which then
    /// leave the main listener; `/health`, `/ready`, `/disco` and `/openapi.json` are served on
    /// both. Default: none.
    pub admin_listen: Option<SocketAddr>,
    /// Serve HTTPS on `listen` with these files. Default: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Cross-origin access for browser clients. Default: none.
    pub cors: Option<CorsConfig>,
    /// Largest request body accepted, after any chunked transfer; bigger gets 413. Must not exceed
    /// `kafka.message_max_bytes`. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Most records one NDJSON request may carry; more gets 413. Default 10000.
    pub max_records: usize,
    /// Deepest nesting of arrays and objects in a JSON record; deeper gets 400. Default 64.
    pub max_json_depth: usize,
    /// How long a request may wait for room in the producer queue before it gets 503. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
    /// How long a sync request waits for the broker's acknowledgement before it gets 504.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub sync_timeout: Duration,
    /// On SIGTERM/SIGINT: time to finish in-flight requests, and then again to flush the
    /// producers. Default 30s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Serve `/async/{topic}`, `/sync/{topic}`, `/batch/async/{topic}` and `/batch/sync/{topic}`.
    /// Default true.
    pub default_routes: bool,
    /// Longest wait for a request's headers, including the idle time of a kept-alive
    /// connection; then the connection is closed (slowloris). Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest pause between two pieces of a request body; then 408. Default 10s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Most header fields in a request; more gets 431. Default 100.
    pub max_headers: usize,
    /// Most bytes of request line and headers; more gets 431. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Most connections open at once; past it a new connection gets 503 and is closed.
    /// Default 10000.
    pub max_connections: usize,
}

/// HTTPS. Certificate and key are re-read on SIGHUP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS), and the
    /// certificate's subject can stand for an API key (`client_cert_subject`).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// CORS for browser clients. Preflight requests are answered without touching Kafka.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed, e.g. `https://app.example.com`; `*` for any (without credentials).
    pub allowed_origins: Vec<String>,
    /// Methods allowed. Default `["POST"]`.
    pub allowed_methods: Vec<String>,
    /// Request headers allowed. Default: Content-Type, Content-Encoding, Authorization,
    /// X-Api-Key, X-Request-Id, X-Kafka-Key, X-Kafka-Partition.
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer. Default 10m.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            allowed_methods: vec!["POST".into()],
            allowed_headers: [
                "content-type",
                "content-encoding",
                "authorization",
                "x-api-key",
                "x-request-id",
                "x-kafka-key",
                "x-kafka-partition",
            ]
            .map(String::from)
            .to_vec(),
            max_age: Duration::from_secs(600),
        }
    }
}

/// Kafka side. Three kinds of producer are built from this: one for `async` routes, one for
/// `sync` routes and batching ones for the batch modes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, as a list or one comma-separated string. Default `["127.0.0.1:9092"]`.
    #[serde(deserialize_with = "string_or_list")]
    pub brokers: Vec<String>,
    /// `client.id` sent to the brokers. Default `kafboy`.
    pub client_id: String,
    /// Acknowledgements to wait for: `all`, `leader` or `none`. Default `all`; idempotence
    /// requires `all`.
    pub acks: Acks,
    /// Idempotent producer: no duplicates from internal retries, order kept. Default true.
    pub idempotence: bool,
    /// Compression of record batches: `none`, `gzip`, `snappy`, `lz4` or `zstd`. Default `none`.
    pub compression: Compression,
    /// Total time librdkafka may spend delivering a record, retries included; after that it
    /// fails. Default 120s.
    #[serde(with = "humantime_serde")]
    pub message_timeout: Duration,
    /// Batching delay of the producer behind `async` routes (`linger.ms`). Default 5ms, as in
    /// librdkafka and Kafka 4: the 202 does not wait for it, and batches of several records
    /// take about half the CPU per record of one-record requests to the brokers.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Batching delay of the producer behind `sync` routes. Default 0: every sync reply would
    /// wait for it.
    #[serde(with = "humantime_serde")]
    pub sync_linger: Duration,
    /// Most records waiting in each producer's queue. Default 100000.
    pub queue_max_messages: usize,
    /// Most key + value bytes waiting in each producer's queue. Default 256 MiB.
    pub queue_max_bytes: usize,
    /// Largest Kafka request librdkafka builds (`message.max.bytes`). Default 1114112.
    pub message_max_bytes: usize,
    /// How often the topic list is refreshed from the brokers. Default 30s.
    #[serde(with = "humantime_serde")]
    pub metadata_refresh: Duration,
    /// How long a metadata request may take. Default 5s.
    #[serde(with = "humantime_serde")]
    pub metadata_timeout: Duration,
    /// How long a topic the brokers do not have is remembered as missing before it is looked up
    /// again. Default 2s.
    #[serde(with = "humantime_serde")]
    pub unknown_topic_ttl: Duration,
    /// Let a metadata lookup of an unknown topic ask the broker to create it. Default false.
    pub auto_create_topics: bool,
    /// How often librdkafka reports statistics (broker state, round-trip times, retries) for
    /// `/metrics` and the status page; 0 turns them off. Default 5s.
    #[serde(with = "humantime_serde")]
    pub statistics_interval: Duration,
    /// TLS to the brokers. Default: plaintext.
    pub tls: Option<KafkaTlsConfig>,
    /// SASL authentication to the brokers. Default: none.
    pub sasl: Option<SaslConfig>,
    /// Any other librdkafka property, as strings. Keys set by the typed fields above are refused.
    pub options: BTreeMap<String, String>,
}

/// TLS to the brokers (`security.protocol` ssl, or sasl_ssl with `[kafka.sasl]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaTlsConfig {
    /// PEM CA bundle to verify the brokers with. Default: the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that require one.
    pub cert_file: Option<PathBuf>,
    /// PEM client key.
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the client key's password, if it has one.
    pub key_password_env: Option<String>,
    /// Skip checking that the broker certificate names the host. Default false.
    pub skip_hostname_check: bool,
}

/// SASL to the brokers. The password comes from the environment or a file, never from the TOML.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    /// `plain`, `scram-sha-256` or `scram-sha-512`.
    pub mechanism: SaslMechanism,
    /// User name.
    pub username: String,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (a trailing newline is dropped).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// SASL mechanism, named as Kafka names them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SaslMechanism {
    /// PLAIN (use it over TLS only).
    #[serde(rename = "plain", alias = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "scram-sha-256", alias = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "scram-sha-512", alias = "SCRAM-SHA-512")]
    ScramSha512,
}

/// `acks`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Acks {
    /// Every in-sync replica (`-1`).
    All,
    /// The partition leader only (`1`).
    Leader,
    /// No acknowledgement (`0`).
    None,
}

/// `compression.type`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// No compression.
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

/// Batching defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Records per partition that trigger a send (`batch.num.messages`). Default 100.
    pub batch_size: usize,
    /// Longest a record waits for its batch to fill (`linger.ms`). Default 100ms.
    #[serde(with = "humantime_serde")]
    pub flush_timeout: Duration,
}

/// Topic rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    /// Topics that may be written: exact names and `prefix*` patterns. Empty allows every valid
    /// name the brokers have. A topic outside the list gets 404 without any request to Kafka.
    pub allow: Vec<String>,
    /// Default partition strategy. Default `auto`.
    pub partitioner: Partitioner,
    /// Per-topic settings, keyed by exact topic name.
    pub overrides: BTreeMap<String, TopicOverride>,
}

/// Settings for one topic.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicOverride {
    /// Partition strategy for this topic, unless the route sets one.
    pub partitioner: Option<Partitioner>,
    /// Batch size for this topic on the batching path.
    pub batch_size: Option<usize>,
    /// Flush timeout for this topic on the batching path.
    #[serde(with = "humantime_serde")]
    pub flush_timeout: Option<Duration>,
}

/// How a record's partition is chosen when the client does not name one.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// `key_hash` when the record has a key, otherwise `sticky`.
    #[default]
    Auto,
    /// A uniformly random partition for each record.
    Random,
    /// Each partition in turn, per topic.
    RoundRobin,
    /// Java-compatible murmur2 of the key; a request without a key gets 400.
    KeyHash,
    /// One partition for 10 ms at a time, key or no key.
    Sticky,
}

/// One extra route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// URL path: either with a `:topic` (or `{topic}`) segment, or fixed with `topic` set.
    pub path: String,
    /// Fixed topic for a path without `:topic`.
    #[serde(default)]
    pub topic: Option<String>,
    /// `async`, `sync`, `batch_async` or `batch_sync`.
    pub mode: Mode,
    /// `auto` decodes by Content-Type (JSON, form, NDJSON); `raw` forwards any bytes as they are.
    #[serde(default)]
    pub payload: Payload,
    /// Partition strategy for this route; wins over the topic's.
    #[serde(default)]
    pub partitioner: Option<Partitioner>,
    /// Lua hook script for this route; wins over `hook.script`.
    #[serde(default)]
    pub hook: Option<PathBuf>,
    /// Spool records on local disk before the 202 (async and batch_async only; needs
    /// `spool.dir`).
    #[serde(default)]
    pub spool: bool,
}

/// What a route waits for before it answers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// 202 once the record is in the `async` producer's queue.
    Async,
    /// 200 once the broker acknowledged it.
    Sync,
    /// 202 once the record is in a batching producer's queue.
    BatchAsync,
    /// 200 once the batch holding the record is acknowledged.
    BatchSync,
}

impl Mode {
    /// The name used in config, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
            Mode::BatchAsync => "batch_async",
            Mode::BatchSync => "batch_sync",
        }
    }
}

/// How a route reads bodies.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// By Content-Type: JSON (validated), form (turned into a JSON object) or NDJSON.
    #[default]
    Auto,
    /// Any bytes, forwarded unchanged.
    Raw,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            admin_listen: None,
            tls: None,
            cors: None,
            max_body_bytes: 1 << 20,
            max_records: 10_000,
            max_json_depth: 64,
            enqueue_timeout: Duration::from_millis(100),
            sync_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            default_routes: true,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: 64 << 10,
            max_connections: 10_000,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: vec!["127.0.0.1:9092".into()],
            client_id: "kafboy".into(),
            acks: Acks::All,
            idempotence: true,
            compression: Compression::None,
            message_timeout: Duration::from_secs(120),
            linger: Duration::from_millis(5),
            sync_linger: Duration::ZERO,
            queue_max_messages: 100_000,
            queue_max_bytes: 256 << 20,
            message_max_bytes: (1 << 20) + (64 << 10),
            metadata_refresh: Duration::from_secs(30),
            metadata_timeout: Duration::from_secs(5),
            unknown_topic_ttl: Duration::from_secs(2),
            auto_create_topics: false,
            statistics_interval: Duration::from_secs(5),
            tls: None,
            sasl: None,
            options: BTreeMap::new(),
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 100,
            flush_timeout: Duration::from_millis(100),
        }
    }
}

/// A configuration that could not be read; the message names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        // figment's Display already names the key and the source (file or env var) of the value.
        ConfigError(err.to_string())
    }
}

/// Settings given on the command line; they win over every other source.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--brokers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<Vec<String>>,
}

impl Config {
    /// Merges defaults, the TOML file (if any), `KAFBOY_SECTION__KEY` variables and `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError(format!(
                    "config file {} not found",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only SECTION__KEY variables are settings, so KAFBOY_CONFIG or KAFBOY_LOG are left alone.
        let env = Env::prefixed("KAFBOY_").filter(|key| key.as_str().contains("__"));
        figment = figment.merge(env.split("__"));
        if let Some(listen) = overrides.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        if let Some(brokers) = &overrides.brokers {
            figment = figment.merge(Serialized::default("kafka.brokers", brokers));
        }
        Ok(figment.extract()?)
    }

    /// Parses a TOML document over the defaults, without reading the environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
        Ok(figment.extract()?)
    }
}

/// Accepts `["a:1", "b:2"]` as well as `"a:1,b:2"` (what an environment variable holds).
fn string_or_list<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(de)? {
        Either::One(s) => split_list(&s),
        Either::Many(v) => v,
    })
}

/// Splits a comma-separated list, dropping blanks.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_survive_an_empty_file() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn the_example_file_parses_and_states_the_defaults() {
        let text = include_str!("../kafboy.example.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.server, ServerConfig::default());
        assert_eq!(config.batch, BatchConfig::default());
        assert_eq!(config.hook, HookConfig::default());
        assert_eq!(config.kafka.acks, Acks::All);
        assert!(!config.routes.is_empty());
    }

    #[test]
    fn brokers_accept_a_comma_string() {
        let c = Config::from_toml("[kafka]\nbrokers = \"a:1, b:2\"").unwrap();
        assert_eq!(c.kafka.brokers, vec!["a:1", "b:2"]);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[kafka]\nbroker = \"a:1\"").unwrap_err();
        assert!(err.to_string().contains("broker"), "{err}");
    }

    #[test]
    fn durations_are_human() {
        let c = Config::from_toml("[server]\nsync_timeout = \"1500ms\"").unwrap();
        assert_eq!(c.server.sync_timeout, Duration::from_millis(1500));
    }
}
