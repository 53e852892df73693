//! Benchmark Kafka ceiling: rdkafka straight from a loop, no HTTP, with the producer settings
//! kafboy builds from the same configuration file (`kafboy::kafka::client_config`, plus the
//! linger/batch and queue settings kafboy adds per producer).
//!
//! ```text
//! bench_producer --config FILE --brokers B --topic T --payloads FILE
//!                [--producer sync|async|batch] [--seconds S | --count N] [--sync] [--whole]
//! ```
//!
//! - Throughput (default): sends records as fast as librdkafka's bounded queue takes them (a full
//!   queue is waited out), for `--seconds` or `--count`, then flushes; records/s is what was
//!   delivered over the time from the first send to the end of the flush.
//! - `--sync`: one record at a time, each waiting for its delivery report before the next: the
//!   latency floor of kafboy's `/sync` (p50/p99/p99.9 of send → report).
//! - `--payloads FILE`: one record per non-empty line, sent in turn (the records of an NDJSON
//!   body); with `--whole` the whole file is one record.
//! - `--chunk N`: yield the CPU after every N records (as kafboy does between requests, so
//!   librdkafka's threads run on the same core); `--window W`: before each chunk, wait while W
//!   records or more are queued or in flight (a bound on the queue below librdkafka's own).
//! - `--producer`: `sync` (kafboy's `/sync` producer: `linger.ms` = `kafka.sync_linger`),
//!   `async` (the `/async` producer: `kafka.linger`) or `batch` (the batch modes' producer:
//!   `linger.ms` = `batch.flush_timeout`, `batch.num.messages` = `batch.batch_size`).
//!
//! Prints one JSON object on stdout.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use kafboy::config::Overrides;
use rdkafka::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

struct Args {
    config: Option<PathBuf>,
    brokers: Option<String>,
    topic: String,
    payloads: PathBuf,
    whole: bool,
    /// `sync`, `async` or `batch`.
    producer: String,
    seconds: Option<f64>,
    count: Option<u64>,
    sync: bool,
    window: Option<i32>,
    chunk: u64,
}

/// Counts delivery reports; in sync mode also hands each one to the waiting sender.
struct Counting {
    delivered: AtomicU64,
    failed: AtomicU64,
    reports: Mutex<Option<mpsc::Sender<bool>>>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let ok = match result {
            Ok(m) => m.offset() >= 0,
            Err(_) => false,
        };
        if ok {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(tx) = self
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(ok);
        }
    }
}

fn usage() -> String {
    "usage: bench_producer [--config FILE] [--brokers B] --topic T --payloads FILE [--whole] \
     [--producer sync|async|batch] [--seconds S | --count N] [--sync]"
        .into()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        brokers: None,
        topic: String::new(),
        payloads: PathBuf::new(),
        whole: false,
        producer: "sync".into(),
        seconds: None,
        count: None,
        sync: false,
        window: None,
        chunk: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => args.config = Some(value()?.into()),
            "--brokers" => args.brokers = Some(value()?),
            "--topic" => args.topic = value()?,
            "--payloads" => args.payloads = value()?.into(),
            "--whole" => args.whole = true,
            "--producer" => {
                args.producer = match value()?.as_str() {
                    p @ ("sync" | "async" | "batch") => p.to_string(),
                    other => return Err(format!("--producer {other}: sync, async or batch")),
                }
            }
            "--seconds" => args.seconds = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            "--count" => args.count = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            "--sync" => args.sync = true,
            "--window" => args.window = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            "--chunk" => args.chunk = value()?.parse().map_err(|e| format!("{e}"))?,
            _ => return Err(usage()),
        }
    }
    if args.topic.is_empty() || args.payloads.as_os_str().is_empty() {
        return Err(usage());
    }
    if args.seconds.is_none() && args.count.is_none() {
        args.seconds = Some(5.0);
    }
    Ok(args)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_producer: {e}");
        std::process::exit(2);
    }
}

