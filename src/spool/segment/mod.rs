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

mod codec;
mod crc;
mod reader;

use bytes::Bytes;

pub use codec::{TooLong, decode_payload, encode_payload, frame, payload_size, stamp};
pub use crc::{crc32c, crc32c_extend};
pub use reader::{Corruption, Item, Reader, Repaired, repair};

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

/// Whether `file` is still the file at `path`. The sender opens segments by path: a directory
/// removed or renamed under a running spool would take writes into a file no one reads.
pub fn in_place(path: &std::path::Path, file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (named, open) = (std::fs::metadata(path)?, file.metadata()?);
        if (named.dev(), named.ino()) != (open.dev(), open.ino()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is another file now", path.display()),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (path, file);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_are_two_padded_hex_numbers() {
        assert_eq!(record_id(0x1f, 0xabc), "000000000000001f-0000000000000abc");
        assert_eq!(
            record_id(u64::MAX, 0),
            format!("{:016x}-{:016x}", u64::MAX, 0)
        );
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

    /// A record of `topic` with `value`, numbered `seq`; for the tests of the child modules too.
    pub(super) fn entry_with(seq: u64, topic: &str, value: &[u8]) -> Entry {
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
}
