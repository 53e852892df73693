//! Keeping the view of the peers current: each peer's `/ready` every `health_interval`, the
//! discovery list every `refresh`.

use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use axum::http::StatusCode;
use metrics::gauge;

use super::{Cluster, MAX_DISCOVERED, Peer, capped, normalize};
use crate::throttle::{Level, Throttle};

impl Cluster {
    /// Records a peer's state from a check or a failed forward.
    pub(super) fn mark(&self, url: &str, ready: bool, headroom: f64) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(peer) = peers.get_mut(url) {
            let ready = ready && !peer.own;
            if peer.ready != ready {
                tracing::info!(peer = %url, ready, "peer state changed");
            }
            peer.ready = ready;
            // Room that is never used (this node itself) is not shown as room.
            peer.headroom = if ready { headroom } else { 0.0 };
            gauge!(crate::metrics::PEER_READY, "peer" => url.to_string()).set(if ready {
                1.0
            } else {
                0.0
            });
        }
    }

    async fn check(&self, url: &str) {
        let answer = self
            .client
            .get(format!("{url}/ready"))
            .timeout(self.config.health_interval.max(Duration::from_millis(500)))
            .send()
            .await;
        let (ready, headroom) = match answer {
            Ok(r) if r.status() == StatusCode::OK => {
                let body = json_of(r).await.unwrap_or_default();
                if body["node"].as_str() == Some(self.id.as_str()) {
                    self.found_self(url);
                }
                // A share: a peer that claims more would draw all the overflow.
                let headroom = body["headroom"].as_f64().unwrap_or(0.0);
                (
                    true,
                    if headroom.is_finite() {
                        headroom.clamp(0.0, 1.0)
                    } else {
                        0.0
                    },
                )
            }
            failed => {
                // A peer that never became ready would otherwise leave no trace (only changes
                // are logged): a wrong URL, a port that speaks TLS.
                static FAILED: LazyLock<Throttle> = LazyLock::new(|| {
                    let what = "peer health check failed";
                    Throttle::new(Duration::from_secs(30), Level::Warn, what, None)
                });
                if let Some(suppressed) = FAILED.pass() {
                    let why = match failed {
                        Ok(r) => format!("answered {}", r.status()),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(peer = %url, error = %why, suppressed, "peer health check failed");
                }
                (false, 0.0)
            }
        };
        self.mark(url, ready, headroom);
    }

    /// `url` leads back to this node: it stays listed, marked, and is never forwarded to.
    fn found_self(&self, url: &str) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(peer) = peers.get_mut(url)
            && !peer.own
        {
            tracing::info!(peer = %url, "peer is this node; not forwarded to");
            peer.own = true;
        }
    }

    async fn discover(&self, source: &str) {
        // The URL may carry Basic auth: neither it nor reqwest's errors (which name it) go
        // into the log.
        let shown = super::redacted(source);
        let listed = match self
            .client
            .get(source)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            // A list read in part would drop the peers it missed: the old one stays instead.
            Ok(r) if r.status().is_success() => match capped(r, DISCOVERY_MAX).await {
                Ok(body) => String::from_utf8_lossy(&body).into_owned(),
                Err(error) => return tracing::warn!(source = %shown, %error, "discovery failed"),
            },
            Ok(r) => {
                return tracing::warn!(source = %shown, status = %r.status(), "discovery failed");
            }
            Err(error) => {
                let error = error.without_url();
                return tracing::warn!(source = %shown, %error, "discovery failed");
            }
        };
        let found = listed_urls(&listed, &shown);
        // A list with no peer in it is more likely an error page, or a file caught as it is
        // rewritten, than a cluster of one: the old list stays.
        if found.is_empty() {
            return tracing::warn!(source = %shown, "discovery list names no peer; kept the last one");
        }
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        peers.retain(|url, p| {
            let keep = p.fixed || found.contains(url);
            if !keep {
                tracing::info!(peer = %url, "peer left the discovery list");
                // Until the series expires as idle (metrics::expire_gauges_after), it must not
                // say 1.
                gauge!(crate::metrics::PEER_READY, "peer" => url.clone()).set(0.0);
            }
            keep
        });
        // A shared list names this node too: listed, marked, never forwarded to. Other names
        // that lead here are found by the health check (`found_self`).
        for url in found {
            peers.entry(url.clone()).or_insert_with(|| {
                let own = url == self.url;
                if !own {
                    tracing::info!(peer = %url, "peer joined from the discovery list");
                }
                Peer {
                    url,
                    ready: false,
                    headroom: 0.0,
                    fixed: false,
                    own,
                }
            });
        }
    }

    /// Health checks every `health_interval` and discovery every `refresh`, for as long as the
    /// cluster view lives. Apart: a discovery source that stalls (up to its 5 s timeout) must
    /// not hold back the checks that take a hung peer out of the overflow.
    pub fn spawn(self: &Arc<Self>) {
        let weak: Weak<Cluster> = Arc::downgrade(self);
        let interval = self.config.health_interval;
        let refresh = self.config.refresh;
        if let Some(source) = self.config.discovery_url.clone() {
            let weak = weak.clone();
            tokio::spawn(async move {
                loop {
                    let Some(cluster) = weak.upgrade() else {
                        return;
                    };
                    let started = Instant::now();
                    cluster.discover(&source).await;
                    drop(cluster);
                    tokio::time::sleep_until(started + refresh).await;
                }
            });
        }
        tokio::spawn(async move {
            loop {
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                // All at once: peers that time out one after another would leave every figure
                // as many checks old as there are such peers.
                let urls: Vec<String> = cluster.peers().into_iter().map(|p| p.url).collect();
                let checks: Vec<_> = urls
                    .iter()
                    .map(|url| {
                        let cluster = cluster.clone();
                        let url = url.clone();
                        tokio::spawn(async move { cluster.check(&url).await })
                    })
                    .collect();
                for check in checks {
                    let _ = check.await;
                }
                drop(cluster);
                tokio::time::sleep(interval).await;
            }
        });
    }
}

