//! The `req` object a Lua script receives: accessors over the request and the edits the script
//! makes. A JSON body is checked on the first `get`/`set`/`delete`, then read and edited as bytes
//! (see [`raw`]); only form bodies and edits through an object with a key twice build a tree. Only the parts a script reads are converted to Lua.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::convert::{BadBody, json_to_lua, scalar_json, table_json, to_lua, tree_bytes};
use super::raw;
use super::tree::{lookup, remove, segments, single, slot};
use crate::decode::{BodyKind, DecodeError};
use crate::hook::{Forward, HookRequest};

mod methods;

/// A path no deeper than a body may be (`depth`): `set` creates an object per segment, and
/// writing out or dropping a tree thousands deep would overflow the stack.
fn check_path(path: &str, depth: usize) -> mlua::Result<()> {
    if segments(path).nth(depth).is_some() {
        return Err(mlua::Error::runtime(format!(
            "path deeper than {depth} levels"
        )));
    }
    Ok(())
}

/// The request handed to `on_request(req)`.
pub struct LuaRequest {
    req: Arc<HookRequest>,
    doc: Doc,
    forward: Forward,
    /// Bytes the script has handed to Rust in edits so far, and the most it may
    /// (`hook.max_memory_bytes`: the Lua heap's limit would not see these copies).
    charged: usize,
    limit: usize,
    /// Deepest nesting the body may have, before and after edits (`server.max_json_depth`,
    /// as without a hook).
    depth: usize,
}

/// The JSON body as the script sees it.
enum Doc {
    /// Not looked at yet.
    Unread,
    /// Checked JSON, edited as bytes; `edited` once a `set` or `delete` changed it.
    Raw { doc: raw::RawDoc, edited: bool },
    /// Parsed, for what the bytes cannot do; `dirty` once changed.
    Tree { value: Value, dirty: bool },
}

impl LuaRequest {
    pub fn new(req: Arc<HookRequest>, limit: usize, depth: usize) -> LuaRequest {
        LuaRequest {
            req,
            doc: Doc::Unread,
            forward: Forward::default(),
            charged: 0,
            limit,
            depth,
        }
    }

    /// Counts `bytes` more of edits against the limit.
    fn charge(&mut self, bytes: usize) -> mlua::Result<()> {
        self.fits(bytes)?;
        self.charged = self.charged.saturating_add(bytes);
        Ok(())
    }

    /// Whether `bytes` more of edits are within the limit (checked before they are made).
    fn fits(&self, bytes: usize) -> mlua::Result<()> {
        // 0 is "no limit", as for the Lua heap.
        if self.limit > 0 && self.charged.saturating_add(bytes) > self.limit {
            return Err(mlua::Error::runtime(format!(
                "the request's edits take more than hook.max_memory_bytes ({} bytes)",
                self.limit
            )));
        }
        Ok(())
    }

    /// Bytes of edits still allowed.
    fn room(&self) -> usize {
        if self.limit == 0 {
            return usize::MAX;
        }
        self.limit.saturating_sub(self.charged)
    }

    /// What `req` holds between calls: an empty request, one per thread, so emptying `req`
    /// allocates nothing.
    pub fn idle() -> LuaRequest {
        thread_local! {
            static IDLE: Arc<HookRequest> = Arc::new(HookRequest::new(
                String::new(),
                crate::config::Mode::Async,
                axum::http::Method::POST,
                String::new(),
                None,
                axum::http::HeaderMap::new(),
                None,
                Bytes::new(),
                BodyKind::Raw,
            ));
        }
        // A limit of one byte: a `req` a script kept takes no edits outside `on_request` (its
        // `on_error` runs for requests the hook never saw, and edits there would pile up).
        LuaRequest::new(IDLE.with(Arc::clone), 1, 1)
    }

    /// The edits, with the body the script changed.
    pub fn into_forward(mut self) -> mlua::Result<Forward> {
        match self.doc {
            Doc::Raw { doc, edited: true } => self.forward.body = Some(doc.into_bytes()),
            Doc::Tree { value, dirty: true } => {
                let json = serde_json::to_vec(&value).map_err(mlua::Error::external)?;
                self.forward.body = Some(Bytes::from(json));
            }
            _ => {}
        }
        Ok(self.forward)
    }

    /// Checks the body on first use: JSON stays bytes, a form becomes a tree.
    fn load(&mut self) -> mlua::Result<()> {
        if !matches!(self.doc, Doc::Unread) {
            return Ok(());
        }
        // A body set by the script is what later accessors see.
        let (body, kind) = match &self.forward.body {
            Some(body) => (body, BodyKind::Json),
            None => (&self.req.body, self.req.kind()),
        };
        let clients =
            self.forward.body.is_none() && matches!(kind, BodyKind::Json | BodyKind::Form);
        let refused = |why: DecodeError| match (clients, body.is_empty()) {
            (true, true) => mlua::Error::external(BadBody(DecodeError::Empty)),
            (true, false) => mlua::Error::external(BadBody(why)),
            (false, _) => mlua::Error::runtime(why.to_string()),
        };
        self.doc = if kind == BodyKind::Json {
            let doc = raw::RawDoc::check(body.clone(), self.depth)
                .map_err(|e| refused(DecodeError::Json(e.to_string())))?;
            Doc::Raw { doc, edited: false }
        } else {
            let value = crate::hook::parse_body(kind, body, self.depth).map_err(refused)?;
            self.charge(tree_bytes(&value))?;
            Doc::Tree {
                value,
                dirty: false,
            }
        };
        Ok(())
    }

