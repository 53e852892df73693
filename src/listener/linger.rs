//! Lingering close. A socket closed with input still unread sends a reset, and a reset can
//! overtake the answer written just before it: a client still sending a body that was refused
//! before it was read (401, 413, 415, a 503 at the connection cap) sees a broken connection
//! instead of its answer, which the status-code contract reads as "maybe written". So once its
//! answer is out, a connection's write side is shut, and what the client still sends is read
//! and dropped until it closes too, or for a bounded time.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Connections lingering at once, after their answers and after a refusal at the connection
/// cap (kept apart, so a flood of refused connections cannot take the others' room); past it a
/// connection closes at once. Each holds a descriptor for at most [`LINGER_FOR`].
const LINGERING_MAX: usize = 256;
const REFUSED_MAX: usize = 64;
static LINGERING: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);
/// How long a connection's input is read and dropped, and how much of it: enough for a client
/// to finish sending a body several times `server.max_body_bytes` and read its answer.
const LINGER_FOR: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 << 20;

/// `io`, handed back through a channel when hyper drops it (hyper drops its connection's
/// stream as soon as it is done), so the connection can close lingering ([`linger`]).
pub struct Returned<IO> {
    io: Option<IO>,
    back: Option<oneshot::Sender<IO>>,
}

/// `io` wrapped, and where it comes back once hyper is done with it.
pub fn returned<IO>(io: IO) -> (Returned<IO>, oneshot::Receiver<IO>) {
    let (tx, rx) = oneshot::channel();
    let io = Returned {
        io: Some(io),
        back: Some(tx),
    };
    (io, rx)
}

impl<IO> Drop for Returned<IO> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            let _ = back.send(io);
        }
    }
}

impl<IO> Returned<IO> {
    /// The stream; gone only once the wrapper is being dropped.
    fn io(&mut self) -> io::Result<&mut IO> {
        self.io
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Returned<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.io()?).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Returned<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.io()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.io()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io()?).poll_shutdown(cx)
    }
}

/// Shuts the write side of `tcp` (if hyper did not), then reads and drops what the client
/// sends until it closes, or [`LINGER_FOR`] and [`LINGER_BYTES`] run out.
pub async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    drain(tcp, &LINGERING, LINGERING_MAX).await;
}

/// The same for a connection refused at the cap, whose answer is written and shut already.
pub async fn refused(tcp: TcpStream) {
    drain(tcp, &REFUSED, REFUSED_MAX).await;
}

/// Reads and drops what the client sends on `tcp`, as [`linger`] does, if one of `max` slots
/// counted in `taken` is free.
async fn drain(mut tcp: TcpStream, taken: &'static AtomicUsize, max: usize) {
    // Given back however the task ends (a runtime shutting down drops it mid-drain).
    struct Slot(&'static AtomicUsize);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Relaxed);
        }
    }
    let _slot = Slot(taken);
    if taken.fetch_add(1, Relaxed) >= max {
        return;
    }
    // On the heap, and only now: a buffer in the future's state would be part of every
    // connection's task, for the connection's whole life.
    let mut buf = vec![0u8; 8192];
    let mut read = 0;
    let reading = async {
        while read < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_FOR, reading).await;
}
