//! Hooks end to end on tansu: every outcome (forward with edits, topic rewrite, reject, respond,
//! respond-then-produce, timeout, failure, error hook) through a Lua script and through a Rust
//! hook that make the same decisions, checked against what lands on the broker.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Gateway, Reply, broker, consume};
use kafboy::config::Mode;
use kafboy::hook::{
    Failure, Forward, Hook, HookError, HookFuture, HookRequest, Respond, StatusCode, Verdict,
};
use serde_json::{Value, json};

/// The Lua side of the test hook; the Rust side below makes the same decisions. `ESCAPED` is
/// replaced with a path the sandbox must keep the script from creating.
const SCRIPT: &str = r#"
errors = 0
function on_request(req)
  local case = req:header("x-case")
  if case == "edit" then
    req:set("extra", 1)
    req:set("user.tags", {"a", "b"})
    req:delete("secret")
    req:set_key("k-" .. req:get("user.id"))
    req:set_header("seen-by", "hook")
    return forward()
  elseif case == "topic" then
    req:set_topic(req:query("to"))
    return nil
  elseif case == "reject" then
    return reject(403, "no " .. req:topic())
  elseif case == "reject-busy" then
    return reject(429, "later")
  elseif case == "reject-ok" then
    return reject(200, "fine?")
  elseif case == "respond" then
    return respond(201, '{"hi":"' .. req:method() .. " " .. req:path() .. " " .. req:query() .. '"}')
  elseif case == "peer" then
    return respond(200, req:peer())
  elseif case == "later" then
    req:set("extra", "true")
    return respond(200, '{"ok":"fast reply"}', "sync")
  elseif case == "busy-but-produce" then
    return respond(503, '{"error":"busy"}', "async")
  elseif case == "later-to" then
    local to = req:query("to")
    if to then req:set_topic(to) end
    return respond(200, '{"ok":"fast reply"}', "async")
  elseif case == "slow" then
    while true do end
  elseif case == "sneaky" then
    while true do pcall(function() while true do end end) end
  elseif case == "fail" then
    error("boom")
  elseif case == "trim" then
    return respond(200, (req:get("text"):match("^%s*(.-)%s*$")))
  elseif case == "escape" then
    os.execute("touch ESCAPED")
  elseif case == "hog" then
    local s = string.rep("x", 1024 * 1024 * 1024)
    return respond(200, s)
  elseif case == "errors" then
    return respond(200, tostring(errors))
  elseif case == "caught" then
    local ok = pcall(req.get, req, "user.id")
    error("a failure of the script's own, after " .. tostring(ok))
  elseif case == "later-far" then
    req:set_partition(99)
    return respond(200, '{"ok":"fast reply"}', "async")
  elseif case == "id" then
    return respond(200, req:request_id())
  elseif case == "key" then
    local asked = tostring(req:key())
    req:set_key("mine")
    return respond(200, asked .. " " .. req:key())
  end
end

function on_error(status, message, topic)
  errors = errors + 1
end
"#;

/// A failure as the error hook saw it: status, message, topic, request id.
type Seen = (u16, String, Option<String>, Option<String>);
type Errors = Arc<Mutex<Vec<Seen>>>;

/// Requests the Rust hook held on to after its verdict.
static KEPT: Mutex<Vec<Arc<HookRequest>>> = Mutex::new(Vec::new());

/// The Rust side.
struct TestHook {
    errors: Errors,
}

impl Hook for TestHook {
    fn on_request(&self, req: Arc<HookRequest>) -> HookFuture {
        if req.headers.get("x-case").is_some_and(|v| v == "keep") {
            KEPT.lock().unwrap().push(req.clone());
        }
        let errors = self.errors.clone();
        Box::pin(async move { decide(&req, &errors).await })
    }

    fn on_error(&self, f: &Failure<'_>) {
        self.errors.lock().unwrap().push((
            f.status.as_u16(),
            f.message.to_string(),
            f.topic.map(String::from),
            f.request_id.map(String::from),
        ));
    }
}

