//! The workload side of the fault suite: a 3-broker mock cluster, concurrent HTTP clients that
//! each send one key's records in sequence, and the history of every request they made.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::task::JoinHandle;

use crate::common::{self, Gateway};

/// The librdkafka mock cluster the suite runs against.
pub type Cluster = MockCluster<'static, DefaultProducerContext>;

/// Brokers in the mock cluster (ids 1..=3) and the replication factor of the topic.
pub const BROKERS: i32 = 3;
/// Partitions of each scenario's topic.
pub const PARTITIONS: i32 = 6;
/// `broker_down`/`broker_up`/`broker_round_trip_time` apply to every broker with this id.
pub const ALL_BROKERS: i32 = -1;

/// Scenarios run one at a time, so one scenario's load does not show up in the next one's
/// latencies (the mock brokers, librdkafka and the clients share the same two cores).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `KAFBOY_FAULTS=long`: more clients, longer runs and faults (`scripts/faults`).
pub fn long() -> bool {
    std::env::var("KAFBOY_FAULTS").is_ok_and(|v| v == "long")
}

/// `short` in CI, `long` under `KAFBOY_FAULTS=long`.
pub fn pick<T>(short: T, long_run: T) -> T {
    if long() { long_run } else { short }
}

/// A 3-broker mock cluster with a fresh 6-partition topic of replication factor 3. Partition
/// `p` is led by broker `1 + p % 3`, so every broker leads two partitions.
pub fn cluster(prefix: &str) -> (Cluster, String) {
    let (cluster, topic) = crate::common::mock_topic(BROKERS, prefix, PARTITIONS);
    for p in 0..PARTITIONS {
        cluster
            .partition_leader(&topic, p, Some(leader_of(p)))
            .expect("partition leader");
    }
    (cluster, topic)
}

/// The broker that leads partition `p` when the scenario starts.
pub fn leader_of(p: i32) -> i32 {
    1 + p % BROKERS
}

