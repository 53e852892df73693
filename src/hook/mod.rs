//! Edit hooks: user code that sees each produce request before Kafka does and forwards it (maybe
//! edited), rejects it, or answers it itself (maybe producing afterwards). A hook is either Rust
//! (implement [`Hook`] and pass it to [`crate::AppBuilder::hook`]) or a Lua script ([`lua`]).

pub(crate) mod call;
pub mod lua;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

pub use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use serde_json::Value;

use crate::config::Mode;
use crate::decode::{self, BodyKind, DecodeError};

/// One produce request, as a hook sees it.
#[derive(Debug)]
pub struct HookRequest {
    /// Topic from the route (path segment or fixed).
    pub topic: String,
    /// The route's mode.
    pub mode: Mode,
    /// HTTP method.
    pub method: Method,
    /// Request path.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Client address.
    pub peer: Option<SocketAddr>,
    /// The body as received, decompressed (may be empty; `headers` still name the
    /// `Content-Encoding` it came in).
    pub body: Bytes,
    /// The record key the request asked for (`?key=` or `X-Kafka-Key`), if any.
    pub key: Option<Bytes>,
    /// The request's id ([`HookRequest::request_id`]): a header value, whose copy costs no
    /// allocation, where a `String` would cost one per hooked request.
    request_id: Option<HeaderValue>,
    kind: BodyKind,
    max_depth: usize,
    parsed: OnceLock<Result<Value, DecodeError>>,
}

impl HookRequest {
    /// A request for a hook; `kind` is how the route reads this body.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topic: String,
        mode: Mode,
        method: Method,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
        peer: Option<SocketAddr>,
        body: Bytes,
        kind: BodyKind,
    ) -> HookRequest {
        let parsed = OnceLock::new();
        HookRequest {
            topic,
            mode,
            method,
            path,
            query,
            headers,
            peer,
            body,
            key: None,
            request_id: None,
            kind,
            max_depth: crate::config::DEFAULT_MAX_JSON_DEPTH,
            parsed,
        }
    }

    /// The same request, with its id.
    pub fn with_request_id(mut self, request_id: Option<HeaderValue>) -> HookRequest {
        self.request_id = request_id;
        self
    }

    /// The request's id, as its answer's `X-Request-Id` and kafboy's log lines give it: the
    /// client's own, when it sent a sane one (`headers` has it then too), or one kafboy made.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|id| id.to_str().ok())
    }

    /// The same request, read with the route's nesting limit (`server.max_json_depth`) by
    /// [`HookRequest::json`].
    pub fn with_max_depth(mut self, max_depth: usize) -> HookRequest {
        self.max_depth = max_depth;
        self
    }

    /// The same request, asking for record key `key`.
    pub fn with_key(mut self, key: Option<Bytes>) -> HookRequest {
        self.key = key;
        self
    }

    /// How the route reads this body.
    pub fn kind(&self) -> BodyKind {
        self.kind
    }

    /// The body as JSON, parsed on first use: a JSON body as it is, a form as the object kafboy
    /// would produce. NDJSON and raw bodies are not one JSON document. A body the route would
    /// refuse (empty, not JSON, nested past `server.max_json_depth`, a form of too many fields)
    /// is that refusal: [`Verdict::bad_body`] answers it as the route does.
    pub fn json(&self) -> Result<&Value, &DecodeError> {
        self.parsed
            .get_or_init(|| parse_body(self.kind, &self.body, self.max_depth))
            .as_ref()
    }
}

