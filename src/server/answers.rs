//! The answers the router gives itself: JSON bodies, a wrong method, no route.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde::Serialize;

use crate::error::IngestError;
use crate::routes::RESERVED_PATHS;
use crate::state::{AppState, Served};

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    // Serializing these plain structs cannot fail; an empty object is the fallback anyway.
    // Written on the stack first, so that the body is one allocation of its exact size: a
    // `Vec` with room to spare becomes `Bytes` through a second one.
    let mut room = [0u8; 512];
    let mut cursor = std::io::Cursor::new(&mut room[..]);
    let bytes = match serde_json::to_writer(&mut cursor, body) {
        Ok(()) => {
            let len = cursor.position() as usize;
            Bytes::copy_from_slice(&room[..len])
        }
        Err(_) => Bytes::from(serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec())),
    };
    sized_json(status, bytes)
}

/// A JSON response of `body`, its Content-Length given: axum would otherwise format it into
/// a header value of its own, an allocation per response.
pub fn sized_json(status: StatusCode, body: Bytes) -> Response {
    let length = content_length(body.len());
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, length);
    response
}

/// A Content-Length value: the small ones are made once, as static text, whose copies share
/// no count (a shared `Bytes` would have every worker write one atomic per response).
fn content_length(n: usize) -> HeaderValue {
    static SMALL: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
        // Leaked once, for the life of the process: 512 short strings.
        (0..512usize)
            .map(|n| HeaderValue::from_static(String::leak(n.to_string())))
            .collect()
    });
    SMALL
        .get(n)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

pub(super) async fn method_not_allowed(app: Arc<AppState>, served: Arc<Served>) -> Response {
    // Not handed to the hook's `on_error`: anyone could make the script run, without a key.
    let message = "method not allowed; use POST";
    served.metrics.answered(405);
    app.stats.answer(405);
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "error": message }),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

pub(super) async fn not_found() -> Response {
    IngestError::NoRoute.into_response()
}

/// kafboy's own paths that `router` does not serve (moved to the admin listener), and every one
/// with a trailing slash, answer 404: a `/{topic}` route (with its `/{topic}/`) would take them,
/// and write `POST /metrics` to a topic named `metrics`.
pub(super) fn reserve(mut router: Router<Arc<AppState>>, admin: bool) -> Router<Arc<AppState>> {
    for path in RESERVED_PATHS.iter().filter(|p| **p != "/") {
        router = router.route(&format!("{path}/"), any(not_found));
    }
    if admin {
        for path in ["/metrics", "/status.json"] {
            router = router.route(path, any(not_found));
        }
    }
    router
}
