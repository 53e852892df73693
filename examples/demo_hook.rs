//! The demo hook in Rust: the decisions of `hooks/demo.lua` on the demo's JSON and form
//! bodies, as a [`Hook`] from your own `main`. (It reads the body as a tree, so of a key given
//! twice it sees the last, where the script's `fields()` lists both.) Run it with `cargo run --example demo_hook` and try the quick start's curl commands
//! against 127.0.0.1:9903.

use std::sync::Arc;

use bytes::Bytes;
use kafboy::config::Mode;
use kafboy::decode::BodyKind;
use kafboy::hook::{
    Failure, Forward, Hook, HookError, HookFuture, HookRequest, Respond, StatusCode, Verdict, ready,
};
use serde_json::Value;

/// The original kafboy demo's `massage_json`.
pub struct DemoHook;

impl Hook for DemoHook {
    fn on_request(&self, req: Arc<HookRequest>) -> HookFuture {
        ready(decide(&req))
    }

    fn on_error(&self, failure: &Failure<'_>) {
        println!(
            "some {} error: {}",
            failure.status.as_u16(),
            failure.message
        );
    }
}

fn decide(req: &HookRequest) -> Result<Verdict, HookError> {
    // Nothing to write: refuse, naming the topic.
    if req.body.is_empty() {
        let message = format!("{}.insufficient", req.topic);
        return Ok(Verdict::Reject {
            status: StatusCode::BAD_REQUEST,
            message,
        });
    }
    // Several records, one per line (NDJSON): nothing to massage; produce them as they are.
    if req.kind() == BodyKind::Ndjson {
        return Ok(Verdict::Forward(Forward::default()));
    }
    // Not JSON (or JSON sent as a form, ...): the refusal the route gives without a hook.
    let json = match req.json() {
        Ok(json) => json,
        Err(error) => return Ok(Verdict::bad_body(error)),
    };
    // Exactly one field, "hello", a string: produce that string, and reply as the route
    // normally does.
    if let Some(fields) = json.as_object()
        && fields.len() == 1
        && let Some(Value::String(hello)) = fields.get("hello")
    {
        return Ok(Verdict::Forward(Forward {
            body: Some(Bytes::from(hello.clone())),
            ..Forward::default()
        }));
    }
    // Anything else: reply at once, then produce on the batching path, with a field added to
    // an object (an array or a lone value goes as it is).
    let mut edited = json.clone();
    if let Some(fields) = edited.as_object_mut() {
        fields.insert("extra".into(), Value::from("true"));
    }
    let body = serde_json::to_vec(&edited).map_err(|e| HookError(e.to_string()))?;
    Ok(Verdict::Respond(Respond {
        status: StatusCode::OK,
        body: Bytes::from_static(br#"{"ok":"fast reply"}"#),
        content_type: None,
        then: Some((
            Mode::BatchAsync,
            Forward {
                body: Some(body.into()),
                ..Forward::default()
            },
        )),
    }))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let listen = kafboy::demo::DEMO_ADDR
        .parse()
        .map_err(|e| format!("{e}"))?;
    kafboy::demo::run(listen, Some(Arc::new(DemoHook)), kafboy::shutdown::signal()).await
}
