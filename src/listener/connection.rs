//! Taking connections from the listener and serving each with hyper, and how a connection ends
//! when the server stops.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

use super::stall::Stall;
use super::unread::Unread;
use super::{Limits, Refusals, RequestId, linger, path, refuse};
use crate::auth::ClientSubject;
use crate::tls::Tls;

/// How long (at most: half the shutdown's grace, if that is shorter) a connection that has not
/// brought its first request yet is kept open once the server stops. Its client connected before the listener closed and is sending that request now:
/// closing the connection under it would reset it, and a reset after a request was sent reads
/// as "may have been taken" (to a forwarding peer too, which then answers `504`). Kept open, the
/// request gets its answer: `503`, shutting down.
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// What every connection of one listener is served with.
pub(super) struct Accepting {
    pub http: Arc<http1::Builder>,
    pub router: Router,
    pub limits: Limits,
    pub tls: Option<Arc<Tls>>,
    /// One permit per open connection.
    pub open: Arc<Semaphore>,
    pub refusals: Refusals,
    pub stop: watch::Receiver<bool>,
    /// Raised as the listener stops, for answers to say `Connection: close`.
    pub stopping: Arc<AtomicBool>,
    /// The shutdown's grace for open requests.
    pub grace: Duration,
}

impl Accepting {
    /// Serves `tcp` on a task of its own, or refuses it at the connection cap.
    pub fn take(&mut self, tcp: TcpStream, peer: SocketAddr) {
        let Ok(permit) = self.open.clone().try_acquire_owned() else {
            self.refusals.note();
            // A plain-text answer would be garbage to a TLS client; it just gets the close.
            if self.tls.is_none() {
                tokio::spawn(refuse(tcp));
            }
            return;
        };
        // Replies are small; waiting for Nagle would add tens of milliseconds.
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            http: self.http.clone(),
            router: self.router.clone(),
            peer,
            stop: self.stop.clone(),
            stopping: self.stopping.clone(),
            first_request_wait: FIRST_REQUEST_WAIT.min(self.grace / 2),
        };
        let write_timeout = self.limits.write_timeout;
        match &self.tls {
            None => {
                tokio::spawn(async move {
                    let (io, mut back) = Stall::new(tcp, write_timeout);
                    let unread = connection.serve(TokioIo::new(io), None).await;
                    drop(permit);
                    if let Ok(tcp) = back.try_recv() {
                        linger::linger(tcp, unread).await;
                    }
                });
            }
            Some(tls) => {
                let tls = tls.clone();
                tokio::spawn(serve_tls(tls, tcp, connection, self.limits, permit));
            }
        }
    }

    /// Stops taking connections: answers from now on say `Connection: close`, and the connections
    /// the kernel has completed and the listener not yet accepted are taken (closing the
    /// listener would reset them, after their clients may have sent a request). Each is served
    /// as any other, and its request answered `503` (shutting down).
    pub fn stop(&mut self, listener: tokio::net::TcpListener) {
        self.stopping.store(true, Relaxed);
        let Ok(listener) = listener.into_std() else {
            return;
        };
        while let Ok((tcp, peer)) = listener.accept() {
            let tcp = tcp
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(tcp));
            if let Ok(tcp) = tcp {
                self.take(tcp, peer);
            }
        }
    }
}

