//! Reading request bodies under limits: a byte cap counted as the body arrives (chunked bodies
//! too), an inactivity timeout between pieces (408), and gzip/zstd request bodies inflated with
//! the same cap applied to what comes out, so a small compressed bomb is still a 413.

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::IngestError;

/// How a request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// As it is.
    Identity,
    /// `Content-Encoding: gzip`.
    Gzip,
    /// `Content-Encoding: zstd`.
    Zstd,
}

impl Encoding {
    /// The encoding named by `Content-Encoding`; anything else is 415.
    pub fn of(headers: &HeaderMap) -> Result<Encoding, IngestError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Encoding::Identity);
        };
        match value
            .to_str()
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            Ok("" | "identity") => Ok(Encoding::Identity),
            Ok("gzip" | "x-gzip") => Ok(Encoding::Gzip),
            Ok("zstd") => Ok(Encoding::Zstd),
            _ => Err(IngestError::UnsupportedType(
                "unsupported Content-Encoding; use gzip or zstd".into(),
            )),
        }
    }
}

/// The declared `Content-Length`, if any.
pub fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The 413 for a body over `limit`.
pub fn too_large(limit: usize) -> IngestError {
    IngestError::TooLarge(format!("body larger than {limit} bytes"))
}

/// Reads the whole body: refused once it passes `limit`, or when no piece arrives for `idle`;
/// then inflated if encoded, again refused past `limit`.
pub async fn read(
    body: Body,
    encoding: Encoding,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, IngestError> {
    let raw = collect(body, limit, idle).await?;
    match encoding {
        Encoding::Identity => Ok(raw),
        Encoding::Gzip => inflate(flate2::read::MultiGzDecoder::new(&raw[..]), limit, "gzip"),
        Encoding::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(&raw[..])
                .map_err(|e| IngestError::BadRequest(format!("zstd body: {e}")))?;
            inflate(decoder, limit, "zstd")
        }
    }
}

async fn collect(mut body: Body, limit: usize, idle: Duration) -> Result<Bytes, IngestError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut total = 0usize;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(IngestError::BodyTimeout(idle)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(IngestError::BadRequest(format!("reading body: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len();
        if total > limit {
            return Err(too_large(limit));
        }
        // A body that arrives in one piece is kept as it is, without a copy.
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

fn inflate(decoder: impl Read, limit: usize, name: &str) -> Result<Bytes, IngestError> {
    let mut out = Vec::new();
    // One byte past the limit tells "exactly the limit" from "more".
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::BadRequest(format!("{name} body: {e}")))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge(format!(
            "body larger than {limit} bytes once inflated"
        )));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn gzip_and_zstd_inflate_under_the_limit() {
        let idle = Duration::from_secs(1);
        let gz = Body::from(gzip(b"{\"a\":1}"));
        assert_eq!(
            read(gz, Encoding::Gzip, 100, idle).await.unwrap(),
            &b"{\"a\":1}"[..]
        );
        let zs = Body::from(zstd::encode_all(&b"[1,2]"[..], 3).unwrap());
        assert_eq!(
            read(zs, Encoding::Zstd, 100, idle).await.unwrap(),
            &b"[1,2]"[..]
        );
    }

    #[tokio::test]
    async fn a_compression_bomb_is_413() {
        let bomb = gzip(&vec![b' '; 10 << 20]);
        assert!(bomb.len() < 20_000);
        let err = read(
            Body::from(bomb),
            Encoding::Gzip,
            1 << 20,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        let err = read(
            Body::from(b"not gzip".to_vec()),
            Encoding::Gzip,
            100,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(
            err.unwrap_err().status(),
            axum::http::StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn encodings() {
        let mut h = HeaderMap::new();
        assert_eq!(Encoding::of(&h).unwrap(), Encoding::Identity);
        h.insert(header::CONTENT_ENCODING, "GZIP".parse().unwrap());
        assert_eq!(Encoding::of(&h).unwrap(), Encoding::Gzip);
        h.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        assert_eq!(
            Encoding::of(&h).unwrap_err().status(),
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }
}
