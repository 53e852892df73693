//! The strict JSON check every JSON record passes: one pass over the bytes with an explicit
//! stack, nothing built. It accepts exactly what `serde_json::Value` accepts (RFC 8259; no lone
//! surrogate escapes; no number beyond `f64`), nested at most a given depth.
//!
//! serde_json itself was the check before: through a visitor it parsed every string and number
//! into values nobody used, a third of the instructions of an `/async` request with a 1 KiB
//! body. This check does the same job in a fifth of that; the fuzz target `decode` holds it to
//! serde_json's verdict on every input.

use std::ops::Range;

/// Deepest nesting this checker tracks; serde_json's own limit is 128.
const MAX_TRACKED_DEPTH: usize = 128;

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
    };
    checker.document(max_depth).map_err(|(at, what)| {
        let what = match what {
            Fault::TooDeep => format!("nested deeper than {max_depth} levels"),
            Fault::Syntax(what) => what.to_string(),
        };
        describe(bytes, at, &what)
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
}

impl<const INDEX: bool> Checker<'_, INDEX> {
    /// The document: values and the containers around them, iteratively. `objects[d]` tells
    /// whether the container at depth `d` is an object.
    fn document(&mut self, max_depth: usize) -> Result<(), Refusal> {
        let mut objects = [false; MAX_TRACKED_DEPTH];
        let mut depth = 0usize;
        let mut value_start = 0;
        loop {
            // A value is expected here.
            self.skip_whitespace();
            if INDEX && depth == 1 {
                value_start = self.i;
            }
            let opened = match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    if depth >= max_depth {
                        return Err((self.i, Fault::TooDeep));
                    }
                    self.i += 1;
                    let object = open == b'{';
                    objects[depth] = object;
                    depth += 1;
                    self.skip_whitespace();
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                        depth -= 1;
                        false
                    } else {
                        if object {
                            self.key(depth)?;
                        }
                        true
                    }
                }
                Some(b'"') => {
                    self.i += 1;
                    self.string()?;
                    false
                }
                Some(b'-' | b'0'..=b'9') => {
                    self.number()?;
                    false
                }
                Some(b't') => self.literal(b"true").map(|_| false)?,
                Some(b'f') => self.literal(b"false").map(|_| false)?,
                Some(b'n') => self.literal(b"null").map(|_| false)?,
                Some(_) => return fail(self.i, "expected value"),
                None => return fail(self.i, "EOF while parsing a value"),
            };
            if opened {
                continue;
            }
            // A value is complete: close containers until one goes on, or the document ends.
            loop {
                if INDEX
                    && depth == 1
                    && objects[0]
                    && let Some(last) = self.members.last_mut()
                {
                    last.value = value_start..self.i;
                }
                self.skip_whitespace();
                if depth == 0 {
                    return match self.peek() {
                        None => Ok(()),
                        Some(_) => fail(self.i, "trailing characters"),
                    };
                }
                let object = objects[depth - 1];
                match (self.peek(), object) {
                    (Some(b','), _) => {
                        self.i += 1;
                        if object {
                            self.key(depth)?;
                        }
                        break;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.i += 1;
                        depth -= 1;
                    }
                    (Some(_), true) => return fail(self.i, "expected `,` or `}`"),
                    (Some(_), false) => return fail(self.i, "expected `,` or `]`"),
                    (None, true) => return fail(self.i, "EOF while parsing an object"),
                    (None, false) => return fail(self.i, "EOF while parsing a list"),
                }
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
    fn key(&mut self, depth: usize) -> Result<(), Refusal> {
        self.skip_whitespace();
        let start = self.i;
        match self.peek() {
            Some(b'"') => self.i += 1,
            Some(_) => return fail(self.i, "key must be a string"),
            None => return fail(self.i, "EOF while parsing an object"),
        }
        self.string()?;
        if INDEX && depth == 1 {
            self.members.push(Member {
                key: start..self.i,
                value: 0..0,
            });
        }
        self.skip_whitespace();
        match self.peek() {
            Some(b':') => {
                self.i += 1;
                Ok(())
            }
            Some(_) => fail(self.i, "expected `:`"),
            None => fail(self.i, "EOF while parsing an object"),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), Refusal> {
        let end = self.i + word.len();
        if self.b.get(self.i..end) == Some(word) {
            self.i = end;
            Ok(())
        } else {
            fail(self.i, "expected ident")
        }
    }

    /// The rest of a string after its opening quote.
    #[inline(always)]
    fn string(&mut self) -> Result<(), Refusal> {
        loop {
            self.i += special_offset(&self.b[self.i..]);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    self.escape()?;
                }
                Some(_) => {
                    return fail(
                        self.i,
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    );
                }
                None => return fail(self.i, "EOF while parsing a string"),
            }
        }
    }

    /// One escape after its backslash. A UTF-16 surrogate must come as a pair.
    fn escape(&mut self) -> Result<(), Refusal> {
        match self.peek() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.i += 1;
                Ok(())
            }
            Some(b'u') => {
                self.i += 1;
                match self.hex4()? {
                    0xDC00..=0xDFFF => fail(self.i, "lone leading surrogate in hex escape"),
                    0xD800..=0xDBFF => {
                        if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                            return fail(self.i, "unexpected end of hex escape");
                        }
                        self.i += 2;
                        match self.hex4()? {
                            0xDC00..=0xDFFF => Ok(()),
                            _ => fail(self.i, "lone leading surrogate in hex escape"),
                        }
                    }
                    _ => Ok(()),
                }
            }
            Some(_) => fail(self.i, "invalid escape"),
            None => fail(self.i, "EOF while parsing a string"),
        }
    }

    fn hex4(&mut self) -> Result<u16, Refusal> {
        let mut n = 0u16;
        for _ in 0..4 {
            let digit = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                Some(_) => return fail(self.i, "invalid escape"),
                None => return fail(self.i, "EOF while parsing a string"),
            };
            n = n << 4 | u16::from(digit);
            self.i += 1;
        }
        Ok(n)
    }

    /// `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`, and finite as an `f64`.
    fn number(&mut self) -> Result<(), Refusal> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let integer = self.i;
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return fail(self.i, "invalid number"),
        }
        let integer = &self.b[integer..self.i];
        let mut fraction: &[u8] = &[];
        if self.peek() == Some(b'.') {
            self.i += 1;
            let from = self.i;
            self.digits();
            if self.i == from {
                return fail(self.i, "invalid number");
            }
            fraction = &self.b[from..self.i];
        }
        let mut exponent = 0i64;
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            let negative = self.peek() == Some(b'-');
            if let Some(b'-' | b'+') = self.peek() {
                self.i += 1;
            }
            let from = self.i;
            self.digits();
            if self.i == from {
                return fail(self.i, "invalid number");
            }
            exponent = self.b[from..self.i].iter().fold(0i64, |e, d| {
                (e * 10 + i64::from(d - b'0')).min(1_000_000_000)
            });
            if negative {
                exponent = -exponent;
            }
        }
        if magnitude(integer, fraction, exponent) <= 300 {
            return Ok(());
        }
        // Near or past f64's range (1.8e308): serde_json's own parse decides, as for Value.
        match serde_json::from_slice::<f64>(&self.b[start..self.i]) {
            Ok(_) => Ok(()),
            Err(_) => fail(start, "number out of range"),
        }
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }
}