async fn serve_tls(
    tls: Arc<Tls>,
    tcp: TcpStream,
    connection: Connection,
    limits: Limits,
    permit: OwnedSemaphorePermit,
) {
    let peer = connection.peer;
    let handshake = tokio::time::timeout(limits.header_read_timeout, tls.acceptor().accept(tcp));
    // A handshake still to come once the server stops gets the first request's wait, as a
    // plain connection's first request does, not the whole handshake timeout (a handshake done
    // within it then gets that wait again for its first request: two at most, in the grace).
    let (mut stop, wait) = (connection.stop.clone(), connection.first_request_wait);
    let stopping = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(wait).await;
    };
    let handshake = tokio::select! {
        done = handshake => done,
        () = stopping => return tracing::debug!(%peer, "TLS handshake not done at the stop"),
    };
    match handshake {
        Ok(Ok(stream)) => {
            let subject = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                // Empty for a subject that is not text: no key's, but a certificate all the same.
                .map(|c| crate::tls::client_subject(c).unwrap_or_default());
            let (io, mut back) = Stall::new(stream, limits.write_timeout);
            let unread = connection.serve(TokioIo::new(io), subject).await;
            drop(permit);
            // Lingering on the socket beneath: what arrives is dropped unread.
            if let Ok(stream) = back.try_recv() {
                linger::linger(stream.into_inner().0, unread).await;
            }
        }
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// What one connection needs to be served.
struct Connection {
    http: Arc<http1::Builder>,
    router: Router,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
    stopping: Arc<AtomicBool>,
    first_request_wait: Duration,
}

impl Connection {
    /// Serves the connection until it ends; true when its last request's body was left
    /// unread (its client may still be sending it).
    async fn serve<IO>(mut self, io: TokioIo<IO>, subject: Option<String>) -> bool
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let router = self.router;
        let stopping = self.stopping;
        let first = Arc::new(FirstRequest::default());
        let seen = first.clone();
        let unread = Unread::default();
        let last = unread.clone();
        // Every response carries the request's id. A plain function around the router rather
        // than a layer on it, which would box a future per request.
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            seen.note();
            let (mut request, has_body) = unread.track(request);
            let unread = has_body.then(|| unread.clone());
            path::normalize(request.uri_mut());
            let id = RequestId::of(request.headers());
            let extensions = request.extensions_mut();
            extensions.insert(id.clone());
            extensions.insert(ConnectInfo::<SocketAddr>(peer));
            if let Some(subject) = &subject {
                extensions.insert(ClientSubject(subject.clone()));
            }
            // A client that keeps the connection would send its next request into the close
            // that follows: told now, it opens a new one (and finds the node gone). A request
            // already open at the stop is told by hyper (the graceful shutdown below). So is one
            // whose body was refused before it was read (see `unread`).
            let closing = stopping.load(Relaxed);
            let version = request.version();
            let expects_continue =
                has_body && request.headers().contains_key(axum::http::header::EXPECT);
            let answer = router.clone().oneshot(request);
            async move {
                let mut response = answer.await?;
                let headers = response.headers_mut();
                headers.entry(super::REQUEST_ID).or_insert(id.0);
                let unsettled = match unread {
                    Some(unread) if !closing => !unread.settled(expects_continue).await,
                    // Closing anyway: a body left unread is dropped, for hyper to close on.
                    Some(unread) => {
                        drop(unread.take());
                        false
                    }
                    None => false,
                };
                if closing || unsettled {
                    headers.insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                // An HTTP/1.0 client asked to keep the connection, and an answer that says
                // `close` as HTTP/1.1 would get hyper's `keep-alive` beside it; as HTTP/1.0 it
                // only closes.
                if version == axum::http::Version::HTTP_10
                    && response.headers().get(axum::http::header::CONNECTION)
                        == Some(&axum::http::HeaderValue::from_static("close"))
                {
                    *response.version_mut() = axum::http::Version::HTTP_10;
                }
                Ok::<_, Infallible>(response)
            }
        });
        let connection = self.http.serve_connection(io, service);
        tokio::pin!(connection);
        let stopping = async {
            let _ = self.stop.wait_for(|stopped| *stopped).await;
            if !first.seen.load(Relaxed) {
                let came = first.came.notified();
                let _ = tokio::time::timeout(self.first_request_wait, came).await;
            }
        };
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = stopping => {
                // An idle connection closes now; one with a request open answers it first.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        // Not every error means input is left: an idle connection ends with hyper's header
        // timeout. What hyper refused itself (a bad head, one too large) is found by the peek
        // at the socket before it closes.
        if let Err(error) = &ended {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
        last.pending()
    }
}

/// Whether a connection has brought a request yet, and a wake-up when its first one comes.
#[derive(Default)]
struct FirstRequest {
    seen: AtomicBool,
    came: Notify,
}

impl FirstRequest {
    fn note(&self) {
        // A load per request; the store and the wake-up only for the first.
        if !self.seen.load(Relaxed) {
            self.seen.store(true, Relaxed);
            self.came.notify_one();
        }
    }
}
