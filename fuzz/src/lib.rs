//! The properties the fuzz targets check, one public function per target. The targets in
//! `fuzz_targets/` only call these, and `tests/regressions.rs` replays the saved inputs
//! (`regressions/<target>/`, `seeds/<target>/`) through them on stable Rust, without libFuzzer.
//!
//! Beyond "never panics":
//! - [`decode`]: a body the JSON gate accepts is forwarded byte for byte and
//!   `serde_json::from_slice::<Value>` accepts it too (and the other way round, within the depth
//!   limit); a form always becomes a JSON object with the form's keys in first-seen order and
//!   its values; NDJSON records are the non-blank lines, each valid JSON and a sub-slice of the
//!   body.
//! - [`routes`]: whatever `routes::compile` accepts registers in an axum `Router` the way
//!   `App::router` does it without a panic, and every route is reached by a request to its own
//!   path; `validate_topic` is exactly Kafka's grammar; `Allowlist` allows what it lists.
//! - [`record`]: `RecordMeta::from_parts` reads key, partition and headers as documented, and
//!   `into_records` always picks a partition inside the topic.

use std::panic::{AssertUnwindSafe, catch_unwind};

use arbitrary::{Arbitrary, Unstructured};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use kafboy::config::{Config, Partitioner, Payload, RouteConfig};
use kafboy::decode::{self, BodyKind, DecodeError, Limits};
use kafboy::kafka::metadata::TopicInfo;
use kafboy::kafka::partition::key_hash;
use kafboy::record::RecordMeta;
use kafboy::routes::{self, Allowlist, Route, TopicSource};
use rdkafka::message::Headers as _;
use serde_json::Value;
use tower::ServiceExt as _;

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// decode

/// Input: `[kind selector, max_records, max_depth, body...]`. The selector picks JSON, form,
/// NDJSON or raw (`% 4`); `max_records` is `% 16`, `max_depth` is 1 to 128 (serde_json's own
/// recursion limit is 128).
pub fn decode(data: &[u8]) {
    let [head, max, depth, body @ ..] = data else {
        return;
    };
    let limits = Limits {
        max_records: usize::from(max % 16),
        max_depth: 1 + usize::from(depth % 128),
    };
    content_type(body);
    let body = Bytes::copy_from_slice(body);
    match head % 4 {
        0 => json(&body, &limits),
        1 => form(&body, &limits),
        2 => ndjson(&body, &limits),
        _ => assert_eq!(
            decode::decode(BodyKind::Raw, body.clone(), &limits),
            if body.is_empty() {
                Err(DecodeError::Empty)
            } else {
                Ok(vec![body.clone()])
            }
        ),
    }
}

fn content_type(bytes: &[u8]) {
    let ct = lossy(&bytes[..bytes.len().min(128)]);
    if let Ok(kind) = BodyKind::of(Payload::Auto, Some(&ct)) {
        assert_ne!(kind, BodyKind::Raw, "{ct:?}");
    }
    assert_eq!(BodyKind::of(Payload::Raw, Some(&ct)), Ok(BodyKind::Raw));
}

/// Nesting depth of a value: a scalar is 0, `[]` is 1.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// One JSON document checked by the gate against serde_json's full parse.
fn json_document(doc: &[u8], limits: &Limits) -> Result<(), String> {
    let gate = decode::check_json(doc, limits.max_depth);
    let tree = serde_json::from_slice::<Value>(doc);
    match (&gate, tree) {
        (Ok(()), Ok(v)) => assert!(
            depth(&v) <= limits.max_depth,
            "accepted nesting {} deeper than {}: {:?}",
            depth(&v),
            limits.max_depth,
            lossy(doc)
        ),
        (Ok(()), Err(e)) => panic!(
            "the JSON gate accepted what serde_json refuses ({e}): {:?}",
            lossy(doc)
        ),
        (Err(_), Err(_)) => {}
        (Err(e), Ok(v)) => assert!(
            depth(&v) > limits.max_depth,
            "the JSON gate refused ({e}) valid JSON {v} of depth {}: {:?}",
            depth(&v),
            lossy(doc)
        ),
    }
    gate
}

