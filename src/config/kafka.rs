//! `[kafka]` and `[batch]`: the producers, the brokers and how to reach them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::string_or_list;

/// Kafka side. Three kinds of producer are built from this: one for `async` routes, one for
/// `sync` routes and batching ones for the batch modes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, as a list or one comma-separated string, each
    /// `[PROTOCOL://]host[:port]` (an IPv6 address with a port as `[address]:port`). Default
    /// `["127.0.0.1:9092"]`.
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
    /// Most value, key and header bytes waiting in each producer's queue. Default 256 MiB.
    pub queue_max_bytes: usize,
    /// Largest record, and largest Kafka request, librdkafka builds (`message.max.bytes`).
    /// Default 1000000: a batch of that size and its header fit a broker's default limit
    /// (1048588), which it checks against the whole batch, after kafboy's `202`.
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
    /// Let a metadata lookup of an unknown topic ask the broker to create it. Needs
    /// `topics.allow` to list exact names. Default false.
    pub auto_create_topics: bool,
    /// How often librdkafka reports statistics (broker state, round-trip times, retries) for
    /// `/metrics` and the status page, and for telling when the brokers refuse kafboy's TLS or
    /// SASL credentials; 0 turns them off, and that check with them (`/ready` stays `200` and
    /// records are accepted until they expire). Default 5s.
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

impl KafkaConfig {
    /// Each broker as librdkafka reads one, `[PROTOCOL://]host[:port][/...]`: it would wrap a
    /// port past 65535 into another port, retry a name with a space in it for ever, and skip
    /// the rest of the list after a protocol other than the one kafboy speaks.
    pub fn check_brokers(&self) -> Result<(), String> {
        let protocol = match (self.tls.is_some(), self.sasl.is_some()) {
            (false, false) => "PLAINTEXT",
            (true, false) => "SSL",
            (false, true) => "SASL_PLAINTEXT",
            (true, true) => "SASL_SSL",
        };
        // An entry may itself be a list, as librdkafka's `bootstrap.servers` is (it skips
        // empty items).
        let brokers = self.brokers.iter().flat_map(|b| b.split(','));
        let mut brokers = brokers.map(str::trim).filter(|b| !b.is_empty()).peekable();
        if brokers.peek().is_none() {
            return Err("kafka.brokers is empty".into());
        }
        for broker in brokers {
            let bad = |why: String| format!("kafka.brokers: {broker:?} {why}");
            let address = match broker.split_once("://") {
                Some((named, rest)) if named.eq_ignore_ascii_case(protocol) => {
                    rest.split('/').next().unwrap_or_default()
                }
                Some(_) => {
                    return Err(bad(format!(
                        "names another protocol than {protocol}, which the [kafka.tls] and [kafka.sasl] settings make"
                    )));
                }
                None => broker,
            };
            check_address(address).map_err(|why| bad(why.into()))?;
        }
        Ok(())
    }
}

/// `host[:port]` as librdkafka splits it: a port after the one `:`, or after `]:` (an IPv6
/// address has more than one `:`).
fn check_address(address: &str) -> Result<(), &'static str> {
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, Some(port)),
        _ => (address, None),
    };
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    // Unbracketed, more than one `:` is all address: `::1:19093` would be host `::1:19093`.
    if bracketed.is_none() && host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err("is no IPv6 address; write one with a port as [address]:port");
    }
    let host = bracketed.unwrap_or(host);
    // A name is letters, digits, `-`, `.` and `_` (as container names have); anything else
    // (`h;1`, `*`, `%`) would only fail later, in the lookup, as a broker never reached.
    let name = |h: &str| {
        h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    };
    // A bracketed IPv6 address may name its interface (`[fe80::1%eth0]`).
    let address = |h: &str| match (bracketed, h.split_once('%')) {
        (Some(_), Some((ip, zone))) => {
            ip.parse::<std::net::Ipv6Addr>().is_ok() && !zone.is_empty() && name(zone)
        }
        _ => h.parse::<std::net::IpAddr>().is_ok(),
    };
    if host.is_empty() || !(name(host) || address(host)) {
        return Err("is not host:port");
    }
    match port {
        Some(port) if !super::valid_port(port) => Err("has a port that is not 1 to 65535"),
        _ => Ok(()),
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
            message_max_bytes: 1_000_000,
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

#[cfg(test)]
mod tests {
    #[test]
    fn brokers_are_host_and_port() {
        let check = |brokers: &[&str]| {
            super::KafkaConfig {
                brokers: brokers.iter().map(|b| b.to_string()).collect(),
                ..super::KafkaConfig::default()
            }
            .check_brokers()
        };
        for ok in [
            &["kafka1:9092", "10.0.0.2:9093"][..],
            &["kafka1"],
            &["[::1]:9092"],
            &["[fe80::1%eth0]:9092"],
            &["PLAINTEXT://kafka1:9094/"],
            &["a:1,b:2,"],
            &["fd00::beef"],
            &["kafka_1:9092"],
        ] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            &["kafka1:99999"][..],
            &["kafka1:0"],
            &["kafka1:"],
            &["kafka 1:9092"],
            &[":9092"],
            &["[::1:9092"],
            &["::1:19093"],
            &["SASL_SSL://kafka1:9094"],
            &["kafka://kafka1:9094"],
            &[],
            &[" , "],
            &["h;1:9092"],
            &["[::1%eth 0]:9092"],
            &["[::1%]:9092"],
            &["[fe80::1%eth0/x]:9092"],
            &["*:9092"],
            &["h%:9092"],
            &["kafka\u{e9}:9092"],
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_batch_fits_a_default_broker() {
        // Kafka's default `message.max.bytes`, checked against a whole record batch; the
        // batch's header (RD_KAFKAP_MSGSET_V2_SIZE) comes on top of librdkafka's limit.
        const BROKER_DEFAULT: usize = 1_048_588;
        const BATCH_HEADER: usize = 61;
        let kafka = super::KafkaConfig::default();
        assert!(kafka.message_max_bytes + BATCH_HEADER <= BROKER_DEFAULT);
        let server = crate::config::ServerConfig::default();
        assert!(server.max_body_bytes <= kafka.message_max_bytes);
    }
}
