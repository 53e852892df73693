//! Request ids: the client's `X-Request-Id` when it is sane, else a new one.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

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
            // Sixteen hex digits are always a valid header value; the fallback is never used.
            _ => RequestId(
                HeaderValue::from_bytes(&crate::hex64(rand::random()))
                    .unwrap_or(HeaderValue::from_static("0")),
            ),
        }
    }
}
