//! `[server]`: the HTTP listener, its limits and deadlines, TLS and CORS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `server.max_json_depth`'s default.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;

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
    /// `kafka.message_max_bytes`. Default 1000000.
    pub max_body_bytes: usize,
    /// Most records one NDJSON request may carry; more gets 413. Default 10000.
    pub max_records: usize,
    /// Deepest nesting of arrays and objects in a JSON record; deeper gets 400. Default 64.
    pub max_json_depth: usize,
    /// How long a request may wait for room in the producer queue before it gets 503. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
    /// How long a sync request waits for the broker's acknowledgement before it gets 504.
    /// Default 30s. The sync producer gives a record up 2 s before, when that comes before
    /// `kafka.message_timeout`: `503` if it was never sent.
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
    /// Longest a whole request body may take to arrive, however steadily it trickles in; then
    /// 408. Default 60s.
    #[serde(with = "humantime_serde")]
    pub body_deadline: Duration,
    /// Most bytes of request bodies held while they arrive, and of gzip/zstd bodies inflated
    /// until their records are queued, over all connections at once; a request whose body
    /// would pass it gets 503 + Retry-After. Bounds what slow or stalled uploads and small
    /// compressed bodies can hold (10000 connections × 1 MiB bodies would be 10 GiB). At least twice
    /// `max_body_bytes`: a body's buffer grows by doubling as its bytes arrive, and the old and
    /// the new buffer are both held while one is copied. Default 256 MiB.
    pub max_body_buffer_bytes: usize,
    /// Longest a client may take none of its answer (a full socket buffer); then the
    /// connection is closed, so clients that send and never read cannot keep their place
    /// under `max_connections`. Default 10s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
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

/// CORS for browser clients, on the produce routes. Preflight requests are answered without
/// touching Kafka.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed, as browsers send them: `scheme://host[:port]` in lower case, e.g.
    /// `https://app.example.com`; `*` for any (without credentials). At least one.
    #[serde(deserialize_with = "crate::config::string_or_list")]
    pub allowed_origins: Vec<String>,
    /// Methods allowed. Default `["POST"]`.
    #[serde(deserialize_with = "crate::config::string_or_list")]
    pub allowed_methods: Vec<String>,
    /// Request headers allowed; a name ending in `*` allows every header it starts. Default:
    /// Content-Type, Content-Encoding, Authorization, X-Api-Key, X-Request-Id, X-Kafka-Key,
    /// X-Kafka-Partition, X-Kafka-Header-*.
    #[serde(deserialize_with = "crate::config::string_or_list")]
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer. Default 10m.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Answer listed origins with `Access-Control-Allow-Credentials: true`, which requests a
    /// browser sends with credentials need (`navigator.sendBeacon` of a JSON `Blob`, `fetch`
    /// with `credentials: "include"`). kafboy reads no cookies. Not with `*`. Default false.
    pub allow_credentials: bool,
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
                "x-kafka-header-*",
            ]
            .map(String::from)
            .to_vec(),
            max_age: Duration::from_secs(600),
            allow_credentials: false,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            admin_listen: None,
            tls: None,
            cors: None,
            max_body_bytes: 1_000_000,
            max_records: 10_000,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            enqueue_timeout: Duration::from_millis(100),
            sync_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            default_routes: true,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            body_deadline: Duration::from_secs(60),
            max_body_buffer_bytes: 256 << 20,
            write_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: 64 << 10,
            max_connections: 10_000,
        }
    }
}
