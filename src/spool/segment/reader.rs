//! Reading a segment's frames in order, and [`repair`], which cuts a torn or corrupt tail.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read};
use std::path::Path;

use bytes::Bytes;

use super::{Entry, FRAME_HEADER, MAX_PAYLOAD, MIN_PAYLOAD, crc32c, decode_payload};

/// Where and why a segment stops being valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// Offset of the first byte not trusted (the start of the bad frame).
    pub offset: u64,
    /// What is wrong there.
    pub reason: String,
}

/// What [`Reader::read_next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A valid record.
    Record {
        /// Offset of its frame.
        offset: u64,
        /// Bytes of its frame, header included.
        framed: u64,
        /// The record.
        entry: Entry,
    },
    /// The end of the data, on a frame boundary.
    End,
    /// A torn or corrupt frame: nothing from here on is valid.
    Corrupt(Corruption),
}

/// Reads frames in order from a segment (or a slice of one).
pub struct Reader<R> {
    inner: R,
    offset: u64,
    corrupt: Option<Corruption>,
}

impl<R: Read> Reader<R> {
    /// A reader of `inner`, whose first byte is at `offset` in the segment.
    pub fn new(inner: R, offset: u64) -> Reader<R> {
        Reader {
            inner,
            offset,
            corrupt: None,
        }
    }

    /// The offset just past the last valid frame read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record, the end, or where the data stops being valid (returned again on every
    /// later call). I/O errors other than a short read are returned as errors.
    pub fn read_next(&mut self) -> io::Result<Item> {
        if let Some(c) = &self.corrupt {
            return Ok(Item::Corrupt(c.clone()));
        }
        let item = self.read_frame()?;
        if let Item::Corrupt(c) = &item {
            self.corrupt = Some(c.clone());
        }
        Ok(item)
    }

    fn read_frame(&mut self) -> io::Result<Item> {
        let at = self.offset;
        let corrupt = |reason: String| Ok(Item::Corrupt(Corruption { offset: at, reason }));
        let mut header = [0u8; FRAME_HEADER];
        match read_full(&mut self.inner, &mut header)? {
            0 => return Ok(Item::End),
            n if n < FRAME_HEADER => {
                return corrupt(format!("torn frame header ({n} of {FRAME_HEADER} bytes)"));
            }
            _ => {}
        }
        let len = frame_len(&header);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len < MIN_PAYLOAD {
            return corrupt(format!(
                "frame length {len} below the minimum {MIN_PAYLOAD}"
            ));
        }
        if len > MAX_PAYLOAD {
            return corrupt(format!("frame length {len} over the maximum {MAX_PAYLOAD}"));
        }
        let mut payload = vec![0u8; len];
        let n = read_full(&mut self.inner, &mut payload)?;
        if n < len {
            return corrupt(format!("torn record ({n} of {len} payload bytes)"));
        }
        let actual = crc32c(&payload);
        if actual != crc {
            return corrupt(format!(
                "checksum mismatch (stored {crc:08x}, computed {actual:08x})"
            ));
        }
        match decode_payload(Bytes::from(payload)) {
            Ok(entry) => {
                let framed = (FRAME_HEADER + len) as u64;
                self.offset += framed;
                Ok(Item::Record {
                    offset: at,
                    framed,
                    entry,
                })
            }
            Err(why) => corrupt(format!("undecodable payload: {why}")),
        }
    }
}

/// The payload length a frame's header gives.
fn frame_len(header: &[u8; FRAME_HEADER]) -> usize {
    u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What [`repair`] found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// Valid records kept.
    pub records: u64,
    /// Length of the file after the repair.
    pub valid_len: u64,
    /// Bytes cut from the end (0 when the file was whole).
    pub cut: u64,
    /// Why the cut was made, when one was.
    pub corruption: Option<Corruption>,
    /// Valid records the cut took after a damaged one (0 for a tail a crash tore).
    pub lost: u64,
}

