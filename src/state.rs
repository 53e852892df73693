//! Everything a request needs, built once from config: routes with their hooks and metrics, the
//! allowlist, partition strategies, limits, the producers and the running totals.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::auth::{Bucket, ClientSubject, Denied, Key, Keys};
use crate::config::{Config, Partitioner, ServerConfig};
use crate::hook::Hook;
use crate::kafka::Producers;
use crate::metrics::{self, RouteMetrics};
use crate::routes::{self, Allowlist, Route, TopicSource};
use crate::status::Stats;

/// One served route: where it writes, its hook, its metric handles.
pub struct Served {
    /// The route.
    pub route: Arc<Route>,
    /// Its hook, if any.
    pub hook: Option<Arc<dyn Hook>>,
    /// Its metric handles.
    pub metrics: RouteMetrics,
}

/// Shared state of a running server.
pub struct AppState {
    /// Limits and deadlines.
    pub server: ServerConfig,
    /// Topics that may be written.
    pub allow: Allowlist,
    /// The producers and the topic cache.
    pub producers: Arc<Producers>,
    /// Per-topic counter handles.
    pub topic_metrics: Arc<metrics::Topics>,
    /// Totals for the status page.
    pub stats: Stats,
    /// When the server was built.
    pub started: Instant,
    /// Time budget of one hook call.
    pub hook_timeout: Duration,
    /// Produces a hook asked for after its own reply, which shutdown waits for.
    pub background: Arc<crate::shutdown::Tracker>,
    /// Record count and nesting limits of bodies.
    pub decode_limits: crate::decode::Limits,
    /// How request bodies are read, and the bytes of them all requests share.
    pub body_limits: crate::body::Limits,
    /// The most bytes one record may take (`kafka.message_max_bytes`), checked before any
    /// record of a request is queued.
    pub message_max_bytes: usize,
    /// How often topic metadata is refreshed.
    pub metadata_refresh: Duration,
    /// The disk spool, when `spool.dir` is set.
    pub spool: Option<Arc<crate::spool::Spool>>,
    /// Peers to hand overflow to, when configured.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// API keys, when auth is on.
    pub keys: Option<Arc<Keys>>,
    global_limit: Option<Bucket>,
    served: Vec<Arc<Served>>,
    default_partitioner: Partitioner,
    topic_partitioner: HashMap<String, Partitioner>,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Checks the config and builds routes, hooks and producers. Errors name the key at fault.
    pub fn build(config: &Config, rust_hook: Option<Arc<dyn Hook>>) -> Result<AppState, String> {
        let checked = Checked::new(config, rust_hook)?;
        let topic_metrics = Arc::new(metrics::Topics::new(labelled_topics(
            config,
            &checked.routes,
        )));
        let producers = Arc::new(Producers::build(config, &topic_metrics)?);
        let served = checked
            .routes
            .into_iter()
            .map(|(route, hook)| {
                let metrics = RouteMetrics::new(&route.path, route.mode.as_str());
                Arc::new(Served {
                    route,
                    hook,
                    metrics,
                })
            })
            .collect();
        let cluster =
            crate::cluster::Cluster::new(&config.cluster, config.server.listen)?.map(Arc::new);
        // Opened whenever a directory is set, even if no route spools, so leftovers are replayed.
        let spool = match &config.spool.dir {
            Some(dir) => Some(Arc::new(
                crate::spool::Spool::open(dir, &config.spool).map_err(|e| format!("spool: {e}"))?,
            )),
            None => None,
        };
        Ok(AppState {
            spool,
            cluster,
            keys: checked.keys,
            global_limit: checked.global_limit,
            server: config.server.clone(),
            allow: checked.allow,
            producers,
            topic_metrics,
            stats: Stats::default(),
            started: Instant::now(),
            hook_timeout: config.hook.timeout,
            background: Arc::default(),
            body_limits: crate::body::Limits::new(&config.server),
            decode_limits: crate::decode::Limits {
                max_records: config.server.max_records,
                max_depth: config.server.max_json_depth,
            },
            metadata_refresh: config.kafka.metadata_refresh,
            message_max_bytes: config.kafka.message_max_bytes,
            served,
            default_partitioner: config.topics.partitioner,
            topic_partitioner: checked.topic_partitioner,
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Everything [`AppState::build`] checks, without creating producers, so no broker is
    /// contacted (`kafboy check-config`).
    pub fn check(config: &Config) -> Result<(), String> {
        Checked::new(config, None)?;
        if let Some(tls) = &config.server.tls {
            crate::tls::Tls::load(tls)?;
        }
        if let Some(cors) = &config.server.cors {
            let _ = crate::listener::cors(cors)?;
        }
        crate::cluster::Cluster::new(&config.cluster, config.server.listen)?;
        if let Some(dir) = &config.spool.dir {
            check_spool_dir(dir)?;
        }
        crate::kafka::check(config)
    }

    /// The key a request presents (client certificate subject, `Authorization: Bearer` or
    /// `X-Api-Key`), checked before anything else; `None` when auth is off.
    pub fn authenticate(
        &self,
        parts: &axum::http::request::Parts,
    ) -> Result<Option<Arc<Key>>, Denied> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let set = keys.current();
        if let Some(key) = parts
            .extensions
            .get::<ClientSubject>()
            .and_then(|s| set.by_subject(&s.0))
        {
            return Ok(Some(key));
        }
        let presented = crate::auth::presented(&parts.headers)
            .ok_or(Denied::Unauthenticated("API key required"))?;
        set.find(presented)
            .map(Some)
            .ok_or(Denied::Unauthenticated("unknown API key"))
    }

    /// Takes a token from the global rate limit. Called once every refusal that costs nothing
    /// has been made (identity, topic grammar, the key's modes, topics and rate, the
    /// allowlist, shutting down, key/partition/Content-Type/Content-Encoding/declared length),
    /// so a client can only spend the node's tokens on requests it may make, and a key only
    /// as fast as its own rate allows.
    pub fn admit(&self) -> Result<(), Denied> {
        match &self.global_limit {
            Some(bucket) => bucket
                .take()
                .map_err(|wait| Denied::Limited(wait.as_secs_f64().ceil().max(1.0) as u64)),
            None => Ok(()),
        }
    }

    /// Free share of the fullest producer queue, 0 to 1, for peers choosing where to forward.
    pub fn headroom(&self) -> f64 {
        let fullest = self
            .producers
            .all()
            .iter()
            .map(|p| p.fill().0)
            .fold(0.0, f64::max);
        1.0 - fullest
    }

    /// The served routes.
    pub fn served(&self) -> impl Iterator<Item = &Arc<Served>> {
        self.served.iter()
    }

    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Starts shutdown: new requests get 503 and `/ready` turns false.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Why `/ready` is not 200, if it is not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.shutting_down() {
            return Some("shutting down");
        }
        if self.spool.as_ref().is_some_and(|s| !s.healthy()) {
            return Some("spool disk error");
        }
        self.producers.not_ready()
    }

    /// The partition strategy for `topic` on `route`: the route's, else the topic's, else the
    /// default.
    pub fn partitioner_for(&self, route: &Route, topic: &str) -> Partitioner {
        route
            .partitioner
            .or_else(|| self.topic_partitioner.get(topic).copied())
            .unwrap_or(self.default_partitioner)
    }
}

/// Topics that get their own metric label: named in the allowlist, in overrides, or as a fixed
/// route topic. Every other topic is `other`, so clients cannot grow the label set.
fn labelled_topics(
    config: &Config,
    routes: &[(Arc<Route>, crate::ingest::RouteHook)],
) -> Vec<String> {
    let mut names: Vec<String> = config
        .topics
        .allow
        .iter()
        .filter(|t| !t.ends_with('*'))
        .cloned()
        .collect();
    names.extend(config.topics.overrides.keys().cloned());
    names.extend(routes.iter().filter_map(|(r, _)| match &r.topic {
        TopicSource::Fixed(t) => Some(t.clone()),
        TopicSource::Path => None,
    }));
    names.sort();
    names.dedup();
    names
}

/// Whether `dir` is, or can become, the spool directory: itself a directory, or not there yet
/// below one (nothing is created; starting creates it).
fn check_spool_dir(dir: &std::path::Path) -> Result<(), String> {
    // A relative path's last ancestor is "", the working directory.
    let existing = dir
        .ancestors()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())
        .unwrap_or(std::path::Path::new("/"));
    match std::fs::metadata(existing) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!("spool: {} is not a directory", existing.display())),
        Err(e) => Err(format!("spool: {}: {e}", existing.display())),
    }
}

