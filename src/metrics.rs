//! Metrics: names in one place, the Prometheus recorder, and per-topic counter handles built once
//! so the per-record path is an atomic add. Topic labels are bounded: topics named in the config
//! (allowlist entries, overrides, fixed routes) by name, every other topic as `other`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

mod statistics;

pub use statistics::{BrokerState, Seen, statistics};

/// HTTP requests, by route, mode and status class.
pub const REQUESTS: &str = "kafboy_http_requests_total";
/// HTTP request latency, by route and mode.
pub const REQUEST_SECONDS: &str = "kafboy_http_request_duration_seconds";
/// Records per produce request.
pub const REQUEST_RECORDS: &str = "kafboy_request_records";
/// Records queued (202/200 path), by topic.
pub const ACCEPTED: &str = "kafboy_records_accepted_total";
/// Records acknowledged by the broker, by topic.
pub const DELIVERED: &str = "kafboy_records_delivered_total";
/// Records acknowledged without an offset, by topic: a batch the brokers said they already had
/// (the retry of a request whose answer was lost), or sent with `acks` = none.
pub const UNNUMBERED: &str = "kafboy_records_delivered_without_offset_total";
/// Records that failed after they were queued, by topic, reason and whether they may have been
/// written all the same (`persisted`: `no`, `possibly`).
pub const FAILED: &str = "kafboy_records_failed_total";
/// Records the producer refused to queue (`queue_full`, `fatal`, `too_big`, `refused`), by topic
/// and reason; each got a 503 (413 for `too_big`), never a 2xx. Requests refused earlier
/// (bad input, unknown topic, shutting down) are counted in [`REQUESTS`] only.
pub const DROPPED: &str = "kafboy_records_dropped_total";
/// Records in kafboy's queue accounting, by producer.
pub const QUEUED: &str = "kafboy_producer_queued_records";
/// Records librdkafka holds (queued or in flight), by producer.
pub const IN_FLIGHT: &str = "kafboy_producer_in_flight_records";
/// 1 when a broker connection is up, by producer and broker.
pub const BROKER_UP: &str = "kafboy_broker_up";
/// Broker round-trip time, by producer, broker and quantile (from librdkafka statistics).
pub const BROKER_RTT: &str = "kafboy_broker_rtt_seconds";
/// Produce request retries, by producer and broker.
pub const BROKER_RETRIES: &str = "kafboy_broker_retries_total";
/// Requests to a broker that timed out, by producer and broker.
pub const BROKER_TIMEOUTS: &str = "kafboy_broker_request_timeouts_total";
/// Records per batch librdkafka sent, by producer, topic label and quantile.
pub const BATCH_RECORDS: &str = "kafboy_kafka_batch_records";
/// Requests handed to a peer (`direction="sent"`) or taken from one (`direction="received"`).
pub const FORWARDED: &str = "kafboy_forwarded_requests_total";
/// 1 when a peer answered `/ready` with 200 at the last check, by peer URL.
pub const PEER_READY: &str = "kafboy_peer_ready";
/// Bytes in the disk spool.
pub const SPOOL_BYTES: &str = "kafboy_spool_bytes";
/// Records in the disk spool not yet acknowledged.
pub const SPOOL_RECORDS: &str = "kafboy_spool_records";
/// Age of the oldest spooled record not yet acknowledged.
pub const SPOOL_OLDEST: &str = "kafboy_spool_oldest_undelivered_seconds";
/// Records replayed from the spool at start.
pub const SPOOL_REPLAYED: &str = "kafboy_spool_replayed_records_total";
/// Spooled records acknowledged by the broker.
pub const SPOOL_DELIVERED: &str = "kafboy_spool_delivered_records_total";
/// Spooled records the broker refused for good, written to the dead-letter file.
pub const SPOOL_DEAD_LETTERED: &str = "kafboy_spool_dead_lettered_records_total";
/// Retried sends of spooled records.
pub const SPOOL_RETRIES: &str = "kafboy_spool_retries_total";
/// Appends refused because the spool was full.
pub const SPOOL_FULL: &str = "kafboy_spool_full_total";
/// Disk errors of the spool.
pub const SPOOL_DISK_ERRORS: &str = "kafboy_spool_disk_errors_total";
/// 1 while the spool can write.
pub const SPOOL_HEALTHY: &str = "kafboy_spool_healthy";
/// 1 when `/ready` answers 200.
pub const READY: &str = "kafboy_ready";
/// Connections refused because `server.max_connections` were open.
pub const CONNECTIONS_REFUSED: &str = "kafboy_connections_refused_total";