/// Holds a fault (or a calm phase) for `d`. Never used to wait for a state.
pub async fn hold(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Polls `check` every 10 ms until it is true or `limit` passes; returns whether it became true.
pub async fn poll_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One sync record per partition, retried until each is acknowledged: the producer then has
/// its producer id and a connection to every leader, so the load starts on a warm producer.
/// Returns how many warm-up records were written.
pub async fn warm_up(url: &str, topic: &str) -> usize {
    let http = common::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in 0..PARTITIONS {
        loop {
            let reply = http
                .post(format!("{url}/sync/{topic}?partition={p}"))
                .header("content-type", "application/json")
                .body(format!(r#"{{"warm_up":{p}}}"#))
                .timeout(Duration::from_secs(20))
                .send()
                .await;
            if reply.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "warm-up of partition {p} failed for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    PARTITIONS as usize
}

/// The produce route a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/sync/{topic}`: 200 only after the broker's acknowledgement.
    Sync,
    /// `/async/{topic}`: 202 once queued.
    Async,
}

/// How a request ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer; `retry_after` tells whether it had a `Retry-After` header.
    Status { code: u16, retry_after: bool },
    /// No answer within the client's deadline.
    Timeout,
    /// The connection could not be opened: the request never left the client.
    Refused,
    /// The connection broke mid-request (reset, closed early).
    Broken,
}

/// Jepsen's classes: done, definitely not done, and unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Ok,
    /// 4xx, 503, or never sent: definitely not written.
    Fail,
    /// 504, any other 5xx, a client timeout or a broken connection: may have been written.
    Unknown,
}

impl Outcome {
    /// The class of this outcome.
    pub fn class(&self) -> Class {
        match self {
            Outcome::Status { code, .. } if (200..300).contains(code) => Class::Ok,
            Outcome::Status { code, .. } if (400..500).contains(code) || *code == 503 => {
                Class::Fail
            }
            Outcome::Status { .. } | Outcome::Timeout | Outcome::Broken => Class::Unknown,
            Outcome::Refused => Class::Fail,
        }
    }

    /// The HTTP status, if there was one.
    pub fn code(&self) -> Option<u16> {
        match self {
            Outcome::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One request of the history.
#[derive(Debug, Clone)]
pub struct Op {
    /// Unique id, in the body and in `X-Request-Id`.
    pub id: String,
    /// The client's key (one key per client).
    pub key: String,
    /// Position in the client's sequence.
    pub seq: u64,
    /// Route used.
    pub mode: Mode,
    /// When the request was started, since the scenario's start.
    pub start: Duration,
    /// When the answer (or error) was complete, since the scenario's start.
    pub end: Duration,
    /// What came back.
    pub outcome: Outcome,
}

impl Op {
    /// Time from start to answer.
    pub fn latency(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }

    /// The class of its outcome.
    pub fn class(&self) -> Class {
        self.outcome.class()
    }
}

/// The load of one scenario.
#[derive(Debug, Clone)]
pub struct Load {
    /// Clients on `/sync`.
    pub sync_clients: usize,
    /// Clients on `/async`.
    pub async_clients: usize,
    /// Each client starts a request at most this often.
    pub pace: Duration,
    /// The client's own deadline per request.
    pub timeout: Duration,
    /// Filler in each body, so records have a realistic size.
    pub pad: usize,
    /// Prefix of the client names (keeps ids unique when one scenario runs two loads).
    pub prefix: &'static str,
}

/// Clients running against a gateway until [`Clients::finish`].
pub struct Clients {
    stop: Arc<AtomicBool>,
    last_ok_start: Arc<Vec<AtomicU64>>,
    handles: Vec<JoinHandle<Vec<Op>>>,
    t0: Instant,
}

/// Never: the value of `last_ok_start` before a client's first 2xx.
const NEVER: u64 = u64::MAX;

impl Clients {
    /// Starts the clients of `load` against `url`; times in the history are relative to `t0`.
    pub fn start(url: &str, topic: &str, load: &Load, t0: Instant) -> Clients {
        let http = reqwest::Client::builder()
            .no_proxy()
            // Below the server's 10 s keep-alive limit, so a pooled connection is never reused
            // just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(3))
            .build()
            .expect("client");
        let stop = Arc::new(AtomicBool::new(false));
        let total = load.sync_clients + load.async_clients;
        let last_ok_start: Arc<Vec<AtomicU64>> =
            Arc::new((0..total).map(|_| AtomicU64::new(NEVER)).collect());
        let pad: String = "x".repeat(load.pad);
        let handles = (0..total)
            .map(|i| {
                let (mode, name) = if i < load.sync_clients {
                    (Mode::Sync, format!("{}s{i}", load.prefix))
                } else {
                    (Mode::Async, format!("{}a{i}", load.prefix))
                };
                let route = match mode {
                    Mode::Sync => "sync",
                    Mode::Async => "async",
                };
                let client = Client {
                    http: http.clone(),
                    // Half the clients give the key in the query string, half in a header.
                    url: if i % 2 == 0 {
                        format!("{url}/{route}/{topic}?key={name}")
                    } else {
                        format!("{url}/{route}/{topic}")
                    },
                    header_key: i % 2 == 1,
                    name,
                    mode,
                    pace: load.pace,
                    timeout: load.timeout,
                    pad: pad.clone(),
                    t0,
                    stop: stop.clone(),
                    last_ok_start: last_ok_start.clone(),
                    index: i,
                };
                tokio::spawn(client.run())
            })
            .collect();
        Clients {
            stop,
            last_ok_start,
            handles,
            t0,
        }
    }

    /// Whether every client has had a 2xx for a request started at or after `since`.
    pub fn all_ok_since(&self, since: Instant) -> bool {
        let since = nanos(since.saturating_duration_since(self.t0));
        self.last_ok_start.iter().all(|t| {
            let t = t.load(Ordering::Relaxed);
            t != NEVER && t >= since
        })
    }

    /// Tells the clients to stop after their current request and returns the whole history.
    pub async fn finish(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        let mut ops = Vec::new();
        for h in self.handles {
            ops.extend(h.await.expect("client task"));
        }
        ops
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1)
}

struct Client {
    http: reqwest::Client,
    url: String,
    header_key: bool,
    name: String,
    mode: Mode,
    pace: Duration,
    timeout: Duration,
    pad: String,
    t0: Instant,
    stop: Arc<AtomicBool>,
    last_ok_start: Arc<Vec<AtomicU64>>,
    index: usize,
}

impl Client {
    async fn run(self) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut seq = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let id = format!("{}-{seq}", self.name);
            let body = format!(
                r#"{{"id":"{id}","k":"{}","seq":{seq},"pad":"{}"}}"#,
                self.name, self.pad
            );
            let mut request = self
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header("x-request-id", &id)
                .timeout(self.timeout)
                .body(body);
            if self.header_key {
                request = request.header("x-kafka-key", &self.name);
            }
            let started = Instant::now();
            let outcome = match request.send().await {
                Ok(response) => {
                    let code = response.status().as_u16();
                    let retry_after = response.headers().contains_key("retry-after");
                    match response.bytes().await {
                        Ok(_) => Outcome::Status { code, retry_after },
                        Err(e) if e.is_timeout() => Outcome::Timeout,
                        Err(_) => Outcome::Broken,
                    }
                }
                Err(e) if e.is_timeout() => Outcome::Timeout,
                Err(e) if e.is_connect() => Outcome::Refused,
                Err(_) => Outcome::Broken,
            };
            let ended = Instant::now();
            let start = started.saturating_duration_since(self.t0);
            if outcome.class() == Class::Ok {
                self.last_ok_start[self.index].store(nanos(start), Ordering::Relaxed);
            }
            let refused = outcome == Outcome::Refused;
            ops.push(Op {
                id,
                key: self.name.clone(),
                seq,
                mode: self.mode,
                start,
                end: ended.saturating_duration_since(self.t0),
                outcome,
            });
            seq += 1;
            // A refused connection comes back at once; do not spin on a stopped server.
            let gap = if refused {
                self.pace.max(Duration::from_millis(50))
            } else {
                self.pace
            };
            let next = started + gap;
            if next > Instant::now() {
                tokio::time::sleep_until(next.into()).await;
            }
        }
        ops
    }
}

/// Stops `gw` (drain, then flush); the shutdown report comes back within `limit`.
pub async fn stop(gw: Gateway, limit: Duration) -> kafboy::ShutdownReport {
    tokio::time::timeout(limit, gw.stop())
        .await
        .unwrap_or_else(|_| panic!("gateway did not stop within {limit:?}"))
}
