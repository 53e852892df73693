//! Values between JSON and Lua: JSON text or a tree read as Lua values (`req:get`), Lua scalars
//! written as JSON text (`req:set`), each as serde_json would do it.

use std::borrow::Cow;

use mlua::LuaSerdeExt;
use serde_json::Value;

use crate::decode::DecodeError;

pub(super) fn to_lua(lua: &mlua::Lua, value: &Value) -> mlua::Result<mlua::Value> {
    Ok(match value {
        Value::Null => mlua::Value::Nil,
        Value::String(s) => mlua::Value::String(lua.create_string(s)?),
        Value::Bool(b) => mlua::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => mlua::Value::Integer(i),
            None => mlua::Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        other => lua.to_value(other)?,
    })
}

/// A checked JSON value as Lua, as [`to_lua`] would make it from a tree: scalars straight from
/// the bytes, containers through a tree.
pub(super) fn json_to_lua(lua: &mlua::Lua, text: &[u8]) -> mlua::Result<mlua::Value> {
    let invalid = |e: serde_json::Error| mlua::Error::runtime(format!("invalid json: {e}"));
    Ok(match text.first() {
        Some(b'"') => {
            let inner = text.get(1..text.len() - 1).unwrap_or_default();
            if inner.contains(&b'\\') {
                let decoded: String = serde_json::from_slice(text).map_err(invalid)?;
                mlua::Value::String(lua.create_string(decoded)?)
            } else {
                mlua::Value::String(lua.create_string(inner)?)
            }
        }
        Some(b't') => mlua::Value::Boolean(true),
        Some(b'f') => mlua::Value::Boolean(false),
        Some(b'n') => mlua::Value::Nil,
        Some(b'-' | b'0'..=b'9') => {
            // serde_json reads `-0` as a float, and integers past i64 as floats too.
            let integer = !text.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) && text != b"-0";
            match std::str::from_utf8(text).ok().filter(|_| integer) {
                Some(digits) if let Ok(i) = digits.parse::<i64>() => mlua::Value::Integer(i),
                _ => mlua::Value::Number(serde_json::from_slice(text).map_err(invalid)?),
            }
        }
        _ => to_lua(lua, &serde_json::from_slice(text).map_err(invalid)?)?,
    })
}

/// The JSON text of a Lua nil, boolean, integer or string (U+FFFD for bytes that are not
/// UTF-8), as serde would write it; `None` for the rest (tables, floats), which go through serde.
pub(super) fn scalar_json(value: &mlua::Value) -> Option<Cow<'static, [u8]>> {
    match value {
        mlua::Value::Nil => Some(Cow::Borrowed(b"null")),
        mlua::Value::Boolean(true) => Some(Cow::Borrowed(b"true")),
        mlua::Value::Boolean(false) => Some(Cow::Borrowed(b"false")),
        mlua::Value::Integer(i) => Some(Cow::Owned(i.to_string().into_bytes())),
        mlua::Value::String(s) => {
            // JSON text is UTF-8: bytes that are not (a header the client sent, a string cut
            // mid-character) become U+FFFD, as a browser shows them, not a failed call.
            let bytes = s.as_bytes();
            let s = String::from_utf8_lossy(&bytes);
            let mut text = Vec::with_capacity(s.len() + 2);
            crate::json::write_string(&mut text, &s);
            Some(Cow::Owned(text))
        }
        _ => None,
    }
}

/// The error a script gets when it reads the client's own body and that is not JSON (or a
/// form). A call that fails with it is the client's bad body (the 400 or 413 the route gives
/// it without a hook), not the hook's fault.
#[derive(Debug)]
pub struct BadBody(pub DecodeError);

impl std::fmt::Display for BadBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BadBody {}

impl BadBody {
    /// The client's body error `error` carries, if that is what the call failed with.
    pub fn of(error: &mlua::Error) -> Option<&DecodeError> {
        match error {
            mlua::Error::ExternalError(e) => e.downcast_ref::<BadBody>().map(|b| &b.0),
            mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
                BadBody::of(cause)
            }
            _ => None,
        }
    }
}

/// A Lua table as JSON, to go `segments` levels into a body. A table that is both array and
/// map is an error, and holes in an array are nulls: mlua's default would keep `#t` items and
/// drop the rest without a word. So is a table that would nest the body deeper than
/// `max_depth`.
pub(super) fn table_json(
    lua: &mlua::Lua,
    value: mlua::Value,
    segments: usize,
    max_depth: usize,
    room: usize,
) -> mlua::Result<Value> {
    // Measured first, within `room`: the conversion is made outside the Lua heap and its limit,
    // and a table that holds one subtable twice is converted twice (`t = {t, t}` twenty times
    // over is a million leaves for a few hundred bytes of Lua).
    let mut left = room;
    let mut nodes = 0;
    let levels = max_depth.saturating_sub(segments);
    measure(lua, &value, &mut left, &mut nodes, levels).map_err(|e| match e {
        Measured::TooDeep => mlua::Error::runtime(format!(
            "the value would nest the body deeper than {max_depth} levels"
        )),
        Measured::Lua(e) => e,
    })?;
    let value = lua_json(&value, &lua.array_metatable())?;
    if segments + depth(&value) > max_depth {
        return Err(mlua::Error::runtime(format!(
            "the value would nest the body deeper than {max_depth} levels"
        )));
    }
    Ok(value)
}

