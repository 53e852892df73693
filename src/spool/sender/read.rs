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
use crate::spool::{Inner, SenderFile, lock};

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
/// `durable`. An error comes with what was read before it: the cursor has moved past those
/// records, so dropping them would skip them for good (and later acknowledgements would
/// count them as delivered).
fn read_batch(
    inner: &Inner,
    cursor: &mut Cursor,
    durable: Durable,
    max_records: usize,
    max_bytes: u64,
) -> (Batch, Option<io::Error>) {
    let mut out = Batch::default();
    let error = read_into(inner, cursor, durable, max_records, max_bytes, &mut out).err();
    (out, error)
}

fn read_into(
    inner: &Inner,
    cursor: &mut Cursor,
    durable: Durable,
    max_records: usize,
    max_bytes: u64,
    out: &mut Batch,
) -> io::Result<()> {
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
            if full(out, bytes) {
                return Ok(());
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
                    while !full(out, bytes) {
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
                            // Short of the length this process wrote and synced: cut since.
                            Item::End if cursor.offset < limit => {
                                tracing::error!(
                                    segment = %path.display(),
                                    offset = cursor.offset,
                                    lost_bytes = limit - cursor.offset,
                                    "spool: segment shorter than what was written to it; \
                                     skipping the rest of it"
                                );
                                cursor.offset = limit;
                                break;
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
                // The whole directory away (renamed or removed): its segments come back with
                // it, and are read then. Skipping them would count their records delivered.
                Err(e) if e.kind() == ErrorKind::NotFound && !inner.dir.is_dir() => return Err(e),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::error!(segment = %path.display(), "spool: segment vanished");
                    cursor.offset = limit;
                }
                Err(e) => return Err(e),
            }
            if full(out, bytes) {
                return Ok(());
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
        return Ok(());
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
        .unwrap_or_else(|e| (Batch::default(), Some(io::Error::other(e.to_string()))));
        let (batch, error) = read;
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
                sent: Instant::now(),
            });
        }
        self.finished.extend(batch.finished);
        match error {
            Some(error) => {
                self.inner.sender_error(SenderFile::Segment, &error);
                self.read_again_at = Some(Instant::now() + READ_RETRY);
            }
            None => self.inner.sender_ok(SenderFile::Segment),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::*;
    use crate::spool::segment::Entry;
    use crate::spool::test_inner as inner;

    /// Segment bytes holding records `seqs`.
    fn segment(seqs: std::ops::Range<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in seqs {
            let entry = Entry {
                seq,
                origin: 1,
                appended_ms: 1_700_000_000_000,
                topic: "t".into(),
                key: None,
                partition: None,
                headers: Vec::new(),
                value: Bytes::from_static(b"v"),
            };
            entry.encode_frame(&mut out);
        }
        out
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch.records.iter().map(|(_, e)| e.seq).collect()
    }

    #[test]
    fn records_read_before_an_error_are_handed_out_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let first = segment(0..3);
        std::fs::write(dir.path().join(segment_name(1)), &first).unwrap();
        // Segment 2 cannot be read for now: a directory opens, and reading it fails.
        std::fs::create_dir(dir.path().join(segment_name(2))).unwrap();
        let inner = inner(dir.path(), BTreeMap::from([(1, first.len() as u64)]));
        let mut cursor = Cursor::new(1, 0, 0);
        let durable = Durable {
            segment: 2,
            offset: 100,
        };
        let (batch, error) = read_batch(&inner, &mut cursor, durable, 4096, 1 << 24);
        assert!(error.is_some());
        assert_eq!(seqs(&batch), [0, 1, 2]);
        assert_eq!(batch.finished.len(), 1, "segment 1 is done with");
        std::fs::remove_dir(dir.path().join(segment_name(2))).unwrap();
        let second = segment(3..5);
        std::fs::write(dir.path().join(segment_name(2)), &second).unwrap();
        let durable = Durable {
            segment: 2,
            offset: second.len() as u64,
        };
        let (batch, error) = read_batch(&inner, &mut cursor, durable, 4096, 1 << 24);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(seqs(&batch), [3, 4]);
    }

    #[test]
    fn segments_of_a_directory_moved_away_are_read_once_it_is_back() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        let first = segment(0..3);
        std::fs::write(dir.join(segment_name(1)), &first).unwrap();
        let inner = inner(&dir, BTreeMap::new());
        let mut cursor = Cursor::new(1, 0, 0);
        let durable = Durable {
            segment: 1,
            offset: first.len() as u64,
        };
        let away = top.path().join("away");
        std::fs::rename(&dir, &away).unwrap();
        let (batch, error) = read_batch(&inner, &mut cursor, durable, 4096, 1 << 24);
        assert!(error.is_some(), "an error to try again on, not a skip");
        assert!(batch.records.is_empty());
        std::fs::rename(&away, &dir).unwrap();
        let (batch, error) = read_batch(&inner, &mut cursor, durable, 4096, 1 << 24);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(seqs(&batch), [0, 1, 2]);
        // A segment removed from a directory still there is gone for good: stepped over.
        std::fs::remove_file(dir.join(segment_name(1))).unwrap();
        let mut cursor = Cursor::new(1, 0, 0);
        let (batch, error) = read_batch(&inner, &mut cursor, durable, 4096, 1 << 24);
        assert!(error.is_none() && batch.records.is_empty(), "{error:?}");
        assert!(cursor.caught_up(durable));
    }

    #[test]
    fn a_segment_cut_short_at_a_record_boundary_is_skipped_not_read_forever() {
        let dir = tempfile::tempdir().unwrap();
        let whole = segment(0..3);
        let one = whole.len() / 3;
        std::fs::write(dir.path().join(segment_name(1)), &whole[..2 * one]).unwrap();
        std::fs::write(dir.path().join(segment_name(2)), segment(3..4)).unwrap();
        let inner =
            std::sync::Arc::new(inner(dir.path(), BTreeMap::from([(1, whole.len() as u64)])));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cursor = Cursor::new(1, 0, 0);
            let durable = Durable {
                segment: 2,
                offset: one as u64,
            };
            let (batch, error) = read_batch(&inner, &mut cursor, durable, 4096, 1 << 24);
            let _ = tx.send((seqs(&batch), error.is_none()));
        });
        let read = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(read.unwrap(), (vec![0, 1, 3], true));
    }
}
