//! `string.gsub` with a string (or number) for its replacement, built in Rust, outside the
//! Lua heap, and held as it grows to what the heap could still take: the result is copied
//! into it.

use mlua::{Lua, Value as LuaValue};

use super::super::pattern::{Matcher, Value};
use super::super::state::spent;
use super::{Answer, Stop, anchor, integer, text, values};

/// `string.gsub` with a string (or number) for its replacement.
pub(super) fn gsub(
    lua: &Lua,
    [s, p, repl]: [LuaValue; 3],
    n: LuaValue,
    max_memory: usize,
) -> Answer {
    let s = text(lua, s, 1, "gsub")?;
    let p = text(lua, p, 2, "gsub")?;
    let repl = text(lua, repl, 3, "gsub")?;
    let (src, pat, repl) = (s.as_bytes(), p.as_bytes(), repl.as_bytes());
    let all = i64::try_from(src.len())
        .unwrap_or(i64::MAX)
        .saturating_add(1);
    let max = integer(lua, n, all, 4, "gsub")?;
    let (anchored, pat) = anchor(&pat);
    // 0 is "no limit", as for the heap.
    let room = || match max_memory {
        0 => usize::MAX,
        limit => limit.saturating_sub(lua.used_memory()),
    };
    let replaced = |room| replace(lua, &src, pat, &repl, anchored, max, room);
    // Garbage counts as used until a collection: short of room, one is made before refusing,
    // as Lua's own allocator does.
    let before = room();
    let (out, count) = match replaced(before) {
        Err(Stop::Refused(why)) if why == NO_ROOM => {
            lua.gc_collect()?;
            let after = room();
            // Matched again only if the collection made room.
            if after <= before {
                return Err(Stop::Refused(why));
            }
            replaced(after)?
        }
        done => done?,
    };
    Ok(values([
        LuaValue::String(lua.create_string(&out)?),
        LuaValue::Integer(count),
    ]))
}

/// The refusal when the result would not fit in the room left.
const NO_ROOM: &str = "not enough memory";

/// `src` with up to `max` matches of `pat` replaced, in at most `room` bytes; and the count.
fn replace(
    lua: &Lua,
    src: &[u8],
    pat: &[u8],
    repl: &[u8],
    anchored: bool,
    max: i64,
    room: usize,
) -> Result<(Vec<u8>, i64), Stop> {
    let mut matcher = Matcher::new(src, pat, || spent(lua));
    let mut out = Vec::new();
    let (mut at, mut last, mut count) = (0, None, 0);
    while count < max {
        let Some((s1, e)) = matcher.search(at, anchored, last)? else {
            break;
        };
        // What the match passed over stays as it was.
        append(&mut out, &src[at..s1], room)?;
        count += 1;
        substitute(&mut out, repl, &mut matcher, src, s1..e, room)?;
        (at, last) = (e, Some(e));
        if anchored {
            break;
        }
    }
    append(&mut out, &src[at..], room)?;
    Ok((out, count))
}

/// Appends `repl` for the match `whole`, its `%0`..`%9` and `%%` replaced.
fn substitute<F: FnMut() -> bool>(
    out: &mut Vec<u8>,
    repl: &[u8],
    matcher: &mut Matcher<'_, F>,
    src: &[u8],
    whole: std::ops::Range<usize>,
    room: usize,
) -> Result<(), Stop> {
    // The walk, once per match, counts against the budget: with empty matches or captures
    // nothing is added, and the memory limit would never stop it.
    matcher.tick(repl.len() / 16 + 1)?;
    let mut rest = repl;
    while let Some(i) = memchr::memchr(b'%', rest) {
        append(out, &rest[..i], room)?;
        match rest.get(i + 1) {
            Some(b'%') => append(out, b"%", room)?,
            Some(b'0') => append(out, &src[whole.clone()], room)?,
            Some(&d @ b'1'..=b'9') => {
                match matcher.capture(usize::from(d - b'1'), whole.start, whole.end)? {
                    Value::Text(a, b) => append(out, &src[a..b], room)?,
                    Value::Position(n) => append(out, n.to_string().as_bytes(), room)?,
                }
            }
            _ => {
                let why = "invalid use of '%' in replacement string";
                return Err(Stop::Refused(why.into()));
            }
        }
        rest = &rest[i + 2..];
    }
    append(out, rest, room)
}

/// Appends `bytes` to `out`, which may hold at most `room` bytes: its buffer grows by
/// doubling, but never past `room`.
fn append(out: &mut Vec<u8>, bytes: &[u8], room: usize) -> Result<(), Stop> {
    let needed = out.len().saturating_add(bytes.len());
    if needed > room {
        return Err(Stop::Refused(NO_ROOM.into()));
    }
    if needed > out.capacity() {
        let target = needed.max(out.capacity().saturating_mul(2)).min(room);
        out.reserve_exact(target - out.len());
    }
    out.extend_from_slice(bytes);
    Ok(())
}
