//! The strict JSON check every JSON record passes: one pass over the bytes with an explicit
//! stack, nothing built. It accepts exactly what `serde_json::Value` accepts (RFC 8259; no lone
//! surrogate escapes; no number beyond `f64`), nested at most a given depth.
//!
//! serde_json itself was the check before: through a visitor it parsed every string and number
//! into values nobody used, a third of the instructions of an `/async` request with a 1 KiB
//! body. This check does the same job in a fifth of that; the fuzz target `decode` holds it to
//! serde_json's verdict on every input.
//!
//! It also writes JSON strings for the code that builds JSON from parts (forms, Lua edits).

use std::ops::Range;

mod scalar;

pub(crate) use scalar::special_offset;

/// Deepest nesting this checker tracks: serde_json's own limit, which takes 127 levels (it
/// starts at 128 and refuses a document when that reaches 0).
const MAX_TRACKED_DEPTH: usize = 127;

/// Checks that `bytes` is one UTF-8 JSON document, with nothing but whitespace around it,
/// nested at most `max_depth` deep. The error says what is wrong and where.
pub fn validate(bytes: &[u8], max_depth: usize) -> Result<(), String> {
    check::<false>(bytes, max_depth, &mut Vec::new())
}

/// One `"key": value` of the top-level object, as byte ranges (the key with its quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: Range<usize>,
    pub value: Range<usize>,
}

/// [`validate`], and the members of the top-level object in order (duplicates included), or
/// `None` when the document is not an object. The same single pass.
pub fn validate_indexed(bytes: &[u8], max_depth: usize) -> Result<Option<Vec<Member>>, String> {
    let mut members = Vec::with_capacity(16);
    check::<true>(bytes, max_depth, &mut members)?;
    let object = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    Ok(object.then_some(members))
}

/// The length of `text` as a JSON string, quotes included, as [`write_string`] writes it: what
/// an edit is charged before the copy is made (a control byte takes six).
pub fn quoted_len(text: &[u8]) -> usize {
    // Bytes that are not UTF-8 are written as U+FFFD (three bytes), one for each maximal
    // invalid sequence, as `String::from_utf8_lossy` writes them.
    let quoted = |valid: &str| -> usize {
        let escapes: usize = valid
            .bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
                0..0x20 => 5,
                _ => 0,
            })
            .sum();
        valid.len() + escapes
    };
    let body: usize = text
        .utf8_chunks()
        .map(|c| quoted(c.valid()) + if c.invalid().is_empty() { 0 } else { 3 })
        .sum();
    body + 2
}

/// Writes `text` as a JSON string, as serde_json writes it: as it is between quotes when
/// nothing in it needs escaping (keys and most values), else through serde_json.
pub fn write_string(out: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(out, text);
    }
}

/// The check; with `INDEX`, the top-level members go into `members` (a separate instance, so
/// the plain check pays nothing for it).
fn check<const INDEX: bool>(
    bytes: &[u8],
    max_depth: usize,
    members: &mut Vec<Member>,
) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let max_depth = max_depth.min(MAX_TRACKED_DEPTH);
    let mut checker = Checker::<INDEX> {
        b: text.as_bytes(),
        i: 0,
        members,
        max_depth,
        depth: 0,
        objects: [false; MAX_TRACKED_DEPTH],
    };
    checker.document().map_err(|(at, what)| {
        let what = match what {
            Fault::TooDeep => format!("nested deeper than {max_depth} levels"),
            Fault::Syntax(what) => what.to_string(),
        };
        let described = describe(bytes, at, &what);
        // Editors on some systems write one; "at column 1" would not say what it is.
        if at == 0 && bytes.starts_with("\u{feff}".as_bytes()) {
            format!("{described} (a UTF-8 byte order mark, which JSON does not allow)")
        } else {
            described
        }
    })
}

enum Fault {
    TooDeep,
    Syntax(&'static str),
}

/// A refusal: the byte offset and the fault.
type Refusal = (usize, Fault);

fn fail<T>(at: usize, what: &'static str) -> Result<T, Refusal> {
    Err((at, Fault::Syntax(what)))
}

/// `what at line L column C`, both 1-based, as serde_json words it.
fn describe(bytes: &[u8], at: usize, what: &str) -> String {
    let at = at.min(bytes.len());
    let before = &bytes[..at];
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    format!("{what} at line {line} column {}", at - line_start + 1)
}

struct Checker<'a, const INDEX: bool> {
    b: &'a [u8],
    i: usize,
    /// Where the top-level object's members go, with `INDEX`.
    members: &'a mut Vec<Member>,
    max_depth: usize,
    /// Open containers.
    depth: usize,
    /// Whether the container at each depth is an object.
    objects: [bool; MAX_TRACKED_DEPTH],
}

