//! Nodes that know each other. Every node can take any request (librdkafka routes each record to
//! its partition leader), so a node whose producer queue is nearly full hands the whole request
//! (method, path, query, headers, body) to the ready peer with the most headroom and relays its
//! answer, instead of answering 503. A hop header makes sure a request is forwarded at most once.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use serde::Serialize;

mod config;
mod forward;
mod watch;

use config::normalize;
pub use config::{ClusterConfig, redacted};
pub(crate) use forward::declined;

/// The header a forwarded request carries: the name of the node that forwarded it.
pub const HOP: HeaderName = HeaderName::from_static("x-kafboy-forwarded-by");

/// How much less room than this node (or than the high-water mark leaves) a peer may have and
/// still take its overflow.
const ROOM_SLACK: f64 = 0.02;

/// Most peers a discovery list may add: each is asked `/ready` every `health_interval`.
const MAX_DISCOVERED: usize = 256;

/// Longest wait for a connection to a peer. A peer whose host died, or behind a firewall that
/// drops packets, must be given up on as unreachable (the request is then served here), not
/// waited for until `forward_timeout` and answered "may have been written".
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What this node knows of one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    /// Base URL.
    pub url: String,
    /// Answered `/ready` with 200 at the last check.
    pub ready: bool,
    /// Free share of its producer queue, from its `/ready`.
    pub headroom: f64,
    /// From the static list (kept when discovery drops it).
    #[serde(skip)]
    pub fixed: bool,
    /// The URL reaches this very node (its `/ready` told this node's id): never forwarded to.
    #[serde(rename = "self")]
    pub own: bool,
}

/// The cluster as this node sees it.
pub struct Cluster {
    /// This node's name.
    pub name: String,
    /// This node's URL.
    pub url: String,
    /// Longest wait for a peer's answer (`cluster.forward_timeout`, or its default).
    forward_timeout: Duration,
    /// A random id this node tells in its `/ready`, so that a peer URL that leads back here
    /// (a shared peer list, an address other than the advertised one) is known for what it is.
    pub id: String,
    config: ClusterConfig,
    peers: RwLock<BTreeMap<String, Peer>>,
    client: reqwest::Client,
}

impl Cluster {
    /// A cluster view from the config; `None` when no peers and no discovery URL are
    /// configured.
    pub fn new(whole: &crate::Config) -> Result<Option<Cluster>, String> {
        let config = &whole.cluster;
        let listen = whole.server.listen;
        if config.peers.is_empty() && config.discovery_url.is_none() {
            return Ok(None);
        }
        let forward_timeout = self::config::checked(whole)?;
        if config.advertise_url.is_none() && listen.ip().is_unspecified() {
            tracing::warn!(
                %listen,
                "cluster.advertise_url is not set: /disco names this node by an address other \
                 nodes cannot reach"
            );
        }
        // Written as peer URLs are (no trailing slash), so that a list naming this node's own
        // URL is recognised at once.
        let url = config.advertise_url.as_deref().map_or_else(
            || format!("http://{listen}"),
            |u| u.trim().trim_end_matches('/').to_string(),
        );
        let peers = config
            .peers
            .iter()
            .map(|p| {
                normalize(p).map(|u| {
                    let own = u == url;
                    (
                        u.clone(),
                        Peer {
                            url: u,
                            ready: false,
                            headroom: 0.0,
                            fixed: true,
                            own,
                        },
                    )
                })
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        // A new connection for every request (and `Connection: close` on forwards, so that the
        // peer closes it and keeps the TIME_WAIT, not this node's ports): a request sent on a
        // kept-alive connection the peer was closing (a peer stopping closes its idle
        // connections) fails as if it had reached the peer, and is a 504 although nothing was
        // written.
        // No redirects: a forwarded POST (and the key it carries) goes to the peer, nowhere else.
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| format!("cluster: {e}"))?;
        Ok(Some(Cluster {
            name: config
                .name
                .clone()
                .unwrap_or_else(|| format!("kafboy@{listen}")),
            url: normalize(&url)?,
            forward_timeout,
            id: format!("{:016x}", rand::random::<u64>()),
            config: config.clone(),
            peers: RwLock::new(peers),
            client,
        }))
    }

    /// The peer a request should go to, if any: this node is past its high-water mark (or has
    /// no room at all), the request was not forwarded already, and a ready peer has room. With
    /// room left here, the peer must be below the high-water mark itself and have at least as
    /// much room as this node: nodes under the same load must not hand each other their
    /// requests (every request would take two hops just when the cluster is busiest). With no
    /// room here, any peer with room will do. "As much" is within [`ROOM_SLACK`]: a peer's
    /// figure is up to one health check old, and a queue with a record in it is not fuller in
    /// any way that matters.
    pub fn peer_for(&self, fill: f64, full: bool, headers: &HeaderMap) -> Option<String> {
        if !(full || fill >= self.config.high_water) || headers.contains_key(HOP) {
            return None;
        }
        // At or below the high-water mark itself, not within the slack above it: two nodes
        // just past the mark would hand each other their requests. (Below a mark of
        // `ROOM_SLACK`, where every node forwards, a peer with a record or two is still empty.)
        let below_mark = (1.0 - self.config.high_water).min(1.0 - ROOM_SLACK);
        let need = match full {
            true => 0.0,
            false => (1.0 - fill - ROOM_SLACK).max(below_mark),
        };
        self.best(need)
    }

    /// Whether a request may be forwarded at all: one authenticated by its TLS client
    /// certificate may not, since the certificate does not travel with it.
    pub fn may_forward(extensions: &axum::http::Extensions) -> bool {
        extensions.get::<crate::auth::ClientSubject>().is_none()
    }

    /// A ready peer with room, at least `need` of it, and the most headroom; among peers within
    /// 10 % of the best, one at random, so equally idle peers share the overflow.
    fn best(&self, need: f64) -> Option<String> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        let ready: Vec<&Peer> = peers
            .values()
            .filter(|p| p.ready && !p.own)
            .filter(|p| p.headroom > 0.0 && p.headroom >= need)
            .collect();
        let top = ready
            .iter()
            .map(|p| p.headroom)
            .fold(f64::NEG_INFINITY, f64::max);
        let near: Vec<&&Peer> = ready.iter().filter(|p| p.headroom >= top - 0.1).collect();
        let pick = near.get(rand::random_range(0..near.len().max(1)))?;
        Some(pick.url.clone())
    }

