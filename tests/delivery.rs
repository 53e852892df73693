//! End-to-end delivery contract against librdkafka's in-process mock cluster: what kafboy answers
//! when brokers are down, slow, refusing, or when its own queue is full. 503 means "not written,
//! retry", 504 means "may have been written".
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Consumed, Gateway, Reply};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// `broker_down`, `broker_up` and `broker_round_trip_time` apply to every broker with this id.
const ALL_BROKERS: i32 = -1;

/// Upper bound for any request that should be answered at once.
const PROMPT: Duration = Duration::from_secs(5);

/// A one-broker mock cluster with one fresh topic of `partitions` partitions.
fn cluster_with_topic(prefix: &str, partitions: i32) -> (Cluster, String) {
    common::mock_topic(1, prefix, partitions)
}

/// POSTs and measures, failing the test if no answer comes within `limit`.
async fn timed_post(
    gw: &Gateway,
    path: &str,
    content_type: Option<&str>,
    body: &str,
    limit: Duration,
) -> (Reply, Duration) {
    let start = Instant::now();
    let reply = tokio::time::timeout(limit, gw.post(path, content_type, body.to_string()))
        .await
        .unwrap_or_else(|_| panic!("POST {path} unanswered after {limit:?}"));
    (reply, start.elapsed())
}

/// GETs `path`, failing the test if no answer comes within [`PROMPT`].
async fn get(gw: &Gateway, path: &str) -> Reply {
    let request = common::client().get(format!("{}{path}", gw.url)).send();
    let response = tokio::time::timeout(PROMPT, request)
        .await
        .unwrap_or_else(|_| panic!("GET {path} unanswered after {PROMPT:?}"))
        .expect("request");
    Reply::read(response).await
}

/// 503 with `Retry-After` and a JSON `{"error": ...}` body.
fn assert_unavailable(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 503, "{what}: {reply:?}");
    assert!(
        reply.headers.contains_key("retry-after"),
        "{what}: no Retry-After: {reply:?}"
    );
    assert!(!reply.error().is_empty(), "{what}: empty error: {reply:?}");
}

/// 504 with a JSON `{"error": ...}` body.
fn assert_unknown(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 504, "{what}: {reply:?}");
    assert!(
        !reply.headers.contains_key("retry-after"),
        "{what}: 504 must not invite a blind retry: {reply:?}"
    );
    assert!(!reply.error().is_empty(), "{what}: empty error: {reply:?}");
}

/// Reads `topic` back from the start: stops at `want` records or after `wait`.
async fn read_back(bootstrap: &str, topic: &str, want: usize, wait: Duration) -> Vec<Consumed> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || common::consume_for(&bootstrap, &topic, want, wait))
        .await
        .expect("consumer task")
}

/// Reads `topic` back and checks it holds exactly `want`, in order: waits a little past the
/// last of them, so a record that should not be there has time to show.
async fn assert_holds(bootstrap: &str, topic: &str, want: &[&str], what: &str) {
    let got = common::read_all(bootstrap, topic, want.len()).await;
    assert_eq!(values(&got), want, "{what}");
}

/// Posts [`MARKER`] to `/sync/{topic}` until it is written. Just after an outage the producer
/// may still be reconnecting when the record's timeout ends its wait: a `503` says it was not
/// written, so it is sent again.
async fn sync_marker(gw: &Gateway, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (reply, _) = timed_post(gw, &format!("/sync/{topic}"), None, MARKER, PROMPT * 2).await;
        if reply.status == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(reply.status, 200, "after the brokers returned: {reply:?}");
        return;
    }
}

fn values(records: &[Consumed]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

/// The wall clock in ms since the epoch, as records are stamped.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock past 1970")
        .as_millis() as i64
}

const WARM_UP: &str = r#"{"warm_up":true}"#;

/// One record written and read back, so the producer is connected to the leader and has its
/// producer id. (A sync request would do the same, but could itself run into a short
/// `sync_timeout`.)
async fn warm_up(gw: &Gateway, bootstrap: &str, topic: &str) {
    let (reply, _) = timed_post(gw, &format!("/async/{topic}"), None, WARM_UP, PROMPT).await;
    assert_eq!(reply.status, 202, "warm-up: {reply:?}");
    let got = read_back(bootstrap, topic, 1, Duration::from_secs(10)).await;
    assert_eq!(values(&got), [WARM_UP], "warm-up: {got:?}");
}

/// kafboy from `toml` on `bootstrap`, ready, with a handle on its producers.
async fn with_producers(bootstrap: &str, toml: &str) -> (Gateway, Arc<kafboy::kafka::Producers>) {
    let mut config = kafboy::Config::from_toml(toml).expect("config");
    config.kafka.brokers = vec![bootstrap.to_string()];
    let app = kafboy::App::build(&config).expect("app");
    let producers = app.producers().clone();
    let gw = common::serve(app).await;
    gw.wait_ready().await;
    (gw, producers)
}

/// Stops the gateway; `shutdown_timeout` in every config below keeps this bounded.
async fn stop(gw: Gateway) {
    tokio::time::timeout(Duration::from_secs(10), gw.stop())
        .await
        .expect("gateway stops");
}

