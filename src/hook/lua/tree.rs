//! Paths on a `serde_json::Value`, for what a script does below the top level of a body (or on
//! a form): read, write (creating objects on the way) and delete.

use serde_json::Value;

/// The one segment of a top-level path.
pub(super) fn single(path: &str) -> Option<&str> {
    let mut segs = segments(path);
    match (segs.next(), segs.next()) {
        (Some(name), None) => Some(name),
        _ => None,
    }
}

/// Path segments: `a.b.0` is field `a`, field `b`, element 0.
pub(super) fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('.').filter(|s| !s.is_empty())
}

pub(super) fn lookup<'v>(mut value: &'v Value, path: &str) -> Option<&'v Value> {
    for seg in segments(path) {
        value = match value {
            Value::Object(map) => map.get(seg)?,
            Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// The place `path` names, creating objects on the way.
pub(super) fn slot<'v>(mut value: &'v mut Value, path: &str) -> mlua::Result<&'v mut Value> {
    for seg in segments(path) {
        if value.is_null() {
            *value = Value::Object(serde_json::Map::new());
        }
        value = match value {
            Value::Object(map) => map.entry(seg).or_insert(Value::Null),
            Value::Array(items) => {
                let i: usize = seg
                    .parse()
                    .map_err(|_| mlua::Error::runtime(format!("{seg:?} is not an index")))?;
                items
                    .get_mut(i)
                    .ok_or_else(|| mlua::Error::runtime(format!("index {i} out of range")))?
            }
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "cannot set {path:?}: not an object"
                )));
            }
        };
    }
    Ok(value)
}

/// Removes what `path` names: a field (the others keep their order) or an array element (the
/// ones after it move up).
pub(super) fn remove(value: &mut Value, path: &str) -> bool {
    let segs: Vec<&str> = segments(path).collect();
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut parent = value;
    for seg in parents {
        let next = match parent {
            Value::Object(map) => map.get_mut(*seg),
            Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        let Some(next) = next else { return false };
        parent = next;
    }
    match parent {
        Value::Object(map) => map.shift_remove(*last).is_some(),
        Value::Array(items) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_get_set_delete() {
        let mut v = json!({"user": {"id": 7, "tags": ["a", "b"]}});
        assert_eq!(lookup(&v, "user.id"), Some(&json!(7)));
        assert_eq!(lookup(&v, "user.tags.1"), Some(&json!("b")));
        assert_eq!(lookup(&v, "user.nope"), None);
        *slot(&mut v, "meta.source").unwrap() = json!("web");
        *slot(&mut v, "user.tags.0").unwrap() = json!("z");
        assert!(remove(&mut v, "user.id"));
        assert!(!remove(&mut v, "user.id"));
        assert_eq!(
            v,
            json!({"user": {"tags": ["z", "b"]}, "meta": {"source": "web"}})
        );
        assert!(slot(&mut json!({"a": 1}), "a.b").is_err());
        let mut v = json!({"users": [{"password": "s", "n": 1}, {"n": 2}], "a": 1, "b": 2});
        assert!(remove(&mut v, "users.0.password"));
        assert!(remove(&mut v, "users.1"));
        assert!(!remove(&mut v, "users.5"));
        assert!(remove(&mut v, "a."), "a trailing dot names the same field");
        assert_eq!(v, json!({"users": [{"n": 1}], "b": 2}));
        let mut ordered = json!({"a": 1, "b": 2, "c": 3});
        assert!(remove(&mut ordered, "a"));
        assert_eq!(serde_json::to_string(&ordered).unwrap(), r#"{"b":2,"c":3}"#);
    }
}
