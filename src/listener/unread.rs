//! Answers given before a request's body was read to its end (a refusal of the topic, the key,
//! the declared length, an unknown path). hyper cannot tell where the next request on the
//! connection starts then, so it closes the connection after the answer; but it says so in the
//! answer only when it knew before writing the head, and a client told nothing sends its next
//! request into the close (a request sent into a reset reads as "maybe written"). So a small
//! body left unread is read and dropped first, keeping the connection (a client refused `429`
//! need not connect again for its retry); else the answer says `Connection: close`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
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
    /// The body of the request in progress is not read to its end yet (false with no request).
    pending: AtomicBool,
    left: Mutex<Option<Incoming>>,
}

impl Unread {
    /// `request` with its body tracked, and whether it has a body at all.
    pub fn track(&self, request: Request<Incoming>) -> (Request<Tracked>, bool) {
        let has_body = !request.body().is_end_stream();
        self.0.pending.store(has_body, Relaxed);
        let note = self.0.clone();
        let tracked = request.map(|inner| Tracked {
            inner: Some(inner),
            note,
        });
        (tracked, has_body)
    }

    /// Whether the body of the request in progress (or the last one) was left unread.
    pub fn pending(&self) -> bool {
        self.0.pending.load(Relaxed)
    }

    /// Whether the connection can go on after the answer: the body of the request in progress
    /// was read to its end, or what was left of it is, now, within [`DRAIN_BYTES`] and
    /// [`DRAIN_FOR`].
    pub async fn settled(&self) -> bool {
        if !self.pending() {
            return true;
        }
        let Some(mut body) = crate::lock(&self.0.left).take() else {
            // Still held by the handler (or a task it started).
            return false;
        };
        if body.size_hint().upper().is_none_or(|n| n > DRAIN_BYTES) {
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
}

/// A request body that notes when it has been read to its end, and is left to its connection
/// when it was not.
pub struct Tracked {
    /// Taken only by `drop`.
    inner: Option<Incoming>,
    note: Arc<Note>,
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
        if matches!(polled, Poll::Ready(None)) || inner.is_end_stream() {
            this.note.pending.store(false, Relaxed);
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
        if self.note.pending.load(Relaxed) {
            *crate::lock(&self.note.left) = self.inner.take();
        }
    }
}
