//! End to end against a real Kafka-protocol broker (tansu): every mode, body type, key, partition
//! and header option, read back from the broker and compared byte for byte; and every refusal,
//! checked to leave nothing behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Consumed, MARKER, before_markers, broker, consume, gateway};
use kafboy::kafka::partition::key_hash;

const NDJSON: Option<&str> = Some("application/x-ndjson");
const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

fn values(records: &[Consumed]) -> Vec<String> {
    common::values(records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_json_is_accepted_after_enqueue_and_lands_byte_for_byte() {
    let b = broker();
    let topic = b.topic("async", 3);
    let gw = gateway(&b.addr, "").await;
    let body = "{ \"user\": {\"id\": 7, \"name\": \"é\\u00e9\"},\n  \"n\": [1, 2.5e3, null] }";
    let r = gw.post_json(&format!("/async/{topic}"), body).await;
    assert_eq!((r.status, r.body.as_str()), (202, r#"{"ok":1}"#));
    assert_eq!(r.headers["content-type"], "application/json");
    let got = consume(&b.addr, &topic, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, body.as_bytes());
    assert_eq!(got[0].key, None);
    assert_eq!(gw.stop().await.undelivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replies_with_the_partition_and_offset_the_broker_assigned() {
    let b = broker();
    let topic = b.topic("sync", 4);
    let gw = gateway(&b.addr, "").await;
    let mut replies = Vec::new();
    for i in 0..6 {
        let r = gw
            .post_json(&format!("/sync/{topic}/"), &format!("{{\"i\":{i}}}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let j = r.json();
        assert_eq!(j["ok"], 1);
        assert_eq!(j["topic"], topic.as_str());
        assert!(
            r.body
                .starts_with(&format!("{{\"ok\":1,\"topic\":\"{topic}\",\"partition\":")),
            "{}",
            r.body
        );
        replies.push((
            j["partition"].as_i64().unwrap() as i32,
            j["offset"].as_i64().unwrap(),
            i,
        ));
    }
    let got = consume(&b.addr, &topic, 6);
    assert_eq!(got.len(), 6);
    for (partition, offset, i) in replies {
        let rec = got
            .iter()
            .find(|c| c.partition == partition && c.offset == offset)
            .expect("acked record on broker");
        assert_eq!(rec.value, format!("{{\"i\":{i}}}").as_bytes());
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_routes_flush_by_size_and_time_and_batch_sync_waits_for_the_ack() {
    let b = broker();
    let topic = b.topic("batch", 2);
    let sized = b.topic("batchsized", 1);
    let slow = b.topic("batchslow", 1);
    // `sized` holds records for a minute unless a batch of 5 fills up first.
    let toml = format!(
        "[batch]\nbatch_size = 1000\nflush_timeout = \"50ms\"\n\
         [topics.overrides.{sized}]\nflush_timeout = \"60s\"\nbatch_size = 5\n\
         [topics.overrides.{slow}]\nflush_timeout = \"400ms\"\nbatch_size = 1000"
    );
    let gw = gateway(&b.addr, &toml).await;
    // Two full batches: both are sent long before their flush timeout (reading gives up after
    // 15 s), so it is their size that sent them.
    let sent: Vec<String> = (0..10).map(|i| format!("[{i}]")).collect();
    for body in &sent {
        let r = gw.post_json(&format!("/batch/async/{sized}"), body).await;
        assert_eq!((r.status, r.body.as_str()), (202, r#"{"ok":1}"#));
    }
    assert_eq!(values(&consume(&b.addr, &sized, 10)), sent);
    // A batch/sync request of a full batch is answered with where the broker put it.
    let r = gw
        .post(&format!("/batch/sync/{sized}"), NDJSON, "1\n2\n3\n4\n5\n")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let offsets: Vec<i64> = r.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(offsets, [10, 11, 12, 13, 14], "{}", r.body);
    // Below the batch size, the flush timeout sends them.
    for i in 0..10 {
        let r = gw
            .post_json(&format!("/batch/async/{topic}"), &format!("[{i}]"))
            .await;
        assert_eq!((r.status, r.body.as_str()), (202, r#"{"ok":1}"#));
    }
    let r = gw
        .post_json(&format!("/batch/sync/{topic}"), "\"last\"")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["offset"].is_i64());
    let mut got = values(&consume(&b.addr, &topic, 11));
    got.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("[{i}]")).collect();
    want.push("\"last\"".into());
    want.sort();
    assert_eq!(got, want);
    // The per-topic override holds records for its own, longer flush timeout.
    let start = Instant::now();
    let r = gw.post_json(&format!("/batch/sync/{slow}"), "1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "{:?}",
        start.elapsed()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_become_json_objects() {
    let b = broker();
    let topic = b.topic("form", 1);
    let gw = gateway(&b.addr, "").await;
    let r = gw
        .post(
            &format!("/sync/{topic}"),
            FORM,
            "test=a&tag=x&tag=y+z&q=%7B%22%7D",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = consume(&b.addr, &topic, 1);
    assert_eq!(
        values(&got),
        [r#"{"test":"a","tag":["x","y z"],"q":"{\"}"}"#]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_produces_one_record_per_line_in_order_or_nothing() {
    let b = broker();
    let topic = b.topic("ndjson", 1);
    let gw = gateway(&b.addr, "").await;
    let bad = gw
        .post(
            &format!("/sync/{topic}"),
            NDJSON,
            "{\"a\":1}\n{\"a\":2}\n{oops}\n",
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.error().starts_with("line 3: invalid json"),
        "{}",
        bad.body
    );
    let r = gw
        .post(
            &format!("/sync/{topic}"),
            NDJSON,
            "{\"a\":1}\r\n\n[2]\n\"three\"",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["ok"], 3);
    let offsets: Vec<i64> = j["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        [0, 1, 2],
        "nothing from the refused request came first"
    );
    let async_reply = gw.post(&format!("/async/{topic}"), NDJSON, "1\n2\n").await;
    assert_eq!(
        (async_reply.status, async_reply.body.as_str()),
        (202, r#"{"ok":2}"#)
    );
    let got = consume(&b.addr, &topic, 5);
    assert_eq!(values(&got), [r#"{"a":1}"#, "[2]", "\"three\"", "1", "2"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_partitions_and_headers_reach_the_record() {
    let b = broker();
    let topic = b.topic("meta", 5);
    let gw = gateway(&b.addr, "").await;
    let client = common::client();
    let url = |q: &str| format!("{}/sync/{topic}{q}", gw.url);
    let send = |req: reqwest::RequestBuilder| async move {
        common::Reply::read(
            req.header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap(),
        )
        .await
    };
    let by_query = send(client.post(url("?key=user%2042"))).await;
    let by_header = send(
        client
            .post(url(""))
            .header("X-Kafka-Key", "k9")
            .header("X-Kafka-Partition", "3"),
    )
    .await;
    let by_query_partition = send(client.post(url("?partition=4"))).await;
    let headers = send(
        client
            .post(url(""))
            .header("X-Kafka-Header-Trace-Id", "abc")
            .header(
                "x-kafka-header-source",
                reqwest::header::HeaderValue::from_bytes(b"web\xe9").unwrap(),
            ),
    )
    .await;
    for r in [&by_query, &by_header, &by_query_partition, &headers] {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(by_query.json()["partition"], key_hash(b"user 42", 5));
    assert_eq!(by_header.json()["partition"], 3);
    assert_eq!(by_query_partition.json()["partition"], 4);
    let got = consume(&b.addr, &topic, 4);
    let find = |r: &common::Reply| {
        let j = r.json();
        got.iter()
            .find(|c| {
                i64::from(c.partition) == j["partition"].as_i64().unwrap()
                    && c.offset == j["offset"].as_i64().unwrap()
            })
            .cloned()
            .expect("record on broker")
    };
    assert_eq!(find(&by_query).key.as_deref(), Some(&b"user 42"[..]));
    assert_eq!(find(&by_header).key.as_deref(), Some(&b"k9"[..]));
    assert_eq!(find(&by_query_partition).key, None);
    let h = find(&headers).headers;
    assert!(
        h.contains(&("trace-id".into(), Some(b"abc".to_vec()))),
        "{h:?}"
    );
    assert!(
        h.contains(&("source".into(), Some(b"web\xe9".to_vec()))),
        "{h:?}"
    );
    for (q, want) in [
        ("?partition=5", "out of range"),
        ("?partition=-1", "non-negative"),
        ("?partition=x", "non-negative"),
    ] {
        let r = send(client.post(url(q))).await;
        assert_eq!(r.status, 400);
        assert!(r.error().contains(want), "{}", r.body);
    }
    let r = send(client.post(url("?key=a")).header("x-kafka-key", "b")).await;
    assert_eq!(r.status, 400);
    for p in 0..5 {
        let r = gw
            .post_json(&format!("/sync/{topic}?partition={p}"), MARKER)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        before_markers(&b.addr, &topic, 5),
        got,
        "refusals wrote nothing"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_routes_take_their_mode_from_the_route() {
    let b = broker();
    let topic = b.topic("custom", 2);
    let fixed = b.topic("fixed", 2);
    let toml = format!(
        "[[routes]]\npath = \"/1/foo/:topic\"\nmode = \"sync\"\n\
         [[routes]]\npath = \"/events\"\ntopic = \"{fixed}\"\nmode = \"batch_async\"\npayload = \"raw\"\n\
         [[routes]]\npath = \"/k/{{topic}}\"\nmode = \"async\"\npartitioner = \"key_hash\""
    );
    let gw = gateway(&b.addr, &toml).await;
    let r = gw.post_json(&format!("/1/foo/{topic}"), "{}").await;
    assert_eq!(r.status, 200, "sync route answers with the ack: {}", r.body);
    assert!(r.json()["offset"].is_i64());
    let raw = b"\x00\xffnot json\n";
    let r = gw.post("/events/", Some("image/png"), raw.to_vec()).await;
    assert_eq!((r.status, r.body.as_str()), (202, r#"{"ok":1}"#));
    // A raw route reads no Content-Type: two of them, or one that is not text, are no reason
    // to refuse the body.
    let odd = reqwest::header::HeaderValue::from_bytes(b"image/png; name=\"\xe9\"").unwrap();
    for types in [
        vec![odd],
        vec!["text/plain".parse().unwrap(), "image/png".parse().unwrap()],
    ] {
        let mut request = common::client().post(format!("{}/events", gw.url));
        for t in types {
            request = request.header(reqwest::header::CONTENT_TYPE, t);
        }
        let r = request.body(raw.to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
    }
    let got = consume(&b.addr, &fixed, 3);
    let got: Vec<&[u8]> = got.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(got, [&raw[..]; 3]);
    let r = gw.post_json(&format!("/k/{topic}"), "{}").await;
    assert_eq!(r.status, 400);
    assert!(r.error().contains("key"), "{}", r.body);
    let r = gw
        .post_json(&format!("/k/{topic}?key=a"), "{\"k\":1}")
        .await;
    assert_eq!(r.status, 202);
    gw.stop().await;
    // The sync record above, and the keyed one in the partition its key hashes to.
    let got = consume(&b.addr, &topic, 2);
    let keyed = got
        .iter()
        .find(|r| r.value == b"{\"k\":1}")
        .expect("keyed record");
    assert_eq!(keyed.key.as_deref(), Some(&b"a"[..]));
    assert_eq!(keyed.partition as u32, key_hash(b"a", 2));
    assert_eq!(got.len(), 2, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_write_nothing() {
    let b = broker();
    let topic = b.topic("bad", 1);
    let gw = gateway(
        &b.addr,
        "[server]\nmax_body_bytes = 1000\n[kafka]\nmessage_max_bytes = 2000",
    )
    .await;
    let p = format!("/async/{topic}");
    let cases: Vec<(common::Reply, u16, &str)> = vec![
        (gw.post_json(&p, "{\"a\":1,}").await, 400, "invalid json: "),
        (gw.post(&p, None, "[1, 2").await, 400, "invalid json: "),
        (
            gw.post(&p, None, b"\"\xff\"".to_vec()).await,
            400,
            "not UTF-8",
        ),
        (gw.post_json(&p, "").await, 400, "empty body"),
        (gw.post(&p, FORM, "").await, 400, "empty body"),
        (
            gw.post(&p, Some("text/csv"), "hi").await,
            415,
            "unsupported content type",
        ),
        // Text is read as JSON (what a browser's sendBeacon of a string sends).
        (
            gw.post(&p, Some("text/plain"), "hi").await,
            400,
            "invalid json",
        ),
        (
            gw.post_json(&p, &format!("\"{}\"", "x".repeat(1000))).await,
            413,
            "larger than 1000",
        ),
        (
            gw.post_json("/async/a%20b", "{}").await,
            400,
            "letters, digits",
        ),
        (
            gw.post_json("/async/__consumer_offsets", "{}").await,
            400,
            "internal",
        ),
        (gw.post_json("/nowhere", "{}").await, 404, "not found"),
        (gw.post_json("/async/", "{}").await, 404, "not found"),
    ];
    for (r, status, want) in &cases {
        assert_eq!(r.status, *status, "{}", r.body);
        assert!(r.error().contains(want), "want {want:?} in {}", r.body);
        assert_eq!(r.headers["content-type"], "application/json");
    }
    // HTTP clients normalize "..", so this one goes raw.
    let answer = common::raw_http(
        gw.addr,
        b"POST /async/.. HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("may not be"),
        "{answer}"
    );
    // A chunked body has no Content-Length; the limit still holds.
    let chunk = " ".repeat(600);
    let request = format!(
        "POST {p} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = common::raw_http(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let errors = || async {
        common::get_json(&format!("{}/status.json", gw.url)).await["totals"]["answers_4xx"]
            .as_u64()
            .unwrap()
    };
    let errors_before = errors().await;
    let r = common::client()
        .get(format!("{}{p}", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = common::client()
        .put(format!("{}{p}", gw.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        errors().await,
        errors_before + 2,
        "the status page counts 405s"
    );
    let r = gw.post_json(&p, MARKER).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        before_markers(&b.addr, &topic, 1),
        vec![],
        "nothing was written"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_message_max_bytes_is_413_and_nothing_of_its_request_is_written() {
    let b = broker();
    let topic = b.topic("maxbytes", 1);
    // A body may be as large as a record; a record's framing (36 bytes at most) is on top.
    let gw = gateway(
        &b.addr,
        "[server]\nmax_body_bytes = 2000\n[kafka]\nmessage_max_bytes = 2000",
    )
    .await;
    let string = |len: usize| format!("\"{}\"", "x".repeat(len - 2));
    for path in ["async", "sync", "batch/async"] {
        let body = format!("{{\"a\":1}}\n{}\n", string(2000 - 36 + 1));
        let r = gw.post(&format!("/{path}/{topic}"), NDJSON, body).await;
        assert_eq!(r.status, 413, "{path}: {}", r.body);
        assert!(
            r.error().contains("record 2 takes 2001 bytes"),
            "{}",
            r.body
        );
    }
    let r = gw
        .post_json(&format!("/sync/{topic}"), &string(2000 - 36))
        .await;
    assert_eq!(
        r.status, 200,
        "a record of exactly the limit fits: {}",
        r.body
    );
    // A marker through each producer the refused requests went to.
    for path in ["async", "batch/async"] {
        let r = gw.post_json(&format!("/{path}/{topic}"), MARKER).await;
        assert_eq!(r.status, 202, "{path}: {}", r.body);
    }
    assert_eq!(
        values(&before_markers(&b.addr, &topic, 2)),
        [string(2000 - 36)],
        "only the record that fits"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unlisted_topics_are_a_fast_404() {
    let b = broker();
    let listed = b.topic("listed", 1);
    let unlisted = b.topic("unlisted", 1);
    let missing = common::unique_name("missing");
    // A record for a topic the brokers lack would wait out the message timeout in librdkafka;
    // a metadata lookup that timed out would be a 503. The 404s below are neither.
    let gw = gateway(
        &b.addr,
        &format!(
            "[topics]\nallow = [\"{listed}\", \"missing-*\"]\n\
             [kafka]\nmessage_timeout = \"60s\""
        ),
    )
    .await;
    let answered = |path: String| {
        let gw = &gw;
        async move {
            tokio::time::timeout(Duration::from_secs(30), gw.post_json(&path, "{}"))
                .await
                .unwrap_or_else(|_| panic!("{path}: no answer well within message_timeout"))
        }
    };
    let r = answered(format!("/sync/{unlisted}")).await;
    assert_eq!(r.status, 404);
    assert!(r.error().contains(&unlisted), "{}", r.body);
    let r = answered(format!("/sync/{missing}")).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = answered(format!("/async/{missing}")).await;
    assert_eq!(r.status, 404, "cached: {}", r.body);
    assert_eq!(
        gw.post_json(&format!("/sync/{listed}"), "{}").await.status,
        200
    );
    // kafboy may not write to `unlisted`: the marker comes from a producer of the test's own.
    common::produce_marker(&b.addr, &unlisted);
    assert_eq!(before_markers(&b.addr, &unlisted, 1), vec![]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_after_start_is_found() {
    let b = broker();
    let gw = gateway(&b.addr, "[kafka]\nunknown_topic_ttl = \"100ms\"").await;
    let name = common::unique_name("late");
    assert_eq!(
        gw.post_json(&format!("/sync/{name}"), "{}").await.status,
        404
    );
    b.create_topic(&name, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = gw.post_json(&format!("/sync/{name}"), "{}").await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 404);
        assert!(Instant::now() < deadline, "new topic never found");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_the_cache_has_not_seen_yet_is_503_not_400() {
    let b = broker();
    let topic = b.topic("grown", 2);
    let gw = gateway(&b.addr, "[kafka]\nmetadata_refresh = \"1h\"").await;
    let path = |p: i32| format!("/async/{topic}?partition={p}");
    assert_eq!(gw.post_json(&path(1), "{}").await.status, 202);
    // Four partitions now, where the cache still has two: partition 3 is not the client's
    // mistake, and a 400 would tell it not to try again.
    b.delete_topic(&topic);
    b.create_topic(&topic, 4);
    let r = gw.post_json(&path(3), "{}").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"), "{r:?}");
    assert!(r.error().contains("just added"), "{}", r.body);
    let r = gw.post_json(&path(4), "{}").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("out of range"), "{}", r.body);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_spread_records_over_256_partitions() {
    let b = broker();
    let topic = b.topic("wide", 256);
    let toml = "[[routes]]\npath = \"/rr/:topic\"\nmode = \"async\"\npartitioner = \"round_robin\"\n\
         [[routes]]\npath = \"/rnd/:topic\"\nmode = \"async\"\npartitioner = \"random\"";
    let gw = gateway(&b.addr, toml).await;
    let lines: String = (0..512).map(|i| format!("{i}\n")).collect();
    let r = gw
        .post(&format!("/rr/{topic}"), NDJSON, lines.clone())
        .await;
    assert_eq!((r.status, r.body.as_str()), (202, r#"{"ok":512}"#));
    let r = gw.post(&format!("/rnd/{topic}"), NDJSON, lines).await;
    assert_eq!(r.status, 202);
    let got = consume(&b.addr, &topic, 1024);
    assert_eq!(got.len(), 1024);
    let mut counts = vec![0; 256];
    for c in &got {
        counts[c.partition as usize] += 1;
    }
    // Round robin alone puts exactly 2 in each partition; random adds 512 more at random, so every
    // partition has at least 2 and no partition holds a large share.
    assert!(counts.iter().all(|&n| n >= 2), "{counts:?}");
    assert!(counts.iter().all(|&n| n < 20), "{counts:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_what_was_accepted() {
    let b = broker();
    let topic = b.topic("drain", 2);
    // A long flush timeout keeps records queued until shutdown flushes them.
    let gw = gateway(
        &b.addr,
        "[batch]\nflush_timeout = \"60s\"\nbatch_size = 100000",
    )
    .await;
    let lines: String = (0..200).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    let r = gw
        .post(&format!("/batch/async/{topic}"), NDJSON, lines)
        .await;
    assert_eq!(r.status, 202);
    let start = Instant::now();
    let report = gw.stop().await;
    assert_eq!(report.undelivered, 0);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "flush must not wait out the linger"
    );
    let mut got = values(&consume(&b.addr, &topic, 200));
    got.sort();
    let mut want: Vec<String> = (0..200).map(|i| format!("{{\"n\":{i}}}")).collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_before_a_shutdown_gets_an_answer_to_its_first_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let b = broker();
    let topic = b.topic("early", 1);
    let gw = gateway(&b.addr, "").await;
    let addr = gw.addr;
    // Connected, their requests not written yet: clients between their connect and their write
    // as the stop comes. Closing these would reset requests already on their way.
    let mut early = Vec::new();
    for _ in 0..3 {
        early.push(TcpStream::connect(addr).await.unwrap());
    }
    let stopping = tokio::spawn(gw.stop());
    // The stop is under way once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still listening");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let request = format!(
        "POST /async/{topic} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 7\r\n\r\n{{\"a\":1}}"
    );
    // One waits for `100 Continue` before it sends its body: refused on its head, the body
    // nobody reads must not keep the connection (and the stop) from ending.
    let waiting = format!(
        "POST /async/{topic} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\ncontent-length: 100000\r\n\r\n"
    );
    // Every request written before any answer is read: each connection's request is on its
    // way while the stop is, not only after the previous one was answered.
    for (i, tcp) in early.iter_mut().enumerate() {
        let request = if i == 2 { &waiting } else { &request };
        tcp.write_all(request.as_bytes()).await.unwrap();
    }
    for mut tcp in early {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer));
        read.await
            .expect("closed after its answer")
            .expect("an answer, not a reset");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 503")
                && answer.contains("retry-after")
                && answer.contains("connection: close")
                && answer.contains("shutting down"),
            "{answer}"
        );
    }
    let report = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the stop waited out its grace on an open connection")
        .unwrap();
    assert_eq!(report.undelivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_running_after_the_final_flush_is_refused_not_queued_and_purged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = broker();
    let topic = b.topic("late", 1);
    let gw = gateway(&b.addr, "[server]\nshutdown_timeout = \"200ms\"").await;
    // A request whose body is still to come when the shutdown deadline passes. hyper answers
    // `100 Continue` once the handler reads the body: then the request is surely in.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /async/{topic} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 7\r\nexpect: 100-continue\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("100 Continue\r\n\r\n") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("100 Continue")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // The shutdown waits for the open request until its deadline, then flushes.
    let report = gw.stop().await;
    assert_eq!(report.undelivered, 0);
    // The producers were flushed; the body comes now.
    tcp.write_all(b"{\"a\":1}").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "no answer: {answer}");
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("shutting down"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{answer}"
    );
    // kafboy is gone: the marker comes from a producer of the test's own.
    common::produce_marker(&b.addr, &topic);
    assert_eq!(
        before_markers(&b.addr, &topic, 1),
        vec![],
        "a record queued after the flush would have been purged unreported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_ready() {
    let b = broker();
    let gw = gateway(&b.addr, "").await;
    let r = common::client()
        .get(format!("{}/health", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = common::client()
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in ["/ready", "/health", "/openapi.json", "/metrics"] {
        let r = common::client()
            .post(format!("{}{path}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{path}");
        assert_eq!(r.headers()["allow"], "GET, HEAD");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("use GET"),
            "{body}"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_gets_503_until_the_producer_is_replaced() {
    let b = broker();
    let topic = b.topic("fatal", 1);
    let mut config = kafboy::Config::default();
    config.kafka.brokers = vec![b.addr.clone()];
    let app = kafboy::App::build(&config).unwrap();
    let producers = app.producers().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(listener, async {
        let _ = stopped.await;
    }));
    let client = common::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("{url}/ready"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let post = || client.post(format!("{url}/sync/{topic}")).body("{}").send();
    assert_eq!(post().await.unwrap().status(), 200);
    // librdkafka refuses new records at once; kafboy answers 503 until the producer is replaced.
    // The supervisor may replace it before the request comes (it looks every 100 ms): then the
    // error is raised again, in the replacement, which waits longer each time (1 s, 2 s, ...).
    let mode = kafboy::config::Mode::Sync;
    let mut attempts = 0;
    let r = loop {
        attempts += 1;
        // A weak reference, so as not to hold the producer alive.
        let hit = Arc::downgrade(&producers.for_mode(mode, &topic));
        producers.inject_fatal_error(mode);
        let r = common::Reply::read(post().await.unwrap()).await;
        let replaced = !std::ptr::eq(Arc::as_ptr(&producers.for_mode(mode, &topic)), hit.as_ptr());
        if r.status == 200 && replaced && attempts < 5 {
            continue;
        }
        break r;
    };
    assert_eq!(r.status, 503, "after {attempts} fatal errors: {}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    // Not ready while the failed producer is in place.
    let ready = client.get(format!("{url}/ready")).send().await.unwrap();
    if attempts > 1 {
        assert_eq!(ready.status(), 503, "ready with a failed producer in place");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = post().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(Instant::now() < deadline, "producer never replaced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        client
            .get(format!("{url}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let _ = stop.send(());
    task.await.unwrap();
}
