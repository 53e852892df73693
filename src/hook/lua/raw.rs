//! Reads and top-level edits on the bytes of a JSON document, without building a tree: a script
//! that reads a field or two and sets one costs the JSON check (which also indexes the top-level
//! members) and a splice, not a parse, a re-serialization and a drop of the whole body.
//! Anything else falls back to `serde_json::Value`, with the same results.

use std::ops::Range;

use bytes::Bytes;

use crate::json::{Member, special_offset};

mod path;

pub use path::Edit;

/// A checked JSON document and the ranges of its top-level members.
pub struct RawDoc {
    bytes: Bytes,
    /// `None` when the document is not an object.
    members: Option<Vec<Member>>,
}

impl RawDoc {
    /// Checks `bytes` (the JSON check, nested at most `max_depth`).
    pub fn check(bytes: Bytes, max_depth: usize) -> Result<RawDoc, String> {
        let members = crate::json::validate_indexed(&bytes, max_depth)?;
        Ok(RawDoc { bytes, members })
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The value `segments` names (fields and array indexes), as `serde_json::Value` resolves
    /// it: the last of duplicate keys wins.
    pub fn find<'s>(&self, mut segments: impl Iterator<Item = &'s str>) -> Option<&[u8]> {
        let doc = &self.bytes[..];
        let mut range = match (&self.members, segments.next()) {
            (_, None) => value_at(doc, 0)?,
            (Some(members), Some(first)) => {
                let member = members.iter().rev().find(|m| key_is(doc, &m.key, first))?;
                member.value.clone()
            }
            (None, Some(first)) => step(doc, value_at(doc, 0)?, first)?,
        };
        for seg in segments {
            range = step(doc, range, seg)?;
        }
        doc.get(range)
    }

    /// Sets the top-level member `name` to `value` (JSON text): replaced where it is, appended
    /// after the last member otherwise. False, and nothing changed, when the document is not an
    /// object or has `name` twice (a tree settles those).
    pub fn set_top(&mut self, name: &str, value: &[u8]) -> bool {
        let Some(members) = &mut self.members else {
            return false;
        };
        let bytes = self.bytes.clone();
        let doc = &bytes[..];
        match hits(members, doc, name) {
            (Some(i), None) => {
                let old = members[i].value.clone();
                let delta = value.len() as isize - old.len() as isize;
                members[i].value = old.start..old.start + value.len();
                for m in &mut members[i + 1..] {
                    m.shift(delta);
                }
                self.bytes = splice(doc, old, value);
            }
            (None, _) => {
                let at = match members.last() {
                    Some(last) => last.value.end,
                    None => doc.iter().position(|&b| b == b'{').map_or(0, |p| p + 1),
                };
                // Written straight into the new document: `,"name":value` at `at`.
                let mut out = Vec::with_capacity(doc.len() + name.len() + value.len() + 4);
                out.extend_from_slice(&doc[..at]);
                if !members.is_empty() {
                    out.push(b',');
                }
                let key_start = out.len();
                crate::json::write_string(&mut out, name);
                let key = key_start..out.len();
                out.push(b':');
                let value_start = out.len();
                out.extend_from_slice(value);
                members.push(Member {
                    key,
                    value: value_start..out.len(),
                });
                out.extend_from_slice(&doc[at..]);
                self.bytes = Bytes::from(out);
            }
            (Some(_), Some(_)) => return false,
        }
        true
    }

    /// Removes the top-level member `name`: whether there was one, or `None` when the document
    /// is not an object or has `name` twice.
    pub fn delete_top(&mut self, name: &str) -> Option<bool> {
        let members = self.members.as_mut()?;
        let bytes = self.bytes.clone();
        let doc = &bytes[..];
        let i = match hits(members, doc, name) {
            (None, _) => return Some(false),
            (Some(i), None) => i,
            (Some(_), Some(_)) => return None,
        };
        let items: Vec<_> = members.iter().map(|m| m.key.start..m.value.end).collect();
        let cut = item_cut(&items, i);
        members.remove(i);
        for m in &mut members[i..] {
            m.shift(-(cut.len() as isize));
        }
        self.bytes = splice(doc, cut, b"");
        Some(true)
    }
}

