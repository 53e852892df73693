//! Reading records from the segments into the window, in order and never past what is
//! durable.

use std::fs::File;
use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{Finished, Flight, Sender, State};
use crate::spool::segment::{Entry, Item, Reader, segment_name};
use crate::spool::writer::Durable;
use crate::spool::{Inner, lock};

/// Wait after a failed read of a segment before trying again.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Where the sender reads next.
#[derive(Debug)]
pub(in crate::spool) struct Cursor {
    segment: u64,
    offset: u64,
    /// Records below this seq are acknowledged already and skipped.
    skip_below: u64,
    /// Last seq read in `segment`.
    last_seq: Option<u64>,
}

impl Cursor {
    pub(in crate::spool) fn new(segment: u64, offset: u64, skip_below: u64) -> Cursor {
        Cursor {
            segment,
            offset,
            skip_below,
            last_seq: None,
        }
    }

    pub(super) fn caught_up(&self, durable: Durable) -> bool {
        self.segment >= durable.segment && self.offset >= durable.offset
    }
}

/// Records read in one go.
#[derive(Default)]
struct Batch {
    records: Vec<(u64, Entry)>,
    finished: Vec<Finished>,
}

/// Reads up to `max_records` records or `max_bytes` bytes from `cursor` on, never past
/// `durable`.
fn read_batch(
    inner: &Inner,
    cursor: &mut Cursor,
    durable: Durable,
    max_records: usize,
    max_bytes: u64,
) -> io::Result<Batch> {
    let mut out = Batch::default();
    let mut bytes = 0u64;
    loop {
        let full = |out: &Batch, bytes: u64| out.records.len() >= max_records || bytes >= max_bytes;
        let limit = if cursor.segment == durable.segment {
            durable.offset
        } else {
            lock(&inner.sealed)
                .get(&cursor.segment)
                .copied()
                .unwrap_or(0)
        };
        if cursor.offset < limit {
            if full(&out, bytes) {
                return Ok(out);
            }
            let path = inner.dir.join(segment_name(cursor.segment));
            match File::open(&path) {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(cursor.offset))?;
                    let span = limit - cursor.offset;
                    // No bigger than what is there to read: a fixed 256 KiB buffer was an
                    // mmap and munmap for every few records read.
                    let capacity = span.clamp(4 << 10, 256 << 10) as usize;
                    let mut reader = Reader::new(
                        BufReader::with_capacity(capacity, file.take(span)),
                        cursor.offset,
                    );
                    while !full(&out, bytes) {
                        match reader.read_next()? {
                            Item::Record {
                                offset,
                                framed,
                                entry,
                            } => {
                                cursor.offset = offset + framed;
                                cursor.last_seq = Some(entry.seq);
                                if entry.seq >= cursor.skip_below {
                                    bytes += framed;
                                    out.records.push((framed, entry));
                                }
                            }
                            Item::End => break,
                            Item::Corrupt(c) => {
                                // Validated at open or written by this process: damage since.
                                tracing::error!(
                                    segment = %path.display(),
                                    offset = c.offset,
                                    lost_bytes = limit - c.offset,
                                    reason = %c.reason,
                                    "spool: segment damaged while in use; skipping the rest of it"
                                );
                                cursor.offset = limit;
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::error!(segment = %path.display(), "spool: segment vanished");
                    cursor.offset = limit;
                }
                Err(e) => return Err(e),
            }
            if full(&out, bytes) {
                return Ok(out);
            }
            continue;
        }
        if cursor.segment < durable.segment {
            out.finished.push(Finished {
                segment: cursor.segment,
                last_seq: cursor.last_seq,
                size: limit,
            });
            let next = lock(&inner.sealed)
                .range(cursor.segment + 1..)
                .next()
                .map_or(durable.segment, |(id, _)| *id)
                .min(durable.segment);
            cursor.segment = next;
            cursor.offset = 0;
            cursor.last_seq = None;
            continue;
        }
        return Ok(out);
    }
}

impl Sender {
    /// Reads more records into the window.
    pub(super) async fn fill(&mut self) {
        let durable = *self.durable.borrow_and_update();
        let c = &self.inner.config;
        let max_records = c.window_records.saturating_sub(self.window.len());
        let max_bytes = c.window_bytes.saturating_sub(self.window_bytes);
        let (inner, cursor) = (self.inner.clone(), self.cursor.clone());
        let read = tokio::task::spawn_blocking(move || {
            let _gate = lock(&inner.fs_gate);
            let mut cursor = lock(&cursor);
            read_batch(&inner, &mut cursor, durable, max_records, max_bytes)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        match read {
            Ok(batch) => {
                if self.window.is_empty()
                    && let Some((_, first)) = batch.records.first()
                {
                    self.inner
                        .oldest_ms
                        .store(first.appended_ms, Ordering::Release);
                }
                for (framed, entry) in batch.records {
                    self.window_bytes += framed;
                    self.unsent += 1;
                    self.window.push_back(Flight {
                        seq: entry.seq,
                        framed,
                        entry,
                        state: State::Unsent,
                        attempts: 0,
                    });
                }
                self.finished.extend(batch.finished);
            }
            Err(error) => {
                self.inner.disk_error("read segment", &error);
                self.read_again_at = Some(Instant::now() + READ_RETRY);
            }
        }
    }
}
