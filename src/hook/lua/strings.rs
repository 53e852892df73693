//! `string.find`, `match`, `gmatch` and `gsub` on [`super::pattern`]'s matcher, which runs
//! under the hook's budget where the library's own C code does not. The searching is here;
//! the Lua side of the library (iterators, replacement functions and tables, raising errors
//! as Lua does) is [`LIBRARY`].

use mlua::{Function, Lua, MultiValue, Value as LuaValue};

use super::pattern::{self, Fault, Matcher, Value};
use super::state::spent;

/// The library's Lua half (`strings.lua`). Errors are raised there, as the C library raises
/// them (a string, with the position of the script's call): from Rust they would reach the
/// script as userdata.
const LIBRARY: &str = include_str!("strings.lua");

/// Why a library call gives no answer: a refusal Lua words itself (a bad argument, a malformed
/// pattern, the budget), which the Lua half raises; or an error from the Lua API (memory).
enum Stop {
    Refused(String),
    Lua(mlua::Error),
}

impl From<Fault> for Stop {
    fn from(fault: Fault) -> Stop {
        match fault {
            Fault::Pattern(message) => Stop::Refused(message),
            Fault::Budget => Stop::Refused("the hook's budget is spent".into()),
        }
    }
}

impl From<mlua::Error> for Stop {
    fn from(error: mlua::Error) -> Stop {
        Stop::Lua(error)
    }
}

/// The values of an answer, with room for the `true` that [`checked`] puts first.
type Answer = Result<MultiValue, Stop>;

fn values<const N: usize>(values: [LuaValue; N]) -> MultiValue {
    let mut all = MultiValue::with_capacity(N + 1);
    all.extend(values);
    all
}

/// The most steps a call's worst case may take for Lua's own C function to run it: about a
/// millisecond. A script gets back to the VM, and its budget checks, after each such call.
pub(super) const C_MAX: i64 = 1 << 20;

/// Puts the four functions into `string`, which is also what strings index as methods.
/// `max_memory` bounds what `gsub` builds outside the Lua heap; `c_max` is [`C_MAX`] but in
/// tests that compare the port with C.
pub(super) fn install(lua: &Lua, max_memory: usize, c_max: i64) -> mlua::Result<()> {
    type FindArgs = (bool, LuaValue, LuaValue, LuaValue, bool);
    let find = lua.create_function(|lua, (positions, s, p, init, plain): FindArgs| {
        checked(lua, find(lua, positions, s, p, init, plain))
    })?;
    type GsubArgs = (LuaValue, LuaValue, LuaValue, LuaValue);
    let gsub = lua.create_function(move |lua, (s, p, repl, n): GsubArgs| {
        checked(lua, gsub::gsub(lua, [s, p, repl], n, max_memory))
    })?;
    type StepArgs = (mlua::LuaString, mlua::LuaString, i64, i64, bool, bool);
    let step = lua.create_function(|lua, (s, p, at, last, anchors, one): StepArgs| {
        let (src, pat) = (s.as_bytes(), p.as_bytes());
        step(lua, (&src, &pat), (at, last), anchors, one).or_else(|stop| refused(lua, stop))
    })?;
    let library: Function = lua
        .load(LIBRARY)
        .set_name("=kafboy.strings")
        .into_function()?;
    library.call((find, gsub, step, c_max))
}

/// `true` and the values, or what [`refused`] gives.
fn checked(lua: &Lua, answer: Answer) -> mlua::Result<MultiValue> {
    match answer {
        Ok(mut values) => {
            values.push_front(LuaValue::Boolean(true));
            Ok(values)
        }
        Err(stop) => refused(lua, stop),
    }
}

/// `false` and the message for the Lua half to raise; an API error as it is.
fn refused(lua: &Lua, stop: Stop) -> mlua::Result<MultiValue> {
    match stop {
        Stop::Refused(why) => Ok(MultiValue::from_iter([
            LuaValue::Boolean(false),
            LuaValue::String(lua.create_string(why)?),
        ])),
        Stop::Lua(error) => Err(error),
    }
}

