//! API keys (401/403), rate limits (429), key reload, CORS preflight, HTTPS and mTLS with the
//! certificate subject as the key identity, all on tansu; nothing refused ever lands. And a topic
//! the brokers refuse kafboy (librdkafka's mock cluster, which can say so): 403.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{MARKER, Reply, before_markers, broker, client, consume, gateway, values};
use sha2::{Digest, Sha256};

fn sha(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn post(url: &str, auth: Option<(&str, &str)>) -> Reply {
    post_body(url, auth, "{\"x\":1}").await
}

async fn post_body(url: &str, auth: Option<(&str, &str)>, body: &str) -> Reply {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    Reply::read(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_decide_who_may_write_what() {
    let b = broker();
    let web = b.topic("web", 1);
    let other = b.topic("other", 1);
    // `check` writes the markers, through every producer a refused request could have used.
    let toml = format!(
        "[[auth.keys]]\nname = \"web\"\nsha256 = \"{}\"\ntopics = [\"{web}\"]\nmodes = [\"async\", \"sync\"]\n\
         [[auth.keys]]\nname = \"ops\"\nsha256 = \"{}\"\ntopics = [\"other-*\"]\n\
         [[auth.keys]]\nname = \"check\"\nsha256 = \"{}\"\ntopics = [\"{web}\", \"{other}\"]\n",
        sha("web-secret"),
        sha("ops-secret"),
        sha("check-secret")
    );
    let gw = gateway(&b.addr, &toml).await;
    let url = |mode: &str, topic: &str| format!("{}/{mode}/{topic}", gw.url);
    let r = post(&url("sync", &web), None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let r = post(&url("sync", &web), Some(("authorization", "Bearer wrong"))).await;
    assert_eq!((r.status, r.error()), (401, "unknown API key".to_string()));
    let r = post(
        &url("sync", &web),
        Some(("authorization", "Basic d2ViLXNlY3JldA==")),
    )
    .await;
    assert_eq!(r.status, 401, "only Bearer or X-Api-Key");
    let r = post(
        &url("sync", &web),
        Some(("authorization", "Bearer web-secret")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&url("async", &web), Some(("x-api-key", "web-secret"))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let r = post(&url("sync", &other), Some(("x-api-key", "web-secret"))).await;
    assert_eq!(r.status, 403, "topic not allowed: {}", r.body);
    let r = post(&url("batch/async", &web), Some(("x-api-key", "web-secret"))).await;
    assert_eq!(r.status, 403, "mode not allowed: {}", r.body);
    let r = post(&url("sync", &other), Some(("x-api-key", "ops-secret"))).await;
    assert_eq!(r.status, 200, "prefix grant: {}", r.body);
    // 401 and 403 come before the body is read: a huge declared body is not waited for (the
    // body never comes; raw_http gives up after 5 s).
    let head = format!(
        "POST /sync/{web} HTTP/1.1\r\nhost: x\r\nx-api-key: nope\r\n\
         content-type: application/json\r\ncontent-length: 999999999\r\n\r\n"
    );
    let answer = common::raw_http(gw.addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    let check = Some(("x-api-key", "check-secret"));
    for mode in ["sync", "async", "batch/async"] {
        for topic in [&web, &other] {
            let r = post_body(&url(mode, topic), check, MARKER).await;
            assert!(matches!(r.status, 200 | 202), "{mode}: {}", r.body);
        }
    }
    let written = ["{\"x\":1}"];
    assert_eq!(values(&before_markers(&b.addr, &web, 3)), [written[0]; 2]);
    assert_eq!(
        values(&before_markers(&b.addr, &other, 3)),
        written,
        "refusals wrote nothing"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_per_key_and_global() {
    let b = broker();
    let topic = b.topic("rate", 1);
    let toml = format!(
        "[[auth.keys]]\nname = \"slow\"\nsha256 = \"{}\"\ntopics = [\"{topic}\"]\nrate = 0.001\nburst = 3\n\
         [[auth.keys]]\nname = \"free\"\nsha256 = \"{}\"\ntopics = [\"{topic}\"]\n",
        sha("slow-key"),
        sha("free-key")
    );
    let gw = gateway(&b.addr, &toml).await;
    let url = format!("{}/async/{topic}", gw.url);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(post(&url, Some(("x-api-key", "slow-key"))).await);
    }
    assert_eq!(
        statuses.iter().map(|r| r.status).collect::<Vec<_>>(),
        [202, 202, 202, 429, 429]
    );
    // At 0.001 a second the next token is some 1000 s away, and Retry-After says so.
    let retry_after: u64 = statuses[3].headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (900..=1000).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    for _ in 0..10 {
        assert_eq!(
            post(&url, Some(("x-api-key", "free-key"))).await.status,
            202,
            "other keys unaffected"
        );
    }
    gw.stop().await;
    // What got 202 is written, what got 429 is not.
    common::produce_marker(&b.addr, &topic);
    assert_eq!(
        values(&before_markers(&b.addr, &topic, 1)),
        vec!["{\"x\":1}"; 13]
    );
    let gw = gateway(&b.addr, "[auth]\nglobal_rate = 0.001\nglobal_burst = 2").await;
    let url = format!("{}/async/{topic}", gw.url);
    let codes: Vec<u16> = futures_join(&url, 4).await;
    assert_eq!(codes.iter().filter(|c| **c == 202).count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 2, "{codes:?}");
    gw.stop().await;
    common::produce_marker(&b.addr, &topic);
    assert_eq!(
        values(&before_markers(&b.addr, &topic, 2)),
        vec!["{\"x\":1}"; 15]
    );
    // Requests refused for what they ask (mode, topic, grammar) spend none of the node's
    // tokens: one key cannot turn every other client away with requests it may not make.
    let toml = format!(
        "[auth]\nglobal_rate = 0.001\nglobal_burst = 2\n\
         [[auth.keys]]\nname = \"web\"\nsha256 = \"{}\"\ntopics = [\"{topic}\"]\nmodes = [\"async\"]\n\
         [[auth.keys]]\nname = \"partner\"\nsha256 = \"{}\"\ntopics = [\"{topic}\"]\n",
        sha("web-key"),
        sha("partner-key")
    );
    let gw = gateway(&b.addr, &toml).await;
    let web = Some(("x-api-key", "web-key"));
    for _ in 0..3 {
        assert_eq!(
            post(&format!("{}/sync/{topic}", gw.url), web).await.status,
            403
        );
        assert_eq!(
            post(&format!("{}/async/other", gw.url), web).await.status,
            403
        );
        assert_eq!(
            post(&format!("{}/async/bad%20name", gw.url), web)
                .await
                .status,
            400
        );
    }
    let url = format!("{}/async/{topic}", gw.url);
    let partner = Some(("x-api-key", "partner-key"));
    assert_eq!(post(&url, partner).await.status, 202);
    assert_eq!(post(&url, web).await.status, 202);
    let over = post(&url, partner).await;
    assert_eq!(
        over.status, 429,
        "the burst of 2 is spent by requests that went through"
    );
    assert!(over.headers.contains_key("retry-after"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_a_hook_moves_to_is_judged_as_a_clients_would_be() {
    let b = broker();
    let topic = b.topic("moved", 1);
    let mut script = tempfile::Builder::new().suffix(".lua").tempfile().unwrap();
    script
        .write_all(b"function on_request(req)\n  req:set_topic(req:query(\"to\"))\n  return forward()\nend\n")
        .unwrap();
    let toml = format!(
        "[hook]\nscript = {:?}\n[topics]\nallow = [\"{topic}\", \"listed\"]\n\
         [[auth.keys]]\nname = \"web\"\nsha256 = \"{}\"\ntopics = [\"{topic}\", \"unlisted\"]\n",
        script.path().display().to_string(),
        sha("web-key")
    );
    let gw = gateway(&b.addr, &toml).await;
    let web = Some(("x-api-key", "web-key"));
    let to = |target: &str| format!("{}/async/{topic}?to={target}", gw.url);
    // A name no key could allow: the grammar's 400, as a client sending it gets, not the
    // key's 403.
    for bad in ["__internal", "bad%20name"] {
        let r = post(&to(bad), web).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    // Then the key, then the allowlist, as for a client's topic.
    for (target, want) in [("elsewhere", 403), ("listed", 403), ("unlisted", 404)] {
        let r = post(&to(target), web).await;
        assert_eq!(r.status, want, "{target}: {}", r.body);
        let r = post(&format!("{}/async/{target}", gw.url), web).await;
        assert_eq!(r.status, want, "{target} sent by a client: {}", r.body);
    }
    assert_eq!(post(&to(&topic), web).await.status, 202);
    gw.stop().await;
}

async fn futures_join(url: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(post(url, None).await.status);
    }
    out
}

/// What kafboy logs in this test process, from the first call on (tests that look for a line
/// call it before they start a gateway).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a logged line contains every one of `parts`.
fn logged(parts: &[&str]) -> bool {
    log_count(parts) > 0
}

/// Polls `cond` every 20 ms for up to 20 s; fails the test naming `what`.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Log lines holding every one of `parts`.
fn log_count(parts: &[&str]) -> usize {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_file_reloads_and_a_bad_one_keeps_the_old_keys() {
    logs();
    let b = broker();
    let topic = b.topic("reload", 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    let path = file.display().to_string();
    // Each version gets its own modification time, set explicitly: no waiting for a coarse
    // clock to tick.
    let write = |text: &str, mtime: u64| {
        std::fs::write(&file, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(mtime))
            .unwrap();
    };
    let keys = |name: &str, secret: &str| {
        format!(
            "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\ntopics = [\"{topic}\"]\n",
            sha(secret)
        )
    };
    // A key whose bucket holds one request, refilled once in 1000 s.
    let limited = format!("{}rate = 0.001\nburst = 1\n", keys("limited", "slow"));
    write(&format!("{}{limited}", keys("first", "one")), 1_600_000_000);
    let gw = gateway(&b.addr, &format!("[auth]\nkeys_file = {path:?}")).await;
    let url = format!("{}/async/{topic}", gw.url);
    assert_eq!(post(&url, Some(("x-api-key", "one"))).await.status, 202);
    assert_eq!(post(&url, Some(("x-api-key", "slow"))).await.status, 202);
    assert_eq!(post(&url, Some(("x-api-key", "slow"))).await.status, 429);
    // Rotation: the file changes, the new key works and the old one stops, without a restart.
    let second = format!("{}{limited}", keys("second", "two"));
    write(&second, 1_600_000_100);
    let deadline = Instant::now() + Duration::from_secs(20);
    while post(&url, Some(("x-api-key", "two"))).await.status != 202 {
        assert!(Instant::now() < deadline, "new key never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(post(&url, Some(("x-api-key", "one"))).await.status, 401);
    // A key that stayed keeps its spent bucket: a reload is no fresh burst.
    assert_eq!(post(&url, Some(("x-api-key", "slow"))).await.status, 429);
    // SIGHUP re-reads even an unchanged file.
    let reloads = || log_count(&["API keys reloaded"]);
    let before = reloads();
    let hangup = || {
        let pid = std::process::id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    hangup();
    until("a reload after SIGHUP", || reloads() > before).await;
    // A broken file is refused; the keys in force stay.
    let bad = format!("bad-{topic}");
    write(
        &format!("[[keys]]\nname = \"{bad}\"\nsha256 = \"not-hex\"\ntopics = []\n"),
        1_600_000_200,
    );
    until("the broken file's refusal logged", || {
        logged(&["API keys not reloaded", &format!("({bad})")])
    })
    .await;
    assert_eq!(post(&url, Some(("x-api-key", "two"))).await.status, 202);
    assert_eq!(post(&url, Some(("x-api-key", "one"))).await.status, 401);
    // A file of comments only (a script's header, its keys not written yet) is no key file.
    let failures = || log_count(&["API keys not reloaded"]);
    let before = failures();
    write("# keys for the edge nodes\n", 1_600_000_300);
    until("a comment-only file refused", || failures() > before).await;
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(text.contains("missing field `keys`"), "{text}");
    assert_eq!(post(&url, Some(("x-api-key", "two"))).await.status, 202);
    gw.stop().await;
}

/// A gateway whose `[server.cors]` lists `https://app.example`, with `more` settings of that
/// section, a new topic named after `name`, and the URL of `/async/{topic}` on the gateway.
async fn cors_gateway(
    b: &common::Broker,
    name: &str,
    more: &str,
) -> (common::Gateway, String, String) {
    let topic = b.topic(name, 1);
    let toml = format!("[server.cors]\nallowed_origins = [\"https://app.example\"]\n{more}");
    let gw = gateway(&b.addr, &toml).await;
    let url = format!("{}/async/{topic}", gw.url);
    (gw, topic, url)
}

/// A preflight from `https://app.example` for a POST with `headers`.
async fn preflight(url: &str, headers: &str) -> reqwest::Response {
    client()
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", headers)
        .send()
        .await
        .unwrap()
}

/// What browsers send for analytics beacons: `navigator.sendBeacon(url, JSON.stringify(x))`
/// posts `text/plain;charset=UTF-8` (read as JSON), and a beacon of a JSON `Blob` is a
/// credentialed request, which a listed origin may make once `allow_credentials` is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_beacons_are_written() {
    let b = broker();
    let (gw, topic, url) = cors_gateway(b, "beacon", "allow_credentials = true").await;
    let r = preflight(&url, "content-type").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    let beacons = [
        ("text/plain;charset=UTF-8", r#"{"beacon":"string"}"#),
        ("application/json", r#"{"beacon":"blob"}"#),
    ];
    for (content_type, body) in beacons {
        let r = client()
            .post(&url)
            .header("origin", "https://app.example")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{content_type}");
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    }
    // Said to listed origins only: not to another, nor to a request without an Origin.
    for origin in [Some("https://evil.example"), None] {
        let mut post = client().post(&url).body("{}");
        if let Some(origin) = origin {
            post = post.header("origin", origin);
        }
        let r = post.send().await.unwrap();
        assert_eq!(r.status(), 202);
        let credentials = r.headers().get("access-control-allow-credentials");
        assert!(credentials.is_none(), "{origin:?}");
    }
    // Text that is not JSON is refused as any body that is not.
    let r = client()
        .post(&url)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let got: Vec<Vec<u8>> = consume(&b.addr, &topic, 2)
        .into_iter()
        .map(|c| c.value)
        .collect();
    assert_eq!(got, beacons.map(|(_, body)| body.as_bytes().to_vec()));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_is_answered_without_kafka() {
    let b = broker();
    let (gw, topic, url) = cors_gateway(b, "cors", "").await;
    let r = preflight(&url, "content-type,x-api-key").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    // Credentials only when the config asks for them.
    assert!(
        r.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    assert!(
        r.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let r = client()
        .post(&url)
        .header("origin", "https://app.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let r = client()
        .post(&url)
        .header("origin", "https://evil.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // An OPTIONS that is no preflight (no Origin, no Access-Control-Request-Method) gets the
    // route's own answer, as with CORS off.
    let r = client()
        .request(reqwest::Method::OPTIONS, &url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    // Record headers may be asked for by prefix; other headers are left out of the answer, so
    // the browser does not send them.
    let r = client()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-kafka-header-trace-id,x-evil",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-headers"],
        "content-type,x-kafka-header-trace-id"
    );
    // A refusal carries the header too, so the page can read why.
    let r = client()
        .post(format!("{}/async/no-such-topic-{topic}", gw.url))
        .header("origin", "https://app.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    // What a node tells its operators is not for any page a visitor opens.
    for path in [
        "/status.json",
        "/metrics",
        "/openapi.json",
        "/ready",
        "/disco",
    ] {
        let r = client()
            .get(format!("{}{path}", gw.url))
            .header("origin", "https://app.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{path} is readable cross-origin"
        );
    }
    let r = client().post(&url).body(MARKER).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        values(&before_markers(&b.addr, &topic, 1)),
        ["{}", "{}"],
        "the preflights wrote nothing"
    );
    gw.stop().await;
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedKey,
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kafboy test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: rcgen::CertifiedKey {
                cert,
                key_pair: key,
            },
        };
        pki.write("ca.pem", &pki.ca.cert.pem());
        pki
    }

    fn issue(&self, name: &str, cn: &str, san: &[&str]) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(san.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params
            .signed_by(&key, &self.ca.cert, &self.ca.key_pair)
            .unwrap();
        (
            self.write(&format!("{name}.pem"), &cert.pem()),
            self.write(&format!("{name}.key"), &key.serialize_pem()),
        )
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path.display().to_string()
    }
}

/// An HTTPS request by hand (reqwest is built without TLS here), with an optional client cert.
async fn https_post(
    addr: std::net::SocketAddr,
    ca: &str,
    client: Option<(&str, &str)>,
    path: &str,
) -> Result<String, String> {
    https_post_body(addr, ca, client, path, "", "{\"a\":1}").await
}

/// POSTs `body` with `headers` (lines ending in CRLF) over TLS, with the client certificate.
async fn https_post_body(
    addr: std::net::SocketAddr,
    ca: &str,
    client: Option<(&str, &str)>,
    path: &str,
    headers: &str,
    body: &str,
) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            builder
                .with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_mtls_with_the_certificate_as_the_key() {
    let b = broker();
    let topic = b.topic("tls", 1);
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "kafboy", &["127.0.0.1"]);
    let (client_cert, client_key) = pki.issue("client", "partner-a", &[]);
    let ca = pki.dir.path().join("ca.pem").display().to_string();
    let toml = format!("[server.tls]\ncert = {cert:?}\nkey = {key:?}\n");
    let gw = common::gateway_unready(&b.addr, &toml).await;
    let path = format!("/sync/{topic}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let answer = https_post(gw.addr, &ca, None, &path).await.unwrap();
        if answer.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let plain = common::raw_http(gw.addr, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        !plain.starts_with("HTTP/1.1 200"),
        "plain HTTP is not served on a TLS listener"
    );
    gw.stop().await;

    let toml = format!(
        "[server.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n\
         [server.cors]\nallowed_origins = [\"https://partner.example\"]\n\
         [[auth.keys]]\nname = \"partner-a\"\nclient_cert_subject = \"CN=partner-a\"\ntopics = [\"{topic}\"]\n"
    );
    let gw = common::gateway_unready(&b.addr, &toml).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let answer = https_post(gw.addr, &ca, Some((&client_cert, &client_key)), &path)
            .await
            .unwrap();
        if answer.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the certificate is the key: {answer}"
    );
    let refused = https_post(gw.addr, &ca, None, &path).await;
    assert!(
        refused.is_err() || !refused.unwrap().starts_with("HTTP/1.1 200"),
        "no client certificate, no service"
    );
    // A browser sends its certificate with any page's request, a plain form too: only the
    // pages CORS lists may write with it.
    let presented = Some((client_cert.as_str(), client_key.as_str()));
    let from =
        |origin: &'static str| https_post_body(gw.addr, &ca, presented, &path, origin, "{\"a\":1}");
    let foreign = from("origin: https://evil.example\r\n").await.unwrap();
    assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
    assert!(foreign.contains("client certificate"), "{foreign}");
    let listed = from("origin: https://partner.example\r\n").await.unwrap();
    assert!(listed.starts_with("HTTP/1.1 200"), "{listed}");
    let marker = https_post_body(gw.addr, &ca, presented, &path, "", MARKER)
        .await
        .unwrap();
    assert!(marker.starts_with("HTTP/1.1 200"), "{marker}");
    assert_eq!(
        values(&before_markers(&b.addr, &topic, 1)),
        ["{\"a\":1}"; 3],
        "one record per 200, none for the refused requests"
    );
    gw.stop().await;

    // With auth off the certificate is what lets a request in; `"*"` names no origin.
    let toml = format!(
        "[server.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n\
         [server.cors]\nallowed_origins = [\"*\"]\n"
    );
    let gw = common::gateway_unready(&b.addr, &toml).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let plain = https_post_body(gw.addr, &ca, presented, &path, "", MARKER).await;
        if plain
            .as_deref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{plain:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let from =
        |origin: &'static str| https_post_body(gw.addr, &ca, presented, &path, origin, "{\"a\":1}");
    let foreign = from("origin: https://evil.example\r\n").await.unwrap();
    assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
    gw.stop().await;
}

#[test]
fn kafka_tls_and_sasl_settings_are_accepted_by_librdkafka() {
    // tansu 0.6.0 as packaged here cannot serve TLS and SASL together with user creation, and
    // the mock cluster has no SASL, so this checks that the settings build real producers (TLS
    // and SCRAM compiled in, files read) rather than a produce over them.
    let pki = Pki::new();
    let ca = pki.dir.path().join("ca.pem").display().to_string();
    let (cert, key) = pki.issue("kclient", "kafboy", &[]);
    let pw = pki.write("pw", "s3cret\n");
    let toml = format!(
        "[kafka.tls]\nca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}\n\
         [kafka.sasl]\nmechanism = \"scram-sha-512\"\nusername = \"app\"\npassword_file = {pw:?}\n"
    );
    let config = kafboy::Config::from_toml(&toml).unwrap();
    assert!(kafboy::App::build(&config).is_ok());
    // A file mistake is named by its setting and path, not by librdkafka's property and
    // OpenSSL's words ("system lib", "PEM lib"), and a certificate without its key (which
    // librdkafka would quietly not present) is refused.
    let refused = |toml: &str| {
        kafboy::App::build(&kafboy::Config::from_toml(toml).unwrap())
            .err()
            .unwrap()
    };
    let err = refused(&toml.replace(&ca, "/no/such/ca.pem"));
    assert!(err.contains("kafka.tls.ca_file: /no/such/ca.pem"), "{err}");
    let err = refused(&toml.replace(&cert, &pw));
    assert!(
        err.contains("kafka.tls.cert_file") && err.contains("no PEM block"),
        "{err}"
    );
    let err = refused(&toml.replace(&format!("key_file = {key:?}\n"), ""));
    assert!(err.contains("cert_file needs kafka.tls.key_file"), "{err}");
    let err = kafboy::Config::from_toml(
        "[kafka.sasl]\nmechanism = \"plain\"\nusername = \"u\"\npassword = \"p\"",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("password"),
        "secrets never sit in the TOML: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_brokers_refuse_kafboy_is_403_not_404() {
    use rdkafka::types::RDKafkaRespErr;
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("open", 1, 1).unwrap();
    mock.create_topic("secret", 1, 1).unwrap();
    mock.topic_error(
        "secret",
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let gw = gateway(&mock.bootstrap_servers(), "").await;
    for path in ["/sync/secret", "/async/secret"] {
        let r = gw.post_json(path, "{}").await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert!(
            r.error().contains("refuses kafboy the topic secret"),
            "{}",
            r.body
        );
    }
    assert_eq!(gw.post_json("/sync/open", "{}").await.status, 200);
    assert_eq!(gw.post_json("/sync/nowhere", "{}").await.status, 404);
    gw.stop().await;
}

/// A TLS front for a broker: what tansu would be behind TLS. [`TlsFront::serve`] swaps the
/// certificate it presents and drops every open connection, so that clients handshake again.
struct TlsFront {
    addr: std::net::SocketAddr,
    config: Arc<Mutex<Arc<rustls::ServerConfig>>>,
    open: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TlsFront {
    /// Listens at once (so that the broker can advertise the address); forwards to `backend`
    /// once it is set.
    async fn bind(
        config: rustls::ServerConfig,
    ) -> (TlsFront, tokio::sync::oneshot::Sender<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (backend_tx, backend_rx) = tokio::sync::oneshot::channel::<String>();
        let front = TlsFront {
            addr: listener.local_addr().unwrap(),
            config: Arc::new(Mutex::new(Arc::new(config))),
            open: Arc::default(),
        };
        let (config, open) = (front.config.clone(), front.open.clone());
        tokio::spawn(async move {
            let backend = backend_rx.await.unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(config.lock().unwrap().clone());
                let backend = backend.clone();
                let conn = tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut up = tokio::net::TcpStream::connect(backend).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
                open.lock().unwrap().push(conn);
            }
        });
        (front, backend_tx)
    }

    fn serve(&self, config: rustls::ServerConfig) {
        *self.config.lock().unwrap() = Arc::new(config);
        for conn in self.open.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

impl Pki {
    /// A server configuration presenting a certificate for 127.0.0.1 from this CA.
    fn server(&self) -> rustls::ServerConfig {
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params
            .signed_by(&key, &self.ca.cert, &self.ca.key_pair)
            .unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key.into())
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_that_refuse_kafboys_credentials_get_503_not_202() {
    // The brokers' certificate is replaced by one kafboy does not trust (an expired or rotated
    // CA at one end): librdkafka retries the handshake for ever and counts nothing fatal.
    let (trusted, stranger) = (Pki::new(), Pki::new());
    let (front, backend) = TlsFront::bind(trusted.server()).await;
    let b = common::Broker::advertising(Some(&front.addr.to_string()));
    backend.send(b.addr.clone()).unwrap();
    let topic = b.topic("kafka-tls", 1);
    let ca = trusted.dir.path().join("ca.pem");
    let toml = format!("[kafka]\nstatistics_interval = \"100ms\"\n[kafka.tls]\nca_file = {ca:?}\n");
    let gw = gateway(&front.addr.to_string(), &toml).await;
    let path = format!("/async/{topic}");
    assert_eq!(gw.post_json(&path, "{\"n\":1}").await.status, 202);

    front.serve(stranger.server());
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let r = gw.post_json(&path, "{\"refused\":true}").await;
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 202, "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "still 202 with the handshake failing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(refused.error().contains("credentials"), "{}", refused.body);
    assert!(refused.headers.contains_key("retry-after"));
    let ready = client()
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("credentials"));

    // Trusted again: taken again, without a restart.
    front.serve(trusted.server());
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.post_json(&path, "{\"n\":2}").await.status != 202 {
        assert!(Instant::now() < deadline, "still refused after the heal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = gw.stop().await;
    assert_eq!(report.undelivered, 0);
    let mut tls = rdkafka::ClientConfig::new();
    tls.set("bootstrap.servers", front.addr.to_string())
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", ca.display().to_string());
    // Every record answered 202 is delivered once the brokers are trusted again; the last
    // request's record comes last.
    let consumer = common::consumer_from_start_with(tls, &topic);
    let mut values = Vec::new();
    while values.last().map(Vec::as_slice) != Some(&b"{\"n\":2}"[..]) {
        let more = common::consume_from(&consumer, 1, Duration::from_secs(15));
        assert!(!more.is_empty(), "{values:?}");
        values.extend(more.into_iter().map(|c| c.value));
    }
    assert_eq!(values[0], b"{\"n\":1}");
    assert!(
        values[1..values.len() - 1]
            .iter()
            .all(|v| v == b"{\"refused\":true}")
    );
}