/// Longest discovery list read, and longest `/ready` answer.
const DISCOVERY_MAX: usize = 1 << 20;
const READY_MAX: usize = 64 << 10;

/// The URLs of a discovery list: the last field of each line that has one, so that `/disco`'s
/// `name url` lines do too; each once, at most [`MAX_DISCOVERED`]. Lines that are no `http://`
/// URL are logged (one line for all of them), not silently dropped.
fn listed_urls(listed: &str, source: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let (mut left_out, mut first_error) = (0usize, None);
    for line in listed.lines().filter_map(|l| l.split_whitespace().last()) {
        match normalize(line) {
            Ok(url) if found.contains(&url) => {}
            Ok(url) if found.len() < MAX_DISCOVERED => found.push(url),
            Ok(_) => {
                tracing::warn!(%source, max = MAX_DISCOVERED, "discovery list too long; the rest is left out");
                break;
            }
            Err(error) => {
                left_out += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    if let Some(first) = first_error {
        tracing::warn!(%source, lines = left_out, %first, "discovery lines left out");
    }
    found
}

async fn json_of(response: reqwest::Response) -> Option<serde_json::Value> {
    serde_json::from_slice(&capped(response, READY_MAX).await.ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_lists_take_the_last_field_of_a_line() {
        let listed =
            "http://10.0.0.2:8000\nkafboy@10.0.0.3:8000 http://10.0.0.3:8000/\n\n  \nftp://x\n";
        assert_eq!(
            listed_urls(listed, "test"),
            ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
        );
        let long: String = (0..300)
            .map(|i| format!("http://10.0.{}.{}:8000\n", i / 256, i % 256))
            .collect();
        assert_eq!(listed_urls(&long, "test").len(), MAX_DISCOVERED);
        // Each once: repeats do not take the room of the peers after them.
        let repeated = format!(
            "{}http://10.9.9.9:8000\n",
            "http://10.0.0.2:8000\n".repeat(300)
        );
        assert_eq!(
            listed_urls(&repeated, "test"),
            ["http://10.0.0.2:8000", "http://10.9.9.9:8000"]
        );
        // Nothing a query or a fragment would be appended to.
        assert!(listed_urls("http://10.0.0.2:8000?x=1\nhttp://10.0.0.3#f\n", "test").is_empty());
    }
}
