//! The produce handler: request → records → producer → reply. Cheap checks come first (topic name,
//! allowlist, content type, declared length, metadata), so a bad request costs no body read and
//! never reaches Kafka.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};

use crate::body::{self, Encoding};
use crate::decode::{self, BodyKind};
use crate::error::IngestError;
use crate::hook::{Failure, Hook, HookRequest};
use crate::listener::RequestId;
use crate::record::RecordMeta;
use crate::reply::Reply;
use crate::routes::{Route, validate_topic};
use crate::state::{AppState, Served};
use crate::throttle::{Level, Throttle};

mod hooked;
mod overflow;
mod send;
mod topic;

use hooked::Handled;
use overflow::{Handed, forwardable, hand_over, overflow, received};
use send::{Stake, enqueue, records_for};
use topic::{check_partition, lookup, topic_of};

/// The hook of a route, if it has one.
pub type RouteHook = Option<Arc<dyn Hook>>;

/// Serves one produce request on a route.
pub async fn handle(app: Arc<AppState>, served: Arc<Served>, request: Request) -> Response {
    let start = Instant::now();
    let mut counted = Abandoned {
        app: &app,
        served: &served,
        start,
        answered: false,
    };
    let id = request_id(request.extensions());
    let mut seen = Seen::default();
    let response = match ingest(&app, &served.route, &served.hook, request, &mut seen).await {
        Ok(reply) => {
            served.metrics.records(reply.records());
            reply.into_response()
        }
        Err(error) => {
            let (status, path) = (error.status(), &served.route.path);
            let request_id = id.as_ref().and_then(|i| i.to_str().ok());
            let id = request_id.unwrap_or("-");
            if status.is_server_error() {
                // Under overload every request may fail the same way: a line a second, and
                // the rest at debug level.
                static FAILED: LazyLock<Throttle> = LazyLock::new(|| {
                    Throttle::new(Duration::from_secs(1), Level::Warn, "request failed", None)
                });
                match FAILED.pass() {
                    Some(suppressed) => {
                        tracing::warn!(request_id = id, %path, %status, %error, suppressed, "request failed")
                    }
                    None => {
                        tracing::debug!(request_id = id, %path, %status, %error, "request failed")
                    }
                }
            } else {
                // Client mistakes are not the operator's problem; they are counted, not shouted.
                tracing::debug!(request_id = id, %path, %status, %error, "request refused");
            }
            // Only for requests admitted (past every refusal that costs nothing, and a token of
            // the global rate limit): anyone could make the script run, for free, with a
            // request refused before that (no key, a bad topic name, a topic not allowed).
            if let Some(hook) = served.hook.as_ref().filter(|_| seen.admitted) {
                let message = error.to_string();
                let failure = Failure {
                    status,
                    message: &message,
                    topic: seen.topic.as_deref(),
                    request_id,
                    after_reply: false,
                };
                crate::hook::call::report(hook.as_ref(), &failure);
            }
            error.into_response()
        }
    };
    let status = response.status().as_u16();
    served.metrics.request(status, start.elapsed());
    app.stats.answer(status);
    counted.answered = true;
    response
}

/// The request's id, as the listener settled it.
fn request_id(extensions: &axum::http::Extensions) -> Option<axum::http::HeaderValue> {
    extensions.get::<RequestId>().map(|id| id.0.clone())
}

/// A request whose client went away before its answer: hyper drops the handler then, so it is
/// counted here, as `499` (nginx's "client closed request"), with the time it had taken. The
/// slowest requests (a sync request waiting for acks past a client's own timeout) are the
/// ones clients give up on, and must not vanish from the latency histogram.
struct Abandoned<'a> {
    app: &'a AppState,
    served: &'a Served,
    start: Instant,
    answered: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.answered {
            // A panic unwinding through the handler is the server's failure, not the client's.
            let status = match std::thread::panicking() {
                true => 500,
                false => CLIENT_CLOSED,
            };
            self.served.metrics.request(status, self.start.elapsed());
            self.app.stats.answer(status);
        }
    }
}

/// The status counted for a request whose client went away first.
const CLIENT_CLOSED: u16 = 499;

/// What `handle` learns of a request as `ingest` goes, for the error hook.
#[derive(Default)]
struct Seen {
    /// The request's topic, once known.
    topic: Option<String>,
    /// Past `AppState::admit`.
    admitted: bool,
}