/// What removing item `i` of a list (an object's members from their keys, an array's elements)
/// cuts: the item with the comma that joins it to a neighbour.
fn item_cut(items: &[Range<usize>], i: usize) -> Range<usize> {
    match (i.checked_sub(1), items.get(i + 1)) {
        (_, Some(next)) => items[i].start..next.start,
        (Some(previous), None) => items[previous].end..items[i].end,
        (None, None) => items[i].clone(),
    }
}

/// The value `seg` names inside the value at `range` (the last of duplicate keys).
fn step(doc: &[u8], range: Range<usize>, seg: &str) -> Option<Range<usize>> {
    match path::step(doc, &range, seg) {
        path::Step::To(value) | path::Step::Twice(value) => Some(value),
        _ => None,
    }
}

/// The first two members named `name`.
fn hits(members: &[Member], doc: &[u8], name: &str) -> (Option<usize>, Option<usize>) {
    let mut found = (0..members.len()).filter(|&i| key_is(doc, &members[i].key, name));
    (found.next(), found.next())
}

impl Member {
    fn shift(&mut self, delta: isize) {
        let at = |p: usize| p.saturating_add_signed(delta);
        self.key = at(self.key.start)..at(self.key.end);
        self.value = at(self.value.start)..at(self.value.end);
    }
}

fn splice(doc: &[u8], cut: Range<usize>, insert: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(doc.len() + insert.len());
    out.extend_from_slice(&doc[..cut.start]);
    out.extend_from_slice(insert);
    out.extend_from_slice(&doc[cut.end..]);
    Bytes::from(out)
}

/// Whether the quoted key at `key` decodes to `name`. Decoding an escape only ever shortens
/// the text, so the lengths settle most keys without a look at their bytes.
fn key_is(doc: &[u8], key: &Range<usize>, name: &str) -> bool {
    let inner_len = key.len().saturating_sub(2);
    let name = name.as_bytes();
    if inner_len < name.len() {
        return false;
    }
    let raw = &doc[key.clone()];
    let inner = &raw[1..raw.len() - 1];
    if inner_len == name.len() {
        // Equal lengths: equal only if unescaped, and then the bytes are the text.
        return inner == name && !name.contains(&b'\\');
    }
    inner.contains(&b'\\')
        && serde_json::from_slice::<String>(raw).is_ok_and(|k| k.as_bytes() == name)
}

fn skip_whitespace(doc: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = doc.get(i) {
        i += 1;
    }
    i
}

/// The value starting at or after `i` (after whitespace).
fn value_at(doc: &[u8], i: usize) -> Option<Range<usize>> {
    let start = skip_whitespace(doc, i);
    Some(start..value_end(doc, start)?)
}

/// Where the value starting at `i` ends.
fn value_end(doc: &[u8], i: usize) -> Option<usize> {
    match doc.get(i)? {
        b'"' => string_end(doc, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                // Only quotes and brackets matter; everything else is skipped in one go.
                j += doc
                    .get(j..)?
                    .iter()
                    .position(|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']'))?;
                match doc[j] {
                    b'"' => {
                        j = string_end(doc, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                }
                j += 1;
            }
        }
        _ => {
            let rest = &doc[i..];
            let len = rest
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\t' | b'\r'))
                .unwrap_or(rest.len());
            Some(i + len)
        }
    }
}

/// Where the string whose opening quote is at `i` ends (after its closing quote).
fn string_end(doc: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += special_offset(doc.get(j..)?);
        match doc.get(j)? {
            b'"' => return Some(j + 1),
            // An escape: the next byte is never the closing quote.
            b'\\' => j += 2,
            _ => return None,
        }
    }
}

