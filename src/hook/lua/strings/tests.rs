#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use mlua::Lua;
use proptest::prelude::*;

use super::super::state::Budget;
use super::super::{Limits, LuaHook};
use super::install;

/// Every way the library reads a pattern, as one line per call: `pcall`'s status and the
/// values with their types, so that a wrong type or a changed message shows.
const PROBE: &str = r#"
local s, p, init, repl = ...
local function show(ok, ...)
  local out = { tostring(ok) }
  for i = 1, select('#', ...) do
    local v = select(i, ...)
    out[#out + 1] = type(v) .. ":" .. (type(v) == "table" and "{}" or tostring(v))
  end
  return table.concat(out, "|")
end
local function each(...)
  local seen = {}
  for a, b in string.gmatch(...) do
    seen[#seen + 1] = tostring(a) .. "," .. tostring(b)
    if #seen > 50 then break end
  end
  return table.concat(seen, ";")
end
return table.concat({
  show(pcall(string.find, s, p, init)),
  show(pcall(string.find, s, p, init, true)),
  show(pcall(string.match, s, p, init)),
  show(pcall(each, s, p)),
  show(pcall(each, s, p, init)),
  show(pcall(string.gsub, s, p, repl)),
  show(pcall(string.gsub, s, p, repl, 2)),
  show(pcall(string.gsub, s, p, function(a, b) if b then return tostring(a) .. "+" end end)),
  show(pcall(string.gsub, s, p, { a = "A", b = false, [1] = 1.5 })),
  show(pcall(string.gsub, s, p, { a = {} })),
  show(pcall(string.gsub, s, p, setmetatable({}, { __index = function(_, k) return k .. "!" end }))),
  show(pcall(string.gsub, s, p, setmetatable({}, { __index = function() error("in index") end }))),
  show(pcall(string.gsub, s, p, function() error("in function") end)),
  show(pcall(string.gsub, s, p, function() error({}) end)),
  -- Called from a Lua function, an error names that function's line (not in a tail call,
  -- where the port names the line that called that function).
  show(pcall(function() local a, b, c = string.find(s, p, init) return a, b, c end)),
  show(pcall(function() local a, b = string.match(s, p) return a, b end)),
  show(pcall(function() local a, n = string.gsub(s, p, repl) return a, n end)),
  show(pcall(function() local a = string.gsub(s, p, function(a) return a end) return a end)),
  show(pcall(function() local a, b for x, y in string.gmatch(s, p) do a, b = x, y end return a, b end)),
}, "\n")
"#;

fn limits(timeout: Duration) -> Limits {
    Limits {
        timeout,
        max_instructions: 10_000_000,
        max_memory: 16 << 20,
        max_depth: 128,
    }
}

fn hook(timeout: Duration) -> LuaHook {
    let script = "function on_request(req) return forward() end";
    LuaHook::from_source(Path::new("test.lua"), script, limits(timeout)).unwrap()
}

fn probe(lua: &Lua, s: &[u8], p: &[u8], init: i64, repl: &[u8]) -> String {
    let (s, p, repl) = (
        lua.create_string(s).unwrap(),
        lua.create_string(p).unwrap(),
        lua.create_string(repl).unwrap(),
    );
    lua.load(PROBE).call((s, p, init, repl)).unwrap()
}

/// Runs `f` on the hook's state (this thread's) under a fresh budget. What `f` returns is the
/// result, a budget error included: the budget is armed again after it, so that the hook does
/// not fail the call on top.
fn in_hook<R>(hook: &LuaHook, f: impl FnOnce(&Lua) -> R) -> R {
    hook.with_state(|state| {
        let arm = || {
            state
                .lua
                .app_data_ref::<Budget>()
                .unwrap()
                .arm(&hook.limits)
        };
        arm();
        let result = f(&state.lua);
        arm();
        Ok(result)
    })
    .unwrap()
}

/// Runs `code` in the hook's state under a fresh budget.
fn run_in<R: mlua::FromLuaMulti>(hook: &LuaHook, code: &str) -> Result<R, String> {
    in_hook(hook, |lua| lua.load(code).eval::<R>()).map_err(|e| e.to_string())
}

/// A state whose four functions are the port's for every call, none handed to C.
fn port() -> Lua {
    let lua = Lua::new();
    lua.set_app_data(Budget::lasting(Duration::from_secs(3600)));
    install(&lua, 16 << 20, -1).unwrap();
    lua
}

/// The C library, the port alone, and the hook's state (C for small worst cases, the port for
/// the rest) must give the same line for each call.
fn same(states: &States, s: &[u8], p: &[u8], init: i64, repl: &[u8]) {
    let (c, port, hook) = states;
    let expected = probe(c, s, p, init, repl);
    let what = || {
        format!(
            "subject {:?}, pattern {:?}, init {init}, replacement {:?}",
            String::from_utf8_lossy(s),
            String::from_utf8_lossy(p),
            String::from_utf8_lossy(repl)
        )
    };
    assert_eq!(probe(port, s, p, init, repl), expected, "port: {}", what());
    let hooked = in_hook(hook, |lua| probe(lua, s, p, init, repl));
    assert_eq!(hooked, expected, "hook: {}", what());
}

type States = (Lua, Lua, LuaHook);

fn states() -> States {
    (Lua::new(), port(), hook(Duration::from_secs(5)))
}

#[test]
fn the_port_answers_as_lua_does() {
    let states = states();
    let subjects: [&[u8]; 8] = [
        b"hello world from Lua",
        b"  key = value  ",
        b"f(a(b)c)d [x] THE (quick) fox",
        b"",
        b"aaa",
        b"x\0y\0z",
        b"2024-11-26T10:00:00Z, 3.14, -7",
        b"THE (quick) fox\n\tjumps",
    ];
    let patterns: [&[u8]; 52] = [
        b"",
        b"o",
        b"l+",
        b"l*",
        b"l-",
        b"l?",
        b"^h",
        b"^",
        b"$",
        b"d$",
        b"a$b",
        b"(o)(r)",
        b"()o()",
        b"(h)(e)(l)",
        b"%w+",
        b"%W+",
        b"%a%d",
        b"%s*(.-)%s*$",
        b"^%s*(.-)%s*$",
        b"[%w_]+",
        b"[^%s]+",
        b"[a-f]+",
        b"[]]",
        b"[^]]+",
        b"[%]]",
        b"[a-]",
        b"[-a]",
        b"%bxy",
        b"%b()",
        b"%b",
        b"%f[%w]%w+",
        b"%f[%W]",
        b"%f%w",
        b"(a)%1",
        b"(a*)%1",
        b"%1",
        b"%0",
        b"(()",
        b"(a",
        b"a)",
        b"%",
        b"[a",
        b"[^",
        b"%z",
        b"%Z+",
        b"(%d+)-(%d+)",
        b"(%d+)%.(%d+)",
        b"%x+",
        b"%p+",
        b"%c",
        b".-",
        b"\0",
    ];
    let replacements: [&[u8]; 6] = [b"<%0>", b"%1-%2", b"%%", b"%", b"x%9", b"%3"];
    for (i, s) in subjects.iter().enumerate() {
        for (j, p) in patterns.iter().enumerate() {
            let init = [1, 3, -2, 0, 100][(i + j) % 5];
            let repl = replacements[(i * 7 + j) % replacements.len()];
            same(&states, s, p, init, repl);
        }
    }
    // Thirty-two captures are allowed, not thirty-three; 200 nested calls, not more.
    same(&states, b"aaaa", &b"()".repeat(32), 1, b"%1");
    same(&states, b"aaaa", &b"()".repeat(33), 1, b"%1");
    same(&states, &[b'a'; 300], &b"a?".repeat(250), 1, b"");
    same(&states, &[b'a'; 300], &b"(a)".repeat(30), 1, b"%2");
}

fn pattern_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(b"ab().%[]^$*+-?01bfdsw ".to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn random_patterns_answer_as_lua_does(
        s in prop::collection::vec(prop::sample::select(b"ab()[] %-.\n0".to_vec()), 0..14),
        p in prop::collection::vec(pattern_byte(), 0..10),
        init in -16i64..16,
        repl in prop::collection::vec(prop::sample::select(b"x%012".to_vec()), 0..5),
    ) {
        thread_local! {
            static STATES: States = states();
        }
        STATES.with(|states| same(states, &s, &p, init, &repl));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Short plain searches go to C itself; long ones (here, past a megabyte) to the port's.
    #[test]
    fn long_plain_finds_answer_as_lua_does(
        s in prop::collection::vec(prop::sample::select(b"ab%.[".to_vec()), 0..40),
        p in prop::collection::vec(prop::sample::select(b"ab%.[".to_vec()), 0..6),
        init in -1_048_640i64..64,
    ) {
        thread_local! {
            static STATES: States = states();
        }
        const FIND: &str = r#"local s, p, init = ...
            local long = s .. string.rep("z", 1048576)
            local function show(...)
              local t = table.pack(...)
              for i = 1, t.n do t[i] = tostring(t[i]) end
              return table.concat(t, ",", 1, t.n)
            end
            return show(long:find(p, init, true)) .. " " .. show(pcall(long.find, long, p, init))"#;
        STATES.with(|(c, port, _)| {
            let call = |lua: &Lua| -> String {
                let args = (lua.create_string(&s).unwrap(), lua.create_string(&p).unwrap(), init);
                lua.load(FIND).call(args).unwrap()
            };
            let (expected, got) = (call(c), call(port));
            prop_assert_eq!(got, expected);
            Ok(())
        })?;
    }
}

#[test]
fn a_costly_match_stops_at_the_time_budget() {
    // `(.-)%s*$` over a long run of spaces is quadratic: Lua's C matcher takes minutes on this
    // and no budget reaches it.
    let hook = hook(Duration::from_millis(200));
    let started = Instant::now();
    let refused = run_in::<mlua::Value>(
        &hook,
        r#"return string.find(string.rep(" ", 200000) .. "x", "(.-)%s*$")"#,
    );
    let error = refused.unwrap_err();
    assert!(error.contains("budget"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // So does every other way in: a match, an iterator, a replacement.
    for call in [
        r#"string.match(s, "(.-)%s*$")"#,
        r#"s:gsub("(.-)%s*$", "%1")"#,
        r#"s:gsub("(.-)%s*$", function(x) return x end)"#,
        r#"(function() for x in s:gmatch("(.-)%s*$") do end end)()"#,
        r#"pcall(string.find, s, "(.-)%s*$") or string.find(s, "x")"#,
    ] {
        let code = format!(r#"local s = string.rep(" ", 200000) .. "x"; return {call}"#);
        let started = Instant::now();
        let Err(error) = run_in::<mlua::Value>(&hook, &code) else {
            panic!("{call}: ran to its end, in {:?}", started.elapsed());
        };
        assert!(error.contains("budget"), "{call}: {error}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{call}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn replacement_walks_and_long_sets_count_against_the_budget() {
    // Each match walks the replacement, and an empty match adds nothing to it: Lua's C gsub
    // took seconds here, where the memory limit never comes into play.
    let hook = hook(Duration::from_millis(200));
    for call in [
        r#"string.gsub(string.rep("a", 1000000), "", string.rep("%0", 5000))"#,
        r#"string.gsub(string.rep("a ", 150), "(%f[%a])", string.rep("%1", 2000000))"#,
        // A set four megabytes long is read at every step.
        r#"string.find(string.rep("a", 1000), "[" .. string.rep("b", 4000000) .. "]*x")"#,
    ] {
        let started = Instant::now();
        let Err(error) = run_in::<mlua::Value>(&hook, &format!("return {call}")) else {
            panic!("{call}: ran to its end, in {:?}", started.elapsed());
        };
        assert!(error.contains("budget"), "{call}: {error}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{call}: {took:?}");
    }
}

#[test]
fn a_plain_find_is_linear_in_the_subject() {
    // A needle that almost matches everywhere: a byte-by-byte compare is quadratic, and
    // would take minutes past the budget, where a linear search takes milliseconds.
    let hook = hook(Duration::from_secs(5));
    let found: Option<i64> = run_in(
        &hook,
        r#"local s = string.rep("a", 1000000)
           return (string.find(s, string.rep("a", 200000) .. "b", 1, true))"#,
    )
    .unwrap();
    assert_eq!(found, None);
    let found: i64 = run_in(&hook, r#"return (("xab"):rep(3):find("ab", 5))"#).unwrap();
    assert_eq!(found, 5);
}

#[test]
fn a_replacement_cannot_grow_past_the_memory_limit() {
    let hook = hook(Duration::from_secs(5));
    let error = run_in::<mlua::Value>(
        &hook,
        r#"return string.gsub(string.rep("a", 100000), "a+", string.rep("%0", 1000))"#,
    )
    .unwrap_err();
    assert!(error.contains("not enough memory"), "{error}");
    // What fits is made.
    let (out, n): (String, i64) = run_in(&hook, r#"return ("abc"):gsub("%w", "%0%0")"#).unwrap();
    assert_eq!((out.as_str(), n), ("aabbcc", 3));
}

#[test]
fn no_memory_limit_is_no_limit_for_a_replacement_either() {
    let limits = Limits {
        max_memory: 0,
        ..limits(Duration::from_secs(5))
    };
    let script = "function on_request(req) return forward() end";
    let hook = LuaHook::from_source(Path::new("test.lua"), script, limits).unwrap();
    // Long enough for the port, not the C library.
    let n: i64 = run_in(
        &hook,
        r#"local out, n = string.rep("a", 100000):gsub("a", "b") return n"#,
    )
    .unwrap();
    assert_eq!(n, 100_000);
}

#[test]
fn sort_and_concat_over_a_made_up_length_are_held_to_the_budget() {
    let hook = hook(Duration::from_secs(1));
    let started = std::time::Instant::now();
    for call in [
        "table.sort(t)",
        "table.sort(t, function(a, b) return a < b end)",
        "table.concat(t)",
    ] {
        // Elements made up by C functions, writes swallowed: nothing for the memory limit.
        let code = format!(
            "local t = setmetatable({{}}, {{ __len = function() return (1 << 31) - 2 end, \
             __index = rawlen, __newindex = rawequal }}) {call}"
        );
        // Stopped by the budget or by the memory the copy takes, whichever comes first.
        let error = run_in::<()>(&hook, &code).unwrap_err();
        assert!(
            error.contains("budget") || error.contains("not enough memory"),
            "{call}: {error}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // What they are for still works, on tables with metatables too.
    let (sorted, joined, made_up): (String, String, String) = run_in(
        &hook,
        r#"local t = setmetatable({3, 1, 2}, {})
           table.sort(t, function(a, b) return a > b end)
           local u = {"b", "c", "a"}
           table.sort(u)
           local x = setmetatable({}, { __index = function() return "x" end })
           return table.concat(t, ","), table.concat(setmetatable(u, {}), "", 2, 3),
               table.concat(x, ",", 1, 3)"#,
    )
    .unwrap();
    assert_eq!(
        (sorted.as_str(), joined.as_str(), made_up.as_str()),
        ("3,2,1", "bc", "x,x,x")
    );
    // The length is read once, as C reads it, holes and all.
    let (holes, bad): (String, String) = run_in(
        &hook,
        r#"local t = setmetatable({3, nil, 1}, { __len = function() return 3 end })
           table.sort(t, function(a, b)
             if a == nil then return false elseif b == nil then return true end
             return a < b
           end)
           local ok, e = pcall(table.sort, setmetatable({}, { __len = function() return 2.5 end }))
           return tostring(t[1]) .. tostring(t[2]) .. tostring(t[3]), e"#,
    )
    .unwrap();
    assert_eq!(holes, "13nil");
    assert!(bad.contains("not an integer"), "{bad}");
    // A C comparator costs VM instructions: a long sort with one meets the budget.
    let error = run_in::<()>(
        &hook,
        "local t = {} for i = 1, 200000 do t[i] = (i * 7919) % 200000 end
         table.sort(t, rawequal)",
    )
    .unwrap_err();
    assert!(error.contains("budget"), "{error}");
}

#[test]
fn a_script_cannot_reach_the_library_s_internals() {
    let hook = hook(Duration::from_secs(1));
    let (kind, same): (String, bool) = run_in(
        &hook,
        r#"error = nil; tostring = nil
           local ok, e = pcall(string.find, "x", "[")
           return type(e), ("x"):find("x") == string.find("x", "x")"#,
    )
    .unwrap();
    assert_eq!((kind.as_str(), same), ("string", true));
}
