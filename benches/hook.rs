//! Per-call cost of a hook doing a small edit (read `user.id`, add two fields, forward) on a
//! 208-byte JSON body: the Lua host against the same edit as a Rust hook.
//! Run: `cargo bench --bench hook`. Prints the median of 7 rounds of 20000 calls.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafboy::config::Mode;
use kafboy::decode::BodyKind;
use kafboy::hook::lua::{Limits, LuaHook};
use kafboy::hook::{Forward, Hook, HookError, HookFuture, HookRequest, Method, Verdict, ready};

const SCRIPT: &str = r#"
function on_request(req)
  if req:get("user.id") == nil then return reject(400, "no user") end
  req:set("extra", "true")
  req:set("source", "web")
  return forward()
end
"#;

const BODY: &str = r#"{"user":{"id":4217,"name":"Ada Lovelace","plan":"pro"},"event":"page_view","url":"https://example.com/docs/getting-started?ref=nav","ts":1732530000123,"props":{"ms":183,"scroll":0.62,"tags":["docs","intro"]}}"#;

struct RustEdit;

impl Hook for RustEdit {
    fn on_request(&self, req: Arc<HookRequest>) -> HookFuture {
        ready((|| {
            let json = req.json().map_err(|e| HookError(e.to_string()))?;
            if json.pointer("/user/id").is_none() {
                return Err(HookError("no user".into()));
            }
            let mut v = json.clone();
            v["extra"] = "true".into();
            v["source"] = "web".into();
            let body = serde_json::to_vec(&v).map_err(|e| HookError(e.to_string()))?;
            Ok(Verdict::Forward(Forward {
                body: Some(body.into()),
                ..Forward::default()
            }))
        })())
    }
}

fn request() -> Arc<HookRequest> {
    Arc::new(HookRequest::new(
        "events".into(),
        Mode::Async,
        Method::POST,
        "/async/events".into(),
        None,
        Default::default(),
        None,
        Bytes::from_static(BODY.as_bytes()),
        BodyKind::Json,
    ))
}

fn per_call(hook: &dyn Hook) -> Duration {
    const CALLS: u32 = 20_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut rounds: Vec<Duration> = (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CALLS {
                let verdict = rt.block_on(hook.on_request(request())).expect("verdict");
                assert!(matches!(
                    verdict,
                    Verdict::Forward(Forward { body: Some(_), .. })
                ));
            }
            start.elapsed() / CALLS
        })
        .collect();
    rounds.sort();
    rounds[3]
}

fn main() {
    let limits = Limits {
        timeout: Duration::from_secs(1),
        max_instructions: 10_000_000,
        max_memory: 64 << 20,
        max_depth: 64,
    };
    let lua = LuaHook::from_source(Path::new("bench.lua"), SCRIPT, limits).expect("script");
    let rust = per_call(&RustEdit);
    let lua = per_call(&lua);
    println!(
        "hook per call, {} B body, median of 7 x 20000 calls",
        BODY.len()
    );
    println!("  rust hook: {:>6.2} µs", rust.as_secs_f64() * 1e6);
    println!("  lua hook:  {:>6.2} µs", lua.as_secs_f64() * 1e6);
}