    /// The body as a tree, built from the bytes if need be (an edit marks it `dirty` itself,
    /// once made).
    fn tree(&mut self) -> mlua::Result<&mut Value> {
        self.load()?;
        if let Doc::Raw { doc, edited } = &self.doc {
            let edited = *edited;
            let value = serde_json::from_slice(doc.bytes())
                .map_err(|e| mlua::Error::runtime(format!("invalid json: {e}")))?;
            // The tree lives outside the Lua heap, at many times the text's size.
            self.charge(tree_bytes(&value))?;
            self.doc = Doc::Tree {
                value,
                dirty: edited,
            };
        }
        match &mut self.doc {
            Doc::Tree { value, .. } => Ok(value),
            // Just made a tree above.
            _ => Err(mlua::Error::runtime("no body")),
        }
    }

    /// The bytes, while the body is still bytes; `edited` is raised when `edit`.
    fn raw(&mut self) -> mlua::Result<Option<&mut raw::RawDoc>> {
        self.load()?;
        Ok(match &mut self.doc {
            Doc::Raw { doc, .. } => Some(doc),
            _ => None,
        })
    }

    /// Marks the body changed, as bytes or as a tree.
    fn mark_edited(&mut self) {
        match &mut self.doc {
            Doc::Raw { edited, .. } => *edited = true,
            Doc::Tree { dirty, .. } => *dirty = true,
            Doc::Unread => {}
        }
    }

    /// `get`: the value at `path`, or nil.
    fn get(&mut self, lua: &mlua::Lua, path: &str) -> mlua::Result<mlua::Value> {
        check_path(path, self.depth)?;
        if let Some(doc) = self.raw()? {
            return match doc.find(segments(path)) {
                None => Ok(mlua::Value::Nil),
                Some(text) => json_to_lua(lua, text),
            };
        }
        match lookup(self.tree()?, path) {
            Some(value) => to_lua(lua, value),
            None => Ok(mlua::Value::Nil),
        }
    }

    /// `set`: a top-level field is spliced into the bytes; deeper paths go through a tree.
    fn set(&mut self, lua: &mlua::Lua, path: &str, value: mlua::Value) -> mlua::Result<()> {
        check_path(path, self.depth)?;
        // The value as JSON text, counted against the edit budget (a string before it is
        // copied: escaped, it may be six times as long); a table also as a tree, converted once.
        if let mlua::Value::String(s) = &value {
            self.fits(path.len() + crate::json::quoted_len(&s.as_bytes()))?;
        }
        let (text, table) = match scalar_json(&value) {
            Some(text) => (text, None),
            None => {
                let table =
                    table_json(lua, value, segments(path).count(), self.depth, self.room())?;
                let text = serde_json::to_vec(&table).map_err(mlua::Error::external)?;
                (Cow::Owned(text), Some(table))
            }
        };
        self.charge(path.len() + text.len())?;
        if let Some(doc) = self.raw()? {
            // A top-level member by its index; anything else (a body that is not an object, a
            // key twice, a deeper path) by the path.
            let edit = match single(path) {
                Some(name) if doc.set_top(name, &text) => raw::Edit::Done,
                _ => doc.set_path(path, &segments(path).collect::<Vec<_>>(), &text),
            };
            match edit {
                raw::Edit::Done => {
                    self.mark_edited();
                    return Ok(());
                }
                raw::Edit::Refused(why) => return Err(mlua::Error::runtime(why)),
                raw::Edit::Tree => {}
            }
        }
        let value = match table {
            Some(table) => table,
            None => serde_json::from_slice(&text).map_err(mlua::Error::external)?,
        };
        // Kept as a tree, the value costs its nodes too, not only its text (charged above).
        self.charge(tree_bytes(&value).saturating_sub(text.len()))?;
        // Marked changed only once the slot is there: a refused edit changes nothing.
        *slot(self.tree()?, path)? = value;
        self.mark_edited();
        Ok(())
    }

    /// `delete`: whether something was removed.
    fn delete(&mut self, path: &str) -> mlua::Result<bool> {
        check_path(path, self.depth)?;
        if let Some(doc) = self.raw()? {
            let removed = match single(path).and_then(|name| doc.delete_top(name)) {
                Some(removed) => Ok(removed),
                None => doc.delete_path(&segments(path).collect::<Vec<_>>()),
            };
            match removed {
                Ok(true) => {
                    self.mark_edited();
                    return Ok(true);
                }
                Ok(false) => return Ok(false),
                Err(_) => {}
            }
        }
        let removed = remove(self.tree()?, path);
        if removed {
            self.mark_edited();
        }
        Ok(removed)
    }
}
