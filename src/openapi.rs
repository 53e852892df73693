//! The OpenAPI 3.1 description of the HTTP contract: `docs/openapi.json` as kept in the repo
//! (the default routes and the operational endpoints), plus the routes this server's config
//! adds, each described like the built-in route of its mode, less what this listener does not
//! serve.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use crate::operations::Listener;
use crate::state::AppState;
use axum::response::IntoResponse;

/// The description of the default configuration.
pub const SPEC: &str = include_str!("../docs/openapi.json");

/// The built-in route whose description a configured route of each mode copies.
fn template(mode: crate::config::Mode) -> &'static str {
    use crate::config::Mode;
    match mode {
        Mode::Async => "/async/{topic}",
        Mode::Sync => "/sync/{topic}",
        Mode::BatchAsync => "/batch/async/{topic}",
        Mode::BatchSync => "/batch/sync/{topic}",
    }
}

/// The operational endpoints served only on the admin listener when there is one.
const PRIVATE: [&str; 3] = ["/metrics", "/", "/status.json"];

/// The description of what `app` serves on `listener`.
pub fn describe(app: &AppState, listener: Listener) -> Value {
    // The file is part of the build and checked by a test; it always parses.
    let mut spec: Value = serde_json::from_str(SPEC).unwrap_or(Value::Null);
    let Some(paths) = spec.get_mut("paths").and_then(Value::as_object_mut) else {
        return spec;
    };
    // Templates from the file as it is, before any configured route replaces an entry.
    let builtin = paths.clone();
    let served: Vec<&str> = app.served().map(|s| s.route.pattern.as_str()).collect();
    // OpenAPI wants every operationId once: a configured route adds its path to its mode's.
    let mut ids: std::collections::HashSet<String> = builtin
        .values()
        .filter_map(|item| {
            item.pointer("/post/operationId")?
                .as_str()
                .map(str::to_string)
        })
        .collect();
    for served in app.served() {
        let route = &served.route;
        // A default route, or a configured route on a default route's path and mode.
        if route.pattern == template(route.mode) {
            continue;
        }
        // Described by its own mode, also on a path the file gives another mode.
        let mut item = builtin
            .get(template(route.mode))
            .cloned()
            .unwrap_or(Value::Null);
        if let Some(op) = item.get_mut("post").and_then(Value::as_object_mut) {
            if let Some(base) = op.get("operationId").and_then(Value::as_str) {
                let id = unique_id(&mut ids, base, &route.pattern);
                op.insert("operationId".into(), Value::from(id));
            }
            if let crate::routes::TopicSource::Fixed(topic) = &route.topic {
                // Key, partition and the rest apply as on the built-in route; only the path
                // has no topic.
                if let Some(Value::Array(params)) = op.get_mut("parameters") {
                    params.retain(|p| p["$ref"] != "#/components/parameters/topic");
                }
                op.insert(
                    "description".into(),
                    Value::from(format!("Writes to topic `{topic}`.")),
                );
            }
            if route.payload == crate::config::Payload::Raw {
                op.insert("requestBody".into(), raw_body());
            }
        }
        paths.insert(route.pattern.clone(), item);
    }
    // With API keys, no produce route takes a request without one.
    if app.keys.is_some() {
        for item in paths.values_mut() {
            if let Some(Value::Array(security)) = item.pointer_mut("/post/security") {
                security.retain(|s| s.as_object().is_none_or(|o| !o.is_empty()));
            }
        }
    }
    // Default routes turned off in config are not served, so not described.
    paths.retain(|path, _| !is_default_route(path) || served.contains(&path.as_str()));
    if !listener.private() {
        paths.retain(|path, _| !PRIVATE.contains(&path.as_str()));
    }
    // The admin listener serves no produce route.
    if listener == Listener::Admin {
        paths.retain(|_, item| item.get("post").is_none());
    }
    spec
}

/// What a route with `payload = "raw"` reads: any bytes, as they are.
fn raw_body() -> Value {
    serde_json::json!({
        "required": true,
        "description": "Any bytes, produced as they are, whatever the Content-Type. Content-Encoding gzip or zstd is accepted; size limits apply after inflating.",
        "content": { "*/*": { "schema": {} } }
    })
}

fn is_default_route(path: &str) -> bool {
    [
        crate::config::Mode::Async,
        crate::config::Mode::Sync,
        crate::config::Mode::BatchAsync,
        crate::config::Mode::BatchSync,
    ]
    .iter()
    .any(|m| template(*m) == path)
}

/// `GET /openapi.json` on `listener`.
/// `GET /openapi.json`: described once per listener (the routes do not change while the app
/// runs), then the same bytes for every request, which needs no key.
pub async fn serve(
    State(app): State<Arc<AppState>>,
    listener: Listener,
    described: Arc<std::sync::OnceLock<bytes::Bytes>>,
) -> Response {
    let body = described.get_or_init(|| {
        let spec = describe(&app, listener);
        bytes::Bytes::from(serde_json::to_vec(&spec).unwrap_or_else(|_| b"{}".to_vec()))
    });
    let mut response = (StatusCode::OK, body.clone()).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}

/// `base` with `path`'s letters and digits, and a number if that is taken too; noted in `ids`.
fn unique_id(ids: &mut std::collections::HashSet<String>, base: &str, path: &str) -> String {
    let mut id = format!("{base}_");
    id.extend(path.chars().filter(char::is_ascii_alphanumeric));
    let mut candidate = id.clone();
    let mut n = 2;
    while !ids.insert(candidate.clone()) {
        candidate = format!("{id}_{n}");
        n += 1;
    }
    candidate
}
