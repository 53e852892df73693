//! The writer thread: appends from every request, batched into one write and one fsync per
//! group (group commit), numbered in order, into the current segment; closes a segment past
//! `segment_bytes` and starts the next.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::recover::{PROBE, sync_dir};
use super::segment::{self, segment_name};
use super::{Inner, SpoolError, lock, unix_ms};

/// How often an unhealthy writer checks whether the disk takes writes again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Most bytes gathered into one group before it is written.
const MAX_GROUP_BYTES: u64 = 8 << 20;

/// What the writer is asked to do.
pub(super) enum Command {
    /// Append these records.
    Append(Append),
    /// Commit what is queued and stop.
    Stop,
}

/// One call's records, encoded without seq and time (the writer stamps them).
pub(super) struct Append {
    pub payloads: Vec<Vec<u8>>,
    /// Bytes reserved for them (frames included).
    pub bytes: u64,
    pub reply: oneshot::Sender<Result<(), SpoolError>>,
}

/// How far the spool is durable: every byte of `segment` before `offset` is fsynced; segments
/// before it are closed (their lengths are in `Inner::sealed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Durable {
    pub segment: u64,
    pub offset: u64,
}

pub(super) struct Writer {
    inner: Arc<Inner>,
    durable: watch::Sender<Durable>,
    file: Option<File>,
    /// The current segment number.
    segment: u64,
    /// Whether a file was (attempted to be) created for `segment`; the next roll moves past it.
    spent: bool,
    /// Whether that file was created; only then is `segment` sealed when the next roll moves on.
    created: bool,
    /// Durable length of the current segment.
    offset: u64,
    next_seq: u64,
    buf: Vec<u8>,
}

impl Writer {
    /// A writer that starts segment `segment` (created now) and numbers records from `next_seq`.
    pub(super) fn start(
        inner: Arc<Inner>,
        segment: u64,
        next_seq: u64,
    ) -> io::Result<(Writer, watch::Receiver<Durable>)> {
        let (durable, durable_rx) = watch::channel(Durable { segment, offset: 0 });
        let mut writer = Writer {
            inner,
            durable,
            file: None,
            segment,
            spent: false,
            created: false,
            offset: 0,
            next_seq,
            buf: Vec::new(),
        };
        writer.roll()?;
        Ok((writer, durable_rx))
    }

