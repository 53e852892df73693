//! Lua hooks (Lua 5.4). Each worker thread has its own sandboxed state per script: no io, os,
//! package or debug, no file loading, an instruction budget, a wall-clock budget and a memory
//! limit. A script sees the request through accessors (`req:get("user.id")`), so a body is only
//! parsed when the script asks, and never turned into a Lua table whole.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Failure, Hook, HookError, HookFuture, HookRequest, Verdict, ready};
use crate::throttle::throttled;

mod convert;
mod pattern;
mod raw;
mod request;
mod state;
mod strings;
mod tree;
mod verdict;

use request::LuaRequest;
use state::{State, arm, spent, within_budget};
use verdict::verdict;

/// Limits of one script.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock budget per call.
    pub timeout: Duration,
    /// VM instructions per call.
    pub max_instructions: u64,
    /// Bytes the state may allocate.
    pub max_memory: usize,
    /// Deepest nesting a body may have, before and after edits (`server.max_json_depth`).
    pub max_depth: usize,
}

impl Limits {
    /// The limits `[hook]` and `server.max_json_depth` set.
    pub fn of(config: &crate::Config) -> Limits {
        Limits {
            timeout: config.hook.timeout,
            max_instructions: config.hook.max_instructions,
            max_memory: config.hook.max_memory_bytes,
            max_depth: config.server.max_json_depth,
        }
    }
}

/// A Lua script serving as a hook.
pub struct LuaHook {
    id: u64,
    path: PathBuf,
    source: Arc<str>,
    limits: Limits,
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
            arm(&state.lua, &self.limits).map_err(|e| HookError(e.to_string()))?;
            let mut result = f(state);
            // What the VM's checks did not stop (a C function that ran on past the budget)
            // fails all the same once it returns: the answer is late, and the budget spent.
            if result.is_ok() && spent(&state.lua) {
                result = Err(mlua::Error::runtime("time budget exceeded"));
            }
            // A script stopped by its memory limit or a budget may have left its globals
            // full or half-changed, and would fail the same way on every later call: the next
            // call gets a new state instead. So does a state left nearly full whatever the
            // call returned: a script that catches its memory errors with `pcall` (a cache
            // of what clients sent) would otherwise fail for good.
            let why = match &result {
                Err(e) if out_of_memory(e) || spent(&state.lua) => Some(flatten(e)),
                _ if nearly_full(state, self.limits.max_memory) => {
                    Some("memory nearly full after the call".into())
                }
                _ => None,
            };
            if let Some(why) = why {
                throttled!(warn, "hook state replaced", script = %self.path.display(), error = %why);
                states.swap_remove(index);
            }
            result.map_err(|e| HookError(format!("{}: {}", self.path.display(), flatten(&e))))
        })
    }

    fn call(&self, request: Arc<HookRequest>) -> Result<Verdict, HookError> {
        self.with_state(|state| {
            *state.req.borrow_mut::<LuaRequest>()? =
                LuaRequest::new(request, self.limits.max_memory, self.limits.max_depth);
            let result = state.on_request.call::<mlua::Value>(&state.req);
            // Emptied whether or not the call failed, so no request outlives its call.
            let done = std::mem::replace(
                &mut *state.req.borrow_mut::<LuaRequest>()?,
                LuaRequest::idle(),
            );
            // The script failed on the client's body, which is not JSON: that is the 400 (or
            // 413) the request would get without a hook. Any other failure stays the hook's.
            if let Some(why) = result.as_ref().err().and_then(convert::BadBody::of) {
                return Ok(Verdict::Reject {
                    status: crate::error::IngestError::from(why.clone()).status(),
                    message: why.to_string(),
                });
            }
            verdict(result?, done.into_forward()?, &state.forward)
        })
    }
}

impl Hook for LuaHook {
    fn on_request(&self, request: Arc<HookRequest>) -> HookFuture {
        ready(self.call(request))
    }

    fn on_error(&self, failure: &Failure<'_>) {
        let result = self.with_state(|state| match &state.on_error {
            Some(f) => f.call::<()>((
                failure.status.as_u16(),
                failure.message,
                failure.topic,
                failure.request_id,
            )),
            None => Ok(()),
        });
        // A line a second: an `on_error` that fails does so for every failed request.
        if let Err(e) = result {
            throttled!(warn, "lua on_error failed", error = %e);
        }
    }

