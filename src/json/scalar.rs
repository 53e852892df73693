//! The scalars of a JSON document: strings (with their escapes), numbers (with serde_json's
//! range), literals; and the eight-bytes-at-a-time scan that string contents go through.

use super::{Checker, Refusal, fail};

impl<const INDEX: bool> Checker<'_, INDEX> {
    pub(super) fn literal(&mut self, word: &'static [u8]) -> Result<(), Refusal> {
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
    pub(super) fn string(&mut self) -> Result<(), Refusal> {
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
    pub(super) fn number(&mut self) -> Result<(), Refusal> {
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
    let mut rest = b;
    while let Some((word, tail)) = rest.split_first_chunk::<8>() {
        let w = u64::from_le_bytes(*word);
        // Per byte, the high bit marks a zero after the XOR (a quote or a backslash) or a value
        // below 0x20. Borrows only run upward from a marked byte, so the lowest mark is exact.
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let marks = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        let marks = marks & HIGHS;
        if marks != 0 {
            return b.len() - rest.len() + (marks.trailing_zeros() / 8) as usize;
        }
        rest = tail;
    }
    b.len() - rest.len()
        + rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .unwrap_or(rest.len())
}
