//! Form bodies (`application/x-www-form-urlencoded`) as the JSON object kafboy produces.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use bytes::Bytes;

use super::DecodeError;

/// Most fields a form may have. Each costs some 80 bytes while the form is turned into JSON,
/// outside the body budget: a megabyte of `a&a&...` held some 50 MB. (PHP's default is 1000,
/// Tomcat's 10000.)
pub const MAX_FORM_FIELDS: usize = 10_000;

/// `a=1&b=2&a=3` → `{"a":["1","3"],"b":"2"}`: keys in first-seen order, repeated keys as arrays.
pub fn form_to_json(body: &[u8]) -> Result<Bytes, DecodeError> {
    if json_sent_as_form(body) {
        return Err(DecodeError::JsonAsForm);
    }
    let pairs = form_pairs(body)?;
    // `&&` is a form with nothing in it: not an empty body, but nothing to write either.
    if pairs.is_empty() {
        return Err(DecodeError::Form("no fields".into()));
    }
    // Keys are found through a map: a body of 150k distinct keys must not cost 150k² compares.
    let mut slots: HashMap<&str, usize> = HashMap::new();
    let mut fields: Vec<(&str, Vec<&str>)> = Vec::new();
    for (key, value) in &pairs {
        match slots.entry(key) {
            Entry::Occupied(slot) => fields[*slot.get()].1.push(value),
            Entry::Vacant(slot) => {
                slot.insert(fields.len());
                fields.push((key, vec![value]));
            }
        }
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    out.push(b'{');
    for (i, (key, values)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        crate::json::write_string(&mut out, key);
        out.push(b':');
        match values.as_slice() {
            [one] => crate::json::write_string(&mut out, one),
            many => {
                out.push(b'[');
                for (j, v) in many.iter().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    crate::json::write_string(&mut out, v);
                }
                out.push(b']');
            }
        }
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// Whether a form body is JSON (or NDJSON, or JSON with a mistake in it) that a client sent
/// without its Content-Type: it starts with `{` or `[` (which a browser's form encoding
/// escapes) and is JSON, or opens with a quoted name or string (`{"`, `[{"`: a raw `"` is
/// escaped too), or has no `=` in it at all. As a form it would be written as one field's
/// name, cut at its first `=`.
fn json_sent_as_form(body: &[u8]) -> bool {
    let mut text = body.iter().filter(|b| !b.is_ascii_whitespace());
    if !matches!(text.next(), Some(b'{' | b'[')) {
        return false;
    }
    let quoted = text.find(|&&b| b != b'{' && b != b'[') == Some(&b'"');
    // The deepest nesting kafboy's settings allow: nothing is refused for depth here.
    const DEEPEST: usize = 127;
    !body.contains(&b'=') || quoted || crate::json::validate(body, DEEPEST).is_ok()
}

/// The fields of a form body as browsers encode them: `&` between fields, the first `=` between
/// name and value, `+` for a space, `%XX` for a byte (a `%` without two hex digits stays as it
/// is). serde_urlencoded decodes the same way but puts U+FFFD in place of bytes that are not
/// UTF-8, which would produce a record the client never sent; here that is an error.
fn form_pairs(body: &[u8]) -> Result<Vec<(String, String)>, DecodeError> {
    let fields = body.split(|&b| b == b'&').filter(|field| !field.is_empty());
    if fields.clone().nth(MAX_FORM_FIELDS).is_some() {
        return Err(DecodeError::TooManyFields(MAX_FORM_FIELDS));
    }
    fields
        .map(|field| {
            let (name, value) = match field.iter().position(|&b| b == b'=') {
                Some(eq) => (&field[..eq], &field[eq + 1..]),
                None => (field, &b""[..]),
            };
            Ok((unescape(name)?, unescape(value)?))
        })
        .collect()
}

fn unescape(text: &[u8]) -> Result<String, DecodeError> {
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match (b, hex(text.get(i + 1)), hex(text.get(i + 2))) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(high), Some(low)) => {
                // Two hex digits: at most 0xFF.
                out.push((high * 16 + low) as u8);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|e| {
        // The start of the field is enough to find it; all of it could be a megabyte.
        const SHOWN: usize = 64;
        let more = if text.len() > SHOWN { "..." } else { "" };
        DecodeError::Form(format!(
            "a field is not UTF-8 once decoded (byte {} of {:?}{more})",
            e.utf8_error().valid_up_to() + 1,
            String::from_utf8_lossy(&text[..text.len().min(SHOWN)])
        ))
    })
}
