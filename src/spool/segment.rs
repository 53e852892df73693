//! The spool's on-disk format.
//!
//! A spool directory holds segment files named `NNNNNNNNNNNNNNNNNNNN.seg` (the segment number in
//! 20 decimal digits, so names sort in order). A segment is a sequence of frames:
//!
//! ```text
//! [len: u32 LE][crc32c(payload): u32 LE][payload: len bytes]
//! ```
//!
//! and a payload (version 1) is, integers little-endian:
//!
//! ```text
//! u8  version = 1
//! u64 seq            position in the spool; strictly increasing across segments
//! u64 origin         random id of the Spool::open that appended it
//! u64 appended_ms    Unix time of the group commit, milliseconds
//! u16 topic length, topic (UTF-8)
//! u8  flags          1 = key present, 2 = partition present
//! [u32 key length, key]
//! [i32 partition]
//! u16 header count, then per header: u16 name length, name (UTF-8),
//!                                    u32 value length (u32::MAX = null value), value
//! value              the rest of the payload
//! ```
//!
//! A reader stops at the first frame that is incomplete (torn write), has a zero or absurd length,
//! a checksum mismatch, or a payload that does not decode: everything before it is valid, nothing
//! after it is trusted. [`repair`] cuts a file there and logs what it cut.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read};
use std::path::Path;

use bytes::Bytes;

/// Bytes of a frame header: length and checksum.
pub const FRAME_HEADER: usize = 8;

/// Largest payload a frame may hold. Anything larger is taken for corruption by readers, so a
/// damaged length field never makes a reader allocate gigabytes.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Payload format version written by this code.
pub const VERSION: u8 = 1;

/// Offset of `seq` in a payload (see [`stamp`]).
const SEQ_AT: usize = 1;
/// Offset of `appended_ms` in a payload.
const APPENDED_AT: usize = 17;
/// Bytes before the topic: version, seq, origin, appended_ms.
const FIXED: usize = 25;
/// Smallest valid payload: the fixed part, a topic length, flags and a header count.
const MIN_PAYLOAD: usize = FIXED + 2 + 1 + 2;
/// Header value length that stands for a null value.
const NULL_VALUE: u32 = u32::MAX;

const FLAG_KEY: u8 = 1;
const FLAG_PARTITION: u8 = 2;

/// One spooled record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the spool; strictly increasing.
    pub seq: u64,
    /// Random id of the spool instance that appended it.
    pub origin: u64,
    /// When it was committed to disk (Unix ms).
    pub appended_ms: u64,
    /// Topic to produce to.
    pub topic: String,
    /// Record key.
    pub key: Option<Bytes>,
    /// Explicit partition.
    pub partition: Option<i32>,
    /// Record headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Record value.
    pub value: Bytes,
}

impl Entry {
    /// The record's stable id, as sent in the `kafboy-id` header.
    pub fn id(&self) -> String {
        record_id(self.origin, self.seq)
    }

    /// Appends this entry's payload (unframed) to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        encode_payload(
            out,
            &Fields {
                seq: self.seq,
                origin: self.origin,
                appended_ms: self.appended_ms,
                topic: &self.topic,
                key: self.key.as_deref(),
                partition: self.partition,
                value: &self.value,
            },
            self.headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_deref())),
        );
    }

    /// Appends this entry as a whole frame to `out`.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::new();
        self.encode_payload(&mut payload);
        frame(&payload, out);
    }
}

/// The stable id of record `seq` appended by spool instance `origin`: 33 characters,
/// `oooooooooooooooo-ssssssssssssssss` in lower-case hex.
pub fn record_id(origin: u64, seq: u64) -> String {
    let (origin, seq) = (crate::hex64(origin), crate::hex64(seq));
    origin
        .iter()
        .chain(b"-")
        .chain(&seq)
        .map(|&b| char::from(b))
        .collect()
}

/// Fields of a payload to encode, borrowed; headers are passed beside them.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// See [`Entry::seq`]; may be 0 here and set later by [`stamp`].
    pub seq: u64,
    /// See [`Entry::origin`].
    pub origin: u64,
    /// See [`Entry::appended_ms`]; may be 0 here and set later by [`stamp`].
    pub appended_ms: u64,
    /// Topic.
    pub topic: &'a str,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Partition.
    pub partition: Option<i32>,
    /// Value.
    pub value: &'a [u8],
}