/// A Lua value, bounded by [`measure`], as JSON. A table is an array when its keys are 1..n
/// (holes are nulls) or when it came from `req:get` as one (mlua's array metatable), else an
/// object, with its keys in sorted order (a Lua table has no order of its own): so an empty
/// table is `{}`, and an array read with `get` stays one, emptied or not. mlua's own
/// conversion wrote every empty table as `[]` and cut arrays from `get` at their first hole.
fn lua_json(value: &mlua::Value, array: &mlua::Table) -> mlua::Result<Value> {
    use mlua::Value as V;
    Ok(match value {
        V::Nil => Value::Null,
        V::LightUserData(p) if p.0.is_null() => Value::Null,
        V::Boolean(b) => Value::Bool(*b),
        V::Integer(i) => Value::from(*i),
        V::Number(n) => serde_json::Number::from_f64(*n)
            .map(Value::Number)
            .ok_or_else(|| mlua::Error::runtime("NaN and infinities are not JSON"))?,
        V::String(s) => Value::String(s.to_string_lossy()),
        V::Table(t) => table_value(t, array)?,
        other => {
            return Err(mlua::Error::runtime(format!(
                "a {} cannot be JSON",
                other.type_name()
            )));
        }
    })
}

fn table_value(table: &mlua::Table, array: &mlua::Table) -> mlua::Result<Value> {
    let mut items = Vec::new();
    let mut members = Vec::new();
    for pair in table.pairs::<mlua::Value, mlua::Value>() {
        match pair? {
            (mlua::Value::Integer(i), v) if i >= 1 => items.push((i, v)),
            // Keys stay strict: two keys that differ only in bytes that are not UTF-8 would
            // become one, and which value stayed would depend on the table's order.
            (mlua::Value::String(k), v) => members.push((k.to_str()?.to_owned(), v)),
            (k, _) => {
                return Err(mlua::Error::runtime(format!(
                    "a table key must be a string or an index from 1, not {}",
                    k.type_name()
                )));
            }
        }
    }
    if !items.is_empty() && !members.is_empty() {
        return Err(mlua::Error::runtime(
            "a table that is both an array and an object cannot be JSON",
        ));
    }
    if !members.is_empty() || (items.is_empty() && table.metatable().as_ref() != Some(array)) {
        members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut object = serde_json::Map::with_capacity(members.len());
        for (k, v) in members {
            object.insert(k, lua_json(&v, array)?);
        }
        return Ok(Value::Object(object));
    }
    // Holes are nulls; a table mostly made of holes (`{[1e9] = 1}`) is not meant as an array
    // of a billion nulls.
    let len = items.iter().map(|(i, _)| *i).max().unwrap_or(0);
    if len > 2 * items.len() as i64 + 16 {
        return Err(mlua::Error::runtime(format!(
            "a table with {} items up to index {len} is too sparse to be an array",
            items.len()
        )));
    }
    let mut out = vec![Value::Null; len as usize];
    for (i, v) in items {
        // 1 ≤ i ≤ len, checked above.
        out[i as usize - 1] = lua_json(&v, array)?;
    }
    Ok(Value::Array(out))
}

/// What one node of a converted table costs at least: a `serde_json::Value` and its slot.
const NODE_BYTES: usize = 64;

/// What `value` holds outside the Lua heap as a tree: its nodes and its text. A body parsed
/// into one (`[0,0,...]` takes some 36 times its length) is charged this.
pub(super) fn tree_bytes(value: &Value) -> usize {
    NODE_BYTES
        + match value {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(tree_bytes).sum(),
            Value::Object(members) => members
                .iter()
                .map(|(k, v)| NODE_BYTES + k.len() + tree_bytes(v))
                .sum(),
            _ => 0,
        }
}

