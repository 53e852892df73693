//! Jepsen-style fault suite on librdkafka's in-process mock cluster (3 brokers, one 6-partition
//! topic with replication factor 3 per scenario).
//!
//! Concurrent clients send uniquely numbered records (`{"id":"s3-17","k":"s3","seq":17}`, also in
//! `X-Request-Id`), each client on its own key and one request at a time, while a fault is
//! injected and healed. Every request is recorded as ok (2xx), fail (4xx, 503, never sent) or
//! unknown (504, timeout, broken connection). Afterwards the topic is read back to its end and
//! checked: no acknowledged record lost, no failed record written, no acknowledged record twice,
//! same-key order kept, every request answered by its deadline, and recovery after the heal.
//!
//! `cargo test --test faults -- --nocapture` prints one result line and one markdown row per
//! scenario. `KAFBOY_FAULTS=long` (see `scripts/faults`) runs more clients for longer, with
//! longer faults. Scenarios run one at a time even when the harness runs tests in parallel.

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod check;
mod harness;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafboy::kafka::Producers;
use kafboy::{App, Config};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use check::{Verdict, read_back, show};
use harness::{
    ALL_BROKERS, Class, Clients, Cluster, Load, Mode, Outcome, PARTITIONS, SERIAL, cluster, hold,
    leader_of, pick, poll_until, stop, warm_up,
};

/// `server.sync_timeout` of the scenarios: the longest a sync request may wait for its ack.
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// Every request must be answered by then: `sync_timeout` and room for a busy machine (a
/// request that hangs is never answered).
const DEADLINE: Duration = Duration::from_secs(20);
/// The scenarios' `message_timeout` (s5 and s8 set their own).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Every client must have a 2xx this soon after a fault heals: before the message timeout, so
/// a gateway that only recovers once the records held during the fault expire (or never) fails.
const RECOVERY: Duration = MESSAGE_TIMEOUT;
/// How long to wait for a state before giving up (generous: the machine is shared).
const PATIENCE: Duration = Duration::from_secs(30);

/// The configuration of the fault scenarios: `kafka` and `server` lines, over these defaults:
/// `message_timeout` 10 s, `sync_timeout` 15 s, `shutdown_timeout` 10 s.
fn toml(kafka: &str, server: &str) -> String {
    let default = |lines: &str, key: &str, value: &str| match lines.contains(key) {
        true => String::new(),
        false => format!("{key} = \"{value}\"\n"),
    };
    let options: String = extra_options()
        .iter()
        .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
        .collect();
    format!(
        "[server]\n{}{}{server}\n[kafka]\n{}{kafka}\n[kafka.options]\n{options}",
        default(server, "sync_timeout", "15s"),
        default(server, "shutdown_timeout", "10s"),
        default(kafka, "message_timeout", "10s"),
    )
}

