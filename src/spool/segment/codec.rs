//! Encoding and decoding of payloads and frames, per the layout in the parent's doc.

use bytes::Bytes;

use super::{
    APPENDED_AT, Entry, FIXED, FLAG_KEY, FLAG_PARTITION, Fields, MAX_PAYLOAD, MIN_PAYLOAD,
    NULL_VALUE, SEQ_AT, VERSION, crc32c,
};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::segment::tests::entry_with;

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
}