/// Reads a segment file, calling `visit` with each valid record and its frame offset and size;
/// truncates the file at the first torn or corrupt frame (or at the first record `visit`
/// refuses, with its reason), fsyncs it, and logs what was cut.
pub fn repair(
    path: &Path,
    mut visit: impl FnMut(&Entry, u64, u64) -> Result<(), String>,
) -> io::Result<Repaired> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = Reader::new(BufReader::with_capacity(256 << 10, file), 0);
    let mut records = 0;
    let corruption = loop {
        match reader.read_next()? {
            Item::Record {
                offset,
                framed,
                entry,
            } => {
                if let Err(reason) = visit(&entry, offset, framed) {
                    break Some(Corruption { offset, reason });
                }
                records += 1;
            }
            Item::End => break None,
            Item::Corrupt(c) => break Some(c),
        }
    };
    let valid_len = corruption.as_ref().map_or(file_len, |c| c.offset);
    let cut = file_len - valid_len;
    let mut lost = 0;
    if cut > 0 {
        // Readable records past the damaged one: flipped bits, not a write a crash cut short
        // (which ends the file). They go with it, answered `2xx` as they were.
        lost = readable_after(path, valid_len).unwrap_or(0);
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(valid_len)?;
        file.sync_all()?;
        let reason = corruption.as_ref().map_or("", |c| c.reason.as_str());
        if lost > 0 {
            tracing::error!(
                segment = %path.display(),
                offset = valid_len,
                cut_bytes = cut,
                kept_records = records,
                lost_records = lost,
                reason,
                "spool: cut a segment at a damaged record; the readable records after it are lost"
            );
        } else {
            tracing::warn!(
                segment = %path.display(),
                offset = valid_len,
                cut_bytes = cut,
                kept_records = records,
                reason,
                "spool: cut a torn or corrupt segment tail"
            );
        }
    }
    Ok(Repaired {
        records,
        valid_len,
        cut,
        corruption,
        lost,
    })
}