/// The parts of a config that are checked and compiled before any producer exists.
/// Limits whose extreme values would fail at run time: a deadline past what the clock can
/// hold panics, and tokio's semaphore takes at most `MAX_PERMITS` connections.
fn check_ranges(config: &Config) -> Result<(), String> {
    let s = &config.server;
    let durations = [
        ("server.enqueue_timeout", s.enqueue_timeout),
        ("server.sync_timeout", s.sync_timeout),
        ("server.shutdown_timeout", s.shutdown_timeout),
        ("server.header_read_timeout", s.header_read_timeout),
        ("server.body_read_timeout", s.body_read_timeout),
        ("server.body_deadline", s.body_deadline),
        ("server.write_timeout", s.write_timeout),
        ("hook.timeout", config.hook.timeout),
        ("kafka.metadata_timeout", config.kafka.metadata_timeout),
    ];
    if let Some((name, _)) = durations
        .iter()
        .find(|(_, d)| *d > crate::config::MAX_DURATION)
    {
        return Err(format!("{name} must be at most 1 day"));
    }
    // Zero would mean never (librdkafka's message timeout, whole milliseconds), no time at all
    // (a metadata request, a body) or no pause between requests to the brokers (the refresh).
    let k = &config.kafka;
    let floors = [
        (
            "server.body_deadline",
            s.body_deadline,
            Duration::from_millis(10),
        ),
        (
            "kafka.message_timeout",
            k.message_timeout,
            Duration::from_millis(1),
        ),
        (
            "kafka.metadata_timeout",
            k.metadata_timeout,
            Duration::from_millis(10),
        ),
        (
            "kafka.metadata_refresh",
            k.metadata_refresh,
            Duration::from_secs(1),
        ),
    ];
    if let Some((name, _, floor)) = floors.iter().find(|(_, d, floor)| d < floor) {
        return Err(format!("{name} must be at least {floor:?}"));
    }
    if k.queue_max_messages == 0 || k.queue_max_bytes == 0 {
        return Err("kafka.queue_max_messages and kafka.queue_max_bytes must be above 0".into());
    }
    if s.max_body_buffer_bytes < s.max_body_bytes {
        return Err("server.max_body_buffer_bytes must be at least server.max_body_bytes".into());
    }
    if s.admin_listen
        .is_some_and(|a| a == s.listen && a.port() != 0)
    {
        return Err("server.admin_listen must differ from server.listen".into());
    }
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    if !(1..=most).contains(&s.max_connections) {
        return Err(format!(
            "server.max_connections must be between 1 and {most}"
        ));
    }
    Ok(())
}

