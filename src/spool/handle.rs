//! The [`Spool`] handle the server holds: opening a directory, appends, starting the sender,
//! stats and shutdown.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::append::{self, Appending};
use super::writer::{self, Command, Durable};
use super::{Inner, SpoolConfig, SpoolError, Stats, lock, recover, sender, unix_ms};
use crate::kafka::{Producer, Record};

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
        recover::create_dir(&dir).map_err(|e| io(&format!("create {}", dir.display()), e))?;
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
            sender_faults: std::sync::atomic::AtomicU8::new(0),
            writing_since_ms: AtomicU64::new(0),
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
        self.submit(topic, records)?.confirmed().await
    }

    /// [`Spool::append`] in two steps: the records handed to the writer now (refused at once
    /// when they cannot be), and its confirmation, which a caller that stops waiting for it
    /// can hand to a task of its own: the write goes on without a waiter.
    pub fn submit(&self, topic: &str, records: &[Record]) -> Result<Appending, SpoolError> {
        if records.is_empty() {
            return Ok(Appending(None));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        // Queued behind a write that hangs, records would wait it out (the client gets 504 at
        // `sync_timeout`, and its retries pile up in memory to be written twice once the disk
        // answers): refused instead, with nothing written.
        if self.inner.stalled() {
            return Err(SpoolError::Stalled);
        }
        let (payloads, bytes) = append::encode(self.inner.origin, topic, records)?;
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
        Ok(Appending(Some(answer)))
    }

    /// Starts the task that sends spooled records, in order, through the producer
    /// `producer_for(topic)` returns (called per send, so a replaced producer is picked up),
    /// whose records fail after `message_timeout` at most. Needs a tokio runtime. Only the
    /// first call starts a sender.
    pub fn start_sender<F>(&self, producer_for: F, message_timeout: Duration)
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
            message_timeout,
        );
        *lock(&self.sender) = Some(handle);
    }

    /// Whether the disk takes writes: false after a disk error until a write or probe works,
    /// and while a write has hung for seconds.
    pub fn healthy(&self) -> bool {
        self.inner.is_healthy()
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
            healthy: i.is_healthy(),
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
            // A disk that hangs must not hold the shutdown past its grace: the writer is then
            // left to the process's exit (a join would wait for it, there or here).
            while !thread.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("spool: the writer is still waiting on the disk; left behind");
            }
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

/// How long dropping a spool waits for its file operations to end.
const DROP_WAIT: Duration = Duration::from_secs(5);

impl Drop for Spool {
    fn drop(&mut self) {
        self.inner.dead.store(true, Ordering::Release);
        let sender = lock(&self.sender).take();
        if let Some(sender) = sender {
            sender.abort();
        }
        // Wait for a file operation of the sender that may be running, and for the writer, so
        // the directory is quiet once the spool is gone (a reopen may follow at once); but not
        // for ever on a disk that hangs.
        let until = std::time::Instant::now() + DROP_WAIT;
        while matches!(
            self.inner.fs_gate.try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        ) && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.commands.send(Command::Stop);
        let thread = lock(&self.writer).take();
        if let Some(thread) = thread {
            while !thread.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_write_that_hangs_for_seconds_makes_the_spool_not_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), &SpoolConfig::default()).unwrap();
        assert!(spool.healthy());
        let since = &spool.inner.writing_since_ms;
        let now = super::super::mono_ms();
        since.store(now - 1000, Ordering::Release);
        assert!(
            spool.healthy(),
            "a write under way for a second is no stall"
        );
        since.store(now - 6000, Ordering::Release);
        assert!(!spool.healthy());
        assert!(!spool.stats().healthy);
        // Refused with nothing written, not queued behind the write that hangs.
        let record = crate::kafka::Record {
            key: None,
            partition: None,
            headers: None,
            value: bytes::Bytes::from_static(b"x"),
            first: None,
        };
        let refused = spool.append("t", &[record]).await;
        assert_eq!(refused, Err(SpoolError::Stalled));
        since.store(0, Ordering::Release);
        assert!(spool.healthy());
    }
}
