//! Lua 5.4's pattern matcher (`lstrlib.c`), ported so that a match runs under the hook's budget.
//! Lua's own matcher runs in C, where the VM's instruction count never reaches, and patterns
//! backtrack: `^%s*(.-)%s*$`, the usual trim, takes time quadratic in a run of spaces inside
//! the subject (two minutes for 200 KB), and one request could hold a worker thread as long.
//! This one counts its steps and asks the budget every [`CHECK_EVERY`] of them. Semantics,
//! limits (32 captures, 200 nested calls) and error messages are Lua's; a differential test
//! holds them to the C matcher.

mod capture;
mod class;

/// Captures a pattern may have (`LUA_MAXCAPTURES`).
const MAX_CAPTURES: usize = 32;
/// Nested calls of the matcher (`MAXCCALLS`): "pattern too complex" past it.
const MAX_CALLS: usize = 200;
/// Steps between two looks at the budget.
const CHECK_EVERY: u32 = 1024;
const ESC: u8 = b'%';
/// Bytes that make a pattern more than a plain string.
const SPECIALS: &[u8] = b"^$*+?.([%-";

/// Why a match stopped: a malformed pattern (Lua's message), or the budget.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fault {
    Pattern(String),
    Budget,
}

fn malformed<T>(message: impl Into<String>) -> Result<T, Fault> {
    Err(Fault::Pattern(message.into()))
}

/// One capture's value: a piece of the subject, or a position (`()`, 1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Value {
    Text(usize, usize),
    Position(usize),
}

#[derive(Debug, Clone, Copy)]
enum Length {
    Open,
    Position,
    Closed(usize),
}

#[derive(Debug, Clone, Copy)]
struct Capture {
    init: usize,
    length: Length,
}

/// Whether `pattern` has none of the bytes that make it a pattern.
pub(super) fn plain(pattern: &[u8]) -> bool {
    !pattern.iter().any(|b| SPECIALS.contains(b))
}

/// A subject and a pattern, matched at positions of the caller's choosing. `spent` is asked
/// every [`CHECK_EVERY`] steps whether the budget is gone.
pub(super) struct Matcher<'a, F> {
    src: &'a [u8],
    pat: &'a [u8],
    level: usize,
    depth: usize,
    captures: [Capture; MAX_CAPTURES],
    steps: u32,
    spent: F,
}

impl<'a, F: FnMut() -> bool> Matcher<'a, F> {
    pub(super) fn new(src: &'a [u8], pat: &'a [u8], spent: F) -> Self {
        let unused = Capture {
            init: 0,
            length: Length::Open,
        };
        Matcher {
            src,
            pat,
            level: 0,
            depth: MAX_CALLS,
            captures: [unused; MAX_CAPTURES],
            steps: 0,
            spent,
        }
    }

    /// Where a match of the whole pattern starting at subject offset `s` ends, if it does.
    pub(super) fn at(&mut self, s: usize) -> Result<Option<usize>, Fault> {
        self.level = 0;
        self.depth = MAX_CALLS;
        self.matches(s, 0)
    }

    /// The first match that starts at or after `from` (only at `from` when `anchored`) and
    /// does not end at `last`, as its start and end. (A match ending where the one before
    /// ended is the empty match just after it, which `gmatch` and `gsub` pass over.)
    pub(super) fn search(
        &mut self,
        from: usize,
        anchored: bool,
        last: Option<usize>,
    ) -> Result<Option<(usize, usize)>, Fault> {
        for s in from..=self.src.len() {
            if let Some(e) = self.at(s)?.filter(|&e| Some(e) != last) {
                return Ok(Some((s, e)));
            }
            if anchored {
                break;
            }
        }
        Ok(None)
    }

