//! The methods a script calls on `req`.

use bytes::Bytes;
use mlua::{UserData, UserDataMethods};

use super::{Doc, LuaRequest};
use crate::decode::{BodyKind, form_to_json};
use crate::hook::lua::within_budget;

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
            this.charge(topic.len())?;
            this.forward.topic = Some(topic);
            Ok(())
        });
        m.add_method("mode", |_, this, ()| Ok(this.req.mode.as_str()));
        // How kafboy reads the body, Content-Type matched as it matches it (case aside).
        m.add_method("kind", |_, this, ()| {
            Ok(match this.req.kind() {
                crate::decode::BodyKind::Json => "json",
                crate::decode::BodyKind::Form => "form",
                crate::decode::BodyKind::Ndjson => "ndjson",
                crate::decode::BodyKind::Raw => "raw",
            })
        });
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
        m.add_method("request_id", |_, this, ()| {
            Ok(this.req.request_id().map(str::to_string))
        });
        // The body as it stands, the script's edits included. A form's is the JSON object of
        // its fields, the record it becomes, not the bytes the client sent.
        m.add_method_mut("body", |lua, this, ()| {
            within_budget(lua)?;
            if this.forward.body.is_none() && this.req.kind() == BodyKind::Form {
                // Refuses a bad form as the route would, then converts it as the route does.
                this.load()?;
                if let Doc::Tree { dirty: false, .. } = this.doc {
                    let json = form_to_json(&this.req.body).map_err(mlua::Error::external)?;
                    return lua.create_string(json);
                }
            }
            match &this.doc {
                Doc::Raw { doc, edited: true } => lua.create_string(doc.bytes()),
                Doc::Tree { value, dirty: true } => {
                    let json = serde_json::to_vec(value).map_err(mlua::Error::external)?;
                    lua.create_string(json)
                }
                _ => lua.create_string(this.forward.body.as_deref().unwrap_or(&this.req.body)),
            }
        });
        m.add_method_mut("set_body", |_, this, body: mlua::LuaString| {
            this.charge(body.as_bytes().len())?;
            this.forward.body = Some(Bytes::copy_from_slice(&body.as_bytes()));
            this.doc = Doc::Unread;
            Ok(())
        });
        // The methods that work over the body check the budget first: it is checked between VM
        // instructions, and a hundred instructions' worth of these calls on a large body in a
        // loop would outrun `hook.timeout` many times over.
        m.add_method_mut("get", |lua, this, path: String| {
            within_budget(lua)?;
            this.get(lua, &path)
        });
        m.add_method_mut("set", |lua, this, (path, value): (String, mlua::Value)| {
            within_budget(lua)?;
            this.set(lua, &path, value)
        });
        m.add_method_mut("delete", |lua, this, path: String| {
            within_budget(lua)?;
            this.delete(&path)
        });
        m.add_method_mut("fields", |lua, this, ()| {
            within_budget(lua)?;
            if let Some(doc) = this.raw()? {
                return Ok(doc.keys());
            }
            Ok(this
                .tree()?
                .as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>()))
        });
        // The key set in this call, else the one the request asked for.
        m.add_method("key", |lua, this, ()| {
            this.forward
                .key
                .as_deref()
                .or(this.req.key.as_deref())
                .map(|k| lua.create_string(k))
                .transpose()
        });
        m.add_method_mut("set_key", |_, this, key: mlua::LuaString| {
            this.charge(key.as_bytes().len())?;
            this.forward.key = Some(Bytes::copy_from_slice(&key.as_bytes()));
            Ok(())
        });
        m.add_method_mut("set_partition", |_, this, partition: i32| {
            if partition < 0 {
                return Err(mlua::Error::runtime(format!(
                    "partition {partition}: partitions are numbered from 0"
                )));
            }
            this.forward.partition = Some(partition);
            Ok(())
        });
        m.add_method_mut(
            "set_header",
            |_, this, (name, value): (String, mlua::LuaString)| {
                // With what each entry costs besides its text (a name, a value, a slot in the
                // list, and a header map's entry once sent): empty headers are not free.
                this.charge(96 + name.len() + value.as_bytes().len())?;
                // Set, not added: a second call for a name replaces the first.
                let headers = &mut this.forward.headers;
                headers.retain(|(set, _)| !set.eq_ignore_ascii_case(&name));
                headers.push((name, Bytes::copy_from_slice(&value.as_bytes())));
                Ok(())
            },
        );
    }
}
