//! Durable async: a local write-ahead spool between the HTTP handler and the producers.
//!
//! With the spool on, a `202` means the records are on local disk (appended and fsynced), not
//! merely in memory. A background sender feeds the spool to the producers in order and advances a
//! checkpoint as delivery reports arrive; after a crash everything not yet acknowledged is sent
//! again (at-least-once: duplicates possible, loss not), each record carrying a stable id in the
//! `kafboy-id` header so consumers can drop duplicates.
//!
//! ```text
//! append(topic, records) ──► writer thread ──► NNNN.seg  (group commit: one fsync for all
//!        ▲  answered after the fsync               │       that queued during the last one)
//!        │                                         ▼
//!        └── Full / TooLarge / Disk       sender task ──► Producer::send(report = true)
//!                                                  │  delivered / dead-lettered, in order
//!                                                  ▼
//!                               checkpoint (first seq not acknowledged), acked segments deleted
//! ```
//!
//! Files in the spool directory:
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: segments, see [`segment`] for the format;
//! - `checkpoint`: the seq of the first record not yet acknowledged, replaced atomically
//!   (temp file, fsync, rename, fsync of the directory);
//! - `dead-letter.ndjson`: one JSON line per record Kafka refused permanently, with the reason;
//! - `lock`: the pid of the process using the directory.
//!
//! Guarantees and limits:
//! - [`Spool::append`] is all or nothing per call and answers only after the fsync that covers
//!   the call's records. A crash during the write can leave a prefix of an unanswered call's
//!   records on disk; they are delivered after the restart (like any "maybe written" request).
//! - Bounded: at most `max_bytes` of segment files; past it [`SpoolError::Full`] (a 503).
//! - A torn or corrupt tail found at [`Spool::open`] is cut at the last valid record and logged.
//! - Disk errors turn [`Spool::healthy`] false and answer [`SpoolError::Disk`]; the writer probes
//!   the disk every second and turns healthy again when writes work.
//! - Records are sent in spool order; a record that fails retriably is sent again before any
//!   record behind it is sent for the first time, so a partition's order holds except across a
//!   retry. Retriable failures are retried for as long as it takes; permanent ones (the ones
//!   [`crate::error::delivery_status`] maps to 400/403/404/413) go to the dead-letter file.
//! - One process per directory (a pid lock file; a stale one left by a killed process is taken
//!   over).

pub mod segment;

mod recover;
mod sender;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::message::Headers as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::kafka::{Producer, Record};
use segment::{FRAME_HEADER, Fields};
use writer::{Command, Durable};

/// Name of the Kafka header that carries each spooled record's stable id.
pub const ID_HEADER: &str = "kafboy-id";

/// File of records Kafka refused permanently, one JSON object per line.
pub const DEAD_LETTER_FILE: &str = "dead-letter.ndjson";

/// Settings of the spool (`[spool]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool; unset means no spool. Default: unset.
    pub dir: Option<PathBuf>,
    /// Spool `/async/{topic}` and `/batch/async/{topic}` as well (configured routes choose with
    /// their own `spool`). Default false.
    pub default_routes: bool,
    /// Most bytes of segment files; an append that would pass it is refused (503). Default 1 GiB.
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
    /// Wait before a record that failed retriably is sent again; doubles per attempt.
    /// Default 100ms.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest wait between two attempts of one record. Default 5s.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
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
        }
    }
}

/// Smallest `max_bytes` and `segment_bytes` accepted.
const MIN_BYTES: u64 = 4096;

impl SpoolConfig {
    /// Checks the settings; the message names the key at fault.
    pub fn check(&self) -> Result<(), String> {
        if self.max_bytes < MIN_BYTES {
            return Err(format!("spool.max_bytes must be at least {MIN_BYTES}"));
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
        if self.checkpoint_interval.is_zero() {
            return Err("spool.checkpoint_interval must be above 0".into());
        }
        if self.retry_backoff_max < self.retry_backoff {
            return Err("spool.retry_backoff_max must not be below spool.retry_backoff".into());
        }
        Ok(())
    }

    /// The segment size in force: `segment_bytes`, at most a quarter of `max_bytes`, so a full
    /// spool always has closed segments whose deletion frees room.
    fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes.min(self.max_bytes / 4).max(MIN_BYTES)
    }
}