    /// The peers, for the status page.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// A response body of at most `max` bytes; a longer one, or one cut short, is an error.
async fn capped(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| e.without_url().to_string())?
    {
        if body.len() + chunk.len() > max {
            return Err(format!("the answer is longer than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cluster(toml: &str) -> Result<Option<Cluster>, String> {
        let mut config = crate::Config::from_toml(&format!("[cluster]\n{toml}")).unwrap();
        config.server.listen = "127.0.0.1:8000".parse().unwrap();
        Cluster::new(&config)
    }

    #[test]
    fn the_forward_timeout_outlasts_a_peers_longest_answer() {
        let c = cluster("peers = [\"http://10.0.0.2:8000\"]")
            .unwrap()
            .unwrap();
        // 30 s sync + 2 x 5 s metadata + 100 ms enqueue + 1 s.
        assert_eq!(c.forward_timeout, Duration::from_millis(41_100));
        let c = cluster("peers = [\"http://10.0.0.2:8000\"]\nforward_timeout = \"3s\"")
            .unwrap()
            .unwrap();
        assert_eq!(c.forward_timeout, Duration::from_secs(3));
    }

    #[test]
    fn a_cluster_behind_tls_is_refused() {
        let mut config =
            crate::Config::from_toml("[cluster]\npeers = [\"http://10.0.0.2:8000\"]").unwrap();
        config.server.tls = Some(crate::config::TlsConfig {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
            client_ca: None,
        });
        let refused = Cluster::new(&config).err().unwrap_or_default();
        assert!(refused.contains("server.tls"), "{refused}");
    }

    #[test]
    fn requests_go_only_to_a_peer_with_more_room() {
        let peer = "http://10.0.0.2:8000";
        let c = cluster(&format!("peers = [\"{peer}\"]")).unwrap().unwrap();
        let none = HeaderMap::new();
        assert_eq!(c.peer_for(0.9, false, &none), None, "no peer ready yet");
        c.mark(peer, true, 0.0);
        assert_eq!(c.peer_for(0.85, false, &none), None, "the peer is full");
        assert_eq!(c.peer_for(1.0, true, &none), None, "both full");
        c.mark(peer, true, 0.1);
        assert_eq!(c.peer_for(0.85, false, &none), None, "less room than here");
        c.mark(peer, true, 0.5);
        assert_eq!(c.peer_for(0.85, false, &none).as_deref(), Some(peer));
        // Past the high-water mark itself, the peer takes nothing from a node with room left:
        // under even load, nodes would hand each other their requests.
        c.mark(peer, true, 0.16);
        assert_eq!(
            c.peer_for(0.86, false, &none),
            None,
            "the peer is as loaded"
        );
        c.mark(peer, true, 0.19);
        assert_eq!(
            c.peer_for(0.81, false, &none),
            None,
            "both just past the mark"
        );
        c.mark(peer, true, 0.2);
        assert_eq!(
            c.peer_for(0.81, false, &none).as_deref(),
            Some(peer),
            "at the mark"
        );
        assert_eq!(
            c.peer_for(0.9, true, &none).as_deref(),
            Some(peer),
            "none here"
        );
        // An idle node forwarding everything (high water 0): a peer with a record or two in
        // its queue is as good as an empty one.
        let eager = cluster(&format!("peers = [\"{peer}\"]\nhigh_water = 0.0"))
            .unwrap()
            .unwrap();
        eager.mark(peer, true, 0.99999);
        assert_eq!(eager.peer_for(0.0, false, &none).as_deref(), Some(peer));
        eager.mark(peer, true, 0.9);
        assert_eq!(eager.peer_for(0.0, false, &none), None, "10 points fuller");
        assert_eq!(
            c.peer_for(0.3, true, &none).as_deref(),
            Some(peer),
            "no room here"
        );
        assert_eq!(c.peer_for(0.5, false, &none), None, "below high water");
        let mut hopped = HeaderMap::new();
        hopped.insert(HOP, HeaderValue::from_static("other"));
        assert_eq!(
            c.peer_for(1.0, true, &hopped),
            None,
            "never forwarded twice"
        );
    }

    #[test]
    fn cluster_settings_are_checked() {
        for (bad, why) in [
            ("health_interval = \"0s\"", "between"),
            ("health_interval = \"10ms\"", "between"),
            ("refresh = \"0s\"", "between"),
            ("forward_timeout = \"400days\"", "between"),
            ("forward_timeout = \"500ms\"", "between"),
            ("name = \"a\\nb\"", "header"),
            ("discovery_url = \"https://u:hunter2@lb/peers\"", "http://"),
        ] {
            let toml = format!("peers = [\"http://10.0.0.2:8000\"]\n{bad}");
            let error = cluster(&toml).err();
            assert!(
                error
                    .as_ref()
                    .is_some_and(|e| e.contains(why) && !e.contains("hunter2")),
                "{bad}: {error:?}"
            );
        }
        let basic = "peers = [\"http://10.0.0.2:8000\"]\ndiscovery_url = \"http://u:pw@lb/peers\"";
        assert!(
            cluster(basic).is_ok(),
            "a discovery URL may carry Basic auth"
        );
        assert_eq!(
            redacted("http://u:hunter2@lb:80/peers?token=a@b"),
            "http://<user info>@lb:80/peers?<query>"
        );
        assert_eq!(redacted("http://lb/peers"), "http://lb/peers");
        for (peer, why) in [
            ("http://a b:1/x", "a b"),
            ("http://a:99999", "port"),
            ("http://u:hunter2@a:1", "user info"),
            ("http://u:hunter2@a:99999", "port"),
            ("https://u:hunter2@a", "http://"),
        ] {
            let error = cluster(&format!("peers = [\"{peer}\"]"))
                .err()
                .unwrap_or_default();
            assert!(
                error.contains(why) && !error.contains("hunter2"),
                "{peer}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn a_peer_that_redirects_or_is_full_is_not_asked_again_until_its_next_check() {
        use axum::http::{Method, StatusCode, header};
        use axum::response::IntoResponse;
        use bytes::Bytes;
        // A peer whose answer is the status the request's path names. Its redirects lead to
        // its own 200: followed, they would be relayed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = format!("http://{}", listener.local_addr().unwrap());
        let location = format!("{peer}/200");
        let app = axum::Router::new().route(
            "/{status}",
            axum::routing::post(
                move |axum::extract::Path(status): axum::extract::Path<u16>| async move {
                    let status = StatusCode::from_u16(status).unwrap();
                    (status, [(header::LOCATION, location)], "{}").into_response()
                },
            ),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = cluster(&format!("peers = [\"{peer}\"]")).unwrap().unwrap();
        let none = HeaderMap::new();
        for (status, served_here, still_asked) in [
            (200, false, true),
            (400, false, true),
            (429, true, true),
            (307, true, false),
            (308, true, false),
            (503, true, false),
        ] {
            c.mark(&peer, true, 1.0);
            let uri: axum::http::Uri = format!("/{status}").parse().unwrap();
            let answer = c
                .forward(peer.clone(), Method::POST, &uri, &none, None, Bytes::new())
                .await;
            match answer {
                None => assert!(served_here, "{status} was declined"),
                Some(answer) => {
                    assert!(!served_here, "{status} was relayed");
                    assert_eq!(answer.status().as_u16(), status);
                }
            }
            let asked = c.peer_for(1.0, true, &none).is_some();
            assert_eq!(asked, still_asked, "after a {status}");
        }
    }
}
