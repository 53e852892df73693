//! Lua hooks (Lua 5.4). Each worker thread has its own sandboxed state per script: no io, os,
//! package or debug, no file loading, an instruction budget, a wall-clock budget and a memory
//! limit. A script sees the request through accessors (`req:get("user.id")`), so a body is only
//! parsed when the script asks, and never turned into a Lua table whole.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, VmState};

use super::{Failure, Forward, Hook, HookError, HookFuture, HookRequest, Respond, Verdict, ready};
use crate::config::Mode;

mod raw;
mod request;
mod tree;

use request::LuaRequest;

/// Limits of one script.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock budget per call.
    pub timeout: Duration,
    /// VM instructions per call.
    pub max_instructions: u64,
    /// Bytes the state may allocate.
    pub max_memory: usize,
}

/// A Lua script serving as a hook.
pub struct LuaHook {
    id: u64,
    path: PathBuf,
    source: Arc<str>,
    limits: Limits,
}

/// Helpers every script gets before its own code runs.
const PRELUDE: &str = r#"
-- pcall and xpcall would catch the budget error and let a script run on; once the budget is
-- spent they pass the error on instead.
do
  local raw_pcall, raw_xpcall, exhausted = pcall, xpcall, __kafboy_exhausted
  local pack, unpack = table.pack, table.unpack
  __kafboy_exhausted = nil
  local function check(r)
    if not r[1] and exhausted() then error(r[2], 0) end
    return unpack(r, 1, r.n)
  end
  pcall = function(...) return check(pack(raw_pcall(...))) end
  xpcall = function(...) return check(pack(raw_xpcall(...))) end
end
-- One read-only table for every forward(): nothing to allocate, and the host knows it on sight.
do
  local verdict = setmetatable({}, {
    __index = { action = "forward" },
    __newindex = function() error("forward() is read-only", 2) end,
  })
  __kafboy_forward = verdict
  function forward() return verdict end
end
function reject(status, message) return { action = "reject", status = status, message = message } end
function respond(status, body, produce) return { action = "respond", status = status, body = body, produce = produce } end
"#;

/// How often the budget is checked, in VM instructions.
const CHECK_EVERY: u32 = 1000;

struct Budget {
    instructions_left: Cell<u64>,
    deadline: Cell<Instant>,
}

impl Budget {
    fn exhausted(&self) -> bool {
        self.instructions_left.get() == 0 || Instant::now() > self.deadline.get()
    }
}

struct State {
    lua: Lua,
    on_request: Function,
    on_error: Option<Function>,
    /// What `forward()` returns.
    forward: Table,
}

thread_local! {
    /// This thread's Lua state per script, by script id (a handful: a list is enough).
    static STATES: RefCell<Vec<(u64, State)>> = const { RefCell::new(Vec::new()) };
}

