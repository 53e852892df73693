//! What a script's `on_request` returns (`forward()`, `reject(..)`, `respond(..)` or nil), as a
//! [`Verdict`].

use axum::http::StatusCode;
use bytes::Bytes;
use mlua::Table;

use crate::config::Mode;
use crate::hook::{Forward, Respond, Verdict};

/// Turns what `on_request` returned into a verdict. `nil` means forward.
pub(super) fn verdict(
    result: mlua::Value,
    edits: Forward,
    forward: &Table,
) -> mlua::Result<Verdict> {
    let table = match result {
        mlua::Value::Nil => return Ok(Verdict::Forward(edits)),
        mlua::Value::Table(t) if t.to_pointer() == forward.to_pointer() => {
            return Ok(Verdict::Forward(edits));
        }
        mlua::Value::Table(t) => t,
        other => {
            return Err(mlua::Error::runtime(format!(
                "on_request must return forward(), reject(..), respond(..) or nil, not a {}",
                other.type_name()
            )));
        }
    };
    let action: String = table.get("action")?;
    match action.as_str() {
        "forward" => Ok(Verdict::Forward(edits)),
        "reject" => Ok(Verdict::Reject {
            status: status(&table, 400)?,
            // Lossy: a message quoting what the client sent may not be UTF-8.
            message: table
                .get::<Option<mlua::LuaString>>("message")?
                .map_or_else(|| "rejected".into(), |m| m.to_string_lossy()),
        }),
        "respond" => {
            let body: mlua::LuaString = table.get("body")?;
            let then = match table.get::<mlua::Value>("produce")? {
                mlua::Value::Nil | mlua::Value::Boolean(false) => None,
                mlua::Value::String(m) => Some((mode(&m.to_str()?)?, edits)),
                _ => {
                    return Err(mlua::Error::runtime(
                        "respond's third argument is a mode name",
                    ));
                }
            };
            Ok(Verdict::Respond(Respond {
                status: status(&table, 200)?,
                body: Bytes::copy_from_slice(&body.as_bytes()),
                content_type: None,
                then,
            }))
        }
        other => Err(mlua::Error::runtime(format!("unknown action {other:?}"))),
    }
}

fn status(table: &Table, default: u16) -> mlua::Result<StatusCode> {
    let code = table.get::<Option<u16>>("status")?.unwrap_or(default);
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational() && s.as_u16() <= 599)
        .ok_or_else(|| mlua::Error::runtime(format!("{code} is not an HTTP status")))
}

fn mode(name: &str) -> mlua::Result<Mode> {
    match name {
        "async" => Ok(Mode::Async),
        "sync" => Ok(Mode::Sync),
        "batch_async" => Ok(Mode::BatchAsync),
        "batch_sync" => Ok(Mode::BatchSync),
        other => Err(mlua::Error::runtime(format!("unknown mode {other:?}"))),
    }
}
