//! Lingering close. A socket closed with input still unread sends a reset, and a reset can
//! overtake the answer written just before it: a client still sending a body that was refused
//! before it was read (401, 413, 415, a 503 at the connection cap) sees a broken connection
//! instead of its answer, which the status-code contract reads as "maybe written". So once its
//! answer is out, a connection's write side is shut, and what the client still sends is read
//! and dropped until it closes too, or for a bounded time.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Connections lingering at once; past it a connection closes at once. Each holds a
/// descriptor for at most [`LINGER_FOR`].
const LINGERING_MAX: usize = 256;
static LINGERING: AtomicUsize = AtomicUsize::new(0);
/// How long a connection's input is read and dropped, and how much of it: enough for a client
/// to finish sending a body several times `server.max_body_bytes` and read its answer.
const LINGER_FOR: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 << 20;

/// A second handle on `tcp`'s socket, which keeps the socket open once `tcp` is dropped (hyper
/// drops its connection's stream as soon as it is done), for [`linger`]. It shares the
/// socket's non-blocking mode.
pub fn spare(tcp: &TcpStream) -> Option<std::net::TcpStream> {
    use std::os::fd::AsFd;
    tcp.as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::net::TcpStream::from)
}

/// Shuts the write side of `spare`'s socket (if hyper did not), then reads and drops what the
/// client sends until it closes, or [`LINGER_FOR`] and [`LINGER_BYTES`] run out.
pub async fn linger(spare: std::net::TcpStream) {
    let _ = spare.shutdown(std::net::Shutdown::Write);
    if let Ok(tcp) = TcpStream::from_std(spare) {
        drain(tcp).await;
    }
}

/// Reads and drops what the client sends on `tcp`, as [`linger`] does.
pub async fn drain(mut tcp: TcpStream) {
    // Given back however the task ends (a runtime shutting down drops it mid-drain).
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            LINGERING.fetch_sub(1, Relaxed);
        }
    }
    let _slot = Slot;
    if LINGERING.fetch_add(1, Relaxed) >= LINGERING_MAX {
        return;
    }
    let mut buf = [0u8; 8192];
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
