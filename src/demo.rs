//! `kafboy demo`: the original quick start, with nothing else installed. An embedded Kafka
//! broker (librdkafka's mock cluster) with topic `ekaf`, kafboy on 127.0.0.1:9903 with the demo
//! hook (`hooks/demo.lua`, built in), and a consumer that prints every record that lands.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};

use crate::hook::Hook;
use crate::hook::lua::{Limits, LuaHook};
use crate::{App, Config};

/// The demo hook's source, as shipped in `hooks/demo.lua`.
pub const DEMO_LUA: &str = include_str!("../hooks/demo.lua");

/// Where the demo listens unless told otherwise (the original's port).
pub const DEMO_ADDR: &str = "127.0.0.1:9903";

/// Topics the embedded broker starts with.
const TOPICS: &[&str] = &["ekaf", "events"];

/// Runs the demo until `shutdown`: embedded broker, kafboy on `listen` with `hook` (the Lua demo
/// hook when `None`), and a printout of each delivered record.
pub async fn run(
    listen: SocketAddr,
    hook: Option<Arc<dyn Hook>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let cluster = MockCluster::new(1).map_err(|e| format!("embedded broker: {e}"))?;
    for topic in TOPICS {
        cluster
            .create_topic(topic, 1, 1)
            .map_err(|e| format!("topic {topic}: {e}"))?;
    }
    let brokers = cluster.bootstrap_servers();
    let mut config = Config::default();
    config.server.listen = listen;
    config.kafka.brokers = vec![brokers.clone()];
    // The original demo flushed its batches every 10 ms.
    config.batch.flush_timeout = Duration::from_millis(10);
    let hook = match hook {
        Some(hook) => hook,
        None => {
            let limits = Limits::of(&config);
            Arc::new(LuaHook::from_source(
                Path::new("hooks/demo.lua"),
                DEMO_LUA,
                limits,
            )?)
        }
    };
    let app = App::builder(config).hook(hook).build()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    // The port bound, when asked for port 0.
    let listen = listener.local_addr().unwrap_or(listen);
    let stop = Arc::new(AtomicBool::new(false));
    let printer = spawn_printer(brokers.clone(), stop.clone());
    // Not `println!`, which panics once stdout is a closed pipe (`kafboy demo | head -3`).
    let _ = writeln!(
        std::io::stdout(),
        "kafboy demo: embedded broker at {brokers}, topics {}\n\
         kafboy demo: listening on http://{listen}; try\n  \
         curl {listen}/batch/async/ekaf -XPOST -d 'test=a'\n  \
         curl {listen}/batch/async/ekaf -XPOST -d 'hello=a'\n  \
         curl {listen}/batch/async/ekaf -XPOST",
        TOPICS.join(", ")
    );
    let report = app.run(listener, shutdown).await;
    stop.store(true, Ordering::Relaxed);
    let _ = printer.join();
    drop(cluster);
    match (report.undelivered, report.failed) {
        (0, 0) => Ok(()),
        (undelivered, failed) => Err(format!(
            "{undelivered} records undelivered, {failed} failed during the shutdown"
        )),
    }
}

/// A thread that reads every demo topic from the beginning and prints each record.
fn spawn_printer(brokers: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let consumer: BaseConsumer = match ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "kafboy-demo")
            .set("enable.partition.eof", "false")
            .set("log_level", "3")
            .create()
        {
            Ok(c) => c,
            Err(e) => return drop(writeln!(std::io::stderr(), "kafboy demo: no printer: {e}")),
        };
        // Assigned, not subscribed: no group rebalance to wait for before the first record shows.
        let mut assignment = TopicPartitionList::new();
        for topic in TOPICS {
            let _ = assignment.add_partition_offset(topic, 0, Offset::Beginning);
        }
        if let Err(e) = consumer.assign(&assignment) {
            return drop(writeln!(std::io::stderr(), "kafboy demo: no printer: {e}"));
        }
        while !stop.load(Ordering::Relaxed) {
            let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let show = |b: Option<&[u8]>| {
                b.map_or("-".into(), |b| String::from_utf8_lossy(b).into_owned())
            };
            let _ = writeln!(
                std::io::stdout(),
                "delivered topic={} partition={} offset={} key={} value={}",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                show(msg.key()),
                show(msg.payload())
            );
        }
    })
}
