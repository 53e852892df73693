//! Calling a hook: under its time budget, with its panics kept from the connection.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Once};
use std::task::Poll;
use std::time::{Duration, Instant};

use super::{Failure, Hook, HookError, HookRequest, Verdict};
use crate::throttle::throttled;

/// Why a hook gave no verdict.
pub(crate) enum NoVerdict {
    /// Its error, or its panic.
    Failed(HookError),
    /// No answer within the time budget, counted from the call.
    Late,
}

/// The hook's answer within `timeout`, counted from the call. A hook that answers on its first
/// poll (a Lua hook always does) arms no timer, but an answer that came after the budget,
/// however it came (a hook that blocked its thread), is late all the same, unless the hook
/// bounds its own time ([`Hook::bounds_itself`]). A panic is the hook's failure, not the
/// connection's: the client gets its `500`.
pub(crate) async fn decide(
    timeout: Duration,
    hook: &dyn Hook,
    request: Arc<HookRequest>,
) -> Result<Verdict, NoVerdict> {
    let start = Instant::now();
    let mut call = guarded(|| hook.on_request(request)).map_err(NoVerdict::Failed)?;
    let answer = {
        let mut poll = |cx: &mut std::task::Context<'_>| {
            guarded(|| call.as_mut().poll(cx)).unwrap_or_else(|panic| Poll::Ready(Err(panic)))
        };
        match std::future::poll_fn(|cx| Poll::Ready(poll(cx))).await {
            Poll::Ready(answer) => Some(answer),
            Poll::Pending => {
                let left = timeout.saturating_sub(start.elapsed());
                tokio::time::timeout(left, std::future::poll_fn(poll))
                    .await
                    .ok()
            }
        }
    };
    // Judged as it came, not after the drop below.
    let late = start.elapsed() > timeout && !hook.bounds_itself();
    // Its drop is the hook's code too.
    guarded(|| drop(call)).map_err(NoVerdict::Failed)?;
    match answer {
        Some(Ok(_)) if late => Err(NoVerdict::Late),
        Some(Ok(verdict)) => Ok(verdict),
        Some(Err(error)) => Err(NoVerdict::Failed(error)),
        None => Err(NoVerdict::Late),
    }
}

/// Calls `hook`'s error hook; a panic there is logged (a line a second: an error hook that fails
/// on every failure fails for every bad request), and the request's answer stands.
pub(crate) fn report(hook: &dyn Hook, failure: &Failure<'_>) {
    if let Err(e) = guarded(|| hook.on_error(failure)) {
        throttled!(error, "error hook failed", error = %e);
    }
}

thread_local! {
    /// Set while this thread runs a hook's code.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    /// Where the hook's latest panic happened.
    static PANICKED_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, a call into the hook, turning a panic into the hook's error.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, HookError> {
    quiet_hook_panics();
    let outer = IN_HOOK.replace(true);
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    IN_HOOK.set(outer);
    result.map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = PANICKED_AT.take().unwrap_or_default();
        HookError(format!("the hook panicked at {at}: {what}"))
    })
}

/// A hook that panics on every request would print a panic message (and with
/// `RUST_BACKTRACE`, take a backtrace) for each, past the one-a-second line that reports hook
/// failures. Panics in a hook's code are noted for that line instead; the others go to the
/// panic hook that was in place.
fn quiet_hook_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Built to abort, a panic ends the process: it must say why.
            if IN_HOOK.get() && !cfg!(panic = "abort") {
                let at = info.location().map(ToString::to_string);
                PANICKED_AT.set(at);
            } else {
                previous(info);
            }
        }));
    });
}
