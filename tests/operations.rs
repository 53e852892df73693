//! What operators see: `/metrics` (scraped and parsed), request ids, `/status.json`, the status
//! page rendered in headless Chromium while traffic flows, `/openapi.json` against the routes
//! really served, and the admin listener.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{broker, client, gateway};

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses the exposition format strictly enough that a malformed line fails the test.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.split_whitespace();
            let kind = parts.next().unwrap();
            assert!(kind == "TYPE" || kind == "HELP", "bad comment: {line}");
            if kind == "TYPE" {
                let t = parts.nth(1).unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary"].contains(&t),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), HashMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let labels = body
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label: {line}"));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

async fn scrape(url: &str) -> Vec<Sample> {
    parse_exposition(&common::get_text(&format!("{url}/metrics")).await)
}

/// The status of `GET url`.
async fn status_of(url: &str) -> u16 {
    client().get(url).send().await.unwrap().status().as_u16()
}

/// A gateway on `config`'s routes with an admin listener too; and the admin listener's URL.
async fn with_admin(toml: &str) -> (common::Gateway, String) {
    let mut config = kafboy::Config::from_toml(toml).unwrap();
    config.kafka.brokers = vec![broker().addr.clone()];
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    let app = kafboy::App::build(&config)
        .unwrap()
        .with_admin_listener(admin);
    (common::serve(app).await, admin_url)
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_records_and_broker_state_with_bounded_labels() {
    let b = broker();
    let listed = b.topic("metered", 2);
    let unlisted = b.topic("unmetered", 1);
    // A route of its own: the request counters are process-wide, and other tests of this
    // binary use the default routes.
    let toml = format!(
        "[topics]\nallow = [\"{listed}\", \"unmetered-*\"]\n[kafka]\nstatistics_interval = \"200ms\"\n\
         [[routes]]\npath = \"/metered/:topic\"\nmode = \"sync\""
    );
    let gw = gateway(&b.addr, &toml).await;
    let route = [("route", "/metered/:topic")];
    let other_before = find(
        &scrape(&gw.url).await,
        "kafboy_records_accepted_total",
        &[("topic", "other")],
    )
    .map_or(0.0, |s| s.value);
    for _ in 0..3 {
        assert_eq!(
            gw.post_json(&format!("/metered/{listed}"), "{}")
                .await
                .status,
            200
        );
    }
    assert_eq!(
        gw.post_json(&format!("/metered/{unlisted}"), "{}")
            .await
            .status,
        200
    );
    assert_eq!(
        gw.post_json(&format!("/metered/{listed}"), "{bad")
            .await
            .status,
        400
    );
    // Series are per process: other tests' brokers (some gone, or idle) have theirs too.
    let sync_broker_up = |samples: &[Sample]| {
        samples.iter().any(|s| {
            s.name == "kafboy_broker_up"
                && s.labels.get("producer").map(String::as_str) == Some("sync")
                && s.value == 1.0
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let samples = scrape(&gw.url).await;
        if sync_broker_up(&samples) {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "no broker statistics in /metrics: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let count = |name: &str, extra: &[(&str, &str)]| {
        let labels: Vec<(&str, &str)> = route.iter().chain(extra).copied().collect();
        find(&samples, name, &labels).map(|s| s.value)
    };
    assert_eq!(
        count("kafboy_http_requests_total", &[("class", "2xx")]),
        Some(4.0)
    );
    assert_eq!(
        count("kafboy_http_requests_total", &[("class", "4xx")]),
        Some(1.0)
    );
    assert_eq!(
        count("kafboy_http_request_duration_seconds_count", &[]),
        Some(5.0)
    );
    assert_eq!(
        count(
            "kafboy_http_request_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        Some(5.0)
    );
    assert_eq!(
        find(
            &samples,
            "kafboy_records_accepted_total",
            &[("topic", &listed)]
        )
        .unwrap()
        .value,
        3.0
    );
    assert_eq!(
        find(
            &samples,
            "kafboy_records_delivered_total",
            &[("topic", &listed)]
        )
        .unwrap()
        .value,
        3.0
    );
    // Others in this binary may add to "other" too, never take from it.
    let other = find(
        &samples,
        "kafboy_records_accepted_total",
        &[("topic", "other")],
    )
    .unwrap()
    .value;
    assert!(other >= other_before + 1.0, "{other_before} then {other}");
    assert!(
        samples
            .iter()
            .all(|s| s.labels.get("topic") != Some(&unlisted)),
        "a topic not named in the config never becomes a label"
    );
    // Every sync record was acknowledged: none is left in the queue.
    assert_eq!(
        find(
            &samples,
            "kafboy_producer_queued_records",
            &[("producer", "sync")]
        )
        .map(|s| s.value),
        Some(0.0)
    );
    assert!(
        find(
            &samples,
            "kafboy_producer_in_flight_records",
            &[("producer", "batch")]
        )
        .is_some()
    );
    assert_eq!(find(&samples, "kafboy_ready", &[]).unwrap().value, 1.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_generated() {
    let b = broker();
    let topic = b.topic("reqid", 1);
    let gw = gateway(&b.addr, "").await;
    let url = format!("{}/async/{topic}", gw.url);
    let r = client()
        .post(&url)
        .header("x-request-id", "abc-123")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = client()
        .post(&url)
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    // An odd id (too long) is replaced, on every answer, routed or not.
    for path in [format!("/async/{topic}"), "/no/such/route".to_string()] {
        let r = client()
            .post(format!("{}{path}", gw.url))
            .header("x-request-id", "x".repeat(129))
            .body("{}")
            .send()
            .await
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{path}: {id}"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_the_admin_listener() {
    let topic = broker().topic("status", 3);
    let (gw, admin_url) =
        with_admin("[[routes]]\npath = \"/events\"\ntopic = \"x\"\nmode = \"sync\"").await;
    assert_eq!(
        gw.post_json(&format!("/sync/{topic}"), "{}").await.status,
        200
    );
    let status: serde_json::Value = common::get_json(&format!("{admin_url}/status.json")).await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["ready"], true);
    assert!(
        status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"] == "/events" && r["mode"] == "sync")
    );
    assert!(
        status["topics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == topic.as_str() && t["partitions"] == 3)
    );
    assert!(status["totals"]["records_accepted"].as_u64().unwrap() >= 1);
    assert_eq!(status["producers"][0]["name"], "sync");
    // With an admin listener, /metrics and the status page live there only, and each
    // listener's /openapi.json describes what that listener serves.
    let main = common::get_json(&format!("{}/openapi.json", gw.url)).await;
    let private = common::get_json(&format!("{admin_url}/openapi.json")).await;
    for path in ["/metrics", "/", "/status.json"] {
        assert!(
            main["paths"][path].is_null(),
            "{path} described on the main listener"
        );
        assert!(
            private["paths"][path].is_object(),
            "{path} not described on the admin one"
        );
        assert!(
            private["paths"]["/async/{topic}"].is_null(),
            "no produce route there"
        );
        assert_eq!(status_of(&format!("{}{path}", gw.url)).await, 404, "{path}");
    }
    assert_eq!(status_of(&format!("{}/metrics", gw.url)).await, 404);
    let r = client()
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("kafboy_http_requests_total")
    );
    assert_eq!(
        client()
            .get(format!("{admin_url}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .post(format!("{admin_url}/async/{topic}"))
            .body("{}")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    gw.stop().await;
}

/// A `/:topic` route does not take kafboy's own paths: not `/metrics` and `/status.json` once
/// they moved to the admin listener, nor any of them with a trailing slash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_topic_route_leaves_kafboys_own_paths_alone() {
    let b = broker();
    let topic = b.topic("root", 1);
    let (gw, admin_url) = with_admin("[[routes]]\npath = \"/:topic\"\nmode = \"async\"").await;
    for path in [
        "/metrics",
        "/status.json",
        "/metrics/",
        "/status.json/",
        "/health/",
        "/ready/",
        "/disco/",
        "/openapi.json/",
        // Escaped letters are the letters (RFC 3986): not topics named after these paths.
        "/%6Detrics",
        "/%73tatus.json",
    ] {
        let r = gw.post_json(path, "{}").await;
        assert_eq!(r.status, 404, "POST {path}: {}", r.body);
        // No route, not an unknown topic named after the path.
        assert_eq!(r.body, r#"{"error":"not found"}"#, "POST {path}");
        assert_eq!(
            status_of(&format!("{}{path}", gw.url)).await,
            404,
            "GET {path}"
        );
    }
    // Nor a `%` that starts no escape: `%%36D` does not become `%6D` by decoding around it,
    // which the topic's own decoding would then take for `m`.
    let r = gw.post_json("/%%36Detrics", "{}").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("topic"), "{}", r.body);
    assert_eq!(gw.post_json(&format!("/{topic}"), "{}").await.status, 202);
    assert_eq!(gw.post_json(&format!("/{topic}/"), "{}").await.status, 202);
    assert_eq!(status_of(&format!("{admin_url}/metrics")).await, 200);
    let report = gw.stop().await;
    assert_eq!(report.undelivered, 0);
    let values = common::values(&common::consume(&b.addr, &topic, 2));
    assert_eq!(values, ["{}", "{}"]);
}

fn chromium() -> String {
    if let Ok(p) = std::env::var("KAFBOY_CHROMIUM") {
        return p;
    }
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!(
        "headless Chromium is needed by this test: run scripts/test (it installs Debian's chromium) or set KAFBOY_CHROMIUM"
    );
}

fn headless(args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
        ])
        .args([
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_numbers_and_a_chart_while_traffic_flows() {
    let b = broker();
    let topic = b.topic("page", 2);
    let gw = gateway(&b.addr, "").await;
    let url = format!("{}/async/{topic}", gw.url);
    // Until the page is read.
    let traffic = tokio::spawn(async move {
        loop {
            let _ = client().post(&url).body("{\"n\":1}").send().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // The chart needs a few one-second samples, one of them with records in it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = common::get_json(&format!("{}/status.json", gw.url)).await;
        let history = status["history"].as_array().cloned().unwrap_or_default();
        if history.len() >= 2 && history.iter().any(|s| s["accepted"].as_u64() > Some(0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no samples with traffic: {history:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = format!("{}/", gw.url);
    let dom = tokio::task::spawn_blocking(move || {
        let out = headless(&["--virtual-time-budget=4000", "--dump-dom", &page]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap();
    traffic.abort();
    assert!(
        dom.contains("data-rendered=\"yes\""),
        "page never rendered:\n{dom}"
    );
    assert!(dom.contains(">ready<"), "{dom}");
    let points = dom
        .split("id=\"line-accepted\"")
        .nth(1)
        .unwrap()
        .split("points=\"")
        .nth(1)
        .unwrap();
    let points = &points[..points.find('"').unwrap()];
    assert!(
        points.split(' ').count() >= 2,
        "the chart has a line: {points:?}"
    );
    let accepted = dom.split("id=\"accepted\">").nth(1).unwrap();
    let accepted: String = accepted.chars().take_while(|c| *c != '<').collect();
    assert!(
        accepted.parse::<u64>().is_ok_and(|n| n > 0),
        "records are counted: {accepted:?}"
    );
    assert!(dom.contains(&topic), "topics are listed");
    assert!(dom.contains("/batch/async/:topic"), "routes are listed");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_exactly_the_routes_served() {
    let b = broker();
    let spec: serde_json::Value = serde_json::from_str(kafboy::openapi::SPEC).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    let toml = "[[routes]]\npath = \"/1/foo/:topic\"\nmode = \"batch_sync\"\n\
                [[routes]]\npath = \"/events\"\ntopic = \"clicks\"\nmode = \"async\"\n\
                [[routes]]\npath = \"/raw/:topic\"\nmode = \"async\"\npayload = \"raw\"";
    let gw = gateway(&b.addr, toml).await;
    let served: serde_json::Value = common::get_json(&format!("{}/openapi.json", gw.url)).await;
    let paths: Vec<&String> = served["paths"].as_object().unwrap().keys().collect();
    let mut want = vec![
        "/async/{topic}",
        "/sync/{topic}",
        "/batch/async/{topic}",
        "/batch/sync/{topic}",
        "/1/foo/{topic}",
        "/events",
        "/raw/{topic}",
        "/health",
        "/ready",
        "/metrics",
        "/",
        "/status.json",
        "/openapi.json",
        "/disco",
    ];
    want.sort();
    let mut got: Vec<&str> = paths.iter().map(|p| p.as_str()).collect();
    got.sort();
    assert_eq!(got, want);
    // Every operationId once, as OpenAPI requires.
    let ids: Vec<&str> = served["paths"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|item| item.pointer("/post/operationId")?.as_str())
        .collect();
    let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "{ids:?}");
    assert!(
        served["paths"]["/1/foo/{topic}"]["post"]["responses"]["504"].is_object(),
        "batch_sync may answer 504"
    );
    for path in ["/async/{topic}", "/batch/async/{topic}"] {
        assert!(
            served["paths"][path]["post"]["responses"]["504"].is_object(),
            "{path}: part of a request queued, or a peer that timed out, is 504"
        );
    }
    let params: Vec<&str> = served["paths"]["/events"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["$ref"].as_str().unwrap())
        .collect();
    assert!(
        !params.contains(&"#/components/parameters/topic")
            && params.contains(&"#/components/parameters/key")
            && params.contains(&"#/components/parameters/partition"),
        "a fixed topic takes no topic, and a key and partition as any route: {params:?}"
    );
    assert!(
        served["paths"]["/raw/{topic}"]["post"]["requestBody"]["content"]["*/*"].is_object(),
        "a raw route takes any type"
    );
    // Without keys a request needs none.
    assert!(
        served["paths"]["/async/{topic}"]["post"]["security"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({}))
    );
    // Every described path and method is really served (never the 404 fallback).
    for (path, item) in served["paths"].as_object().unwrap() {
        let concrete = path.replace("{topic}", "nope");
        for method in item.as_object().unwrap().keys() {
            let req = match method.as_str() {
                "get" => client().get(format!("{}{concrete}", gw.url)),
                "post" => client().post(format!("{}{concrete}", gw.url)).body("{}"),
                other => panic!("unexpected method {other}"),
            };
            let r = req.send().await.unwrap();
            let body = r.text().await.unwrap();
            assert!(
                !body.contains("\"not found\""),
                "{method} {path} is not served"
            );
        }
    }
    gw.stop().await;
    let gw = gateway(&b.addr, "[server]\ndefault_routes = false\n[[routes]]\npath = \"/e\"\ntopic = \"t\"\nmode = \"sync\"").await;
    let served: serde_json::Value = common::get_json(&format!("{}/openapi.json", gw.url)).await;
    assert!(served["paths"]["/async/{topic}"].is_null() && served["paths"]["/e"].is_object());
    gw.stop().await;
    // With API keys, no operation offers to go without one.
    let gw = gateway(
        &b.addr,
        &format!(
            "[[auth.keys]]\nname = \"k\"\nsha256 = \"{}\"\ntopics = [\"*\"]",
            "0".repeat(64)
        ),
    )
    .await;
    let served: serde_json::Value = common::get_json(&format!("{}/openapi.json", gw.url)).await;
    let security = &served["paths"]["/async/{topic}"]["post"]["security"];
    assert!(
        !security
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({})),
        "{security}"
    );
    gw.stop().await;
    // A route on a default route's path, with another mode, is described by its own mode.
    let toml =
        "[server]\ndefault_routes = false\n[[routes]]\npath = \"/async/:topic\"\nmode = \"sync\"";
    let gw = gateway(&b.addr, toml).await;
    let served = common::get_json(&format!("{}/openapi.json", gw.url)).await;
    let responses = &served["paths"]["/async/{topic}"]["post"]["responses"];
    assert!(
        responses["200"].is_object() && responses["202"].is_null(),
        "{responses}"
    );
    gw.stop().await;
}

/// A producer whose connection ends while nothing needs the broker (here: closed idle) goes
/// back to librdkafka's INIT state; its `kafboy_broker_up` must read 0 then, not the 1 it read
/// while connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_that_ended_reads_as_down() {
    let (cluster, topic) = common::mock_topic(1, "idle", 1);
    let toml = "[kafka]\nstatistics_interval = \"100ms\"\nmetadata_refresh = \"1h\"\n\
                [kafka.options]\n\"connections.max.idle.ms\" = \"5000\"";
    let gw = gateway(&cluster.bootstrap_servers(), toml).await;
    // The broker's label is unique to this test: its mock cluster's port.
    let labels = |samples: &[Sample]| -> Vec<(String, f64)> {
        samples
            .iter()
            .filter(|s| {
                s.name == "kafboy_broker_up"
                    && s.labels.get("producer").map(String::as_str) == Some("sync")
                    && s.labels.get("broker").is_some_and(|b| {
                        cluster
                            .bootstrap_servers()
                            .contains(b.split('/').next().unwrap())
                    })
            })
            .map(|s| (s.labels["broker"].clone(), s.value))
            .collect()
    };
    assert_eq!(
        gw.post_json(&format!("/sync/{topic}"), "{}").await.status,
        200
    );
    let read = |want: f64| {
        let url = gw.url.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let got = labels(&scrape(&url).await);
                if !got.is_empty() && got.iter().all(|(_, v)| *v == want) {
                    return;
                }
                assert!(Instant::now() < deadline, "want {want}, got {got:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    read(1.0).await;
    // Idle for five seconds: librdkafka closes the connection, and nothing needs another.
    read(0.0).await;
    // The status page shows it too, as it is, not as if no statistics had come (a first
    // reading may still be the DOWN it went through).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: serde_json::Value = common::get_json(&format!("{}/status.json", gw.url)).await;
        let sync = &status["producers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "sync")
            .unwrap()["brokers"];
        let states: Vec<&str> = sync
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["state"].as_str().unwrap())
            .collect();
        if states == ["INIT"] {
            break;
        }
        assert!(Instant::now() < deadline, "{sync}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}
