//! Single-character classes of a pattern: `.`, `%a` and the other letters, `[sets]`, a byte
//! standing for itself.

use super::{ESC, Fault, Matcher, malformed};

impl<F: FnMut() -> bool> Matcher<'_, F> {
    /// Where the single-character class at `p` ends (its suffix, if any, is there).
    pub(super) fn class_end(&self, p: usize) -> Result<usize, Fault> {
        let mut p = p + 1;
        match self.pat[p - 1] {
            ESC if p >= self.pat.len() => malformed("malformed pattern (ends with '%')"),
            ESC => Ok(p + 1),
            b'[' => {
                if self.pc(p) == b'^' {
                    p += 1;
                }
                // The first byte is part of the set even when it is `]`.
                loop {
                    if p >= self.pat.len() {
                        return malformed("malformed pattern (missing ']')");
                    }
                    let c = self.pat[p];
                    p += 1;
                    if c == ESC && p < self.pat.len() {
                        p += 1;
                    }
                    if self.pc(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    pub(super) fn single(&self, s: usize, p: usize, ep: usize) -> bool {
        let Some(&c) = self.src.get(s) else {
            return false;
        };
        match self.pat[p] {
            b'.' => true,
            ESC => class(c, self.pat[p + 1]),
            b'[' => self.bracket(c, p, ep - 1),
            other => other == c,
        }
    }

    /// Whether `c` is in the set `[...]` from `p` (its `[`) to `ec` (its `]`).
    pub(super) fn bracket(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut inside = true;
        if self.pat[p + 1] == b'^' {
            inside = false;
            p += 1;
        }
        p += 1;
        while p < ec {
            if self.pat[p] == ESC {
                p += 1;
                if class(c, self.pat[p]) {
                    return inside;
                }
            } else if self.pat[p + 1] == b'-' && p + 2 < ec {
                p += 2;
                if (self.pat[p - 2]..=self.pat[p]).contains(&c) {
                    return inside;
                }
            } else if self.pat[p] == c {
                return inside;
            }
            p += 1;
        }
        !inside
    }
}

/// `%a`, `%d`, ... as C's `<ctype.h>` has them in the "C" locale; an upper-case class is the
/// complement; any other byte stands for itself.
fn class(c: u8, cl: u8) -> bool {
    let found = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => c == b' ' || (b'\t'..=b'\r').contains(&c),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return cl == c,
    };
    found != cl.is_ascii_uppercase()
}