    /// Serves `queue` until it is told to stop or every sender is gone.
    pub(super) fn run(mut self, queue: Receiver<Command>) {
        let interval = self.inner.config.commit_interval;
        let max_records = self.inner.config.commit_records;
        let mut stopping = false;
        let mut idled = Instant::now();
        while !stopping {
            // Every `PROBE_EVERY` even while healthy, and while appends keep coming: the
            // sender's disk errors (a checkpoint, a segment read, a dead letter) mark the spool
            // unhealthy too, and only a probe here marks it healthy again; and appends that
            // fail on a full disk never close the segment that holds its room.
            if idled.elapsed() >= PROBE_EVERY {
                self.busy(Writer::idle);
                idled = Instant::now();
            }
            let first = match queue.recv_timeout(PROBE_EVERY.saturating_sub(idled.elapsed())) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let Command::Append(first) = first else {
                break;
            };
            let mut records = first.payloads.len();
            let mut bytes = first.bytes;
            let mut group = vec![first];
            let deadline = Instant::now() + interval;
            while records < max_records && bytes < MAX_GROUP_BYTES {
                let wait = deadline.saturating_duration_since(Instant::now());
                let next = if wait.is_zero() {
                    queue.try_recv().map_err(|e| match e {
                        std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                        std::sync::mpsc::TryRecvError::Disconnected => {
                            RecvTimeoutError::Disconnected
                        }
                    })
                } else {
                    queue.recv_timeout(wait)
                };
                match next {
                    Ok(Command::Append(a)) => {
                        records += a.payloads.len();
                        bytes += a.bytes;
                        group.push(a);
                    }
                    Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
            self.commit(group);
        }
    }

    /// Writes and fsyncs a group, then answers each of its calls.
    fn commit(&mut self, mut group: Vec<Append>) {
        let records: usize = group.iter().map(|a| a.payloads.len()).sum();
        match self.busy(|w| w.write(&mut group)) {
            Ok(appended_ms) => {
                self.inner
                    .records
                    .fetch_add(records as u64, Ordering::AcqRel);
                let _ = self.inner.oldest_ms.compare_exchange(
                    0,
                    appended_ms,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                self.inner.mark_healthy();
                self.durable.send_replace(Durable {
                    segment: self.segment,
                    offset: self.offset,
                });
                for a in group {
                    let _ = a.reply.send(Ok(()));
                }
            }
            Err(error) => {
                let message = self.inner.disk_error("append", &error);
                for a in group {
                    self.inner.release(a.bytes);
                    let _ = a.reply.send(Err(SpoolError::Disk(message.clone())));
                }
            }
        }
    }

    /// Runs `f`, which may wait on the disk, marked as writing: a disk that hangs in it is
    /// seen as stalled, and appends are refused at once instead of waiting behind it.
    fn busy<R>(&mut self, f: impl FnOnce(&mut Writer) -> R) -> R {
        self.inner
            .writing_since_ms
            .store(super::mono_ms(), Ordering::Release);
        let result = f(self);
        self.inner.writing_since_ms.store(0, Ordering::Release);
        result
    }

    /// Between appends: probes a disk that failed; closes a segment a group took past
    /// `segment_bytes`. Only closed segments are read to their end and deleted, and the room a
    /// full spool waits for may be all in the current one, with no append coming to close it
    /// (a full spool refuses them before they get here). An unhealthy spool closes its
    /// current segment too: on a disk full of delivered records the room is all in it, and
    /// appends that fail never take it past `segment_bytes`.
    fn idle(&mut self) {
        if !self.inner.healthy.load(Ordering::Acquire) {
            if self.file.is_some()
                && self.offset > 0
                && let Err(error) = self.roll()
            {
                tracing::debug!(%error, "spool: no new segment after a disk error");
            }
            self.probe();
        } else if self.file.is_some()
            && self.offset >= self.inner.config.segment_bytes
            && let Err(error) = self.roll()
        {
            self.inner.disk_error("segment", &error);
        }
    }

    /// Numbers, frames, writes and fsyncs the group; returns its commit time.
    fn write(&mut self, group: &mut [Append]) -> io::Result<u64> {
        if self.file.is_none() || self.offset >= self.inner.config.segment_bytes {
            self.roll()?;
        }
        let appended_ms = unix_ms();
        self.buf.clear();
        let mut seq = self.next_seq;
        for a in group.iter_mut() {
            for payload in a.payloads.iter_mut() {
                segment::stamp(payload, seq, appended_ms);
                segment::frame(payload, &mut self.buf);
                seq += 1;
            }
        }
        // Numbers are never reused, even when the write fails: they may be on disk.
        self.next_seq = seq;
        let path = self.inner.dir.join(segment_name(self.segment));
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("no segment open"));
        };
        if let Err(error) = file.write_all(&self.buf).and_then(|()| file.sync_data()) {
            self.rollback();
            return Err(error);
        }
        if let Err(error) = segment::in_place(&path, file) {
            // Written where the sender will never read it: a disk error, and the next write
            // goes to a new segment.
            self.rollback();
            self.file = None;
            return Err(error);
        }
        self.offset += self.buf.len() as u64;
        Ok(appended_ms)
    }

    /// Cuts what a failed write may have left, so records answered with a disk error are never
    /// sent. A segment that cannot be cut is left behind: this run's sender reads it only up to
    /// its durable length, but recovery after a restart reads all of it, so in that double fault
    /// complete records of the failed write can be sent after all (README, "Spool").
    fn rollback(&mut self) {
        if let Some(file) = &self.file {
            match file.set_len(self.offset).and_then(|()| file.sync_data()) {
                Ok(()) => return,
                Err(error) => tracing::error!(
                    segment = self.segment,
                    %error,
                    "spool: cannot cut a failed write; continuing in a new segment"
                ),
            }
        }
        self.file = None;
    }

    /// Closes the current segment (if one was started) and creates the next.
    fn roll(&mut self) -> io::Result<()> {
        if self.spent {
            // A number whose file was never created (a read-only disk) is skipped, not sealed:
            // the sender and the checkpoint would each carry an entry for every failed
            // request of an outage.
            if self.created {
                lock(&self.inner.sealed).insert(self.segment, self.offset);
            }
            self.segment += 1;
            self.offset = 0;
            // Before the file is made: the sender finishes the segment closed now (and it is
            // deleted once delivered) even when the next one cannot be created.
            self.durable.send_replace(Durable {
                segment: self.segment,
                offset: 0,
            });
        }
        self.file = None;
        self.spent = true;
        self.created = false;
        let path = self.inner.dir.join(segment_name(self.segment));
        // Appending: after a cut (set_len) the next write lands at the new end.
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.created = true;
        if file.metadata()?.len() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not empty", path.display()),
            ));
        }
        sync_dir(&self.inner.dir)?;
        self.file = Some(file);
        Ok(())
    }

    /// Checks whether the disk takes writes again: a small file written, fsynced, deleted.
    fn probe(&mut self) {
        let path = self.inner.dir.join(PROBE);
        let result = (|| {
            let mut f = File::create(&path)?;
            f.write_all(&[0u8; 4096])?;
            f.sync_all()?;
            std::fs::remove_file(&path)
        })();
        let result = result.and_then(|()| {
            if self.file.is_none() {
                self.roll()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => self.inner.mark_healthy(),
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                tracing::debug!(%error, "spool: disk probe failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;

    fn append(writer: &mut Writer, n: usize) {
        let group = (0..n)
            .map(|_| {
                let record = crate::kafka::Record {
                    key: None,
                    partition: None,
                    headers: None,
                    value: bytes::Bytes::from_static(b"v"),
                    first: None,
                };
                let (payloads, bytes) = super::super::append::encode(1, "t", &[record]).unwrap();
                let (reply, _) = oneshot::channel();
                Append {
                    payloads,
                    bytes,
                    reply,
                }
            })
            .collect();
        writer.commit(group);
    }

    #[test]
    fn an_unhealthy_writer_closes_its_segment_so_its_room_can_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(super::super::test_inner(dir.path(), BTreeMap::new()));
        let (mut writer, durable) = Writer::start(inner.clone(), 1, 0).unwrap();
        append(&mut writer, 3);
        let written = durable.borrow().offset;
        assert!(written > 0 && durable.borrow().segment == 1);
        // Healthy, under `segment_bytes`: the segment stays open.
        writer.idle();
        assert_eq!(durable.borrow().segment, 1);
        // A disk error (a full disk refuses the appends): the segment is closed at once, so
        // the sender reads it to its end and deletes it once delivered, even when no next
        // segment can be made (here a directory is in its way).
        std::fs::create_dir(dir.path().join(segment_name(2))).unwrap();
        inner.disk_error("append", &io::Error::other("no space"));
        writer.idle();
        assert_eq!(lock(&inner.sealed).get(&1), Some(&written));
        // The probe found the disk writable: past the number whose file could not be made.
        assert_eq!(
            durable.borrow().segment,
            3,
            "the sender moves past segment 1"
        );
        assert!(inner.healthy.load(Ordering::Acquire));
        // Nothing more to close: later idle turns do not use up segment numbers.
        inner.disk_error("append", &io::Error::other("no space"));
        writer.idle();
        writer.idle();
        assert_eq!(durable.borrow().segment, 3);
    }
}
