//! The accept loop: HTTP/1.1 connections served by hyper with kafboy's limits on them. Slow
//! headers are cut off (slowloris), so are clients that stop taking their answers, header floods
//! get 431 from hyper, and past the connection cap a new connection gets a 503 and is closed at
//! once instead of waiting in the backlog.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use crate::auth::ClientSubject;
use crate::tls::Tls;

mod cors;
mod linger;
pub(crate) mod path;
mod request_id;
mod stall;

pub use cors::Cors;

pub use request_id::{REQUEST_ID, RequestId};
use stall::Stall;

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
            let mut left = self.max;
            while left > 0 {
                let n = u32::try_from(left).unwrap_or(u32::MAX);
                if let Ok(permits) = self.open.acquire_many(n).await {
                    permits.forget();
                }
                left -= n as usize;
            }
            // Then their lingering closes (polled: a second at most, once per process).
            while linger::lingering() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(wait, settled).await;
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open connections finish
/// their requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Drained {
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = Refusals::default();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    // hyper's own limit is 100. Setting any limit makes it build two 100-slot arrays element by
    // element for every request (1.6k instructions) instead of leaving them uninitialized.
    if limits.max_headers != HYPER_MAX_HEADERS {
        http.max_headers(limits.max_headers);
    }
    let http = Arc::new(http);
    let stopped = async move {
        // The guard `wait_for` returns must not be held across the loop's awaits.
        let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
    };
    tokio::pin!(stopped);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refusals.note();
            // A plain-text answer would be garbage to a TLS client; it just gets the close.
            if tls.is_none() {
                tokio::spawn(refuse(tcp));
            }
            continue;
        };
        // Replies are small; waiting for Nagle would add tens of milliseconds.
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            http: http.clone(),
            router: router.clone(),
            peer,
            watcher: graceful.watcher(),
        };
        let handshake = limits.header_read_timeout;
        let write_timeout = limits.write_timeout;
        match &tls {
            None => {
                tokio::spawn(async move {
                    let (io, mut back) = Stall::new(tcp, write_timeout);
                    let io = TokioIo::new(io);
                    connection.serve(io, None).await;
                    drop(permit);
                    if let Ok(tcp) = back.try_recv() {
                        linger::linger(tcp).await;
                    }
                });
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let subject = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                // Empty for a subject that is not text: no key's, but a
                                // certificate all the same.
                                .map(|c| crate::tls::client_subject(c).unwrap_or_default());
                            let (io, mut back) = Stall::new(stream, write_timeout);
                            let io = TokioIo::new(io);
                            connection.serve(io, subject).await;
                            drop(permit);
                            // Lingering on the socket beneath: what arrives is dropped unread.
                            if let Ok(stream) = back.try_recv() {
                                linger::linger(stream.into_inner().0).await;
                            }
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    let in_time = tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_ok();
    Drained {
        in_time,
        max: limits.max_connections,
        open,
    }
}

/// What one connection needs to be served.
struct Connection {
    http: Arc<http1::Builder>,
    router: Router,
    peer: SocketAddr,
    watcher: Watcher,
}

impl Connection {
    async fn serve<IO>(self, io: TokioIo<IO>, subject: Option<String>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let router = self.router;
        // Every response carries the request's id. A plain function around the router rather
        // than a layer on it, which would box a future per request.
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            path::normalize(request.uri_mut());
            let id = RequestId::of(request.headers());
            let extensions = request.extensions_mut();
            extensions.insert(id.clone());
            extensions.insert(ConnectInfo::<SocketAddr>(peer));
            if let Some(subject) = &subject {
                extensions.insert(ClientSubject(subject.clone()));
            }
            let answer = router.clone().oneshot(request);
            async move {
                let mut response = answer.await?;
                response.headers_mut().entry(REQUEST_ID).or_insert(id.0);
                Ok::<_, Infallible>(response)
            }
        });
        let connection = self.watcher.watch(self.http.serve_connection(io, service));
        if let Err(error) = connection.await {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    }
}

async fn refuse(mut tcp: TcpStream) {
    // The request is not read, so the id is a new one, as for any request without its own.
    let answer = [TOO_MANY, &crate::hex64(rand::random())[..], TOO_MANY_BODY].concat();
    let _ = tcp.write_all(&answer).await;
    let _ = tcp.shutdown().await;
    linger::refused(tcp).await;
}

/// Connections refused at the cap: counted, and logged at most once a second, so a flood of
/// connections is not a flood of log lines.
#[derive(Default)]
struct Refusals {
    unlogged: u64,
    logged_at: Option<std::time::Instant>,
}

impl Refusals {
    fn note(&mut self) {
        ::metrics::counter!(crate::metrics::CONNECTIONS_REFUSED).increment(1);
        self.unlogged += 1;
        if self
            .logged_at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(
                refused = self.unlogged,
                "connections refused: server.max_connections are open"
            );
            self.unlogged = 0;
            self.logged_at = Some(std::time::Instant::now());
        }
    }
}