fn json(body: &Bytes, limits: &Limits) {
    let gate = decode::decode(BodyKind::Json, body.clone(), limits);
    if body.is_empty() {
        return assert_eq!(gate, Err(DecodeError::Empty));
    }
    match (gate, json_document(body, limits)) {
        (Ok(values), Ok(())) => assert_eq!(values, std::slice::from_ref(body), "byte for byte"),
        (Err(DecodeError::Json(a)), Err(b)) => assert_eq!(a, b),
        (gate, check) => panic!("decode {gate:?} but check_json {check:?}"),
    }
}

fn form(body: &Bytes, limits: &Limits) {
    let got = decode::decode(BodyKind::Form, body.clone(), limits);
    let pairs = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body);
    // A field that is not UTF-8 once decoded (serde would replace the bytes with U+FFFD and
    // write something the client never sent).
    let not_text = body
        .split(|&b| b == b'&')
        .flat_map(|field| field.splitn(2, |&b| b == b'='))
        .any(|part| std::str::from_utf8(&form_bytes(part)).is_err());
    let values = match got {
        Err(DecodeError::Empty) => return assert!(body.is_empty()),
        // `&&` is a form with nothing in it.
        Err(DecodeError::Form(e)) if e == "no fields" => {
            return assert!(body.split(|&b| b == b'&').all(<[u8]>::is_empty));
        }
        // JSON a client sent without its Content-Type.
        Err(DecodeError::JsonAsForm) => {
            let start = body.iter().find(|b| !b.is_ascii_whitespace());
            return assert!(matches!(start, Some(b'{' | b'[')), "{:?}", lossy(body));
        }
        Err(DecodeError::Form(e)) => {
            return assert!(
                pairs.is_err() || not_text,
                "form refused ({e}) but it decodes"
            );
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(values) => values,
    };
    assert!(
        !not_text,
        "a field that is not UTF-8 once decoded was accepted"
    );
    assert_eq!(values.len(), 1);
    let json: Value = serde_json::from_slice(&values[0]).unwrap_or_else(|e| {
        panic!(
            "form output is not JSON ({e}): {:?} from {:?}",
            lossy(&values[0]),
            lossy(body)
        )
    });
    let object = json.as_object().expect("form output is a JSON object");
    let mut want: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in pairs.expect("a form decode accepted is a form") {
        match want.iter_mut().find(|(name, _)| *name == k) {
            Some((_, vs)) => vs.push(v),
            None => want.push((k, vec![v])),
        }
    }
    let keys: Vec<&String> = object.keys().collect();
    let want_keys: Vec<&String> = want.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, want_keys, "keys in first-seen order");
    for (k, vs) in &want {
        let expected = match vs.as_slice() {
            [one] => Value::String(one.clone()),
            many => Value::Array(many.iter().cloned().map(Value::String).collect()),
        };
        assert_eq!(object[k], expected, "field {k:?}");
    }
}

