//! Edits below the top level (and the top-level keys), on the bytes, as [`super::super::tree`] makes them on a
//! `serde_json::Value`: a nested field set or removed without the rest of the body going
//! through a tree, whose numbers past f64's precision and whose spacing would not survive it.

use std::ops::Range;

use super::{RawDoc, elements, key_is, members, splice, value_at};

/// What an edit on the bytes came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// Made.
    Done,
    /// Refused, as the tree refuses it (the message is the tree's).
    Refused(String),
    /// Not made: an object on the way has a key twice, which a tree settles (the last value,
    /// in the first one's place).
    Tree,
}

/// Where `seg` leads inside the object or array at `range`.
pub(super) enum Step {
    To(Range<usize>),
    /// An object without `seg`.
    Missing,
    /// An array without that index, or a segment that is not one.
    NoIndex(String),
    /// A scalar.
    Scalar,
    /// `seg` more than once in an object: the last one's value, which a read takes (a tree's
    /// map keeps the last value), and which an edit leaves to a tree.
    Twice(Range<usize>),
}

pub(super) fn step(doc: &[u8], range: &Range<usize>, seg: &str) -> Step {
    match doc.get(range.start) {
        Some(b'{') => {
            let mut hits = members(doc, range.start).filter(|m| key_is(doc, &m.key, seg));
            match (hits.next(), hits.last()) {
                (Some(m), None) => Step::To(m.value),
                (None, _) => Step::Missing,
                (Some(_), Some(last)) => Step::Twice(last.value),
            }
        }
        Some(b'[') => match seg.parse::<usize>() {
            Ok(i) => match elements(doc, range.start).nth(i) {
                Some(r) => Step::To(r),
                None => Step::NoIndex(format!("index {i} out of range")),
            },
            Err(_) => Step::NoIndex(format!("{seg:?} is not an index")),
        },
        _ => Step::Scalar,
    }
}

impl RawDoc {
    /// Sets what `segs` names to `value` (JSON text), making objects of missing fields and of
    /// nulls on the way, as `tree::slot` does; `path` is for the tree's message.
    pub fn set_path(&mut self, path: &str, segs: &[&str], value: &[u8]) -> Edit {
        let doc = self.bytes.clone();
        let Some(mut range) = value_at(&doc, 0) else {
            return Edit::Tree;
        };
        for (n, seg) in segs.iter().enumerate() {
            if doc[range.start] == b'n' {
                return self.apply(range, &nested(&segs[n..], value));
            }
            range = match step(&doc, &range, seg) {
                Step::To(next) => next,
                Step::Missing => {
                    // Added after the object's last member, as a tree's map adds it.
                    let (at, comma) = match members(&doc, range.start).last() {
                        Some(last) => (last.value.end, true),
                        None => (range.start + 1, false),
                    };
                    let rest = nested(&segs[n + 1..], value);
                    let mut out = Vec::with_capacity(seg.len() + rest.len() + 4);
                    if comma {
                        out.push(b',');
                    }
                    crate::json::write_string(&mut out, seg);
                    out.push(b':');
                    out.extend_from_slice(&rest);
                    return self.apply(at..at, &out);
                }
                Step::NoIndex(why) => return Edit::Refused(why),
                Step::Scalar => {
                    return Edit::Refused(format!("cannot set {path:?}: not an object"));
                }
                Step::Twice(_) => return Edit::Tree,
            };
        }
        self.apply(range, value)
    }

