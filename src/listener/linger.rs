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
/// on a fast link to finish sending a body of the default `server.max_body_bytes` (1 MB) and
/// read its answer; on a link under 4 Mbit/s, or with larger bodies, the rest is reset.
const LINGER_FOR: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 << 20;

/// Shuts the write side of `tcp` (if hyper did not), then reads and drops what the client
/// sends until it closes, or [`LINGER_FOR`] and [`LINGER_BYTES`] run out. Only when the client
/// may still be sending: `unread`, its last request's body was not read to its end, or input is
/// waiting now. An idle connection closed by its timeout takes no slot: with slots held by
/// those, a refused upload would be reset.
pub async fn linger(mut tcp: TcpStream, unread: bool) {
    let _ = tcp.shutdown().await;
    if !unread {
        match input_waiting(tcp) {
            Some(waiting) => tcp = waiting,
            None => return,
        }
    }
    drain(tcp, &LINGERING, LINGERING_MAX).await;
}

/// `tcp` back if its client has sent what is not read yet: a peek at the socket itself (it is
/// non-blocking). tokio's `try_read` would answer from the readiness it last saw, and miss
/// input that came since. None when nothing waits, the client closed, or the socket failed.
fn input_waiting(tcp: TcpStream) -> Option<TcpStream> {
    let tcp = tcp.into_std().ok()?;
    match tcp.peek(&mut [0u8; 1]) {
        Ok(n) if n > 0 => TcpStream::from_std(tcp).ok(),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap().0, client)
    }

    #[tokio::test]
    async fn only_a_connection_whose_client_may_still_send_lingers() {
        // Idle, its requests read: closed at once, with the client still connected.
        let (server, _client) = pair().await;
        // Well short of LINGER_FOR, with room for a busy machine.
        tokio::time::timeout(Duration::from_millis(1500), linger(server, false))
            .await
            .expect("an idle connection lingered");
        // Input waiting, or a body left unread: read until the client closes.
        for waiting in [true, false] {
            let (server, mut client) = pair().await;
            if waiting {
                // On loopback the bytes are in the server's socket when the write returns; the
                // server's task has not seen them (its readiness is not updated).
                client.write_all(b"more").await.unwrap();
            }
            let lingering = tokio::spawn(linger(server, !waiting));
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!lingering.is_finished(), "waiting {waiting}");
            drop(client);
            tokio::time::timeout(Duration::from_secs(1), lingering)
                .await
                .unwrap()
                .unwrap();
        }
    }
}
