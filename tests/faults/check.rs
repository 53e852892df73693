//! The checking side: read the topic back to its end and compare it with the history, the way
//! Jepsen's Kafka checker does (lost acknowledged writes, phantom failed writes, duplicates,
//! per-key reordering), plus latencies and recovery time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::harness::{Class, Mode, Op, PARTITIONS};

/// A record read back that came from a client (warm-up records are left out).
#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub id: String,
    pub key: String,
    pub seq: u64,
}

/// Reads `topic` from the beginning up to the end of every partition (its high watermark,
/// checked twice), failing the test if that takes longer than `limit`. Blocking.
pub fn read_all(bootstrap: &str, topic: &str, limit: Duration) -> (Vec<Rec>, usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("faults-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + limit;
    let ends = |consumer: &BaseConsumer| -> Vec<i64> {
        (0..PARTITIONS)
            .map(|p| {
                loop {
                    match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                        // The mock drops a partition's oldest records beyond 5 MiB: that would
                        // look like loss, so it fails the test instead.
                        Ok((low, high)) => {
                            assert_eq!(
                                low, 0,
                                "the mock cluster dropped the first {low} of {high} records of \
                                 partition {p} (it keeps 5 MiB per partition): the scenario \
                                 sent too much to be checked"
                            );
                            break high;
                        }
                        Err(e) => assert!(
                            Instant::now() < deadline,
                            "watermarks of partition {p}: {e}"
                        ),
                    }
                }
            })
            .collect()
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&tpl).expect("assign");
    let mut high = ends(&consumer);
    let mut next = vec![0i64; PARTITIONS as usize];
    let mut out = Vec::new();
    let mut other = 0;
    loop {
        if next.iter().zip(&high).all(|(n, h)| n >= h) {
            let again = ends(&consumer);
            if again == high {
                break;
            }
            high = again;
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} not read to its end within {limit:?}: at {next:?}, end {high:?}"
        );
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = msg.expect("consume");
        next[msg.partition() as usize] = msg.offset() + 1;
        let value: serde_json::Value =
            serde_json::from_slice(msg.payload().unwrap_or_default()).expect("JSON record");
        match (
            value["id"].as_str(),
            value["k"].as_str(),
            value["seq"].as_u64(),
        ) {
            (Some(id), Some(key), Some(seq)) => out.push(Rec {
                partition: msg.partition(),
                offset: msg.offset(),
                id: id.to_string(),
                key: key.to_string(),
                seq,
            }),
            _ => other += 1,
        }
    }
    (out, other)
}

/// [`read_all`] off the async workers.
pub async fn read_back(bootstrap: &str, topic: &str) -> (Vec<Rec>, usize) {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || read_all(&bootstrap, &topic, Duration::from_secs(60)))
        .await
        .expect("reader task")
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub requests: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    /// 2xx ids (sync: 200) never read back.
    pub lost_sync: Vec<String>,
    /// 202 ids never read back.
    pub lost_async: Vec<String>,
    /// Failed ids (4xx, 503, never sent) read back.
    pub phantom: Vec<String>,
    /// Extra copies of ids read back more than once.
    pub dup: usize,
    /// 2xx ids read back more than once that no connection cut explains: a violation.
    /// (`id partition@offset,offset`.)
    pub dup_ok: Vec<String>,
    /// 2xx ids read back more than once whose produce request was in flight when the mock cut
    /// the connection: the mock appends a retried batch again, where a real broker drops it as
    /// a duplicate sequence (it checks sequences of transactional producers only).
    pub dup_mock: Vec<String>,
    /// Extra copies among `dup_mock`.
    pub dup_mock_copies: usize,
    /// Unknown-outcome ids that were read back (informational).
    pub unknown_written: usize,
    /// Same-key 2xx records whose order in the partition contradicts the send order, and keys
    /// whose 2xx records landed in more than one partition.
    pub reorder: usize,
    /// Latency over every request.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// First 2xx of a request started after the heal, measured from the heal.
    pub recovery: Option<Duration>,
    /// Time after the heal until every client had such a 2xx.
    pub recovery_all: Option<Duration>,
    /// Records read that no request of the history sent as they are (beyond warm-up).
    pub foreign: usize,
    /// Status code counts, for the report.
    pub codes: BTreeMap<String, usize>,
}