struct Checked {
    routes: Vec<(Arc<Route>, crate::ingest::RouteHook)>,
    allow: Allowlist,
    topic_partitioner: HashMap<String, Partitioner>,
    keys: Option<Arc<Keys>>,
    global_limit: Option<Bucket>,
}

impl Checked {
    fn new(config: &Config, rust_hook: Option<Arc<dyn Hook>>) -> Result<Checked, String> {
        if config.server.max_body_bytes > config.kafka.message_max_bytes {
            return Err(format!(
                "server.max_body_bytes ({}) exceeds kafka.message_max_bytes ({})",
                config.server.max_body_bytes, config.kafka.message_max_bytes
            ));
        }
        if !(1..=127).contains(&config.server.max_json_depth) {
            // serde_json, which hooks and most consumers parse with, stops at 127 levels.
            return Err("server.max_json_depth must be between 1 and 127".into());
        }
        check_ranges(config)?;
        config.log.check()?;
        let routes = crate::hook::attach(config, routes::compile(config)?, rust_hook)?;
        config.spool.check()?;
        for (route, _) in &routes {
            let sync = matches!(
                route.mode,
                crate::config::Mode::Sync | crate::config::Mode::BatchSync
            );
            // A sync 200 says the broker acknowledged; with acks = 0 nobody does.
            if sync && config.kafka.acks == crate::config::Acks::None {
                return Err(format!(
                    "route {}: kafka.acks = \"none\" cannot back a sync route (set \
                     server.default_routes = false and configure async routes only)",
                    route.path
                ));
            }
            if route.spool && config.spool.dir.is_none() {
                return Err(format!(
                    "route {}: spool = true needs spool.dir",
                    route.path
                ));
            }
            if route.spool && sync {
                return Err(format!(
                    "route {}: spool is for async and batch_async routes",
                    route.path
                ));
            }
        }
        let allow = Allowlist::new(&config.topics.allow)?;
        let mut topic_partitioner = HashMap::new();
        for (topic, o) in &config.topics.overrides {
            routes::validate_topic(topic).map_err(|e| format!("topics.overrides.{topic}: {e}"))?;
            if let Some(p) = o.partitioner {
                topic_partitioner.insert(topic.clone(), p);
            }
        }
        let auth = &config.auth;
        let global_limit = match (auth.global_rate, auth.global_burst) {
            (Some(rate), burst) => {
                Some(Bucket::checked(rate, burst).map_err(|e| format!("auth.global_{e}"))?)
            }
            (None, Some(_)) => return Err("auth.global_burst needs auth.global_rate".into()),
            (None, None) => None,
        };
        let mtls = config
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        let keys = match (&auth.keys_file, auth.keys.is_empty()) {
            (None, true) => None,
            _ => Some(Arc::new(
                Keys::load(&auth.keys, auth.keys_file.as_deref(), mtls)
                    .map_err(|e| format!("auth: {e}"))?,
            )),
        };
        Ok(Checked {
            routes,
            allow,
            topic_partitioner,
            keys,
            global_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_the_clock_or_tokio_cannot_hold_are_config_errors() {
        for (toml, key) in [
            (
                "[server]\nheader_read_timeout = \"18446744073709551615s\"",
                "server.header_read_timeout",
            ),
            (
                "[server]\nshutdown_timeout = \"400days\"",
                "server.shutdown_timeout",
            ),
            ("[hook]\ntimeout = \"2days\"", "hook.timeout"),
            (
                "[server]\nmax_connections = 9223372036854775807",
                "server.max_connections",
            ),
            ("[server]\nmax_connections = 0", "server.max_connections"),
        ] {
            let config = Config::from_toml(toml).unwrap();
            let error = AppState::check(&config).unwrap_err();
            assert!(error.contains(key), "{toml}: {error}");
        }
        AppState::check(&Config::from_toml("[server]\nshutdown_timeout = \"1day\"").unwrap())
            .unwrap();
    }
}
