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
//! - Disk errors turn [`Spool::healthy`] false. The writer's (and the dead-letter file's) answer
//!   [`SpoolError::Disk`] to appends, and the writer probes the disk every second until writes
//!   work again; the checkpoint's and segment reads' last until that same operation, which the
//!   sender retries, works again. A write that hangs for seconds turns it false too.
//! - Records are handed to the producer in spool order; one waiting for its retry holds back
//!   the records behind it not yet handed over (those already handed over go on), so a
//!   partition's order holds except around a retry, and the checkpoint never passes it. Retriable failures are retried for as long as it takes; permanent ones (the ones
//!   [`crate::error::delivery_status`] maps to 400/403/404/413) go to the dead-letter file.
//! - One process per directory (a pid lock file; a stale one left by a killed process is taken
//!   over).

pub mod segment;

mod append;
mod config;
mod handle;
mod recover;
mod sender;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use crate::lock;
use crate::throttle::throttled;

pub use append::Appending;
pub use config::SpoolConfig;
pub use handle::Spool;

/// Name of the Kafka header that carries each spooled record's stable id.
pub const ID_HEADER: &str = "kafboy-id";

/// What the id header adds to a record on the wire: its name, its value (two 16-digit hex
/// numbers and a dash) and a length byte for each. A spooled record must fit
/// `kafka.message_max_bytes` with it, or Kafka refuses it after its `202`.
pub const ID_HEADER_WIRE_BYTES: usize = ID_HEADER.len() + 33 + 2;

/// File of records Kafka refused permanently, one JSON object per line.
pub const DEAD_LETTER_FILE: &str = "dead-letter.ndjson";

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
    /// A write has hung on the disk for seconds; nothing more is queued behind it (503).
    #[error("spool disk not answering")]
    Stalled,
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
            SpoolError::Stalled => "spool_stalled",
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
    /// The sender's file operations whose last attempt failed ([`SenderFile`] bits). Each is
    /// retried by the sender, and cleared by its next success: the writer's probe, which
    /// writes another file, must not turn them healthy (nor they it unhealthy).
    sender_faults: AtomicU8,
    /// When the write and fsync under way began ([`mono_ms`]); 0 when none is.
    writing_since_ms: AtomicU64,
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

    /// Records a disk error of the sender's `file`: unhealthy until it next works, counted,
    /// logged.
    fn sender_error(&self, file: SenderFile, error: &std::io::Error) {
        let before = self.sender_faults.fetch_or(file as u8, Ordering::AcqRel);
        let message = format!("{}: {error}", file.name());
        self.note_error(message, before & file as u8 == 0);
    }

    /// Whether the sender's `file` failed at its last attempt.
    fn sender_faulty(&self, file: SenderFile) -> bool {
        self.sender_faults.load(Ordering::Acquire) & file as u8 != 0
    }

    /// The sender's `file` worked.
    fn sender_ok(&self, file: SenderFile) {
        let before = self
            .sender_faults
            .fetch_and(!(file as u8), Ordering::AcqRel);
        if before & file as u8 != 0 {
            tracing::info!(dir = %self.dir.display(), file = file.name(), "spool: works again");
        }
    }

    /// Whether every part of the spool takes its writes and reads.
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
            && self.sender_faults.load(Ordering::Acquire) == 0
            && !self.stalled()
    }

    /// Records a disk error of the writer: unhealthy until its probe or a write works,
    /// counted, logged; returns the message.
    fn disk_error(&self, what: &str, error: &std::io::Error) -> String {
        let newly = self.healthy.swap(false, Ordering::AcqRel);
        self.note_error(format!("{what}: {error}"), newly)
    }

    /// Counts and logs a disk error (at error level when it made the spool `newly` unhealthy),
    /// and keeps its message for the status page; returns it.
    fn note_error(&self, message: String, newly: bool) -> String {
        if newly {
            tracing::error!(dir = %self.dir.display(), %message, "spool: disk error, not ready");
        } else {
            // Every refused append of an outage comes here: a line a second at most.
            throttled!(warn, "spool: disk error", dir = %self.dir.display(), %message);
        }
        self.disk_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(message.clone());
        message
    }

    /// Whether a write has been under way for longer than [`STALLED_AFTER`]: a disk that hangs
    /// (a dead network mount, a failing device) returns no error to mark it unhealthy.
    fn stalled(&self) -> bool {
        self.stalled_at(mono_ms())
    }

    fn stalled_at(&self, now_ms: u64) -> bool {
        let since = self.writing_since_ms.load(Ordering::Acquire);
        since != 0 && now_ms.saturating_sub(since) > STALLED_AFTER.as_millis() as u64
    }

    fn mark_healthy(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!(dir = %self.dir.display(), "spool: disk writable again, ready");
        }
    }
}

/// The sender's file operations, as bits of [`Inner::sender_faults`].
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum SenderFile {
    Checkpoint = 1,
    Segment = 2,
}

impl SenderFile {
    fn name(self) -> &'static str {
        match self {
            SenderFile::Checkpoint => "checkpoint",
            SenderFile::Segment => "read segment",
        }
    }
}

/// How long one write and fsync may take before the spool reports itself not ready.
const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Milliseconds on a monotonic clock (a wall clock stepped by seconds would look like a stall),
/// counted from a day before the first call: never 0, and "seconds ago" is always a value.
fn mono_ms() -> u64 {
    const DAY_MS: u64 = 86_400_000;
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + DAY_MS
}

use crate::unix_ms;

/// A spool's shared state over `dir`, for the modules' tests.
#[cfg(test)]
fn test_inner(dir: &std::path::Path, sealed: std::collections::BTreeMap<u64, u64>) -> Inner {
    use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64};
    let zero = || AtomicU64::new(0);
    Inner {
        dir: dir.to_path_buf(),
        config: SpoolConfig::default(),
        origin: 1,
        bytes: zero(),
        records: zero(),
        oldest_ms: zero(),
        replayed: zero(),
        delivered: zero(),
        dead_lettered: zero(),
        retried: zero(),
        refused_full: zero(),
        disk_errors: zero(),
        healthy: AtomicBool::new(true),
        sender_faults: AtomicU8::new(0),
        writing_since_ms: AtomicU64::new(0),
        last_error: Mutex::new(None),
        checkpoint: zero(),
        sealed: Mutex::new(sealed),
        dead: AtomicBool::new(false),
        fs_gate: Mutex::new(()),
    }
}