/// Why the spool refused records or could not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// The records would take the spool past `max_bytes`; nothing was written (503 +
    /// Retry-After).
    #[error("spool full")]
    Full,
    /// The request is larger than the whole spool or a field does not fit the format; nothing
    /// was written (413).
    #[error("{0}")]
    TooLarge(String),
    /// Writing or fsyncing failed (disk full, read-only, I/O error); nothing was acknowledged
    /// and the spool reports unhealthy until writes work again (503).
    #[error("spool disk error: {0}")]
    Disk(String),
    /// The spool is shutting down (503).
    #[error("spool closed")]
    Closed,
    /// The spool could not be opened: bad settings, or the directory is in use.
    #[error("spool: {0}")]
    Open(String),
}

impl SpoolError {
    /// A short, bounded name for metric labels (`kafboy_records_dropped_total{reason=..}`).
    pub fn reason(&self) -> &'static str {
        match self {
            SpoolError::Full => "spool_full",
            SpoolError::TooLarge(_) => "too_big",
            SpoolError::Disk(_) => "spool_disk",
            SpoolError::Closed => "spool_closed",
            SpoolError::Open(_) => "spool_open",
        }
    }
}

/// Counters and gauges of a spool, for `/metrics`, `/ready` and the status page.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Bytes of segment files (reserved by appends in progress included).
    pub bytes: u64,
    /// Records on disk and not yet acknowledged.
    pub records: u64,
    /// Age of the oldest record not yet acknowledged.
    pub oldest_undelivered: Option<Duration>,
    /// Records found unacknowledged at open and sent again.
    pub replayed: u64,
    /// Records acknowledged by Kafka since open.
    pub delivered: u64,
    /// Records Kafka refused permanently, written to the dead-letter file, since open.
    pub dead_lettered: u64,
    /// Sends that failed retriably and were tried again, since open.
    pub retried: u64,
    /// Appends refused because the spool was full, since open.
    pub refused_full: u64,
    /// Disk errors since open.
    pub disk_errors: u64,
    /// False after a disk error until writes work again.
    pub healthy: bool,
    /// The latest disk error.
    pub last_error: Option<String>,
    /// Seq of the first record not yet acknowledged, as last written to the checkpoint file.
    pub checkpoint: u64,
    /// Segment files, the one being written included.
    pub segments: usize,
}

/// A spool directory opened for appending and sending.
///
/// Appends may come from any task; one writer thread batches them into fsyncs. The sender runs
/// once [`Spool::start_sender`] is called. [`Spool::shutdown`] stops both cleanly; dropping the
/// spool without it is like a crash (no final checkpoint; everything unacknowledged is sent again
/// by the next open).
pub struct Spool {
    inner: Arc<Inner>,
    commands: std::sync::mpsc::Sender<Command>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    durable: watch::Receiver<Durable>,
    start: Mutex<Option<sender::Cursor>>,
    sender: Mutex<Option<sender::Handle>>,
    closed: AtomicBool,
    _lock: recover::DirLock,
}

/// What the writer, the sender and the handle share.
struct Inner {
    dir: PathBuf,
    config: SpoolConfig,
    /// Random id of this open; with the seq it makes each record's stable id.
    origin: u64,
    bytes: AtomicU64,
    records: AtomicU64,
    /// Unix ms of the oldest unacknowledged record; 0 for none.
    oldest_ms: AtomicU64,
    replayed: AtomicU64,
    delivered: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    refused_full: AtomicU64,
    disk_errors: AtomicU64,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    checkpoint: AtomicU64,
    /// Closed segments still on disk, and their valid lengths.
    sealed: Mutex<BTreeMap<u64, u64>>,
    /// Set when the spool is dropped or crashed: file operations still queued do nothing.
    dead: AtomicBool,
    /// Held by every file operation of the sender, so a drop can wait for the one running.
    fs_gate: Mutex<()>,
}

