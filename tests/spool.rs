//! The durable spool (`kafboy::spool`) on its own: appends fsynced by group commit, the sender
//! feeding a real broker (tansu) or librdkafka's mock cluster, recovery after a crash (in process
//! and a real `kill -9` of a child process under load), a full spool, a corrupt segment tail,
//! permanent refusals dead-lettered, and disk errors.
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafboy::Config;
use kafboy::config::Mode;
use kafboy::kafka::{Producers, Record};
use kafboy::spool::{ID_HEADER, Spool, SpoolConfig, SpoolError};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// `broker_down` and `broker_up` apply to every broker with this id.
const ALL_BROKERS: i32 = -1;

/// Producers for `brokers`, from `toml` over the defaults.
fn producers(brokers: &str, toml: &str) -> Arc<Producers> {
    let mut config = Config::from_toml(toml).expect("test config");
    config.kafka.brokers = vec![brokers.to_string()];
    let topics = Arc::new(kafboy::metrics::Topics::new(Vec::<String>::new()));
    Arc::new(Producers::build(&config, &topics).expect("producers"))
}

/// Starts the sender of `spool` on the `async` producer of `producers`.
fn start_sender(spool: &Spool, producers: &Arc<Producers>) {
    let producers = producers.clone();
    let timeout = producers.message_timeout();
    spool.start_sender(move |topic| producers.for_mode(Mode::Async, topic), timeout);
}

/// A spool config with fast checkpoints and small segments, so tests see deletions.
fn config() -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 4096,
        checkpoint_interval: Duration::from_millis(20),
        retry_backoff: Duration::from_millis(50),
        retry_backoff_max: Duration::from_millis(500),
        ..SpoolConfig::default()
    }
}

/// Starts the sender of `spool` on a producer for `cluster`; waits until all is delivered.
async fn send_all(spool: &Spool, cluster: &Cluster) {
    let producers = producers(&cluster.bootstrap_servers(), "");
    start_sender(spool, &producers);
    wait_drained(spool, Duration::from_secs(15)).await;
}

fn record(value: impl Into<Bytes>) -> Record {
    Record {
        key: None,
        partition: None,
        headers: None,
        value: value.into(),
        first: None,
    }
}

/// A one-broker mock cluster with one fresh topic.
fn mock_cluster(prefix: &str) -> (Cluster, String) {
    common::mock_topic(1, prefix, 1)
}

/// Polls `cond` every 20 ms until it holds; fails the test with `what` after `limit`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until everything spooled is acknowledged and the checkpoint says so.
async fn wait_drained(spool: &Spool, limit: Duration) {
    wait_for("the spool to drain", limit, || {
        let s = spool.stats();
        s.records == 0 && s.oldest_undelivered.is_none()
    })
    .await;
}

/// A record read back: value, `kafboy-id`, the other headers, key, partition and offset.
#[derive(Debug, Clone)]
struct Got {
    value: String,
    id: Option<String>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    key: Option<Vec<u8>>,
    offset: i64,
}

/// Reads `topic` from the start until every value in `want` was seen (then 300 ms more, for
/// late duplicates) or `limit` passed. Records in partition, offset order.
async fn read_topic(
    brokers: &str,
    topic: &str,
    want: HashSet<String>,
    limit: Duration,
) -> Vec<Got> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer = common::consumer_from_start(&brokers, &topic);
        let deadline = Instant::now() + limit;
        let mut seen = HashSet::new();
        let mut out: Vec<(i32, Got)> = Vec::new();
        let mut complete_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= deadline || complete_at.is_some_and(|t| now >= t) {
                break;
            }
            if complete_at.is_none() && want.iter().all(|w| seen.contains(w)) {
                complete_at = Some(now + Duration::from_millis(300));
            }
            let Some(msg) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let msg = msg.expect("consume");
            let mut id = None;
            let mut headers = Vec::new();
            if let Some(hs) = msg.headers() {
                for h in hs.iter() {
                    if h.key == ID_HEADER {
                        id = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                    } else {
                        headers.push((h.key.to_string(), h.value.map(<[u8]>::to_vec)));
                    }
                }
            }
            let value = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
            seen.insert(value.clone());
            out.push((
                msg.partition(),
                Got {
                    value,
                    id,
                    headers,
                    key: msg.key().map(<[u8]>::to_vec),
                    offset: msg.offset(),
                },
            ));
        }
        out.sort_by_key(|(p, g)| (*p, g.offset));
        out.into_iter().map(|(_, g)| g).collect()
    })
    .await
    .expect("consumer task")
}

fn values(got: &[Got]) -> Vec<&str> {
    got.iter().map(|g| g.value.as_str()).collect()
}

