//! `string.gsub` with a string (or number) for its replacement, built in Rust, outside the
//! Lua heap, and held to the state's memory limit as it grows.

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
    let mut matcher = Matcher::new(&src, pat, || spent(lua));
    let mut out = Vec::new();
    let (mut at, mut last, mut count) = (0, None, 0);
    while count < max {
        let Some((s1, e)) = matcher.search(at, anchored, last)? else {
            break;
        };
        // What the match passed over stays as it was.
        out.extend_from_slice(&src[at..s1]);
        count += 1;
        substitute(&mut out, &repl, &mut matcher, &src, s1..e, max_memory)?;
        (at, last) = (e, Some(e));
        if anchored {
            break;
        }
    }
    out.extend_from_slice(&src[at..]);
    within(&out, max_memory)?;
    Ok(values([
        LuaValue::String(lua.create_string(&out)?),
        LuaValue::Integer(count),
    ]))
}

/// Appends `repl` for the match `whole`, its `%0`..`%9` and `%%` replaced.
fn substitute<F: FnMut() -> bool>(
    out: &mut Vec<u8>,
    repl: &[u8],
    matcher: &mut Matcher<'_, F>,
    src: &[u8],
    whole: std::ops::Range<usize>,
    max_memory: usize,
) -> Result<(), Stop> {
    // The walk, once per match, counts against the budget: with empty matches or captures
    // nothing is added, and the memory limit would never stop it.
    matcher.tick(repl.len() / 16 + 1)?;
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

fn within(out: &[u8], max_memory: usize) -> Result<(), Stop> {
    match out.len() > max_memory {
        true => Err(Stop::Refused("not enough memory".into())),
        false => Ok(()),
    }
}
