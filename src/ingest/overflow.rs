//! Overflow to peers: a request this node's producer queue has no room for goes to another
//! kafboy node of the cluster, if one is ready.

use axum::http::request::Parts;
use axum::response::Response;
use bytes::Bytes;

use crate::routes::Route;
use crate::state::AppState;

/// Counts a request a peer forwarded here; whether it was one (it is never forwarded again).
pub(super) fn received(app: &AppState, parts: &Parts) -> bool {
    // Counted on a node without `[cluster]` too: a peer may forward to a node that forwards
    // nothing itself.
    if !parts.headers.contains_key(crate::cluster::HOP) {
        return false;
    }
    ::metrics::counter!(crate::metrics::FORWARDED, "direction" => "received").increment(1);
    app.stats
        .forwarded_received
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    true
}

/// What became of a request offered to a peer.
pub(super) enum Handed {
    /// The peer's answer, to relay.
    Answered(Response),
    /// A peer was asked and did not take it (unreachable, or a refusal that wrote nothing):
    /// serve it here, and ask no other (each ask may take up to `cluster.forward_timeout`).
    Declined,
    /// No peer was asked.
    NotSent,
}

/// Hands a request of a route without a hook to a peer when this node's producer queue is past
/// its high-water mark.
pub(super) async fn overflow(
    app: &AppState,
    route: &Route,
    topic: &str,
    parts: &Parts,
    body: &Bytes,
) -> Handed {
    if received(app, parts) || !forwardable(app, route, parts) {
        return Handed::NotSent;
    }
    let (fill, full) = app.producers.for_mode(route.mode, topic).fill();
    hand_over(app, parts, body.clone(), fill, full).await
}

/// Whether a request on `route` (one without a hook) may go to a peer at all. Not one a peer
/// forwarded here: it goes no further (and what its refusal drops is the sender's to count,
/// which may yet serve it). Not on a spooled route: its records go to this node's disk,
/// whatever its producers' queues hold. (Routes with a hook are never forwarded: the peer's
/// hook would see this node as the client, `req:peer()`, so a hook's address check could be
/// passed by way of a full node.)
pub(super) fn forwardable(app: &AppState, route: &Route, parts: &Parts) -> bool {
    app.cluster.is_some()
        && !parts.headers.contains_key(crate::cluster::HOP)
        && !super::send::spooled(app, route, route.mode)
}

/// Forwards to the best ready peer if `fill`/`full` call for it.
pub(super) async fn hand_over(
    app: &AppState,
    parts: &Parts,
    body: Bytes,
    fill: f64,
    full: bool,
) -> Handed {
    let Some(cluster) = app.cluster.as_ref() else {
        return Handed::NotSent;
    };
    if !crate::cluster::Cluster::may_forward(&parts.extensions) {
        return Handed::NotSent;
    }
    let Some(peer) = cluster.peer_for(fill, full, &parts.headers) else {
        return Handed::NotSent;
    };
    // The body stays in memory until the peer answers (up to `cluster.forward_timeout`): it
    // keeps its share of the buffer budget meanwhile, and without room there it is served here.
    let Some(_held) = app.body_limits.buffer.hold(body.len()) else {
        return Handed::NotSent;
    };
    // Boxed because a call to a peer is a large future (1.3 KiB) that few requests need:
    // inline, it would grow the future of every request, which axum boxes and moves.
    let id = parts
        .extensions
        .get::<crate::listener::RequestId>()
        .map(|id| &id.0);
    let forward = cluster.forward(
        peer,
        parts.method.clone(),
        &parts.uri,
        &parts.headers,
        id,
        body,
    );
    let Some(answer) = Box::pin(forward).await else {
        return Handed::Declined;
    };
    ::metrics::counter!(crate::metrics::FORWARDED, "direction" => "sent").increment(1);
    app.stats
        .forwarded_sent
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Handed::Answered(answer)
}
