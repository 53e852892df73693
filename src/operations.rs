//! The operational endpoints: `/health`, `/ready`, `/disco`, `/openapi.json`, `/metrics` and
//! the status page (`/`, `/status.json`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::IngestError;
use crate::server::json;
use crate::state::AppState;

/// Which listener the operational endpoints are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The main listener, with the produce routes; `private`: with `/metrics` and the status
    /// page too (when there is no admin listener).
    Main { private: bool },
    /// The admin listener: the operational endpoints only.
    Admin,
}

impl Listener {
    /// Whether `/metrics` and the status page are served here (they name topics, brokers and
    /// peers).
    pub fn private(self) -> bool {
        matches!(self, Listener::Admin | Listener::Main { private: true })
    }
}

/// The operational endpoints of `listener`.
pub fn router(listener: Listener) -> Router<Arc<AppState>> {
    let private = listener.private();
    let described = Arc::new(std::sync::OnceLock::new());
    let router = Router::new()
        .route(
            "/openapi.json",
            get(move |app| crate::openapi::serve(app, listener, described.clone())),
        )
        .route("/health", get(health))
        .route("/disco", get(disco))
        .route("/ready", get(ready));
    let router = if private {
        router
            .route("/metrics", get(metrics))
            .route("/", get(crate::status::page))
            .route("/status.json", get(crate::status::status_json))
    } else {
        router
    };
    // After the routes: it applies to the ones registered so far.
    router.method_not_allowed_fallback(method_not_allowed)
}

/// Any method but GET (or HEAD) on these: a JSON error like every other.
async fn method_not_allowed() -> Response {
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "error": "method not allowed; use GET" }),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

/// `GET /disco`: this node's name and the URL peers reach it at, as plain text.
async fn disco(State(app): State<Arc<AppState>>) -> Response {
    let text = match &app.cluster {
        Some(c) => format!("{} {}\n", c.name, c.url),
        None => format!("kafboy@{}\n", app.server.listen),
    };
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn health() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "ok": "alive" }))
}

async fn ready(State(app): State<Arc<AppState>>) -> Response {
    match app.not_ready() {
        None => {
            let mut body = serde_json::json!({ "ok": "ready", "headroom": app.headroom() });
            // Peers compare it with their own, to know a URL that leads back to themselves.
            if let Some(cluster) = &app.cluster {
                body["node"] = cluster.id.clone().into();
            }
            json(StatusCode::OK, &body)
        }
        Some(why) => IngestError::Unavailable(format!("not ready: {why}")).into_response(),
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    for slot in app.producers.slots() {
        let (queued, in_flight) = app.producers.held(slot);
        let name = slot.name().to_string();
        ::metrics::gauge!(crate::metrics::QUEUED, "producer" => name.clone()).set(queued as f64);
        ::metrics::gauge!(crate::metrics::IN_FLIGHT, "producer" => name).set(in_flight as f64);
    }
    if let Some(spool) = &app.spool {
        spool_metrics(&spool.stats());
    }
    ::metrics::gauge!(crate::metrics::READY).set(if app.not_ready().is_none() { 1.0 } else { 0.0 });
    // Folding the histograms and writing them out is work for a blocking thread, not for the
    // async worker whose other requests would wait behind it; one scrape at a time, so that a
    // flood of scrapes takes one blocking thread, not one each.
    static RENDERING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let Ok(one) = RENDERING.acquire().await else {
        return crate::server::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": "metrics unavailable" }),
        );
    };
    // The permit goes with the render: a client that hangs up must not free it while the
    // render still runs.
    let rendered = tokio::task::spawn_blocking(move || {
        let _one = one;
        let handle = crate::metrics::handle();
        handle.run_upkeep();
        handle.render()
    })
    .await;
    // A 200 with nothing in it would read as a node with no metrics.
    let Ok(text) = rendered else {
        return crate::server::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({ "error": "rendering the metrics failed" }),
        );
    };
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn spool_metrics(s: &crate::spool::Stats) {
    use crate::metrics as m;
    ::metrics::gauge!(m::SPOOL_BYTES).set(s.bytes as f64);
    ::metrics::gauge!(m::SPOOL_RECORDS).set(s.records as f64);
    ::metrics::gauge!(m::SPOOL_OLDEST).set(s.oldest_undelivered.map_or(0.0, |d| d.as_secs_f64()));
    ::metrics::counter!(m::SPOOL_REPLAYED).absolute(s.replayed);
    ::metrics::counter!(m::SPOOL_DELIVERED).absolute(s.delivered);
    ::metrics::counter!(m::SPOOL_DEAD_LETTERED).absolute(s.dead_lettered);
    ::metrics::counter!(m::SPOOL_RETRIES).absolute(s.retried);
    ::metrics::counter!(m::SPOOL_FULL).absolute(s.refused_full);
    ::metrics::counter!(m::SPOOL_DISK_ERRORS).absolute(s.disk_errors);
    ::metrics::gauge!(m::SPOOL_HEALTHY).set(if s.healthy { 1.0 } else { 0.0 });
}
