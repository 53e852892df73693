//! What a config must pass before anything is built from it: ranges and floors of its values,
//! the spool directory, and the parts compiled once (routes with their hooks, the allowlist,
//! partition strategies, keys, the global rate limit).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Bucket, Keys};
use crate::config::{Config, Partitioner};
use crate::hook::Hook;
use crate::routes::{self, Allowlist, Route};

/// Whether `dir` is, or can become, the spool directory: itself a directory, or not there yet
/// below one (nothing is created; starting creates it).
pub(super) fn check_spool_dir(dir: &std::path::Path) -> Result<(), String> {
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

/// Most `server.max_headers`.
const MAX_HEADERS: usize = 1000;
/// Most `server.max_header_bytes`: hyper's read buffer stops there.
const MAX_HEADER_BYTES: usize = 400 << 10;

/// Settings librdkafka reads as 32-bit integers, within its own ranges: past them a value
/// would wrap (a message timeout of 50 days becomes 7 hours, a size of 4 GB becomes 1000
/// bytes) instead of being refused. And a Lua state's memory limit: 0 would be none.
fn check_librdkafka_ranges(config: &Config) -> Result<(), String> {
    let k = &config.kafka;
    if k.message_timeout.as_millis() > i32::MAX as u128 {
        return Err("kafka.message_timeout must be at most 24.8 days (2147483647 ms)".into());
    }
    if k.statistics_interval > Duration::from_secs(86_400) {
        return Err("kafka.statistics_interval must be at most 1 day".into());
    }
    // librdkafka takes whole milliseconds: less would be 0, statistics off, and with them the
    // check of brokers refusing the producer's credentials. Off is written "0s".
    if !k.statistics_interval.is_zero() && k.statistics_interval < Duration::from_millis(1) {
        return Err("kafka.statistics_interval must be 0s (off) or at least 1ms".into());
    }
    if k.message_max_bytes > 1_000_000_000 {
        return Err("kafka.message_max_bytes must be at most 1000000000".into());
    }
    let batch_sizes = std::iter::once(("batch.batch_size".to_string(), config.batch.batch_size))
        .chain(config.topics.overrides.iter().filter_map(|(topic, o)| {
            Some((
                format!("topics.overrides.{topic}.batch_size"),
                o.batch_size?,
            ))
        }));
    for (name, size) in batch_sizes {
        if !(1..=1_000_000).contains(&size) {
            return Err(format!("{name} must be between 1 and 1000000"));
        }
    }
    // librdkafka refuses these only when it creates the producer, in its own words
    // (`linger.ms`, `message.timeout.ms`), which name no setting of kafboy's.
    let lingers = [
        ("kafka.linger".to_string(), k.linger),
        ("kafka.sync_linger".to_string(), k.sync_linger),
    ]
    .into_iter()
    .chain(config.flush_timeouts());
    for (name, linger) in lingers {
        if linger > Duration::from_secs(900) {
            return Err(format!("{name} must be at most 15m"));
        }
        if linger >= k.message_timeout {
            return Err(format!(
                "{name} must be below kafka.message_timeout ({:?}): records would expire \
                 waiting for their batch",
                k.message_timeout
            ));
        }
    }
    if config.hook.max_memory_bytes < 1 << 20 {
        return Err("hook.max_memory_bytes must be at least 1 MiB".into());
    }
    Ok(())
}

/// Topic creation only for names the operator listed. With a prefix or no list, every name a
/// client makes up is asked for by name: a topic at the brokers, or, where they do not create
/// it, a topic object librdkafka keeps for good and asks about every second, which slows every
/// produce call as they pile up.
fn check_auto_create(config: &Config) -> Result<(), String> {
    let allow = &config.topics.allow;
    if config.kafka.auto_create_topics
        && (allow.is_empty() || allow.iter().any(|t| t.ends_with('*')))
    {
        return Err(
            "kafka.auto_create_topics needs topics.allow to list exact topic names \
                    (no prefix*): otherwise clients could make the brokers create any name"
                .into(),
        );
    }
    Ok(())
}

/// Limits whose extreme values would fail at run time: a deadline past what the clock can
/// hold panics, and tokio's semaphore takes at most `MAX_PERMITS` connections; and floors
/// below which a setting would mean "never" or "no pause at all".
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
        ("kafka.unknown_topic_ttl", config.kafka.unknown_topic_ttl),
        ("kafka.metadata_refresh", config.kafka.metadata_refresh),
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
    let ms = Duration::from_millis;
    let floors = [
        ("server.body_deadline", s.body_deadline, ms(10)),
        // Zero would answer every sync request 504 though its record is written, drop every
        // connection whose write blocks, or time out every body and hook.
        ("server.sync_timeout", s.sync_timeout, ms(10)),
        ("server.body_read_timeout", s.body_read_timeout, ms(10)),
        ("server.header_read_timeout", s.header_read_timeout, ms(10)),
        ("server.write_timeout", s.write_timeout, ms(10)),
        ("hook.timeout", config.hook.timeout, ms(1)),
        ("kafka.message_timeout", k.message_timeout, ms(1)),
        ("kafka.metadata_timeout", k.metadata_timeout, ms(10)),
        ("kafka.metadata_refresh", k.metadata_refresh, ms(1000)),
        // Zero would look up every request's missing topic (or partition past the cached
        // count) at the brokers, one lookup after another.
        ("kafka.unknown_topic_ttl", k.unknown_topic_ttl, ms(100)),
    ];
    if let Some((name, _, floor)) = floors.iter().find(|(_, d, floor)| d < floor) {
        return Err(format!("{name} must be at least {floor:?}"));
    }
    // A sync reply waits out the linger before its record is even sent.
    if k.sync_linger >= s.sync_timeout {
        return Err(
            "kafka.sync_linger must be below server.sync_timeout: every sync reply \
                    would be a 504 with its record written"
                .into(),
        );
    }
    if k.queue_max_messages == 0 || k.queue_max_bytes == 0 {
        return Err("kafka.queue_max_messages and kafka.queue_max_bytes must be above 0".into());
    }
    if s.max_records == 0 {
        return Err("server.max_records must be at least 1".into());
    }
    // hyper sizes two arrays of `max_headers` slots for every request, and reads a head into a
    // buffer of at most ~400 KiB whatever `max_header_bytes` says. Below 8, a POST with its
    // Host, Content-Type and Content-Length, and a proxy's few, would be a 431 every time.
    if !(8..=MAX_HEADERS).contains(&s.max_headers) {
        return Err(format!(
            "server.max_headers must be between 8 and {MAX_HEADERS}"
        ));
    }
    // At 0 every non-empty body would be a 413, and an empty one is refused as well.
    if s.max_body_bytes < 64 {
        return Err("server.max_body_bytes must be at least 64".into());
    }
    if !(1024..=MAX_HEADER_BYTES).contains(&s.max_header_bytes) {
        return Err(format!(
            "server.max_header_bytes must be between 1024 and {MAX_HEADER_BYTES}"
        ));
    }
    // A body read in pieces grows its buffer by doubling, and holds the old and the new one
    // while it is copied: up to twice `max_body_bytes` at that moment. Less budget than that
    // would refuse the largest bodies with a 503 that no retry can pass.
    if s.max_body_buffer_bytes < s.max_body_bytes.saturating_mul(2) {
        return Err(
            "server.max_body_buffer_bytes must be at least twice server.max_body_bytes".into(),
        );
    }
    // TOML integers are 64-bit signed: past that, `check-config` could not print the setting
    // (only an environment variable can set one), and no machine has that much of anything.
    let sp = &config.spool;
    let counts = [
        ("server.max_records", s.max_records as u64),
        (
            "server.max_body_buffer_bytes",
            s.max_body_buffer_bytes as u64,
        ),
        (
            "kafka.queue_max_messages",
            config.kafka.queue_max_messages as u64,
        ),
        ("kafka.queue_max_bytes", config.kafka.queue_max_bytes as u64),
        ("hook.max_instructions", config.hook.max_instructions),
        ("hook.max_memory_bytes", config.hook.max_memory_bytes as u64),
        ("spool.max_bytes", sp.max_bytes),
        ("spool.segment_bytes", sp.segment_bytes),
        ("spool.commit_records", sp.commit_records as u64),
        ("spool.window_records", sp.window_records as u64),
        ("spool.window_bytes", sp.window_bytes),
    ];
    if let Some((name, _)) = counts.iter().find(|(_, n)| *n > i64::MAX as u64) {
        return Err(format!("{name} must be at most {}", i64::MAX));
    }
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    if !(1..=most).contains(&s.max_connections) {
        return Err(format!(
            "server.max_connections must be between 1 and {most}"
        ));
    }
    Ok(())
}