impl LuaHook {
    /// Loads `path` and checks it: syntax errors and a missing `on_request` are reported with the
    /// file and line.
    pub fn load(path: &Path, limits: Limits) -> Result<LuaHook, String> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| format!("hook script {}: {e}", path.display()))?;
        LuaHook::from_source(path, &source, limits)
    }

    /// A hook from script text; `path` names it in messages.
    pub fn from_source(path: &Path, source: &str, limits: Limits) -> Result<LuaHook, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let hook = LuaHook {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            source: source.into(),
            limits,
        };
        hook.new_state()
            .map_err(|e| format!("hook script {}: {e}", path.display()))?;
        Ok(hook)
    }

    fn new_state(&self) -> mlua::Result<State> {
        let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::default())?;
        let globals = lua.globals();
        // The base library can read files and load bytecode; scripts get neither.
        for name in ["dofile", "loadfile", "load", "require", "collectgarbage"] {
            globals.set(name, mlua::Nil)?;
        }
        globals.set(
            "print",
            lua.create_function(|_, msg: mlua::Variadic<String>| {
                tracing::info!(target: "kafboy::hook::lua", "{}", msg.join("\t"));
                Ok(())
            })?,
        )?;
        lua.set_memory_limit(self.limits.max_memory)?;
        lua.set_app_data(Budget {
            instructions_left: Cell::new(u64::MAX),
            deadline: Cell::new(far_future()),
        });
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(CHECK_EVERY),
            |lua, _| {
                let budget = lua
                    .app_data_ref::<Budget>()
                    .ok_or_else(|| mlua::Error::runtime("no budget"))?;
                let left = budget
                    .instructions_left
                    .get()
                    .saturating_sub(u64::from(CHECK_EVERY));
                budget.instructions_left.set(left);
                if left == 0 {
                    return Err(mlua::Error::runtime("instruction budget exceeded"));
                }
                if Instant::now() > budget.deadline.get() {
                    return Err(mlua::Error::runtime("time budget exceeded"));
                }
                Ok(VmState::Continue)
            },
        )?;
        globals.set(
            "__kafboy_exhausted",
            lua.create_function(|lua, ()| {
                Ok(lua.app_data_ref::<Budget>().is_none_or(|b| b.exhausted()))
            })?,
        )?;
        lua.load(PRELUDE).set_name("=prelude").exec()?;
        let forward: Table = globals.get("__kafboy_forward")?;
        globals.set("__kafboy_forward", mlua::Value::Nil)?;
        lua.load(&*self.source)
            .set_name(format!("@{}", self.path.display()))
            .exec()?;
        let on_request: Function = lua
            .globals()
            .get::<Option<Function>>("on_request")?
            .ok_or_else(|| {
                mlua::Error::runtime("the script defines no function on_request(req)")
            })?;
        let on_error = lua.globals().get::<Option<Function>>("on_error")?;
        Ok(State {
            lua,
            on_request,
            on_error,
            forward,
        })
    }

    /// Runs `f` with this thread's state for the script, creating it on first use.
    fn with_state<R>(&self, f: impl FnOnce(&State) -> mlua::Result<R>) -> Result<R, HookError> {
        STATES.with(|states| {
            let mut states = states.borrow_mut();
            let index = match states.iter().position(|(id, _)| *id == self.id) {
                Some(index) => index,
                None => {
                    let state = self.new_state().map_err(|e| HookError(e.to_string()))?;
                    states.push((self.id, state));
                    states.len() - 1
                }
            };
            let state = &states[index].1;
            let budget = state
                .lua
                .app_data_ref::<Budget>()
                .ok_or_else(|| HookError("no budget".into()))?;
            budget
                .instructions_left
                .set(self.limits.max_instructions.max(u64::from(CHECK_EVERY)));
            budget.deadline.set(Instant::now() + self.limits.timeout);
            drop(budget);
            f(state).map_err(|e| HookError(format!("{}: {}", self.path.display(), flatten(&e))))
        })
    }

    fn call(&self, request: Arc<HookRequest>) -> Result<Verdict, HookError> {
        self.with_state(|state| {
            let ud = state.lua.create_userdata(LuaRequest::new(request))?;
            let result: mlua::Value = state.on_request.call(&ud)?;
            let edits = ud.take::<LuaRequest>()?.into_forward()?;
            verdict(result, edits, &state.forward)
        })
    }
}

impl Hook for LuaHook {
    fn on_request(&self, request: Arc<HookRequest>) -> HookFuture {
        ready(self.call(request))
    }

    fn on_error(&self, failure: &Failure<'_>) {
        let result = self.with_state(|state| match &state.on_error {
            Some(f) => f.call::<()>((failure.status.as_u16(), failure.message, failure.topic)),
            None => Ok(()),
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "lua on_error failed");
        }
    }
}

