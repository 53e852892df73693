//! kafboy: an HTTP server that writes what is POSTed to it into Apache Kafka.
//!
//! # Layout
//! - [`config`]: the configuration tree (TOML, `KAFBOY_*` env, flags).
//! - [`routes`]: routes compiled from config; topic name rules and the allowlist.
//! - [`auth`]: API keys and rate limits.
//! - [`cluster`]: peers, their health, and forwarding overflow to them.
//! - [`body`]: reading request bodies under size, time and compression limits.
//! - [`decode`]: request bodies to record values (JSON gate, form → JSON, NDJSON).
//! - [`ingest`]: the produce handler.
//! - [`json`]: the strict JSON check, without building a tree.
//! - [`record`]: key, partition and headers of the records a request asks for.
//! - [`reply`]: success replies and the wait for delivery reports.
//! - [`error`]: every failure's HTTP status, in one place.
//! - [`kafka`]: producers, queue accounting, delivery reports, metadata, partitioning.
//! - [`listener`]: the accept loop and its connection limits.
//! - [`metrics`]: metric names, the Prometheus recorder, per-topic counters.
//! - [`server`]: state built once from config, the router, and [`App::run`].
//! - [`hook`]: edit hooks (the [`hook::Hook`] trait, Lua scripts).
//! - [`demo`]: `kafboy demo`, with an embedded broker.
//! - [`state`]: shared state built once from config.
//! - [`status`]: the live status page and its JSON.
//! - [`openapi`]: the OpenAPI description of the HTTP contract.
//! - [`tls`]: HTTPS and mutual TLS on the listener.
//! - [`spool`]: the durable disk spool for async routes.
//! - [`shutdown`]: the SIGTERM/SIGINT future.

pub mod auth;
pub mod body;
pub mod cluster;
pub mod config;
pub mod decode;
pub mod demo;
pub mod error;
pub mod hook;
pub mod ingest;
pub mod json;
pub mod kafka;
pub mod listener;
pub mod metrics;
pub mod openapi;
pub mod operations;
pub mod record;
pub mod reply;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod spool;
pub mod state;
pub mod status;
pub mod throttle;
pub mod tls;

pub use config::Config;
pub use server::{App, AppBuilder, ShutdownReport};

/// `n` as 16 lower-case hex digits, zero-padded: the request ids and spool record ids, one or
/// more per request, where `format!("{n:016x}")` costs many times more.
pub(crate) fn hex64(n: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    std::array::from_fn(|i| HEX[(n >> (60 - 4 * i) & 0xf) as usize])
}

/// Unix time in milliseconds (the wall clock, as librdkafka stamps records).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Locks a mutex, ignoring poisoning: a panic elsewhere mid-update leaves the data behind these
/// locks consistent.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