    /// Removes what `segs` names, as `tree::remove` does: whether something was removed.
    pub fn delete_path(&mut self, segs: &[&str]) -> Result<bool, Edit> {
        let doc = self.bytes.clone();
        let (Some((last, parents)), Some(mut range)) = (segs.split_last(), value_at(&doc, 0))
        else {
            return Ok(false);
        };
        for seg in parents {
            range = match step(&doc, &range, seg) {
                Step::To(next) => next,
                Step::Twice(_) => return Err(Edit::Tree),
                _ => return Ok(false),
            };
        }
        // Each item with the text it takes: a member from its key.
        let items: Vec<Range<usize>> = match doc[range.start] {
            b'{' => {
                let all: Vec<_> = members(&doc, range.start).collect();
                let mut hits = all.iter().filter(|m| key_is(&doc, &m.key, last));
                if let (Some(_), Some(_)) = (hits.next(), hits.next()) {
                    return Err(Edit::Tree);
                }
                all.iter().map(|m| m.key.start..m.value.end).collect()
            }
            b'[' => elements(&doc, range.start).collect(),
            _ => return Ok(false),
        };
        let found = match doc[range.start] {
            b'{' => members(&doc, range.start).position(|m| key_is(&doc, &m.key, last)),
            _ => last.parse::<usize>().ok().filter(|&i| i < items.len()),
        };
        let Some(i) = found else { return Ok(false) };
        self.apply(super::item_cut(&items, i), b"");
        Ok(true)
    }

    /// The top-level keys in order, each once (where it first stands, as a tree has it);
    /// `None` when the body is not an object.
    pub fn keys(&self) -> Option<Vec<String>> {
        let doc = &self.bytes[..];
        let members = self.members.as_ref()?;
        let mut seen = std::collections::HashSet::with_capacity(members.len());
        let mut keys: Vec<String> = Vec::with_capacity(members.len());
        for m in members {
            // Checked JSON: a key is a string.
            let key: String = serde_json::from_slice(&doc[m.key.clone()]).ok()?;
            if seen.insert(key.clone()) {
                keys.push(key);
            }
        }
        Some(keys)
    }

    /// Replaces `cut` with `insert` and indexes the top-level members again.
    fn apply(&mut self, cut: Range<usize>, insert: &[u8]) -> Edit {
        self.bytes = splice(&self.bytes, cut, insert);
        // An edit of the whole body (the empty path) may make it an object, or not one.
        let doc = &self.bytes[..];
        self.members = value_at(doc, 0)
            .filter(|r| doc[r.start] == b'{')
            .map(|r| members(doc, r.start).collect());
        Edit::Done
    }
}