/// Parses a body the way the route would decode it, into one JSON value. The error is the one
/// the route gives the same body without a hook (a form of too many fields is a 413).
pub fn parse_body(kind: BodyKind, body: &Bytes, max_depth: usize) -> Result<Value, DecodeError> {
    let as_json: fn(String) -> DecodeError = match kind {
        BodyKind::Json => DecodeError::Json,
        BodyKind::Form => DecodeError::Form,
        BodyKind::Ndjson | BodyKind::Raw => return Err(DecodeError::NotOneDocument),
    };
    // The route's own decoding (its emptiness, JSON and depth checks, the form's conversion):
    // one value for these kinds.
    let limits = decode::Limits {
        max_records: 1,
        max_depth,
    };
    let values = decode::decode(kind, body.clone(), &limits)?;
    let one = values.first().ok_or(DecodeError::Empty)?;
    serde_json::from_slice(one).map_err(|e| as_json(e.to_string()))
}

/// What to produce: the route's records, with any of these replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forward {
    /// Produce these bytes as the one record, as they are: not checked as JSON, so a hook may
    /// write any format. Empty is a `400`; past `kafka.message_max_bytes`, a `413`.
    pub body: Option<Bytes>,
    /// Produce to this topic instead (it must pass the same checks).
    pub topic: Option<String>,
    /// Record key.
    pub key: Option<Bytes>,
    /// Explicit partition, from 0 (a negative one fails the hook: `500`; one past the topic's
    /// count is the client's `400`, as when the client asks for it).
    pub partition: Option<i32>,
    /// Record headers to set: each replaces the request's headers of its name (ASCII case
    /// aside).
    pub headers: Vec<(String, Bytes)>,
}

/// A reply chosen by the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Respond {
    /// HTTP status, 200 to 599 (anything else fails the hook: `500`).
    pub status: StatusCode,
    /// Body, sent as it is.
    pub body: Bytes,
    /// Content-Type of `body`. Default `application/json`. One that is not a valid header
    /// value fails the hook: `500`.
    pub content_type: Option<String>,
    /// Also produce this on that mode's path (then `status` must be a 2xx). The records are
    /// built and handed to the producer (or spool) before the reply, so a body, topic or
    /// partition that cannot be produced, a full queue or a shutdown is the client's answer
    /// (`400`, `404`, `503`, ...) instead of this one. On the sync modes the wait for the
    /// brokers' acknowledgement comes after the reply; a failure there goes to the log and
    /// [`Hook::on_error`] (with [`Failure::after_reply`] set).
    pub then: Option<(Mode, Forward)>,
}

/// A hook's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Produce, maybe edited, and reply as the route does.
    Forward(Forward),
    /// Refuse: `{"error":message}` with this status; nothing produced.
    Reject {
        /// HTTP status (4xx or 5xx).
        status: StatusCode,
        /// Error message.
        message: String,
    },
    /// Reply with this, and maybe produce as well.
    Respond(Respond),
}

impl Verdict {
    /// The refusal the route gives `error` without a hook, from [`HookRequest::json`]: `400`
    /// for a body that is not JSON (or too deep, or empty), `413` for a form of too many fields,
    /// `415` for JSON sent as a form. An NDJSON or raw body, which the route takes but `json`
    /// does not read (`DecodeError::NotOneDocument`), gets `400` here: check
    /// [`HookRequest::kind`] first.
    pub fn bad_body(error: &DecodeError) -> Verdict {
        let status = crate::error::IngestError::from(error.clone()).status();
        Verdict::Reject {
            status,
            message: error.to_string(),
        }
    }
}

/// A failed request, as the error hook sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Failure<'a> {
    /// The failure's status: the one sent to the client, unless `after_reply`.
    pub status: StatusCode,
    /// The failure's message: the one sent to the client, unless `after_reply`.
    pub message: &'a str,
    /// Topic of the request, when it got that far.
    pub topic: Option<&'a str>,
    /// The request's id ([`HookRequest::request_id`]), if it has one.
    pub request_id: Option<&'a str>,
    /// The records a [`Respond`] asked for in a sync mode failed at the brokers after the
    /// hook's own reply went out: the client got that reply, not this failure.
    pub after_reply: bool,
}

/// Why a hook gave no verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HookError(pub String);

/// The future a hook returns.
pub type HookFuture = Pin<Box<dyn Future<Output = Result<Verdict, HookError>> + Send>>;

