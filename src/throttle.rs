//! Log lines that a flood of requests or records would repeat thousands of times a second: at
//! most one per interval, carrying the count of those left out. The log writes to stdout from
//! the async workers, so an unthrottled line per refused request would slow the server most
//! when it is already overloaded.
//!
//! Lines left out are told on the next line that passes, or, if none comes within the
//! interval (and a second's grace), on a line of their own ("lines left out", from a thread
//! that looks every second): a burst followed by silence is not hidden until the next,
//! unrelated, event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, Weak};
use std::time::Duration;

/// Logs `message` with its fields at `warn` or `error` at most once a second from this call
/// site, with `suppressed`, the count of the lines left out before it: a [`Throttle`] of the
/// call site's own. `throttled!(warn, "accept failed", %error)`.
macro_rules! throttled {
    (warn, $message:literal $(, $($field:tt)+)?) => {
        $crate::throttle::throttled!(@ Warn, warn, $message $(, $($field)+)?)
    };
    (error, $message:literal $(, $($field:tt)+)?) => {
        $crate::throttle::throttled!(@ Error, error, $message $(, $($field)+)?)
    };
    (@ $level:ident, $log:ident, $message:literal $(, $($field:tt)+)?) => {{
        static THROTTLE: std::sync::LazyLock<$crate::throttle::Throttle> =
            std::sync::LazyLock::new(|| {
                $crate::throttle::Throttle::new(
                    std::time::Duration::from_secs(1),
                    $crate::throttle::Level::$level,
                    $message,
                    None,
                )
            });
        if let Some(suppressed) = THROTTLE.pass() {
            tracing::$log!($($($field)+,)? suppressed, $message);
        }
    }};
}
pub(crate) use throttled;

/// The level of a throttled kind of line, for the line that tells what it left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// `warn`.
    Warn,
    /// `error`.
    Error,
}

/// One kind of log line, written at most once per `every`.
#[derive(Debug)]
pub struct Throttle(Arc<State>);

#[derive(Debug)]
struct State {
    every_ms: u64,
    /// When the last line was written, in ms since start (0: never); a report of lines left
    /// out does not move it.
    last_ms: AtomicU64,
    /// Lines left out since then.
    suppressed: AtomicU64,
    /// The lines' message, and the producer they are about, if any.
    what: &'static str,
    producer: Option<String>,
    level: Level,
}

/// How often [`report_left_out`] runs.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Every throttle alive, for [`report_left_out`].
fn registry() -> &'static Mutex<Vec<Weak<State>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<State>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

impl Throttle {
    /// At most one `what` line per `every`; `producer` names the producer the lines are about.
    pub fn new(every: Duration, level: Level, what: &'static str, producer: Option<&str>) -> Self {
        let state = Arc::new(State {
            every_ms: every.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            what,
            producer: producer.map(str::to_string),
            level,
        });
        let mut all = registry().lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|s| s.strong_count() > 0);
        all.push(Arc::downgrade(&state));
        start_reporter();
        Throttle(state)
    }

    /// `Some(lines left out since the last one)` when this line may be written, else `None`
    /// (and it is counted as left out).
    pub fn pass(&self) -> Option<u64> {
        let s = &self.0;
        let now = crate::metrics::uptime_ms().max(1);
        let last = s.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= s.every_ms;
        // Of the threads that find it due at once, one writes.
        if due
            && s.last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(s.suppressed.swap(0, Ordering::Relaxed));
        }
        s.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Drop for Throttle {
    /// A producer replaced or shut down tells what it left out last.
    fn drop(&mut self) {
        self.0.tell(self.0.suppressed.swap(0, Ordering::Relaxed));
    }
}

impl State {
    /// The lines left out, taken, when there are some and the interval since the last line
    /// has passed at `now` (ms since start) by a report's period. The period's grace lets a
    /// line of their kind that comes on time (failures that come in bursts a second apart, as
    /// librdkafka expires records) tell them with its details. A report is not a line: the
    /// next event, past the interval since the last line, is written with its details.
    fn due(&self, now: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.every_ms + REPORT_EVERY.as_millis() as u64
            // Not if a line passed since `last` was read: what it left out is its own.
            || self
                .last_ms
                .compare_exchange(last, last, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        // Taken once: `pass` and this both swap, so each line left out is told once.
        Some(self.suppressed.swap(0, Ordering::Relaxed)).filter(|&n| n > 0)
    }

    fn tell(&self, left_out: u64) {
        if left_out == 0 {
            return;
        }
        let (what, producer) = (self.what, self.producer.as_deref());
        match self.level {
            Level::Warn => tracing::warn!(what, producer, left_out, "lines left out"),
            Level::Error => tracing::error!(what, producer, left_out, "lines left out"),
        }
    }
}

/// Starts, once per process, the thread that runs [`report_left_out`] every [`REPORT_EVERY`]:
/// a thread of its own, so that a log output that blocks holds up nothing else.
fn start_reporter() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("kafboy-log-throttle".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(REPORT_EVERY);
                    report_left_out();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no log throttle thread: lines left out are told on the next line only");
        }
    });
}

/// Tells, for every throttle whose interval has passed since its last line, how many lines it
/// left out since.
fn report_left_out() {
    let now = crate::metrics::uptime_ms().max(1);
    for state in alive() {
        if let Some(left_out) = state.due(now) {
            state.tell(left_out);
        }
    }
}

/// Tells what every throttle has left out, due or not: at the end of a shutdown, so that the
/// last second's lines are not lost with the process.
pub fn tell_all() {
    for state in alive() {
        state.tell(state.suppressed.swap(0, Ordering::Relaxed));
    }
}

fn alive() -> Vec<Arc<State>> {
    let mut all = registry().lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|s| s.strong_count() > 0);
    all.iter().filter_map(Weak::upgrade).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = Throttle::new(Duration::from_secs(3600), Level::Warn, "test", None);
        assert_eq!(t.pass(), Some(0));
        assert_eq!(t.pass(), None);
        assert_eq!(t.pass(), None);
        // Due again (as if no line had been written yet): the two left out are told.
        t.0.last_ms.store(0, Ordering::Relaxed);
        assert_eq!(t.pass(), Some(2));
        assert_eq!(t.pass(), None);
    }

    #[test]
    fn lines_left_out_are_told_once_the_interval_has_passed_without_another_line() {
        let t = Throttle::new(Duration::from_secs(1), Level::Warn, "test", None);
        assert_eq!(t.pass(), Some(0));
        assert_eq!(t.pass(), None);
        assert_eq!(t.pass(), None);
        let last = t.0.last_ms.load(Ordering::Relaxed);
        // Within the interval and a report's period: not yet, they may still go on the next
        // line of their kind.
        assert_eq!(t.0.due(last + 1999), None);
        // Past it: taken once.
        assert_eq!(t.0.due(last + 2000), Some(2));
        assert_eq!(t.0.due(last + 5000), None);
        // A report is not a line: the interval still counts from the last line, so the next
        // event past it is written with its details.
        assert_eq!(t.0.last_ms.load(Ordering::Relaxed), last);
    }
}
