//! The produce handler's path through a hook: the hook's verdict, then the records it asked for
//! (maybe on another topic or mode, maybe after the hook's own reply).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use bytes::Bytes;

use super::send::{Queued, Stake, enqueue, records_for};
use super::topic::{check_partition, lookup};
use crate::auth::Key;
use crate::config::Mode;
use crate::decode::{self, BodyKind};
use crate::error::IngestError;
use crate::hook::call::{self, NoVerdict};
use crate::hook::{Failure, Forward, Hook, HookRequest, Respond, Verdict};
use crate::kafka::Record;
use crate::record::RecordMeta;
use crate::reply::Reply;
use crate::routes::{Route, validate_topic};
use crate::state::AppState;
use crate::throttle::{Level, Throttle, throttled};

/// Hook failures: at most one line a second.
static HOOK_FAILED: LazyLock<Throttle> =
    LazyLock::new(|| Throttle::new(Duration::from_secs(1), Level::Error, "hook failed", None));

/// What a hook's verdict came to: records queued, whose answer may wait for acks, or a reply.
pub(super) enum Handled {
    Queued(Queued),
    Reply(Reply),
}

/// Runs `hook` on `request` (under the hook time budget) and carries out its verdict. `key` is
/// the client's API key, which must allow any topic or mode the hook moves the record to.
pub(super) async fn run(
    app: &Arc<AppState>,
    route: &Arc<Route>,
    hook: &Arc<dyn Hook>,
    key: Option<&Key>,
    request: Arc<HookRequest>,
    meta: RecordMeta,
    topic_seen: &mut Option<String>,
) -> Result<Handled, IngestError> {
    let verdict = match call::decide(app.hook_timeout, hook.as_ref(), request.clone()).await {
        // The detail (script path, traceback) is for the operator, not the client.
        Ok(verdict) => match unsendable(&verdict) {
            Some(why) => return Err(hook_failed(route, &why, "hook failed".into())),
            None => verdict,
        },
        Err(NoVerdict::Failed(e)) => return Err(hook_failed(route, &e.0, "hook failed".into())),
        Err(NoVerdict::Late) => {
            // Not the script's detail: the client may see how long kafboy waited.
            let message = format!("hook gave no answer within {:?}", app.hook_timeout);
            return Err(hook_failed(route, &message, message.clone()));
        }
    };
    match verdict {
        Verdict::Reject { status, message } => Err(IngestError::Rejected { status, message }),
        Verdict::Forward(forward) => {
            let later = prepared(
                app, route, key, request, meta, route.mode, forward, topic_seen,
            );
            let Later {
                topic,
                records,
                kind,
                mode,
            } = later.await?;
            let queued = enqueue(app, route, mode, topic, records, kind, Stake::Own).await?;
            Ok(Handled::Queued(queued))
        }
        Verdict::Respond(respond) => {
            if let Some((mode, forward)) = respond.then {
                let request_id = request.request_id().map(str::to_string);
                // Everything that can be checked is, before the reply: a body that does not
                // decode, a topic the brokers do not have, a record that cannot be built must
                // not get the hook's 2xx and then vanish.
                let Later {
                    topic,
                    records,
                    kind,
                    mode,
                } = prepared(app, route, key, request, meta, mode, forward, topic_seen).await?;
                // Handed over before the reply too: a full queue, a full spool or a shutdown is
                // the client's answer, not a log line.
                let stake = Stake::Replied;
                let queued = enqueue(app, route, mode, topic.clone(), records, kind, stake).await?;
                if let Queued::Acks { .. } = queued {
                    let hook = hook.clone();
                    acks_after_reply(app.clone(), route.clone(), hook, topic, request_id, queued);
                }
            }
            let content_type = respond
                .content_type
                .unwrap_or_else(|| "application/json".into());
            Ok(Handled::Reply(Reply::Custom {
                status: respond.status,
                body: respond.body,
                content_type,
            }))
        }
    }
}

/// Logs a hook's failure (a script that fails on what clients send fails for every request: a
/// line a second) and answers the client `message`.
fn hook_failed(route: &Route, error: &str, message: String) -> IngestError {
    if let Some(suppressed) = HOOK_FAILED.pass() {
        tracing::error!(path = %route.path, %error, suppressed, "hook failed");
    }
    IngestError::HookFailed(message)
}