/// Milliseconds since the process first asked, a cheap monotonic clock for throttles.
pub fn uptime_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The least time a gauge may go without an update before `/metrics` drops it.
const GAUGE_IDLE_FLOOR: Duration = Duration::from_secs(600);

static GAUGE_IDLE: OnceLock<Duration> = OnceLock::new();

/// Lets `/metrics` drop a gauge that has not been updated for three times `updated_every` (and
/// at least 10 minutes). Without it, the series of a peer gone from the discovery list or a
/// broker gone from the cluster would stay for the life of the process, one per URL ever
/// listed. Live gauges are set at every scrape, health check or statistics interval, so
/// `updated_every` is the longest of those intervals. Only a call before the recorder is built
/// counts (the first server of a process).
pub fn expire_gauges_after(updated_every: Duration) {
    let _ = GAUGE_IDLE.set(gauge_idle(updated_every));
}

fn gauge_idle(updated_every: Duration) -> Duration {
    updated_every.saturating_mul(3).max(GAUGE_IDLE_FLOOR)
}

/// The exporter's settings: histogram buckets, and gauges dropped after `gauge_idle`.
fn builder(gauge_idle: Duration) -> Result<PrometheusBuilder, BuildError> {
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let records = [
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 10000.0,
    ];
    PrometheusBuilder::new()
        // Gauges only: an idle counter is one that has not moved, and dropping it would lose
        // its total.
        .idle_timeout(MetricKindMask::GAUGE, Some(gauge_idle))
        .set_buckets_for_metric(Matcher::Full(REQUEST_SECONDS.into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(REQUEST_RECORDS.into()), &records)
}

/// The recorder, installed once per process (tests build many servers in one process).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let idle = *GAUGE_IDLE.get_or_init(|| GAUGE_IDLE_FLOOR);
        match builder(idle).and_then(PrometheusBuilder::install_recorder) {
            Ok(handle) => handle,
            // Another recorder is installed (an embedding program's): keep ours unattached, so
            // /metrics still renders.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// Folds histogram samples into their buckets every second on a thread of its own, for as long
/// as the process lives (the recorder is global, so is this). Without it samples pile up until
/// `/metrics` is scraped; folded on a runtime worker, they held up the requests behind them.
pub fn spawn_upkeep() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("kafboy-upkeep".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    handle().run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no metrics upkeep thread: histograms fold only on scrape");
        }
    });
}

/// Counter handles of one topic label.
#[derive(Debug)]
pub struct TopicCounters {
    /// Label value: the topic, or `other`.
    pub label: Arc<str>,
    /// [`ACCEPTED`].
    pub accepted: Counter,
    /// [`DELIVERED`].
    pub delivered: Counter,
}

/// Per-topic handles for the configured topics, and one for all others.
#[derive(Debug)]
pub struct Topics {
    known: HashMap<String, TopicCounters>,
    other: TopicCounters,
}

impl Topics {
    /// Handles for `names` and for `other`.
    pub fn new(names: impl IntoIterator<Item = String>) -> Topics {
        handle();
        let known = names
            .into_iter()
            .map(|n| (n.clone(), TopicCounters::new(&n)))
            .collect();
        Topics {
            known,
            other: TopicCounters::new("other"),
        }
    }

    /// The handles for `topic`.
    pub fn get(&self, topic: &str) -> &TopicCounters {
        self.known.get(topic).unwrap_or(&self.other)
    }
}

