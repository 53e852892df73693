//! Property: what a consumer reads back from the broker (tansu) is exactly what was POSTed to a
//! raw sync route: value bytes, key and record headers.
//!
//! What can be sent, and so what is generated:
//! - values: any non-empty bytes (an empty body is a 400 by contract);
//! - keys: either an `X-Kafka-Key` header, which carries any bytes an HTTP header value can hold
//!   (no control characters but tab, 0x80–0xFF allowed, no leading or trailing blank since HTTP
//!   trims those), or `?key=` percent-encoded, which carries any bytes (`%FF` stays 0xFF);
//! - headers: `X-Kafka-Header-<name>: <value>` with a token name in any case (it arrives lower
//!   case) and a header value as for keys. Headers of one name keep their order; headers of
//!   different names are compared as a set, since an HTTP header map groups by name.
//!
//! Each case is one sync request; its reply names the partition and offset, where a consumer
//! that stays assigned for the whole run finds the record. At the end every acknowledged record
//! is read once more through `common::consume_all`, and nothing else is on the topic.

#![allow(clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Consumed, broker, client, gateway};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// Cases per run; `PROPTEST_CASES` overrides.
const CASES: u32 = 64;
const PARTITIONS: u32 = 2;

#[derive(Debug, Clone)]
enum Key {
    None,
    Header(Vec<u8>),
    Query(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Case {
    value: Vec<u8>,
    key: Key,
    headers: Vec<(String, Vec<u8>)>,
}

/// Bytes an HTTP header value carries unchanged: visible ASCII, space, tab and obs-text, without
/// leading or trailing blanks.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => 0x21u8..=0x7e,
        1 => Just(b' '),
        1 => Just(b'\t'),
        2 => 0x80u8..=0xff,
    ];
    proptest::collection::vec(byte, 0..48).prop_map(|mut v| {
        while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.remove(0);
        }
        while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.pop();
        }
        v
    })
}

fn case() -> impl Strategy<Value = Case> {
    let key = prop_oneof![
        2 => Just(Key::None),
        4 => header_value().prop_map(Key::Header),
        2 => any::<String>().prop_map(|k| Key::Query(k.into_bytes())),
        2 => proptest::collection::vec(any::<u8>(), 0..32).prop_map(Key::Query),
        // An empty key is a key, not a missing one.
        1 => Just(Key::Header(Vec::new())),
        1 => Just(Key::Query(Vec::new())),
    ];
    // An HTTP token, any case; the suffix after `X-Kafka-Header-`.
    let name = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}";
    let headers = proptest::collection::vec((name, header_value()), 0..6);
    (
        proptest::collection::vec(any::<u8>(), 1..2048),
        key,
        headers,
    )
        .prop_map(|(value, key, headers)| Case {
            value,
            key,
            headers,
        })
}

/// Stays assigned to every partition of the topic and remembers every record it has read.
struct Reader {
    consumer: BaseConsumer,
    seen: HashMap<(i32, i64), Consumed>,
}

impl Reader {
    fn new(brokers: &str, topic: &str) -> Reader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("roundtrip-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Reader {
            consumer,
            seen: HashMap::new(),
        }
    }

    /// The record at `partition`/`offset`, reading on for up to 10 s.
    fn get(&mut self, partition: i32, offset: i64) -> Option<Consumed> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.seen.contains_key(&(partition, offset)) && Instant::now() < deadline {
            let Some(msg) = self.consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let record = common::consumed(&msg.unwrap());
            self.seen.insert((record.partition, record.offset), record);
        }
        self.seen.get(&(partition, offset)).cloned()
    }
}

/// What the broker should hold for `case`.
fn expected(case: &Case, partition: i32, offset: i64) -> Consumed {
    let key = match &case.key {
        Key::None => None,
        Key::Header(k) => Some(k.clone()),
        Key::Query(k) => Some(k.clone()),
    };
    Consumed {
        partition,
        offset,
        key,
        value: case.value.clone(),
        headers: sorted(
            case.headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), Some(v.clone())))
                .collect(),
        ),
        // The broker's time is not the case's to say.
        timestamp: None,
    }
}

/// Headers grouped by name, names in order, each name's values in the order sent. A value sent
/// is never null, even when empty.
fn sorted(mut headers: Vec<(String, Option<Vec<u8>>)>) -> Vec<(String, Option<Vec<u8>>)> {
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    headers
}

#[test]
fn what_is_consumed_is_what_was_sent() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let b = broker();
    let topic = b.topic("roundtrip", PARTITIONS);
    let toml = "[[routes]]\npath = \"/rt/:topic\"\nmode = \"sync\"\npayload = \"raw\"";
    let gw = rt.block_on(gateway(&b.addr, toml));
    let http = client();
    // The runner takes a `Fn`, hence the cells.
    let reader = RefCell::new(Reader::new(&b.addr, &topic));
    let acked: RefCell<Vec<(Case, i32, i64)>> = RefCell::default();

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        let mut url = format!("{}/rt/{topic}", gw.url);
        if let Key::Query(k) = &case.key {
            url.push('?');
            url.push_str("key=");
            for b in k {
                if b.is_ascii_alphanumeric() {
                    url.push(char::from(*b));
                } else {
                    url.push_str(&format!("%{b:02X}"));
                }
            }
        }
        let mut req = http
            .post(url)
            .header("content-type", "application/octet-stream")
            .body(case.value.clone());
        if let Key::Header(k) = &case.key {
            req = req.header("x-kafka-key", k.as_slice());
        }
        for (name, value) in &case.headers {
            req = req.header(format!("X-Kafka-Header-{name}"), value.as_slice());
        }
        let reply = rt.block_on(async { common::Reply::read(req.send().await.unwrap()).await });
        prop_assert_eq!(reply.status, 200, "{}", reply.body);
        let j = reply.json();
        let partition = j["partition"].as_i64().unwrap() as i32;
        let offset = j["offset"].as_i64().unwrap();
        acked.borrow_mut().push((case.clone(), partition, offset));
        let got = reader
            .borrow_mut()
            .get(partition, offset)
            .ok_or_else(|| TestCaseError::fail(format!("no record at {partition}/{offset}")))?;
        let got = Consumed {
            headers: sorted(got.headers),
            timestamp: None,
            ..got
        };
        prop_assert_eq!(got, expected(&case, partition, offset));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }

    // Everything acknowledged is on the broker, once, as sent; nothing else is.
    let acked = acked.into_inner();
    let all = common::consume_all(&b.addr, &topic, acked.len());
    assert_eq!(
        all.len(),
        acked.len(),
        "records nobody acknowledged, or missing"
    );
    for (case, partition, offset) in &acked {
        let got = all
            .iter()
            .find(|c| c.partition == *partition && c.offset == *offset)
            .unwrap();
        let got = Consumed {
            headers: sorted(got.headers.clone()),
            timestamp: None,
            ..got.clone()
        };
        assert_eq!(got, expected(case, *partition, *offset));
    }
    rt.block_on(gw.stop());
}
