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
use crate::routes::{Allowlist, Route, TopicSource};
use crate::status::Stats;

mod checked;

use checked::{Checked, check_spool_dir};

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
        metrics::expire_gauges_after(
            config
                .kafka
                .statistics_interval
                .max(config.cluster.health_interval),
        );
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
        let cluster = crate::cluster::Cluster::new(config)?.map(Arc::new);
        metrics::register_counters(cluster.is_some());
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
            let _ = crate::listener::Cors::new(cors)?;
        }
        crate::cluster::Cluster::new(config)?;
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
        let certified = parts.extensions.get::<ClientSubject>();
        let Some(keys) = &self.keys else {
            // With auth off, a client certificate (mTLS) is what lets a request in.
            if certified.is_some() {
                self.page_may_use_certificate(&parts.headers)?;
            }
            return Ok(None);
        };
        let set = keys.current();
        if let Some(key) = certified.and_then(|s| set.by_subject(&s.0)) {
            self.page_may_use_certificate(&parts.headers)?;
            return Ok(Some(key));
        }
        let presented = crate::auth::presented(&parts.headers)
            .map_err(Denied::Unauthenticated)?
            .ok_or(Denied::Unauthenticated("API key required"))?;
        set.find(presented)
            .map(Some)
            .ok_or(Denied::Unauthenticated("unknown API key"))
    }

    /// A browser sends its client certificate with any page's request, a plain form's too,
    /// which asks no preflight: a request with an `Origin` the CORS settings do not name is
    /// refused what the certificate grants (a key or token is a header no page can add
    /// unasked). `"*"` names no origin: it lets any page read answers, not use certificates.
    fn page_may_use_certificate(&self, headers: &axum::http::HeaderMap) -> Result<(), Denied> {
        let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
            return Ok(());
        };
        let listed = self.server.cors.as_ref().is_some_and(|cors| {
            cors.allowed_origins
                .iter()
                .any(|o| o.as_bytes() == origin.as_bytes())
        });
        if listed {
            return Ok(());
        }
        Err(Denied::Forbidden(
            "a page of an origin not in server.cors.allowed_origins may not write with a client certificate"
                .into(),
        ))
    }

    /// Takes a token from the global rate limit. Called once every refusal that costs nothing
    /// has been made (identity, topic grammar, the key's modes, topics and rate, the
    /// allowlist, shutting down, key/partition/Content-Type/Content-Encoding/declared length),
    /// so a client can only spend the node's tokens on requests it may make, and a key only
    /// as fast as its own rate allows.
    pub fn admit(&self) -> Result<(), Denied> {
        self.global_limit.as_ref().map_or(Ok(()), Bucket::admit)
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
        self.producers.note_stop();
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
        // Counts past a TOML integer, which only the environment can give.
        let mut config = Config::from_toml("").unwrap();
        config.server.max_records = usize::MAX;
        let error = AppState::check(&config).unwrap_err();
        assert!(error.contains("server.max_records"), "{error}");
        config.server.max_records = i64::MAX as usize;
        AppState::check(&config).unwrap();
    }
}