impl Inner {
    /// Takes `n` bytes of the budget, or returns false when they do not fit.
    fn reserve(&self, n: u64) -> bool {
        let max = self.config.max_bytes;
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= max)
            })
            .is_ok()
    }

    fn release(&self, n: u64) {
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }

    /// Records a disk error: unhealthy, counted, logged; returns the message.
    fn disk_error(&self, what: &str, error: &std::io::Error) -> String {
        let message = format!("{what}: {error}");
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(dir = %self.dir.display(), %message, "spool: disk error, not ready");
        } else {
            tracing::warn!(dir = %self.dir.display(), %message, "spool: disk error");
        }
        self.disk_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(message.clone());
        message
    }

    fn mark_healthy(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!(dir = %self.dir.display(), "spool: disk writable again, ready");
        }
    }
}

/// Locks a mutex, ignoring poisoning (the data behind these locks stays consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unix time in milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`: takes the directory's lock, cuts torn or
    /// corrupt segment tails, reads the checkpoint, deletes fully acknowledged segments, and
    /// starts the writer thread. Everything unacknowledged is sent again once
    /// [`Spool::start_sender`] runs. Blocking (file I/O): call it at start-up or in
    /// `spawn_blocking`.
    pub fn open(dir: impl AsRef<Path>, config: &SpoolConfig) -> Result<Spool, SpoolError> {
        config.check().map_err(SpoolError::Open)?;
        let dir = dir.as_ref().to_path_buf();
        let io = |what: &str, e: std::io::Error| SpoolError::Disk(format!("{what}: {e}"));
        std::fs::create_dir_all(&dir).map_err(|e| io(&format!("create {}", dir.display()), e))?;
        let lock = recover::DirLock::acquire(&dir)?;
        let found = recover::recover(&dir).map_err(|e| io("recovery", e))?;
        let mut config = config.clone();
        config.segment_bytes = config.effective_segment_bytes();
        let origin = loop {
            let r = rand::random::<u64>();
            if r != 0 {
                break r;
            }
        };
        if found.pending > 0 {
            tracing::info!(
                dir = %dir.display(),
                records = found.pending,
                checkpoint = found.checkpoint,
                "spool: replaying records not acknowledged before the last stop"
            );
        }
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            config,
            origin,
            bytes: AtomicU64::new(found.bytes),
            records: AtomicU64::new(found.pending),
            oldest_ms: AtomicU64::new(found.oldest_ms),
            replayed: AtomicU64::new(found.pending),
            delivered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            disk_errors: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            checkpoint: AtomicU64::new(found.checkpoint),
            sealed: Mutex::new(found.sealed),
            dead: AtomicBool::new(false),
            fs_gate: Mutex::new(()),
        });
        let (writer, durable) =
            writer::Writer::start(inner.clone(), found.next_segment, found.next_seq)
                .map_err(|e| io("create segment", e))?;
        let (commands, queue) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kafboy-spool-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| io("start writer thread", e))?;
        let (segment, offset) = found.start.unwrap_or((found.next_segment, 0));
        Ok(Spool {
            inner,
            commands,
            writer: Mutex::new(Some(thread)),
            durable,
            start: Mutex::new(Some(sender::Cursor::new(segment, offset, found.checkpoint))),
            sender: Mutex::new(None),
            closed: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends `records` for `topic`, all or nothing, and returns once they are fsynced.
    /// [`SpoolError::Full`] (nothing written) when they would take the spool past `max_bytes`,
    /// [`SpoolError::Disk`] when the write or fsync failed (nothing acknowledged).
    ///
    /// A record's `kafboy-id` header, if the client set one, is replaced by the spool's id when
    /// sent.
    pub async fn append(&self, topic: &str, records: &[Record]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let mut payloads = Vec::with_capacity(records.len());
        let mut bytes = 0u64;
        for r in records {
            let headers: Vec<(&str, Option<&[u8]>)> = r
                .headers
                .as_ref()
                .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                .unwrap_or_default();
            let fields = Fields {
                seq: 0,
                origin: self.inner.origin,
                appended_ms: 0,
                topic,
                key: r.key.as_deref(),
                partition: r.partition,
                value: &r.value,
            };
            let size = segment::payload_size(&fields, headers.iter().copied())
                .map_err(|e| SpoolError::TooLarge(e.to_string()))?;
            let mut payload = Vec::with_capacity(size);
            segment::encode_payload(&mut payload, &fields, headers.iter().copied());
            bytes += (FRAME_HEADER + payload.len()) as u64;
            payloads.push(payload);
        }
        if bytes > self.inner.config.max_bytes {
            return Err(SpoolError::TooLarge(format!(
                "request of {bytes} bytes larger than the spool ({} bytes)",
                self.inner.config.max_bytes
            )));
        }
        if !self.inner.reserve(bytes) {
            self.inner.refused_full.fetch_add(1, Ordering::Relaxed);
            return Err(SpoolError::Full);
        }
        let (reply, answer) = oneshot::channel();
        let command = Command::Append(writer::Append {
            payloads,
            bytes,
            reply,
        });
        if self.commands.send(command).is_err() {
            self.inner.release(bytes);
            return Err(SpoolError::Closed);
        }
        answer.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Starts the task that sends spooled records, in order, through the producer
    /// `producer_for(topic)` returns (called per send, so a replaced producer is picked up).
    /// Needs a tokio runtime. Only the first call starts a sender.
    pub fn start_sender<F>(&self, producer_for: F)
    where
        F: Fn(&str) -> Arc<Producer> + Send + Sync + 'static,
    {
        let Some(cursor) = lock(&self.start).take() else {
            tracing::warn!("spool: sender already started");
            return;
        };
        let handle = sender::spawn(
            self.inner.clone(),
            self.durable.clone(),
            cursor,
            Box::new(producer_for),
        );
        *lock(&self.sender) = Some(handle);
    }

    /// Whether the disk takes writes (false after a disk error until a write or probe works).
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    /// The spool's counters and gauges.
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        let oldest_ms = i.oldest_ms.load(Ordering::Acquire);
        let records = i.records.load(Ordering::Acquire);
        let oldest_undelivered = (oldest_ms != 0 && records > 0)
            .then(|| Duration::from_millis(unix_ms().saturating_sub(oldest_ms)));
        Stats {
            bytes: i.bytes.load(Ordering::Acquire),
            records,
            oldest_undelivered,
            replayed: i.replayed.load(Ordering::Relaxed),
            delivered: i.delivered.load(Ordering::Relaxed),
            dead_lettered: i.dead_lettered.load(Ordering::Relaxed),
            retried: i.retried.load(Ordering::Relaxed),
            refused_full: i.refused_full.load(Ordering::Relaxed),
            disk_errors: i.disk_errors.load(Ordering::Relaxed),
            healthy: i.healthy.load(Ordering::Acquire),
            last_error: lock(&i.last_error).clone(),
            checkpoint: i.checkpoint.load(Ordering::Acquire),
            segments: lock(&i.sealed).len() + 1,
        }
    }

    /// Stops taking appends (they get [`SpoolError::Closed`]), lets the writer commit what it
    /// holds, then lets the sender deliver what it can until `grace` has passed, and writes the
    /// final checkpoint. Returns how many records stay spooled for the next start.
    pub async fn shutdown(&self, grace: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + grace;
        self.closed.store(true, Ordering::Release);
        let _ = self.commands.send(Command::Stop);
        let thread = lock(&self.writer).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let sender = lock(&self.sender).take();
        if let Some(sender) = sender {
            sender.drain(deadline).await;
        }
        let left = self.inner.records.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(
                records = left,
                dir = %self.inner.dir.display(),
                "spool: records still undelivered at shutdown; kept for the next start"
            );
        }
        left
    }

    /// Stops everything at once as a crash would: no final checkpoint, nothing flushed beyond
    /// what was already fsynced. For tests of recovery.
    #[doc(hidden)]
    pub fn crash(self) {
        drop(self);
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.inner.dead.store(true, Ordering::Release);
        let sender = lock(&self.sender).take();
        if let Some(sender) = sender {
            sender.abort();
        }
        // Wait for a file operation of the sender that may be running, so the directory is
        // quiet once the spool is gone (a reopen may follow at once).
        drop(lock(&self.inner.fs_gate));
        let _ = self.commands.send(Command::Stop);
        let thread = lock(&self.writer).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}
