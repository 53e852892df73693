//! The configuration tree: defaults, then a TOML file, then `KAFBOY_*` environment variables, then
//! command-line flags. These types only describe; [`crate::server::App::build`] turns them into the
//! runtime types the handlers use, once, and rejects conflicts there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

mod kafka;
mod server;
mod topics;

pub use kafka::{
    Acks, BatchConfig, Compression, KafkaConfig, KafkaTlsConfig, SaslConfig, SaslMechanism,
};
pub use server::{CorsConfig, DEFAULT_MAX_JSON_DEPTH, ServerConfig, TlsConfig};
pub use topics::{Mode, Partitioner, Payload, RouteConfig, TopicOverride, TopicsConfig};

/// The longest duration any setting may ask for. Deadlines are `Instant`s, and one far enough
/// past the clock's range panics when it is computed; a day is longer than any of them needs.
pub const MAX_DURATION: Duration = Duration::from_secs(86_400);

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

impl LogConfig {
    /// Checks `level` as a log filter (see [`check_log_filter`]).
    pub fn check(&self) -> Result<(), String> {
        check_log_filter("log.level", &self.level)
    }
}

/// Checks `filter`, the value of setting `name`, as a log filter: tracing takes a bare word as
/// a target to log at every level, so `inf` would silence every line kafboy writes. A bare word
/// must be a level (a name or 0 to 5); everything else (`kafboy=debug`, `kafboy::ingest`, span
/// filters) is left to tracing's own parser.
pub fn check_log_filter(name: &str, filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    let bad = |why: &str| Err(format!("{name} {filter:?}: {why}"));
    // An empty filter (`KAFBOY_LOG=` from a template) has no default level: every line, the
    // errors included, would be dropped.
    if filter.split(',').all(|d| d.trim().is_empty()) {
        return bad("names no level; leave it unset for the default");
    }
    let bare = |d: &&str| !d.is_empty() && !d.contains(['=', '[', ':']);
    let typo = filter
        .split(',')
        .map(str::trim)
        .filter(bare)
        .find(|d| !LEVELS.contains(&d.to_ascii_lowercase().as_str()));
    if let Some(word) = typo {
        return bad(&format!(
            "{word:?} is not a level (trace, debug, info, warn, error, off); a target needs \
             one, as in {word}=debug"
        ));
    }
    match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(_) => Ok(()),
        Err(e) => bad(&e.to_string()),
    }
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

/// A configuration that could not be read; the message names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        let lines: Vec<String> = err.into_iter().map(|e| error_line(&e)).collect();
        ConfigError(lines.join("\n"))
    }
}

/// One of figment's errors, naming the key as a file writes it and, for a value from the
/// environment, the variable it came from (figment says `"BATCH.BATCH_SIZE"` in "`KAFBOY_`
/// environment variable(s)", and a file's key behind its profile name, `default.`).
fn error_line(e: &figment::Error) -> String {
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    // The variable is the longest start of the key that is set: a value deeper than that is
    // inside it (an inline table, `KAFBOY_KAFKA__OPTIONS='{...}'`).
    let var = || {
        (1..=e.path.len()).rev().find_map(|n| {
            let var = format!("KAFBOY_{}", e.path[..n].join("__").to_ascii_uppercase());
            std::env::var_os(&var).map(|_| var)
        })
    };
    // A key pasted into the wrong field of an inline API key is quoted by the message, as in
    // the key file, where such values are left out of it.
    let kind = e.kind.to_string();
    let what = if e.path.iter().any(|p| p.eq_ignore_ascii_case("auth")) {
        crate::auth::elided(&kind)
    } else {
        kind.clone()
    };
    if let Some(var) = from_env.then(var).flatten() {
        let key = e.path.join(".").to_ascii_lowercase();
        return format!("{what} for key {key:?} in environment variable {var}");
    }
    let line = e
        .to_string()
        .replacen(&kind, &what, 1)
        .replace("for key \"default.", "for key \"");
    without_source(&line)
}

