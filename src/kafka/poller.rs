//! The thread that serves a producer's delivery reports (and its errors, logs and statistics).
//!
//! rust-rdkafka's `ThreadedProducer` polls in 100 ms windows and rounds what is left of a window
//! down to whole milliseconds, so it spins through the last millisecond of every window: about
//! 1 % of a core per producer, idle or busy. This thread sleeps until librdkafka writes to a
//! socket to say the queue is no longer empty, then takes everything in it.

use std::io::{Read as _, Write as _};
use std::ops::Deref;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer as _};

use super::delivery::Context;
use super::ffi::MainQueue;

/// How long the thread sleeps at most when no wake-up comes: a safety net, not a poll interval.
const NAP: Duration = Duration::from_millis(200);

/// A producer with its report thread. Clones share both; the thread stops with the last clone.
#[derive(Clone)]
pub struct Polled {
    // Held for its `Drop`. Declared first so it drops first: the thread and the queue handle go
    // before the client.
    _reports: Arc<Poller>,
    producer: Arc<BaseProducer<Context>>,
}

struct Poller {
    queue: Arc<MainQueue>,
    stop: Arc<AtomicBool>,
    /// The socket librdkafka writes its wake-ups to; `Drop` writes one too.
    waker: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Polled {
    /// Starts the report thread of `producer`, named `name`.
    pub fn new(producer: BaseProducer<Context>, name: &str) -> std::io::Result<Polled> {
        Polled::with_nap(producer, name, NAP)
    }

    fn with_nap(
        producer: BaseProducer<Context>,
        name: &str,
        nap: Duration,
    ) -> std::io::Result<Polled> {
        let producer = Arc::new(producer);
        let queue = Arc::new(
            MainQueue::of(&producer)
                .ok_or_else(|| std::io::Error::other("librdkafka gave no main queue"))?,
        );
        let (wakes, waker) = UnixStream::pair()?;
        waker.set_nonblocking(true)?;
        wakes.set_read_timeout(Some(nap))?;
        // Enabled before the thread starts, so no wake-up can fall between its first look at
        // the queue and its first sleep.
        queue.wake_on(Some(waker.as_fd()));
        let stop = Arc::new(AtomicBool::new(false));
        let spawned = std::thread::Builder::new()
            .name(format!("reports-{name}"))
            .spawn({
                let (producer, queue, stop) = (producer.clone(), queue.clone(), stop.clone());
                move || serve(&producer, &queue, wakes, &stop)
            });
        let thread = spawned.inspect_err(|_| queue.wake_on(None))?;
        let poller = Poller {
            queue,
            stop,
            waker,
            thread: Some(thread),
        };
        Ok(Polled {
            _reports: Arc::new(poller),
            producer,
        })
    }
}

impl Deref for Polled {
    type Target = BaseProducer<Context>;

    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

/// Serves events until `stop`: everything queued, then sleep until librdkafka writes.
fn serve(
    producer: &BaseProducer<Context>,
    queue: &MainQueue,
    mut wakes: UnixStream,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 64];
    loop {
        // A zero-timeout poll serves one event: the reports of one batch, at most.
        while !queue.is_empty() {
            producer.poll(Duration::ZERO);
            producer.context().unnumbered.end_batch();
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        // Returns at the next wake-up (or one already written while serving), or after NAP.
        let _ = wakes.read(&mut buf);
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // librdkafka must stop writing to the socket before it closes.
        self.queue.wake_on(None);
        self.stop.store(true, Ordering::Release);
        let _ = (&self.waker).write(b"s");
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Mutex, mpsc};

    use rdkafka::ClientConfig;
    use rdkafka::config::FromClientConfigAndContext;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::BaseRecord;

    use super::*;
    use crate::kafka::admission::Admission;
    use crate::kafka::delivery::{Outcome, Waiter, Waiting};

    /// A producer with kafboy's context on `bootstrap`, for tests of this crate.
    pub(crate) fn producer(bootstrap: &str) -> BaseProducer<Context> {
        let [client_errors, log_lines, failures] = Context::throttles("test");
        let context = Context {
            name: "test".into(),
            admission: Arc::new(Admission::new(100, 1 << 20)),
            tally: Arc::default(),
            error_seen: Arc::default(),
            fenced: Arc::default(),
            topics: Arc::new(crate::metrics::Topics::new([])),
            brokers: Arc::new(Mutex::new(Vec::new())),
            client_errors,
            log_lines,
            failures,
            retired: AtomicBool::new(false),
            broker_totals: Mutex::default(),
            exported: Arc::default(),
            refusals: Arc::default(),
            gate: Arc::default(),
            rescue: Arc::default(),
            credentials: Arc::default(),
            unnumbered: Default::default(),
        };
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap);
        BaseProducer::from_config_and_context(&config, context).unwrap()
    }

    /// With a nap of an hour, reports can only arrive through librdkafka's wake-ups, and the
    /// thread can only stop through the one `Drop` writes.
    #[test]
    fn reports_arrive_and_the_thread_stops_on_wake_ups_alone() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let polled = Polled::with_nap(
            producer(&cluster.bootstrap_servers()),
            "t",
            Duration::from_secs(3600),
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        for n in 0..3 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let waiter = Waiter(Some(Box::new(Waiting {
                tx,
                report: crate::kafka::Report::Caller,
                first: None,
            })));
            let record =
                BaseRecord::<[u8], [u8], Waiter>::with_opaque_to("t", waiter).payload(&b"x"[..]);
            polled.send(record).map_err(|(e, _)| e).unwrap();
            let outcome = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(30), rx).await })
                .expect("a report within 30 s")
                .unwrap();
            assert!(
                matches!(outcome, Outcome::Delivered { offset, .. } if offset == n),
                "{outcome:?}"
            );
        }
        let (done, stopped) = mpsc::channel();
        std::thread::spawn(move || {
            drop(polled);
            let _ = done.send(());
        });
        stopped
            .recv_timeout(Duration::from_secs(30))
            .expect("report thread stopped");
    }
}
