//! `[topics]` and `[[routes]]`: which topics may be written, and the routes that write them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Topic rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    /// Topics that may be written: exact names and `prefix*` patterns. Empty allows every valid
    /// name the brokers have. A topic outside the list gets 404 without any request to Kafka.
    #[serde(deserialize_with = "allow_list")]
    pub allow: Vec<String>,
    /// Default partition strategy. Default `auto`.
    pub partitioner: Partitioner,
    /// Per-topic settings, keyed by exact topic name (a topic `allow` admits, when it is set).
    pub overrides: BTreeMap<String, TopicOverride>,
}

/// [`crate::config::string_or_list`], but entries that are all blank, or a bare `*`, are an
/// error: an empty list allows every topic, and a template's unset variable
/// (`KAFBOY_TOPICS__ALLOW=`, `"${PREFIX}*"`) must not open them all without a word.
fn allow_list<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    let entries = crate::config::list_entries(de)?;
    let allow: Vec<String> = entries
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    if allow.is_empty() && !entries.is_empty() {
        return Err(serde::de::Error::custom(
            "only blank entries; an empty list allows every topic: leave `allow` out (or write \
             []) for that",
        ));
    }
    if allow.iter().any(|e| e == "*") {
        return Err(serde::de::Error::custom(
            "`*` allows every topic: leave `allow` out (or write []) for that",
        ));
    }
    Ok(allow)
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
    /// `key_hash` when the record has a key, otherwise librdkafka's sticky partitioner (a
    /// partition for twice the producer's linger; random per record with no linger).
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

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn an_allowlist_that_would_allow_every_topic_by_accident_is_an_error() {
        for bad in [
            "allow = [\"\"]",
            "allow = [\" \", \"\"]",
            "allow = \"\"",
            "allow = \" , \"",
            "allow = [\"*\"]",
            "allow = \"a,*\"",
        ] {
            let error = Config::from_toml(&format!("[topics]\n{bad}")).err();
            assert!(
                error.is_some_and(|e| e.to_string().contains("allows every topic")),
                "{bad}"
            );
        }
        for (good, want) in [
            ("allow = []", vec![]),
            ("allow = [\" a \", \"b*\"]", vec!["a", "b*"]),
            ("allow = \"a, b\"", vec!["a", "b"]),
            // A blank beside real entries narrows nothing: an unset `${EXTRA}` in `a,${EXTRA}`.
            ("allow = \"a,b,\"", vec!["a", "b"]),
            ("allow = [\"a\", \"\"]", vec!["a"]),
        ] {
            let config = Config::from_toml(&format!("[topics]\n{good}")).unwrap();
            assert_eq!(config.topics.allow, want, "{good}");
        }
    }
}
