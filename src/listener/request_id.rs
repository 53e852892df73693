//! Request ids: the client's `X-Request-Id` when it is sane, else a new one.

use std::cell::RefCell;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

/// The request id header: the client's when it sent a sane one, else a new one (see
/// [`RequestId`]). It is returned in the response and named in the log line of a failed
/// request.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A request's id, settled before routing and kept in the request's extensions; the listener
/// puts it on the response. It stays out of the request's headers: hyper sizes that map to the
/// headers it parsed, and one more would make it grow (1.4k instructions, 2 % of an `/async`
/// request). Hooks see the headers as the client sent them.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    /// The client's `X-Request-Id` when it is sane (1 to 128 visible ASCII characters), else
    /// 16 random hex digits.
    pub fn of(headers: &HeaderMap) -> RequestId {
        match headers.get(&REQUEST_ID) {
            Some(v)
                if (1..=128).contains(&v.len())
                    && v.as_bytes().iter().all(u8::is_ascii_graphic) =>
            {
                RequestId(v.clone())
            }
            _ => RequestId(fresh()),
        }
    }
}

/// Ids made at a time: each block is one allocation, shared by the ids cut from it.
const BLOCK: usize = 64;
const LEN: usize = 16;

thread_local! {
    /// The current block of fresh ids, and how much of it is used.
    static FRESH: RefCell<(Bytes, usize)> = const { RefCell::new((Bytes::new(), 0)) };
}

/// 16 random hex digits, cut from a block made for 64 of them: an id of its own would be an
/// allocation per request, and one more on its first copy.
fn fresh() -> HeaderValue {
    let id = FRESH.with_borrow_mut(|(block, used)| {
        if *used == block.len() {
            let ids: Vec<u8> = (0..BLOCK)
                .flat_map(|_| crate::hex64(rand::random()))
                .collect();
            *block = Bytes::from(ids);
            *used = 0;
        }
        let id = block.slice(*used..*used + LEN);
        *used += LEN;
        id
    });
    // Hex digits are always a valid header value; the fallback is never used.
    HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_distinct_hex_across_blocks() {
        let ids: Vec<HeaderValue> = (0..3 * BLOCK + 5).map(|_| fresh()).collect();
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            assert_eq!(id.len(), LEN);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
            assert!(seen.insert(id.as_bytes().to_vec()), "repeated id {id:?}");
        }
    }

    #[test]
    fn a_sane_client_id_is_kept_and_a_bad_one_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(RequestId::of(&headers).0, "abc-123");
        headers.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(RequestId::of(&headers).0.len(), LEN);
    }
}
