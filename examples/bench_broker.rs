//! Benchmark broker: librdkafka's mock cluster in a process of its own, so that kafboy, the HTTP
//! ceiling and the direct producer of one `bench/run` all write to the same broker.
//!
//! ```text
//! bench_broker [--brokers N] [--replication R] --topic NAME:PARTITIONS [--topic ...]
//! bench_broker --external HOST:PORT --topic NAME:PARTITIONS [--topic ...]
//! ```
//!
//! With `--external`, no mock cluster: the watermarks are read from that broker (a real one,
//! such as tansu for a confirmation run), whose topics must exist already.
//!
//! Prints `bootstrap=HOST:PORT,...` on stdout once the topics exist, then reads commands on stdin,
//! one per line, and answers each with one line:
//!
//! - `wm TOPIC`: `wm TOPIC SUM PARTITIONS`, the sum of the partitions' high watermarks (records
//!   that reached the broker), from a consumer's `fetch_watermarks` per partition.
//! - `count TOPIC`: `count TOPIC RECORDS NEXT`, the records read back from the start of every
//!   partition until none has come for 3 s, and the sum over partitions of the offset after
//!   the last one read: what the high watermarks should say (tansu's can lag it).
//! - `quit`: exits.
//!
//! It exits when stdin closes or on SIGTERM/SIGINT (their default action).

use std::io::{BufRead, Write};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;

struct Args {
    brokers: i32,
    replication: i32,
    topics: Vec<(String, i32)>,
    external: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        brokers: 3,
        replication: 1,
        topics: Vec::new(),
        external: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--brokers" => args.brokers = value()?.parse().map_err(|e| format!("{e}"))?,
            "--replication" => args.replication = value()?.parse().map_err(|e| format!("{e}"))?,
            "--external" => args.external = Some(value()?),
            "--topic" => {
                let v = value()?;
                let (name, parts) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--topic {v}: want NAME:PARTITIONS"))?;
                let parts = parts.parse().map_err(|e| format!("--topic {v}: {e}"))?;
                args.topics.push((name.to_string(), parts));
            }
            "-h" | "--help" => {
                return Err(
                    "usage: bench_broker [--brokers N] [--replication R] [--external HOST:PORT] \
                     --topic NAME:PARTITIONS ..."
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_broker: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let cluster = match &args.external {
        Some(_) => None,
        None => Some(MockCluster::new(args.brokers).map_err(|e| format!("mock cluster: {e}"))?),
    };
    let mut partitions_of = std::collections::HashMap::new();
    for (topic, partitions) in &args.topics {
        if let Some(cluster) = &cluster {
            cluster
                .create_topic(topic, *partitions, args.replication)
                .map_err(|e| format!("topic {topic}: {e}"))?;
        }
        partitions_of.insert(topic.clone(), *partitions);
    }
    // Without a cluster there is an external broker.
    let bootstrap = match &cluster {
        Some(cluster) => cluster.bootstrap_servers(),
        None => args.external.clone().unwrap_or_default(),
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "bench-watermarks")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    // Wait until every topic answers, so the first `wm` is not a metadata wait.
    for (topic, _) in &args.topics {
        let mut tries = 0;
        while let Err(e) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(2)) {
            tries += 1;
            if tries > 10 {
                return Err(format!("topic {topic} never answered: {e}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let stdout = std::io::stdout();
    let say = |line: String| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say(format!("bootstrap={bootstrap}"));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("wm"), Some(topic)) => {
                let Some(&partitions) = partitions_of.get(topic) else {
                    say(format!("err unknown topic {topic}"));
                    continue;
                };
                let mut sum = 0i64;
                let mut failed = None;
                for p in 0..partitions {
                    match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                        Ok((_, high)) => sum += high,
                        Err(e) => {
                            failed = Some(format!("err {topic}[{p}]: {e}"));
                            break;
                        }
                    }
                }
                say(failed.unwrap_or_else(|| format!("wm {topic} {sum} {partitions}")));
            }
            (Some("count"), Some(topic)) => match partitions_of.get(topic) {
                Some(&partitions) => {
                    say(count(&bootstrap, topic, partitions).unwrap_or_else(|e| format!("err {e}")))
                }
                None => say(format!("err unknown topic {topic}")),
            },
            (Some("quit"), _) => break,
            (None, _) => {}
            _ => say(format!("err unknown command {line:?}")),
        }
    }
    drop(consumer);
    drop(cluster);
    Ok(())
}

/// Reads `topic` back from the start with a consumer of its own: `count TOPIC RECORDS NEXT`.
fn count(bootstrap: &str, topic: &str, partitions: i32) -> Result<String, String> {
    use rdkafka::Offset;
    use rdkafka::message::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-count")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| format!("assign: {e}"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assign: {e}"))?;
    let mut records = 0u64;
    let mut next = vec![0i64; partitions.max(0) as usize];
    // Done 3 s after the last record; the first may take longer (connections, offsets).
    let mut last = std::time::Instant::now();
    let mut quiet = Duration::from_secs(15);
    while last.elapsed() < quiet {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                records += 1;
                if let Some(slot) = next.get_mut(m.partition() as usize) {
                    *slot = (*slot).max(m.offset() + 1);
                }
                last = std::time::Instant::now();
                quiet = Duration::from_secs(3);
            }
            Some(Err(e)) => return Err(format!("consume {topic}: {e}")),
            None => {}
        }
    }
    Ok(format!(
        "count {topic} {records} {}",
        next.iter().sum::<i64>()
    ))
}