/// Compares the history with what was read back. `heal` is the instant the fault ended,
/// relative to the scenario's start, if there was one; `cuts` are the intervals in which the
/// mock cut broker connections (see [`Verdict::dup_mock`]).
pub fn check(
    ops: &[Op],
    recs: &[Rec],
    heal: Option<Duration>,
    cuts: &[(Duration, Duration)],
) -> Verdict {
    let mut v = Verdict {
        requests: ops.len(),
        ..Verdict::default()
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in recs {
        *seen.entry(r.id.as_str()).or_default() += 1;
    }
    // Every record read back must be one a client sent, with the key and number it sent.
    let sent: HashMap<&str, (&str, u64)> = ops
        .iter()
        .map(|o| (o.id.as_str(), (o.key.as_str(), o.seq)))
        .collect();
    v.foreign = recs
        .iter()
        .filter(|r| sent.get(r.id.as_str()) != Some(&(r.key.as_str(), r.seq)))
        .count();
    v.dup = seen.values().map(|n| n - 1).sum();
    for op in ops {
        let copies = seen.get(op.id.as_str()).copied().unwrap_or(0);
        let code = match &op.outcome {
            crate::harness::Outcome::Status { code, .. } => code.to_string(),
            other => format!("{other:?}").to_lowercase(),
        };
        *v.codes.entry(code).or_default() += 1;
        match op.class() {
            Class::Ok => {
                v.ok += 1;
                if copies == 0 {
                    match op.mode {
                        Mode::Sync => v.lost_sync.push(op.id.clone()),
                        Mode::Async => v.lost_async.push(op.id.clone()),
                    }
                }
                if copies > 1 {
                    let places: Vec<String> = recs
                        .iter()
                        .filter(|r| r.id == op.id)
                        .map(|r| format!("{}@{}", r.partition, r.offset))
                        .collect();
                    let detail = format!("{} {}", op.id, places.join(","));
                    if cuts.iter().any(|cut| in_flight_during(op, *cut)) {
                        v.dup_mock.push(detail);
                        v.dup_mock_copies += copies - 1;
                    } else {
                        v.dup_ok.push(detail);
                    }
                }
            }
            Class::Fail => {
                v.fail += 1;
                if copies > 0 {
                    v.phantom.push(op.id.clone());
                }
            }
            Class::Unknown => {
                v.unknown += 1;
                if copies > 0 {
                    v.unknown_written += 1;
                }
            }
        }
    }
    v.reorder = reorder(ops, recs);
    let mut latencies: Vec<Duration> = ops.iter().map(Op::latency).collect();
    latencies.sort();
    v.p50 = quantile(&latencies, 0.50);
    v.p99 = quantile(&latencies, 0.99);
    v.max = latencies.last().copied().unwrap_or_default();
    if let Some(heal) = heal {
        (v.recovery, v.recovery_all) = recovery(ops, heal);
    }
    v
}

/// Whether the record of `op` can have been in a produce request on a connection cut during
/// `cut`: a sync request waits for its ack, so it was open across the cut; an async record was
/// accepted before the cut, recently enough to be still on its way.
fn in_flight_during(op: &Op, (from, to): (Duration, Duration)) -> bool {
    match op.mode {
        Mode::Sync => op.start <= to && op.end >= from,
        Mode::Async => op.end <= to && op.end + Duration::from_secs(5) >= from,
    }
}

/// Counts order violations among each key's acknowledged records: consecutive records (in
/// partition order) whose sequence numbers go down (duplicates are counted apart), plus keys
/// split over partitions.
fn reorder(ops: &[Op], recs: &[Rec]) -> usize {
    let ok: HashSet<&str> = ops
        .iter()
        .filter(|o| o.class() == Class::Ok)
        .map(|o| o.id.as_str())
        .collect();
    let mut by_key: HashMap<&str, Vec<&Rec>> = HashMap::new();
    for r in recs.iter().filter(|r| ok.contains(r.id.as_str())) {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let mut bad = 0;
    for records in by_key.values_mut() {
        records.sort_by_key(|r| (r.partition, r.offset));
        if records.windows(2).any(|w| w[0].partition != w[1].partition) {
            bad += 1;
        }
        bad += records
            .windows(2)
            .filter(|w| w[0].partition == w[1].partition && w[0].seq > w[1].seq)
            .count();
    }
    bad
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Time from `heal` to the first 2xx of a request started at or after it, and until every
/// client (key) that kept sending had one.
fn recovery(ops: &[Op], heal: Duration) -> (Option<Duration>, Option<Duration>) {
    let mut first_per_key: HashMap<&str, Option<Duration>> = HashMap::new();
    for op in ops {
        let entry = first_per_key.entry(op.key.as_str()).or_insert(None);
        if op.start >= heal && op.class() == Class::Ok {
            let after = op.end - heal;
            *entry = Some(entry.map_or(after, |e: Duration| e.min(after)));
        }
    }
    let first = first_per_key.values().filter_map(|d| *d).min();
    let all = first_per_key
        .values()
        .try_fold(Duration::ZERO, |acc, d| d.map(|d| acc.max(d)));
    (first, all)
}

/// A duration for the report: ms below 10 s, else s with one decimal.
pub fn show(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn show_opt(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_string(), show)
}

impl Verdict {
    /// Prints the one-line result and the markdown table row, and appends the row to the file
    /// named by `KAFBOY_FAULTS_REPORT`, if set.
    pub fn print(&self, scenario: &str, extra: &str) {
        let lost = self.lost_sync.len() + self.lost_async.len();
        let codes = self.codes.iter().fold(String::new(), |mut s, (code, n)| {
            let _ = write!(s, "{}{code}:{n}", if s.is_empty() { "" } else { "," });
            s
        });
        println!(
            "FAULTS {scenario}: requests={} ok={} fail={} unknown={} lost_acked={} \
             (sync {} async {}) phantom={} dup={} dup_ok={:?} dup_mock={:?} unknown_written={} \
             reorder={} \
             p50={} p99={} max={} recovery={} recovery_all={} foreign={} codes=[{codes}] {extra}",
            self.requests,
            self.ok,
            self.fail,
            self.unknown,
            lost,
            self.lost_sync.len(),
            self.lost_async.len(),
            self.phantom.len(),
            self.dup,
            self.dup_ok,
            self.dup_mock,
            self.unknown_written,
            self.reorder,
            show(self.p50),
            show(self.p99),
            show(self.max),
            show_opt(self.recovery),
            show_opt(self.recovery_all),
            self.foreign,
        );
        let row = format!(
            "| {scenario} | {} | {} / {} / {} | {} | {} | {} | {} | {} / {} / {} | {} / {} | {extra} |",
            self.requests,
            self.ok,
            self.fail,
            self.unknown,
            if self.lost_async.is_empty() {
                self.lost_sync.len().to_string()
            } else {
                format!("{} (async {})", self.lost_sync.len(), self.lost_async.len())
            },
            self.phantom.len(),
            if self.dup_mock.is_empty() {
                self.dup.to_string()
            } else {
                format!("{} ({} mock re-append)", self.dup, self.dup_mock_copies)
            },
            self.reorder,
            show(self.p50),
            show(self.p99),
            show(self.max),
            show_opt(self.recovery),
            show_opt(self.recovery_all),
        );
        println!("{row}");
        if let Ok(path) = std::env::var("KAFBOY_FAULTS_REPORT") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{row}");
            }
        }
    }

    /// What must hold in every scenario, as a list of violations: no acknowledged sync record
    /// lost, no failed record written, no acknowledged record twice (beyond the mock's
    /// re-appends), no more other duplicates than unknown outcomes, per-key order kept, nothing
    /// read back that was not sent, and every request answered within `deadline`.
    pub fn problems(&self, deadline: Duration) -> Vec<String> {
        let mut out = Vec::new();
        if !self.lost_sync.is_empty() {
            out.push(format!(
                "{} acknowledged sync records lost: {:?}",
                self.lost_sync.len(),
                head(&self.lost_sync)
            ));
        }
        if !self.phantom.is_empty() {
            out.push(format!(
                "{} failed records were written: {:?}",
                self.phantom.len(),
                head(&self.phantom)
            ));
        }
        if !self.dup_ok.is_empty() {
            out.push(format!(
                "{} acknowledged records duplicated: {:?}",
                self.dup_ok.len(),
                head(&self.dup_ok)
            ));
        }
        let other_dup = self.dup - self.dup_mock_copies;
        if other_dup > self.unknown {
            out.push(format!(
                "{other_dup} duplicates but only {} unknown outcomes",
                self.unknown
            ));
        }
        if self.reorder > 0 {
            out.push(format!("{} same-key order violations", self.reorder));
        }
        if self.foreign > 0 {
            out.push(format!("{} records nobody sent", self.foreign));
        }
        if self.max > deadline {
            out.push(format!(
                "a request took {:?}, over its deadline {deadline:?}",
                self.max
            ));
        }
        out
    }

    /// Fails the test if [`Verdict::problems`] finds any.
    pub fn assert_safe(&self, scenario: &str, deadline: Duration) {
        let problems = self.problems(deadline);
        assert!(problems.is_empty(), "{scenario}: {}", problems.join("; "));
    }

    /// No 202 lost either.
    pub fn assert_no_async_loss(&self, scenario: &str) {
        assert!(
            self.lost_async.is_empty(),
            "{scenario}: {} accepted async records lost: {:?}",
            self.lost_async.len(),
            head(&self.lost_async)
        );
    }

    /// Every client had a 2xx for a request started after the heal, within `limit`.
    pub fn assert_recovered(&self, scenario: &str, limit: Duration) {
        let all = self.recovery_all;
        assert!(
            all.is_some_and(|d| d <= limit),
            "{scenario}: not every client recovered within {limit:?} of the heal \
             (first 2xx after {:?}, every client after {all:?})",
            self.recovery
        );
    }
}

fn head(ids: &[String]) -> &[String] {
    &ids[..ids.len().min(10)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::Outcome;

    fn op(key: &str, seq: u64, code: Option<u16>, start: u64, end: u64) -> Op {
        Op {
            id: format!("{key}-{seq}"),
            key: key.to_string(),
            seq,
            mode: Mode::Sync,
            start: Duration::from_millis(start),
            end: Duration::from_millis(end),
            outcome: match code {
                Some(code) => Outcome::Status {
                    code,
                    retry_after: code == 503,
                },
                None => Outcome::Timeout,
            },
        }
    }

    fn rec(key: &str, seq: u64, partition: i32, offset: i64) -> Rec {
        Rec {
            partition,
            offset,
            id: format!("{key}-{seq}"),
            key: key.to_string(),
            seq,
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let ops = [
            op("a", 0, Some(200), 0, 10),
            op("a", 1, Some(503), 10, 20),
            op("a", 2, None, 20, 30),
            op("a", 3, Some(200), 30, 40),
        ];
        let recs = [rec("a", 0, 1, 0), rec("a", 2, 1, 1), rec("a", 3, 1, 2)];
        let v = check(&ops, &recs, Some(Duration::from_millis(25)), &[]);
        v.assert_safe("clean", Duration::from_secs(1));
        assert_eq!((v.ok, v.fail, v.unknown, v.unknown_written), (2, 1, 1, 1));
        assert_eq!(v.recovery, Some(Duration::from_millis(15)));
        assert_eq!(v.recovery_all, Some(Duration::from_millis(15)));
        assert_eq!(v.max, Duration::from_millis(10));
    }

    #[test]
    fn every_violation_is_found() {
        let ops = [
            op("a", 0, Some(200), 0, 10),
            op("a", 1, Some(200), 10, 20),
            op("a", 2, Some(200), 20, 30),
            op("a", 3, Some(503), 30, 40),
            op("b", 0, Some(200), 0, 10),
            op("b", 1, Some(200), 10, 20),
        ];
        // a-0 lost, a-2 before a-1, a-3 (503) written, b-0 twice, b split over partitions,
        // and a record nobody sent.
        let recs = [
            rec("a", 2, 0, 0),
            rec("a", 1, 0, 1),
            rec("a", 3, 0, 2),
            rec("b", 0, 1, 0),
            rec("b", 0, 1, 1),
            rec("b", 1, 2, 0),
            rec("c", 0, 2, 1),
        ];
        let v = check(&ops, &recs, Some(Duration::from_millis(100)), &[]);
        assert_eq!(v.lost_sync, ["a-0"]);
        assert_eq!(v.phantom, ["a-3"]);
        assert_eq!(v.dup, 1);
        assert_eq!(v.dup_ok, ["b-0 1@0,1@1"]);
        assert_eq!(v.reorder, 2, "a-2 before a-1, and b split");
        assert_eq!(v.foreign, 1);
        assert_eq!(v.recovery, None, "no 2xx started after the heal");
        assert_eq!(v.problems(Duration::from_millis(5)).len(), 7, "{v:?}");
    }

    #[test]
    fn a_duplicate_from_a_cut_connection_is_the_mock_s() {
        let ops = [op("a", 0, Some(200), 0, 10), op("a", 1, Some(200), 10, 20)];
        let recs = [rec("a", 0, 0, 0), rec("a", 0, 0, 1), rec("a", 1, 0, 2)];
        let cut = |ms| (Duration::from_millis(ms), Duration::from_millis(ms + 1));
        // The cut came while a-0 waited for its ack.
        let v = check(&ops, &recs, None, &[cut(5)]);
        assert!(v.problems(Duration::from_secs(1)).is_empty(), "{v:?}");
        assert_eq!((v.dup_mock.len(), v.dup_mock_copies), (1, 1));
        // A cut after a-0 was acknowledged cannot explain its second copy.
        let v = check(&ops, &recs, None, &[cut(15)]);
        assert_eq!(v.dup_ok, ["a-0 0@0,0@1"]);
        assert_eq!(
            v.problems(Duration::from_secs(1)).len(),
            2,
            "dup_ok and dup > unknown"
        );
    }
}