/// Where the listeners bind: addresses a client can reach, and ports that do not collide.
fn check_listen(s: &crate::config::ServerConfig) -> Result<(), String> {
    // A multicast or broadcast address binds, and no client can connect to it.
    let unreachable = |ip: std::net::IpAddr| match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
        std::net::IpAddr::V6(v6) => v6.is_multicast(),
    };
    for (name, address) in [
        ("server.listen", Some(s.listen)),
        ("server.admin_listen", s.admin_listen),
    ] {
        if address.is_some_and(|a| unreachable(a.ip())) {
            return Err(format!(
                "{name} is a multicast or broadcast address, which no client can connect to"
            ));
        }
    }
    // The same port on the same address, or on any address when either is a wildcard
    // (0.0.0.0 or [::] takes the port on every address): the second bind would fail at start.
    // (`[::ffff:127.0.0.1]` is 127.0.0.1.)
    let (listen_ip, port) = (s.listen.ip().to_canonical(), s.listen.port());
    if s.admin_listen.is_some_and(|a| {
        let ip = a.ip().to_canonical();
        a.port() == port
            && port != 0
            && (ip == listen_ip || ip.is_unspecified() || listen_ip.is_unspecified())
    }) {
        return Err("server.admin_listen must not take server.listen's port".into());
    }
    Ok(())
}

