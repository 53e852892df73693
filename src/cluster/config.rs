//! `[cluster]`: its settings, their checks, and the form of a peer's URL.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::CONNECT_TIMEOUT;

/// Cluster settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, as `/disco` tells it. Default: `kafboy@<listen address>`.
    pub name: Option<String>,
    /// The URL peers reach this node at. Default: `http://<listen address>` (set it when
    /// listening on 0.0.0.0 or `[::]`, which no peer can reach; a warning says so).
    pub advertise_url: Option<String>,
    /// Peer base URLs, e.g. `http://10.0.0.2:8000`.
    #[serde(deserialize_with = "crate::config::string_or_list")]
    pub peers: Vec<String>,
    /// An `http://` URL answering the base URLs of every node, one per line (a line may name
    /// the node first, as `/disco` does: `name url`), e.g. a file server; re-read every
    /// `refresh`. Peers it stops listing are dropped, so it must list them all each time.
    pub discovery_url: Option<String>,
    /// How often the discovery URL is re-read. Default 10s.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// How often peers are asked `/ready`. Default 1s; at least 100ms.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Share of the producer queue above which requests are handed to a peer. Default 0.8.
    pub high_water: f64,
    /// Longest wait for a peer's answer to a forwarded request. Default: the longest a peer
    /// may take to answer one (`server.sync_timeout` + two `kafka.metadata_timeout`, for the
    /// topic and its partitions + `server.enqueue_timeout`) plus 1 s, so that a peer's late but
    /// definite answer is relayed, not turned into a 504. (Routes with a hook are never
    /// forwarded.)
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Option<Duration>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: None,
            advertise_url: None,
            peers: Vec::new(),
            discovery_url: None,
            refresh: Duration::from_secs(10),
            health_interval: Duration::from_secs(1),
            high_water: 0.8,
            forward_timeout: None,
        }
    }
}

/// The checks `[cluster]` must pass beside the rest of `whole`; the forward timeout it comes to
/// (`cluster.forward_timeout`, or its default).
pub(super) fn checked(whole: &crate::Config) -> Result<Duration, String> {
    let config = &whole.cluster;
    // Peers are asked over plain HTTP, on their main listener, which TLS would make HTTPS
    // (and mTLS closed to a client without a certificate): no peer would ever be ready.
    if whole.server.tls.is_some() {
        return Err(
            "[cluster] cannot go with server.tls: nodes forward to each other over \
                    plain HTTP"
                .into(),
        );
    }
    let forward_timeout = config.forward_timeout.unwrap_or_else(|| {
        let s = &whole.server;
        s.sync_timeout
            .saturating_add(whole.kafka.metadata_timeout.saturating_mul(2))
            .saturating_add(s.enqueue_timeout)
            .saturating_add(Duration::from_secs(1))
            .clamp(2 * CONNECT_TIMEOUT, crate::config::MAX_DURATION)
    });
    if !(0.0..=1.0).contains(&config.high_water) {
        return Err("cluster.high_water must be between 0 and 1".into());
    }
    // Zero would ask every peer about once a millisecond (and never re-read discovery),
    // each check on a new connection; a day past what the clock can hold would panic. A
    // forward must outlast its connect: a slow connect ended by the whole request's timeout
    // is not told from a request the peer took, and would be a 504 for nothing sent.
    for (name, d, least) in [
        (
            "cluster.refresh",
            config.refresh,
            Duration::from_millis(100),
        ),
        (
            "cluster.health_interval",
            config.health_interval,
            Duration::from_millis(100),
        ),
        (
            "cluster.forward_timeout",
            forward_timeout,
            2 * CONNECT_TIMEOUT,
        ),
    ] {
        if d < least || d > crate::config::MAX_DURATION {
            return Err(format!("{name} must be between {least:?} and 1 day"));
        }
    }
    if let Some(name) = &config.name
        && axum::http::HeaderValue::from_str(name).is_err()
    {
        return Err(format!("cluster.name {name:?} cannot go in a header"));
    }
    // User info here is sent as Basic auth, and never printed.
    if let Some(source) = &config.discovery_url {
        checked_url(source).map_err(|e| format!("cluster.discovery_url: {e}"))?;
    }
    Ok(forward_timeout)
}

/// A peer's URL, `http://host:port` without a trailing slash. Without user info, query or
/// fragment: a peer's URL is a metric label, a status page entry and a log field, and kafboy's
/// paths (`/ready`, the request's) are appended to it.
pub(super) fn normalize(url: &str) -> Result<String, String> {
    let (url, parsed) = checked_url(url)?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "cluster peer {:?}: no user info (user:password@) in a peer's URL",
            redacted(&url)
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "cluster peer {:?}: no query (?) or fragment (#) in a peer's URL",
            redacted(&url)
        ));
    }
    Ok(url)
}

/// `url` trimmed, without a trailing slash, and parsed, if it is an `http://` URL.
fn checked_url(url: &str) -> Result<(String, reqwest::Url), String> {
    let url = url.trim().trim_end_matches('/');
    // Peers talk plain HTTP (forwarding has no TLS client): keep that link on a private network.
    if !url.starts_with("http://") {
        return Err(format!("cluster URL {:?} must be http://", redacted(url)));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("cluster URL {:?}: {e}", redacted(url)))?;
    Ok((url.to_string(), parsed))
}

/// `url` with the user info of its authority and its query, if any, left out (either may hold
/// a secret): what may be printed.
pub fn redacted(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((url, _)) => (url, "?<query>"),
        None => (url, ""),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return format!("{url}{query}");
    };
    let end = rest.find(['/', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://<user info>@{}{query}", &rest[at + 1..]),
        None => format!("{url}{query}"),
    }
}
