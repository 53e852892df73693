//! Handing a request to a peer and relaying its answer.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::{Cluster, HOP};
use crate::error::IngestError;

impl Cluster {
    /// Sends the request to `peer` and relays its answer. `None` when the peer did not take it:
    /// unreachable, or it answered one of the refusals that write nothing and are not about
    /// the request itself ([`declined`]). The caller then serves the
    /// request itself, as it would have without the peer.
    pub async fn forward(
        &self,
        peer: String,
        method: Method,
        uri: &Uri,
        headers: &HeaderMap,
        request_id: Option<&HeaderValue>,
        body: Bytes,
    ) -> Option<Response> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = self
            .client
            .request(method, format!("{peer}{path}"))
            .timeout(self.forward_timeout);
        for (name, value) in headers {
            // The request's id goes as kafboy settled it (the client's, when it was usable).
            if !hop_by_hop(name) && *name != crate::listener::REQUEST_ID {
                request = request.header(name, value);
            }
        }
        // So the peer's log names the id the client gets back.
        if let Some(id) = request_id {
            request = request.header(crate::listener::REQUEST_ID, id);
        }
        request = request
            .header(HOP, &self.name)
            .header(header::CONNECTION, "close")
            .body(body);
        match request.send().await {
            Ok(answer) if declined(answer.status()) => {
                let status = answer.status();
                tracing::debug!(%peer, %status, "peer declined a forwarded request");
                // Full or stopping, or behind something that sends requests elsewhere: not
                // asked again until its next check. (Not for a 429: one key's own bucket may be
                // empty there, and the peer serves every other key.)
                if status == StatusCode::SERVICE_UNAVAILABLE || status.is_redirection() {
                    self.mark(&peer, false, 0.0);
                }
                if status.is_redirection() {
                    crate::throttle::throttled!(warn, "peer redirects forwarded requests; check its URL", %peer, %status);
                }
                None
            }
            Ok(answer) => Some(relay(answer).await),
            Err(error) => {
                self.mark(&peer, false, 0.0);
                // A peer at its connection cap, as a declined request is.
                if never_sent(&error) {
                    tracing::debug!(%peer, error = %causes(&error), "peer refused a forward before it was sent");
                    return None;
                }
                tracing::warn!(%peer, error = %causes(&error), "forwarding failed");
                // Only a request that never reached the peer (no connection) was certainly not
                // taken; the caller may then serve it. Once it was sent, a timeout, a reset or
                // an answer cut short may follow a produce on the peer: 504, never a second try.
                if error.is_connect() || error.is_builder() {
                    return None;
                }
                let what = if error.is_timeout() {
                    "did not answer in time"
                } else {
                    "failed before its answer was complete"
                };
                let e = IngestError::Unknown(format!(
                    "peer {peer} {what}; the record may have been written there"
                ));
                Some(e.into_response())
            }
        }
    }
}

/// Whether the request failed before all of it was written to the connection, so the peer
/// cannot have taken it (a kafboy node produces nothing before a request's whole body is in):
/// - the peer sent something before the request went out (a peer at its connection cap writes
///   its `503` as it accepts), and hyper gave the connection up with the request unwritten:
///   an unexpected message (hyper-util, when the request came back to it unsent, says
///   `Canceled`); neither kind is exposed but in its message. A fresh connection carries one
///   request, so an unexpected message cannot be an answer to it;
/// - a write met a closed connection (`EPIPE`): bytes of the request were still to go. Once
///   they were all written no write is left to fail, whatever the peer did with them.
fn never_sent(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        let unsent = if let Some(e) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            e.to_string() == "client error (Canceled)"
        } else if let Some(e) = e.downcast_ref::<std::io::Error>() {
            e.kind() == std::io::ErrorKind::BrokenPipe
        } else {
            e.to_string() == "received unexpected message from connection"
        };
        if unsent {
            return true;
        }
        source = e.source();
    }
    false
}

/// The error and its causes, one after another: reqwest's own message says only "error sending
/// request".
fn causes(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A peer's answer that says nothing was written there and this node, which admitted the
/// request, may serve it: the peer is full, not ready or shutting down, over its own rate
/// limit, does not (yet) know the key or the topic (a key file or metadata not reloaded
/// there yet), or refused the headers before reading the request; or a redirect, which no
/// kafboy node answers (something in front of the peer sent the request elsewhere, and a
/// client told of it would not know where: the answer does not carry its `Location`).
pub(crate) fn declined(status: StatusCode) -> bool {
    status.is_redirection()
        || [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::UNAUTHORIZED,
            StatusCode::FORBIDDEN,
            StatusCode::NOT_FOUND,
            // The few headers forwarding adds took the request past the peer's header limit.
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ]
        .contains(&status)
}

fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "host"
            | "content-length"
            | "content-encoding"
            | "proxy-connection"
    )
}

/// Longest answer relayed from a peer: kafboy's own are small, a hook's reply may not be.
const RELAY_MAX: usize = 16 << 20;

async fn relay(answer: reqwest::Response) -> Response {
    let status = answer.status();
    let keep = [
        header::CONTENT_TYPE,
        header::RETRY_AFTER,
        header::WWW_AUTHENTICATE,
        header::ALLOW,
    ];
    let headers: Vec<(HeaderName, HeaderValue)> = keep
        .iter()
        .filter_map(|h| answer.headers().get(h).map(|v| (h.clone(), v.clone())))
        .collect();
    let mut response = match super::capped(answer, RELAY_MAX).await {
        Ok(body) => (status, body).into_response(),
        // The status came and its body did not. A 2xx without its body (the sync offsets) is
        // a 504: the peer took the record. Any other status keeps its meaning.
        Err(error) if status.is_success() => {
            return IngestError::Unknown(format!(
                "the peer accepted the request but its answer was cut short ({error}); \
                 the record may have been written"
            ))
            .into_response();
        }
        Err(error) => crate::server::json(
            status,
            &serde_json::json!({ "error": format!("peer answered {status}; its body was cut short ({error})") }),
        ),
    };
    for (name, value) in headers {
        response.headers_mut().insert(name, value);
    }
    response
}