/// A TOML parse error without the lines of the file it quotes: the line at fault may hold an
/// API key pasted into `[[auth.keys]]` (as the key file's errors do, it keeps the line and
/// column).
fn without_source(message: &str) -> String {
    if !message.starts_with("TOML parse error") {
        return message.to_string();
    }
    let quoted = |l: &str| {
        let l = l.trim_start();
        l.starts_with('|')
            || l.split_once(" |")
                .is_some_and(|(n, _)| n.bytes().all(|b| b.is_ascii_digit()))
    };
    let kept: Vec<&str> = message.lines().filter(|l| !quoted(l)).collect();
    // The message itself may quote a key name (`duplicate key `kb_...``).
    crate::auth::elided(&kept.join("\n").replace("\n in ", " in "))
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

/// The batch flush timeouts (`batch.flush_timeout`, per-topic overrides) not below
/// `server.sync_timeout`: a `/batch/sync` request whose batch does not fill first is answered
/// `504`, and its record written after. Allowed (such batches may serve async requests only);
/// warned of at start.
pub fn batch_waits_past_sync_timeout(config: &Config) -> Vec<String> {
    config
        .flush_timeouts()
        .filter(|(_, wait)| *wait >= config.server.sync_timeout)
        .map(|(name, _)| name)
        .collect()
}

impl Config {
    /// Every batch flush timeout, with the key that sets it: `batch.flush_timeout` and each
    /// topic's override.
    pub fn flush_timeouts(&self) -> impl Iterator<Item = (String, Duration)> + '_ {
        let overrides = self.topics.overrides.iter().filter_map(|(topic, o)| {
            Some((
                format!("topics.overrides.{topic}.flush_timeout"),
                o.flush_timeout?,
            ))
        });
        std::iter::once(("batch.flush_timeout".to_string(), self.batch.flush_timeout))
            .chain(overrides)
    }
}

/// `KAFBOY_*` variables that are neither settings (`KAFBOY_SECTION__KEY`) nor read by name
/// (`KAFBOY_CONFIG`, `KAFBOY_LOG`, a password variable `config` names): most likely a setting
/// with one underscore where two belong (`KAFBOY_SERVER_LISTEN`), which would otherwise be
/// dropped without a word.
pub fn ignored_env(config: &Config) -> Vec<String> {
    let named = [
        config
            .kafka
            .sasl
            .as_ref()
            .and_then(|s| s.password_env.as_deref()),
        config
            .kafka
            .tls
            .as_ref()
            .and_then(|t| t.key_password_env.as_deref()),
    ];
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            // figment takes the prefix in any case (`kafboy_server__listen` is a setting), so
            // a typo in lower case is reported too.
            let prefixed = name
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("KAFBOY_"));
            // figment drops a name with an empty segment (`KAFBOY_SERVER____LISTEN`,
            // `KAFBOY_SERVER__LISTEN__`) without a word, as it does one with no `__` at all.
            let malformed = |key: &str| !key.contains("__") || key.split("__").any(str::is_empty);
            // KAFBOY_CONFIG and KAFBOY_LOG are read as they are written: `kafboy_log` is not.
            prefixed
                && malformed(&name[7..])
                && !matches!(name.as_str(), "KAFBOY_CONFIG" | "KAFBOY_LOG")
                && !named.contains(&Some(name.as_str()))
        })
        .collect()
}

/// Accepts `["a:1", "b:2"]` as well as `"a:1,b:2"` (what an environment variable holds).
/// Blank entries are dropped.
pub(crate) fn string_or_list<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    // A blank entry is no broker or topic at all; the list form drops them as a string does.
    Ok(list_entries(de)?
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect())
}

/// The entries of a list or of a comma-separated string, as written (blanks kept).
pub(crate) fn list_entries<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(de)? {
        Either::One(s) => s.split(',').map(String::from).collect(),
        Either::Many(v) => v,
    })
}