/// The decimal exponent of a number's leading digit, roughly: 3 for `1234`, -2 for `0.00123`
/// (plus the written exponent). Zero is `i64::MIN`: it is never out of range.
fn magnitude(integer: &[u8], fraction: &[u8], exponent: i64) -> i64 {
    let leading = if integer != b"0" {
        integer.len() as i64
    } else {
        match fraction.iter().position(|&d| d != b'0') {
            Some(zeros) => -(zeros as i64),
            None => return i64::MIN,
        }
    };
    leading.saturating_add(exponent)
}

/// Offset of the first `"`, `\` or control character in `b` (or `b.len()`), eight bytes at a
/// time: string bytes are most of a JSON body.
#[inline(always)]
pub(crate) fn special_offset(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut chunks = b.chunks_exact(8);
    for (n, chunk) in chunks.by_ref().enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // Per byte, the high bit marks a zero after the XOR (a quote or a backslash) or a value
        // below 0x20. Borrows only run upward from a marked byte, so the lowest mark is exact.
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let marks = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        let marks = marks & HIGHS;
        if marks != 0 {
            return n * 8 + (marks.trailing_zeros() / 8) as usize;
        }
    }
    let rest = chunks.remainder();
    let offset = b.len() - rest.len();
    offset
        + rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .unwrap_or(rest.len())
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