impl TopicCounters {
    fn new(label: &str) -> TopicCounters {
        let label: Arc<str> = label.into();
        TopicCounters {
            accepted: counter!(ACCEPTED, "topic" => label.to_string()),
            delivered: counter!(DELIVERED, "topic" => label.to_string()),
            label,
        }
    }
}

/// Shows the counters whose labels are known at start at 0 from the first scrape: a series
/// that first appears at 1 is one whose `increase()` misses its first event. Failed and dropped
/// records are labelled by topic and reason, a set known only once it happens.
pub fn register_counters(cluster: bool) {
    counter!(CONNECTIONS_REFUSED).increment(0);
    if cluster {
        for direction in ["sent", "received"] {
            counter!(FORWARDED, "direction" => direction).increment(0);
        }
    }
}

/// A record acknowledged without an offset.
pub fn delivered_without_offset(label: &str) {
    counter!(UNNUMBERED, "topic" => label.to_string()).increment(1);
}

/// A record that failed after it was queued; `persisted` is `no` (not written) or `possibly`.
pub fn failed(label: &str, reason: &str, persisted: &'static str) {
    counter!(FAILED, "topic" => label.to_string(), "reason" => reason.to_string(), "persisted" => persisted)
        .increment(1);
}

/// Records refused before they were queued.
pub fn dropped(label: &str, reason: &'static str, n: u64) {
    counter!(DROPPED, "topic" => label.to_string(), "reason" => reason).increment(n);
}

/// Handles for one route's requests, built once so a request costs atomic adds only.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Counters by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    answers: [Counter; 5],
    seconds: Histogram,
    records: Histogram,
}

impl RouteMetrics {
    /// Handles for the route at `path` in `mode`.
    pub fn new(path: &str, mode: &'static str) -> RouteMetrics {
        handle();
        let answer = |class: &'static str| counter!(REQUESTS, "route" => path.to_string(), "mode" => mode, "class" => class);
        RouteMetrics {
            answers: [
                answer("1xx"),
                answer("2xx"),
                answer("3xx"),
                answer("4xx"),
                answer("5xx"),
            ],
            seconds: histogram!(REQUEST_SECONDS, "route" => path.to_string(), "mode" => mode),
            records: histogram!(REQUEST_RECORDS, "route" => path.to_string(), "mode" => mode),
        }
    }

    /// One request answered with `status` after `elapsed`.
    pub fn request(&self, status: u16, elapsed: Duration) {
        self.answered(status);
        self.seconds.record(elapsed.as_secs_f64());
    }

    /// Counts an answer by class without a latency: one that took no work (a wrong method),
    /// whose zero would fill the fastest bucket for anyone who sends GETs.
    pub fn answered(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.answers[class].increment(1);
    }

    /// A request carried `n` records.
    pub fn records(&self, n: usize) {
        self.records.record(n as f64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use metrics::gauge;
    use std::time::Instant;

    #[test]
    fn gauges_nobody_updates_leave_and_counters_stay() {
        let recorder = builder(Duration::from_millis(50)).unwrap().build_recorder();
        let handle = recorder.handle();
        let emit = |first: bool| {
            metrics::with_local_recorder(&recorder, || {
                gauge!(PEER_READY, "peer" => "http://live").set(1.0);
                if first {
                    gauge!(PEER_READY, "peer" => "http://gone").set(0.0);
                    counter!(FORWARDED, "direction" => "sent").increment(1);
                }
            })
        };
        emit(true);
        assert!(handle.render().contains("http://gone"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            emit(false);
            let text = handle.render();
            if !text.contains("http://gone") {
                assert!(text.contains("http://live"), "{text}");
                assert!(text.contains(FORWARDED), "{text}");
                break;
            }
            assert!(Instant::now() < deadline, "the idle gauge stayed:\n{text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn gauges_wait_three_update_intervals_and_at_least_ten_minutes() {
        let idle = gauge_idle;
        assert_eq!(idle(Duration::from_secs(5)), Duration::from_secs(600));
        assert_eq!(
            idle(Duration::from_secs(3600)),
            Duration::from_secs(3 * 3600)
        );
        assert_eq!(idle(Duration::MAX), Duration::MAX);
    }
}
