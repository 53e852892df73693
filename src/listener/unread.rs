//! Answers given before a request's body was read to its end (a refusal of the topic, the key,
//! the declared length, an unknown path) say `Connection: close`. hyper closes such a connection
//! after the answer, since it cannot tell where the next request starts, but says so only when
//! it knew before writing the head. A client told nothing keeps the connection and sends its
//! next request into the close, and a request sent into a reset reads as "maybe written".

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};

use axum::extract::Request;
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

/// One connection's note of whether the body of its request in progress was read to its end
/// (hyper serves a connection's requests one at a time).
#[derive(Clone, Default)]
pub struct Unread(Arc<AtomicBool>);

impl Unread {
    /// `request` with its body tracked, and whether it has a body at all.
    pub fn track(&self, request: Request<Incoming>) -> (Request<Tracked>, bool) {
        let has_body = !request.body().is_end_stream();
        self.0.store(!has_body, Relaxed);
        let read = self.0.clone();
        (request.map(|inner| Tracked { inner, read }), has_body)
    }

    /// Whether the body of the request in progress was left unread (in part or whole).
    pub fn left(&self) -> bool {
        !self.0.load(Relaxed)
    }
}

/// A request body that notes when it has been read to its end.
pub struct Tracked {
    inner: Incoming,
    read: Arc<AtomicBool>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.read.store(true, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
