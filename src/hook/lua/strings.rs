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
            Fault::Budget => Stop::Refused("time budget exceeded".into()),
        }
    }
}

impl From<mlua::Error> for Stop {
    fn from(error: mlua::Error) -> Stop {
        Stop::Lua(error)
    }
}

type Answer = Result<Vec<LuaValue>, Stop>;

/// Puts the four functions into `string`, which is also what strings index as methods.
/// `max_memory` bounds what `gsub` builds outside the Lua heap.
pub(super) fn install(lua: &Lua, max_memory: usize) -> mlua::Result<()> {
    type FindArgs = (bool, LuaValue, LuaValue, LuaValue, bool);
    let find = lua.create_function(|lua, (positions, s, p, init, plain): FindArgs| {
        checked(lua, find(lua, positions, s, p, init, plain))
    })?;
    type GsubArgs = (LuaValue, LuaValue, LuaValue, LuaValue);
    let gsub = lua.create_function(move |lua, (s, p, repl, n): GsubArgs| {
        checked(lua, gsub(lua, [s, p, repl], n, max_memory))
    })?;
    type StepArgs = (mlua::LuaString, mlua::LuaString, i64, i64, bool);
    let step = lua.create_function(|lua, (s, p, at, last, anchors): StepArgs| {
        let found = step(lua, &s.as_bytes(), &p.as_bytes(), at, last, anchors);
        match found {
            Ok(values) => Ok(MultiValue::from_iter(values)),
            Err(stop) => refused(lua, stop),
        }
    })?;
    let library: Function = lua.load(LIBRARY).set_name("=string").into_function()?;
    library.call((find, gsub, step))
}

/// `true` and the values, or what [`refused`] gives.
fn checked(lua: &Lua, answer: Answer) -> mlua::Result<MultiValue> {
    match answer {
        Ok(values) => Ok(std::iter::once(LuaValue::Boolean(true))
            .chain(values)
            .collect()),
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
        return Ok(vec![LuaValue::Nil]);
    };
    if positions && (plain || pattern::plain(&pat)) {
        // Two-way search: linear in the subject, whatever the needle.
        return Ok(match memchr::memmem::find(&src[init..], &pat) {
            Some(at) => vec![int(init + at + 1), int(init + at + pat.len())],
            None => vec![LuaValue::Nil],
        });
    }
    let (anchored, pat) = anchor(&pat);
    let mut matcher = Matcher::new(&src, pat, || spent(lua));
    for s1 in init..=src.len() {
        if let Some(e) = matcher.at(s1)? {
            let mut values = match positions {
                true => vec![int(s1 + 1), int(e)],
                false => Vec::new(),
            };
            for capture in matcher.captures(s1, e, !positions)? {
                values.push(value(lua, &src, capture)?);
            }
            return Ok(values);
        }
        if anchored {
            break;
        }
    }
    Ok(vec![LuaValue::Nil])
}

/// `string.gsub` with a string (or number) for its replacement.
fn gsub(lua: &Lua, [s, p, repl]: [LuaValue; 3], n: LuaValue, max_memory: usize) -> Answer {
    let s = text(lua, s, 1, "gsub")?;
    let p = text(lua, p, 2, "gsub")?;
    let repl = text(lua, repl, 3, "gsub")?;
    let (src, pat, repl) = (s.as_bytes(), p.as_bytes(), repl.as_bytes());
    let all = i64::try_from(src.len())
        .unwrap_or(i64::MAX)
        .saturating_add(1);
    let max = integer(lua, n, all, 4, "gsub")?;
    let (anchored, pat) = anchor(&pat);
    let mut matcher = Matcher::new(&src, pat, || spent(lua));
    let mut out = Vec::new();
    let (mut at, mut last, mut count) = (0, None, 0);
    while count < max {
        match matcher.at(at)? {
            Some(e) if Some(e) != last => {
                count += 1;
                substitute(&mut out, &repl, &matcher, &src, at..e, max_memory)?;
                (at, last) = (e, Some(e));
            }
            _ if at < src.len() => {
                out.push(src[at]);
                at += 1;
            }
            _ => break,
        }
        if anchored {
            break;
        }
    }
    out.extend_from_slice(&src[at..]);
    within(&out, max_memory)?;
    Ok(vec![
        LuaValue::String(lua.create_string(&out)?),
        LuaValue::Integer(count),
    ])
}

/// Appends `repl` for the match `whole`, its `%0`..`%9` and `%%` replaced.
fn substitute<F: FnMut() -> bool>(
    out: &mut Vec<u8>,
    repl: &[u8],
    matcher: &Matcher<'_, F>,
    src: &[u8],
    whole: std::ops::Range<usize>,
    max_memory: usize,
) -> Result<(), Stop> {
    let mut rest = repl;
    while let Some(i) = memchr::memchr(b'%', rest) {
        out.extend_from_slice(&rest[..i]);
        match rest.get(i + 1) {
            Some(b'%') => out.push(b'%'),
            Some(b'0') => out.extend_from_slice(&src[whole.clone()]),
            Some(&d @ b'1'..=b'9') => {
                match matcher.capture(usize::from(d - b'1'), whole.start, whole.end)? {
                    Value::Text(a, b) => out.extend_from_slice(&src[a..b]),
                    Value::Position(n) => out.extend_from_slice(n.to_string().as_bytes()),
                }
            }
            _ => {
                let why = "invalid use of '%' in replacement string";
                return Err(Stop::Refused(why.into()));
            }
        }
        within(out, max_memory)?;
        rest = &rest[i + 2..];
    }
    out.extend_from_slice(rest);
    within(out, max_memory)
}

/// The next match at or after subject offset `at` (only at `at` when `anchors` and the
/// pattern starts with `^`) that does not end at `last`: its offsets and captures, or nothing.
/// `gmatch` and `gsub` with a function or table call it once per match.
fn step(lua: &Lua, src: &[u8], pat: &[u8], at: i64, last: i64, anchors: bool) -> Answer {
    let (anchored, pat) = if anchors { anchor(pat) } else { (false, pat) };
    let last = usize::try_from(last).ok();
    let Ok(from) = usize::try_from(at) else {
        return Ok(Vec::new());
    };
    let mut matcher = Matcher::new(src, pat, || spent(lua));
    for s1 in from..=src.len() {
        if let Some(e) = matcher.at(s1)?.filter(|&e| Some(e) != last) {
            let mut values = vec![int(s1), int(e)];
            for capture in matcher.captures(s1, e, true)? {
                values.push(value(lua, src, capture)?);
            }
            return Ok(values);
        }
        if anchored {
            break;
        }
    }
    Ok(Vec::new())
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

fn within(out: &[u8], max_memory: usize) -> Result<(), Stop> {
    match out.len() > max_memory {
        true => Err(Stop::Refused("not enough memory".into())),
        false => Ok(()),
    }
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

#[cfg(test)]
mod tests;
