//! The shutdown signal: SIGTERM or SIGINT, as one future; and the work a shutdown waits for
//! besides open requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Work that outlives its request (a hook's wait for the acks of what it produced after its
/// own reply, to report a failure): the shutdown waits for it alongside the final flush,
/// which is what sends a record still waiting for its batch.
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

/// Listens for SIGTERM and SIGINT (Ctrl-C) and resolves on the first. Called inside a runtime,
/// it listens from this call on: a stop sent while kafboy is still starting (replaying a large
/// spool, say) is not lost, as it would be by PID 1 in a container, and does not kill the
/// process without its drain elsewhere. Outside one (or on a platform without Unix signals),
/// from the future's first poll.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let now = tokio::runtime::Handle::try_current().is_ok().then(listen);
    async move {
        let stopped = match now {
            Some(stopped) => stopped,
            None => listen(),
        };
        stopped.await;
    }
}

/// The listeners, registered now (with a runtime), and the wait on them.
#[cfg(unix)]
fn listen() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let first = |s: Option<Signal>| async move {
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
fn listen() -> impl Future<Output = ()> + Send + 'static {
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("SIGINT received");
        } else {
            std::future::pending::<()>().await;
        }
    }
}

/// SIGTERM or SIGINT, listened for from [`Stopped::listen`] on, as a flag that more than one
/// wait can share (the start, then the server).
#[derive(Clone)]
pub struct Stopped(tokio::sync::watch::Receiver<bool>);

impl Stopped {
    /// Starts listening; call it inside a runtime.
    pub fn listen() -> Stopped {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let signal = signal();
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(true);
        });
        Stopped(rx)
    }

    /// Resolves once a stop was asked for (at once if it already was).
    pub async fn wait(mut self) {
        // The sender only goes away after it said so.
        let _ = self.0.wait_for(|stopped| *stopped).await;
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

    #[test]
    fn a_stop_can_be_asked_for_outside_a_runtime() {
        // Made before any runtime exists (a library user's `block_on(app.run(.., signal()))`):
        // it listens from its first poll instead of panicking.
        let stop = signal();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let waited =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(20), stop).await });
        assert!(waited.is_err(), "no signal was sent");
    }
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