/// Takes what `value` would cost as JSON from `left`, and fails once it runs out, on a float
/// that JSON cannot hold (serde would write NaN and the infinities as null), or past `levels`
/// of nesting.
fn measure(
    lua: &mlua::Lua,
    value: &mlua::Value,
    left: &mut usize,
    nodes: &mut usize,
    levels: usize,
) -> Result<(), Measured> {
    // With no memory limit the walk is bounded by the call's budget alone, checked as it goes.
    *nodes += 1;
    if nodes.is_multiple_of(4096) {
        super::within_budget(lua)?;
    }
    let cost = match value {
        mlua::Value::String(s) => NODE_BYTES + crate::json::quoted_len(&s.as_bytes()),
        mlua::Value::Number(n) if !n.is_finite() => {
            return Err(mlua::Error::runtime("NaN and infinities are not JSON").into());
        }
        _ => NODE_BYTES,
    };
    *left = left.checked_sub(cost).ok_or_else(|| {
        mlua::Error::runtime("the value takes more than hook.max_memory_bytes as JSON")
    })?;
    if let mlua::Value::Table(t) = value {
        let levels = levels.checked_sub(1).ok_or(Measured::TooDeep)?;
        for pair in t.pairs::<mlua::Value, mlua::Value>() {
            let (k, v) = pair?;
            measure(lua, &k, left, nodes, levels)?;
            measure(lua, &v, left, nodes, levels)?;
        }
    }
    Ok(())
}

/// Why [`measure`] stopped.
enum Measured {
    /// Past the levels a body may have.
    TooDeep,
    /// Anything else.
    Lua(mlua::Error),
}

impl From<mlua::Error> for Measured {
    fn from(e: mlua::Error) -> Measured {
        Measured::Lua(e)
    }
}

/// Levels of arrays and objects in `value`: 0 for a scalar, 1 for `[]` or `{}`.
fn depth(value: &Value) -> usize {
    let inner = |items: &mut dyn Iterator<Item = &Value>| items.map(depth).max().unwrap_or(0);
    match value {
        Value::Array(items) => 1 + inner(&mut items.iter()),
        Value::Object(members) => 1 + inner(&mut members.values()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn same(lua: &mlua::Lua, a: &mlua::Value, b: &mlua::Value) -> bool {
        use mlua::Value as V;
        match (a, b) {
            (V::Nil, V::Nil) => true,
            (V::Boolean(x), V::Boolean(y)) => x == y,
            (V::Integer(x), V::Integer(y)) => x == y,
            (V::Number(x), V::Number(y)) => x.to_bits() == y.to_bits(),
            (V::String(x), V::String(y)) => x.as_bytes() == y.as_bytes(),
            (V::Table(_), V::Table(_)) => {
                lua.from_value::<Value>(a.clone()).unwrap()
                    == lua.from_value::<Value>(b.clone()).unwrap()
            }
            _ => false,
        }
    }

    #[test]
    fn values_read_from_bytes_are_what_a_tree_gives() {
        let lua = mlua::Lua::new();
        for text in [
            "0",
            "-0",
            "7",
            "-12",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
            "1.5",
            "-0.0",
            "-2.5e3",
            "1e2",
            "0.1",
            r#""a""#,
            r#""""#,
            r#""a\nb\"\u00e9""#,
            "\"\u{e9}\u{1F600}\"",
            "true",
            "false",
            "null",
            r#"[1,{"a":2}]"#,
            r#"{"a":[1]}"#,
        ] {
            let tree: Value = serde_json::from_str(text).unwrap();
            let want = to_lua(&lua, &tree).unwrap();
            let got = json_to_lua(&lua, text.as_bytes()).unwrap();
            assert!(same(&lua, &got, &want), "{text}: {got:?} vs {want:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_number_or_string_reads_as_from_a_tree(
            number in "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,6})?([eE][+-]?[0-9]{1,3})?",
            string in ".{0,12}",
        ) {
            let lua = mlua::Lua::new();
            let quoted = serde_json::to_string(&string).unwrap();
            for text in [number.as_str(), quoted.as_str()] {
                // Numbers past f64's range are not JSON a body can hold.
                let Ok(tree) = serde_json::from_str::<Value>(text) else { continue };
                let want = to_lua(&lua, &tree).unwrap();
                let got = json_to_lua(&lua, text.as_bytes()).unwrap();
                proptest::prop_assert!(same(&lua, &got, &want), "{}: {:?} vs {:?}", text, got, want);
            }
        }
    }

    #[test]
    fn scalars_are_written_as_serde_writes_them() {
        let lua = mlua::Lua::new();
        let values: Vec<mlua::Value> = lua
            .load(r#"return nil, true, false, 0, -5, math.maxinteger, math.mininteger, "x", "a\"b\n\1", "é", "\31\127\\""#)
            .eval::<mlua::MultiValue>()
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(values.len(), 11);
        for value in values {
            let want =
                serde_json::to_vec(&lua.from_value::<Value>(value.clone()).unwrap()).unwrap();
            assert_eq!(scalar_json(&value), Some(Cow::Owned(want)), "{value:?}");
        }
        let table = lua.create_table().unwrap();
        assert_eq!(scalar_json(&mlua::Value::Table(table)), None);
        assert_eq!(scalar_json(&mlua::Value::Number(1.5)), None);
    }
}