    /// Counts `n` steps, and looks at the budget when enough have passed. A step is about a
    /// byte compared: a single-character class costs as many as the set it names is long.
    pub(in crate::hook::lua) fn tick(&mut self, n: usize) -> Result<(), Fault> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.steps = self.steps.saturating_add(n);
        if self.steps >= CHECK_EVERY {
            self.steps = 0;
            if (self.spent)() {
                return Err(Fault::Budget);
            }
        }
        Ok(())
    }

    /// The pattern byte at `p`; C reads the terminating NUL past the end.
    fn pc(&self, p: usize) -> u8 {
        self.pat.get(p).copied().unwrap_or(0)
    }

    fn matches(&mut self, s: usize, p: usize) -> Result<Option<usize>, Fault> {
        if self.depth == 0 {
            return malformed("pattern too complex");
        }
        self.depth -= 1;
        let end = self.match_from(s, p);
        self.depth += 1;
        end
    }

    /// `match` of `lstrlib.c`: its tail calls are the loop.
    fn match_from(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, Fault> {
        loop {
            self.tick(1)?;
            let Some(&c) = self.pat.get(p) else {
                return Ok(Some(s));
            };
            match c {
                b'(' if self.pc(p + 1) == b')' => {
                    return self.start_capture(s, p + 2, Length::Position);
                }
                b'(' => return self.start_capture(s, p + 1, Length::Open),
                b')' => return self.end_capture(s, p + 1),
                b'$' if p + 1 == self.pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                ESC if self.pc(p + 1) == b'b' => match self.balance(s, p + 2)? {
                    Some(e) => (s, p) = (e, p + 4),
                    None => return Ok(None),
                },
                ESC if self.pc(p + 1) == b'f' => {
                    p += 2;
                    if self.pc(p) != b'[' {
                        return malformed("missing '[' after '%f' in pattern");
                    }
                    let ep = self.class_end(p)?;
                    self.tick(ep - p)?;
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    let current = self.src.get(s).copied().unwrap_or(0);
                    if self.bracket(previous, p, ep - 1) || !self.bracket(current, p, ep - 1) {
                        return Ok(None);
                    }
                    p = ep;
                }
                ESC if self.pc(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.pc(p + 1))? {
                        Some(e) => (s, p) = (e, p + 2),
                        None => return Ok(None),
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    self.tick(ep - p)?;
                    let suffix = self.pc(ep);
                    if !self.single(s, p, ep) {
                        if matches!(suffix, b'*' | b'?' | b'-') {
                            p = ep + 1;
                            continue;
                        }
                        return Ok(None);
                    }
                    match suffix {
                        b'?' => match self.matches(s + 1, ep + 1)? {
                            Some(e) => return Ok(Some(e)),
                            None => p = ep + 1,
                        },
                        b'+' => return self.max_expand(s + 1, p, ep),
                        b'*' => return self.max_expand(s, p, ep),
                        b'-' => return self.min_expand(s, p, ep),
                        _ => (s, p) = (s + 1, ep),
                    }
                }
            }
        }
    }

    /// `%bxy` from `s`, with `x` and `y` at `p`.
    fn balance(&mut self, s: usize, p: usize) -> Result<Option<usize>, Fault> {
        if p + 1 >= self.pat.len() {
            return malformed("malformed pattern (missing arguments to '%b')");
        }
        let (open, close) = (self.pat[p], self.pat[p + 1]);
        if self.src.get(s) != Some(&open) {
            return Ok(None);
        }
        let mut depth = 1;
        for e in s + 1..self.src.len() {
            self.tick(1)?;
            if self.src[e] == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(e + 1));
                }
            } else if self.src[e] == open {
                depth += 1;
            }
        }
        Ok(None)
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Result<Option<usize>, Fault> {
        let mut i = 0;
        while self.single(s + i, p, ep) {
            self.tick(ep - p)?;
            i += 1;
        }
        loop {
            if let Some(e) = self.matches(s + i, ep + 1)? {
                return Ok(Some(e));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Result<Option<usize>, Fault> {
        loop {
            if let Some(e) = self.matches(s, ep + 1)? {
                return Ok(Some(e));
            }
            self.tick(ep - p)?;
            if !self.single(s, p, ep) {
                return Ok(None);
            }
            s += 1;
        }
    }
}