/// User code run on every produce request of the routes it is set for.
pub trait Hook: Send + Sync + 'static {
    /// Decides what to do with `request`. Runs under `hook.timeout`, counted from the call: a
    /// hook that errors, panics or runs out of time fails the request with `500` and produces
    /// nothing (its future is dropped at the timeout). The call and every poll of the future
    /// run on a worker thread that serves other connections: blocking work belongs in
    /// `tokio::task::spawn_blocking`, and a hook that blocks past the timeout fails all the
    /// same, its answer discarded.
    fn on_request(&self, request: Arc<HookRequest>) -> HookFuture;

    /// Called for the failed requests on the hook's routes that were admitted (past the checks
    /// that cost nothing and the global rate limit), once their reply is decided, and for the
    /// records a [`Respond`] asked for in a sync mode that fail at the brokers after the reply.
    /// Not for a refusal before that (`401`, `429`, `405`, the topic's name or allowlist, the
    /// key's topics and modes, the headers and declared length, shutting down), which anyone
    /// can cause for free. It runs on a worker thread, without a time budget: keep it short. A
    /// panic in it is logged and goes no further.
    fn on_error(&self, _failure: &Failure<'_>) {}

    /// Whether the hook bounds the time of each call itself, as the Lua host does (its
    /// instruction budget and `hook.timeout`, from the moment the script is entered): kafboy
    /// then takes an answer given on the first poll however long the call took (a Lua state is
    /// built, its top-level code run, on a thread's first call). Default false: an answer that
    /// comes after `hook.timeout` is discarded.
    fn bounds_itself(&self) -> bool {
        false
    }
}

/// A shared hook is a hook: an embedder may keep an `Arc` of its own.
impl<H: Hook + ?Sized> Hook for Arc<H> {
    fn on_request(&self, request: Arc<HookRequest>) -> HookFuture {
        (**self).on_request(request)
    }

    fn on_error(&self, failure: &Failure<'_>) {
        (**self).on_error(failure)
    }

    fn bounds_itself(&self) -> bool {
        (**self).bounds_itself()
    }
}

/// Wraps a synchronous decision as a [`HookFuture`].
pub fn ready(verdict: Result<Verdict, HookError>) -> HookFuture {
    Box::pin(std::future::ready(verdict))
}

/// Pairs each route with its hook: the route's own Lua script, else the Rust hook, else
/// `hook.script`. A script is loaded (and checked) once however many routes name it.
pub fn attach(
    config: &crate::Config,
    routes: Vec<crate::routes::Route>,
    rust_hook: Option<Arc<dyn Hook>>,
) -> Result<Vec<(Arc<crate::routes::Route>, crate::ingest::RouteHook)>, String> {
    let limits = lua::Limits::of(config);
    if rust_hook.is_some() && config.hook.script.is_some() {
        return Err("hook.script: a Rust hook was given as well; use one".into());
    }
    let mut loaded: Vec<(std::path::PathBuf, Arc<dyn Hook>)> = Vec::new();
    let mut load = |path: &std::path::Path| -> Result<Arc<dyn Hook>, String> {
        if let Some((_, hook)) = loaded.iter().find(|(p, _)| p == path) {
            return Ok(hook.clone());
        }
        let hook: Arc<dyn Hook> = Arc::new(lua::LuaHook::load(path, limits)?);
        loaded.push((path.to_path_buf(), hook.clone()));
        Ok(hook)
    };
    let default = match (&rust_hook, &config.hook.script) {
        (Some(hook), _) => Some(hook.clone()),
        (None, Some(path)) => Some(load(path)?),
        (None, None) => None,
    };
    routes
        .into_iter()
        .map(|route| {
            let hook = match &route.hook {
                Some(path) => Some(load(path)?),
                None => default.clone(),
            };
            Ok((Arc::new(route), hook))
        })
        .collect()
}
