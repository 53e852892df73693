//! Answers given before a request's body was read to its end (a refusal of the topic, the key,
//! the declared length, an unknown path). hyper cannot tell where the next request on the
//! connection starts then, so it closes the connection after the answer; but it says so in the
//! answer only when it knew before writing the head, and a client told nothing sends its next
//! request into the close (a request sent into a reset reads as "maybe written"). So a small
//! body left unread is read and dropped first, keeping the connection (a client refused `429`
//! need not connect again for its retry); else the answer says `Connection: close`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

/// The most of a body left unread that is read and dropped to keep its connection.
const DRAIN_BYTES: u64 = 64 << 10;
/// How long the answer waits for the rest of such a body.
const DRAIN_FOR: Duration = Duration::from_millis(10);

/// One connection's note of its request in progress (hyper serves a connection's requests one
/// at a time): whether its body was read to its end, and the body, if a handler left it.
#[derive(Clone, Default)]
pub struct Unread(Arc<Note>);

#[derive(Default)]
struct Note {
    /// The request in progress: a body's notes about an earlier one (held by a task past its
    /// answer) are ignored.
    request: AtomicU64,
    /// Its body is not read to its end yet (false with no request).
    pending: AtomicBool,
    /// Reading its body failed (broken framing, a client gone): hyper closes the connection,
    /// and no drain can keep it, though the broken body reads as ended from then on.
    broken: AtomicBool,
    /// Its body, left by the handler, until the answer takes it; and the last request whose
    /// answer did (a body dropped after that is dropped, not left).
    left: Mutex<Left>,
}

#[derive(Default)]
struct Left {
    body: Option<Incoming>,
    taken_for: u64,
}

impl Unread {
    /// `request` with its body tracked, and whether it has a body at all.
    pub fn track(&self, request: Request<Incoming>) -> (Request<Tracked>, bool) {
        let has_body = !request.body().is_end_stream();
        let number = self.0.request.fetch_add(1, Relaxed) + 1;
        self.0.pending.store(has_body, Relaxed);
        self.0.broken.store(false, Relaxed);
        let note = self.0.clone();
        let tracked = request.map(|inner| Tracked {
            inner: Some(inner),
            note,
            number,
        });
        (tracked, has_body)
    }

    /// Whether the body of the request in progress (or the last one) was left unread.
    pub fn pending(&self) -> bool {
        self.0.pending.load(Relaxed)
    }

    /// Whether the connection can go on after the answer: the body of the request in progress
    /// was read to its end, or what was left of it is, now, within [`DRAIN_BYTES`] and
    /// [`DRAIN_FOR`]. Not for a request that announced `Expect: 100-continue`: reading its
    /// body would ask the client to send what is refused.
    pub async fn settled(&self, expects_continue: bool) -> bool {
        // A body read to its end is never left: no lock for the usual request.
        if !self.pending() {
            return true;
        }
        if self.0.broken.load(Relaxed) {
            drop(self.take());
            return false;
        }
        let left = self.take();
        // Without the body (still held by the handler, or a task it started), or with a body
        // it must not ask for, the connection closes.
        let Some(mut body) = left.filter(|_| !expects_continue) else {
            return false;
        };
        if body.size_hint().lower() > DRAIN_BYTES {
            return false;
        }
        let drain = async {
            let mut seen = 0;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return false };
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > DRAIN_BYTES {
                    return false;
                }
            }
            true
        };
        let drained = tokio::time::timeout(DRAIN_FOR, drain).await == Ok(true);
        if drained {
            self.0.pending.store(false, Relaxed);
        }
        drained
    }

    /// Takes the body left for the request in progress, and keeps any body of it dropped from
    /// now on from being left: a body nobody reads or drops stops hyper reading the connection,
    /// which then never ends.
    pub fn take(&self) -> Option<Incoming> {
        let mut left = crate::lock(&self.0.left);
        left.taken_for = self.0.request.load(Relaxed);
        left.body.take()
    }
}

/// A request body that notes when it has been read to its end, and is left to its connection
/// when it was not.
pub struct Tracked {
    /// Taken only by `drop`.
    inner: Option<Incoming>,
    note: Arc<Note>,
    /// Which of the connection's requests it is the body of.
    number: u64,
}

impl Tracked {
    /// Whether this is the body of the connection's request in progress.
    fn current(&self) -> bool {
        self.note.request.load(Relaxed) == self.number
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let ended = matches!(polled, Poll::Ready(None)) || inner.is_end_stream();
        let failed = matches!(polled, Poll::Ready(Some(Err(_))));
        if (failed || ended) && this.current() {
            if failed {
                this.note.broken.store(true, Relaxed);
            } else {
                this.note.pending.store(false, Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|i| i.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |i| i.size_hint())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.note.pending.load(Relaxed) || !self.current() {
            return;
        }
        let mut left = crate::lock(&self.note.left);
        if left.taken_for < self.number {
            left.body = self.inner.take();
        }
    }
}
