//! Reading request bodies under limits: a byte cap counted as the body arrives (chunked bodies
//! too), an inactivity timeout between pieces (408), and gzip/zstd request bodies inflated with
//! the same cap applied to what comes out, so a small compressed bomb is still a 413.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::IngestError;

mod budget;

pub use budget::{Budget, Held};

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
    /// The encoding named by `Content-Encoding`; anything else is 415. So is a transfer coding
    /// other than `chunked` (`Transfer-Encoding: gzip, chunked`): hyper takes the chunks off and
    /// leaves the gzip on, and a raw route would write the compressed bytes as the record.
    pub fn of(headers: &HeaderMap) -> Result<Encoding, IngestError> {
        if headers.contains_key(header::TRANSFER_ENCODING) && !only_chunked(headers) {
            return Err(IngestError::UnsupportedType(
                "unsupported Transfer-Encoding; send chunked alone, and gzip or zstd as the \
                 Content-Encoding"
                    .into(),
            ));
        }
        let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
        let Some(value) = values.next() else {
            return Ok(Encoding::Identity);
        };
        // Two header lines are two codings, as `gzip, gzip` on one line is; only one is read.
        if values.next().is_some() {
            return Err(IngestError::UnsupportedType(
                "more than one Content-Encoding; send one of gzip or zstd".into(),
            ));
        }
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

/// Whether the `Transfer-Encoding` codings, over all its lines, are `chunked` once (empty list
/// elements aside, as RFC 9110 has them): `chunked, chunked` would leave one layer of chunks
/// in the body.
fn only_chunked(headers: &HeaderMap) -> bool {
    let mut chunked = 0;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return false;
        };
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return false;
            }
            chunked += 1;
        }
    }
    chunked == 1
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

/// How bodies are read: the settings, and the byte budget all requests share.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest body, before and after inflation (413).
    pub max_bytes: usize,
    /// Longest pause between pieces (408).
    pub idle: Duration,
    /// Longest a whole body may take (408).
    pub deadline: Duration,
    /// Bytes of bodies being read, over every request (503 when spent).
    pub buffer: Arc<Budget>,
}

impl Limits {
    /// From the server settings.
    pub fn new(server: &crate::config::ServerConfig) -> Limits {
        Limits {
            max_bytes: server.max_body_bytes,
            idle: server.body_read_timeout,
            deadline: server.body_deadline,
            buffer: Arc::new(Budget::new(server.max_body_buffer_bytes)),
        }
    }
}

/// Reads the whole body: refused once it passes the size limit, when no piece arrives for the
/// idle time, or when it is not all there by the deadline; then inflated if encoded, again
/// refused past the size limit. `declared` is the Content-Length, already checked against
/// the limit, so the buffer is sized once.
///
/// An inflated body stays held of the buffer budget until the caller drops the [`Held`] (once
/// its records are handed over): a few bytes of gzip would otherwise pin up to the size limit
/// each while they wait for room in the queue, out of the budget's sight. A body as it came
/// cost its client its size, and is held while it arrives only.
pub async fn read(
    body: Body,
    encoding: Encoding,
    declared: Option<usize>,
    limits: &Limits,
) -> Result<(Bytes, Held<'_>), IngestError> {
    let raw = collect(body, declared, limits).await?;
    let limit = limits.max_bytes;
    let mut held = Held {
        budget: &limits.buffer,
        bytes: 0,
    };
    let inflated = match encoding {
        // An empty body is refused as empty (`decode`), however it says it is encoded.
        _ if raw.is_empty() => return Ok((raw, held)),
        Encoding::Identity => return Ok((raw, held)),
        Encoding::Gzip => inflate(flate2::read::MultiGzDecoder::new(&raw[..]), limit, "gzip")?,
        Encoding::Zstd => {
            let bad = |e: std::io::Error| IngestError::BadRequest(format!("zstd body: {e}"));
            let mut decoder = zstd::stream::read::Decoder::new(&raw[..]).map_err(bad)?;
            // A frame names its window, and the decoder allocates it up front: zstd's default
            // cap, 128 MiB, would be ten bytes' work for a client. Nothing under the limit needs
            // a window wider than the limit; 8 MiB is what `zstd -19` uses on a stream.
            decoder.window_log_max(window_log(limit)).map_err(bad)?;
            inflate(decoder, limit, "zstd")?
        }
    };
    held.cover(inflated.len())?;
    Ok((inflated, held))
}

