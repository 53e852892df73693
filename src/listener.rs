//! The accept loop: HTTP/1.1 connections served by hyper with kafboy's limits on them. Slow
//! headers are cut off (slowloris), so are clients that stop taking their answers, header floods
//! get 431 from hyper, and past the connection cap a new connection gets a 503 and is closed at
//! once instead of waiting in the backlog.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::throttle::{Level, Throttle, throttled};
use crate::tls::Tls;

mod connection;
mod cors;
mod linger;
pub(crate) mod path;
mod request_id;
mod stall;
mod unread;

pub use cors::Cors;

pub use request_id::{REQUEST_ID, RequestId};

/// Connection limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a request's headers, idle keep-alive time included.
    pub header_read_timeout: Duration,
    /// Most header fields in a request.
    pub max_headers: usize,
    /// Most bytes of request line plus headers.
    pub max_header_bytes: usize,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Longest a write of an answer may make no progress; then the connection is closed.
    pub write_timeout: Duration,
}

const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 33\r\nx-request-id: ";
const TOO_MANY_BODY: &[u8] = b"\r\n\r\n{\"error\":\"too many connections\"}\n";

/// hyper's default `max_headers`.
const HYPER_MAX_HEADERS: usize = 100;

/// What a listener's drain left.
pub struct Drained {
    /// Every connection finished within the grace.
    pub in_time: bool,
    open: Arc<Semaphore>,
    max: usize,
}

impl Drained {
    /// Waits, at most `wait`, for the connections still open to finish and close. After the
    /// final flush most requests still running are answered at once (`503`: the producers
    /// are closed), and the process must not exit before those answers are out.
    pub async fn settle(&self, wait: Duration) {
        let settled = async {
            for permits in all_closed(&self.open, self.max).await {
                permits.forget();
            }
            // Then their lingering closes (polled: a second at most, once per process).
            while linger::lingering() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(wait, settled).await;
    }
}

/// Warns at start when the process may open fewer files than `connections` (the open
/// connections all listeners may hold) and a margin (the 320 connections that may be
/// lingering, the brokers' sockets, the spool, the log): past its open-file limit kafboy cannot
/// accept a connection, even to refuse it with `503`, so a client waits unanswered. Linux only
/// (`/proc/self/limits`).
pub fn warn_if_few_files(connections: usize) {
    const MARGIN: u64 = 400;
    let Some(limit) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| open_files(&text))
    else {
        return;
    };
    let wanted = (connections as u64).saturating_add(MARGIN);
    if limit < wanted {
        tracing::warn!(
            limit,
            wanted,
            "the open-file limit is below server.max_connections and a margin: past it clients wait \
             unanswered instead of getting 503; raise it (LimitNOFILE=, ulimit -n) or lower \
             server.max_connections (this process's limit: check-config run from a shell has the \
             shell's, which a service manager may set otherwise)"
        );
    }
}

/// The soft limit of open files in the text of `/proc/self/limits`, unless unlimited.
fn open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Serves `router` on `listener` until `stop` turns true, then lets open connections finish
/// their requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> Drained {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    // hyper's own limit is 100. Setting any limit makes it build two 100-slot arrays element by
    // element for every request (1.6k instructions) instead of leaving them uninitialized.
    if limits.max_headers != HYPER_MAX_HEADERS {
        http.max_headers(limits.max_headers);
    }
    let mut accepting = connection::Accepting {
        http: Arc::new(http),
        router,
        limits,
        tls,
        open: open.clone(),
        refusals: Refusals::default(),
        stop: stop.clone(),
        stopping: Arc::default(),
        grace,
    };
    let stopped = async move {
        let mut stop = stop;
        // The guard `wait_for` returns must not be held across the loop's awaits.
        let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
    };
    tokio::pin!(stopped);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning, and a
                    // line a second, not one per pause, while it lasts.
                    throttled!(warn, "accept failed", %error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        accepting.take(tcp, peer);
    }
    accepting.stop(listener);
    let max = limits.max_connections;
    let in_time = tokio::time::timeout(grace, all_closed(&open, max))
        .await
        .is_ok();
    Drained { in_time, max, open }
}

/// Waits until every connection of `max` slots has closed, and keeps their slots.
async fn all_closed(open: &Semaphore, max: usize) -> Vec<tokio::sync::SemaphorePermit<'_>> {
    let mut permits = Vec::new();
    let mut left = max;
    while left > 0 {
        let n = u32::try_from(left).unwrap_or(u32::MAX);
        if let Ok(permit) = open.acquire_many(n).await {
            permits.push(permit);
        }
        left -= n as usize;
    }
    permits
}

async fn refuse(mut tcp: TcpStream) {
    // The request is not read, so the id is a new one, as for any request without its own.
    let answer = [TOO_MANY, &crate::hex64(rand::random())[..], TOO_MANY_BODY].concat();
    let _ = tcp.write_all(&answer).await;
    let _ = tcp.shutdown().await;
    linger::refused(tcp).await;
}

/// Connections refused at `server.max_connections`: counted, and logged at most once a second
/// with the count of lines left out (told on a line of its own if no refusal follows).
pub(crate) struct Refusals(Throttle);

impl Default for Refusals {
    fn default() -> Self {
        let what = "connections refused";
        Refusals(Throttle::new(
            Duration::from_secs(1),
            Level::Warn,
            what,
            None,
        ))
    }
}

impl Refusals {
    fn note(&self) {
        ::metrics::counter!(crate::metrics::CONNECTIONS_REFUSED).increment(1);
        if let Some(suppressed) = self.0.pass() {
            tracing::warn!(
                suppressed,
                "connections refused: server.max_connections are open"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95088                95088                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(open_files(unlimited), None);
        assert_eq!(open_files(""), None);
    }
}
