//! Captures: opened by `(`, closed by `)`, matched again by `%1`..`%9`, and read back once
//! a match is found.

use super::{Capture, Fault, Length, MAX_CAPTURES, Matcher, Value, malformed};

impl<F: FnMut() -> bool> Matcher<'_, F> {
    /// The captures of the last match `s..e`: the whole match when the pattern has none and
    /// `whole` is asked for (`match`, `gmatch`, `gsub`; `find` returns positions instead).
    pub(in crate::hook::lua) fn captures(
        &self,
        s: usize,
        e: usize,
        whole: bool,
    ) -> Result<Vec<Value>, Fault> {
        if self.level == 0 && whole {
            return Ok(vec![Value::Text(s, e)]);
        }
        (0..self.level).map(|i| self.capture(i, s, e)).collect()
    }

    /// Capture `i` (0-based) of the match `s..e`, as `%1`..`%9` of a replacement name them.
    pub(in crate::hook::lua) fn capture(
        &self,
        i: usize,
        s: usize,
        e: usize,
    ) -> Result<Value, Fault> {
        if i >= self.level {
            if i != 0 {
                return malformed(format!("invalid capture index %{}", i + 1));
            }
            return Ok(Value::Text(s, e));
        }
        let capture = self.captures[i];
        match capture.length {
            Length::Open => malformed("unfinished capture"),
            Length::Position => Ok(Value::Position(capture.init + 1)),
            Length::Closed(n) => Ok(Value::Text(capture.init, capture.init + n)),
        }
    }

    pub(super) fn start_capture(
        &mut self,
        s: usize,
        p: usize,
        length: Length,
    ) -> Result<Option<usize>, Fault> {
        if self.level >= MAX_CAPTURES {
            return malformed("too many captures");
        }
        self.captures[self.level] = Capture { init: s, length };
        self.level += 1;
        let end = self.matches(s, p)?;
        if end.is_none() {
            self.level -= 1;
        }
        Ok(end)
    }

    pub(super) fn end_capture(&mut self, s: usize, p: usize) -> Result<Option<usize>, Fault> {
        let Some(l) = (0..self.level)
            .rev()
            .find(|&l| matches!(self.captures[l].length, Length::Open))
        else {
            return malformed("invalid pattern capture");
        };
        self.captures[l].length = Length::Closed(s - self.captures[l].init);
        let end = self.matches(s, p)?;
        if end.is_none() {
            self.captures[l].length = Length::Open;
        }
        Ok(end)
    }

    /// `%1`..`%9` in a pattern: the same text as that capture again.
    pub(super) fn match_capture(&mut self, s: usize, digit: u8) -> Result<Option<usize>, Fault> {
        let l = usize::from(digit).wrapping_sub(usize::from(b'1'));
        let invalid = || malformed(format!("invalid capture index %{}", l.wrapping_add(1)));
        if l >= self.level {
            return invalid();
        }
        let capture = self.captures[l];
        let n = match capture.length {
            Length::Open => return invalid(),
            // A position is no text: C compares its length as a huge size, which never fits.
            Length::Position => return Ok(None),
            Length::Closed(n) => n,
        };
        self.tick(n / 32)?;
        let text = &self.src[capture.init..capture.init + n];
        Ok(self.src[s..].starts_with(text).then_some(s + n))
    }
}