async fn collect(
    mut body: Body,
    declared: Option<usize>,
    limits: &Limits,
) -> Result<Bytes, IngestError> {
    let deadline = tokio::time::Instant::now() + limits.deadline;
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    // The share of the buffer budget this body holds while it is read: what has arrived, or
    // what was reserved for it, whichever is more.
    let mut held = Held {
        budget: &limits.buffer,
        bytes: 0,
    };
    let mut total = 0usize;
    loop {
        // One timer per piece: the pause allowed, cut short by the whole body's deadline.
        let idle_end = tokio::time::Instant::now() + limits.idle;
        let frame = match tokio::time::timeout_at(idle_end.min(deadline), body.frame()).await {
            Err(_) if idle_end < deadline => {
                return Err(IngestError::BodyTimeout(format!(
                    "no request body data for {:?}",
                    limits.idle
                )));
            }
            Err(_) => {
                return Err(IngestError::BodyTimeout(format!(
                    "request body not complete within {:?}",
                    limits.deadline
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(IngestError::BadRequest(format!("reading body: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len();
        if total > limits.max_bytes {
            return Err(too_large(limits.max_bytes));
        }
        held.cover(total)?;
        // A body that arrives in one piece is kept as it is, without a copy.
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                let cap = declared.unwrap_or(limits.max_bytes).max(total);
                grow(&mut rest, total, cap, &mut held)?;
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

/// The smallest buffer a body in pieces starts with.
const FIRST_BUFFER: usize = 16 << 10;

/// Makes room for `need` bytes in all in `buffer`: at least twice its size, at most `cap` (the
/// declared length, or the limit), its whole capacity held of the budget. Grown as bytes
/// arrive, not sized for the declared length up front: a client that declares 1 MiB and then
/// trickles a byte at a time would otherwise hold 1 MiB of the budget for the price of a few
/// bytes.
fn grow(
    buffer: &mut BytesMut,
    need: usize,
    cap: usize,
    held: &mut Held<'_>,
) -> Result<(), IngestError> {
    if need <= buffer.capacity() {
        return Ok(());
    }
    let size = buffer
        .capacity()
        .saturating_mul(2)
        .max(FIRST_BUFFER)
        .min(cap)
        .max(need);
    // Both buffers exist while one is copied into the other.
    held.cover(buffer.capacity() + size)?;
    // Exactly `size`: `reserve` would round up as a `Vec` does, past `cap` and the budget.
    let mut bigger = BytesMut::with_capacity(size);
    bigger.extend_from_slice(buffer);
    *buffer = bigger;
    held.give_back_to(size);
    Ok(())
}

/// The widest zstd window (as a power of two) a body under `limit` bytes is let to name: the
/// limit rounded up, at least 2^23.
fn window_log(limit: usize) -> u32 {
    let bits = usize::BITS - limit.saturating_sub(1).leading_zeros();
    bits.clamp(23, 31)
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
    // The buffer doubled as it filled: the room past its end would be held with the body,
    // outside the budget, which counts the body's length.
    out.shrink_to_fit();
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The body alone, its hold given back at once.
    async fn read(
        body: Body,
        encoding: Encoding,
        declared: Option<usize>,
        limits: &Limits,
    ) -> Result<Bytes, IngestError> {
        super::read(body, encoding, declared, limits)
            .await
            .map(|(body, _)| body)
    }

    #[tokio::test]
    async fn an_inflated_body_is_held_of_the_budget_until_handed_over() {
        let mut l = limits(10_000);
        l.buffer = Arc::new(Budget::new(15_000));
        let zeros = || Body::from(gzip(&[b'0'; 10_000]));
        let (first, held) = super::read(zeros(), Encoding::Gzip, None, &l)
            .await
            .unwrap();
        assert_eq!((first.len(), l.buffer.used()), (10_000, 10_000));
        // Tens of bytes on the wire, ten thousand held: the next one finds no room.
        let Err(refused) = super::read(zeros(), Encoding::Gzip, None, &l).await else {
            panic!("a second inflated body fit the budget");
        };
        assert!(
            matches!(refused, IngestError::Unavailable(_)),
            "{refused:?}"
        );
        drop(held);
        assert_eq!(l.buffer.used(), 0);
        let (plain, held) = super::read(Body::from("{}"), Encoding::Identity, None, &l)
            .await
            .unwrap();
        assert_eq!((&plain[..], l.buffer.used()), (&b"{}"[..], 0));
        drop(held);
    }

    #[test]
    fn an_inflated_body_holds_no_more_than_its_length() {
        // The budget counts the length: the buffer's room to spare must not come along.
        let raw = gzip(&[b'0'; 300_000]);
        let body = inflate(
            flate2::read::MultiGzDecoder::new(&raw[..]),
            1_000_000,
            "gzip",
        )
        .unwrap();
        let held = body.try_into_mut().expect("the only reference");
        assert_eq!((held.len(), held.capacity()), (300_000, 300_000));
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn limits(max_bytes: usize) -> Limits {
        Limits {
            max_bytes,
            idle: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
            buffer: Arc::new(Budget::new(1 << 30)),
        }
    }

    /// A body that sends `len` one-byte pieces, one every `every`.
    struct Trickle {
        left: usize,
        every: Duration,
        sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    }

    impl Trickle {
        fn body(len: usize, every: Duration) -> Body {
            Body::new(Trickle {
                left: len,
                every,
                sleep: Box::pin(tokio::time::sleep(every)),
            })
        }
    }

    impl axum::body::HttpBody for Trickle {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            use std::future::Future;
            if self.left == 0 {
                return std::task::Poll::Ready(None);
            }
            std::task::ready!(self.sleep.as_mut().poll(cx));
            let next = tokio::time::Instant::now() + self.every;
            self.sleep.as_mut().reset(next);
            self.left -= 1;
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"x")))))
        }
    }

    /// A body that arrives in `n` pieces of `size` bytes, at once.
    struct Pieces(usize, usize);

    impl axum::body::HttpBody for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(None);
            }
            self.0 -= 1;
            let piece = Bytes::from(vec![b'x'; self.1]);
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(piece))))
        }
    }

    #[tokio::test]
    async fn the_largest_body_in_pieces_fits_a_budget_of_twice_the_limit() {
        // 100 pieces of 3000 bytes: the buffer doubles up to 300,000, and holds the old one
        // and the new one while it copies (the config check asks for twice the limit).
        let max = 300_000;
        for declared in [None, Some(max)] {
            let mut l = limits(max);
            l.buffer = Arc::new(Budget::new(2 * max));
            let body = read(
                Body::new(Pieces(100, 3000)),
                Encoding::Identity,
                declared,
                &l,
            );
            assert_eq!(body.await.unwrap().len(), max, "{declared:?}");
            assert_eq!(l.buffer.used(), 0);
            // With only the limit itself, the last copy would pass the budget: a 503 that no
            // retry could get past, which is why the config refuses such a budget.
            l.buffer = Arc::new(Budget::new(max));
            let body = read(
                Body::new(Pieces(100, 3000)),
                Encoding::Identity,
                declared,
                &l,
            );
            assert_eq!(
                body.await.unwrap_err().status(),
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            );
        }
    }

    #[tokio::test]
    async fn a_zstd_frame_naming_a_window_wider_than_the_limit_is_refused() {
        assert_eq!(window_log(1 << 20), 23);
        assert_eq!(window_log((64 << 20) + 1), 27);
        // A frame with no content size whose window is 2^27 (128 MiB): the header alone would
        // make the decoder allocate it.
        // Magic number; no content size, not a single segment; window 2^(10 + 17); one last
        // raw block of 7 bytes.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 17 << 3];
        frame.extend_from_slice(&[(7 << 3) | 1, 0, 0]);
        frame.extend_from_slice(b"{\"a\":1}");
        let (narrow, wide) = (limits(1 << 20), limits(100 << 20));
        let err = read(Body::from(frame.clone()), Encoding::Zstd, None, &narrow);
        assert_eq!(
            err.await.unwrap_err().status(),
            axum::http::StatusCode::BAD_REQUEST
        );
        // Under a limit that wide, the same frame is read.
        let ok = read(Body::from(frame), Encoding::Zstd, None, &wide);
        assert_eq!(ok.await.unwrap(), &b"{\"a\":1}"[..]);
    }

    #[tokio::test]
    async fn gzip_and_zstd_inflate_under_the_limit() {
        let gz = Body::from(gzip(b"{\"a\":1}"));
        assert_eq!(
            read(gz, Encoding::Gzip, None, &limits(100)).await.unwrap(),
            &b"{\"a\":1}"[..]
        );
        let zs = Body::from(zstd::encode_all(&b"[1,2]"[..], 3).unwrap());
        assert_eq!(
            read(zs, Encoding::Zstd, None, &limits(100)).await.unwrap(),
            &b"[1,2]"[..]
        );
        // Nothing at all is an empty body, for the route to refuse as such, not a broken stream.
        for encoding in [Encoding::Gzip, Encoding::Zstd] {
            let empty = read(Body::empty(), encoding, None, &limits(100)).await;
            assert_eq!(empty.unwrap(), &b""[..]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_in_past_the_deadline_is_408() {
        // Each piece well inside the idle time, the whole past the deadline.
        let every = Duration::from_millis(900);
        let l = limits(100);
        let steady = read(Trickle::body(70, every), Encoding::Identity, None, &l);
        let err = steady.await.unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
        assert!(err.to_string().contains("not complete within 60s"), "{err}");
        let within = read(Trickle::body(50, every), Encoding::Identity, None, &l);
        assert_eq!(within.await.unwrap().len(), 50);
        let stalled = read(
            Trickle::body(2, Duration::from_secs(2)),
            Encoding::Identity,
            None,
            &l,
        );
        let err = stalled.await.unwrap_err();
        assert!(
            err.to_string().contains("no request body data for 1s"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_being_read_share_one_byte_budget() {
        let mut l = limits(100);
        l.buffer = Arc::new(Budget::new(60));
        let every = Duration::from_millis(10);
        let slow = read(Trickle::body(50, every), Encoding::Identity, Some(50), &l);
        let other = async {
            // Once the slow body holds its buffer of 50 bytes, 20 more do not fit.
            tokio::time::sleep(every * 45 + every / 2).await;
            assert_eq!(l.buffer.used(), 50);
            read(Body::from(vec![b'y'; 20]), Encoding::Identity, None, &l).await
        };
        let (slow, other) = tokio::join!(slow, other);
        assert_eq!(slow.unwrap().len(), 50);
        let err = other.unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        // Given back once read.
        assert_eq!(l.buffer.used(), 0);
        let fits = read(Body::from(vec![b'y'; 60]), Encoding::Identity, Some(60), &l);
        assert_eq!(fits.await.unwrap().len(), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_in_pieces_holds_its_buffer_not_what_it_declared() {
        let max = 1 << 20;
        let mut l = limits(max);
        l.buffer = Arc::new(Budget::new(max));
        let every = Duration::from_millis(10);
        // Declares 1 MiB, sends a byte at a time: holds the first buffer, not 1 MiB.
        let slow = read(Trickle::body(50, every), Encoding::Identity, Some(max), &l);
        let watch = async {
            tokio::time::sleep(every * 2 + every / 2).await;
            l.buffer.used()
        };
        let (slow, used) = tokio::join!(slow, watch);
        assert_eq!((slow.unwrap().len(), used), (50, FIRST_BUFFER));
        assert_eq!(l.buffer.used(), 0);
        // A buffer grows by doubling up to the declared length, all of it held, no more.
        let mut held = Held {
            budget: &l.buffer,
            bytes: 0,
        };
        let mut buffer = BytesMut::new();
        let declared = 100_000;
        for need in [1, FIRST_BUFFER + 1, 70_000, declared] {
            grow(&mut buffer, need, declared, &mut held).unwrap();
            buffer.resize(need, 0);
            assert!(buffer.capacity() <= declared, "{}", buffer.capacity());
            assert_eq!(l.buffer.used(), buffer.capacity(), "need {need}");
        }
        assert_eq!(buffer.capacity(), declared);
    }

    #[tokio::test]
    async fn a_compression_bomb_is_413() {
        let bomb = gzip(&vec![b' '; 10 << 20]);
        assert!(bomb.len() < 20_000);
        let err = read(Body::from(bomb), Encoding::Gzip, None, &limits(1 << 20))
            .await
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        let err = read(
            Body::from(b"not gzip".to_vec()),
            Encoding::Gzip,
            None,
            &limits(100),
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
        let mut chunked = HeaderMap::new();
        chunked.insert(header::TRANSFER_ENCODING, "Chunked".parse().unwrap());
        assert_eq!(Encoding::of(&chunked).unwrap(), Encoding::Identity);
        chunked.insert(header::TRANSFER_ENCODING, " , chunked".parse().unwrap());
        assert_eq!(Encoding::of(&chunked).unwrap(), Encoding::Identity);
        for refused in ["gzip, chunked", "chunked, chunked"] {
            chunked.insert(header::TRANSFER_ENCODING, refused.parse().unwrap());
            assert_eq!(
                Encoding::of(&chunked).unwrap_err().status(),
                415,
                "{refused}"
            );
        }
        h.insert(header::CONTENT_ENCODING, "GZIP".parse().unwrap());
        assert_eq!(Encoding::of(&h).unwrap(), Encoding::Gzip);
        h.append(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert_eq!(
            Encoding::of(&h).unwrap_err().status(),
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "two lines, two codings"
        );
        h.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        assert_eq!(
            Encoding::of(&h).unwrap_err().status(),
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }
}