fn millis(d: Duration) -> String {
    format!("{}", d.as_secs_f64() * 1000.0)
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let overrides = Overrides {
        listen: None,
        brokers: args.brokers.as_deref().map(kafboy::config::split_list),
    };
    let config = kafboy::Config::load(args.config.as_deref(), &overrides)
        .map_err(|e| format!("config: {e}"))?;
    let kafka = &config.kafka;
    let mut client = kafboy::kafka::client_config(kafka)?;
    // As kafboy's Producers::build and batch_config.
    match args.producer.as_str() {
        "batch" => {
            client
                .set("linger.ms", millis(config.batch.flush_timeout))
                .set("batch.num.messages", config.batch.batch_size.to_string());
        }
        "async" => {
            client.set("linger.ms", millis(kafka.linger));
        }
        _ => {
            client.set("linger.ms", millis(kafka.sync_linger));
        }
    }
    // As kafboy's Producer::build: librdkafka's limits a little above kafboy's own accounting.
    kafboy::kafka::set_queue_limits(&mut client, kafka);
    client.set("log_level", "3");

    let text =
        std::fs::read(&args.payloads).map_err(|e| format!("{}: {e}", args.payloads.display()))?;
    let payloads: Vec<Vec<u8>> = if args.whole {
        vec![text]
    } else {
        text.split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(<[u8]>::to_vec)
            .collect()
    };
    if payloads.is_empty() {
        return Err("no payloads".into());
    }

    let (tx, rx) = mpsc::channel();
    let context = Counting {
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        reports: Mutex::new(args.sync.then_some(tx)),
    };
    let producer = ThreadedProducer::from_config_and_context(&client, context)
        .map_err(|e| format!("producer: {e}"))?;
    // Metadata first, as kafboy has it before its first request.
    producer
        .client()
        .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
        .map_err(|e| format!("metadata: {e}"))?;

    let limit = args.count.unwrap_or(u64::MAX);
    let until = args.seconds.map(Duration::from_secs_f64);
    let cpu_before = cpu_ticks();
    let start = Instant::now();
    let done = |sent: u64| sent >= limit || until.is_some_and(|u| start.elapsed() >= u);

    if args.sync {
        let mut latencies: Vec<f64> = Vec::new();
        let mut sent = 0u64;
        while !done(sent) {
            let payload = &payloads[(sent % payloads.len() as u64) as usize];
            let t = Instant::now();
            send_waiting(&producer, &args.topic, payload)?;
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(true) => {}
                Ok(false) => return Err("a record failed".into()),
                Err(e) => return Err(format!("no delivery report: {e}")),
            }
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            sent += 1;
        }
        let seconds = start.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            let i = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
            latencies[i.clamp(1, latencies.len()) - 1]
        };
        let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
        println!(
            "{{\"mode\":\"sync\",\"count\":{sent},\"seconds\":{seconds:.3},\
             \"p50_ms\":{:.4},\"p90_ms\":{:.4},\"p99_ms\":{:.4},\"p999_ms\":{:.4},\
             \"max_ms\":{:.4},\"mean_ms\":{mean:.4},\"cpu_ticks\":{}}}",
            pct(50.0),
            pct(90.0),
            pct(99.0),
            pct(99.9),
            pct(100.0),
            cpu_ticks().saturating_sub(cpu_before),
        );
        return Ok(());
    }

    let mut sent = 0u64;
    let mut full_waits = 0u64;
    let mut bytes = 0u64;
    let mut window_waits = 0u64;
    while !(sent & 255 == 0 && done(sent)) && sent < limit {
        if args.chunk > 0 && sent.is_multiple_of(args.chunk) {
            if let Some(window) = args.window {
                while producer.in_flight_count() >= window {
                    window_waits += 1;
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
            // One core may run this loop and librdkafka's threads: let them in between chunks,
            // as kafboy's event loop does between requests.
            std::thread::yield_now();
        }
        let payload = &payloads[(sent % payloads.len() as u64) as usize];
        loop {
            match producer.send(BaseRecord::<[u8], [u8]>::to(&args.topic).payload(&payload[..])) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    full_waits += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err((e, _)) => return Err(format!("send: {e}")),
            }
        }
        bytes += payload.len() as u64;
        sent += 1;
    }
    let send_seconds = start.elapsed().as_secs_f64();
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| format!("flush: {e}"))?;
    let seconds = start.elapsed().as_secs_f64();
    let context = producer.context();
    let delivered = context.delivered.load(Ordering::Relaxed);
    let failed = context.failed.load(Ordering::Relaxed);
    println!(
        "{{\"mode\":\"throughput\",\"sent\":{sent},\"bytes\":{bytes},\"delivered\":{delivered},\
         \"failed\":{failed},\"seconds\":{seconds:.3},\"send_seconds\":{send_seconds:.3},\
         \"records_per_s\":{:.1},\"queue_full_waits\":{full_waits},\"window_waits\":{window_waits},\"cpu_ticks\":{}}}",
        delivered as f64 / seconds,
        cpu_ticks().saturating_sub(cpu_before),
    );
    Ok(())
}

/// Sends one record, waiting out a full queue.
fn send_waiting(
    producer: &ThreadedProducer<Counting>,
    topic: &str,
    payload: &[u8],
) -> Result<(), String> {
    loop {
        match producer.send(BaseRecord::<[u8], [u8]>::to(topic).payload(payload)) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err((e, _)) => return Err(format!("send: {e}")),
        }
    }
}

/// utime + stime of this process, in clock ticks (from /proc/self/stat).
fn cpu_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; after the name, field N is at N - 3.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tick(11) + tick(12)
}