/// What makes a verdict impossible to carry out as the client's answer. The client did nothing
/// wrong: the hook failed.
fn unsendable(verdict: &Verdict) -> Option<String> {
    let why = |what: &str, status: StatusCode| Some(format!("the hook answered {what} ({status})"));
    match verdict {
        // A 2xx "rejection" would hide that nothing was written.
        Verdict::Reject { status, .. }
            if !status.is_client_error() && !status.is_server_error() =>
        {
            why("a rejection whose status is not an error", *status)
        }
        // hyper would not send these as they are.
        Verdict::Respond(r) if r.status.is_informational() || r.status.as_u16() > 599 => {
            why("a status that is not 200 to 599", r.status)
        }
        // A client told 503 (or 400) must be able to trust that nothing was written.
        Verdict::Respond(r) if r.then.is_some() && !r.status.is_success() => {
            why("a status that is not 2xx and asked to produce", r.status)
        }
        Verdict::Respond(r)
            if r.content_type
                .as_deref()
                .is_some_and(|ct| HeaderValue::from_str(ct).is_err()) =>
        {
            Some("the hook answered a content type that is not a header value".into())
        }
        Verdict::Forward(f)
        | Verdict::Respond(Respond {
            then: Some((_, f)), ..
        }) if f.partition.is_some_and(|p| p < 0) => {
            Some("the hook asked for a partition below 0".into())
        }
        _ => None,
    }
}

/// The records a hook's verdict asks for in `mode`, built and checked: the key must allow the
/// topic and mode (a hook may move the record to either), the edits applied, the topic
/// looked up.
#[allow(clippy::too_many_arguments)]
async fn prepared(
    app: &AppState,
    route: &Route,
    key: Option<&Key>,
    request: Arc<HookRequest>,
    meta: RecordMeta,
    mode: Mode,
    forward: Forward,
    topic_seen: &mut Option<String>,
) -> Result<Later, IngestError> {
    // In the order a client's topic is checked: its name (`400`), the key (`403`), the
    // allowlist (`404`).
    let moved = forward.topic.as_deref();
    if let Some(topic) = moved {
        validate_topic(topic).map_err(|e| IngestError::BadRequest(e.into()))?;
    }
    if let Some(key) = key {
        key.allows(moved.unwrap_or(&request.topic), mode)?;
    }
    if let Some(topic) = moved
        && !app.allow.allows(topic)
    {
        return Err(IngestError::UnknownTopic(topic.to_string()));
    }
    let kind = request.kind();
    let (topic, meta, values) = forwarded(app, request, meta, forward)?;
    // Set to the route's topic already, unless the hook moved the record.
    if topic_seen.as_deref() != Some(topic.as_str()) {
        *topic_seen = Some(topic.clone());
    }
    let info = lookup(app, &topic).await?;
    check_partition(app, &topic, &info, meta.partition).await?;
    let records = records_for(app, route, mode, &topic, &info, meta, values)?;
    Ok(Later {
        topic,
        records,
        kind,
        mode,
    })
}

/// Applies a hook's edits: topic (checked again), key, partition, headers, body; the body
/// decoded into record values.
fn forwarded(
    app: &AppState,
    request: Arc<HookRequest>,
    mut meta: RecordMeta,
    forward: Forward,
) -> Result<(String, RecordMeta, Vec<Bytes>), IngestError> {
    let kind = request.kind();
    // The hook is done with the request; only a hook that kept it makes this copy.
    let (route_topic, body) = match Arc::try_unwrap(request) {
        Ok(request) => (request.topic, request.body),
        Err(shared) => (shared.topic.clone(), shared.body.clone()),
    };
    // A hook's topic was checked in `prepared`, the route's before the hook ran.
    let topic = forward.topic.unwrap_or(route_topic);
    meta.key = forward.key.or(meta.key);
    meta.partition = forward.partition.or(meta.partition);
    // A header the hook sets replaces the client's of that name: a hook that stamps a
    // header (a source, a verified user) must not leave a forged one beside it.
    meta.headers.retain(|(name, _)| {
        !forward
            .headers
            .iter()
            .any(|(set, _)| set.eq_ignore_ascii_case(name))
    });
    meta.headers.extend(forward.headers);
    let values = match forward.body {
        // Not "empty body": the client's may not have been (`hello=` in the demo).
        Some(body) if body.is_empty() => {
            return Err(IngestError::BadRequest("the hook set an empty body".into()));
        }
        Some(body) => vec![body],
        None => decode::decode(kind, body, &app.decode_limits)?,
    };
    Ok((topic, meta, values))
}

/// What a hook's verdict asks to produce: its records, built and checked, and how.
struct Later {
    topic: String,
    records: Vec<Record>,
    kind: BodyKind,
    mode: Mode,
}

/// Waits for the acknowledgements of records a hook asked for in a sync mode, after its own
/// reply. The client already has its answer, so failures (at the brokers) go to the log and
/// the error hook.
fn acks_after_reply(
    app: Arc<AppState>,
    route: Arc<Route>,
    hook: Arc<dyn Hook>,
    topic: String,
    request_id: Option<String>,
    queued: Queued,
) {
    let running = app.background.start();
    tokio::spawn(async move {
        let _running = running;
        if let Err(error) = queued.answer(&app).await {
            let status = error.status();
            let message = format!("after the hook's reply: {error}");
            // A line a second: with the brokers away, every such request fails.
            throttled!(warn, "produce failed", path = %route.path, %status, %message);
            call::report(
                hook.as_ref(),
                &Failure {
                    status,
                    message: &message,
                    topic: Some(&topic),
                    request_id: request_id.as_deref(),
                    after_reply: true,
                },
            );
        }
    });
}