/// Whether `port` is a TCP port as written in an address: digits only, 1 to 65535.
pub(crate) fn valid_port(port: &str) -> bool {
    port.bytes().all(|b| b.is_ascii_digit()) && matches!(port.parse::<u16>(), Ok(1..))
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
    #[test]
    fn a_key_pasted_into_an_inline_key_field_is_left_out_of_the_error() {
        let secret = "kb_3718e7e3d0c1f00dfeedfacecafe";
        let toml = format!(
            "[[auth.keys]]\nname = \"a\"\nsha256 = \"{}\"\ntopics = [\"*\"]\nrate = \"{secret}\"",
            "a".repeat(64)
        );
        let error = super::Config::from_toml(&toml).unwrap_err().to_string();
        assert!(!error.contains(secret), "{error}");
        assert!(error.contains("auth.keys.0.rate"), "{error}");
        // Nor in the line a parse error would quote, nor inside a value quoted in another
        // (a list mistyped in KAFBOY_AUTH__KEYS comes back whole, its quotes escaped).
        let unquoted = toml.replace(&format!("\"{secret}\""), secret);
        let error = super::Config::from_toml(&unquoted).unwrap_err().to_string();
        assert!(
            !error.contains(secret) && error.contains("line 5"),
            "{error}"
        );
        let nested = format!(r#"found string "[{{sha256=\"{secret}\"]", expected a sequence"#);
        assert!(!crate::auth::elided(&nested).contains(secret));
        let raw = format!("duplicate field `{secret}\\` in `auth.keys`");
        assert!(!crate::auth::elided(&raw).contains(secret), "{raw}");
        // A key pasted as a key name, twice: the parse error names it.
        let twice = format!("[[auth.keys]]\n{secret} = 1\n{secret} = 2\n");
        let error = super::Config::from_toml(&twice).unwrap_err().to_string();
        assert!(!error.contains(secret), "{error}");
        // Elsewhere a value is quoted whole: it is no secret, and says what is wrong.
        let error = super::Config::from_toml("[server]\nmax_records = \"a-long-bad-value\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("a-long-bad-value"), "{error}");
    }

    #[test]
    fn log_levels_are_filters_and_bare_words_are_levels() {
        let check = |level: &str| {
            LogConfig {
                level: level.into(),
                ..LogConfig::default()
            }
            .check()
        };
        for ok in [
            "info",
            "DEBUG",
            "warn,kafboy=debug",
            "warn,",
            "info,,kafboy=debug",
            "kafboy=4",
            "[span]=debug",
            "hyper=off",
            "kafboy::ingest",
            "kafboy::ingest=trace",
        ] {
            assert!(check(ok).is_ok(), "{ok}: {:?}", check(ok));
        }
        for bad in ["inf", "debgu,kafboy=debug", "kafboy"] {
            assert!(check(bad).unwrap_err().contains("not a level"), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn batch_flush_timeouts_past_the_sync_timeout_are_named() {
        let toml = "[server]\nsync_timeout = \"2s\"\n[batch]\nflush_timeout = \"2s\"\n\
                    [topics.overrides.a]\nflush_timeout = \"1s\"\n\
                    [topics.overrides.b]\nflush_timeout = \"3s\"";
        let config = Config::from_toml(toml).unwrap();
        assert_eq!(
            batch_waits_past_sync_timeout(&config),
            ["batch.flush_timeout", "topics.overrides.b.flush_timeout"]
        );
        assert!(batch_waits_past_sync_timeout(&Config::default()).is_empty());
    }

    #[test]
    fn defaults_survive_an_empty_file() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn the_example_file_parses_and_states_the_defaults() {
        let text = include_str!("../../kafboy.example.toml");
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
    fn a_bad_value_is_named_by_its_key_as_the_file_writes_it() {
        let err = Config::from_toml("[server]\nsync_timeout = \"soon\"").unwrap_err();
        assert!(
            err.to_string().contains("for key \"server.sync_timeout\""),
            "{err}"
        );
    }

    #[test]
    fn durations_are_human() {
        let c = Config::from_toml("[server]\nsync_timeout = \"1500ms\"").unwrap();
        assert_eq!(c.server.sync_timeout, Duration::from_millis(1500));
    }
}
