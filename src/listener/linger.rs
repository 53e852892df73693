//! Lingering close. A socket closed with input still unread sends a reset, and a reset can
//! overtake the answer written just before it: a client still sending a body that was refused
//! before it was read (401, 413, 415, a 503 at the connection cap) sees a broken connection
//! instead of its answer, which the status-code contract reads as "maybe written". So once its
//! answer is out, a connection's write side is shut, and what the client still sends is read
//! and dropped until it closes too, or for a bounded time.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Shuts the write side of `tcp` (if hyper did not), then reads and drops what the client
/// sends until it closes, or [`LINGER_FOR`] and [`LINGER_BYTES`] run out.
pub async fn linger(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    drain(tcp, &LINGERING, LINGERING_MAX).await;
}

/// Connections lingering now (and refused ones draining): a process about to exit waits for
/// them, since dropping one with input unread sends the reset lingering is there to avoid.
pub fn lingering() -> usize {
    LINGERING.load(Relaxed) + REFUSED.load(Relaxed)
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