/// Why a record cannot be spooled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} too long for a spool record")]
pub struct TooLong(pub &'static str);

/// The payload size of a record, or which field does not fit the format.
pub fn payload_size<'a>(
    fields: &Fields<'_>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Result<usize, TooLong> {
    if fields.topic.len() > u16::MAX as usize {
        return Err(TooLong("topic"));
    }
    let mut size = MIN_PAYLOAD + fields.topic.len() + fields.value.len();
    if let Some(key) = fields.key {
        if key.len() >= NULL_VALUE as usize {
            return Err(TooLong("key"));
        }
        size += 4 + key.len();
    }
    if fields.partition.is_some() {
        size += 4;
    }
    let mut count = 0usize;
    for (name, value) in headers {
        count += 1;
        if name.len() > u16::MAX as usize {
            return Err(TooLong("header name"));
        }
        let len = value.map_or(0, <[u8]>::len);
        if len >= NULL_VALUE as usize {
            return Err(TooLong("header value"));
        }
        size += 2 + name.len() + 4 + len;
    }
    if count > u16::MAX as usize {
        return Err(TooLong("header list"));
    }
    if size > MAX_PAYLOAD {
        return Err(TooLong("record"));
    }
    Ok(size)
}

/// Appends the payload of `fields` and `headers` to `out`. Sizes should have passed
/// [`payload_size`]; a field longer than its length field allows is cut (never a panic).
pub fn encode_payload<'a>(
    out: &mut Vec<u8>,
    fields: &Fields<'_>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) {
    out.push(VERSION);
    out.extend_from_slice(&fields.seq.to_le_bytes());
    out.extend_from_slice(&fields.origin.to_le_bytes());
    out.extend_from_slice(&fields.appended_ms.to_le_bytes());
    put_str16(out, fields.topic);
    let mut flags = 0;
    if fields.key.is_some() {
        flags |= FLAG_KEY;
    }
    if fields.partition.is_some() {
        flags |= FLAG_PARTITION;
    }
    out.push(flags);
    if let Some(key) = fields.key {
        put_bytes32(out, Some(key));
    }
    if let Some(p) = fields.partition {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let count_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let mut count: u16 = 0;
    for (name, value) in headers {
        if count == u16::MAX {
            break;
        }
        count += 1;
        put_str16(out, name);
        put_bytes32(out, value);
    }
    out[count_at..count_at + 2].copy_from_slice(&count.to_le_bytes());
    out.extend_from_slice(fields.value);
}

/// Sets `seq` and `appended_ms` in an encoded payload (the writer numbers records as it commits
/// them). A payload too short to be one is left alone.
pub fn stamp(payload: &mut [u8], seq: u64, appended_ms: u64) {
    if payload.len() >= FIXED {
        payload[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
        payload[APPENDED_AT..APPENDED_AT + 8].copy_from_slice(&appended_ms.to_le_bytes());
    }
}

/// Appends `payload` to `out` as a frame: length, CRC32C, payload.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_bytes32(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.extend_from_slice(&NULL_VALUE.to_le_bytes()),
        Some(v) => {
            let v = &v[..v.len().min(NULL_VALUE as usize - 1)];
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
    }
}

