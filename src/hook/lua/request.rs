//! The `req` object a Lua script receives: accessors over the request and the edits the script
//! makes. JSON is parsed on the first `get`/`set`/`delete`/`fields`, into a Rust value; only the
//! parts a script reads are converted to Lua.

use std::sync::Arc;

use bytes::Bytes;
use mlua::{LuaSerdeExt, UserData, UserDataMethods};
use serde_json::Value;

use crate::hook::{Forward, HookRequest};

/// The request handed to `on_request(req)`.
pub struct LuaRequest {
    req: Arc<HookRequest>,
    json: Option<Value>,
    dirty: bool,
    forward: Forward,
}

impl LuaRequest {
    pub fn new(req: Arc<HookRequest>) -> LuaRequest {
        LuaRequest {
            req,
            json: None,
            dirty: false,
            forward: Forward::default(),
        }
    }

    /// The edits, with a JSON body re-serialized if the script changed it.
    pub fn into_forward(mut self) -> mlua::Result<Forward> {
        if self.dirty
            && self.forward.body.is_none()
            && let Some(json) = &self.json
        {
            self.forward.body = Some(Bytes::from(
                serde_json::to_vec(json).map_err(mlua::Error::external)?,
            ));
        }
        Ok(self.forward)
    }

    fn json(&mut self) -> mlua::Result<&mut Value> {
        if self.json.is_none() {
            let parsed = match &self.forward.body {
                // A body set by the script is what later accessors see.
                Some(body) => {
                    serde_json::from_slice(body).map_err(|e| format!("invalid json: {e}"))
                }
                // Parsed for this script alone: cheaper than cloning a shared tree.
                None => crate::hook::parse_body(self.req.kind(), &self.req.body),
            };
            self.json = Some(parsed.map_err(mlua::Error::runtime)?);
        }
        // Just filled when it was empty.
        self.json
            .as_mut()
            .ok_or_else(|| mlua::Error::runtime("no body"))
    }
}

impl UserData for LuaRequest {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("topic", |_, this, ()| {
            Ok(this
                .forward
                .topic
                .clone()
                .unwrap_or_else(|| this.req.topic.clone()))
        });
        m.add_method_mut("set_topic", |_, this, topic: String| {
            this.forward.topic = Some(topic);
            Ok(())
        });
        m.add_method("mode", |_, this, ()| Ok(this.req.mode.as_str()));
        m.add_method("method", |_, this, ()| {
            Ok(this.req.method.as_str().to_string())
        });
        m.add_method("path", |_, this, ()| Ok(this.req.path.clone()));
        m.add_method("query", |_, this, name: Option<String>| {
            let Some(query) = &this.req.query else {
                return Ok(None);
            };
            let Some(name) = name else {
                return Ok(Some(query.clone()));
            };
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(query).unwrap_or_default();
            Ok(pairs.into_iter().find(|(k, _)| *k == name).map(|(_, v)| v))
        });
        m.add_method("header", |lua, this, name: String| {
            this.req
                .headers
                .get(name.as_str())
                .map(|v| lua.create_string(v.as_bytes()))
                .transpose()
        });
        m.add_method("peer", |_, this, ()| {
            Ok(this.req.peer.map(|p| p.to_string()))
        });
        m.add_method("body", |lua, this, ()| {
            lua.create_string(this.forward.body.as_deref().unwrap_or(&this.req.body))
        });
        m.add_method_mut("set_body", |_, this, body: mlua::LuaString| {
            this.forward.body = Some(Bytes::copy_from_slice(&body.as_bytes()));
            this.json = None;
            this.dirty = false;
            Ok(())
        });
        m.add_method_mut("get", |lua, this, path: String| {
            let json = this.json()?;
            match lookup(json, &path) {
                None | Some(Value::Null) => Ok(mlua::Value::Nil),
                Some(Value::String(s)) => Ok(mlua::Value::String(lua.create_string(s)?)),
                Some(Value::Bool(b)) => Ok(mlua::Value::Boolean(*b)),
                Some(Value::Number(n)) => Ok(match n.as_i64() {
                    Some(i) => mlua::Value::Integer(i),
                    None => mlua::Value::Number(n.as_f64().unwrap_or(f64::NAN)),
                }),
                Some(other) => lua.to_value(other),
            }
        });
        m.add_method_mut("set", |lua, this, (path, value): (String, mlua::Value)| {
            let value: Value = lua.from_value(value)?;
            let slot = slot(this.json()?, &path)?;
            *slot = value;
            this.dirty = true;
            Ok(())
        });
        m.add_method_mut("delete", |_, this, path: String| {
            let removed = remove(this.json()?, &path);
            this.dirty |= removed;
            Ok(removed)
        });
        m.add_method_mut("fields", |_, this, ()| {
            Ok(this
                .json()?
                .as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>()))
        });
        m.add_method("key", |lua, this, ()| {
            this.forward
                .key
                .as_deref()
                .map(|k| lua.create_string(k))
                .transpose()
        });
        m.add_method_mut("set_key", |_, this, key: mlua::LuaString| {
            this.forward.key = Some(Bytes::copy_from_slice(&key.as_bytes()));
            Ok(())
        });
        m.add_method_mut("set_partition", |_, this, partition: i32| {
            this.forward.partition = Some(partition);
            Ok(())
        });
        m.add_method_mut(
            "set_header",
            |_, this, (name, value): (String, mlua::LuaString)| {
                this.forward
                    .headers
                    .push((name, Bytes::copy_from_slice(&value.as_bytes())));
                Ok(())
            },
        );
    }
}

/// Path segments: `a.b.0` is field `a`, field `b`, element 0.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('.').filter(|s| !s.is_empty())
}

fn lookup<'v>(mut value: &'v Value, path: &str) -> Option<&'v Value> {
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
fn slot<'v>(mut value: &'v mut Value, path: &str) -> mlua::Result<&'v mut Value> {
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

fn remove(value: &mut Value, path: &str) -> bool {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (parent, last),
        None => ("", path),
    };
    let mut parent_value = value;
    for seg in segments(parent) {
        parent_value = match parent_value {
            Value::Object(map) => match map.get_mut(seg) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match parent_value {
        Value::Object(map) => map.remove(last).is_some(),
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
    }
}
