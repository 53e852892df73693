//! The live status page (`GET /`, one self-contained HTML file) and the JSON it polls
//! (`GET /status.json`): routes, topics, records per second over the last minutes, errors, queue
//! depth, broker connections, uptime and version.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::server::json;
use crate::state::AppState;

/// Seconds of history the page shows.
const HISTORY: usize = 300;

/// The page itself.
const PAGE: &str = include_str!("status.html");

/// Running totals the page needs that the producers do not keep themselves.
#[derive(Debug, Default)]
pub struct Stats {
    /// Answers by class: 2xx (with the rare 1xx or 3xx a hook replies), 4xx, 5xx.
    pub answers: [AtomicU64; 3],
    /// Records queued; shared with the tasks that wait out a spool's late confirmation.
    pub accepted: Arc<AtomicU64>,
    /// Requests handed to a peer.
    pub forwarded_sent: AtomicU64,
    /// Requests taken from a peer.
    pub forwarded_received: AtomicU64,
    history: Mutex<VecDeque<Sample>>,
}

/// One second of activity.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// Records queued.
    pub accepted: u64,
    /// Records acknowledged.
    pub delivered: u64,
    /// Records that failed after queueing.
    pub failed: u64,
    /// Requests answered 4xx or 5xx.
    pub errors: u64,
}

impl Stats {
    /// Counts one answer.
    pub fn answer(&self, status: u16) {
        // A hook's own reply may be a redirect or 1xx: not an error.
        let i = match status {
            100..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.answers[i].fetch_add(1, Ordering::Relaxed);
    }

    fn totals(&self, app: &AppState) -> Sample {
        let (delivered, failed) = app.producers.tally();
        Sample {
            accepted: self.accepted.load(Ordering::Relaxed),
            delivered,
            failed,
            errors: self.answers[1].load(Ordering::Relaxed)
                + self.answers[2].load(Ordering::Relaxed),
        }
    }
}

/// Samples the totals every second into the history, for as long as the server lives.
pub fn spawn_sampler(app: Weak<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last: Option<Sample> = None;
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            let now = app.stats.totals(&app);
            if let Some(prev) = last {
                let sample = Sample {
                    accepted: now.accepted - prev.accepted,
                    delivered: now.delivered - prev.delivered,
                    failed: now.failed - prev.failed,
                    errors: now.errors - prev.errors,
                };
                let mut history = app.stats.history.lock().unwrap_or_else(|e| e.into_inner());
                if history.len() == HISTORY {
                    history.pop_front();
                }
                history.push_back(sample);
            }
            last = Some(now);
        }
    });
}

#[derive(Serialize)]
struct Status {
    version: &'static str,
    uptime_seconds: u64,
    ready: bool,
    not_ready_reason: Option<&'static str>,
    routes: Vec<RouteView>,
    topics: Vec<TopicView>,
    totals: Totals,
    producers: Vec<ProducerView>,
    peers: Vec<crate::cluster::Peer>,
    history: Vec<Sample>,
}

#[derive(Serialize)]
struct RouteView {
    path: String,
    mode: &'static str,
    hook: bool,
}

#[derive(Serialize)]
struct TopicView {
    name: String,
    partitions: i32,
}

#[derive(Serialize)]
struct Totals {
    answers_2xx: u64,
    answers_4xx: u64,
    answers_5xx: u64,
    records_accepted: u64,
    records_delivered: u64,
    records_failed: u64,
    forwarded_sent: u64,
    forwarded_received: u64,
}

#[derive(Serialize)]
struct ProducerView {
    name: String,
    queued: usize,
    in_flight: usize,
    brokers: Vec<crate::metrics::BrokerState>,
}

/// `GET /status.json`.
pub async fn status_json(State(app): State<Arc<AppState>>) -> Response {
    let totals = app.stats.totals(&app);
    let not_ready_reason = app.not_ready();
    let status = Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: app.started.elapsed().as_secs(),
        ready: not_ready_reason.is_none(),
        not_ready_reason,
        routes: app
            .served()
            .map(|s| RouteView {
                path: s.route.path.clone(),
                mode: s.route.mode.as_str(),
                hook: s.hook.is_some(),
            })
            .collect(),
        topics: app
            .producers
            .topics
            .known(100)
            .into_iter()
            .map(|(name, partitions)| TopicView { name, partitions })
            .collect(),
        totals: Totals {
            answers_2xx: app.stats.answers[0].load(Ordering::Relaxed),
            answers_4xx: app.stats.answers[1].load(Ordering::Relaxed),
            answers_5xx: app.stats.answers[2].load(Ordering::Relaxed),
            records_accepted: totals.accepted,
            records_delivered: totals.delivered,
            records_failed: totals.failed,
            forwarded_sent: app.stats.forwarded_sent.load(Ordering::Relaxed),
            forwarded_received: app.stats.forwarded_received.load(Ordering::Relaxed),
        },
        peers: app.cluster.as_ref().map(|c| c.peers()).unwrap_or_default(),
        producers: app
            .producers
            .slots()
            .map(|slot| {
                let (queued, in_flight) = app.producers.held(slot);
                ProducerView {
                    name: slot.name().to_string(),
                    queued,
                    in_flight,
                    brokers: slot.brokers(),
                }
            })
            .collect(),
        history: app
            .stats
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect(),
    };
    json(StatusCode::OK, &status)
}

/// `GET /`.
pub async fn page() -> Response {
    let mut response = (StatusCode::OK, PAGE).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}