/// `value` inside objects named by `segs`: `{"a":{"b":value}}`.
fn nested(segs: &[&str], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + segs.iter().map(|s| s.len() + 5).sum::<usize>());
    for seg in segs {
        out.push(b'{');
        crate::json::write_string(&mut out, seg);
        out.push(b':');
    }
    out.extend_from_slice(value);
    out.extend(std::iter::repeat_n(b'}', segs.len()));
    out
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::super::super::tree::{remove, slot};
    use super::super::tests::{spaced, value};
    use super::*;

    fn doc(text: &str) -> RawDoc {
        RawDoc::check(Bytes::copy_from_slice(text.as_bytes()), 128).unwrap()
    }

    fn segs(path: &str) -> Vec<&str> {
        path.split('.').filter(|s| !s.is_empty()).collect()
    }

    #[test]
    fn untouched_numbers_and_spacing_stay_as_sent() {
        let mut d = doc(r#"{"id": 123456789012345678901234567890, "a": {"x": 1.10}}"#);
        assert_eq!(d.set_path("a.y", &segs("a.y"), b"2"), Edit::Done);
        assert_eq!(
            d.bytes(),
            &br#"{"id": 123456789012345678901234567890, "a": {"x": 1.10,"y":2}}"#[..]
        );
        assert_eq!(d.delete_path(&segs("a.x")), Ok(true));
        assert_eq!(
            d.bytes(),
            &br#"{"id": 123456789012345678901234567890, "a": {"y":2}}"#[..]
        );
        // A refused edit changes nothing.
        let refused = d.set_path("a.y.z", &segs("a.y.z"), b"1");
        assert_eq!(
            refused,
            Edit::Refused(r#"cannot set "a.y.z": not an object"#.into())
        );
        assert_eq!(d.find(["a", "y"].into_iter()), Some(&b"2"[..]));
        // Duplicates on the way are the tree's.
        let mut twice = doc(r#"{"a":{"b":1},"a":{"b":2}}"#);
        assert_eq!(twice.set_path("a.b", &segs("a.b"), b"3"), Edit::Tree);
        assert_eq!(twice.delete_path(&segs("a.b")), Err(Edit::Tree));
        // The whole body, by the empty path.
        let mut whole = doc(r#"{"a":1}"#);
        assert_eq!(whole.set_path("", &[], b"[1]"), Edit::Done);
        assert!(!whole.set_top("b", b"1"), "no longer an object");
        assert_eq!(whole.set_path("", &[], br#"{"c":{}}"#), Edit::Done);
        assert!(whole.set_top("b", b"1"));
        assert_eq!(
            serde_json::from_slice::<Value>(whole.bytes()).unwrap(),
            json!({"c":{}, "b":1})
        );
        // A body that is not an object: its elements by index, the rest as sent.
        let mut array = doc(r#"[{"id":18446744073709551616}, {"x":1.10}, 3]"#);
        assert_eq!(array.set_path("2", &segs("2"), b"4"), Edit::Done);
        assert_eq!(array.delete_path(&segs("1")), Ok(true));
        assert_eq!(array.bytes(), &br#"[{"id":18446744073709551616}, 4]"#[..]);
        // Keys once each, where they first stand, decoded.
        assert_eq!(
            doc(r#"{"b":1, "a\u0041":2, "b":3}"#).keys(),
            Some(vec!["b".to_string(), "aA".to_string()])
        );
        assert_eq!(doc("[1]").keys(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(String, Value),
        Delete(String),
    }

    fn op() -> impl Strategy<Value = Op> {
        let path = "[a-c0-2]{1,2}(\\.[a-c0-2]{1,2}){0,3}";
        prop_oneof![
            (path, value()).prop_map(|(p, v)| Op::Set(p, v)),
            path.prop_map(Op::Delete),
        ]
    }

    proptest! {
        /// Any sequence of edits by path on the bytes gives what the same edits on a
        /// `serde_json::Value` give, refusals included.
        #[test]
        fn path_edits_on_bytes_match_edits_on_a_tree(
            start in prop::collection::vec(("[a-c]{1,2}", value()), 0..5),
            ops in prop::collection::vec(op(), 0..8),
        ) {
            let mut tree = Value::Object(start.into_iter().collect());
            let mut d = RawDoc::check(Bytes::from(spaced(&tree)), 128).unwrap();
            for op in ops {
                match op {
                    Op::Set(path, v) => {
                        let text = serde_json::to_vec(&v).unwrap();
                        let before = tree.clone();
                        let edit = d.set_path(&path, &segs(&path), &text);
                        match slot(&mut tree, &path) {
                            Ok(place) => {
                                *place = v;
                                prop_assert_eq!(edit, Edit::Done, "{}", path);
                            }
                            Err(e) => {
                                tree = before;
                                prop_assert_eq!(edit, Edit::Refused(e.to_string().replace("runtime error: ", "")), "{}", path);
                            }
                        }
                    }
                    Op::Delete(path) => {
                        prop_assert_eq!(d.delete_path(&segs(&path)), Ok(remove(&mut tree, &path)), "{}", path);
                    }
                }
                let now: Value = serde_json::from_slice(d.bytes()).unwrap();
                prop_assert_eq!(&now, &tree);
                prop_assert!(crate::json::validate(d.bytes(), 128).is_ok());
                let keys: Vec<String> = tree.as_object().unwrap().keys().cloned().collect();
                prop_assert_eq!(d.keys(), Some(keys));
                for (k, v) in tree.as_object().into_iter().flatten() {
                    let found = d.find([k.as_str()].into_iter()).map(|t| serde_json::from_slice::<Value>(t).unwrap());
                    prop_assert_eq!(found.as_ref(), Some(v), "the index after an edit");
                }
            }
        }
    }
}