/// With every broker down, a sync request is answered `503` once its record's timeout (`given
/// up`, after the gateway is ready) ends the wait, and the record is never written later.
async fn sync_with_all_brokers_down(prefix: &str, toml: &str, given_up: Duration) {
    let (cluster, topic) = cluster_with_topic(prefix, 1);
    let gw = common::gateway(&cluster.bootstrap_servers(), toml).await;
    // Ready means the topic's metadata is cached; from here on no broker answers.
    cluster.broker_down(ALL_BROKERS).expect("brokers down");
    let limit = Duration::from_secs(20);
    let (reply, elapsed) =
        timed_post(&gw, &format!("/sync/{topic}"), None, r#"{"n":1}"#, limit).await;
    eprintln!(
        "brokers down: {} after {elapsed:?}: {}",
        reply.status, reply.body
    );
    assert_unavailable(&reply, "record never sent");
    assert!(reply.error().contains("not delivered"), "{reply:?}");
    assert!(
        elapsed >= given_up - Duration::from_millis(100),
        "answered before the record's timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "answered too late: {elapsed:?}"
    );
    // "Definitely not written": once the brokers are back, only what comes after is there.
    cluster.broker_up(ALL_BROKERS).expect("brokers up");
    sync_marker(&gw, &topic).await;
    let written = "the 503'd record was written after all";
    assert_holds(&cluster.bootstrap_servers(), &topic, &[MARKER], written).await;
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_all_brokers_down_is_503_after_message_timeout() {
    // librdkafka's message timeout ends the wait, not sync_timeout (30 s).
    let toml = "[kafka]\nmessage_timeout = \"1500ms\"\n[server]\nsync_timeout = \"30s\"\n\
                shutdown_timeout = \"1s\"";
    sync_with_all_brokers_down("down", toml, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_all_brokers_down_is_503_before_its_sync_timeout_and_never_written_later() {
    // The message timeout (120 s by default) would keep the record queued long after the
    // client's 504 at sync_timeout (5 s), and write it once the brokers return: the sync
    // producer gives it up 2 s before.
    let toml = "[server]\nsync_timeout = \"5s\"\nshutdown_timeout = \"1s\"";
    sync_with_all_brokers_down("down-deadline", toml, Duration::from_secs(3)).await;
}

/// Waits until `gw` counts `want` records of `topic` (on the allowlist) accepted, checking
/// `meanwhile` at every poll.
async fn wait_accepted(gw: &Gateway, topic: &str, want: f64, meanwhile: impl Fn()) {
    let accepted = [("topic", topic)];
    let deadline = Instant::now() + PROMPT;
    while metric(
        &get(gw, "/metrics").await.body,
        "kafboy_records_accepted_total",
        &accepted,
    ) < Some(want)
    {
        meanwhile();
        assert!(
            Instant::now() < deadline,
            "the records never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A record sent once a fault is over, to read back after what the fault did.
const MARKER: &str = r#"{"marker":true}"#;

/// The value of `name{labels...}` in a Prometheus text exposition, if there is such a line.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_records_that_expire_with_the_brokers_down_are_counted_failed_and_never_land() {
    let (cluster, topic) = cluster_with_topic("expire", 1);
    // Named in the allowlist, so its metrics carry its own label.
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n[kafka]\nmessage_timeout = \"1500ms\"\n\
         [server]\nshutdown_timeout = \"1s\""
    );
    let gw = common::gateway(&cluster.bootstrap_servers(), &toml).await;
    warm_up(&gw, &cluster.bootstrap_servers(), &topic).await;
    cluster.broker_down(ALL_BROKERS).expect("brokers down");
    const LOST: usize = 10;
    for i in 0..LOST {
        let body = format!(r#"{{"lost":{i}}}"#);
        let (reply, _) = timed_post(&gw, &format!("/async/{topic}"), None, &body, PROMPT).await;
        assert_eq!(reply.status, 202, "accepted into the queue: {reply:?}");
    }
    // A 202 is not a delivery: each of them fails at the message timeout, and says so.
    // Never sent, so not written: `persisted="no"`.
    let failed = [
        ("topic", topic.as_str()),
        ("reason", "MessageTimedOut"),
        ("persisted", "no"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(&gw, "/metrics").await.body;
        let n = metric(&text, "kafboy_records_failed_total", &failed);
        if n == Some(LOST as f64) {
            break;
        }
        assert!(Instant::now() < deadline, "failed: {n:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.broker_up(ALL_BROKERS).expect("brokers up");
    sync_marker(&gw, &topic).await;
    let landed = "an expired record landed";
    assert_holds(
        &cluster.bootstrap_servers(),
        &topic,
        &[WARM_UP, MARKER],
        landed,
    )
    .await;
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_gives_up_on_is_still_counted() {
    let (cluster, topic) = cluster_with_topic("abandoned", 1);
    // A route of its own: the metrics are the process's, shared with the other tests.
    let gw = common::gateway(
        &cluster.bootstrap_servers(),
        "[server]\nsync_timeout = \"10s\"\nshutdown_timeout = \"1s\"\n\
         [[routes]]\npath = \"/abandoned/:topic\"\nmode = \"sync\"",
    )
    .await;
    warm_up(&gw, &cluster.bootstrap_servers(), &topic).await;
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_secs(3))
        .expect("slow broker");
    // The client's own timeout is shorter than the wait for the ack.
    let gave_up = common::client()
        .post(format!("{}/abandoned/{topic}", gw.url))
        .header("content-type", "application/json")
        .body("{}")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    let route = [("route", "/abandoned/:topic")];
    let closed = [route[0], ("class", "4xx")];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(&gw, "/metrics").await.body;
        if metric(&text, "kafboy_http_requests_total", &closed) == Some(1.0) {
            let timed = metric(&text, "kafboy_http_request_duration_seconds_count", &route);
            assert_eq!(timed, Some(1.0), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::ZERO)
        .expect("fast broker");
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_ndjson_with_one_leader_down_is_504_and_says_which_records_were_written() {
    let (cluster, topic) = common::mock_topic(3, "partial", 3);
    for p in 0..3 {
        cluster
            .partition_leader(&topic, p, Some(p + 1))
            .expect("leader");
    }
    let gw = common::gateway(
        &cluster.bootstrap_servers(),
        "[kafka]\nmessage_timeout = \"5s\"\n[server]\nsync_timeout = \"10s\"\n\
         shutdown_timeout = \"1s\"\n[topics]\npartitioner = \"round_robin\"",
    )
    .await;
    let path = format!("/sync/{topic}");
    let ndjson = Some("application/x-ndjson");
    // Connected to every leader first.
    let warm = "{\"w\":0}\n{\"w\":1}\n{\"w\":2}\n";
    let (reply, _) = timed_post(&gw, &path, ndjson, warm, Duration::from_secs(10)).await;
    assert_eq!(reply.status, 200, "warm-up: {reply:?}");
    cluster.broker_down(2).expect("leader of partition 1 down");
    let lines = ["{\"i\":0}", "{\"i\":1}", "{\"i\":2}"];
    // Answered once the record for the downed leader times out (5 s), before sync_timeout.
    let (reply, _) = timed_post(
        &gw,
        &path,
        ndjson,
        &lines.join("\n"),
        Duration::from_secs(20),
    )
    .await;
    eprintln!("one leader down: {} {}", reply.status, reply.body);
    // Some records are written: never a 2xx, never a 503 (a retry would duplicate them).
    assert_unknown(&reply, "some records written, one not");
    let records = reply.json()["records"].as_array().expect("records").clone();
    assert_eq!(records.len(), lines.len(), "{records:?}");
    let written: Vec<(usize, i32, i64)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r["partition"].as_i64()? as i32, r["offset"].as_i64()?)))
        .collect();
    let failed = records.iter().filter(|r| r["error"].is_string()).count();
    assert_eq!((written.len(), failed), (2, 1), "{records:?}");
    assert!(
        written.iter().all(|w| w.1 != 1),
        "written on the downed leader: {written:?}"
    );
    // What the reply says was written is there, at the offsets it names; the rest is not.
    cluster.broker_up(2).expect("broker up");
    // The warm-up's three and the two written; a sixth would be the failed one.
    let got = common::read_all(&cluster.bootstrap_servers(), &topic, 5).await;
    for (i, p, o) in &written {
        let at = got.iter().find(|c| c.partition == *p && c.offset == *o);
        let value = at.map(|c| String::from_utf8_lossy(&c.value).into_owned());
        assert_eq!(value.as_deref(), Some(lines[*i]), "{got:?}");
    }
    let failed_line = (0..lines.len())
        .find(|i| written.iter().all(|w| w.0 != *i))
        .unwrap();
    assert!(
        !values(&got).contains(&lines[failed_line].to_string()),
        "the record reported failed was written: {got:?}"
    );
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_with_rtt_beyond_message_timeout_is_504() {
    let (cluster, topic) = cluster_with_topic("slow-ack", 1);
    let message_timeout = Duration::from_millis(1500);
    // Named in the allowlist, so its metrics carry its own label.
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n[kafka]\nmessage_timeout = \"1500ms\"\n\
         [server]\nsync_timeout = \"30s\"\nshutdown_timeout = \"1s\""
    );
    let gw = common::gateway(&cluster.bootstrap_servers(), &toml).await;
    // Ready only means metadata: the connection to the leader and the idempotent producer id
    // may still be on their way, and with those delayed the record would never be sent (503).
    warm_up(&gw, &cluster.bootstrap_servers(), &topic).await;
    // The request is sent on the open connection; its answer would come after the record's
    // message timeout, so librdkafka gives up on a record that may well be written.
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_secs(4))
        .expect("rtt");

    let limit = Duration::from_secs(20);
    let (reply, elapsed) =
        timed_post(&gw, &format!("/sync/{topic}"), None, r#"{"n":1}"#, limit).await;
    eprintln!(
        "rtt beyond message timeout: {} after {elapsed:?}: {}",
        reply.status, reply.body
    );
    assert_unknown(&reply, "sent, no answer");
    assert!(reply.error().contains("may have been written"), "{reply:?}");
    assert!(
        elapsed >= message_timeout - Duration::from_millis(100),
        "answered before the message timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "answered too late: {elapsed:?}"
    );
    // Counted failed, and as a record that may be on the broker all the same.
    let text = get(&gw, "/metrics").await.body;
    let failed = [("topic", topic.as_str()), ("persisted", "possibly")];
    assert_eq!(
        metric(&text, "kafboy_records_failed_total", &failed),
        Some(1.0),
        "{text}"
    );
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::ZERO)
        .expect("rtt");
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_timeout_shorter_than_the_ack_is_504_and_the_record_still_lands() {
    let (cluster, topic) = cluster_with_topic("sync-deadline", 1);
    let sync_timeout = Duration::from_millis(500);
    let gw = common::gateway(
        &cluster.bootstrap_servers(),
        "[kafka]\nmessage_timeout = \"10s\"\n[server]\nsync_timeout = \"500ms\"\nshutdown_timeout = \"1s\"",
    )
    .await;
    warm_up(&gw, &cluster.bootstrap_servers(), &topic).await;
    let rtt = Duration::from_secs(3);
    cluster
        .broker_round_trip_time(ALL_BROKERS, rtt)
        .expect("rtt");

    // Answered before the ack could come: a reply that waited for the ack would come after
    // the round trip (and be a 200).
    // A reply that waited for the ack is a 200, so the limit only has to catch a hang.
    let (reply, elapsed) = timed_post(
        &gw,
        &format!("/sync/{topic}"),
        None,
        r#"{"late":true}"#,
        Duration::from_secs(30),
    )
    .await;
    eprintln!(
        "sync_timeout before the ack: {} after {elapsed:?}: {}",
        reply.status, reply.body
    );
    assert_unknown(&reply, "no ack within sync_timeout");
    assert!(
        elapsed >= sync_timeout,
        "answered before sync_timeout: {elapsed:?}"
    );
    // The same for a batch on /batch/sync, on the batching producer.
    let (reply, elapsed) = timed_post(
        &gw,
        &format!("/batch/sync/{topic}"),
        Some("application/x-ndjson"),
        "{\"batch\":1}\n{\"batch\":2}\n",
        Duration::from_secs(30),
    )
    .await;
    assert_unknown(&reply, "no ack of the batch within sync_timeout");
    assert!(
        elapsed >= sync_timeout,
        "batch answered before sync_timeout: {elapsed:?}"
    );

    // "May have been written" is what happens here: the acks come after the replies.
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::ZERO)
        .expect("rtt");
    let got = read_back(
        &cluster.bootstrap_servers(),
        &topic,
        4,
        Duration::from_secs(8),
    )
    .await;
    let mut got = values(&got);
    got.sort();
    assert_eq!(
        got,
        [
            r#"{"batch":1}"#,
            r#"{"batch":2}"#,
            r#"{"late":true}"#,
            WARM_UP
        ],
        "{got:?}"
    );
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_503_all_or_nothing_and_drains_once_brokers_return() {
    let (cluster, topic) = cluster_with_topic("queue-full", 1);
    let enqueue_timeout = Duration::from_millis(200);
    // Short reconnect backoff so the producer finds the brokers again soon after they return;
    // the topic in the allowlist so its metrics carry its name.
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n\
         [kafka]\nqueue_max_messages = 3\nmessage_timeout = \"30s\"\n\
         [kafka.options]\n\"reconnect.backoff.max.ms\" = \"300\"\n\
         [server]\nenqueue_timeout = \"200ms\"\nsync_timeout = \"5s\"\nshutdown_timeout = \"1s\""
    );
    let gw = common::gateway(&cluster.bootstrap_servers(), &toml).await;
    cluster.broker_down(ALL_BROKERS).expect("brokers down");
    let path = format!("/async/{topic}");
    // With the brokers down, room comes back only when queued records expire, at the message
    // timeout (30 s): an answer that waited for room (or for delivery) comes no sooner than
    // that. Every answer below must come well before it.
    let message_timeout = Duration::from_secs(30);
    let well_before = message_timeout / 2;

    for n in 0..2 {
        let (reply, elapsed) =
            timed_post(&gw, &path, None, &format!(r#"{{"n":{n}}}"#), well_before).await;
        eprintln!(
            "record {n} into the queue: {} after {elapsed:?}",
            reply.status
        );
        assert_eq!(reply.status, 202, "record {n}: {reply:?}");
        assert_eq!(reply.json(), serde_json::json!({ "ok": 1 }));
    }
    // One slot is left; two records do not fit, and neither is queued.
    let (reply, elapsed) = timed_post(
        &gw,
        &path,
        Some("application/x-ndjson"),
        "{\"nd\":1}\n{\"nd\":2}\n",
        well_before,
    )
    .await;
    eprintln!(
        "ndjson into one free slot: {} after {elapsed:?}: {}",
        reply.status, reply.body
    );
    assert_unavailable(&reply, "two records, one slot");
    assert!(
        elapsed >= enqueue_timeout,
        "ndjson refused before enqueue_timeout: {elapsed:?}"
    );
    // The slot is still free.
    let (reply, _) = timed_post(&gw, &path, None, r#"{"n":2}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "the last slot: {reply:?}");
    assert_eq!(reply.json(), serde_json::json!({ "ok": 1 }));
    for n in 3..5 {
        let (reply, elapsed) =
            timed_post(&gw, &path, None, &format!(r#"{{"n":{n}}}"#), well_before).await;
        eprintln!(
            "record {n} into a full queue: {} after {elapsed:?}",
            reply.status
        );
        assert_unavailable(&reply, "queue full");
        assert!(reply.error().contains("queue full"), "{reply:?}");
        assert!(
            elapsed >= enqueue_timeout,
            "refused before enqueue_timeout: {elapsed:?}"
        );
    }

    // Every record refused is counted as dropped for a full queue: the NDJSON pair, then two.
    let mut refused = 4.0;
    let dropped = [("topic", topic.as_str()), ("reason", "queue_full")];
    let text = get(&gw, "/metrics").await.body;
    let counted = metric(&text, "kafboy_records_dropped_total", &dropped);
    assert_eq!(counted, Some(refused), "{text}");
    // Brokers back: the queued records go out, room comes back, and requests succeed again.
    cluster.broker_up(ALL_BROKERS).expect("brokers up");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let (reply, _) =
            timed_post(&gw, &path, None, r#"{"n":"after"}"#, Duration::from_secs(8)).await;
        if reply.status == 202 {
            break;
        }
        assert_unavailable(&reply, "while the queue drains");
        refused += 1.0;
        assert!(Instant::now() < deadline, "queue never drained: {reply:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "queue drained and accepting again {:?} after brokers returned",
        started.elapsed()
    );
    // Exactly the three queued records come before it, in order: nothing refused was written.
    let got = read_back(
        &cluster.bootstrap_servers(),
        &topic,
        4,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        values(&got),
        [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":"after"}"#],
        "{got:?}"
    );
    let text = get(&gw, "/metrics").await.body;
    let counted = metric(&text, "kafboy_records_dropped_total", &dropped);
    assert_eq!(counted, Some(refused), "{text}");
    stop(gw).await;
}

/// A batch the broker says it already had (a duplicate sequence number: the retry of a request
/// whose answer was lost) is acknowledged without an offset, and every record of it is `null`
/// in the reply. librdkafka numbers such a batch from the missing base, -1, 0, 1, ..., and
/// those numbers would point at other records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_acknowledged_as_a_duplicate_has_no_offsets_in_the_reply() {
    let (cluster, topic) = cluster_with_topic("duplicate", 1);
    // A batching route whose batch is two records: the two of one request go in one batch
    // (on `/sync`, with no linger, they may go in two).
    let gw = common::gateway(
        &cluster.bootstrap_servers(),
        "[server]\nshutdown_timeout = \"1s\"\n[batch]\nbatch_size = 2\nflush_timeout = \"20ms\"",
    )
    .await;
    let path = format!("/batch/sync/{topic}");
    let (reply, _) = timed_post(&gw, &path, None, r#"{"first":1}"#, PROMPT).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let duplicate = RDKafkaRespErr::RD_KAFKA_RESP_ERR_DUPLICATE_SEQUENCE_NUMBER;
    cluster.request_errors(RDKafkaApiKey::Produce, &[duplicate]);
    // Two records, numbered -1 and 0: the mock writes nothing for the duplicate, so the next
    // record's real offset is 1, which a run of made-up numbers that went on past its batch
    // would take for its own.
    let (reply, _) = timed_post(&gw, &path, Some("application/x-ndjson"), "1\n2\n", PROMPT).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let records = reply.json()["records"].as_array().cloned().unwrap();
    assert_eq!(records.len(), 2, "{reply:?}");
    assert!(records.iter().all(|r| r["offset"].is_null()), "{reply:?}");
    // The next batch has its offset again.
    let (reply, _) = timed_post(&gw, &path, None, r#"{"next":1}"#, PROMPT).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["offset"], 1, "{reply:?}");
    let metrics = common::get_text(&format!("{}/metrics", gw.url)).await;
    assert!(
        metrics.contains("kafboy_records_delivered_without_offset_total{topic=\"other\"} 2"),
        "{metrics}"
    );
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_inside_and_written_once() {
    let (cluster, topic) = cluster_with_topic("retried", 1);
    let gw = common::gateway(
        &cluster.bootstrap_servers(),
        "[kafka]\nmessage_timeout = \"15s\"\n[server]\nsync_timeout = \"15s\"\nshutdown_timeout = \"1s\"",
    )
    .await;
    let not_enough = RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS;
    cluster.request_errors(RDKafkaApiKey::Produce, &[not_enough; 3]);

    let path = format!("/sync/{topic}");
    let (reply, elapsed) = timed_post(
        &gw,
        &path,
        None,
        r#"{"retried":true}"#,
        Duration::from_secs(10),
    )
    .await;
    eprintln!(
        "after 3 refusals: {} after {elapsed:?}: {}",
        reply.status, reply.body
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let first = reply.json();
    assert_eq!(first["ok"], 1, "{first}");
    assert_eq!(first["topic"], topic.as_str(), "{first}");
    assert_eq!(first["partition"], 0, "{first}");
    let offset = first["offset"].as_i64().expect("offset");
    // Three refusals, each followed by a retry backoff (100 ms and up): the errors were met.
    assert!(
        elapsed >= Duration::from_millis(150),
        "no retries happened? {elapsed:?}"
    );

    // A second record lands right after the first: no duplicate between them.
    let (reply, _) = timed_post(&gw, &path, None, r#"{"marker":true}"#, PROMPT).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["offset"], offset + 1, "{reply:?}");
    let got = read_back(
        &cluster.bootstrap_servers(),
        &topic,
        2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        values(&got),
        [r#"{"retried":true}"#, r#"{"marker":true}"#],
        "{got:?}"
    );
    assert_eq!(got[0].offset, offset, "{got:?}");
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_mean_not_ready_and_503() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let gw = common::gateway_unready(
        &format!("127.0.0.1:{port}"),
        "[kafka]\nmetadata_timeout = \"1s\"\nmessage_timeout = \"20s\"\n[server]\nshutdown_timeout = \"1s\"",
    )
    .await;

    let ready = get(&gw, "/ready").await;
    assert_unavailable(&ready, "/ready without metadata");
    let health = get(&gw, "/health").await;
    assert_eq!(health.status, 200, "{health:?}");

    for path in ["/sync/nowhere", "/async/nowhere"] {
        let limit = Duration::from_secs(15);
        let (reply, elapsed) = timed_post(&gw, path, None, r#"{"n":1}"#, limit).await;
        eprintln!(
            "{path} without brokers: {} after {elapsed:?}: {}",
            reply.status, reply.body
        );
        assert_unavailable(&reply, path);
        assert!(reply.error().contains("metadata"), "{reply:?}");
        assert!(
            // The metadata timeout (1 s) ends the wait, not the message timeout (20 s).
            elapsed < Duration::from_secs(10),
            "{path} took {elapsed:?}"
        );
    }
    // Still not ready after the metadata attempts failed.
    let ready = get(&gw, "/ready").await;
    assert_unavailable(&ready, "/ready after failed lookups");
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_ndjson_reports_every_record_in_request_order() {
    let (cluster, topic) = cluster_with_topic("ndjson-sync", 3);
    let gw = common::gateway(
        &cluster.bootstrap_servers(),
        "[kafka]\nmessage_timeout = \"10s\"\n[server]\nsync_timeout = \"10s\"\nshutdown_timeout = \"1s\"\n\
         [topics]\npartitioner = \"round_robin\"",
    )
    .await;
    let lines: Vec<String> = (0..7).map(|i| format!(r#"{{"i":{i}}}"#)).collect();
    let body = lines.join("\n") + "\n";

    let (reply, elapsed) = timed_post(
        &gw,
        &format!("/sync/{topic}"),
        Some("application/x-ndjson"),
        &body,
        Duration::from_secs(10),
    )
    .await;
    eprintln!(
        "ndjson sync: {} after {elapsed:?}: {}",
        reply.status, reply.body
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let json = reply.json();
    assert_eq!(json["ok"], lines.len(), "{json}");
    assert_eq!(json["topic"], topic.as_str(), "{json}");
    let written: Vec<(i32, i64)> = json["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            let p = r["partition"].as_i64().expect("partition") as i32;
            (p, r["offset"].as_i64().expect("offset"))
        })
        .collect();
    assert_eq!(written.len(), lines.len(), "{json}");
    let partitions: std::collections::BTreeSet<i32> = written.iter().map(|w| w.0).collect();
    assert!(
        partitions.len() > 1,
        "round robin used one partition: {written:?}"
    );
    for p in partitions {
        let offsets: Vec<i64> = written.iter().filter(|w| w.0 == p).map(|w| w.1).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: {offsets:?}"
        );
    }

    // Entry i names where line i was written.
    let got = read_back(
        &cluster.bootstrap_servers(),
        &topic,
        lines.len(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(got.len(), lines.len(), "{got:?}");
    for (i, (p, o)) in written.iter().enumerate() {
        let record = got.iter().find(|c| c.partition == *p && c.offset == *o);
        let value = record.map(|c| String::from_utf8_lossy(&c.value).into_owned());
        assert_eq!(
            value.as_deref(),
            Some(lines[i].as_str()),
            "entry {i} at {p}/{o}: {got:?}"
        );
    }
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_lets_open_sync_requests_finish_and_takes_no_new_connections() {
    let (cluster, topic) = cluster_with_topic("drain", 1);
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n[kafka]\nmessage_timeout = \"30s\"\n\
         [server]\nsync_timeout = \"20s\"\nshutdown_timeout = \"20s\""
    );
    let gw = common::gateway(&cluster.bootstrap_servers(), &toml).await;
    warm_up(&gw, &cluster.bootstrap_servers(), &topic).await;
    // Acknowledgements take 5 s: the requests below are still open when the stop begins, and
    // for a good while after.
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_secs(5))
        .expect("rtt");
    let url = gw.url.clone();
    let open: Vec<_> = (0..3)
        .map(|i| {
            let url = format!("{url}/sync/{topic}");
            tokio::spawn(async move {
                let r = common::client()
                    .post(url)
                    .body(format!(r#"{{"open":{i}}}"#))
                    .send()
                    .await
                    .expect("answered");
                Reply::read(r).await
            })
        })
        .collect();
    // All three are queued (and so inside their handlers) before the stop.
    wait_accepted(&gw, &topic, 4.0, || {}).await;
    let stopping = tokio::spawn(gw.stop());
    // New connections are refused (or closed unanswered, when one slipped into the listen
    // backlog as the listener closed) while the open requests still wait for their acks:
    // the listener does not stay open until they are done.
    loop {
        let attempt = common::client().get(format!("{url}/ready")).send().await;
        match attempt {
            Err(_) => break,
            Ok(r) => assert_ne!(r.status(), 200, "ready while stopping"),
        }
        assert!(
            open.iter().all(|r| !r.is_finished()),
            "still taking connections when the open requests were answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        open.iter().all(|r| !r.is_finished()),
        "the open requests were answered before the listener closed"
    );
    for request in open {
        let reply = request.await.expect("request task");
        assert_eq!(reply.status, 200, "an open request finishes: {reply:?}");
    }
    let report = tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("stops")
        .expect("stop task");
    assert_eq!(report.undelivered, 0);
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::ZERO)
        .expect("rtt");
    let got = read_back(
        &cluster.bootstrap_servers(),
        &topic,
        4,
        Duration::from_secs(10),
    )
    .await;
    let mut got = values(&got);
    got.sort();
    assert_eq!(
        got,
        [r#"{"open":0}"#, r#"{"open":1}"#, r#"{"open":2}"#, WARM_UP],
        "what was answered 200 is there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_refusals_for_good_keep_their_meaning_and_write_nothing() {
    for (error, status) in [
        (RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 413),
        (
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
            403,
        ),
    ] {
        // A cluster each: librdkafka remembers a topic it was refused.
        let (cluster, topic) = cluster_with_topic("refused", 1);
        let gw = common::gateway(
            &cluster.bootstrap_servers(),
            "[kafka]\nmessage_timeout = \"5s\"\nunknown_topic_ttl = \"60s\"\n[server]\nsync_timeout = \"10s\"\nshutdown_timeout = \"1s\"",
        )
        .await;
        warm_up(&gw, &cluster.bootstrap_servers(), &topic).await;
        cluster.request_errors(RDKafkaApiKey::Produce, &[error]);
        let path = format!("/sync/{topic}");
        let (reply, _) = timed_post(&gw, &path, None, r#"{"no":1}"#, PROMPT).await;
        eprintln!("{error:?}: {} {}", reply.status, reply.body);
        assert_eq!(reply.status, status, "{error:?}: {reply:?}");
        assert!(reply.error().contains("not delivered"), "{reply:?}");
        let refused = format!("{error:?}: the refused record was written");
        assert_holds(&cluster.bootstrap_servers(), &topic, &[WARM_UP], &refused).await;
        // A refusal to write is remembered for the topic: an async request gets the 403 too,
        // not a 202 for records the brokers would go on refusing. A record too large is not.
        let (reply, _) = timed_post(&gw, &format!("/async/{topic}"), None, "{}", PROMPT).await;
        let want = if status == 403 { 403 } else { 202 };
        assert_eq!(reply.status, want, "{error:?}: {reply:?}");
        stop(gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_fail_during_the_final_flush_are_reported_lost() {
    let (cluster, topic) = cluster_with_topic("flush-fails", 1);
    let bootstrap = cluster.bootstrap_servers();
    let gw = common::gateway(
        &bootstrap,
        "[kafka]\nlinger = \"2s\"\nmessage_timeout = \"5s\"\n[server]\nshutdown_timeout = \"3s\"",
    )
    .await;
    let (reply, _) = timed_post(&gw, &format!("/async/{topic}"), None, "{}", PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    // The record waits for its linger; the flush sends it, and the broker refuses it for good.
    let refused = RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    cluster.request_errors(RDKafkaApiKey::Produce, &[refused]);
    let report = tokio::time::timeout(Duration::from_secs(10), gw.stop())
        .await
        .expect("gateway stops");
    assert_eq!((report.undelivered, report.failed), (0, 1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_records_that_fail_during_the_drain_are_answered_not_lost() {
    let (cluster, topic) = cluster_with_topic("drain-fails", 1);
    let bootstrap = cluster.bootstrap_servers();
    // On the allowlist, the topic has metrics of its own.
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n[kafka]\nmessage_timeout = \"2s\"\n\
         [server]\nshutdown_timeout = \"8s\""
    );
    let gw = common::gateway(&bootstrap, &toml).await;
    // Both producers have their ids before the brokers go away.
    warm_up(&gw, &bootstrap, &topic).await;
    let (reply, _) = timed_post(&gw, &format!("/sync/{topic}"), None, "{}", PROMPT).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    cluster.broker_down(ALL_BROKERS).expect("brokers down");
    // An async and a sync record, queued before the stop; both expire during the drain.
    let path = format!("/async/{topic}");
    let (reply, _) = timed_post(&gw, &path, None, r#"{"a":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let sync = {
        let url = format!("{}/sync/{topic}", gw.url);
        tokio::spawn(async move {
            let r = common::client().post(url).body(r#"{"s":1}"#).send().await;
            Reply::read(r.expect("answered")).await
        })
    };
    wait_accepted(&gw, &topic, 4.0, || {
        assert!(!sync.is_finished(), "sync answered before the stop")
    })
    .await;
    let report = tokio::time::timeout(Duration::from_secs(15), gw.stop())
        .await
        .expect("gateway stops");
    let sync = sync.await.expect("sync request");
    // The sync requester has its answer (never sent: 503); only the async record, whose
    // answer was its 202, is lost.
    assert_unavailable(&sync, "sync record expired in the queue");
    assert_eq!((report.undelivered, report.failed), (0, 1), "{report:?}");
    cluster.broker_up(ALL_BROKERS).expect("brokers up");
    assert_holds(&bootstrap, &topic, &[WARM_UP, "{}"], "expired records").await;
}

/// A sync record answered `504` (its requester told "maybe written", and gone) with the brokers
/// away, then a shutdown under `toml`: its report, once nothing of the record is at the broker.
async fn shutdown_after_a_504(prefix: &str, toml: &str) -> kafboy::ShutdownReport {
    let (cluster, topic) = cluster_with_topic(prefix, 1);
    let bootstrap = cluster.bootstrap_servers();
    let gw = common::gateway(&bootstrap, toml).await;
    warm_up(&gw, &bootstrap, &topic).await;
    cluster.broker_down(ALL_BROKERS).expect("brokers down");
    let path = format!("/sync/{topic}");
    let (reply, _) = timed_post(&gw, &path, None, r#"{"s":1}"#, PROMPT).await;
    assert_eq!(reply.status, 504, "{reply:?}");
    let report = tokio::time::timeout(Duration::from_secs(15), gw.stop())
        .await
        .expect("gateway stops");
    cluster.broker_up(ALL_BROKERS).expect("brokers up");
    assert_holds(&bootstrap, &topic, &[WARM_UP], "not written").await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_record_answered_504_then_given_up_at_the_shutdown_counts_as_undelivered() {
    // The record waits in the queue until the flush gives it up; never sent.
    let toml = "[kafka]\nmessage_timeout = \"60s\"\n\
                [server]\nsync_timeout = \"1s\"\nshutdown_timeout = \"1s\"";
    let report = shutdown_after_a_504("gave-up", toml).await;
    // Nobody hears of it but the shutdown's count.
    assert_eq!(
        (report.undelivered, report.maybe_written, report.failed),
        (1, 0, 0),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_record_answered_504_that_fails_during_the_flush_counts_as_failed() {
    // It expires 3 s after it was queued, well inside the flush's 8 s.
    let toml = "[kafka]\nmessage_timeout = \"3s\"\n\
                [server]\nsync_timeout = \"1s\"\nshutdown_timeout = \"8s\"";
    let report = shutdown_after_a_504("gone-fails", toml).await;
    assert_eq!((report.undelivered, report.failed), (0, 1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_request_still_waiting_after_the_flush_is_answered_not_cut_off() {
    let (cluster, topic) = cluster_with_topic("past-flush", 1);
    // The record outlives both the drain and the flush (1 s each): its request is still
    // waiting when they are over.
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n[kafka]\nmessage_timeout = \"30s\"\n\
         [server]\nsync_timeout = \"30s\"\nshutdown_timeout = \"1s\""
    );
    let gw = common::gateway(&cluster.bootstrap_servers(), &toml).await;
    cluster.broker_down(ALL_BROKERS).expect("brokers down");
    let sync = {
        let url = format!("{}/sync/{topic}", gw.url);
        tokio::spawn(async move { common::client().post(url).body("{}").send().await })
    };
    wait_accepted(&gw, &topic, 1.0, || {}).await;
    let stopping = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(10), gw.stop())
        .await
        .expect("gateway stops");
    let sync = sync
        .await
        .expect("task")
        .expect("an answer, not a closed connection");
    // Within the last second for answers: a process exits then, and a later answer (at the
    // sync producer's own timeout, 28 s) would never be written.
    let answered = stopping.elapsed();
    assert!(
        answered < Duration::from_secs(15),
        "answered after {answered:?}"
    );
    let sync = Reply::read(sync).await;
    // Never sent: given up at the flush deadline, so the client can send it again safely.
    assert_unavailable(&sync, "never sent, given up at the flush deadline");
    // Told so: not a record lost after a 2xx.
    assert_eq!(report.undelivered, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_headers_take_queue_room_for_every_record_they_go_with() {
    let (cluster, topic) = cluster_with_topic("header-room", 1);
    let bootstrap = cluster.bootstrap_servers();
    let gw = common::gateway(
        &bootstrap,
        "[kafka]\nqueue_max_bytes = 1048576\n[server]\nshutdown_timeout = \"1s\"",
    )
    .await;
    let big = "h".repeat(16 << 10);
    let post = |records: usize| {
        common::client()
            .post(format!("{}/batch/async/{topic}", gw.url))
            .header("content-type", "application/x-ndjson")
            .header("x-kafka-header-big", big.as_str())
            .body("1\n".repeat(records))
            .send()
    };
    // 100 records of 1 byte, each with 16 KiB of headers, take 1.6 MB of a 1 MiB queue.
    let reply = Reply::read(post(100).await.expect("request")).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    // 40 of them fit: written with their headers.
    let reply = Reply::read(post(40).await.expect("request")).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let got = common::read_all(&bootstrap, &topic, 40).await;
    assert_eq!(got.len(), 40, "the refused request wrote nothing");
    assert!(
        got.iter().all(|r| r.value == b"1"
            && r.headers == [("big".to_string(), Some(big.clone().into_bytes()))])
    );
    // Empty headers take room too, for what librdkafka holds for each: 2000 records of 1 byte
    // with ten of them are 42 KB counted by their names alone, 1.6 MB in memory.
    let mut empties = common::client()
        .post(format!("{}/batch/async/{topic}", gw.url))
        .header("content-type", "application/x-ndjson");
    for i in 0..10 {
        empties = empties.header(format!("x-kafka-header-e{i}"), "");
    }
    let reply = Reply::read(
        empties
            .body("1\n".repeat(2000))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    // And the delivery reports give all their room back.
    let deadline = Instant::now() + PROMPT;
    loop {
        let ready = get(&gw, "/ready").await;
        if ready.status == 200 && ready.json()["headroom"] == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "room not given back: {ready:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(gw).await;
}

/// A record in flight at the flush's deadline whose ack comes in the second after it is
/// delivered, and not counted undelivered: the exit's `undelivered=N` is what was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_just_after_the_flush_deadline_is_delivered_not_undelivered() {
    let (cluster, topic) = cluster_with_topic("late-ack", 1);
    let bootstrap = cluster.bootstrap_servers();
    let toml = "[kafka]\nlinger = \"0ms\"\n[server]\nshutdown_timeout = \"1s\"";
    let (gw, _producers) = with_producers(&bootstrap, toml).await;
    let path = format!("/async/{topic}");
    // The async producer connected.
    let (reply, _) = timed_post(&gw, &path, None, r#"{"first":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    read_back(&bootstrap, &topic, 1, Duration::from_secs(10)).await;
    // Its ack comes half a second after the flush's deadline (1 s from the stop, which follows
    // the 202 at once), inside the second after it that still counts acks.
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_millis(1500))
        .expect("slow broker");
    let (reply, _) = timed_post(&gw, &path, None, r#"{"late":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let stopping = Instant::now();
    let report = gw.stop().await;
    // A flush that had every ack would have returned before its deadline: then this run would
    // not have tested the second after it.
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "the ack came before the deadline: {took:?}"
    );
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::ZERO)
        .expect("fast broker");
    let values = common::values(&read_back(&bootstrap, &topic, 2, Duration::from_secs(10)).await);
    assert_eq!(values, [r#"{"first":1}"#, r#"{"late":1}"#]);
    assert_eq!(report.undelivered, 0, "written, yet counted undelivered");
    assert_eq!(report.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_replaced_after_a_fatal_error_is_flushed_and_counted_at_shutdown() {
    let (cluster, topic) = cluster_with_topic("retiring", 1);
    let bootstrap = cluster.bootstrap_servers();
    // No linger: the record the fatal error finds is in flight, not waiting to be sent.
    let toml = "[kafka]\nmessage_timeout = \"60s\"\nlinger = \"0ms\"\n\
                [server]\nsync_timeout = \"300ms\"\nshutdown_timeout = \"1s\"";
    let (gw, producers) = with_producers(&bootstrap, toml).await;
    let path = format!("/sync/{topic}");
    // The sync producer connected and holding its producer id (the first records may take
    // longer than the short sync timeout).
    let deadline = Instant::now() + Duration::from_secs(10);
    while timed_post(&gw, &path, None, r#"{"first":1}"#, PROMPT)
        .await
        .0
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "no 200 from the sync producer");
    }
    // The async producer connected too.
    let async_path = format!("/async/{topic}");
    let (reply, _) = timed_post(&gw, &async_path, None, r#"{"first":2}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    read_back(&bootstrap, &topic, 2, Duration::from_secs(10)).await;
    // A record in flight for a long while (its client had its 202), in the producer a fatal
    // error then retires.
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_secs(30))
        .expect("slow broker");
    let (reply, _) = timed_post(&gw, &async_path, None, r#"{"slow":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    // The producer the fatal error hits; a weak reference, so as not to hold it alive.
    let mode = kafboy::config::Mode::Async;
    let hit = Arc::downgrade(&producers.for_mode(mode, &topic));
    producers.inject_fatal_error(mode);
    // First the fatal error is seen (/ready says 503 for as long as that producer is in
    // place, which may be too short to catch), then the producer is replaced and /ready is
    // 200 again: it was 200 before the error, so only this order shows the replacement.
    let deadline = Instant::now() + PROMPT;
    let mut seen_503 = false;
    loop {
        let current = producers.for_mode(mode, &topic);
        if !std::ptr::eq(Arc::as_ptr(&current), hit.as_ptr()) {
            break;
        }
        drop(current);
        seen_503 |= get(&gw, "/ready").await.status == 503;
        assert!(Instant::now() < deadline, "the producer was not replaced");
    }
    let retired = hit
        .upgrade()
        .expect("the retired producer is still flushing");
    assert!(retired.is_fatal(), "replaced without a fatal error");
    drop(retired);
    eprintln!("/ready seen 503 before the replacement: {seen_503}");
    let deadline = Instant::now() + PROMPT;
    while get(&gw, "/ready").await.status != 200 {
        assert!(Instant::now() < deadline, "not ready after the replacement");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stop gives up on the retired producer's record at shutdown_timeout (1 s) instead
    // of waiting for its ack (30 s away, and then it would not count as undelivered) or its
    // message timeout (60 s).
    let started = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(30), gw.stop())
        .await
        .expect("the stop waited out the message timeout");
    eprintln!("the stop took {:?}", started.elapsed());
    assert_eq!(report.undelivered, 1, "the retired producer's record");
    assert_eq!(report.maybe_written, 1, "in flight at the exit");
}

/// A topic of two partitions, partition 0 led by broker 1 and partition 1 by broker 2, and
/// kafboy in front of it with a handle on its producers.
async fn two_leaders(prefix: &str) -> (Cluster, String, Gateway, Arc<kafboy::kafka::Producers>) {
    two_leaders_timing(prefix, "20s").await
}

/// [`two_leaders`], with records that time out after `message_timeout`.
async fn two_leaders_timing(
    prefix: &str,
    message_timeout: &str,
) -> (Cluster, String, Gateway, Arc<kafboy::kafka::Producers>) {
    let (cluster, topic) = common::mock_topic(2, prefix, 2);
    for partition in [0, 1] {
        let leader = Some(partition + 1);
        cluster
            .partition_leader(&topic, partition, leader)
            .expect("leader");
    }
    let toml = format!(
        "[kafka]\nmessage_timeout = \"{message_timeout}\"\n[server]\nshutdown_timeout = \"1s\""
    );
    let (gw, producers) = with_producers(&cluster.bootstrap_servers(), &toml).await;
    (cluster, topic, gw, producers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_the_brokers_fenced_sends_what_it_holds_then_is_replaced() {
    let (cluster, topic, gw, producers) = two_leaders("fenced").await;
    let bootstrap = cluster.bootstrap_servers();
    let mode = kafboy::config::Mode::Sync;
    let to = |partition: i32| format!("/sync/{topic}?partition={partition}");
    for partition in [0, 1] {
        let (reply, _) = timed_post(&gw, &to(partition), None, r#"{"first":1}"#, PROMPT).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let fenced = producers.for_mode(mode, &topic);
    // A record the producer holds while the fence comes: its partition's leader is down.
    cluster.broker_down(2).expect("broker down");
    let held = {
        let request = common::client()
            .post(format!("{}{}", gw.url, to(1)))
            .body(r#"{"held":1}"#)
            .send();
        tokio::spawn(async move { Reply::read(request.await.expect("request")).await })
    };
    let deadline = Instant::now() + PROMPT;
    while fenced.in_flight() == 0 {
        assert!(Instant::now() < deadline, "the held record was not queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // What a broker answers a producer whose epoch it no longer takes (tansu, once
    // librdkafka raised the epoch itself after records timed out).
    let error = RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED;
    cluster.request_errors(RDKafkaApiKey::Produce, &[error]);
    let (reply, _) = timed_post(&gw, &to(0), None, r#"{"fenced":1}"#, PROMPT).await;
    assert_unavailable(&reply, "a fenced record was refused: not written");
    // The fenced producer takes no more records, and is not ready, while it still holds one.
    let (reply, _) = timed_post(&gw, &to(0), None, r#"{"refused":1}"#, PROMPT).await;
    assert_unavailable(&reply, "a fenced producer takes no new record");
    assert_eq!(get(&gw, "/ready").await.status, 503);
    assert!(Arc::ptr_eq(&producers.for_mode(mode, &topic), &fenced));
    // Kafka takes the epoch librdkafka raised (the mock does not check epochs of producers
    // without transactions): the record the fenced producer held is sent once its leader is
    // back, not purged.
    cluster.broker_up(2).expect("broker up");
    let held = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the held record answered")
        .expect("held request");
    assert_eq!(held.status, 200, "{held:?}");
    // Then it is replaced, and the next record goes through its replacement.
    let deadline = Instant::now() + PROMPT;
    while Arc::ptr_eq(&producers.for_mode(mode, &topic), &fenced) {
        assert!(Instant::now() < deadline, "the fenced producer was kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(fenced);
    let (reply, _) = timed_post(&gw, &to(0), None, r#"{"after":1}"#, PROMPT).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = read_back(&bootstrap, &topic, 5, Duration::from_secs(10)).await;
    let mut got = values(&got);
    got.sort();
    let want = [
        r#"{"after":1}"#,
        r#"{"first":1}"#,
        r#"{"first":1}"#,
        r#"{"held":1}"#,
    ];
    assert_eq!(
        got, want,
        "the fenced record is not written, the others are"
    );
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_records_refused_to_a_fenced_producer_are_sent_again_by_its_replacement() {
    let (cluster, topic, gw, producers) = two_leaders("rescued").await;
    let bootstrap = cluster.bootstrap_servers();
    let mode = kafboy::config::Mode::Async;
    let to = |partition: i32| format!("/async/{topic}?partition={partition}");
    for partition in [0, 1] {
        let (reply, _) = timed_post(&gw, &to(partition), None, r#"{"first":1}"#, PROMPT).await;
        assert_eq!(reply.status, 202, "{reply:?}");
    }
    read_back(&bootstrap, &topic, 2, Duration::from_secs(10)).await;
    let fenced = producers.for_mode(mode, &topic);
    // One record held (its partition's leader down), one sent; the brokers refuse both as
    // fenced (tansu, once librdkafka raised the epoch itself after records timed out).
    cluster.broker_down(2).expect("broker down");
    let (reply, _) = timed_post(&gw, &to(1), None, r#"{"held":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let error = RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED;
    cluster.request_errors(RDKafkaApiKey::Produce, &[error, error]);
    let (reply, _) = timed_post(&gw, &to(0), None, r#"{"sent":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let deadline = Instant::now() + PROMPT;
    while !fenced.is_fatal() {
        assert!(Instant::now() < deadline, "the fence was not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (reply, _) = timed_post(&gw, &to(0), None, r#"{"refused":1}"#, PROMPT).await;
    assert_unavailable(&reply, "a fenced producer takes no new record");
    let refused_by = now_ms();
    cluster.broker_up(2).expect("broker up");
    // Both refused records come back and go out again through the replacement: every 202
    // is at the broker, and nothing counts as failed.
    let got = common::read_all(&bootstrap, &topic, 4).await;
    // Sent again, they keep the time they were first given, not the time of the resend.
    for record in got.iter().filter(|r| r.value != br#"{"first":1}"#) {
        let time = record.timestamp.expect("a timestamp");
        assert!(time < refused_by, "{record:?} stamped at its resend");
    }
    let mut got = values(&got);
    got.sort();
    let want = [
        r#"{"first":1}"#,
        r#"{"first":1}"#,
        r#"{"held":1}"#,
        r#"{"sent":1}"#,
    ];
    assert_eq!(got, want, "every 202 written once");
    assert!(!Arc::ptr_eq(&producers.for_mode(mode, &topic), &fenced));
    assert_eq!(producers.tally().1, 0, "none failed");
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_fenced_again_and_again_fails_once_older_than_the_message_timeout() {
    let (cluster, topic, gw, producers) = two_leaders_timing("refenced", "2s").await;
    let bootstrap = cluster.bootstrap_servers();
    let to = format!("/async/{topic}?partition=0");
    let (reply, _) = timed_post(&gw, &to, None, r#"{"first":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    read_back(&bootstrap, &topic, 1, Duration::from_secs(10)).await;
    // The record and both of its resends are refused as fenced. Replacements that keep
    // failing wait 1 s, then 2 s: the third resend would come 3 s after the record was first
    // handed over, past its 2 s.
    let error = RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED;
    cluster.request_errors(RDKafkaApiKey::Produce, &[error; 3]);
    let (reply, _) = timed_post(&gw, &to, None, r#"{"fenced":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while producers.tally().1 == 0 {
        assert!(
            Instant::now() < deadline,
            "the record kept going round; at the broker: {:?}",
            values(&read_back(&bootstrap, &topic, 2, Duration::ZERO).await)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Failed, not written; and the producer now in place writes what comes next.
    let (reply, _) = timed_post(&gw, &to, None, r#"{"next":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    read_back(&bootstrap, &topic, 2, Duration::from_secs(10)).await;
    let want = [r#"{"first":1}"#, r#"{"next":1}"#];
    assert_holds(
        &bootstrap,
        &topic,
        &want,
        "the expired record is not written",
    )
    .await;
    assert_eq!(
        producers.tally().1,
        1,
        "the expired record counted failed once"
    );
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_kept_from_a_fenced_producer_at_shutdown_count_as_undelivered() {
    let (cluster, topic, gw, producers) = two_leaders("kept").await;
    let bootstrap = cluster.bootstrap_servers();
    let to = |partition: i32| format!("/async/{topic}?partition={partition}");
    for partition in [0, 1] {
        let (reply, _) = timed_post(&gw, &to(partition), None, r#"{"first":1}"#, PROMPT).await;
        assert_eq!(reply.status, 202, "{reply:?}");
    }
    read_back(&bootstrap, &topic, 2, Duration::from_secs(10)).await;
    let fenced = producers.for_mode(kafboy::config::Mode::Async, &topic);
    // One record held for good (its leader down), so the fenced producer is never empty and
    // never replaced; one refused as fenced, and kept.
    cluster.broker_down(2).expect("broker down");
    let (reply, _) = timed_post(&gw, &to(1), None, r#"{"held":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let error = RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED;
    cluster.request_errors(RDKafkaApiKey::Produce, &[error]);
    let (reply, _) = timed_post(&gw, &to(0), None, r#"{"kept":1}"#, PROMPT).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let deadline = Instant::now() + PROMPT;
    while !fenced.is_fatal() {
        assert!(Instant::now() < deadline, "the fence was not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(fenced);
    // Both had a 202 and neither is written: the held one and the kept one.
    let report = tokio::time::timeout(Duration::from_secs(10), gw.stop())
        .await
        .expect("gateway stops");
    assert_eq!(report.undelivered, 2, "{report:?}");
    assert_eq!(
        report.maybe_written, 0,
        "refused, or never sent: {report:?}"
    );
}

/// Room a delivery report gives back is taken at once by requests waiting for it, while
/// librdkafka still counts the reported records until it has handed over their whole batch of
/// reports. Its own limits leave room for that: its QueueFull never refuses a request kafboy's
/// accounting let in (a `503` "refused", or a `504` for a request queued in part).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_room_are_queued_whole_as_reports_come_back() {
    let (cluster, topic) = cluster_with_topic("refill", 4);
    let toml = format!(
        "[topics]\nallow = [\"{topic}\"]\n[kafka]\nqueue_max_messages = 20000\n\
         [server]\nenqueue_timeout = \"60s\"\nshutdown_timeout = \"5s\""
    );
    let gw = common::gateway(&cluster.bootstrap_servers(), &toml).await;
    warm_up(&gw, &cluster.bootstrap_servers(), &topic).await;
    // Acknowledgements come back in bursts of many records.
    cluster
        .broker_round_trip_time(ALL_BROKERS, Duration::from_millis(200))
        .expect("rtt");
    let body: String = (0..2000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    let url = format!("{}/async/{topic}", gw.url);
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                let r = common::client()
                    .post(url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .expect("answered");
                Reply::read(r).await
            })
        })
        .collect();
    for request in requests {
        let reply = request.await.expect("request task");
        assert_eq!(reply.status, 202, "{reply:?}");
    }
    stop(gw).await;
}