/// The members of the object whose `{` is at `open`.
fn members(doc: &[u8], open: usize) -> impl Iterator<Item = Member> + '_ {
    let mut i = open + 1;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        i = skip_whitespace(doc, i);
        if doc.get(i) != Some(&b'"') {
            done = true;
            return None;
        }
        let key = i..string_end(doc, i)?;
        let colon = skip_whitespace(doc, key.end);
        let value = value_at(doc, colon + 1)?;
        i = skip_whitespace(doc, value.end);
        match doc.get(i) {
            Some(b',') => i += 1,
            _ => done = true,
        }
        Some(Member { key, value })
    })
}

/// The elements of the array whose `[` is at `open`.
fn elements(doc: &[u8], open: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut i = skip_whitespace(doc, open + 1);
    let mut done = doc.get(i) == Some(&b']');
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let value = value_at(doc, i)?;
        i = skip_whitespace(doc, value.end);
        match doc.get(i) {
            Some(b',') => i += 1,
            _ => done = true,
        }
        Some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    const DOC: &[u8] =
        br#" { "user" : {"id":7, "tags":["a","b\"]"]}, "n": -1.5e3,"s":"x\\y", "e":{}, "user":{"id":8}} "#;

    fn doc(text: &[u8]) -> RawDoc {
        RawDoc::check(Bytes::copy_from_slice(text), 128).unwrap()
    }

    fn get(text: &[u8], path: &str) -> Option<Value> {
        doc(text)
            .find(path.split('.').filter(|s| !s.is_empty()))
            .map(|v| serde_json::from_slice(v).unwrap())
    }

    fn tree(d: &RawDoc) -> Value {
        serde_json::from_slice(d.bytes()).unwrap()
    }

    #[test]
    fn finds_what_a_tree_finds() {
        let tree: Value = serde_json::from_slice(DOC).unwrap();
        for path in [
            "",
            "user",
            "user.id",
            "n",
            "s",
            "e",
            "nope",
            "user.tags",
            "user.tags.1",
            "e.x",
            "n.x",
        ] {
            let mut expect = Some(&tree);
            for seg in path.split('.').filter(|s| !s.is_empty()) {
                expect = expect.and_then(|v| match v {
                    Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
                    v => v.get(seg),
                });
            }
            assert_eq!(get(DOC, path), expect.cloned(), "{path}");
        }
        let arr = br#"[1, {"a":[true, null]} ,"]"]"#;
        assert_eq!(get(arr, "1.a.0"), Some(json!(true)));
        assert_eq!(get(arr, "2"), Some(json!("]")));
        assert_eq!(get(arr, "3"), None);
        assert_eq!(get(b"[]", "0"), None);
    }

    #[test]
    fn top_level_edits_match_a_tree() {
        let text = br#"{"a": 1, "b\u0041": [2], "c":{"d":3}}"#;
        let mut d = doc(text);
        assert!(d.set_top("bA", b"\"x\""));
        assert_eq!(tree(&d), json!({"a": 1, "bA": "x", "c": {"d": 3}}));
        assert!(d.set_top("z", b"null"));
        assert!(d.set_top("a", b"[1,2,3]"));
        assert_eq!(
            tree(&d),
            json!({"a": [1,2,3], "bA": "x", "c": {"d": 3}, "z": null})
        );
        // The index follows the edits.
        assert_eq!(d.find(["c", "d"].into_iter()), Some(&b"3"[..]));
        assert_eq!(d.find(["z"].into_iter()), Some(&b"null"[..]));
        assert_eq!(d.delete_top("bA"), Some(true));
        assert_eq!(d.delete_top("bA"), Some(false));
        assert_eq!(d.delete_top("z"), Some(true));
        assert_eq!(tree(&d), json!({"a": [1,2,3], "c": {"d": 3}}));
        assert_eq!(d.delete_top("a"), Some(true));
        assert_eq!(d.delete_top("c"), Some(true));
        assert_eq!(d.bytes(), &b"{}"[..]);
        assert!(d.set_top("k", b"1"));
        assert_eq!(tree(&d), json!({"k": 1}));

        let mut empty = doc(b" { } ");
        assert!(empty.set_top("k", b"1"));
        assert_eq!(empty.bytes(), &b" {\"k\":1 } "[..]);
        // Duplicates and non-objects are left to the tree.
        assert!(!doc(DOC).set_top("user", b"1"));
        assert_eq!(doc(DOC).delete_top("user"), None);
        assert!(!doc(b"[1]").set_top("a", b"1"));
    }

    #[test]
    fn keys_compare_as_their_decoded_text() {
        let cases: [(&str, &str, bool); 10] = [
            (r#""a""#, "a", true),
            (r#""a""#, "b", false),
            (r#""ab""#, "a", false),
            (r#""\u0061""#, "a", true),
            (r#""\u0061b""#, "ab", true),
            (r#""\u0061""#, "\\u0061", false),
            (r#""a\"b""#, "a\"b", true),
            (r#""a\\""#, "a\\", true),
            (r#""a\\""#, "a\\\\", false),
            (r#""\ud83d\ude00""#, "😀", true),
        ];
        for (key, name, want) in cases {
            let doc = key.as_bytes();
            assert_eq!(
                key_is(doc, &(0..doc.len()), name),
                want,
                "{key} vs {name:?}"
            );
        }
    }

    /// Small JSON values, keys from a tiny alphabet so that edits hit existing members.
    pub(super) fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-c\\\\\"é]{0,3}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec(("[a-c]{1,2}", inner), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(String, Value),
        Delete(String),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            ("[a-c]{1,2}", value()).prop_map(|(k, v)| Op::Set(k, v)),
            "[a-c]{1,2}".prop_map(Op::Delete),
        ]
    }

    /// The document as text with whitespace around every token, so ranges are not trivially
    /// aligned.
    pub(super) fn spaced(v: &Value) -> Vec<u8> {
        let compact = serde_json::to_string(v).unwrap();
        let mut out = String::from(" ");
        let mut in_string = false;
        let mut escaped = false;
        for c in compact.chars() {
            out.push(c);
            if in_string {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
            } else if c == '"' {
                in_string = true;
            } else if matches!(c, ',' | ':' | '{' | '[') {
                out.push_str(" \n ");
            }
        }
        out.push(' ');
        out.into_bytes()
    }

    proptest! {
        /// Any sequence of top-level edits and reads on the bytes gives what the same edits on a
        /// `serde_json::Value` give.
        #[test]
        fn edits_on_bytes_match_edits_on_a_tree(
            start in prop::collection::vec(("[a-c]{1,2}", value()), 0..5),
            ops in prop::collection::vec(op(), 0..6),
            paths in prop::collection::vec("[a-c0-2]{1,2}(\\.[a-c0-2]{1,2}){0,2}", 0..4),
        ) {
            let mut tree = Value::Object(start.into_iter().collect());
            let mut d = RawDoc::check(Bytes::from(spaced(&tree)), 128).unwrap();
            for op in ops {
                let map = tree.as_object_mut().unwrap();
                match op {
                    Op::Set(k, v) => {
                        prop_assert!(d.set_top(&k, &serde_json::to_vec(&v).unwrap()));
                        map.insert(k, v);
                    }
                    Op::Delete(k) => {
                        prop_assert_eq!(d.delete_top(&k), Some(map.shift_remove(&k).is_some()));
                    }
                }
                let now: Value = serde_json::from_slice(d.bytes()).unwrap();
                prop_assert_eq!(&now, &tree);
                prop_assert!(crate::json::validate(d.bytes(), 128).is_ok());
            }
            for path in paths {
                let segs: Vec<&str> = path.split('.').collect();
                let mut expect = Some(&tree);
                for seg in &segs {
                    expect = expect.and_then(|v| match v {
                        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
                        v => v.get(*seg),
                    });
                }
                let got = d.find(segs.iter().copied()).map(|t| serde_json::from_slice::<Value>(t).unwrap());
                prop_assert_eq!(got.as_ref(), expect, "{}", path);
            }
        }
    }
}