/// `KAFBOY_FAULTS_OPTIONS="key=value,key=value"`: librdkafka properties added to every
/// scenario's `[kafka.options]` (the binary's config file too), to try a setting against the
/// whole suite without editing it. Unset in CI: the suite checks kafboy's defaults.
fn extra_options() -> Vec<(String, String)> {
    std::env::var("KAFBOY_FAULTS_OPTIONS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Builds the app ourselves, so the test keeps a handle on its producers.
async fn gateway_with_producers(bootstrap: &str, toml: &str) -> (common::Gateway, Arc<Producers>) {
    let mut config = Config::from_toml(toml).expect("test config");
    config.kafka.brokers = vec![bootstrap.to_string()];
    let app = App::build(&config).expect("build app");
    let producers = app.producers().clone();
    (common::serve(app).await, producers)
}

/// Delivered and failed records over every producer, replaced ones included.
fn tally(producers: &Producers) -> (u64, u64) {
    producers.tally()
}

/// Records queued or in flight over every producer.
fn in_flight(producers: &Producers) -> usize {
    producers.all().into_iter().map(|p| p.in_flight()).sum()
}

/// Filler per record: bodies of about 250 bytes (long: 150).
fn pad() -> usize {
    pick(200, 100)
}

// The mock keeps at most 5 MiB per partition (`rd_kafka_mock_partition_init`) and drops the
// oldest records beyond that; the paces and sizes below keep every scenario well under it
// (about 60k records at most), and `read_all` fails if anything was dropped anyway.

/// Sync clients, one key each: at most 800 (long: 1600) requests per second.
fn sync_load() -> Load {
    Load {
        sync_clients: pick(16, 64),
        async_clients: 0,
        pace: pick(Duration::from_millis(20), Duration::from_millis(40)),
        timeout: SYNC_TIMEOUT + Duration::from_secs(2),
        pad: pad(),
        prefix: "",
    }
}

/// Async clients, one key each: at most 1600 requests per second.
fn async_load(prefix: &'static str) -> Load {
    Load {
        sync_clients: 0,
        async_clients: pick(16, 64),
        pace: pick(Duration::from_millis(10), Duration::from_millis(40)),
        timeout: SYNC_TIMEOUT + Duration::from_secs(2),
        pad: pad(),
        prefix,
    }
}

/// Load before the fault.
fn calm() -> Duration {
    pick(Duration::from_millis(1500), Duration::from_secs(10))
}

/// Load after every client recovered.
fn after() -> Duration {
    pick(Duration::from_secs(2), Duration::from_secs(10))
}

/// A scenario with a gateway, a warm producer and clients running.
struct Run {
    cluster: Cluster,
    topic: String,
    gw: common::Gateway,
    clients: Clients,
    t0: Instant,
}

/// Cluster, gateway, warm-up, then `load` for [`calm`].
async fn begin(prefix: &str, config: &str, load: &Load) -> Run {
    let (cluster, topic) = cluster(prefix);
    let gw = common::gateway(&cluster.bootstrap_servers(), config).await;
    warm_up(&gw.url, &topic).await;
    let t0 = Instant::now();
    let clients = Clients::start(&gw.url, &topic, load, t0);
    hold(calm()).await;
    Run {
        cluster,
        topic,
        gw,
        clients,
        t0,
    }
}

/// After the heal: waits until every client has a 2xx again (or [`PATIENCE`] passes), keeps the
/// load on for [`after`], stops the clients, stops the gateway (which flushes), reads the topic
/// back and checks it. `cuts` are when the mock cut broker connections. Returns the verdict and
/// the shutdown report's undelivered count.
async fn end(
    run: Run,
    heal: Instant,
    cuts: &[(Instant, Instant)],
    scenario: &str,
    extra: &str,
) -> (Verdict, usize) {
    poll_until(PATIENCE, || run.clients.all_ok_since(heal)).await;
    hold(after()).await;
    let ops = run.clients.finish().await;
    let report = stop(run.gw, PATIENCE).await;
    let (recs, _) = read_back(&run.cluster.bootstrap_servers(), &run.topic).await;
    let cuts: Vec<_> = cuts
        .iter()
        .map(|(from, to)| (*from - run.t0, *to - run.t0))
        .collect();
    let v = check::check(&ops, &recs, Some(heal - run.t0), &cuts);
    v.print(
        scenario,
        &format!("{extra}; undelivered at shutdown {}", report.undelivered),
    );
    (v, report.undelivered)
}

/// What every sync fault scenario must show.
fn assert_sync_scenario(v: &Verdict, undelivered: usize, scenario: &str) {
    v.assert_safe(scenario, DEADLINE);
    v.assert_recovered(scenario, RECOVERY);
    assert_eq!(undelivered, 0, "{scenario}: undelivered at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_all_brokers_down() {
    let _serial = SERIAL.lock().await;
    let scenario = "1 all brokers down (sync)";
    let outage = pick(Duration::from_secs(3), Duration::from_secs(12));
    let run = begin("s1-down", &toml("", ""), &sync_load()).await;
    let cut = Instant::now();
    run.cluster.broker_down(ALL_BROKERS).unwrap();
    let cut = (cut, Instant::now());
    hold(outage).await;
    run.cluster.broker_up(ALL_BROKERS).unwrap();
    let heal = Instant::now();
    let extra = format!("outage {}, message_timeout 10 s", show(outage));
    let (v, undelivered) = end(run, heal, &[cut], scenario, &extra).await;
    assert_sync_scenario(&v, undelivered, scenario);
    if outage < Duration::from_secs(10) {
        // Shorter than message_timeout: every record waits for the brokers and is written.
        assert_eq!(v.ok, v.requests, "{scenario}: {:?}", v.codes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_leader_moved_while_old_leader_down() {
    let _serial = SERIAL.lock().await;
    let scenario = "2 leader moved, old leader down (sync)";
    let outage = pick(Duration::from_secs(3), Duration::from_secs(10));
    let run = begin("s2-leader", &toml("", ""), &sync_load()).await;
    // Broker 1 leads partitions 0 and 3; it goes down and the others take over its partitions.
    let old = 1;
    let cut = Instant::now();
    run.cluster.broker_down(old).unwrap();
    let cut = (cut, Instant::now());
    let moved: Vec<i32> = (0..PARTITIONS).filter(|p| leader_of(*p) == old).collect();
    for (i, p) in moved.iter().enumerate() {
        let new = 2 + (i as i32 % 2);
        run.cluster
            .partition_leader(&run.topic, *p, Some(new))
            .unwrap();
    }
    hold(outage).await;
    run.cluster.broker_up(old).unwrap();
    let heal = Instant::now();
    let extra = format!(
        "broker {old} down {}, partitions {moved:?} moved to brokers 2/3",
        show(outage)
    );
    let (v, undelivered) = end(run, heal, &[cut], scenario, &extra).await;
    assert_sync_scenario(&v, undelivered, scenario);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_retriable_produce_errors() {
    let _serial = SERIAL.lock().await;
    let scenario = "3 retriable produce errors (sync)";
    let window = pick(Duration::from_secs(3), Duration::from_secs(10));
    let run = begin("s3-errors", &toml("", ""), &sync_load()).await;
    use RDKafkaRespErr as E;
    // 10 × NOT_ENOUGH_REPLICAS, 5 × REQUEST_TIMED_OUT, 10 × dropped connection, interleaved;
    // one error per Produce request, pushed again every 500 ms while the fault lasts.
    let mut errors = Vec::new();
    for i in 0..10 {
        errors.push(E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS);
        errors.push(E::RD_KAFKA_RESP_ERR__TRANSPORT);
        if i % 2 == 0 {
            errors.push(E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT);
        }
    }
    let from = Instant::now();
    let until = from + window;
    let mut rounds = 0;
    while Instant::now() < until {
        run.cluster.request_errors(RDKafkaApiKey::Produce, &errors);
        rounds += 1;
        hold(Duration::from_millis(500)).await;
    }
    run.cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let heal = Instant::now();
    let extra = format!(
        "{rounds} rounds of 10 NOT_ENOUGH_REPLICAS + 5 REQUEST_TIMED_OUT + 10 __TRANSPORT over {}",
        show(window)
    );
    // A dropped connection can cut any request in flight until the last error is used up.
    let (v, undelivered) = end(run, heal, &[(from, heal)], scenario, &extra).await;
    assert_sync_scenario(&v, undelivered, scenario);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_slow_broker() {
    let _serial = SERIAL.lock().await;
    let scenario = "4 round trip +2 s on one broker (sync)";
    let window = pick(Duration::from_secs(4), Duration::from_secs(10));
    let run = begin("s4-slow", &toml("", ""), &sync_load()).await;
    let slow = 2;
    run.cluster
        .broker_round_trip_time(slow, Duration::from_secs(2))
        .unwrap();
    hold(window).await;
    run.cluster
        .broker_round_trip_time(slow, Duration::ZERO)
        .unwrap();
    let heal = Instant::now();
    let extra = format!("broker {slow} +2 s for {}", show(window));
    let (v, undelivered) = end(run, heal, &[], scenario, &extra).await;
    assert_sync_scenario(&v, undelivered, scenario);
    // Slow is not failed: with sync_timeout 15 s every record is acknowledged.
    assert_eq!(v.ok, v.requests, "{scenario}: {:?}", v.codes);
}

/// Resident memory of this process, for the report.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_queue_full_with_brokers_down() {
    let _serial = SERIAL.lock().await;
    let scenario = "5 queue full, brokers down (async)";
    let queue = pick(20, 200);
    let outage = pick(Duration::from_secs(3), Duration::from_secs(10));
    let enqueue_timeout = Duration::from_millis(100);
    let (cluster, topic) = cluster("s5-full");
    let config = toml(
        &format!("queue_max_messages = {queue}\nmessage_timeout = \"30s\""),
        "enqueue_timeout = \"100ms\"",
    );
    let (gw, producers) = gateway_with_producers(&cluster.bootstrap_servers(), &config).await;
    warm_up(&gw.url, &topic).await;
    let (d0, f0) = tally(&producers);
    let rss0 = rss_mib();

    cluster.broker_down(ALL_BROKERS).unwrap();
    let t0 = Instant::now();
    let load = Load {
        async_clients: pick(64, 256),
        pace: Duration::from_millis(20),
        ..async_load("")
    };
    let clients = Clients::start(&gw.url, &topic, &load, t0);
    hold(outage).await;
    let rss_peak = rss_mib();
    cluster.broker_up(ALL_BROKERS).unwrap();
    let heal = Instant::now();
    poll_until(PATIENCE, || clients.all_ok_since(heal)).await;
    hold(after()).await;
    let ops = clients.finish().await;
    let report = stop(gw, PATIENCE).await;
    let (d1, f1) = tally(&producers);
    let (delivered, failed) = (d1 - d0, f1 - f0);
    let (recs, _) = read_back(&cluster.bootstrap_servers(), &topic).await;
    // The brokers went down before the load began: no connection was cut under a request.
    let v = check::check(&ops, &recs, Some(heal - t0), &[]);

    let accepted = ops.iter().filter(|o| o.class() == Class::Ok).count() as u64;
    let refused: Vec<_> = ops
        .iter()
        .filter(|o| o.outcome.code() == Some(503))
        .collect();
    let mut refused_latency: Vec<Duration> = refused.iter().map(|o| o.latency()).collect();
    refused_latency.sort();
    let at = |q: usize| {
        let rank = (refused_latency.len() * q).div_ceil(100).max(1);
        refused_latency.get(rank - 1).copied().unwrap_or_default()
    };
    let (refused_p50, refused_p99) = (at(50), at(99));
    let refused_max = refused_latency.last().copied().unwrap_or_default();
    let consumed = recs.len() as u64;
    v.print(
        scenario,
        &format!(
            "queue {queue}, outage {}: {} refused 503 (p50 {}, p99 {}, max {}); accepted {accepted} = \
             delivered {delivered} + failed {failed}; consumed {consumed}; undelivered {}; \
             RSS {rss0:.0} → {rss_peak:.0} MiB",
            show(outage),
            refused.len(),
            show(refused_p50),
            show(refused_p99),
            show(refused_max),
            report.undelivered,
        ),
    );
    v.assert_safe(scenario, DEADLINE);
    v.assert_no_async_loss(scenario);
    v.assert_recovered(scenario, RECOVERY);
    assert!(!refused.is_empty(), "{scenario}: the queue never filled up");
    eprintln!(
        "{scenario}: 503 latency p50 {refused_p50:?} p99 {refused_p99:?} max {refused_max:?} \
         (enqueue_timeout {enqueue_timeout:?})"
    );
    assert!(
        refused.iter().all(|o| matches!(
            o.outcome,
            Outcome::Status {
                retry_after: true,
                ..
            }
        )),
        "{scenario}: a 503 without Retry-After"
    );
    assert!(
        refused_latency[0] >= enqueue_timeout,
        "{scenario}: refused before enqueue_timeout: {:?}",
        refused_latency[0]
    );
    // With the brokers down, room comes back only as queued records expire at the message
    // timeout (30 s): a refusal that waited for room, or for the brokers, would take about as
    // long as that. The latencies themselves are printed above, not checked.
    let message_timeout = Duration::from_secs(30);
    assert!(
        refused_max < message_timeout / 3,
        "{scenario}: a 503 took {refused_max:?}, as if it waited for room"
    );
    assert_eq!(report.undelivered, 0, "{scenario}: undelivered");
    assert_eq!(
        accepted,
        delivered + failed,
        "{scenario}: accepted records not all counted"
    );
    assert_eq!(failed, 0, "{scenario}: outage shorter than message_timeout");
    assert_eq!(consumed, accepted, "{scenario}: consumed vs accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_fatal_producer_error() {
    let _serial = SERIAL.lock().await;
    let scenario = "6 fatal idempotent-producer error (sync)";
    let (cluster, topic) = cluster("s6-fatal");
    let (gw, producers) = gateway_with_producers(&cluster.bootstrap_servers(), &toml("", "")).await;
    warm_up(&gw.url, &topic).await;
    let (d0, f0) = tally(&producers);
    let t0 = Instant::now();
    let clients = Clients::start(&gw.url, &topic, &sync_load(), t0);
    hold(calm()).await;

    let http = common::client();
    let ready = |http: reqwest::Client| {
        let url = format!("{}/ready", gw.url);
        async move {
            http.get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    // The producer the fatal error hits; a weak reference, so as not to hold it alive.
    let mode = kafboy::config::Mode::Sync;
    let hit = Arc::downgrade(&producers.for_mode(mode, ""));
    let injected = Instant::now();
    producers.inject_fatal_error(mode);
    // /ready is 503 while the failed producer is in place, which may be too short to catch
    // (the supervisor looks every 100 ms): the replacement itself is what is waited for, then
    // /ready 200 again.
    let mut went_down = None;
    let mut replaced = None;
    let deadline = injected + PATIENCE;
    while Instant::now() < deadline {
        if !std::ptr::eq(Arc::as_ptr(&producers.for_mode(mode, "")), hit.as_ptr()) {
            replaced = Some(Instant::now());
            break;
        }
        if went_down.is_none() && ready(http.clone()).await == 503 {
            went_down = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Only a failed producer is replaced; the old one may be gone already.
    if let Some(old) = hit.upgrade() {
        assert!(old.is_fatal(), "{scenario}: replaced without a fatal error");
    }
    let mut came_back = None;
    if let Some(replaced) = replaced {
        while Instant::now() < replaced + PATIENCE {
            if ready(http.clone()).await == 200 {
                came_back = Some(Instant::now());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    poll_until(PATIENCE, || clients.all_ok_since(injected)).await;
    hold(after()).await;
    let ops = clients.finish().await;
    let report = stop(gw, PATIENCE).await;
    let (d1, f1) = tally(&producers);
    let (recs, _) = read_back(&cluster.bootstrap_servers(), &topic).await;
    let v = check::check(&ops, &recs, Some(injected - t0), &[]);
    let since = |t: Option<Instant>| t.map_or("never".into(), |t| show(t - injected));
    v.print(
        scenario,
        &format!(
            "/ready 503 seen after {}, replaced after {}, 200 again after {}; delivered {} \
             failed {} (purged); undelivered {}",
            since(went_down),
            since(replaced),
            since(came_back),
            d1 - d0,
            f1 - f0,
            report.undelivered
        ),
    );
    v.assert_safe(scenario, DEADLINE);
    assert_eq!(
        v.unknown, 0,
        "{scenario}: a purged record is definitely not written: 503, not 504 ({:?})",
        v.codes
    );
    // Noticed by kafboy itself, not only once records time out (message_timeout), and
    // replaced before that.
    let replaced_after = replaced.map(|t| t - injected);
    assert!(
        replaced_after.is_some_and(|d| d < MESSAGE_TIMEOUT),
        "{scenario}: producer not replaced within {MESSAGE_TIMEOUT:?} of the fatal error \
         (after {replaced_after:?})"
    );
    let back = came_back.zip(replaced).map(|(up, replaced)| up - replaced);
    assert!(
        back.is_some_and(|d| d <= RECOVERY),
        "{scenario}: /ready not back to 200 within {RECOVERY:?} of the replacement (after \
         {back:?})"
    );
    v.assert_recovered(scenario, RECOVERY);
    assert_eq!(report.undelivered, 0, "{scenario}: undelivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_shutdown_under_load() {
    let _serial = SERIAL.lock().await;
    let scenario = "7 shutdown under load, brokers up (async)";
    let (cluster, topic) = cluster("s7-stop");
    // Records linger in the queue, so there is something to flush at shutdown.
    let config = toml("linger = \"200ms\"", "");
    let gw = common::gateway(&cluster.bootstrap_servers(), &config).await;
    warm_up(&gw.url, &topic).await;
    let t0 = Instant::now();
    let clients = Clients::start(&gw.url, &topic, &async_load(""), t0);
    hold(calm()).await;
    let stopping = Instant::now();
    let report = stop(gw, PATIENCE).await;
    let took = stopping.elapsed();
    let ops = clients.finish().await;
    let (recs, _) = read_back(&cluster.bootstrap_servers(), &topic).await;
    let v = check::check(&ops, &recs, None, &[]);
    let accepted = ops.iter().filter(|o| o.class() == Class::Ok).count();
    let late = ops
        .iter()
        .filter(|o| o.class() == Class::Ok && o.end > stopping - t0)
        .count();
    v.print(
        scenario,
        &format!(
            "linger 200 ms; stop took {}; accepted {accepted} ({late} answered after the stop \
             began); undelivered {}",
            show(took),
            report.undelivered
        ),
    );
    v.assert_safe(scenario, DEADLINE);
    v.assert_no_async_loss(scenario);
    assert_eq!(report.undelivered, 0, "{scenario}: undelivered");
    assert_eq!(recs.len(), accepted, "{scenario}: consumed vs accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_shutdown_with_brokers_down() {
    let _serial = SERIAL.lock().await;
    let scenario = "8 shutdown with brokers down (async)";
    let (cluster, topic) = cluster("s8-stop-down");
    let config = toml("message_timeout = \"60s\"", "shutdown_timeout = \"1s\"");
    let (gw, producers) = gateway_with_producers(&cluster.bootstrap_servers(), &config).await;
    warm_up(&gw.url, &topic).await;
    let t0 = Instant::now();

    // Phase A, brokers up: everything accepted is delivered before the outage begins, so what
    // the shutdown report calls undelivered can only be phase B.
    let a = Clients::start(&gw.url, &topic, &async_load("A"), t0);
    hold(calm()).await;
    let mut ops = a.finish().await;
    assert!(
        poll_until(PATIENCE, || in_flight(&producers) == 0).await,
        "{scenario}: phase A not delivered"
    );
    cluster.broker_down(ALL_BROKERS).unwrap();
    let b = Clients::start(&gw.url, &topic, &async_load("B"), t0);
    hold(pick(Duration::from_secs(1), Duration::from_secs(5))).await;
    let stopping = Instant::now();
    let report = stop(gw, PATIENCE).await;
    let took = stopping.elapsed();
    ops.extend(b.finish().await);
    let (delivered, failed) = tally(&producers);
    // What is left in librdkafka's queue goes with the producers; make sure they are gone
    // before the brokers return, as they would be with the process.
    assert!(
        poll_until(PATIENCE, || Arc::strong_count(&producers) == 1).await,
        "{scenario}: producers still referenced after shutdown"
    );
    tokio::task::spawn_blocking(move || drop(producers))
        .await
        .unwrap();
    cluster.broker_up(ALL_BROKERS).unwrap();
    let (recs, _) = read_back(&cluster.bootstrap_servers(), &topic).await;
    let v = check::check(&ops, &recs, None, &[]);
    let accepted = ops.iter().filter(|o| o.class() == Class::Ok).count();
    let warm = PARTITIONS as u64;
    v.print(
        scenario,
        &format!(
            "shutdown_timeout 1 s, stop took {}; accepted {accepted}, consumed {}, undelivered \
             {} (report); delivered {} + failed {} + undelivered = {} accepted + {warm} warm-up",
            show(took),
            recs.len(),
            report.undelivered,
            delivered,
            failed,
            accepted
        ),
    );
    v.assert_safe(scenario, DEADLINE);
    assert!(
        report.undelivered > 0,
        "{scenario}: nothing left undelivered"
    );
    assert_eq!(
        report.undelivered,
        accepted - recs.len(),
        "{scenario}: the report's undelivered vs accepted − consumed"
    );
    assert_eq!(
        v.lost_async.len(),
        report.undelivered,
        "{scenario}: lost 202s"
    );
    assert!(
        v.lost_async.iter().all(|id| id.starts_with("Ba")),
        "{scenario}: a record accepted with brokers up was lost"
    );
    assert_eq!(
        delivered + failed + report.undelivered as u64,
        accepted as u64 + warm,
        "{scenario}: accepted records not all counted"
    );
}

/// Kills the child on drop, if the test ends early.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9_sigkill_under_load() {
    let _serial = SERIAL.lock().await;
    let scenario = "9 SIGKILL under load (sync + async)";
    let (cluster, topic) = cluster("s9-kill");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let log = tempfile::NamedTempFile::new().unwrap();
    // The same settings as the in-process scenarios; async records linger 50 ms in the queue.
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(config.path(), toml("linger = \"50ms\"", "")).unwrap();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_kafboy"))
            .args([
                "--brokers",
                &cluster.bootstrap_servers(),
                "--listen",
                &listen,
            ])
            .env_remove("KAFBOY_CONFIG")
            .arg("--config")
            .arg(config.path())
            .env("KAFBOY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("spawn kafboy"),
    );
    let http = common::client();
    let mut ready = false;
    let deadline = Instant::now() + PATIENCE;
    while !ready && Instant::now() < deadline {
        ready = http
            .get(format!("{url}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "kafboy not ready; log in {}", log.path().display());
    warm_up(&url, &topic).await;
    let t0 = Instant::now();
    let load = Load {
        sync_clients: pick(8, 32),
        async_clients: pick(8, 32),
        ..sync_load()
    };
    let clients = Clients::start(&url, &topic, &load, t0);
    hold(pick(Duration::from_secs(3), Duration::from_secs(20))).await;
    let pid = child.0.id().to_string();
    let status = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(status.success(), "kill -9 {pid}");
    let killed = Instant::now() - t0;
    let ops = clients.finish().await;
    let exit = child.0.wait().unwrap();
    let (recs, _) = read_back(&cluster.bootstrap_servers(), &topic).await;
    let v = check::check(&ops, &recs, None, &[]);
    let accepted_async = ops
        .iter()
        .filter(|o| o.mode == Mode::Async && o.class() == Class::Ok)
        .count();
    let end_of = |id: &str| ops.iter().find(|o| o.id == id).map(|o| o.end);
    let oldest_lost = v
        .lost_async
        .iter()
        .filter_map(|id| end_of(id))
        .min()
        .map(|end| killed.saturating_sub(end));
    let cut = ops.iter().filter(|o| o.end >= killed).count();
    v.print(
        scenario,
        &format!(
            "killed after {} ({exit}); {cut} requests cut; async: {} of {accepted_async} \
             accepted lost, oldest accepted {} before the kill",
            show(killed),
            v.lost_async.len(),
            oldest_lost.map_or("-".into(), show),
        ),
    );
    v.assert_safe(scenario, DEADLINE);
    // Async loss is bounded by what was queued: a record accepted more than the message
    // timeout before the kill was delivered or failed by then, never lost with the process.
    assert!(
        oldest_lost.is_none_or(|age| age <= MESSAGE_TIMEOUT),
        "{scenario}: an async record accepted {oldest_lost:?} before the kill was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6b_fatal_producer_error_with_records_queued() {
    let _serial = SERIAL.lock().await;
    let scenario = "6b fatal error with records queued (sync)";
    let (cluster, topic) = cluster("s6b-fatal");
    let (gw, producers) = gateway_with_producers(&cluster.bootstrap_servers(), &toml("", "")).await;
    warm_up(&gw.url, &topic).await;
    let t0 = Instant::now();
    let clients = Clients::start(&gw.url, &topic, &sync_load(), t0);
    hold(calm()).await;
    // With the brokers down the requests' records wait in the queue, so the fatal error has
    // records to purge: those must be 503, and never written.
    cluster.broker_down(ALL_BROKERS).unwrap();
    let down = Instant::now();
    hold(Duration::from_millis(500)).await;
    let injected = Instant::now();
    producers.inject_fatal_error(kafboy::config::Mode::Sync);
    hold(Duration::from_millis(500)).await;
    cluster.broker_up(ALL_BROKERS).unwrap();
    poll_until(PATIENCE, || clients.all_ok_since(injected)).await;
    hold(after()).await;
    let ops = clients.finish().await;
    let report = stop(gw, PATIENCE).await;
    let (recs, _) = read_back(&cluster.bootstrap_servers(), &topic).await;
    let v = check::check(&ops, &recs, Some(injected - t0), &[]);
    v.print(scenario, &format!("undelivered {}", report.undelivered));
    // Safe: no 2xx lost, and no 503'd record written (a request sent just before the brokers
    // went down may be 504, which is what it is: maybe written).
    v.assert_safe(scenario, DEADLINE);
    // The sync requests open at the injection: a request started once the brokers were down
    // has its record in the queue, never sent, and the fatal error purges it: 503 with
    // Retry-After, where without the fatal error it would have been a 200 once the brokers
    // returned. One started before may also have had its record in a produce request that
    // the outage cut: 504.
    let (down, injected) = (down - t0, injected - t0);
    let open: Vec<_> = ops
        .iter()
        .filter(|o| o.start < injected && o.end > injected)
        .collect();
    let queued: Vec<_> = ops
        .iter()
        .filter(|o| o.start >= down && o.start < injected)
        .collect();
    eprintln!(
        "{scenario}: {} sync requests open at the injection; {} started with the brokers down",
        open.len(),
        queued.len()
    );
    assert!(
        !queued.is_empty(),
        "{scenario}: no request was queued at the injection"
    );
    let not_purged: Vec<_> = queued
        .iter()
        .filter(|o| {
            o.end <= injected
                || o.outcome
                    != (Outcome::Status {
                        code: 503,
                        retry_after: true,
                    })
        })
        .collect();
    assert!(
        not_purged.is_empty(),
        "{scenario}: records queued at the fatal error not answered 503 after it: {not_purged:?}"
    );
    let other: Vec<_> = open
        .iter()
        .filter(|o| !matches!(o.outcome.code(), Some(503 | 504)))
        .collect();
    assert!(
        other.is_empty(),
        "{scenario}: requests open at the fatal error answered neither 503 nor 504: {other:?}"
    );
    v.assert_recovered(scenario, RECOVERY);
    assert_eq!(report.undelivered, 0, "{scenario}: undelivered");
}