    fn bounds_itself(&self) -> bool {
        true
    }
}

/// Whether the state has filled more than three quarters of the room its script's top-level
/// code left it under `limit` (0: none), after a collection; only collected past seven eighths,
/// which a script that stays well within its room never pays for. Measured from what a new
/// state starts with, so that replacing it gains room: a script whose tables fill most of the
/// limit from the start is not replaced on every call.
fn nearly_full(state: &State, limit: usize) -> bool {
    let room = limit.saturating_sub(state.resident);
    let over = |eighths: usize| state.lua.used_memory() > state.resident + room / 8 * eighths;
    if limit == 0 || !over(7) {
        return false;
    }
    // A collection cannot fail for want of memory (Lua 5.4 frees, it does not allocate).
    let _ = state.lua.gc_collect();
    over(6)
}

/// Whether `e` is the memory limit, also when it struck inside a `req` method (mlua wraps it
/// in the callback's error).
fn out_of_memory(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => out_of_memory(cause),
        mlua::Error::WithContext { cause, .. } => out_of_memory(cause),
        _ => false,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Mode;
    use crate::decode::BodyKind;
    use bytes::Bytes;

    /// The tests' limits, with bodies at most `max_depth` deep.
    fn limits(max_depth: usize) -> Limits {
        Limits {
            timeout: Duration::from_secs(1),
            max_instructions: 1_000_000,
            max_memory: 16 << 20,
            max_depth,
        }
    }

    fn hook(script: &str) -> LuaHook {
        LuaHook::from_source(Path::new("test.lua"), script, limits(128)).unwrap()
    }

    /// [`hook`] with a time budget wide enough that another limit is the one a call reaches:
    /// work of megabytes in a debug build on a busy machine can take most of a second.
    fn unhurried(script: &str) -> LuaHook {
        let limits = Limits {
            timeout: Duration::from_secs(60),
            ..limits(128)
        };
        LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap()
    }

    fn request(body: &str) -> Arc<HookRequest> {
        request_of(BodyKind::Json, body)
    }

    fn request_of(kind: BodyKind, body: &str) -> Arc<HookRequest> {
        Arc::new(HookRequest::new(
            "t".into(),
            Mode::Async,
            axum::http::Method::POST,
            "/async/t".into(),
            None,
            axum::http::HeaderMap::new(),
            None,
            Bytes::from(body.to_string()),
            kind,
        ))
    }

    fn run(script: &str, body: &str) -> Result<Verdict, HookError> {
        hook(script).call(request(body))
    }

    #[test]
    fn calls_leave_nothing_behind_in_the_lua_heap() {
        // A new userdata per call used to pile up faster than the collector ran its finalizers.
        let hook = hook(
            r#"function on_request(req)
                req:set("seen", req:get("user.id") ~= nil)
                return forward()
            end"#,
        );
        let call = || {
            let verdict = hook.call(request(r#"{"user":{"id":7}}"#));
            assert!(matches!(verdict, Ok(Verdict::Forward(_))), "{verdict:?}");
        };
        let used = || hook.with_state(|s| Ok(s.lua.used_memory())).unwrap();
        call();
        let before = used();
        for _ in 0..5_000 {
            call();
        }
        assert!(used() <= before + 4096, "{before} -> {} bytes", used());
    }

    #[test]
    fn a_state_filled_by_what_clients_send_is_replaced_though_the_script_catches_the_error() {
        // A cache of the ids seen, behind a `pcall` that turns any failure into a 500: once
        // the heap is full every call fails, and the script catches each failure itself.
        let script = r#"
            seen = {}
            local FAILED = reject(500, "internal error")
            local function handle(req)
                local id = req:get("id")
                if seen[id] then return reject(409, "seen") end
                seen[id] = string.rep("x", 1000) .. id
                return forward()
            end
            function on_request(req)
                local ok, verdict = pcall(handle, req)
                if not ok then return FAILED end
                return verdict
            end"#;
        let limits = Limits {
            max_memory: 1 << 20,
            ..limits(128)
        };
        let hook = LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap();
        for i in 0..4_000 {
            let verdict = hook.call(request(&format!(r#"{{"id":"{i}"}}"#)));
            assert!(
                matches!(verdict, Ok(Verdict::Forward(_))),
                "call {i}: {verdict:?}"
            );
        }
    }

    #[test]
    fn a_script_whose_tables_fill_most_of_the_limit_from_the_start_keeps_its_state() {
        // A lookup table built by the top-level code: replacing the state would gain nothing,
        // and would run the top level again on every call, losing the globals each time.
        let script = r#"
            lookup = {}
            for i = 1, 75000 do lookup[i] = {i} end
            function on_request(req)
                calls = (calls or 0) + 1
                return reject(400, tostring(calls))
            end"#;
        let limits = Limits {
            max_memory: 8 << 20,
            ..limits(128)
        };
        let hook = LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap();
        let used = hook.with_state(|s| Ok(s.lua.used_memory())).unwrap();
        assert!(
            used > (8 << 20) / 8 * 7,
            "the test needs a state past 7/8: {used}"
        );
        for want in 1..=10 {
            match hook.call(request("{}")) {
                Ok(Verdict::Reject { message, .. }) => assert_eq!(message, want.to_string()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_refused_edit_through_a_tree_leaves_the_body_as_it_came() {
        // A key twice on the path takes the edit through a tree; the edit is refused (`a` is
        // a number), and the body must not be rewritten from that tree.
        let verdict = run(
            r#"function on_request(req)
                assert(not pcall(req.set, req, "u.a.b", 1))
                return forward()
            end"#,
            r#"{"id": 123456789012345678901234567890, "u": {"a": 1}, "u": {"a": 2}}"#,
        );
        match verdict {
            Ok(Verdict::Forward(forward)) => assert_eq!(forward.body, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn edits_kept_in_a_tree_are_charged_what_the_tree_holds() {
        // A key twice keeps edits in a tree, where 100 000 zeros take some 6 MB, not the
        // 200 KB of their text: the 16 MiB allows two such edits, not eighty.
        let verdict = unhurried(
            r#"function on_request(req)
                local t = {}
                for i = 1, 100000 do t[i] = 0 end
                local n = 0
                while n < 100 and pcall(req.set, req, "u.k" .. n, t) do n = n + 1 end
                return reject(400, tostring(n))
            end"#,
        )
        .call(request(r#"{"u":{},"u":{}}"#));
        match verdict {
            Ok(Verdict::Reject { message, .. }) => {
                let n: usize = message.parse().unwrap();
                assert!((1..=2).contains(&n), "{n} edits");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_kept_req_is_the_request_being_handled() {
        let hook = hook(
            r#"function on_request(req)
                local previous = kept and kept:get("n")
                kept = req
                if previous then return reject(400, tostring(previous)) end
                return forward()
            end"#,
        );
        assert!(matches!(
            hook.call(request(r#"{"n":1}"#)),
            Ok(Verdict::Forward(_))
        ));
        match hook.call(request(r#"{"n":2}"#)) {
            Ok(Verdict::Reject { message, .. }) => assert_eq!(message, "2"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_could_outrun_the_budgets_or_the_stack_is_an_error() {
        let cases = [
            (
                "setmetatable({}, {__gc = function() while true do end end}) return forward()",
                "__gc is not allowed",
            ),
            (
                r#"req:set(string.rep("a.", 100000) .. "z", 1) return forward()"#,
                "path deeper than 128",
            ),
            (
                r#"local v = string.rep("x", 1000000)
                for i = 1, 300 do req:set_header("h", v) end
                return forward()"#,
                "hook.max_memory_bytes",
            ),
            (
                r#"local t = {string.rep("x", 1000000)}
                for i = 1, 300 do req:set("k" .. i, t) end
                return forward()"#,
                "hook.max_memory_bytes",
            ),
            ("req:set_partition(-1) return forward()", "numbered from 0"),
            // A message handler past the budget would run with the budget's checks off.
            (
                "xpcall(function() while true do end end, function(e) while true do end end)
                return forward()",
                "instruction budget exceeded",
            ),
            (
                "xpcall(function() error('x') end, function(e) while true do end end)
                return forward()",
                "instruction budget exceeded",
            ),
            ("return respond(700, 'x')", "not an HTTP status"),
            // A script's own `error` must not turn the guards off.
            (
                "error = function() end
                while true do pcall(function() while true do end end) end",
                "instruction budget exceeded",
            ),
            (
                "error = function() end
                setmetatable({}, {__gc = function() end}) return forward()",
                "__gc is not allowed",
            ),
        ];
        for (body, want) in cases {
            let script = format!("function on_request(req) {body} end");
            let error = unhurried(&script).call(request(r#"{"a":1}"#)).err();
            assert!(
                error.as_ref().is_some_and(|e| e.0.contains(want)),
                "{body}: {error:?}"
            );
        }
        // Within the limits, the same calls work.
        let fine = r#"function on_request(req)
            setmetatable({}, {__index = {}})
            req:set("x.y.z", 1)
            req:set_header("h", string.rep("x", 1000))
            req:set_partition(0)
            return forward()
        end"#;
        assert!(matches!(run(fine, "{}"), Ok(Verdict::Forward(_))));
    }

    #[test]
    fn top_level_code_runs_under_the_budgets() {
        let limits = limits(128);
        for script in [
            "while true do end",
            "while true do pcall(function() while true do end end) end",
            "xpcall(function() while true do end end, function(e) while true do end end)",
        ] {
            let source = format!("{script}\nfunction on_request(req) return forward() end");
            let error = LuaHook::from_source(Path::new("loop.lua"), &source, limits).err();
            assert!(
                error
                    .as_ref()
                    .is_some_and(|e| e.contains("instruction budget exceeded")),
                "{script}: {error:?}"
            );
        }
        // Top-level work within the budget is fine, and calls get a budget of their own.
        let hook = hook(
            "local t = {} for i = 1, 50000 do t[i] = i end
            function on_request(req) for i = 1, 50000 do t[i] = i end return forward() end",
        );
        assert!(matches!(hook.call(request("{}")), Ok(Verdict::Forward(_))));
    }

    #[test]
    fn a_state_a_limit_stopped_is_replaced() {
        // Each call keeps 6 MiB in a global (and needs more while `string.rep` builds it): the
        // 16 MiB limit stops one of the first calls.
        let hook = hook(
            r#"kept = kept or {}
            function on_request(req)
                kept[#kept + 1] = string.rep("x", 6 << 20)
                return forward()
            end"#,
        );
        assert!(fails_then_recovers(&hook, "{}") < 20);
    }

    /// Calls `hook` forty times with `body`: calls fail on the memory limit, and the call
    /// after each failure runs on a new state. Returns when the first failure came.
    fn fails_then_recovers(hook: &LuaHook, body: &str) -> usize {
        let results: Vec<bool> = (0..40).map(|_| hook.call(request(body)).is_ok()).collect();
        let first_failure = results.iter().position(|ok| !ok).expect("a call failed");
        assert!(
            results.windows(2).all(|pair| pair[0] || pair[1]),
            "the call after a failure runs on a new state: {results:?}"
        );
        first_failure
    }

    #[test]
    fn the_memory_limit_inside_a_req_method_replaces_the_state_too() {
        // The limit strikes inside `req:body()`, a Rust callback: mlua wraps the error.
        let hook = hook(
            r#"kept = kept or {}
            function on_request(req)
                kept[#kept + 1] = req:body()
                return forward()
            end"#,
        );
        fails_then_recovers(&hook, &format!("\"{}\"", "x".repeat(6 << 20)));
    }

    #[test]
    fn edits_are_measured_before_they_are_copied_out_of_lua() {
        let started = std::time::Instant::now();
        // Twenty-five levels of a table held twice: 32 million leaves for a few hundred bytes
        // of Lua heap, converted outside its limit. Measured, the call stops at the limit's
        // few megabytes; converted first, it would take many times the bound below.
        let shared = r#"function on_request(req)
            local t = {1}
            for i = 1, 25 do t = {t, t} end
            req:set("x", t)
            return forward()
        end"#;
        let err = unhurried(shared).call(request("{}")).unwrap_err();
        assert!(err.0.contains("max_memory_bytes"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20));
        for value in ["0/0", "1e309", "-1e309", "{1, 0/0}"] {
            let script =
                format!("function on_request(req) req:set(\"r\", {value}) return forward() end");
            let err = run(&script, "{}").unwrap_err();
            assert!(err.0.contains("not JSON"), "{value}: {err}");
        }
    }

    #[test]
    fn print_runs_no_metamethod_and_logs_a_bounded_line() {
        // A `__tostring` that loops would swallow the budget's error inside mlua's own
        // protected call, and the script would run on for ever.
        let looping = r#"function on_request(req)
            local t = setmetatable({}, {__tostring = function() while true do end end})
            while true do print(t) end
        end"#;
        assert!(run(looping, "{}").is_err());
        let lua = mlua::Lua::new();
        let big = lua.create_string("x".repeat(1 << 20)).unwrap();
        let line = state::print_line(&[mlua::Value::String(big.clone()), mlua::Value::String(big)]);
        assert_eq!(line.len(), 4096);
    }

    #[test]
    fn library_loops_that_run_in_c_are_bounded() {
        for call in [
            "string.rep('', math.maxinteger)",
            "('').rep('', math.maxinteger, '')",
            "table.move({}, 1, math.maxinteger // 2, 1)",
            "table.insert(setmetatable({}, {__len = function() return math.maxinteger - 1 end}), 1, 1)",
            "table.remove(setmetatable({}, {__len = function() return math.maxinteger - 1 end}), 1)",
            // Counts as numeric strings, as the C functions take them.
            "string.rep('', '9e18')",
            "table.move({}, 1, '9e18', 1)",
            // A __len that answers 0 the first time it is asked, and nearly 2^63 after.
            "local n = 0 local t = setmetatable({}, {__len = function() n = n + 1 \
             return n == 1 and 0 or math.maxinteger - 1 end}) table.insert(t, 1, 1)",
            "local n = 0 local t = setmetatable({}, {__len = function() n = n + 1 \
             return n == 1 and 0 or math.maxinteger - 1 end}) table.remove(t, 1)",
            // A C function as the metamethod a C loop calls for each element runs no VM
            // instruction: a move into a table whose __newindex unpacks a million values each
            // time, and an unpack whose __index logs.
            "local a = {} for i = 1, 3000 do a[i] = 900000 end \
             table.move(a, 1, 3000, 1, setmetatable({}, {__newindex = table.unpack}))",
            "table.unpack(setmetatable({}, {__index = print}), 1, 999000)",
            "table.unpack(setmetatable({}, {__len = function() return math.maxinteger end}))",
        ]
        .into_iter()
        .map(String::from)
        .chain(["insert(t, 1, 1)", "remove(t, 1)"].map(|call| {
            // Forty-one entries, all in the hash part (a constructor sizes it, and nothing
            // rehashes), whose border, the length, is 2^40.
            let keys: Vec<String> = (0..=40).map(|i| format!("[{}] = 1", 1u64 << i)).collect();
            format!("local t = {{{}}} table.{call}", keys.join(", "))
        }))
        {
            let script = format!("function on_request(req) {call} return forward() end");
            // A short budget, so that a loop stopped at it ends far inside the bound on a busy
            // machine; unbounded, these run for hours.
            let limits = Limits {
                timeout: Duration::from_millis(300),
                ..limits(128)
            };
            let hook = LuaHook::from_source(Path::new("test.lua"), &script, limits).unwrap();
            let started = std::time::Instant::now();
            let _ = hook.call(request("{}"));
            assert!(started.elapsed() < Duration::from_secs(3), "{call}");
        }
        // What they are for still works.
        let script = r#"function on_request(req)
            local t = {1, 2}
            table.insert(t, 3)
            table.insert(t, 1, 0)
            table.remove(t, 2)
            local m = table.move(t, 1, 3, 1, {})
            -- The same on a table with a metatable, shifted in Lua: {0, 2, 3} and 3 again.
            local u = setmetatable({1, 2}, {})
            table.insert(u, 3)
            table.insert(u, 1, 0)
            local removed = table.remove(u, 2)
            assert(removed == 1 and table.remove(u) == 3 and #u == 2 and u[1] == 0 and u[2] == 2)
            assert(table.remove(setmetatable({}, {})) == nil)
            assert(not pcall(table.insert, u, 9, 1) and not pcall(table.insert, u, 1, 2, 3))
            -- Unpacked and moved in Lua, as C would.
            local w = setmetatable({10, 20, 30}, {})
            local x, y, z = table.unpack(w)
            assert(x == 10 and y == 20 and z == 30 and select('#', table.unpack(w, 2, 3)) == 2)
            assert(select('#', table.unpack(w, 3, 2)) == 0)
            assert(table.move(w, 1, 3, 2) == w and w[2] == 10 and w[3] == 20 and w[4] == 30)
            assert(table.move({1, 2, 3}, 1, 3, 1, setmetatable({}, {}))[3] == 3)
            assert(not pcall(table.move, w, 1, 2, math.maxinteger))
            req:set("r", string.rep("ab", 3, "-") .. #m .. string.rep("", 5) .. string.rep(7, "2"))
            return forward()
        end"#;
        let Verdict::Forward(f) = run(script, "{}").unwrap() else {
            panic!("not forwarded")
        };
        assert_eq!(f.body.unwrap(), &br#"{"r":"ab-ab-ab377"}"#[..]);
    }

    #[test]
    fn methods_over_a_large_body_stop_at_the_time_budget() {
        // Each `get` parses and converts a 100,000-element array. The VM checks the budget every
        // hundred instructions, some two dozen such calls: unless `get` checks it too, a call
        // past the budget runs that many more.
        let items: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
        let body = format!("{{\"a\":[{}]}}", items.join(","));
        let one = "function on_request(req) req:get('a') return forward() end";
        let one_get = (0..2)
            .map(|_| {
                let started = std::time::Instant::now();
                assert!(unhurried(one).call(request(&body)).is_ok());
                started.elapsed()
            })
            .max()
            .unwrap_or_default();
        let limits = Limits {
            timeout: Duration::from_millis(200),
            max_instructions: u64::MAX / 2,
            max_memory: 256 << 20,
            max_depth: 128,
        };
        let script = "function on_request(req) while true do req:get('a') end end";
        let hook = LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap();
        let started = std::time::Instant::now();
        assert!(hook.call(request(&body)).is_err());
        let took = started.elapsed();
        assert!(
            took < limits.timeout + one_get * 10,
            "{took:?}, one get {one_get:?}"
        );
    }

    #[test]
    fn closers_that_run_after_the_budget_are_held_to_it() {
        // Lua runs every to-be-closed variable's closer as the budget's error unwinds: each
        // closer here would sort 100,000 elements, a hundred times over.
        let limits = Limits {
            timeout: Duration::from_millis(200),
            max_memory: 64 << 20,
            ..limits(128)
        };
        // A closer that sorts, and one whose C calls no guard knows (utf8.len over 8 MiB,
        // three times in a few instructions), in each of 101 frames. (The innermost frame's,
        // where the budget runs out, run unchecked inside the hook: see `budget_hook`. Each
        // closer takes tens of milliseconds in a debug build, so unguarded, the hundred frames
        // would take seconds past the bound.)
        let script = r#"
            local function rec(t, s, n)
              local c <close> = setmetatable({}, {__close = function() table.sort(t) end})
              local d <close> = setmetatable({}, {__close = function()
                for i = 1, 3 do utf8.len(s) end
              end})
              if n > 0 then return rec(t, s, n - 1) end
              while true do end
            end
            function on_request(req)
              local t = {}
              for i = 1, 100000 do t[i] = -i end
              rec(t, string.rep("x", 8 << 20), 100)
            end"#;
        let hook = LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap();
        let started = std::time::Instant::now();
        let error = hook
            .call(request("{}"))
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(error.contains("budget"), "{error}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        // Strings' shared metatable, where a C function could be made every string's closer,
        // is out of reach.
        let script = r#"function on_request(req)
            return respond(200, tostring(getmetatable("")))
        end"#;
        match run(script, "{}") {
            Ok(Verdict::Respond(r)) => assert_eq!(&r.body[..], b"false"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_script_reads_how_the_body_is_read() {
        let script = "function on_request(req) return respond(200, req:kind()) end";
        for (kind, name) in [
            (BodyKind::Json, "json"),
            (BodyKind::Form, "form"),
            (BodyKind::Ndjson, "ndjson"),
            (BodyKind::Raw, "raw"),
        ] {
            match hook(script).call(request_of(kind, "{}")) {
                Ok(Verdict::Respond(r)) => assert_eq!(&r.body[..], name.as_bytes()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_call_that_returns_past_its_budget_fails() {
        // Long C calls a few instructions apart, which the VM's checks between instructions
        // may not see: the call fails as it returns, the budget spent.
        let limits = Limits {
            timeout: Duration::from_millis(20),
            ..limits(128)
        };
        let script = r#"function on_request(req)
            local s = string.rep("\u{e9}", 3 * 1024 * 1024)
            local n = utf8.len(s) + utf8.len(s) + utf8.len(s) + utf8.len(s)
            return forward()
        end"#;
        let hook = LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap();
        let error = hook.call(request("{}")).err();
        assert!(
            error.as_ref().is_some_and(|e| e.0.contains("budget")),
            "{error:?}"
        );
    }

    #[test]
    fn a_forms_body_is_the_record_it_becomes() {
        let form = || request_of(BodyKind::Form, "a=1&b=x+y&a=2");
        let json = br#"{"a":["1","2"],"b":"x y"}"#;
        let script = "function on_request(req) return respond(200, req:body()) end";
        match hook(script).call(form()) {
            Ok(Verdict::Respond(r)) => assert_eq!(&r.body[..], json),
            other => panic!("{other:?}"),
        }
        // Handed back as the body, it is what the route would have produced.
        let script = "function on_request(req) req:set_body(req:body()) return forward() end";
        match hook(script).call(form()) {
            Ok(Verdict::Forward(f)) => assert_eq!(f.body.as_deref(), Some(&json[..])),
            other => panic!("{other:?}"),
        }
        // After an edit, the edited object.
        let script =
            r#"function on_request(req) req:set("c", 1) return respond(200, req:body()) end"#;
        match hook(script).call(form()) {
            Ok(Verdict::Respond(r)) => {
                assert_eq!(&r.body[..], br#"{"a":["1","2"],"b":"x y","c":1}"#)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strings_that_are_not_utf8_are_written_with_replacement_characters() {
        let script = r#"function on_request(req)
            req:set("ua", "caf\xe9 " .. ("\u{e9}"):sub(1, 1))
            req:set("t", {k = {"\xfe"}})
            return forward()
        end"#;
        match run(script, "{}") {
            Ok(Verdict::Forward(f)) => {
                assert_eq!(
                    std::str::from_utf8(&f.body.unwrap()).unwrap(),
                    "{\"ua\":\"caf\u{fffd} \u{fffd}\",\"t\":{\"k\":[\"\u{fffd}\"]}}"
                );
            }
            other => panic!("{other:?}"),
        }
        let script = r#"function on_request(req) return reject(400, "bad: caf\xe9", 1) end"#;
        match run(script, "{}") {
            Ok(Verdict::Reject { message, .. }) => assert_eq!(message, "bad: caf\u{fffd}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn print_takes_any_value() {
        let script = r#"function on_request(req)
            print("x", nil, true, 1, 2.5, {}, req)
            return forward()
        end"#;
        assert!(matches!(run(script, "{}"), Ok(Verdict::Forward(_))));
    }

    #[test]
    fn edits_keep_to_the_servers_json_depth() {
        let limits = limits(3);
        let hook = |body: &str| {
            let script = format!("function on_request(req) {body} return forward() end");
            LuaHook::from_source(Path::new("t.lua"), &script, limits).unwrap()
        };
        let deep = r#"{"a":{"b":{"c":{"d":1}}}}"#;
        match hook("req:get('a')").call(request(deep)) {
            Ok(Verdict::Reject { status, .. }) => assert_eq!(status, 400),
            other => panic!("a body deeper than the server takes: {other:?}"),
        }
        assert!(hook("req:set('a.b.c.d', 1)").call(request("{}")).is_err());
        assert!(
            hook("req:set('a', {b = {c = {1}}})")
                .call(request("{}"))
                .is_err()
        );
        assert!(matches!(
            hook("req:set('a.b', {1})").call(request("{}")),
            Ok(Verdict::Forward(_))
        ));
    }

    #[test]
    fn tables_become_json_whole_or_not_at_all() {
        let body_after = |edit: &str| match run(
            &format!("function on_request(req) {edit} return forward() end"),
            r#"{"a":1}"#,
        ) {
            Ok(Verdict::Forward(f)) => Ok(String::from_utf8(f.body.unwrap().to_vec()).unwrap()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.0),
        };
        assert_eq!(
            body_after(r#"req:set("t", {1, 2, 3})"#).unwrap(),
            r#"{"a":1,"t":[1,2,3]}"#
        );
        assert_eq!(
            body_after(r#"req:set("t.u", {[1]=1, [3]=3})"#).unwrap(),
            r#"{"a":1,"t":{"u":[1,null,3]}}"#,
            "a hole is a null, not the end of the array"
        );
        // Both array and map: an error, where the map part used to vanish.
        assert!(body_after(r#"req:set("t", {1, 2, x = 3})"#).is_err());
        // Nested past what a body may be, counting the path.
        let deep = r#"local t = {} for i = 1, 120 do t = {t} end
            req:set(string.rep("p.", 20) .. "z", t)"#;
        assert!(body_after(deep).unwrap_err().contains("deeper than 128"));
        // body() shows the edits made so far.
        let echoed = body_after(r#"req:set("c", 3) req:set_body(req:body())"#).unwrap();
        assert_eq!(echoed, r#"{"a":1,"c":3}"#);
    }

    #[test]
    fn tables_from_get_keep_their_kind_when_written_back() {
        let after = |edit: &str, body: &str| match run(
            &format!("function on_request(req) {edit} return forward() end"),
            body,
        ) {
            Ok(Verdict::Forward(f)) => Ok(String::from_utf8(f.body.unwrap().to_vec()).unwrap()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.0),
        };
        let u = r#"local u = req:get("u") u.seen = true req:set("u", u)"#;
        // Empty objects stay objects (mlua wrote every empty table as []), empty arrays
        // arrays, nulls nulls; keys come out sorted.
        assert_eq!(
            after(u, r#"{"u":{"z":1,"prefs":{},"tags":[],"n":null}}"#).unwrap(),
            r#"{"u":{"n":null,"prefs":{},"seen":true,"tags":[],"z":1}}"#
        );
        assert_eq!(
            after(
                r#"req:set("o", {}) req:set("a", array()) req:set("b", array(1, nil, 3))"#,
                "{}"
            )
            .unwrap(),
            r#"{"o":{},"a":[],"b":[1,null,3]}"#
        );
        // A null inside a table is `null`, which a script can test for.
        assert_eq!(
            after(
                r#"req:set("is", req:get("u").n == null)"#,
                r#"{"u":{"n":null}}"#
            )
            .unwrap(),
            r#"{"u":{"n":null},"is":true}"#
        );
        // An array from get with a gap past its end: a null, not the end of the array; with
        // a string key: an error, not a key dropped without a word.
        let tags = r#"local t = req:get("t") t[4] = "d" req:set("t", t)"#;
        assert_eq!(
            after(tags, r#"{"t":["a","b"]}"#).unwrap(),
            r#"{"t":["a","b",null,"d"]}"#
        );
        let keyed = r#"local t = req:get("t") t.primary = "a" req:set("t", t)"#;
        assert!(after(keyed, r#"{"t":["a"]}"#).unwrap_err().contains("both"));
        assert!(
            after(r#"req:set("t", {[1e9] = 1})"#, "{}")
                .unwrap_err()
                .contains("sparse")
        );
        assert!(after(r#"req:set("t", {[true] = 1})"#, "{}").is_err());
        // A key with a dot in it is read through its parent: the whole body, at the top.
        let dotted = r#"req:set("n", req:get("")["card.number"])"#;
        assert_eq!(
            after(dotted, r#"{"card.number":"4111"}"#).unwrap(),
            r#"{"card.number":"4111","n":"4111"}"#
        );
    }

    #[test]
    fn edits_leave_what_they_do_not_touch_as_it_came() {
        let after = |edit: &str, body: &str| match run(
            &format!("function on_request(req) {edit} return forward() end"),
            body,
        ) {
            Ok(Verdict::Forward(f)) => String::from_utf8(f.body.unwrap().to_vec()).unwrap(),
            other => panic!("{other:?}"),
        };
        // Integers past a double and spacing, around an edit below the top level, after a
        // failed one, and in a body that is not an object.
        let big = r#"{"id": 123456789012345678901234567890, "a": {"x": 1.10}}"#;
        assert_eq!(
            after(r#"req:set("a.y", 2)"#, big),
            r#"{"id": 123456789012345678901234567890, "a": {"x": 1.10,"y":2}}"#
        );
        assert_eq!(
            after(r#"pcall(req.set, req, "id.b", 1) req:set("z", 1)"#, big),
            r#"{"id": 123456789012345678901234567890, "a": {"x": 1.10},"z":1}"#
        );
        let array = r#"[{"id":18446744073709551616}, {"x":1.10}, 3]"#;
        assert_eq!(
            after(r#"req:delete("1") req:set("1", 4)"#, array),
            r#"[{"id":18446744073709551616}, 4]"#
        );
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