/// Decodes a payload. Key, headers and value are slices of `payload` (no copy).
pub fn decode_payload(payload: Bytes) -> Result<Entry, &'static str> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>, &'static str> {
        let end = at.checked_add(n).ok_or("length overflow")?;
        if end > payload.len() {
            return Err("payload shorter than its fields");
        }
        let range = *at..end;
        *at = end;
        Ok(range)
    };
    let u16_at =
        |r: std::ops::Range<usize>| u16::from_le_bytes([payload[r.start], payload[r.start + 1]]);
    let u32_at = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&payload[r]);
        u32::from_le_bytes(b)
    };
    let u64_at = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[r]);
        u64::from_le_bytes(b)
    };
    let version = payload[take(&mut at, 1)?.start];
    if version != VERSION {
        return Err("unknown payload version");
    }
    let seq = u64_at(take(&mut at, 8)?);
    let origin = u64_at(take(&mut at, 8)?);
    let appended_ms = u64_at(take(&mut at, 8)?);
    let topic_len = u16_at(take(&mut at, 2)?) as usize;
    let topic = std::str::from_utf8(&payload[take(&mut at, topic_len)?])
        .map_err(|_| "topic is not UTF-8")?
        .to_string();
    let flags = payload[take(&mut at, 1)?.start];
    if flags & !(FLAG_KEY | FLAG_PARTITION) != 0 {
        return Err("unknown flags");
    }
    let key = if flags & FLAG_KEY != 0 {
        let len = u32_at(take(&mut at, 4)?);
        if len == NULL_VALUE {
            return Err("null key length");
        }
        Some(payload.slice(take(&mut at, len as usize)?))
    } else {
        None
    };
    let partition = if flags & FLAG_PARTITION != 0 {
        Some(u32_at(take(&mut at, 4)?) as i32)
    } else {
        None
    };
    let count = u16_at(take(&mut at, 2)?) as usize;
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name_len = u16_at(take(&mut at, 2)?) as usize;
        let name = std::str::from_utf8(&payload[take(&mut at, name_len)?])
            .map_err(|_| "header name is not UTF-8")?
            .to_string();
        let len = u32_at(take(&mut at, 4)?);
        let value = if len == NULL_VALUE {
            None
        } else {
            Some(payload.slice(take(&mut at, len as usize)?))
        };
        headers.push((name, value));
    }
    let value = payload.slice(at..);
    Ok(Entry {
        seq,
        origin,
        appended_ms,
        topic,
        key,
        partition,
        headers,
        value,
    })
}

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
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
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

/// The file name of segment `id`.
pub fn segment_name(id: u64) -> String {
    format!("{id:020}.seg")
}

/// The segment number of a file name, if it is a segment's.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
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
    if cut > 0 {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(valid_len)?;
        file.sync_all()?;
        tracing::warn!(
            segment = %path.display(),
            offset = valid_len,
            cut_bytes = cut,
            kept_records = records,
            reason = corruption.as_ref().map_or("", |c| c.reason.as_str()),
            "spool: cut a torn or corrupt segment tail"
        );
    }
    Ok(Repaired {
        records,
        valid_len,
        cut,
        corruption,
    })
}

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as iSCSI, ext4 and Kafka's record
/// batches use it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_extend(0, data)
}

/// Continues a CRC32C over more data: `crc32c_extend(crc32c(a), b) == crc32c(a ++ b)`.
pub fn crc32c_extend(crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xff) as usize];
    }
    !c
}

const CRC_POLY: u32 = 0x82F6_3B78;

/// Slicing-by-8 tables: `[0]` is the classic byte table, `[k]` advances `k` more zero bytes.
static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// Bit-at-a-time CRC32C, the definition the table version is checked against.
    fn crc32c_slow(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ CRC_POLY
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn record_ids_are_two_padded_hex_numbers() {
        assert_eq!(record_id(0x1f, 0xabc), "000000000000001f-0000000000000abc");
        assert_eq!(
            record_id(u64::MAX, 0),
            format!("{:016x}-{:016x}", u64::MAX, 0)
        );
    }

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros, of 0xff, ascending.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
    }

    #[test]
    fn segment_names_sort_and_parse() {
        assert_eq!(segment_name(42), "00000000000000000042.seg");
        assert_eq!(parse_segment_name("00000000000000000042.seg"), Some(42));
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
        assert_eq!(parse_segment_name("checkpoint"), None);
        assert!(segment_name(9) < segment_name(10));
    }

    #[test]
    fn stamp_sets_seq_and_time() {
        let e = entry_with(0, "t", b"v");
        let mut p = Vec::new();
        e.encode_payload(&mut p);
        stamp(&mut p, 77, 1234);
        let d = decode_payload(Bytes::from(p)).unwrap();
        assert_eq!((d.seq, d.appended_ms), (77, 1234));
        assert_eq!(d.topic, "t");
    }

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

    fn entry_with(seq: u64, topic: &str, value: &[u8]) -> Entry {
        Entry {
            seq,
            origin: 0xabcdef,
            appended_ms: 1_700_000_000_000,
            topic: topic.into(),
            key: None,
            partition: None,
            headers: Vec::new(),
            value: Bytes::copy_from_slice(value),
        }
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
        fn crc32c_table_matches_bitwise(data in proptest::collection::vec(any::<u8>(), 0..200),
                                        split in 0usize..200) {
            prop_assert_eq!(crc32c(&data), crc32c_slow(&data));
            let split = split.min(data.len());
            prop_assert_eq!(crc32c_extend(crc32c(&data[..split]), &data[split..]), crc32c(&data));
        }

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