impl<const INDEX: bool> Checker<'_, INDEX> {
    /// The document: values and the containers around them, iteratively (no recursion, so
    /// no stack to exhaust).
    fn document(&mut self) -> Result<(), Refusal> {
        loop {
            if !self.value()? && self.close()? {
                return Ok(());
            }
        }
    }

    /// One value, or the start of a container; true when a container opened and its first
    /// value comes next.
    #[inline(always)]
    fn value(&mut self) -> Result<bool, Refusal> {
        self.skip_whitespace();
        match self.peek() {
            Some(open @ (b'{' | b'[')) => self.open(open == b'{'),
            Some(b'"') => {
                self.i += 1;
                self.string().map(|()| false)
            }
            Some(b'-' | b'0'..=b'9') => self.number().map(|()| false),
            Some(b't') => self.literal(b"true").map(|()| false),
            Some(b'f') => self.literal(b"false").map(|()| false),
            Some(b'n') => self.literal(b"null").map(|()| false),
            Some(_) => fail(self.i, "expected value"),
            None => fail(self.i, "EOF while parsing a value"),
        }
    }

    /// After `{` or `[`: false when the container is empty (and closed at once).
    #[inline(always)]
    fn open(&mut self, object: bool) -> Result<bool, Refusal> {
        if self.depth >= self.max_depth {
            return Err((self.i, Fault::TooDeep));
        }
        self.i += 1;
        self.objects[self.depth] = object;
        self.depth += 1;
        self.skip_whitespace();
        let close = if object { b'}' } else { b']' };
        if self.peek() == Some(close) {
            self.i += 1;
            self.depth -= 1;
            return Ok(false);
        }
        if object {
            self.key()?;
        }
        Ok(true)
    }

    /// After a complete value: closes containers until a `,` leads to the next value (false)
    /// or the document ends with nothing but whitespace after it (true).
    #[inline(always)]
    fn close(&mut self) -> Result<bool, Refusal> {
        loop {
            if INDEX
                && self.depth == 1
                && self.objects[0]
                && let Some(last) = self.members.last_mut()
            {
                last.value.end = self.i;
            }
            self.skip_whitespace();
            if self.depth == 0 {
                return match self.peek() {
                    None => Ok(true),
                    Some(_) => fail(self.i, "trailing characters"),
                };
            }
            let object = self.objects[self.depth - 1];
            match (self.peek(), object) {
                (Some(b','), _) => {
                    self.i += 1;
                    if object {
                        self.key()?;
                    }
                    return Ok(false);
                }
                (Some(b'}'), true) | (Some(b']'), false) => {
                    self.i += 1;
                    self.depth -= 1;
                }
                (Some(_), true) => return fail(self.i, "expected `,` or `}`"),
                (Some(_), false) => return fail(self.i, "expected `,` or `]`"),
                (None, true) => return fail(self.i, "EOF while parsing an object"),
                (None, false) => return fail(self.i, "EOF while parsing a list"),
            }
        }
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// An object key and its colon; the value follows. Keys of the top-level object are
    /// recorded when members are wanted.
    #[inline(always)]
    fn key(&mut self) -> Result<(), Refusal> {
        self.skip_whitespace();
        let start = self.i;
        match self.peek() {
            Some(b'"') => self.i += 1,
            Some(_) => return fail(self.i, "key must be a string"),
            None => return fail(self.i, "EOF while parsing an object"),
        }
        self.string()?;
        let key = start..self.i;
        self.skip_whitespace();
        match self.peek() {
            Some(b':') => {
                self.i += 1;
                if INDEX && self.depth == 1 {
                    // The value starts after the whitespace that `value` skips next.
                    self.skip_whitespace();
                    let value = self.i..self.i;
                    self.members.push(Member { key, value });
                }
                Ok(())
            }
            Some(_) => fail(self.i, "expected `:`"),
            None => fail(self.i, "EOF while parsing an object"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde_verdict(b: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(b).is_ok()
    }

    #[test]
    fn agrees_with_serde_json_on_edge_cases() {
        for doc in [
            "0",
            "-0",
            "-",
            "01",
            "1.",
            "1.e5",
            "1e",
            "1e+",
            "1E-7",
            "-0.0e-0",
            "2.5e308",
            "1.7976931348623157e308",
            "1.7976931348623159e308",
            "1e308",
            "10e307",
            "1e309",
            "0e99999999999999999999",
            "0.0e400",
            "1e-99999",
            "0.000001e305",
            "1e400",
            "18446744073709551616",
            "-9223372036854775809",
            "[1,]",
            "[,1]",
            "{\"a\"}",
            "{\"a\":}",
            "{1:2}",
            "{\"a\":1,}",
            "{\"a\":1 \"b\":2}",
            "[1 2]",
            "nul",
            "truex",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"\\ud800\\udc00\"",
            "\"\\ud800x\"",
            "\"\\u00e9\"",
            "\"\\uZZZZ\"",
            "\"\\x\"",
            "\"a\tb\"",
            "\"\u{7f}\"",
            "\"é\"",
            " [ ] ",
            "{}{}",
            "\"abc",
            "[\"abcdefghijklmnop\\\"qrstuvwxyz\"]",
            "[1,[2,[3,{\"x\":[]}]]]",
            "\u{feff}1",
            "[\u{a0}1]",
            "[1\u{0b}]",
        ] {
            assert_eq!(
                validate(doc.as_bytes(), 128).is_ok(),
                serde_verdict(doc.as_bytes()),
                "{doc:?}: {:?}",
                validate(doc.as_bytes(), 128)
            );
        }
        let big = format!("{}e-300", "1".repeat(400));
        assert!(validate(big.as_bytes(), 128).is_ok());
        let huge = "9".repeat(400);
        assert!(validate(huge.as_bytes(), 128).is_err());
    }

    #[test]
    fn nesting_is_refused_where_serde_json_refuses_it() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let serde = |doc: &str| serde_json::from_str::<serde_json::Value>(doc).is_ok();
        assert!(validate(nested(127).as_bytes(), 1000).is_ok());
        assert!(serde(&nested(127)));
        assert!(validate(nested(128).as_bytes(), 1000).is_err());
        assert!(!serde(&nested(128)));
    }

    #[test]
    fn strings_are_written_as_serde_writes_them() {
        for text in [
            "",
            "plain é",
            "q\"\\\n\u{1f}\u{7f}",
            "\u{1F600}",
            "\u{8}\u{c}\r\t\u{0}/",
        ] {
            let mut out = Vec::new();
            write_string(&mut out, text);
            assert_eq!(out.len(), quoted_len(text.as_bytes()), "{text:?}");
            assert_eq!(out, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
        // Bytes that are not UTF-8: counted as the U+FFFD they are written as.
        for bytes in [&b"caf\xe9"[..], b"\xff\xfe\xfd", b"a\xe2\x82", b"\"\xff\n"] {
            let lossy = String::from_utf8_lossy(bytes);
            let mut out = Vec::new();
            write_string(&mut out, &lossy);
            assert_eq!(out.len(), quoted_len(bytes), "{bytes:?}");
        }
    }

    #[test]
    fn top_level_members_are_indexed() {
        let doc = br#" {"a" : 1 , "b":{"c":[2,{}]},"a":"x", "e":[] } "#;
        let members = validate_indexed(doc, 8).unwrap().unwrap();
        let text = |r: &Range<usize>| std::str::from_utf8(&doc[r.clone()]).unwrap();
        let pairs: Vec<(&str, &str)> = members
            .iter()
            .map(|m| (text(&m.key), text(&m.value)))
            .collect();
        assert_eq!(
            pairs,
            [
                ("\"a\"", "1"),
                ("\"b\"", "{\"c\":[2,{}]}"),
                ("\"a\"", "\"x\""),
                ("\"e\"", "[]")
            ]
        );
        assert_eq!(validate_indexed(b" {} ", 8), Ok(Some(vec![])));
        assert_eq!(validate_indexed(b"[{\"a\":1}]", 8), Ok(None));
        assert!(validate_indexed(b"{\"a\":}", 8).is_err());
    }

    #[test]
    fn errors_say_where() {
        assert_eq!(
            validate(b"{\"a\":1,\n  \"b\" 2}", 8).unwrap_err(),
            "expected `:` at line 2 column 7"
        );
        assert_eq!(
            validate(b"[[1]]", 1).unwrap_err(),
            "nested deeper than 1 levels at line 1 column 2"
        );
    }

    #[test]
    fn special_bytes_are_found_at_any_offset() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut b = vec![b'a'; len];
                    b[at] = special;
                    if at > 0 {
                        b[at - 1] = 0xff;
                    }
                    assert_eq!(special_offset(&b), at, "{b:?}");
                }
            }
            assert_eq!(special_offset(&vec![0xe9; len]), len);
        }
    }

    fn json_ish() -> impl Strategy<Value = String> {
        let atom = prop::sample::select(vec![
            "0",
            "-1",
            "1.5e3",
            "1e999",
            "true",
            "null",
            "\"a\"",
            "\"\\ud83d\\ude00\"",
            "\"\\ud83d\"",
            "\"é\\n\"",
            "[",
            "]",
            "{",
            "}",
            ",",
            ":",
            " ",
            "\"k\":",
            "01",
            "-",
            "\"",
            "\\",
            "\u{1}",
            "x",
        ]);
        prop::collection::vec(atom, 0..24).prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn same_verdict_as_serde_json(doc in json_ish()) {
            prop_assert_eq!(validate(doc.as_bytes(), 128).is_ok(), serde_verdict(doc.as_bytes()));
        }

        #[test]
        fn same_verdict_on_values_serde_json_writes(v in any::<Vec<(String, f64, Option<i64>)>>()) {
            let doc = serde_json::to_vec(&v).unwrap();
            prop_assert!(validate(&doc, 128).is_ok());
        }
    }
}