async fn ingest(
    app: &Arc<AppState>,
    route: &Arc<Route>,
    hook: &RouteHook,
    request: Request,
    seen: &mut Seen,
) -> Result<Reply, IngestError> {
    let (mut parts, incoming) = request.into_parts();
    // Who is asking is settled before anything else is looked at.
    let key = app.authenticate(&parts)?;
    let topic = topic_of(route, &mut parts).await?;
    if hook.is_some() {
        // For the hook's `on_error`; nothing else reads it.
        seen.topic = Some(topic.clone());
    }
    validate_topic(&topic).map_err(|e| IngestError::BadRequest(e.into()))?;
    if let Some(key) = &key {
        key.permit(&topic, route.mode).map_err(IngestError::from)?;
    }
    if !app.allow.allows(&topic) {
        return Err(IngestError::UnknownTopic(topic));
    }
    if app.shutting_down() {
        return Err(IngestError::ShuttingDown);
    }
    let meta = RecordMeta::from_parts(&parts)?;
    // A raw route takes any body, whatever its Content-Type says (or how many it has).
    let kind = match route.payload {
        crate::config::Payload::Raw => BodyKind::Raw,
        payload => BodyKind::of(payload, decode::content_type(&parts.headers)?)?,
    };
    let encoding = Encoding::of(&parts.headers)?;
    let limits = &app.body_limits;
    let declared = body::declared_length(&parts.headers);
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(body::too_large(limits.max_bytes));
    }
    // Every refusal that costs nothing is behind us: from here on the request costs the node
    // (a body read, a metadata lookup, a produce), so it spends a token of the global limit.
    app.admit()?;
    seen.admitted = true;
    let Some(hook) = hook else {
        // Without a hook the topic is known before the body is read, so a bad one costs nothing.
        let info = lookup(app, &topic).await?;
        let (body, inflated) = body::read(incoming, encoding, declared, limits).await?;
        let asked = match overflow(app, route, &topic, &parts, &body).await {
            Handed::Answered(answer) => return Ok(Reply::Relayed(answer)),
            Handed::Declined => true,
            Handed::NotSent => false,
        };
        // With peers, what a full queue refuses may still go to one (if none was asked
        // already): the body as it came.
        let relay = (!asked && forwardable(app, route, &parts))
            .then(|| (body.clone(), app.topic_metrics.get(&topic).label.clone()));
        let values = decode::decode(kind, body, &app.decode_limits)?;
        let count = values.len() as u64;
        check_partition(app, &topic, &info, meta.partition).await?;
        let records = records_for(app, route, route.mode, &topic, &info, meta, values)?;
        // A refusal is counted where the request ends: a full queue's after the peer's answer
        // here; on a forwarded request, at the node that forwarded it, which may yet serve it.
        let from_peer = app.cluster.is_some() && parts.headers.contains_key(crate::cluster::HOP);
        let stake = match (relay.is_some(), from_peer) {
            (true, _) => Stake::PeerMayTake,
            (false, true) => Stake::Forwarded,
            (false, false) => Stake::Own,
        };
        let queued = enqueue(app, route, route.mode, topic, records, kind, stake).await;
        // Queued, or refused: an inflated body no longer waits (a copy for a peer is held of
        // the budget by the hand-over).
        drop(inflated);
        // The copy for a peer goes before a sync request waits for its acks: it is no longer
        // counted in the body budget, and the wait may be as long as `sync_timeout`.
        let queued = match (queued, relay) {
            (Err(IngestError::QueueFull), Some((raw, label))) => {
                return match hand_over(app, &parts, raw, 1.0, true).await {
                    Handed::Answered(answer) => Ok(Reply::Relayed(answer)),
                    Handed::Declined | Handed::NotSent => {
                        crate::metrics::dropped(&label, "queue_full", count);
                        Err(IngestError::QueueFull)
                    }
                };
            }
            (queued, _) => queued?,
        };
        return queued.answer(app).await;
    };
    let (body, inflated) = body::read(incoming, encoding, declared, limits).await?;
    // Served here, never handed to a peer (see `forwardable`).
    received(app, &parts);
    // Only a hook reads the client's address.
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let request = Arc::new(
        HookRequest::new(
            topic,
            route.mode,
            parts.method,
            parts.uri.path().to_string(),
            parts.uri.query().map(String::from),
            parts.headers,
            peer,
            body,
            kind,
        )
        .with_key(meta.key.clone())
        .with_request_id(request_id(&parts.extensions))
        .with_max_depth(app.decode_limits.max_depth),
    );
    let handled = hooked::run(
        app,
        route,
        hook,
        key.as_deref(),
        request,
        meta,
        &mut seen.topic,
    )
    .await?;
    // The hook's records are queued (or it replied): an inflated body no longer waits.
    drop(inflated);
    match handled {
        Handled::Queued(queued) => queued.answer(app).await,
        Handled::Reply(reply) => Ok(reply),
    }
}
