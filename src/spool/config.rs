//! The spool's settings (`[spool]`) and their checks.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings of the spool (`[spool]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool; unset means no spool. Default: unset.
    pub dir: Option<PathBuf>,
    /// Spool `/async/{topic}` and `/batch/async/{topic}` as well (configured routes choose with
    /// their own `spool`). Default false.
    pub default_routes: bool,
    /// Most bytes of segment files; an append that would pass it is refused (503). At least
    /// 16 KiB. Default 1 GiB.
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size; acknowledged segments are
    /// deleted whole. At most a quarter of `max_bytes` is used. Default 64 MiB.
    pub segment_bytes: u64,
    /// Longest an append waits for others to share its fsync. Default 0: each fsync takes every
    /// append that arrived while the previous one ran, so groups grow with the load without a
    /// wait (with 64 concurrent clients this doubled spooled throughput over 2ms).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Records that trigger the fsync at once. Default 256.
    pub commit_records: usize,
    /// How often the checkpoint is written and acknowledged segments deleted; what was delivered
    /// since the last checkpoint is sent again after a crash. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Most records handed to the producer and not yet acknowledged. Default 4096.
    pub window_records: usize,
    /// Most bytes handed to the producer and not yet acknowledged. Default 16 MiB.
    pub window_bytes: u64,
    /// Wait before a record that failed retriably is sent again; doubles per attempt. At least
    /// 10ms. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest wait between two attempts of one record. Default 5s.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// How long a record is retried while Kafka says its topic or partition does not exist,
    /// before it is dead-lettered. librdkafka says so for a while of a topic deleted and
    /// created again, or when one broker's metadata is behind; a partition that went with a
    /// recreated topic never comes back. One grace per topic or partition: its later records
    /// go at once once it has run out. Records behind it wait meanwhile. Default 5m.
    #[serde(with = "humantime_serde")]
    pub missing_grace: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: None,
            default_routes: false,
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            commit_interval: Duration::ZERO,
            commit_records: 256,
            checkpoint_interval: Duration::from_millis(100),
            window_records: 4096,
            window_bytes: 16 << 20,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(5),
            missing_grace: Duration::from_secs(300),
        }
    }
}

/// Smallest `segment_bytes` accepted; `max_bytes` must hold four such segments.
const MIN_BYTES: u64 = 4096;

impl SpoolConfig {
    /// Checks the settings; the message names the key at fault.
    pub fn check(&self) -> Result<(), String> {
        // An unset template variable: no directory at all, where leaving `dir` out means no
        // spool.
        if self
            .dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().to_string_lossy().trim().is_empty())
        {
            return Err(
                "spool.dir is empty: name a directory, or leave it out for no spool".into(),
            );
        }
        // Four segments at least: most of a full spool's room is then in closed segments,
        // whose deletion frees it. One large append can still take the current segment far
        // past its size; the writer closes such a segment while it idles.
        if self.max_bytes < 4 * MIN_BYTES {
            return Err(format!(
                "spool.max_bytes must be at least {}",
                4 * MIN_BYTES
            ));
        }
        if self.segment_bytes < MIN_BYTES {
            return Err(format!("spool.segment_bytes must be at least {MIN_BYTES}"));
        }
        if self.commit_records == 0 {
            return Err("spool.commit_records must be at least 1".into());
        }
        if self.window_records == 0 || self.window_bytes == 0 {
            return Err("spool.window_records and spool.window_bytes must be above 0".into());
        }
        // Each checkpoint is a file written and synced: more often than this would keep a core
        // busy with no traffic at all.
        if self.checkpoint_interval < Duration::from_millis(10) {
            return Err("spool.checkpoint_interval must be at least 10ms".into());
        }
        // Past what the clock can hold, the writer or the sender would panic on the first
        // append or retry; a long group commit would hold every spooled 202 as long.
        if self.commit_interval > Duration::from_secs(1) {
            return Err("spool.commit_interval must be at most 1s".into());
        }
        for (name, d) in [
            ("spool.checkpoint_interval", self.checkpoint_interval),
            ("spool.retry_backoff", self.retry_backoff),
            ("spool.retry_backoff_max", self.retry_backoff_max),
            ("spool.missing_grace", self.missing_grace),
        ] {
            if d > crate::config::MAX_DURATION {
                return Err(format!("{name} must be at most 1 day"));
            }
        }
        // With no backoff, a record that cannot be sent (a producer that hit a fatal error, a
        // shutdown's closed gate) would be tried again in a busy loop.
        if self.retry_backoff < Duration::from_millis(10) {
            return Err("spool.retry_backoff must be at least 10ms".into());
        }
        if self.retry_backoff_max < self.retry_backoff {
            return Err("spool.retry_backoff_max must not be below spool.retry_backoff".into());
        }
        Ok(())
    }

    /// The segment size in force: `segment_bytes`, at most a quarter of `max_bytes`, so most of
    /// a full spool's room is in closed segments, whose deletion frees it.
    pub(super) fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes.min(self.max_bytes / 4).max(MIN_BYTES)
    }
}