/// How many valid records follow the damaged frame at `at`, reading on past it by its length
/// (which no checksum covers: a damaged length finds none).
fn readable_after(path: &Path, at: u64) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(at))?;
    let mut header = [0u8; FRAME_HEADER];
    if read_full(&mut file, &mut header)? < FRAME_HEADER {
        return Ok(0);
    }
    let len = frame_len(&header);
    if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
        return Ok(0);
    }
    let next = at + (FRAME_HEADER + len) as u64;
    file.seek(SeekFrom::Start(next))?;
    let mut reader = Reader::new(BufReader::new(file), next);
    let mut records = 0;
    while let Item::Record { .. } = reader.read_next()? {
        records += 1;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::segment::tests::entry_with;
    use crate::spool::segment::{Fields, payload_size, segment_name};
    use proptest::prelude::*;
    use std::io::Cursor;

    #[test]
    fn a_zeroed_tail_is_corrupt_not_empty_records() {
        // Some file systems show zeros past the last durable write after a crash.
        let mut buf = Vec::new();
        entry_with(1, "t", b"v").encode_frame(&mut buf);
        let good = buf.len() as u64;
        buf.extend_from_slice(&[0u8; 64]);
        let (entries, end) = read_all(&buf);
        assert_eq!(entries.len(), 1);
        assert!(
            matches!(end, Item::Corrupt(Corruption { offset, .. }) if offset == good),
            "{end:?}"
        );
    }

    #[test]
    fn a_damaged_record_in_the_middle_counts_the_readable_records_cut_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for seq in 0..4 {
            starts.push(buf.len());
            entry_with(seq, "t", b"value").encode_frame(&mut buf);
        }
        // A flipped bit in the second record's value.
        buf[starts[2] - 2] ^= 1;
        std::fs::write(&path, &buf).unwrap();
        let r = repair(&path, |_, _, _| Ok(())).unwrap();
        assert_eq!((r.records, r.lost), (1, 2), "{r:?}");
        assert_eq!(r.valid_len, starts[1] as u64);
        // A torn tail (the second record mended) has nothing readable after it.
        let mut torn = buf[..starts[2]].to_vec();
        torn[starts[2] - 2] ^= 1;
        torn.extend_from_slice(&buf[starts[2]..starts[2] + 11]);
        std::fs::write(&path, &torn).unwrap();
        let r = repair(&path, |_, _, _| Ok(())).unwrap();
        assert_eq!((r.records, r.lost), (2, 0), "{r:?}");
    }

    #[test]
    fn repair_cuts_the_file_at_the_last_valid_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(1));
        let mut buf = Vec::new();
        for seq in 0..3 {
            entry_with(seq, "t", b"value").encode_frame(&mut buf);
        }
        let whole = buf.len() as u64;
        buf.extend_from_slice(&buf.clone()[..11]);
        std::fs::write(&path, &buf).unwrap();
        let mut seen = Vec::new();
        let r = repair(&path, |e, _, _| {
            seen.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!((r.records, r.valid_len, r.cut), (3, whole, 11));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        // A visitor can refuse a record (e.g. out of order): the file is cut before it.
        let r = repair(&path, |e, _, _| {
            if e.seq == 2 {
                Err("seq out of order".into())
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(r.records, 2);
        assert_eq!(r.corruption.unwrap().reason, "seq out of order");
        let again = repair(&path, |_, _, _| Ok(())).unwrap();
        assert_eq!((again.records, again.cut), (2, 0));
    }

    /// Every record of `buf`, and how reading ended.
    fn read_all(buf: &[u8]) -> (Vec<Entry>, Item) {
        let mut r = Reader::new(Cursor::new(buf), 0);
        let mut out = Vec::new();
        loop {
            match r.read_next().unwrap() {
                Item::Record { entry, .. } => out.push(entry),
                end => return (out, end),
            }
        }
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            "[a-zA-Z0-9._-]{0,40}",
            proptest::option::of(arb_bytes(40)),
            proptest::option::of(any::<i32>()),
            proptest::collection::vec(("\\PC{0,12}", proptest::option::of(arb_bytes(20))), 0..4),
            arb_bytes(300),
        )
            .prop_map(
                |(seq, origin, appended_ms, topic, key, partition, headers, value)| Entry {
                    seq,
                    origin,
                    appended_ms,
                    topic,
                    key,
                    partition,
                    headers,
                    value,
                },
            )
    }

    /// Frames of `entries` and the end offset of each.
    fn frames(entries: &[Entry]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for e in entries {
            e.encode_frame(&mut buf);
            ends.push(buf.len());
        }
        (buf, ends)
    }

    proptest! {
        #[test]
        fn write_then_read_round_trips(entries in proptest::collection::vec(arb_entry(), 0..12)) {
            let (buf, ends) = frames(&entries);
            let mut r = Reader::new(Cursor::new(&buf), 0);
            for (i, want) in entries.iter().enumerate() {
                match r.read_next().unwrap() {
                    Item::Record { offset, framed, entry } => {
                        prop_assert_eq!(&entry, want);
                        let start = if i == 0 { 0 } else { ends[i - 1] };
                        prop_assert_eq!(offset as usize, start);
                        prop_assert_eq!((offset + framed) as usize, ends[i]);
                        let size = payload_size(
                            &Fields {
                                seq: 0, origin: 0, appended_ms: 0,
                                topic: &want.topic, key: want.key.as_deref(),
                                partition: want.partition, value: &want.value,
                            },
                            want.headers.iter().map(|(n, v)| (n.as_str(), v.as_deref())),
                        ).unwrap();
                        prop_assert_eq!(size + FRAME_HEADER, framed as usize);
                    }
                    other => prop_assert!(false, "record {} missing: {:?}", i, other),
                }
            }
            prop_assert_eq!(r.read_next().unwrap(), Item::End);
            prop_assert_eq!(r.offset() as usize, buf.len());
        }

        #[test]
        fn truncation_anywhere_yields_exactly_the_whole_records(
            entries in proptest::collection::vec(arb_entry(), 1..8),
            cut in any::<proptest::sample::Index>(),
        ) {
            let (buf, ends) = frames(&entries);
            let cut = cut.index(buf.len() + 1);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            let (got, end) = read_all(&buf[..cut]);
            prop_assert_eq!(&got[..], &entries[..whole]);
            let boundary = if whole == 0 { 0 } else { ends[whole - 1] };
            if cut == boundary {
                prop_assert_eq!(end, Item::End);
            } else {
                match end {
                    Item::Corrupt(c) => prop_assert_eq!(c.offset as usize, boundary),
                    other => prop_assert!(false, "torn tail not reported: {:?}", other),
                }
            }
            // On disk, repair cuts the file back to the boundary and keeps those records.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(segment_name(0));
            std::fs::write(&path, &buf[..cut]).unwrap();
            let repaired = repair(&path, |_, _, _| Ok(())).unwrap();
            prop_assert_eq!(repaired.records as usize, whole);
            prop_assert_eq!(repaired.valid_len as usize, boundary);
            prop_assert_eq!(repaired.cut as usize, cut - boundary);
            prop_assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, boundary);
        }

        #[test]
        fn a_flipped_byte_in_the_last_record_is_detected(
            entries in proptest::collection::vec(arb_entry(), 1..8),
            at in any::<proptest::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let (mut buf, ends) = frames(&entries);
            let last_start = if ends.len() == 1 { 0 } else { ends[ends.len() - 2] };
            let pos = last_start + at.index(buf.len() - last_start);
            buf[pos] ^= mask;
            let (got, end) = read_all(&buf);
            prop_assert_eq!(&got[..], &entries[..entries.len() - 1]);
            match end {
                Item::Corrupt(c) => prop_assert_eq!(c.offset as usize, last_start),
                other => prop_assert!(false, "flip at {} not detected: {:?}", pos, other),
            }
        }
    }
}
