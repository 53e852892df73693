//! The shutdown signal: SIGTERM or SIGINT, as one future; and the work a shutdown waits for
//! besides open requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Work that outlives its request (a hook's produce after its own reply): the shutdown waits
/// for it before the final flush, which would otherwise miss what it is about to queue.
#[derive(Debug, Default)]
pub struct Tracker {
    running: AtomicUsize,
    done: Notify,
}

/// One piece of tracked work; dropping it marks it done.
#[derive(Debug)]
pub struct Running(Arc<Tracker>);

impl Tracker {
    /// Marks work as started.
    pub fn start(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(self.clone())
    }

    /// Waits until no work is running or `deadline` passes; false if some still is.
    pub async fn wait(&self, deadline: Instant) -> bool {
        loop {
            // Made before the check, so a finish between the check and the wait is not missed.
            let done = self.done.notified();
            if self.running.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return self.running.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

/// Listens for SIGTERM and SIGINT (Ctrl-C) from this call on, and resolves on the first. The
/// listeners are in place before the future is first polled: a stop sent while kafboy is still
/// starting (replaying a large spool, say) is not lost, as it would be by PID 1 in a container,
/// and does not kill the process without its drain elsewhere. Call it inside the runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let first = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let int = first(signal(SignalKind::interrupt()).ok());
        let term = first(signal(SignalKind::terminate()).ok());
        async move {
            tokio::select! {
                () = int => tracing::info!("SIGINT received"),
                () = term => tracing::info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("SIGINT received");
        } else {
            std::future::pending::<()>().await;
        }
    }
}

/// SIGHUPs, one `next()` per signal; never resolves where there are none.
pub struct Hangups(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

/// Listens for SIGHUP (reload keys and certificates).
pub fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        Hangups(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok())
    }
    #[cfg(not(unix))]
    {
        Hangups()
    }
}

impl Hangups {
    /// The next SIGHUP.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.0 {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_tracker_waits_for_its_work_or_its_deadline() {
        let tracker = Arc::new(Tracker::default());
        let soon = || Instant::now() + Duration::from_millis(50);
        assert!(tracker.wait(soon()).await, "nothing running");
        let running = tracker.start();
        assert!(!tracker.wait(soon()).await, "still running at the deadline");
        let waiter = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.wait(Instant::now() + Duration::from_secs(30)).await }
        });
        drop(running);
        assert!(waiter.await.unwrap());
    }
}