fn ndjson(body: &Bytes, limits: &Limits) {
    let max_records = limits.max_records;
    let got = decode::decode(BodyKind::Ndjson, body.clone(), limits);
    // (1-based line number, line without its '\r') of every non-blank line.
    let lines: Vec<(usize, &[u8])> = body
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')))
        .collect();
    match got {
        Ok(records) => {
            assert_eq!(records.len(), lines.len(), "one record per non-blank line");
            assert!(!records.is_empty() && records.len() <= max_records);
            let base = body.as_ptr() as usize;
            for (record, (_, line)) in records.iter().zip(&lines) {
                assert_eq!(&record[..], *line);
                let start = record.as_ptr() as usize;
                assert!(
                    start >= base && start + record.len() <= base + body.len(),
                    "record is not a slice of the body"
                );
                assert_eq!(
                    &body[start - base..start - base + record.len()],
                    &record[..]
                );
                assert!(!record.contains(&b'\n'));
                assert!(json_document(record, limits).is_ok());
            }
        }
        Err(DecodeError::Empty) => assert!(lines.is_empty()),
        Err(DecodeError::Line(n, _)) => {
            let at = lines
                .iter()
                .position(|(i, _)| *i == n)
                .expect("a non-blank line");
            assert!(json_document(lines[at].1, limits).is_err());
            assert!(at <= max_records, "line {n} is past max_records");
            for (_, line) in &lines[..at] {
                assert!(
                    json_document(line, limits).is_ok(),
                    "an earlier line was bad"
                );
            }
        }
        Err(DecodeError::TooManyRecords(m)) => {
            assert_eq!(m, max_records);
            assert!(lines.len() > max_records);
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// routes

#[derive(Arbitrary, Debug)]
struct RoutesInput {
    default_routes: bool,
    routes: Vec<FuzzRoute>,
    allow: Vec<String>,
    topics: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct FuzzRoute {
    path: FuzzPath,
    topic: Option<FuzzTopic>,
    mode: u8,
    raw: bool,
}

#[derive(Arbitrary, Debug)]
enum FuzzPath {
    Verbatim(String),
    Segments(Vec<Segment>, bool),
}

#[derive(Arbitrary, Debug)]
enum Segment {
    Word(u8),
    Any(String),
    ColonTopic,
    BraceTopic,
    Colon(String),
    Brace(String),
    Empty,
}

#[derive(Arbitrary, Debug)]
enum FuzzTopic {
    Word(u8),
    Any(String),
}

const WORDS: &[&str] = &[
    "a", "b", "async", "sync", "batch", "health", "ready", "topic", "1", "x.y", "a-b",
];

fn word(i: u8) -> &'static str {
    WORDS[usize::from(i) % WORDS.len()]
}

impl FuzzPath {
    fn render(&self) -> String {
        match self {
            FuzzPath::Verbatim(s) => s.clone(),
            FuzzPath::Segments(segments, trailing) => {
                let mut path = String::new();
                for seg in segments {
                    path.push('/');
                    match seg {
                        Segment::Word(i) => path.push_str(word(*i)),
                        Segment::Any(s) => path.push_str(s),
                        Segment::ColonTopic => path.push_str(":topic"),
                        Segment::BraceTopic => path.push_str("{topic}"),
                        Segment::Colon(s) => path.push_str(&format!(":{s}")),
                        Segment::Brace(s) => path.push_str(&format!("{{{s}}}")),
                        Segment::Empty => {}
                    }
                }
                if *trailing || path.is_empty() {
                    path.push('/');
                }
                path
            }
        }
    }
}

/// A topic name no static segment uses, so a request to a `{topic}` route is not taken by a
/// fixed route.
const PROBE_TOPIC: &str = "probe-topic-7";

/// Input: `arbitrary` bytes for a list of routes (paths built from segments or taken verbatim),
/// an allowlist and some topic names.
pub fn routes(data: &[u8]) {
    let Ok(input) = RoutesInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    for topic in &input.topics {
        check_topic_grammar(topic);
    }
    check_allowlist(&input.allow, &input.topics);

    let mut config = Config::default();
    config.server.default_routes = input.default_routes;
    config.routes = input
        .routes
        .iter()
        .take(8)
        .map(|r| {
            let topic = r.topic.as_ref().map(|t| match t {
                FuzzTopic::Word(i) => word(*i).to_string(),
                FuzzTopic::Any(s) => s.clone(),
            });
            let mode = ["async", "sync", "batch_async", "batch_sync"][usize::from(r.mode % 4)];
            let payload = if r.raw { "raw" } else { "auto" };
            route_config(r.path.render(), topic, mode, payload)
        })
        .collect();
    let Ok(compiled) = routes::compile(&config) else {
        return;
    };
    let expected = usize::from(config.server.default_routes) * 4 + config.routes.len();
    assert_eq!(
        compiled.len(),
        expected,
        "every route is compiled or refused"
    );
    for route in &compiled {
        check_route(route);
    }
    let router = match catch_unwind(AssertUnwindSafe(|| router(&compiled))) {
        Ok(router) => router,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("routes::compile accepted routes that axum refuses ({msg}): {compiled:#?}");
        }
    };
    check_reachable(router, &compiled);
}

/// A route as the config file would give it; through serde, so that fields added later with a
/// default need no change here.
pub fn route_config(path: String, topic: Option<String>, mode: &str, payload: &str) -> RouteConfig {
    let json = serde_json::json!({"path": path, "topic": topic, "mode": mode, "payload": payload});
    serde_json::from_value(json).expect("a RouteConfig")
}

fn check_topic_grammar(topic: &str) {
    let legal = (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && !topic.starts_with("__")
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    assert_eq!(routes::validate_topic(topic).is_ok(), legal, "{topic:?}");
}

fn check_allowlist(entries: &[String], topics: &[String]) {
    let Ok(list) = Allowlist::new(entries) else {
        assert!(
            entries.iter().any(|e| match e.strip_suffix('*') {
                Some(prefix) => prefix.contains('*'),
                None => routes::validate_topic(e).is_err(),
            }),
            "allowlist refused good entries {entries:?}"
        );
        return;
    };
    for entry in entries {
        match entry.strip_suffix('*') {
            Some(prefix) => assert!(list.allows(&format!("{prefix}x")), "{entry:?}"),
            None => assert!(list.allows(entry), "{entry:?}"),
        }
    }
    for topic in topics {
        let want = entries.is_empty()
            || entries.iter().any(|e| match e.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => e == topic,
            });
        assert_eq!(list.allows(topic), want, "{topic:?} against {entries:?}");
    }
}

fn check_route(route: &Route) {
    let p = &route.pattern;
    assert!(p.starts_with('/'), "{route:?}");
    assert!(
        p == "/" || (!p.ends_with('/') && !p.contains("//")),
        "{route:?}"
    );
    let params = p.matches("{topic}").count();
    match &route.topic {
        TopicSource::Path => assert_eq!(params, 1, "{route:?}"),
        TopicSource::Fixed(t) => {
            assert_eq!(params, 0, "{route:?}");
            assert!(routes::validate_topic(t).is_ok(), "{route:?}");
        }
    }
    let braces = p.matches(['{', '}']).count();
    assert_eq!(
        braces,
        params * 2,
        "only {{topic}} is a parameter: {route:?}"
    );
    assert!(!p.contains([':', '*']), "{route:?}");
}

/// The router as `App::router` builds it (src/server.rs), with handlers that answer the route's
/// index. Keep in step with that function.
fn router(compiled: &[Route]) -> Router {
    let mut router = Router::new();
    for (i, route) in compiled.iter().enumerate() {
        let method = post(move || async move { i.to_string() })
            .fallback(|| async { StatusCode::METHOD_NOT_ALLOWED });
        router = router.route(&route.pattern, method.clone());
        if route.pattern != "/" {
            router = router.route(&format!("{}/", route.pattern), method);
        }
    }
    router
        .route("/health", get(|| async { "health" }))
        .route("/ready", get(|| async { "ready" }))
        .fallback(|| async { StatusCode::NOT_FOUND })
}

fn check_reachable(router: Router, compiled: &[Route]) {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
    }
    let send = |method: &str, path: &str| -> Option<(StatusCode, String)> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .ok()?;
        RT.with(|rt| {
            rt.block_on(async {
                let response = router.clone().oneshot(request).await.expect("infallible");
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                    .await
                    .expect("body");
                Some((status, lossy(&body)))
            })
        })
    };
    let probe_is_static = compiled
        .iter()
        .any(|r| r.pattern.split('/').any(|s| s == PROBE_TOPIC));
    for (i, route) in compiled.iter().enumerate() {
        if probe_is_static {
            break;
        }
        let path = route.pattern.replace("{topic}", PROBE_TOPIC);
        for path in [path.clone(), format!("{}/", path.trim_end_matches('/'))] {
            let reached = send("POST", &path).filter(|_| {
                path.parse::<axum::http::Uri>()
                    .is_ok_and(|u| u.path() == path)
            });
            let Some((status, body)) = reached else {
                panic!("route {:?} can never be requested: {path:?}", route.path);
            };
            assert_eq!(
                (status, body),
                (StatusCode::OK, i.to_string()),
                "POST {path:?} did not reach route {i} ({:?}) of {compiled:#?}",
                route.path
            );
        }
    }
    for (path, name) in [("/health", "health"), ("/ready", "ready")] {
        assert_eq!(
            send("GET", path),
            Some((StatusCode::OK, name.to_string())),
            "{path} taken by a configured route"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// record

#[derive(Arbitrary, Debug)]
struct RecordInput {
    query: Query,
    headers: Vec<(FuzzHeaderName, Vec<u8>)>,
    partitions: PartitionCount,
    strategy: u8,
    values: u8,
}

#[derive(Arbitrary, Debug)]
enum Query {
    None,
    Verbatim(String),
    Pairs(Vec<(QueryName, String)>),
}

#[derive(Arbitrary, Debug)]
enum QueryName {
    Key,
    Partition,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum FuzzHeaderName {
    Key,
    Partition,
    Header(String),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum PartitionCount {
    Small(u8),
    Any(i32),
}

const PREFIX: &str = "x-kafka-header-";

/// A query component as a form decodes it: `+` is a space, `%XX` a byte (a `%` not followed
/// by two hex digits stays as it is).
fn form_bytes(raw: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < raw.len() => match (hex(raw[i + 1]), hex(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Input: `arbitrary` bytes for a query string (verbatim or encoded pairs), request headers, a
/// partition count and a strategy.
pub fn record(data: &[u8]) {
    let Ok(input) = RecordInput::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let uri = match &input.query {
        Query::None => "/t".to_string(),
        Query::Verbatim(q) => format!("/t?{q}"),
        Query::Pairs(pairs) => {
            let pairs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(n, v)| {
                    let n = match n {
                        QueryName::Key => "key",
                        QueryName::Partition => "partition",
                        QueryName::Other(s) => s,
                    };
                    (n, v.as_str())
                })
                .collect();
            format!("/t?{}", serde_urlencoded::to_string(pairs).expect("encode"))
        }
    };
    let mut builder = Request::builder().method("POST").uri(uri);
    let mut sent: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for (name, value) in &input.headers {
        let name = match name {
            FuzzHeaderName::Key => "x-kafka-key".to_string(),
            FuzzHeaderName::Partition => "x-kafka-partition".to_string(),
            FuzzHeaderName::Header(s) => format!("X-Kafka-Header-{s}"),
            FuzzHeaderName::Other(s) => s.clone(),
        };
        // Only what can arrive in a request.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        builder = builder.header(name.clone(), value.clone());
        sent.push((name, value));
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();

    // What the README promises, worked out independently: each of the query's `key`s and
    // `X-Kafka-Key` headers must say the same, likewise each `partition` (a number from 0).
    let decoded: Vec<(Vec<u8>, Vec<u8>)> = parts
        .uri
        .query()
        .map(|q| {
            q.split('&')
                .map(|pair| {
                    let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (form_bytes(n.as_bytes()), form_bytes(v.as_bytes()))
                })
                .collect()
        })
        .unwrap_or_default();
    let given = |query: &[u8], header: &str| -> Vec<Vec<u8>> {
        decoded
            .iter()
            .filter(|(n, _)| n == query)
            .map(|(_, v)| v.clone())
            .chain(
                sent.iter()
                    .filter(|(n, _)| n.as_str() == header)
                    .map(|(_, v)| v.as_bytes().to_vec()),
            )
            .collect()
    };
    let agreed = |all: Vec<Vec<u8>>| -> Result<Option<Vec<u8>>, ()> {
        match all.windows(2).all(|w| w[0] == w[1]) {
            true => Ok(all.into_iter().next()),
            false => Err(()),
        }
    };
    let parse = |raw: &[u8]| {
        std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| *p >= 0)
    };
    let key = agreed(given(b"key", "x-kafka-key"));
    let partition = given(b"partition", "x-kafka-partition")
        .iter()
        .map(|raw| parse(raw).ok_or(()))
        .collect::<Result<Vec<i32>, ()>>()
        .and_then(|all| match all.windows(2).all(|w| w[0] == w[1]) {
            true => Ok(all.first().copied()),
            false => Err(()),
        });
    // A record header needs a name: `X-Kafka-Header-` alone is refused.
    if sent.iter().any(|(n, _)| n.as_str() == PREFIX) {
        assert!(
            RecordMeta::from_parts(&parts).is_err(),
            "a record header without a name was accepted: {input:?}"
        );
        return;
    }
    let mut want_headers: Vec<(String, Vec<u8>)> = sent
        .iter()
        .filter_map(|(n, v)| {
            Some((
                n.as_str().strip_prefix(PREFIX)?.to_string(),
                v.as_bytes().to_vec(),
            ))
        })
        .collect();

    let meta = match (RecordMeta::from_parts(&parts), &key, &partition) {
        (Ok(meta), Ok(_), Ok(_)) => meta,
        (Err(_), Err(()), _) | (Err(_), _, Err(())) => return,
        (Ok(_), _, _) => panic!("from_parts accepted a bad key or partition: {input:?}"),
        (Err(e), _, _) => panic!("from_parts refused ({e}) a good request: {input:?}"),
    };
    let key = key.expect("checked");
    let partition = partition.expect("checked");
    assert_eq!(meta.key.as_deref(), key.as_deref(), "key");
    assert_eq!(meta.partition, partition, "partition");
    let mut got_headers: Vec<(String, Vec<u8>)> = meta
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), v.to_vec()))
        .collect();
    got_headers.sort();
    want_headers.sort();
    assert_eq!(got_headers, want_headers, "headers");
    let headers_in_order: Vec<(String, Vec<u8>)> = meta
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), v.to_vec()))
        .collect();

    let partitions = match input.partitions {
        PartitionCount::Small(n) => i32::from(n) + 1,
        PartitionCount::Any(n) => n.checked_abs().unwrap_or(i32::MAX).max(1),
    };
    let strategy = [
        Partitioner::Auto,
        Partitioner::Random,
        Partitioner::RoundRobin,
        Partitioner::KeyHash,
        Partitioner::Sticky,
    ][usize::from(input.strategy % 5)];
    let info = TopicInfo::with_partitions(partitions);
    let values: Vec<Bytes> = (0..input.values % 8)
        .map(|i| Bytes::from(vec![i; usize::from(i)]))
        .collect();
    let result = meta.into_records(values.clone(), strategy, &info);
    let records = match result {
        Err(_) => {
            assert!(
                partition.is_some_and(|p| p >= partitions)
                    || (partition.is_none()
                        && key.is_none()
                        && strategy == Partitioner::KeyHash
                        && !values.is_empty()),
                "into_records refused a good request: {input:?}"
            );
            return;
        }
        Ok(records) => records,
    };
    assert!(
        partition.is_none_or(|p| p < partitions),
        "out of range accepted"
    );
    assert_eq!(records.len(), values.len());
    for (record, value) in records.iter().zip(&values) {
        assert_eq!(&record.value, value);
        assert_eq!(record.key.as_deref(), key.as_deref());
        if let Some(p) = record.partition {
            assert!(
                (0..partitions).contains(&p),
                "partition {p} of {partitions}"
            );
        }
        let want = match (partition, strategy, &key) {
            (Some(p), _, _) => Some(Some(p)),
            (None, Partitioner::Auto, None) => Some(None),
            (None, Partitioner::Auto | Partitioner::KeyHash, Some(k)) => {
                Some(Some(key_hash(k, partitions as u32) as i32))
            }
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(record.partition, want, "{strategy:?}");
        } else {
            assert!(
                record.partition.is_some(),
                "{strategy:?} chose no partition"
            );
        }
        let got: Vec<(String, Vec<u8>)> = record
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
            .collect();
        assert_eq!(got, headers_in_order, "record headers");
    }
}