/// `string.find` (with `positions`) and `string.match`.
fn find(
    lua: &Lua,
    positions: bool,
    s: LuaValue,
    p: LuaValue,
    init: LuaValue,
    plain: bool,
) -> Answer {
    let name = if positions { "find" } else { "match" };
    let s = text(lua, s, 1, name)?;
    let p = text(lua, p, 2, name)?;
    let init = integer(lua, init, 1, 3, name)?;
    let (src, pat) = (s.as_bytes(), p.as_bytes());
    let Some(init) = start(init, src.len()) else {
        return Ok(values([LuaValue::Nil]));
    };
    if positions && (plain || pattern::plain(&pat)) {
        // Two-way search: linear in the subject, whatever the needle.
        return Ok(match memchr::memmem::find(&src[init..], &pat) {
            Some(at) => values([int(init + at + 1), int(init + at + pat.len())]),
            None => values([LuaValue::Nil]),
        });
    }
    let (anchored, pat) = anchor(&pat);
    let mut matcher = Matcher::new(&src, pat, || spent(lua));
    let Some((s1, e)) = matcher.search(init, anchored, None)? else {
        return Ok(values([LuaValue::Nil]));
    };
    let mut found = match positions {
        true => values([int(s1 + 1), int(e)]),
        false => values([]),
    };
    for capture in matcher.captures(s1, e, !positions)? {
        found.push_back(value(lua, &src, capture)?);
    }
    Ok(found)
}

/// The next match at or after subject offset `at` (only at `at` when `anchors` and the
/// pattern starts with `^`) that does not end at `last`: its offsets and captures (only the
/// first with `one`, as `gsub` indexes a table with it), or nothing. `gmatch` and `gsub`
/// with a function or table call it once per match.
fn step(
    lua: &Lua,
    (src, pat): (&[u8], &[u8]),
    (at, last): (i64, i64),
    anchors: bool,
    one: bool,
) -> Answer {
    let (anchored, pat) = if anchors { anchor(pat) } else { (false, pat) };
    let last = usize::try_from(last).ok();
    let Ok(from) = usize::try_from(at) else {
        return Ok(values([]));
    };
    let mut matcher = Matcher::new(src, pat, || spent(lua));
    let Some((s1, e)) = matcher.search(from, anchored, last)? else {
        return Ok(values([]));
    };
    let mut found = values([int(s1), int(e)]);
    if one {
        found.push_back(value(lua, src, matcher.capture(0, s1, e)?)?);
        return Ok(found);
    }
    for capture in matcher.captures(s1, e, true)? {
        found.push_back(value(lua, src, capture)?);
    }
    Ok(found)
}

/// A pattern's leading `^`, which anchors it, and the rest.
fn anchor(pat: &[u8]) -> (bool, &[u8]) {
    match pat.split_first() {
        Some((b'^', rest)) => (true, rest),
        _ => (false, pat),
    }
}

/// Lua's `posrelatI(init) - 1`: a 0-based start in a subject of `len` bytes, none past its end.
fn start(init: i64, len: usize) -> Option<usize> {
    let back = usize::try_from(init.unsigned_abs()).unwrap_or(usize::MAX);
    let at = match init {
        1.. => back - 1,
        0 => 0,
        _ => len.saturating_sub(back),
    };
    (at <= len).then_some(at)
}

/// `luaL_checklstring`: a string, or a number as Lua writes it.
fn text(lua: &Lua, v: LuaValue, arg: usize, name: &str) -> Result<mlua::LuaString, Stop> {
    let type_name = v.type_name();
    match v {
        LuaValue::String(s) => Ok(s),
        v @ (LuaValue::Integer(_) | LuaValue::Number(_)) => {
            lua.coerce_string(v)?.ok_or_else(|| {
                Stop::Refused(format!("bad argument #{arg} to '{name}' (string expected)"))
            })
        }
        _ => Err(Stop::Refused(format!(
            "bad argument #{arg} to '{name}' (string expected, got {type_name})"
        ))),
    }
}

/// `luaL_optinteger`: nil is `default`; a float or a numeric string must hold an integer.
fn integer(lua: &Lua, v: LuaValue, default: i64, arg: usize, name: &str) -> Result<i64, Stop> {
    match v {
        LuaValue::Nil => Ok(default),
        LuaValue::Integer(i) => Ok(i),
        v => {
            if let Some(i) = lua.coerce_integer(v.clone())? {
                return Ok(i);
            }
            let why = match lua.coerce_number(v.clone())? {
                Some(_) => "number has no integer representation".to_string(),
                None => format!("number expected, got {}", v.type_name()),
            };
            Err(Stop::Refused(format!(
                "bad argument #{arg} to '{name}' ({why})"
            )))
        }
    }
}

fn int(n: usize) -> LuaValue {
    LuaValue::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn value(lua: &Lua, src: &[u8], capture: Value) -> mlua::Result<LuaValue> {
    Ok(match capture {
        Value::Text(a, b) => LuaValue::String(lua.create_string(&src[a..b])?),
        Value::Position(n) => int(n),
    })
}

mod gsub;
#[cfg(test)]
mod tests;