async fn decide(req: &HookRequest, errors: &Mutex<Vec<Seen>>) -> Result<Verdict, HookError> {
    let case = req
        .headers
        .get("x-case")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let query = |name: &str| {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(req.query.as_deref().unwrap_or("")).unwrap();
        pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    };
    let edited = |f: &dyn Fn(&mut Value)| -> Result<Bytes, HookError> {
        let mut v = req.json().map_err(|e| HookError(e.to_string()))?.clone();
        f(&mut v);
        Ok(Bytes::from(serde_json::to_vec(&v).unwrap()))
    };
    Ok(match case.as_str() {
        "edit" => {
            let id = req.json().map_err(|e| HookError(e.to_string()))?["user"]["id"].clone();
            Verdict::Forward(Forward {
                body: Some(edited(&|v| {
                    v["extra"] = json!(1);
                    v["user"]["tags"] = json!(["a", "b"]);
                    v.as_object_mut().unwrap().remove("secret");
                })?),
                key: Some(Bytes::from(format!("k-{id}"))),
                headers: vec![("seen-by".into(), Bytes::from_static(b"hook"))],
                ..Forward::default()
            })
        }
        "topic" => Verdict::Forward(Forward {
            topic: query("to"),
            ..Forward::default()
        }),
        "reject" => Verdict::Reject {
            status: StatusCode::FORBIDDEN,
            message: format!("no {}", req.topic),
        },
        "reject-busy" => Verdict::Reject {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "later".into(),
        },
        "reject-ok" => Verdict::Reject {
            status: StatusCode::OK,
            message: "fine?".into(),
        },
        "respond" => Verdict::Respond(Respond {
            status: StatusCode::CREATED,
            body: Bytes::from(format!(
                "{{\"hi\":\"{} {} {}\"}}",
                req.method,
                req.path,
                req.query.clone().unwrap_or_default()
            )),
            content_type: None,
            then: None,
        }),
        "peer" => Verdict::Respond(Respond {
            status: StatusCode::OK,
            body: Bytes::from(req.peer.map(|p| p.to_string()).unwrap_or_default()),
            content_type: None,
            then: None,
        }),
        "later" => Verdict::Respond(Respond {
            status: StatusCode::OK,
            body: Bytes::from_static(br#"{"ok":"fast reply"}"#),
            content_type: None,
            then: Some((
                Mode::Sync,
                Forward {
                    body: Some(edited(&|v| v["extra"] = json!("true"))?),
                    ..Forward::default()
                },
            )),
        }),
        "busy-but-produce" => Verdict::Respond(Respond {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: Bytes::from_static(br#"{"error":"busy"}"#),
            content_type: None,
            then: Some((Mode::Async, Forward::default())),
        }),
        "later-to" => Verdict::Respond(Respond {
            status: StatusCode::OK,
            body: Bytes::from_static(br#"{"ok":"fast reply"}"#),
            content_type: None,
            then: Some((
                Mode::Async,
                Forward {
                    topic: query("to"),
                    ..Forward::default()
                },
            )),
        }),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Verdict::Forward(Forward::default())
        }
        "fail" => return Err(HookError("boom".into())),
        "id" => Verdict::Respond(Respond {
            status: StatusCode::OK,
            body: Bytes::from(req.request_id().unwrap_or_default().to_string()),
            content_type: None,
            then: None,
        }),
        "errors" => Verdict::Respond(Respond {
            status: StatusCode::OK,
            body: Bytes::from(errors.lock().unwrap().len().to_string()),
            content_type: None,
            then: None,
        }),
        _ => Verdict::Forward(Forward::default()),
    })
}

const TOML: &str = "[hook]\ntimeout = \"2s\"\nmax_memory_bytes = 16777216\n";

async fn lua_gateway(addr: &str, escaped: &std::path::Path) -> Gateway {
    let mut file = tempfile::Builder::new().suffix(".lua").tempfile().unwrap();
    let script = SCRIPT.replace("ESCAPED", &escaped.display().to_string());
    file.write_all(script.as_bytes()).unwrap();
    let path = file.into_temp_path().keep().unwrap();
    common::gateway(
        addr,
        &format!("{TOML}script = {:?}\n", path.display().to_string()),
    )
    .await
}

async fn rust_gateway(addr: &str, errors: Errors) -> Gateway {
    let mut config = kafboy::Config::from_toml(TOML).unwrap();
    config.kafka.brokers = vec![addr.to_string()];
    let app = kafboy::App::builder(config)
        .hook(TestHook { errors })
        .build()
        .unwrap();
    common::serve(app).await
}

async fn post(gw: &Gateway, path: &str, case: &str, body: &str) -> Reply {
    let r = common::client()
        .post(format!("{}{path}", gw.url))
        .header("x-case", case)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    Reply::read(r).await
}

/// The same checks, whichever language the hook is written in.
async fn every_outcome(gw: &Gateway, b: &common::Broker) {
    let topic = b.topic("hook", 1);
    let other = b.topic("hook-other", 1);
    let p = format!("/sync/{topic}");
    let body = r#"{"user":{"id":7},"secret":"pw","z":1}"#;

    // The client's own `seen-by` header is replaced by the hook's, not kept beside it.
    let r = common::client()
        .post(format!("{}{p}", gw.url))
        .header("x-case", "edit")
        .header("content-type", "application/json")
        .header("x-kafka-header-Seen-By", "forged")
        .header("x-kafka-header-kept", "yes")
        .body(body)
        .send()
        .await
        .unwrap();
    let r = Reply::read(r).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(gw, &format!("{p}?to={other}"), "topic", body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["topic"], other.as_str());
    let r = post(gw, &format!("{p}?to=__internal"), "topic", body).await;
    assert_eq!(
        r.status, 400,
        "a rewritten topic passes the same checks: {}",
        r.body
    );
    let r = post(gw, &p, "reject", body).await;
    assert_eq!((r.status, r.error()), (403, format!("no {topic}")));
    // The request's id, as its answer gives it: the client's own, or the one kafboy made.
    let r = common::client()
        .post(format!("{}{p}", gw.url))
        .header("x-case", "id")
        .header("x-request-id", "req-42")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(Reply::read(r).await.body, "req-42");
    let r = post(gw, &p, "id", body).await;
    assert_eq!(r.body, r.headers["x-request-id"].to_str().unwrap());
    assert_eq!(r.body.len(), 16, "{}", r.body);
    let r = post(gw, &p, "reject-busy", body).await;
    assert_eq!(
        (r.status, r.headers["retry-after"].to_str().unwrap()),
        (429, "1")
    );
    let r = post(gw, &p, "reject-ok", body).await;
    assert_eq!(r.status, 500, "a rejection is an error status: {}", r.body);
    let r = post(gw, &format!("{p}?q=1"), "respond", body).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (201, format!(r#"{{"hi":"POST {p} q=1"}}"#).as_str())
    );
    let r = post(gw, &p, "peer", body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.starts_with("127.0.0.1:"),
        "the client's address: {}",
        r.body
    );
    let r = post(gw, &p, "later", r#"{"n":1}"#).await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"ok":"fast reply"}"#));
    // A client told 503 must find nothing written: a hook cannot answer so and produce.
    let r = post(gw, &p, "busy-but-produce", r#"{"n":2}"#).await;
    assert_eq!(r.status, 500, "{}", r.body);
    // A body that cannot be produced is refused before the hook's reply, not after it.
    let r = post(gw, &p, "later-to", "{not json").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("invalid json"), "{}", r.body);
    // So is a topic the brokers do not have.
    let missing = format!("{p}?to={}", common::unique_name("hook-missing"));
    let r = post(gw, &missing, "later-to", "{}").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = post(gw, &p, "plain", "").await;
    assert_eq!(
        (r.status, r.error()),
        (400, "empty body".to_string()),
        "forwarded empty body is still refused"
    );

    let got = consume(&b.addr, &topic, 2);
    assert_eq!(got.len(), 2);
    // Then a marker through each producer a request above may have used: the route's (sync)
    // and the one the respond-then-produce cases asked for (async). Whatever else was written
    // comes before them.
    for route in ["sync", "async"] {
        let r = post(gw, &format!("/{route}/{topic}"), "plain", common::MARKER).await;
        assert!(matches!(r.status, 200 | 202), "{route}: {}", r.body);
    }
    assert_eq!(
        common::before_markers(&b.addr, &topic, 2),
        got,
        "nothing else landed"
    );
    let edited: Value = serde_json::from_slice(&got[0].value).unwrap();
    assert_eq!(
        edited,
        json!({"user": {"id": 7, "tags": ["a", "b"]}, "z": 1, "extra": 1})
    );
    assert_eq!(got[0].key.as_deref(), Some(&b"k-7"[..]));
    let mut headers = got[0].headers.clone();
    headers.retain(|(name, _)| name != "kafboy-id");
    headers.sort();
    assert_eq!(
        headers,
        [
            ("kept".to_string(), Some(b"yes".to_vec())),
            ("seen-by".to_string(), Some(b"hook".to_vec()))
        ]
    );
    assert_eq!(
        &got[1].value[..],
        br#"{"n":1,"extra":"true"}"#,
        "produced after the reply"
    );
    assert_eq!(consume(&b.addr, &other, 1)[0].value, body.as_bytes());

    // A 405 does not reach the error hook (anyone could make the script run, without a key).
    // Failures so far: bad topic, the three rejects, the 503 that asked to produce, the body and
    // the topic refused before the hook's reply, empty.
    let r = common::client()
        .put(format!("{}{p}", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = post(gw, &p, "errors", "{}").await;
    assert_eq!(r.body, "8", "error hook calls");
    // Last: a Lua state that ran out of its budget is replaced, and its globals (the count
    // above) start over.
    for case in ["slow", "fail"] {
        let start = Instant::now();
        let r = post(gw, &p, case, body).await;
        assert_eq!(r.status, 500, "{case}: {}", r.body);
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "{case} took {:?}",
            start.elapsed()
        );
        if case == "fail" {
            assert_eq!(r.error(), "hook failed", "details stay in the log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn lua_hook_outcomes() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let escaped = dir.path().join("escaped");
    let gw = lua_gateway(&b.addr, &escaped).await;
    every_outcome(&gw, b).await;
    let p = "/async/nope";
    for case in ["escape", "hog", "sneaky"] {
        let r = post(&gw, p, case, "{}").await;
        assert_eq!(r.status, 500, "{case}: {}", r.body);
    }
    assert!(!escaped.exists(), "the script ran a command");
    // The usual trim pattern takes time quadratic in a run of inner spaces: minutes for this
    // body in Lua's own matcher, which no budget reached. Now the hook's budget stops it.
    let r = post(&gw, p, "trim", r#"{"text":"  hi  "}"#).await;
    assert_eq!((r.status, r.body.as_str()), (200, "hi"));
    let long = format!(r#"{{"text":"x{}y"}}"#, " ".repeat(200_000));
    let started = Instant::now();
    let r = post(&gw, p, "trim", &long).await;
    assert_eq!(r.status, 500, "{:.100}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // A script that reads a body that is not JSON fails on the client's account: 400, as
    // without a hook, not the hook's 500.
    let topic = b.topic("hook-bad-body", 1);
    for (body, want) in [("{\"user\":", "invalid json"), ("", "empty body")] {
        let r = post(&gw, &format!("/sync/{topic}"), "edit", body).await;
        assert_eq!(r.status, 400, "{body:?}: {}", r.body);
        assert!(r.error().contains(want), "{body:?}: {}", r.body);
    }
    // A form of too many fields is the 413 it is without a hook, once the script reads it.
    let form = "a=1&".repeat(10_001);
    let r = common::client()
        .post(format!("{}/sync/{topic}", gw.url))
        .header("x-case", "edit")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    let r = Reply::read(r).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("fields"), "{}", r.body);
    // Once the script caught that error, what fails next is the script's own: 500.
    let r = post(&gw, &format!("/sync/{topic}"), "caught", "{\"user\":").await;
    assert_eq!(r.status, 500, "{}", r.body);
    // A record that cannot be built (a partition the topic does not have) is refused before a
    // respond-then-produce reply, not after it.
    let r = post(&gw, &format!("/async/{topic}"), "later-far", "{}").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("out of range"), "{}", r.body);
    // key() is the key the request asked for, until the script sets its own.
    for (path, want) in [
        (format!("{p}?key=kk"), "kk mine"),
        (p.to_string(), "nil mine"),
    ] {
        let r = post(&gw, &path, "key", "{}").await;
        assert_eq!((r.status, r.body.as_str()), (200, want));
    }
    // The state survives its errors.
    assert_eq!(post(&gw, p, "reject", "{}").await.status, 403);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn rust_hook_outcomes() {
    let b = broker();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let gw = rust_gateway(&b.addr, errors.clone()).await;
    every_outcome(&gw, b).await;
    // A hook may keep the request past its verdict; the record is produced all the same.
    let topic = b.topic("hook-kept", 1);
    let body = r#"{"kept":true}"#;
    let r = post(&gw, &format!("/sync/{topic}"), "keep", body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(consume(&b.addr, &topic, 1)[0].value, body.as_bytes());
    let kept = KEPT.lock().unwrap().pop().unwrap();
    assert_eq!(
        (kept.topic.as_str(), &kept.body[..]),
        (topic.as_str(), body.as_bytes())
    );
    let seen = errors.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|(s, m, t, id)| *s == 403 && m.starts_with("no ") && t.is_some() && id.is_some()),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(s, m, _, _)| *s == 500 && m.contains("within 2s")),
        "{seen:?}"
    );
    // A refusal before admission (here a topic's name) costs nothing and reaches no hook.
    errors.lock().unwrap().clear();
    let r = post(&gw, "/async/no%20spaces", "forward", "{}").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    gw.stop().await;
}

/// A mock cluster with topic `from`, and an app on it with [`TestHook`] and `toml`.
fn test_hook_app(
    toml: &str,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    kafboy::App,
    Errors,
) {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("from", 1, 1).unwrap();
    let mut config = kafboy::Config::from_toml(toml).unwrap();
    config.kafka.brokers = vec![mock.bootstrap_servers()];
    let errors: Errors = Arc::new(Mutex::new(Vec::new()));
    let app = kafboy::App::builder(config)
        .hook(TestHook {
            errors: errors.clone(),
        })
        .build()
        .unwrap();
    (mock, app, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_produce_the_hook_asked_for_after_its_reply() {
    let (mock, app, errors) = test_hook_app(TOML);
    let producers = app.producers().clone();
    let gw = common::serve(app).await;
    // A topic the gateway has not looked up yet, behind a slow broker: the record the hook
    // asked for is queued before the reply, and still undelivered when the shutdown starts.
    mock.create_topic("late", 1, 1).unwrap();
    mock.broker_round_trip_time(1, Duration::from_millis(700))
        .unwrap();
    let r = post(&gw, "/async/from?to=late", "later-to", "{}").await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"ok":"fast reply"}"#));
    assert_eq!(
        producers.tally(),
        (0, 0),
        "still under way as the shutdown starts"
    );
    let report = gw.stop().await;
    assert_eq!(report.undelivered, 0);
    assert_eq!(
        producers.tally(),
        (1, 0),
        "delivered before the shutdown was over"
    );
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_fails_after_the_hooks_reply_is_lost_with_the_shutdown() {
    let toml =
        format!("{TOML}[kafka]\nmessage_timeout = \"2s\"\n[server]\nshutdown_timeout = \"8s\"\n");
    let (mock, app, errors) = test_hook_app(&toml);
    let gw = common::serve(app).await;
    mock.broker_down(-1).unwrap();
    // The client has the hook's 200 before its record's acknowledgement, which never comes.
    let r = post(&gw, "/async/from", "later", "{}").await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"ok":"fast reply"}"#));
    let report = gw.stop().await;
    assert_eq!((report.undelivered, report.failed), (0, 1), "{report:?}");
    assert_eq!(
        errors.lock().unwrap().len(),
        1,
        "{:?}",
        errors.lock().unwrap()
    );
}

#[test]
fn script_errors_name_file_and_line() {
    let mut file = tempfile::Builder::new().suffix(".lua").tempfile().unwrap();
    file.write_all(b"function on_request(req)\n  return forward(\nend\n")
        .unwrap();
    let path = file.path().display().to_string();
    let config = kafboy::Config::from_toml(&format!("[hook]\nscript = {path:?}")).unwrap();
    let err = kafboy::App::build(&config)
        .err()
        .expect("syntax error refused");
    assert!(err.contains(&format!("{path}:3:")), "{err}");
    let mut file = tempfile::Builder::new().suffix(".lua").tempfile().unwrap();
    file.write_all(b"x = 1\n").unwrap();
    let config = kafboy::Config::from_toml(&format!(
        "[hook]\nscript = {:?}",
        file.path().display().to_string()
    ))
    .unwrap();
    let err = kafboy::App::build(&config)
        .err()
        .expect("missing on_request refused");
    assert!(err.contains("on_request"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_the_answer_to_a_respond_then_produce() {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("from", 1, 1).unwrap();
    let toml = format!(
        "{TOML}[kafka]\nqueue_max_messages = 1\n\
         [server]\nenqueue_timeout = \"100ms\"\nshutdown_timeout = \"1s\""
    );
    let mut config = kafboy::Config::from_toml(&toml).unwrap();
    config.kafka.brokers = vec![mock.bootstrap_servers()];
    let errors = Arc::new(Mutex::new(Vec::new()));
    let app = kafboy::App::builder(config)
        .hook(TestHook { errors })
        .build()
        .unwrap();
    let producers = app.producers().clone();
    let gw = common::serve(app).await;
    let r = post(&gw, "/async/from", "later-to", "{}").await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"ok":"fast reply"}"#));
    let deadline = Instant::now() + Duration::from_secs(10);
    while producers.tally().0 < 1 {
        assert!(
            Instant::now() < deadline,
            "the first record was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // With the broker slow to answer, one record in flight fills the queue. (Not
    // `broker_down`: librdkafka's mock re-binds the broker's port at once, and aborts the whole
    // test process when the port is still taken.)
    mock.broker_round_trip_time(1, Duration::from_secs(10))
        .unwrap();
    let r = post(&gw, "/async/from", "plain", "{}").await;
    assert_eq!(r.status, 202, "{}", r.body);
    // The hook's reply would hide that its record was never queued.
    let r = post(&gw, "/async/from", "later-to", "{}").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.error().contains("queue full"), "{}", r.body);
    gw.stop().await;
}

/// A Rust hook that fails in the ways a Rust hook can: panics, blocks, answers what cannot be
/// sent. Its error hook panics too.
struct Unruly;

impl Hook for Unruly {
    fn on_request(&self, req: Arc<HookRequest>) -> HookFuture {
        let case = req.headers["x-case"].to_str().unwrap().to_string();
        if case == "panic" {
            panic!("on_request");
        }
        if case == "block" {
            // Blocks the worker past `hook.timeout`, then answers at once.
            std::thread::sleep(Duration::from_millis(2500));
            return kafboy::hook::ready(Ok(Verdict::Forward(Forward::default())));
        }
        Box::pin(async move {
            let respond = |status: u16, content_type: Option<&str>| {
                Ok(Verdict::Respond(Respond {
                    status: StatusCode::from_u16(status).unwrap(),
                    body: Bytes::from_static(b"{}"),
                    content_type: content_type.map(String::from),
                    then: None,
                }))
            };
            match case.as_str() {
                "block-later" => {
                    tokio::task::yield_now().await;
                    std::thread::sleep(Duration::from_millis(2500));
                    Ok(Verdict::Forward(Forward::default()))
                }
                "panic-later" => {
                    tokio::task::yield_now().await;
                    panic!("a later poll");
                }
                "early-hints" => respond(103, None),
                "past-599" => respond(600, None),
                "bad-type" => respond(200, Some("text/plain\nx: y")),
                "below-0" => Ok(Verdict::Forward(Forward {
                    partition: Some(-1),
                    ..Forward::default()
                })),
                // Read, and answered without producing: a body `json` takes shows as a 200.
                "json" => match req.json() {
                    Ok(_) => respond(200, None),
                    Err(e) => Ok(Verdict::bad_body(e)),
                },
                _ => Ok(Verdict::Forward(Forward::default())),
            }
        })
    }

    fn on_error(&self, _: &Failure<'_>) {
        panic!("on_error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_rust_hook_that_panics_blocks_or_answers_the_unsendable_fails_with_500() {
    let b = broker();
    let topic = b.topic("hook-unruly", 1);
    let mut config = kafboy::Config::from_toml(TOML).unwrap();
    config.kafka.brokers = vec![b.addr.clone()];
    // An embedder's shared hook is a hook.
    let shared: Arc<dyn Hook> = Arc::new(Unruly);
    let app = kafboy::App::builder(config).hook(shared).build().unwrap();
    let gw = common::serve(app).await;
    let p = format!("/sync/{topic}");
    for (case, error) in [
        ("panic", "hook failed"),
        ("panic-later", "hook failed"),
        ("block", "hook gave no answer within 2s"),
        ("block-later", "hook gave no answer within 2s"),
        ("early-hints", "hook failed"),
        ("past-599", "hook failed"),
        ("bad-type", "hook failed"),
        ("below-0", "hook failed"),
    ] {
        let r = post(&gw, &p, case, r#"{"case":1}"#).await;
        assert_eq!((r.status, r.error()), (500, error.into()), "{case}");
    }
    // The route's own refusals, through `json()` and `bad_body`: nested past
    // `server.max_json_depth` (serde_json alone allows 128), and JSON sent as a form.
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    let r = post(&gw, &p, "json", &deep).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("deep"), "{}", r.body);
    let r = common::client()
        .post(format!("{}{p}", gw.url))
        .header("x-case", "json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(Reply::read(r).await.status, 415);
    // Nothing of the above was written; the panicking error hook changed no answer.
    let r = post(&gw, &p, "plain", r#"{"last":1}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["offset"], 0, "{}", r.body);
    let records = common::consume(&b.addr, &topic, 1);
    assert_eq!(records[0].value, br#"{"last":1}"#);
    gw.stop().await;
}
