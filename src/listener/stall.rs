//! A connection's stream as hyper sees it: writes under a deadline, and the stream handed back
//! when hyper drops it. hyper times out reading a request's head, not writing its answer: a
//! client that sends requests (pipelined, say) and never reads the answers would keep its
//! connection, and its place under `server.max_connections`, for as long as it liked. And hyper
//! drops its connection's stream as soon as it is done, where the connection should close
//! lingering (`linger`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::Sleep;

/// `io`, failing a write or flush that cannot make progress for `limit`, and sent back when
/// dropped.
pub struct Stall<IO> {
    /// Gone only once the wrapper is being dropped.
    io: Option<IO>,
    back: Option<oneshot::Sender<IO>>,
    limit: Duration,
    /// Armed by the first write that has to wait, dropped by any progress.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<IO> Stall<IO> {
    /// `io` wrapped, and where it comes back once hyper is done with it.
    pub fn new(io: IO, limit: Duration) -> (Stall<IO>, oneshot::Receiver<IO>) {
        let (back, rx) = oneshot::channel();
        let stall = Stall {
            io: Some(io),
            back: Some(back),
            limit,
            deadline: None,
        };
        (stall, rx)
    }

    fn io(&mut self) -> io::Result<&mut IO> {
        self.io
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// What a write that returned `poll` comes to under the deadline.
    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.deadline = None;
            return poll;
        }
        let limit = self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took none of its answer for server.write_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO> Drop for Stall<IO> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            let _ = back.send(io);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Stall<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.io()?).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Stall<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(self.io()?).poll_write(cx, buf);
        self.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(self.io()?).poll_write_vectored(cx, bufs);
        self.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(self.io()?).poll_flush(cx);
        self.guard(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(self.io()?).poll_shutdown(cx);
        self.guard(cx, poll)
    }
}