/// Reads `topic` until every value of `want` arrived, then checks the topic holds exactly
/// `want`, in order.
async fn assert_topic_holds(brokers: &str, topic: &str, want: &[String]) {
    let got = read_topic(
        brokers,
        topic,
        want.iter().cloned().collect(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        values(&got),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

/// Segment files in `dir`, sorted.
fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_records_reach_kafka_with_stable_ids_and_acked_segments_go() {
    let broker = common::broker();
    let topic = broker.topic("spool-roundtrip", 2);
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    let producers = producers(&broker.addr, "[kafka]\nmessage_timeout = \"20s\"");
    start_sender(&spool, &producers);

    let mut want = Vec::new();
    for call in 0..30 {
        let mut records = Vec::new();
        for i in 0..10 {
            let value = format!(r#"{{"call":{call},"i":{i},"pad":"{}"}}"#, "x".repeat(40));
            want.push(value.clone());
            let mut r = record(value);
            if i % 2 == 0 {
                r.key = Some(Bytes::from(format!("k{call}")));
                r.headers = Some(Arc::new(OwnedHeaders::new().insert(Header {
                    key: "source",
                    value: Some("spool-test"),
                })));
            }
            records.push(r);
        }
        spool.append(&topic, &records).await.expect("append");
    }
    wait_drained(&spool, Duration::from_secs(20)).await;
    // The checkpoint names the first record not acknowledged: all 300 are.
    wait_for("checkpoint and deletions", Duration::from_secs(5), || {
        let s = spool.stats();
        s.checkpoint == 300 && s.segments == 1
    })
    .await;
    let stats = spool.stats();
    eprintln!("after delivery: {stats:?}");
    assert_eq!(stats.delivered, 300);
    assert_eq!((stats.dead_lettered, stats.replayed), (0, 0));
    assert!(stats.healthy);
    // Acknowledged segments were deleted; the one being written stays.
    assert_eq!(segments(dir.path()).len(), 1, "{:?}", segments(dir.path()));

    let got = read_topic(
        &broker.addr,
        &topic,
        want.iter().cloned().collect(),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(got.len(), 300, "every record once: {}", got.len());
    let got_values: HashSet<&str> = values(&got).into_iter().collect();
    assert_eq!(got_values.len(), 300);
    let ids: HashSet<&str> = got.iter().filter_map(|g| g.id.as_deref()).collect();
    assert_eq!(ids.len(), 300, "one distinct kafboy-id per record");
    assert!(
        ids.iter()
            .all(|id| id.len() == 33 && id.as_bytes()[16] == b'-')
    );
    for g in &got {
        let keyed = g.key.is_some();
        assert_eq!(
            g.headers,
            if keyed {
                vec![("source".to_string(), Some(b"spool-test".to_vec()))]
            } else {
                vec![]
            },
            "{g:?}"
        );
    }
    // Records were sent in spool order: within a partition, calls come in order.
    let mut last_call: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    for g in got.iter().filter(|g| g.key.is_some()) {
        let v: serde_json::Value = serde_json::from_str(&g.value).expect("json");
        let call = v["call"].as_i64().expect("call") * 100 + v["i"].as_i64().expect("i");
        let key = g.key.clone().unwrap_or_default();
        if let Some(prev) = last_call.insert(key, call) {
            assert!(prev < call, "out of order: {prev} then {call}");
        }
    }
    assert_eq!(spool.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_down_past_the_message_timeout_then_back_delivers_everything() {
    let (cluster, topic) = mock_cluster("spool-down");
    let bootstrap = cluster.bootstrap_servers();
    let message_timeout = Duration::from_millis(1000);
    let producers = producers(
        &bootstrap,
        "[kafka]\nmessage_timeout = \"1s\"\n[kafka.options]\n\"reconnect.backoff.max.ms\" = \"200\"",
    );
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    start_sender(&spool, &producers);
    spool
        .append(&topic, &[record("warm-up")])
        .await
        .expect("append");
    wait_drained(&spool, Duration::from_secs(10)).await;

    cluster.broker_down(ALL_BROKERS).expect("brokers down");
    let down_at = Instant::now();
    let mut want = vec!["warm-up".to_string()];
    for call in 0..20 {
        let records: Vec<Record> = (0..5)
            .map(|i| {
                let v = format!("down-{call}-{i}");
                want.push(v.clone());
                record(v)
            })
            .collect();
        spool
            .append(&topic, &records)
            .await
            .expect("append while down");
    }
    // librdkafka gives up on the records after the message timeout; the spool keeps them.
    wait_for(
        "a retry after the message timeout",
        Duration::from_secs(10),
        || spool.stats().retried >= 100,
    )
    .await;
    let outage = down_at.elapsed();
    assert!(outage >= message_timeout, "retried after {outage:?}");
    let during = spool.stats();
    eprintln!("brokers down for {outage:?}: {during:?}");
    assert_eq!(during.records, 100);
    assert!(
        during
            .oldest_undelivered
            .is_some_and(|d| d >= message_timeout)
    );

    cluster.broker_up(ALL_BROKERS).expect("brokers up");
    let back = Instant::now();
    wait_drained(&spool, Duration::from_secs(20)).await;
    eprintln!("drained {:?} after brokers returned", back.elapsed());
    let got = read_topic(
        &bootstrap,
        &topic,
        want.iter().cloned().collect(),
        Duration::from_secs(10),
    )
    .await;
    let got_values: HashSet<&str> = values(&got).into_iter().collect();
    for w in &want {
        assert!(got_values.contains(w.as_str()), "{w} lost");
    }
    let stats = spool.stats();
    eprintln!(
        "consumed {} records for {} appended ({} duplicates): {stats:?}",
        got.len(),
        want.len(),
        got.len() - got_values.len()
    );
    assert_eq!(stats.dead_lettered, 0);
    // Each record counts once, delivered; the attempts that timed out during the outage are
    // retries, not failures.
    assert_eq!(producers.tally(), (want.len() as u64, 0));
    assert_eq!(spool.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_acknowledgement_replays_everything_and_a_clean_stop_nothing() {
    let (cluster, topic) = mock_cluster("spool-replay");
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    let want: Vec<String> = (0..100).map(|i| format!("crash-{i}")).collect();
    for chunk in want.chunks(7) {
        let records: Vec<Record> = chunk.iter().map(|v| record(v.clone())).collect();
        spool.append(&topic, &records).await.expect("append");
    }
    assert_eq!(spool.stats().records, 100);
    // No sender ran: nothing is acknowledged. Gone without a shutdown.
    spool.crash();

    let spool = Spool::open(dir.path(), &config()).expect("reopen");
    let stats = spool.stats();
    assert_eq!((stats.replayed, stats.records), (100, 100), "{stats:?}");
    assert!(stats.oldest_undelivered.is_some());
    let producers = producers(&cluster.bootstrap_servers(), "");
    start_sender(&spool, &producers);
    wait_drained(&spool, Duration::from_secs(15)).await;
    assert_topic_holds(&cluster.bootstrap_servers(), &topic, &want).await;
    // Replays were accepted by the run before: this one counts them as replayed only.
    assert_eq!(spool.stats().delivered, 100);
    assert_eq!(producers.tally(), (0, 0));
    // A clean stop writes the checkpoint: the next open has nothing to replay.
    assert_eq!(spool.shutdown(Duration::from_secs(5)).await, 0);
    drop(spool);
    let spool = Spool::open(dir.path(), &config()).expect("reopen after a clean stop");
    let stats = spool.stats();
    assert_eq!((stats.replayed, stats.records), (0, 0), "{stats:?}");
    assert_eq!(segments(dir.path()).len(), 1, "only the new segment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_all_or_nothing_and_takes_records_again_once_drained() {
    let dir = tempfile::tempdir().expect("dir");
    let limits = SpoolConfig {
        max_bytes: 16 << 10,
        ..config()
    };
    let spool = Spool::open(dir.path(), &limits).expect("open");
    let value = "v".repeat(1000);
    let mut accepted = 0;
    let refused = loop {
        match spool.append("t", &[record(value.clone())]).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 100, "the spool never filled");
    };
    assert_eq!(refused, SpoolError::Full);
    let full = spool.stats();
    eprintln!("full after {accepted} records: {full:?}");
    assert!(full.bytes <= 16 << 10, "{full:?}");
    assert_eq!(full.records, accepted);
    assert_eq!(full.refused_full, 1);
    // Two small records that would not fit together are refused together.
    let small = vec![record("a"), record("b".repeat(900))];
    assert_eq!(spool.append("t", &small).await, Err(SpoolError::Full));
    assert_eq!(
        spool.stats().records,
        accepted,
        "nothing of a refused call is kept"
    );
    assert_eq!(spool.stats().bytes, full.bytes);
    // Larger than the whole spool: not "full", too large.
    let huge = record("h".repeat(20 << 10));
    assert!(matches!(
        spool.append("t", &[huge]).await,
        Err(SpoolError::TooLarge(_))
    ));

    // A sender drains it; deleted segments give the room back.
    let (cluster, topic) = mock_cluster("spool-full");
    drop(spool);
    // Records are spooled per topic; refill a spool for the mock topic.
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &limits).expect("open");
    let mut n = 0;
    while spool.append(&topic, &[record(value.clone())]).await.is_ok() {
        n += 1;
    }
    send_all(&spool, &cluster).await;
    wait_for("room given back", Duration::from_secs(5), || {
        spool.stats().bytes < 8 << 10
    })
    .await;
    // The current segment goes once a checkpoint passes it, so room may come back in steps.
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..n {
        loop {
            match spool.append(&topic, &[record(value.clone())]).await {
                Ok(_) => break,
                Err(SpoolError::Full) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("room again: {e:?}"),
            }
        }
    }
    wait_drained(&spool, Duration::from_secs(15)).await;
    assert_eq!(spool.stats().delivered, 2 * n);
    spool.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_one_large_append_filled_is_closed_and_deleted_once_delivered() {
    let (cluster, topic) = mock_cluster("spool-one-group");
    let dir = tempfile::tempdir().expect("dir");
    let limits = SpoolConfig {
        max_bytes: 16 << 10,
        ..config()
    };
    let spool = Spool::open(dir.path(), &limits).expect("open");
    // One call, written whole into the current segment: three times `segment_bytes`.
    let records: Vec<Record> = (0..12).map(|i| record(format!("{i:0>1000}"))).collect();
    spool.append(&topic, &records).await.expect("append");
    assert!(spool.stats().bytes > 12_000, "{:?}", spool.stats());
    send_all(&spool, &cluster).await;
    // No append comes to close the segment (a full spool would refuse them): it is closed
    // while the writer idles, read to its end and deleted.
    wait_for("room given back", Duration::from_secs(10), || {
        spool.stats().bytes < 4 << 10
    })
    .await;
    let want: Vec<String> = (0..12).map(|i| format!("{i:0>1000}")).collect();
    assert_topic_holds(&cluster.bootstrap_servers(), &topic, &want).await;
    spool.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_tail_is_cut_at_the_last_valid_record() {
    let (cluster, topic) = mock_cluster("spool-corrupt");
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    for i in 0..10 {
        spool
            .append(&topic, &[record(format!("rec-{i}"))])
            .await
            .expect("append");
    }
    spool.crash();
    let files = segments(dir.path());
    let last = dir.path().join(files.last().expect("a segment"));
    let mut bytes = std::fs::read(&last).expect("read segment");
    let whole = bytes.len();
    // Each frame is the same size here; the last record starts one frame before the end.
    let frame = whole / 10;
    assert_eq!(frame * 10, whole);
    // A flipped byte inside the last record, and a torn frame after it.
    bytes[whole - 3] ^= 0x5a;
    bytes.extend_from_slice(&[7, 0, 0, 0, 1, 2]);
    std::fs::write(&last, &bytes).expect("corrupt segment");

    let spool = Spool::open(dir.path(), &config()).expect("reopen");
    let stats = spool.stats();
    assert_eq!(stats.replayed, 9, "{stats:?}");
    assert_eq!(
        std::fs::metadata(&last).expect("segment").len() as usize,
        whole - frame,
        "cut at the last valid record"
    );
    // The spool keeps going: new records are taken and everything valid is delivered.
    spool
        .append(&topic, &[record("after-recovery")])
        .await
        .expect("append after recovery");
    let producers = producers(&cluster.bootstrap_servers(), "");
    start_sender(&spool, &producers);
    wait_drained(&spool, Duration::from_secs(15)).await;
    let mut want: Vec<String> = (0..9).map(|i| format!("rec-{i}")).collect();
    want.push("after-recovery".into());
    assert_topic_holds(&cluster.bootstrap_servers(), &topic, &want).await;
    spool.shutdown(Duration::from_secs(5)).await;
}

/// A cluster with a topic, producers that refuse a record over 10000 bytes themselves, and a
/// spool in a new directory, its sender not started.
fn refusing_large_records(
    prefix: &str,
) -> (Cluster, String, Arc<Producers>, tempfile::TempDir, Spool) {
    let (cluster, topic) = mock_cluster(prefix);
    let producers = producers(
        &cluster.bootstrap_servers(),
        "[kafka]\nmessage_max_bytes = 10000\nmessage_timeout = \"10s\"",
    );
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    (cluster, topic, producers, dir, spool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_kafka_refuses_for_good_are_dead_lettered_not_retried() {
    // librdkafka refuses a record over message.max.bytes itself; the broker refuses the other.
    let (cluster, topic, producers, dir, spool) = refusing_large_records("spool-dead");
    let bootstrap = cluster.bootstrap_servers();
    // A line a crash cut short: the next one starts on a line of its own.
    let dead_letters = dir.path().join(kafboy::spool::DEAD_LETTER_FILE);
    std::fs::write(&dead_letters, "{\"torn by a crash").expect("torn line");
    start_sender(&spool, &producers);
    let big = "B".repeat(20_000);
    spool
        .append(
            &topic,
            &[record("before"), record(big.clone()), record("after")],
        )
        .await
        .expect("append");
    wait_drained(&spool, Duration::from_secs(10)).await;
    assert_eq!(spool.stats().dead_lettered, 1);

    // The broker refuses the next produce request: not authorized. (librdkafka then fails
    // that topic's records at once for a while; other topics go on.)
    let denied = format!("{topic}-denied");
    cluster.create_topic(&denied, 1, 1).expect("create topic");
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    spool
        .append(&denied, &[record("refused-by-broker")])
        .await
        .expect("append");
    wait_drained(&spool, Duration::from_secs(10)).await;
    spool
        .append(&topic, &[record("last")])
        .await
        .expect("append");
    wait_drained(&spool, Duration::from_secs(10)).await;
    let stats = spool.stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(stats.delivered, 3);

    let text = std::fs::read_to_string(&dead_letters).expect("dead-letter file");
    let text = text
        .strip_prefix("{\"torn by a crash\n")
        .unwrap_or_else(|| panic!("the torn line is not a line of its own: {text}"));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["error"], "MessageSizeTooLarge", "{text}");
    assert_eq!(lines[0]["status"], 413);
    assert_eq!(lines[0]["value"], big.as_str());
    assert_eq!(lines[0]["topic"], topic.as_str());
    assert_eq!(lines[0]["attempts"], 1);
    assert_eq!(lines[1]["error"], "TopicAuthorizationFailed", "{text}");
    assert_eq!(lines[1]["status"], 403);
    assert_eq!(lines[1]["value"], "refused-by-broker");
    assert_eq!(lines[1]["topic"], denied.as_str());
    assert_eq!(lines[1]["attempts"], 1);
    let got = read_topic(
        &bootstrap,
        &topic,
        ["before", "after", "last"].map(String::from).into(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(values(&got), ["before", "after", "last"]);
    spool.shutdown(Duration::from_secs(5)).await;
}

/// A record refused for good whose dead-letter write fails is retried, and holds back the
/// records behind it as any retry does: they are not sent ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_dead_letter_write_fails_holds_back_the_records_behind_it() {
    let (cluster, topic, producers, dir, spool) = refusing_large_records("spool-dead-held");
    let bootstrap = cluster.bootstrap_servers();
    // The dead-letter file cannot be written: a directory stands in its place.
    let dead_letters = dir.path().join(kafboy::spool::DEAD_LETTER_FILE);
    std::fs::create_dir(&dead_letters).expect("dir in the way");
    start_sender(&spool, &producers);
    let big = "B".repeat(20_000);
    spool
        .append(&topic, &[record("before"), record(big), record("after")])
        .await
        .expect("append");
    // Two failed dead-letter writes: the refused record has been retried once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while spool.stats().disk_errors < 2 {
        assert!(Instant::now() < deadline, "{:?}", spool.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The record before it is delivered (a fresh producer may take a while to get its id);
    // then two more failed writes (the backoff is 500 ms at most), and still nothing behind
    // the refused record was sent.
    let deadline = Instant::now() + Duration::from_secs(10);
    while spool.stats().delivered < 1 {
        assert!(Instant::now() < deadline, "{:?}", spool.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let retried = spool.stats().disk_errors + 2;
    let deadline = Instant::now() + Duration::from_secs(10);
    while spool.stats().disk_errors < retried {
        assert!(Instant::now() < deadline, "{:?}", spool.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spool.stats().delivered, 1, "sent past the refused record");
    // Once the file can be written, the refused record is dead-lettered, then the next sent.
    std::fs::remove_dir(&dead_letters).expect("clear the way");
    wait_drained(&spool, Duration::from_secs(10)).await;
    let stats = spool.stats();
    assert_eq!((stats.dead_lettered, stats.delivered), (1, 2), "{stats:?}");
    let want = ["before", "after"].map(String::from).into();
    let got = read_topic(&bootstrap, &topic, want, Duration::from_secs(10)).await;
    assert_eq!(values(&got), ["before", "after"]);
    spool.shutdown(Duration::from_secs(5)).await;
}

/// A spool in `dir` whose sender has delivered the record `first` to `topic` (so the producer
/// knows the topic).
async fn sending_to_a_known_topic(
    dir: &Path,
    config: &SpoolConfig,
    producers: &Arc<Producers>,
    topic: &str,
) -> Spool {
    let spool = Spool::open(dir, config).expect("open");
    start_sender(&spool, producers);
    spool
        .append(topic, &[record("first")])
        .await
        .expect("append");
    wait_drained(&spool, Duration::from_secs(10)).await;
    spool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_is_gone_is_dead_lettered_after_the_grace_not_retried_for_ever() {
    let (cluster, topic) = mock_cluster("spool-gone");
    let bootstrap = cluster.bootstrap_servers();
    let producers = producers(&bootstrap, "[kafka]\nmessage_timeout = \"10s\"");
    let dir = tempfile::tempdir().expect("dir");
    // Long enough that the slack under four graces (a grace for each record in turn would
    // take at least four) covers fsyncs and polls on a busy machine.
    let grace = Duration::from_secs(2);
    let config = SpoolConfig {
        missing_grace: grace,
        ..config()
    };
    // A partition the topic no longer has (as after a recreate with fewer): librdkafka refuses
    // it at once. It was retried for ever, and held back every record behind it.
    // Once the producer knows the topic, it refuses such a record at once, at the send; four
    // of them: one grace for the partition, not one for each record in turn.
    let spool = sending_to_a_known_topic(dir.path(), &config, &producers, &topic).await;
    let gone = || Record {
        partition: Some(5),
        ..record("gone")
    };
    let mut records: Vec<Record> = (0..4).map(|_| gone()).collect();
    records.push(record("behind"));
    let started = Instant::now();
    spool.append(&topic, &records).await.expect("append");
    wait_drained(&spool, Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert!(took >= grace, "dead-lettered before its grace: {took:?}");
    assert!(took < 4 * grace, "a grace for each record: {took:?}");
    let stats = spool.stats();
    assert_eq!((stats.dead_lettered, stats.delivered), (4, 2), "{stats:?}");
    let text = std::fs::read_to_string(dir.path().join(kafboy::spool::DEAD_LETTER_FILE))
        .expect("dead-letter file");
    assert!(
        text.contains("UnknownPartition") && text.contains("\"gone\""),
        "{text}"
    );
    let want = ["first".to_string(), "behind".to_string()].into();
    let got = read_topic(&bootstrap, &topic, want, Duration::from_secs(10)).await;
    assert_eq!(values(&got), ["first", "behind"]);
    spool.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_shorter_than_the_retry_backoff_still_ends_in_the_dead_letter_file() {
    let (cluster, topic) = mock_cluster("spool-gone-short");
    let bootstrap = cluster.bootstrap_servers();
    let producers = producers(&bootstrap, "[kafka]\nmessage_timeout = \"10s\"");
    let dir = tempfile::tempdir().expect("dir");
    // Retries come further apart than the grace (as do refusals that come with a delivery
    // report): each refusal came more than a grace after the one before, so each began a new
    // outage, for ever.
    let config = SpoolConfig {
        missing_grace: Duration::from_millis(150),
        retry_backoff: Duration::from_millis(200),
        ..config()
    };
    let spool = sending_to_a_known_topic(dir.path(), &config, &producers, &topic).await;
    let gone = Record {
        partition: Some(5),
        ..record("gone")
    };
    spool
        .append(&topic, &[gone, record("behind")])
        .await
        .expect("append");
    wait_drained(&spool, Duration::from_secs(15)).await;
    let stats = spool.stats();
    assert_eq!((stats.dead_lettered, stats.delivered), (1, 2), "{stats:?}");
    let want = ["first".to_string(), "behind".to_string()].into();
    let got = read_topic(&bootstrap, &topic, want, Duration::from_secs(10)).await;
    assert_eq!(values(&got), ["first", "behind"]);
    spool.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_error_answers_disk_and_unhealthy_until_writes_work_again() {
    assert!(Path::new("/dev/full").exists(), "this test needs /dev/full");
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    let first = segments(dir.path());
    assert_eq!(first, ["00000000000000000001.seg"]);
    // The next segment is a file where every write fails with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", dir.path().join("00000000000000000002.seg"))
        .expect("symlink");
    let value = "d".repeat(1000);
    let mut accepted = 0;
    let error = loop {
        match spool.append("t", &[record(value.clone())]).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 10, "the segment never rolled");
    };
    eprintln!("after {accepted} records: {error}");
    assert!(
        matches!(&error, SpoolError::Disk(m) if m.contains("No space left")),
        "{error:?}"
    );
    let stats = spool.stats();
    assert!(!stats.healthy && !spool.healthy(), "{stats:?}");
    assert_eq!(stats.disk_errors, 1);
    assert_eq!(stats.records, accepted, "the failed record is not counted");
    // The writer moves on to a new segment: writes work again, and so does health.
    spool
        .append("t", &[record("after")])
        .await
        .expect("append after the disk error");
    assert!(spool.healthy());
    spool.crash();
    let spool = Spool::open(dir.path(), &config()).expect("reopen");
    assert_eq!(spool.stats().replayed, accepted + 1);
}

/// The same disk error seen over HTTP: the request whose append failed gets 503 with
/// `Retry-After` and `/ready` says not ready; the next append goes to a new segment and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_error_is_503_over_http_and_not_ready_until_writes_work_again() {
    assert!(Path::new("/dev/full").exists(), "this test needs /dev/full");
    let b = common::broker();
    let topic = b.topic("spool-full-disk", 1);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[spool]\ndir = {:?}\nsegment_bytes = 4096\n\
         [[routes]]\npath = \"/durable/:topic\"\nmode = \"async\"\nspool = true\n",
        dir.path().display().to_string()
    );
    let gw = common::gateway(&b.addr, &toml).await;
    let last = segments(dir.path()).pop().expect("a segment");
    let next: u64 = last.trim_end_matches(".seg").parse::<u64>().unwrap() + 1;
    std::os::unix::fs::symlink("/dev/full", dir.path().join(format!("{next:020}.seg")))
        .expect("symlink");
    let body = format!("{{\"d\":\"{}\"}}", "d".repeat(1000));
    let mut accepted = 0;
    let refused = loop {
        let r = gw.post_json(&format!("/durable/{topic}"), &body).await;
        if r.status != 202 {
            break r;
        }
        accepted += 1;
        assert!(accepted < 10, "the segment never rolled");
    };
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.headers.contains_key("retry-after"),
        "{:?}",
        refused.headers
    );
    let ready = common::client()
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "ready with a failing disk");
    let r = gw
        .post_json(&format!("/durable/{topic}"), "{\"after\":1}")
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let ready = common::client()
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ready again");
    // Every record answered 202 lands; the refused one does not.
    let got = common::read_all(&b.addr, &topic, accepted + 1).await;
    let mut want = vec![body.clone(); accepted];
    want.push("{\"after\":1}".into());
    assert_eq!(common::values(&got), want, "the refused record landed");
    gw.stop().await;
}

/// `kill -9` of a process appending under load: every record it was answered `Ok` for is
/// delivered after a restart; duplicates (sent but not yet checkpointed) are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_then_restart_delivers_every_acknowledged_record() {
    let broker = common::broker();
    let topic = broker.topic("spool-kill", 2);
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "spool_child_appends_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("SPOOL_CHILD_DIR", dir.path())
        .env("SPOOL_CHILD_BROKERS", &broker.addr)
        .env("SPOOL_CHILD_TOPIC", &topic)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start child");
    let stdout = child.stdout.take().expect("child stdout");
    // The child prints `acked v1 v2 .. end` after each append it got Ok for.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<String>>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("acked ")
                && let Some(vals) = rest.strip_suffix(" end")
            {
                let _ = tx.send(vals.split(' ').map(String::from).collect());
            }
        }
    });
    let started = Instant::now();
    let mut acked: Vec<String> = Vec::new();
    // The kill comes once the child has acknowledged enough appends and its sender has
    // delivered and checkpointed part of them, while it keeps appending.
    const ENOUGH: usize = 500;
    let deadline = started + Duration::from_secs(25);
    loop {
        if let Ok(vals) = rx.recv_timeout(Duration::from_millis(100)) {
            acked.extend(vals);
        }
        let checkpoint = checkpoint_of(dir.path());
        if acked.len() >= ENOUGH && checkpoint.is_some_and(|next| next > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the child acknowledged {} appends, checkpoint {checkpoint:?}",
            acked.len()
        );
    }
    child.kill().expect("kill -9");
    let status = child.wait().expect("wait");
    reader.join().expect("reader");
    acked.extend(rx.try_iter().flatten());
    eprintln!(
        "killed the child ({status}) after {:?} with {} records acknowledged",
        started.elapsed(),
        acked.len()
    );

    let spool = Spool::open(dir.path(), &config()).expect("reopen after kill -9");
    let replayed = spool.stats().replayed;
    let producers = producers(&broker.addr, "[kafka]\nmessage_timeout = \"20s\"");
    start_sender(&spool, &producers);
    wait_drained(&spool, Duration::from_secs(30)).await;
    let want: HashSet<String> = acked.iter().cloned().collect();
    let got = read_topic(&broker.addr, &topic, want.clone(), Duration::from_secs(20)).await;
    let mut copies: HashMap<&str, Vec<Option<&str>>> = HashMap::new();
    for g in &got {
        copies.entry(&g.value).or_default().push(g.id.as_deref());
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !copies.contains_key(w.as_str()))
        .collect();
    let duplicates: usize = copies.values().map(|c| c.len() - 1).sum();
    eprintln!(
        "after restart: replayed {replayed}, consumed {} records, {} distinct, {duplicates} \
         duplicates, {} acknowledged missing",
        got.len(),
        copies.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "lost {} records: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        replayed > 0,
        "nothing was left to replay: the kill came too late to test anything"
    );
    // A duplicate carries the same id as its original, so consumers can drop it.
    for (value, ids) in &copies {
        assert!(
            ids.iter().all(|id| id.is_some() && *id == ids[0]),
            "{value}: {ids:?}"
        );
    }
    spool.shutdown(Duration::from_secs(5)).await;
}

/// The sequence number in the spool's checkpoint file (the first record not yet acknowledged),
/// if there is a readable one.
fn checkpoint_of(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("checkpoint")).ok()?;
    let rest = text.strip_prefix("kafboy-spool-checkpoint next=")?;
    rest.split(' ').next()?.parse().ok()
}

/// The child process of the kill test: appends under load from several tasks and reports each
/// acknowledged append on stdout. Does nothing unless started by that test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by kill_9_under_load_then_restart_delivers_every_acknowledged_record"]
async fn spool_child_appends_until_killed() {
    let (Ok(dir), Ok(brokers), Ok(topic)) = (
        std::env::var("SPOOL_CHILD_DIR"),
        std::env::var("SPOOL_CHILD_BROKERS"),
        std::env::var("SPOOL_CHILD_TOPIC"),
    ) else {
        return;
    };
    let spool = Arc::new(Spool::open(&dir, &config()).expect("open"));
    let producers = producers(&brokers, "[kafka]\nmessage_timeout = \"20s\"");
    start_sender(&spool, &producers);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (spool, topic) = (spool.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut i = 0u64;
            // Bounded even if nobody kills it.
            while started.elapsed() < Duration::from_secs(30) {
                let n = 1 + (i % 4) as usize;
                let vals: Vec<String> = (0..n).map(|k| format!("w{w}-{i}-{k}")).collect();
                let records: Vec<Record> = vals.iter().map(|v| record(v.clone())).collect();
                if spool.append(&topic, &records).await.is_ok() {
                    println!("acked {} end", vals.join(" "));
                }
                i += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Append latency with fsync (group commit), one appender and 32 concurrent ones: figures to
/// read, not a check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test spool append_latency_with_fsync -- --ignored --nocapture"]
async fn append_latency_with_fsync() {
    fn pct(sorted: &[Duration], p: f64) -> Duration {
        sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
    }
    let dir = tempfile::tempdir().expect("dir");
    let spool = Arc::new(Spool::open(dir.path(), &SpoolConfig::default()).expect("open"));
    let value = Bytes::from("x".repeat(200));
    let mut one = Vec::new();
    for _ in 0..300 {
        let start = Instant::now();
        spool
            .append("t", &[record(value.clone())])
            .await
            .expect("append");
        one.push(start.elapsed());
    }
    one.sort();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (spool, value) = (spool.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..50 {
                let start = Instant::now();
                spool
                    .append("t", &[record(value.clone())])
                    .await
                    .expect("append");
                lat.push(start.elapsed());
            }
            lat
        }));
    }
    let mut many = Vec::new();
    for t in tasks {
        many.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    many.sort();
    eprintln!(
        "append of one 200-byte record with fsync, one appender: p50 {:?} p99 {:?} max {:?}",
        pct(&one, 0.5),
        pct(&one, 0.99),
        one[one.len() - 1]
    );
    eprintln!(
        "32 concurrent appenders: p50 {:?} p99 {:?} max {:?}; {} appends in {elapsed:?} ({:.0}/s)",
        pct(&many, 0.5),
        pct(&many, 0.99),
        many[many.len() - 1],
        many.len(),
        many.len() as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(spool.stats().records, 300 + 32 * 50);
    drop(spool);

    // With a 2 ms commit wait instead of none: what the wait costs one appender.
    let dir = tempfile::tempdir().expect("dir");
    let waiting = SpoolConfig {
        commit_interval: Duration::from_millis(2),
        ..SpoolConfig::default()
    };
    let spool = Spool::open(dir.path(), &waiting).expect("open");
    let mut raw = Vec::new();
    for _ in 0..300 {
        let start = Instant::now();
        spool
            .append("t", &[record(value.clone())])
            .await
            .expect("append");
        raw.push(start.elapsed());
    }
    raw.sort();
    eprintln!(
        "commit_interval = 2ms, one appender: p50 {:?} p99 {:?}",
        pct(&raw, 0.5),
        pct(&raw, 0.99)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_route_answers_202_after_fsync_and_the_record_lands_with_its_id() {
    let b = common::broker();
    let topic = b.topic("spooled-route", 1);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[spool]\ndir = {:?}\nmax_bytes = 16384\nsegment_bytes = 4096\n\
         [[routes]]\npath = \"/durable/:topic\"\nmode = \"async\"\nspool = true\n",
        dir.path().display().to_string()
    );
    let gw = common::gateway(&b.addr, &toml).await;
    let r = gw
        .post_json(&format!("/durable/{topic}"), "{\"d\":1}")
        .await;
    assert_eq!((r.status, r.body.as_str()), (202, r#"{"ok":1}"#));
    let got = common::consume(&b.addr, &topic, 1);
    assert_eq!(got[0].value, b"{\"d\":1}");
    assert!(
        got[0].headers.iter().any(|(k, _)| k == "kafboy-id"),
        "{:?}",
        got[0].headers
    );
    // A request larger than the whole spool is refused, not half written.
    let big = format!("\"{}\"", "x".repeat(20000));
    let r = gw.post_json(&format!("/durable/{topic}"), &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let config = kafboy::Config::from_toml(
        "[[routes]]\npath = \"/d/:topic\"\nmode = \"async\"\nspool = true",
    )
    .unwrap();
    assert!(
        kafboy::App::build(&config)
            .err()
            .unwrap()
            .contains("spool.dir")
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_record_must_fit_the_size_limit_with_its_id_header() {
    let b = common::broker();
    let topic = b.topic("spooled-size", 1);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[kafka]\nmessage_max_bytes = 1100\n[server]\nmax_body_bytes = 1050\n\
         [spool]\ndir = {:?}\n\
         [[routes]]\npath = \"/durable/:topic\"\nmode = \"async\"\nspool = true\n",
        dir.path().display().to_string()
    );
    let gw = common::gateway(&b.addr, &toml).await;
    // 1040 bytes of value and 36 of framing fit 1100; the 44 of the spool's id header do not.
    let body = format!("\"{}\"", "x".repeat(1038));
    let r = gw.post_json(&format!("/durable/{topic}"), &body).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("id header"), "{}", r.body);
    let r = gw.post_json(&format!("/async/{topic}"), &body).await;
    assert_eq!(r.status, 202, "without the spool it fits: {}", r.body);
    let got = common::read_all(&b.addr, &topic, 1).await;
    assert_eq!(got.len(), 1, "the spooled record was refused, not written");
    assert_eq!(got[0].value, body.as_bytes());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_segments_go_even_when_the_checkpoint_cannot_be_written() {
    let (cluster, topic) = mock_cluster("spool-stuck-checkpoint");
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    let value = "s".repeat(1000);
    for _ in 0..20 {
        spool
            .append(&topic, &[record(value.clone())])
            .await
            .expect("append");
    }
    let sealed = segments(dir.path()).len();
    assert!(sealed > 3, "{sealed} segments");
    // Every checkpoint write fails from now on, as on a full disk: its temp file cannot be
    // created.
    std::fs::create_dir(dir.path().join("checkpoint.tmp")).expect("blocker");
    start_sender(&spool, &producers(&cluster.bootstrap_servers(), ""));
    wait_for("delivered segments to go", Duration::from_secs(20), || {
        segments(dir.path()).len() <= 1 && spool.stats().disk_errors > 0
    })
    .await;
    std::fs::remove_dir(dir.path().join("checkpoint.tmp")).expect("unblock");
    wait_for("the checkpoint", Duration::from_secs(20), || {
        spool.stats().checkpoint >= 20
    })
    .await;
    spool.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_that_cannot_be_created_is_skipped_not_kept() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    // The next segment's file cannot be created (a directory is in the way), as on a disk that
    // turned read-only.
    std::fs::create_dir(dir.path().join("00000000000000000002.seg")).expect("blocker");
    let value = "d".repeat(1000);
    let mut refused = 0;
    for _ in 0..12 {
        if spool.append("t", &[record(value.clone())]).await.is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "one append met the blocked segment");
    assert!(spool.healthy());
    // The spool counts the segment files there are; nothing is kept for the number skipped.
    let files = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .count();
    assert_eq!(spool.stats().segments, files, "{:?}", spool.stats());
    spool.crash();
}

/// A shutdown with a spooled backlog that cannot all be sent in time ends once what was sent
/// is reported: the rest waits on disk for the next start, not the whole grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_a_spooled_backlog_does_not_wait_out_its_grace() {
    let (cluster, topic) = mock_cluster("spool-stop-backlog");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("dir");
    let toml = format!(
        "[server]\nshutdown_timeout = \"30s\"\n\
         [spool]\ndir = {:?}\nwindow_records = 1\n\
         [[routes]]\npath = \"/durable/:topic\"\nmode = \"async\"\nspool = true\n",
        dir.path().display().to_string()
    );
    let gw = common::gateway(&bootstrap, &toml).await;
    // One record in flight at a time, a second each: 40 of them are 40 s of backlog, past
    // the 30 s grace.
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_secs(1))
        .expect("slow broker");
    for i in 0..40 {
        let r = gw
            .post_json(&format!("/durable/{topic}"), &format!("{{\"n\":{i}}}"))
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let started = Instant::now();
    let report = gw.stop().await;
    let took = started.elapsed();
    assert!(report.spooled > 0, "{report:?}");
    assert_eq!((report.undelivered, report.failed), (0, 0), "{report:?}");
    assert!(took < Duration::from_secs(15), "the stop took {took:?}");
}

/// A shutdown that finds a spooled record still in a producer (the broker slow to answer)
/// counts it as kept for the next start, not as lost; a record of a plain async route in the
/// same state is lost, and counted so. The next start sends the spooled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_counts_spooled_records_in_flight_as_kept_not_lost() {
    let (cluster, topic) = mock_cluster("spool-stop-in-flight");
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("dir");
    let toml = format!(
        "[kafka]\nmessage_timeout = \"60s\"\n[server]\nshutdown_timeout = \"1s\"\n\
         [spool]\ndir = {:?}\n\
         [[routes]]\npath = \"/durable/:topic\"\nmode = \"async\"\nspool = true\n",
        dir.path().display().to_string()
    );
    let mut config = Config::from_toml(&toml).expect("config");
    config.kafka.brokers = vec![bootstrap.clone()];
    let app = kafboy::App::build(&config).expect("app");
    let producers = app.producers().clone();
    let gw = common::serve(app).await;
    // Both routes connected: a record of each read back.
    for path in ["durable", "async"] {
        let r = gw
            .post_json(&format!("/{path}/{topic}"), "{\"warm\":1}")
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let got = common::consume_for(&bootstrap, &topic, 2, Duration::from_secs(10));
    assert_eq!(got.len(), 2, "warm-up records");
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_secs(30))
        .expect("slow broker");
    for path in ["durable", "async"] {
        let r = gw
            .post_json(
                &format!("/{path}/{topic}"),
                &format!("{{\"slow\":\"{path}\"}}"),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let queued = || producers.all().iter().map(|p| p.queued()).sum::<usize>();
    wait_for(
        "both records in the producer",
        Duration::from_secs(10),
        || queued() == 2,
    )
    .await;
    let report = gw.stop().await;
    assert_eq!(report.undelivered, 1, "the plain async record: {report:?}");
    assert_eq!(report.spooled, 1, "the spooled record: {report:?}");
    drop(producers);

    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::ZERO)
        .expect("fast broker");
    let gw = common::gateway(&bootstrap, &toml).await;
    // The spooled record after the restart (the plain one may be there too: it was in
    // flight at the stop).
    let (brokers, read) = (bootstrap.clone(), topic.clone());
    tokio::task::spawn_blocking(move || {
        let consumer = common::consumer_from_start(&brokers, &read);
        common::consume_until(&consumer, common::EXPECTED_WAIT, |got| {
            got.iter().any(|r| r.value == b"{\"slow\":\"durable\"}")
        })
    })
    .await
    .expect("consumer task");
    let report = gw.stop().await;
    assert_eq!((report.undelivered, report.spooled), (0, 0), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_failed_once_leaves_the_spool_healthy_again_while_idle() {
    let (cluster, topic) = mock_cluster("sp-recheck");
    let dir = tempfile::tempdir().expect("dir");
    let spool = Spool::open(dir.path(), &config()).expect("open");
    start_sender(&spool, &producers(&cluster.bootstrap_servers(), ""));
    spool.append(&topic, &[record("a")]).await.expect("append");
    wait_drained(&spool, Duration::from_secs(20)).await;
    // A directory where the checkpoint's temporary file goes: its next write fails.
    // (The checkpoint writes that file itself every 20 ms, for a moment: the directory goes in
    // between two writes.)
    let blocker = dir.path().join("checkpoint.tmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = std::fs::create_dir(&blocker) {
        assert!(
            e.kind() == std::io::ErrorKind::AlreadyExists && Instant::now() < deadline,
            "blocker: {e}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    spool.append(&topic, &[record("b")]).await.expect("append");
    wait_for("the failed checkpoint", Duration::from_secs(20), || {
        !spool.healthy()
    })
    .await;
    // While the checkpoint keeps failing, the writer's probe (which writes another file, and
    // works) does not make the spool look healthy: no flapping, for more than one probe.
    spool.append(&topic, &[record("c")]).await.expect("append");
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert!(!spool.healthy(), "healthy while the checkpoint still fails");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_dir(&blocker).expect("unblock");
    // No append arrives (a node out of its load balancer gets none): the writer's probe alone
    // must find the disk working again.
    wait_for("healthy again", Duration::from_secs(10), || spool.healthy()).await;
    spool.shutdown(Duration::from_secs(2)).await;
}

/// An append the writer answers only after the request's `sync_timeout` (a disk that hangs:
/// here the segment the writer opens next, once the first is full, is a FIFO, whose open
/// blocks) gets `504`; its
/// outcome is counted when it comes. Here the disk then fails the write (a FIFO cannot be
/// fsynced): counted as dropped, as a refusal in time would have been.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_answered_after_its_timeout_is_counted_when_it_is() {
    let b = common::broker();
    let topic = b.topic("late-append", 1);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n[spool]\ndir = {:?}\nsegment_bytes = 4096\n\
         [server]\nsync_timeout = \"3s\"\n\
         [[routes]]\npath = \"/durable/:topic\"\nmode = \"async\"\nspool = true\n",
        dir.path().display().to_string()
    );
    let gw = common::gateway(&b.addr, &toml).await;
    let dropped = || async {
        let text = common::get_text(&format!("{}/metrics", gw.url)).await;
        let series =
            format!("kafboy_records_dropped_total{{topic=\"{topic}\",reason=\"spool_disk\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let fifos: Vec<_> = (0..8)
        .map(|id| dir.path().join(format!("{id:020}.seg")))
        .filter(|path| !path.exists())
        .collect();
    for fifo in &fifos {
        assert!(Command::new("mkfifo").arg(fifo).status().unwrap().success());
    }
    let path = format!("/durable/{topic}");
    // Fills the current segment: the idle writer opens the next, and hangs.
    let big = format!("\"{}\"", "x".repeat(5000));
    assert_eq!(gw.post_json(&path, &big).await.status, 202);
    let r = gw.post_json(&path, "{\"n\":1}").await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(dropped().await, 0.0);
    // The disk answers: each FIFO opened at both ends (which never blocks on Linux), so the
    // writer's open goes through; its fsync fails.
    let _both_ends: Vec<_> = fifos
        .iter()
        .map(|fifo| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(fifo)
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while dropped().await != 1.0 {
        assert!(Instant::now() < deadline, "the late refusal is not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

/// A spool directory removed under a running spool (an operator's `rm -rf`, a volume gone):
/// appends would go on into a file no one reads, answered `202` and lost. They get `503`, and
/// `/ready` turns `503`, until the directory is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_directory_removed_at_runtime_gets_503_not_a_lost_202() {
    let b = common::broker();
    let topic = b.topic("spool-gone", 1);
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    let toml = format!(
        "[spool]\ndir = {:?}\n\
         [[routes]]\npath = \"/durable/:topic\"\nmode = \"async\"\nspool = true\n",
        dir.display().to_string()
    );
    let gw = common::gateway(&b.addr, &toml).await;
    let path = format!("/durable/{topic}");
    assert_eq!(gw.post_json(&path, "{\"before\":1}").await.status, 202);
    assert_eq!(
        common::values(&common::consume(&b.addr, &topic, 1)),
        ["{\"before\":1}"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let r = gw.post_json(&path, "{\"gone\":1}").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    let ready = common::client()
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "ready without a spool directory");
    // Back: the next append goes to a new segment there.
    std::fs::create_dir(&dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = gw.post_json(&path, "{\"back\":1}").await;
        if r.status == 202 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "never accepted again: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = common::read_all(&b.addr, &topic, 2).await;
    assert_eq!(
        common::values(&got),
        ["{\"before\":1}", "{\"back\":1}"],
        "a refused record landed, or the accepted one did not"
    );
    gw.stop().await;
}
