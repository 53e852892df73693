//! librdkafka's statistics, exported: broker states, retries, timeouts, round trips and batch
//! sizes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use metrics::{counter, gauge};
use rdkafka::statistics::Statistics;

use super::{BATCH_RECORDS, BROKER_RETRIES, BROKER_RTT, BROKER_TIMEOUTS, BROKER_UP, Topics};

/// What the status page shows of the brokers, from the latest librdkafka statistics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerState {
    /// librdkafka's broker name (`host:port/id`).
    pub name: String,
    /// `UP`, `DOWN`, `CONNECT`, ...
    pub state: String,
    /// Average round-trip time in milliseconds, if known.
    pub rtt_ms: Option<f64>,
}

/// What earlier statistics left that the next ones need.
pub struct Seen<'a> {
    /// Each broker's retry and timeout totals in this producer's last statistics.
    pub totals: &'a mut HashMap<String, [u64; 2]>,
    /// Brokers with a `kafboy_broker_up` series for this producer's slot.
    pub exported: &'a mut HashSet<String>,
}

/// Exports one producer's librdkafka statistics and keeps the broker view for the status page.
pub fn statistics(
    producer: &str,
    stats: &Statistics,
    topics: &Topics,
    brokers: &Mutex<Vec<BrokerState>>,
    seen: Seen<'_>,
) {
    let Seen { totals, exported } = seen;
    let mut view = Vec::new();
    for b in stats.brokers.values().filter(|b| b.nodeid >= 0) {
        let labels = [
            ("producer", producer.to_string()),
            ("broker", b.name.clone()),
        ];
        if b.state == "INIT" {
            // A broker librdkafka never needed to connect to stays in INIT: no series. One it
            // was connected to goes back to INIT when the connection ends (lost, or closed
            // idle) and nothing needs it: not up, whatever it read before.
            if exported.contains(&b.name) {
                gauge!(BROKER_UP, &labels).set(0.0);
                // And the status page shows it as it is, not gone.
                view.push(BrokerState {
                    name: b.name.clone(),
                    state: b.state.clone(),
                    rtt_ms: None,
                });
            }
            continue;
        }
        gauge!(BROKER_UP, &labels).set(if b.state == "UP" { 1.0 } else { 0.0 });
        // Bounded: the cluster's brokers.
        exported.insert(b.name.clone());
        // librdkafka's totals are per client: counted by their growth, so that a producer
        // replaced after a fatal error (whose totals start from 0) adds to the series.
        let seen = totals.entry(b.name.clone()).or_default();
        counter!(BROKER_RETRIES, &labels).increment(b.txretries.saturating_sub(seen[0]));
        counter!(BROKER_TIMEOUTS, &labels).increment(b.req_timeouts.saturating_sub(seen[1]));
        *seen = [b.txretries, b.req_timeouts];
        if let Some(rtt) = &b.rtt {
            for (q, v) in [("avg", rtt.avg), ("0.99", rtt.p99)] {
                let l = [
                    labels[0].clone(),
                    labels[1].clone(),
                    ("quantile", q.to_string()),
                ];
                gauge!(BROKER_RTT, &l).set(v as f64 / 1e6);
            }
        }
        view.push(BrokerState {
            name: b.name.clone(),
            state: b.state.clone(),
            rtt_ms: b
                .rtt
                .as_ref()
                .filter(|w| w.cnt > 0)
                .map(|w| w.avg as f64 / 1e3),
        });
    }
    for t in stats.topics.values().filter(|t| t.batchcnt.cnt > 0) {
        let label = topics.get(&t.topic).label.to_string();
        for (q, v) in [("0.5", t.batchcnt.p50), ("0.99", t.batchcnt.p99)] {
            let l = [
                ("producer", producer.to_string()),
                ("topic", label.clone()),
                ("quantile", q.to_string()),
            ];
            gauge!(BATCH_RECORDS, &l).set(v as f64);
        }
    }
    view.sort_by(|a, b| a.name.cmp(&b.name));
    *brokers.lock().unwrap_or_else(|e| e.into_inner()) = view;
}