/// The parts of a config that are checked and compiled before any producer exists.
pub(super) struct Checked {
    pub(super) routes: Vec<(Arc<Route>, crate::ingest::RouteHook)>,
    pub(super) allow: Allowlist,
    pub(super) topic_partitioner: HashMap<String, Partitioner>,
    pub(super) keys: Option<Arc<Keys>>,
    pub(super) global_limit: Option<Bucket>,
}

impl Checked {
    pub(super) fn new(
        config: &Config,
        rust_hook: Option<Arc<dyn Hook>>,
    ) -> Result<Checked, String> {
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
        check_listen(&config.server)?;
        config.kafka.check_brokers()?;
        check_librdkafka_ranges(config)?;
        check_auto_create(config)?;
        config.log.check()?;
        let routes = crate::hook::attach(config, routes::compile(config)?, rust_hook)?;
        config.spool.check()?;
        // The spool forgets a record once the broker acknowledged it; with acks = 0 that is as
        // soon as it is sent, and a record lost on the way would be gone. That holds for the
        // records an earlier run left in spool.dir too, with no spooled route left.
        if config.spool.dir.is_some() && config.kafka.acks == crate::config::Acks::None {
            return Err(
                "kafka.acks = \"none\" cannot go with spool.dir: the spool would \
                        forget records as soon as they are sent"
                    .into(),
            );
        }
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
            // A record the queue cannot hold is refused by the spool's producer at every
            // attempt, and dead-lettered after a 202; elsewhere it gets 413 at once.
            if route.spool && config.kafka.queue_max_bytes < config.kafka.message_max_bytes {
                return Err(format!(
                    "route {}: a spooled route needs kafka.queue_max_bytes ({}) to be at least \
                     kafka.message_max_bytes ({})",
                    route.path, config.kafka.queue_max_bytes, config.kafka.message_max_bytes
                ));
            }
            if route.spool && sync {
                return Err(format!(
                    "route {}: spool is for async and batch_async routes",
                    route.path
                ));
            }
        }
        let allow = Allowlist::new(&config.topics.allow).map_err(|e| format!("topics.allow{e}"))?;
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