/// Turns what `on_request` returned into a verdict. `nil` means forward.
fn verdict(result: mlua::Value, edits: Forward, forward: &Table) -> mlua::Result<Verdict> {
    let table = match result {
        mlua::Value::Nil => return Ok(Verdict::Forward(edits)),
        mlua::Value::Table(t) if t.to_pointer() == forward.to_pointer() => {
            return Ok(Verdict::Forward(edits));
        }
        mlua::Value::Table(t) => t,
        other => {
            return Err(mlua::Error::runtime(format!(
                "on_request must return forward(), reject(..), respond(..) or nil, not a {}",
                other.type_name()
            )));
        }
    };
    let action: String = table.get("action")?;
    match action.as_str() {
        "forward" => Ok(Verdict::Forward(edits)),
        "reject" => Ok(Verdict::Reject {
            status: status(&table, 400)?,
            message: table
                .get::<Option<String>>("message")?
                .unwrap_or_else(|| "rejected".into()),
        }),
        "respond" => {
            let body: mlua::LuaString = table.get("body")?;
            let then = match table.get::<mlua::Value>("produce")? {
                mlua::Value::Nil | mlua::Value::Boolean(false) => None,
                mlua::Value::String(m) => Some((mode(&m.to_str()?)?, edits)),
                _ => {
                    return Err(mlua::Error::runtime(
                        "respond's third argument is a mode name",
                    ));
                }
            };
            Ok(Verdict::Respond(Respond {
                status: status(&table, 200)?,
                body: Bytes::copy_from_slice(&body.as_bytes()),
                content_type: None,
                then,
            }))
        }
        other => Err(mlua::Error::runtime(format!("unknown action {other:?}"))),
    }
}

fn status(table: &Table, default: u16) -> mlua::Result<StatusCode> {
    let code = table.get::<Option<u16>>("status")?.unwrap_or(default);
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or_else(|| mlua::Error::runtime(format!("{code} is not an HTTP status")))
}

fn mode(name: &str) -> mlua::Result<Mode> {
    match name {
        "async" => Ok(Mode::Async),
        "sync" => Ok(Mode::Sync),
        "batch_async" => Ok(Mode::BatchAsync),
        "batch_sync" => Ok(Mode::BatchSync),
        other => Err(mlua::Error::runtime(format!("unknown mode {other:?}"))),
    }
}

/// mlua wraps callback errors in layers; the innermost message is the useful one.
fn flatten(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, traceback } => {
            let inner = flatten(cause);
            traceback
                .lines()
                .nth(1)
                .map_or(inner.clone(), |l| format!("{inner} ({})", l.trim()))
        }
        other => other.to_string(),
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::decode::BodyKind;

    fn run(script: &str, body: &str) -> Result<Verdict, HookError> {
        let limits = Limits {
            timeout: Duration::from_secs(1),
            max_instructions: 1_000_000,
            max_memory: 16 << 20,
        };
        let hook = LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap();
        let request = HookRequest::new(
            "t".into(),
            Mode::Async,
            axum::http::Method::POST,
            "/async/t".into(),
            None,
            axum::http::HeaderMap::new(),
            None,
            Bytes::from(body.to_string()),
            BodyKind::Json,
        );
        hook.call(Arc::new(request))
    }

    #[test]
    fn forward_is_shared_and_read_only() {
        let edit =
            r#"function on_request(req) req:set("n", req:get("a.b") + 1) return forward() end"#;
        match run(edit, r#"{"a":{"b":41}}"#).unwrap() {
            Verdict::Forward(f) => assert_eq!(f.body.unwrap(), &br#"{"a":{"b":41},"n":42}"#[..]),
            _ => panic!("not forwarded"),
        }
        let same = "function on_request(req) return forward() == forward() and forward() end";
        assert!(matches!(run(same, "{}").unwrap(), Verdict::Forward(_)));
        let tamper =
            r#"function on_request(req) local f = forward(); f.action = "reject"; return f end"#;
        let error = run(tamper, "{}").err().unwrap();
        assert!(error.0.contains("read-only"), "{error:?}");
    }
}
