//! Three kafboy nodes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 in front of one broker (librdkafka's
//! mock cluster): overflow is forwarded to ready peers, nothing is lost or duplicated, nothing is
//! forwarded twice, a peer going down is skipped, a peer that drops the connection after taking
//! a request makes it a 504 (not a local produce), and the discovery URL adds and removes peers.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Gateway, client};
use rdkafka::mocking::MockCluster;
use serde_json::Value;

async fn node(ip: &str, brokers: &str, toml: &str) -> Gateway {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    node_on(listener, brokers, toml).await
}

async fn node_on(listener: tokio::net::TcpListener, brokers: &str, toml: &str) -> Gateway {
    let addr = listener.local_addr().unwrap();
    let mut config = kafboy::Config::from_toml(toml).unwrap();
    config.kafka.brokers = vec![brokers.to_string()];
    config.server.listen = addr;
    config.server.shutdown_timeout = Duration::from_secs(2);
    let app = kafboy::App::build(&config).unwrap();
    common::serve_on(app, listener).await
}

async fn status(gw: &Gateway) -> Value {
    common::get_json(&format!("{}/status.json", gw.url)).await
}

/// Waits until `gw` sees exactly `want` as its ready peers.
async fn wait_peers(gw: &Gateway, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(gw).await;
        let ready: HashSet<String> = s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["ready"] == true)
            .map(|p| p["url"].as_str().unwrap().to_string())
            .collect();
        if ready == want.iter().map(|s| s.to_string()).collect() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ready peers {ready:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn counter(s: &Value, name: &str) -> u64 {
    s["totals"][name].as_u64().unwrap()
}

fn ids(records: &[common::Consumed]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_is_forwarded_once_and_lands_exactly_once() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("c", 4, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    // B and C would forward everything too (high_water 0, A as their peer) if the hop header
    // did not stop them.
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_url = format!("http://{}", a_listener.local_addr().unwrap());
    let peers_of = |urls: &[&str]| {
        let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "[cluster]\npeers = [{}]\nhigh_water = 0.0\nhealth_interval = \"1s\"\n",
            list.join(",")
        )
    };
    let b = node("127.0.0.2", &brokers, &peers_of(&[&a_url])).await;
    let c = node("127.0.0.3", &brokers, &peers_of(&[&a_url])).await;
    let a = node_on(a_listener, &brokers, &peers_of(&[&b.url, &c.url])).await;
    wait_peers(&a, &[&b.url, &c.url]).await;
    let mut sent = Vec::new();
    for i in 0..40 {
        let body = format!("{{\"id\":{i}}}");
        let r = a.post_json("/async/c", &body).await;
        assert_eq!(r.status, 202, "{}", r.body);
        sent.push(body);
    }
    let r = a.post_json("/sync/c", "{\"id\":\"sync\"}").await;
    assert_eq!(
        r.status, 200,
        "a forwarded sync request answers with the peer's ack: {}",
        r.body
    );
    assert!(r.json()["offset"].is_i64());
    sent.push("{\"id\":\"sync\"}".into());
    let (sa, sb, sc) = (status(&a).await, status(&b).await, status(&c).await);
    assert_eq!(counter(&sa, "forwarded_sent"), 41);
    assert_eq!(counter(&sa, "forwarded_received"), 0);
    assert_eq!(
        counter(&sb, "forwarded_received") + counter(&sc, "forwarded_received"),
        41
    );
    assert_eq!(
        counter(&sb, "forwarded_sent") + counter(&sc, "forwarded_sent"),
        0,
        "never forwarded twice"
    );
    assert!(
        counter(&sb, "forwarded_received") > 0 && counter(&sc, "forwarded_received") > 0,
        "both peers used"
    );
    let mut got = ids(&common::read_all(&brokers, "c", sent.len()).await);
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "every record exactly once");
    for g in [a, b, c] {
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_going_down_is_skipped_and_with_no_peer_left_the_node_serves_itself() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("d", 2, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let b = node("127.0.0.2", &brokers, "").await;
    let c = node("127.0.0.3", &brokers, "").await;
    let toml = format!(
        "[cluster]\npeers = [\"{}\", \"{}\"]\nhigh_water = 0.0\nhealth_interval = \"1s\"\n",
        b.url, c.url
    );
    let a = node("127.0.0.1", &brokers, &toml).await;
    wait_peers(&a, &[&b.url, &c.url]).await;
    c.stop().await;
    wait_peers(&a, &[&b.url]).await;
    let before = counter(&status(&b).await, "forwarded_received");
    for i in 0..10 {
        assert_eq!(a.post_json("/async/d", &format!("{i}")).await.status, 202);
    }
    assert_eq!(
        counter(&status(&b).await, "forwarded_received") - before,
        10,
        "all to the peer still up"
    );
    b.stop().await;
    wait_peers(&a, &[]).await;
    let sent_before = counter(&status(&a).await, "forwarded_sent");
    assert_eq!(
        a.post_json("/async/d", "{\"local\":1}").await.status,
        202,
        "no ready peer: served here"
    );
    assert_eq!(counter(&status(&a).await, "forwarded_sent"), sent_before);
    a.stop().await;
    // Written once each, whichever node served them.
    let mut got = ids(&common::read_all(&brokers, "d", 11).await);
    got.sort();
    let mut want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    want.push("{\"local\":1}".into());
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_url_adds_and_removes_peers() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("e", 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let b = node("127.0.0.2", &brokers, "").await;
    let c = node("127.0.0.3", &brokers, "").await;
    let listed = Arc::new(Mutex::new(format!("{}\n", b.url)));
    let discovery = serve_text(listed.clone()).await;
    let toml = format!(
        "[cluster]\ndiscovery_url = \"http://{discovery}/peers\"\nrefresh = \"200ms\"\nhealth_interval = \"100ms\"\n"
    );
    let a = node("127.0.0.1", &brokers, &toml).await;
    wait_peers(&a, &[&b.url]).await;
    *listed.lock().unwrap() = format!("{}\n{}/\n\n", b.url, c.url);
    wait_peers(&a, &[&b.url, &c.url]).await;
    // A list shared by every node names this node too: listed as itself, never ready.
    *listed.lock().unwrap() = format!("{}\n{}\n", c.url, a.url);
    wait_peers(&a, &[&c.url]).await;
    let s = status(&a).await;
    let own: Vec<&Value> = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["url"] == a.url.as_str())
        .collect();
    assert_eq!(own.len(), 1, "{s}");
    assert_eq!(own[0]["self"], true, "{s}");
    assert_eq!(own[0]["ready"], false, "{s}");
    let disco = common::get_text(&format!("{}/disco", a.url)).await;
    assert_eq!(disco, format!("kafboy@{} {}\n", a.addr, a.url));
    for g in [a, b, c] {
        g.stop().await;
    }
}

/// A tiny HTTP server answering `GET /peers` with the shared text.
async fn serve_text(text: Arc<Mutex<String>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/peers",
        axum::routing::get(move || async move { text.lock().unwrap().clone() }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_tiny_queue_hands_its_overflow_to_peers_instead_of_503() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("f", 2, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let b = node("127.0.0.2", &brokers, "").await;
    let c = node("127.0.0.3", &brokers, "").await;
    let tiny = "[kafka]\nqueue_max_messages = 4\n[server]\nenqueue_timeout = \"10ms\"\n";
    let alone = node("127.0.0.1", &brokers, tiny).await;
    let toml = format!(
        "{tiny}[cluster]\npeers = [\"{}\", \"{}\"]\nhealth_interval = \"1s\"\n",
        b.url, c.url
    );
    let a = node("127.0.0.1", &brokers, &toml).await;
    wait_peers(&a, &[&b.url, &c.url]).await;
    // Records now sit in flight for 300 ms, so the tiny queue fills at once.
    mock.broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    let burst = |gw: &Gateway, tag: &'static str| {
        let url = format!("{}/async/f", gw.url);
        async move {
            let sends = (0..30).map(|i| {
                let url = url.clone();
                async move {
                    let r = client()
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(format!("\"{tag}-{i}\""))
                        .send()
                        .await
                        .unwrap();
                    r.status().as_u16()
                }
            });
            futures_join_all(sends).await
        }
    };
    let alone_codes = burst(&alone, "alone").await;
    assert!(
        alone_codes.contains(&503),
        "without peers the tiny queue refuses: {alone_codes:?}"
    );
    let codes = burst(&a, "clustered").await;
    assert!(
        codes.iter().all(|c| *c == 202),
        "with peers nothing is refused: {codes:?}"
    );
    assert!(counter(&status(&a).await, "forwarded_sent") > 0);
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    // What the lone node accepted, and the 30 the clustered one did.
    let accepted = alone_codes.iter().filter(|c| **c == 202).count() + 30;
    let got = common::read_all(&brokers, "f", accepted).await;
    assert_eq!(got.len(), accepted, "every accepted record, and no other");
    let clustered: Vec<String> = ids(&got)
        .into_iter()
        .filter(|v| v.contains("clustered"))
        .collect();
    let unique: HashSet<&String> = clustered.iter().collect();
    assert_eq!(
        (clustered.len(), unique.len()),
        (30, 30),
        "every accepted record once"
    );
    for g in [a, alone, b, c] {
        g.stop().await;
    }
}

async fn futures_join_all<F: std::future::Future<Output = u16> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<u16> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// What a fake peer does with a produce request.
#[derive(Clone, Copy)]
enum Produce {
    /// Drops the connection once it has read the request, as a peer killed between its
    /// produce and its answer would.
    HangUp,
    /// Answers with this status line: a refusal, nothing written.
    Refuse(&'static str),
}

/// A fake peer, always ready with all its room free, on 127.0.0.4. Its listener has no
/// backlog: once `blackhole` is raised it accepts nothing more, and after one connection
/// waiting in its queue the kernel drops the next ones' SYNs, as a dead host's firewall would.
struct FakePeer {
    url: String,
    addr: SocketAddr,
    /// Stops the accept loop; it answers once it has stopped.
    blackhole: Mutex<Option<tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>>>,
    /// While not [`ANSWER`], a connection gets a `503` as it is accepted, before anything is
    /// read from it, as kafboy's connection cap answers: then [`DRAIN`]s what comes, or
    /// [`DROP`]s the connection at once (past the cap's lingering slots).
    refuse_unread: Arc<AtomicU8>,
}

impl FakePeer {
    async fn start(produce: Produce) -> FakePeer {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.4:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let (blackhole, mut stop) =
            tokio::sync::oneshot::channel::<tokio::sync::oneshot::Sender<()>>();
        let refuse_unread = Arc::new(AtomicU8::new(ANSWER));
        let unread = refuse_unread.clone();
        tokio::spawn(async move {
            let stopped = loop {
                let tcp = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap().0,
                    stopped = &mut stop => break stopped.unwrap(),
                };
                let refusal = unread.load(Ordering::SeqCst);
                if refusal != ANSWER {
                    tokio::spawn(refuse_at_once(tcp, refusal == DRAIN));
                } else {
                    tokio::spawn(fake_answer(tcp, produce));
                }
            };
            // Listening still, accepting nothing.
            let _ = stopped.send(());
            let _listener = listener;
            std::future::pending::<()>().await;
        });
        FakePeer {
            url: format!("http://{addr}"),
            addr,
            blackhole: Mutex::new(Some(blackhole)),
            refuse_unread,
        }
    }

    /// From now on a connection to the peer hangs in its handshake (for as long as the
    /// answer, which may hold the connection queued, is kept).
    async fn go_dark(&self) -> Option<tokio::net::TcpStream> {
        let (stopped, done) = tokio::sync::oneshot::channel();
        let blackhole = self.blackhole.lock().unwrap().take().unwrap();
        blackhole.send(stopped).unwrap();
        done.await.unwrap();
        // The one place in the queue taken (by this connection, or by a health check that came
        // first, in which case this one hangs too), later handshakes go unanswered.
        let filler = tokio::net::TcpStream::connect(self.addr);
        tokio::time::timeout(Duration::from_millis(500), filler)
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// One request per connection: reads its head and body, then answers `/ready` or `produce`s.
async fn fake_answer(mut tcp: tokio::net::TcpStream, produce: Produce) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).to_string();
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..head_end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if seen.len() < head_end + 4 + length {
            continue;
        }
        let (status, body) = match (text.starts_with("GET /ready"), produce) {
            (true, _) => ("200 OK", r#"{"ok":"ready","headroom":1.0}"#),
            (false, Produce::Refuse(status)) => (status, r#"{"error":"refused"}"#),
            (false, Produce::HangUp) => return,
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(answer.as_bytes()).await;
        return;
    }
}

const ANSWER: u8 = 0;
const DRAIN: u8 = 1;
const DROP: u8 = 2;

/// The connection cap's answer: written as the connection is accepted, then what comes is read
/// and dropped, or (`drain` false) the connection is closed at once.
async fn refuse_at_once(mut tcp: tokio::net::TcpStream, drain: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"error":"too many connections"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
    if !drain {
        return;
    }
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
}

/// The ids written to topic `h` of `brokers`: the `want` expected, and any more that show
/// soon after them.
async fn written(brokers: &str, want: usize) -> Vec<String> {
    ids(&common::read_all(brokers, "h", want).await)
}

/// A node that forwards everything to `peer`, in front of a fresh mock cluster with topic `h`.
async fn forwarding_to(
    peer: &str,
    extra: &str,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    Gateway,
) {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("h", 1, 1).unwrap();
    let toml = format!(
        "[cluster]\npeers = [\"{peer}\"]\nhigh_water = 0.0\nhealth_interval = \"100ms\"\n{extra}"
    );
    let a = node("127.0.0.1", &mock.bootstrap_servers(), &toml).await;
    (mock, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_took_the_request_and_hung_up_makes_it_a_504_not_a_second_produce() {
    let peer = FakePeer::start(Produce::HangUp).await;
    let (mock, a) = forwarding_to(&peer.url, "").await;
    wait_peers(&a, &[&peer.url]).await;
    let r = a.post_json("/async/h", "{\"id\":1}").await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.error().contains("may have been written"), "{}", r.body);
    // Nothing taken here, and, stopped, the node has flushed whatever it queued: a record it
    // wrote comes before a marker written after that.
    assert_eq!(counter(&status(&a).await, "records_accepted"), 0);
    let report = a.stop().await;
    assert_eq!(report.undelivered, 0, "{report:?}");
    let brokers = mock.bootstrap_servers();
    let got = tokio::task::spawn_blocking(move || {
        common::produce_marker(&brokers, "h");
        common::before_markers(&brokers, "h", 1)
    })
    .await
    .unwrap();
    assert_eq!(ids(&got), Vec::<String>::new(), "not produced here as well");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_cannot_be_reached_is_given_up_on_and_the_node_serves_the_request() {
    let peer = FakePeer::start(Produce::HangUp).await;
    // A forward that waited for its whole timeout would answer 504.
    let (mock, a) = forwarding_to(&peer.url, "forward_timeout = \"20s\"\n").await;
    wait_peers(&a, &[&peer.url]).await;
    let _queued = peer.go_dark().await;
    let r = a.post_json("/async/h", "{\"id\":1}").await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(written(&mock.bootstrap_servers(), 1).await, ["{\"id\":1}"]);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooked_and_spooled_routes_are_served_where_they_arrive() {
    // A forward to this peer would be a 504.
    let peer = FakePeer::start(Produce::HangUp).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hook.lua");
    std::fs::write(&script, "function on_request(req) return forward() end").unwrap();
    let spool = dir.path().join("spool");
    let extra = format!(
        "[server]\ndefault_routes = false\n[spool]\ndir = {:?}\n\
         [[routes]]\npath = \"/hooked/:topic\"\nmode = \"async\"\nhook = {:?}\n\
         [[routes]]\npath = \"/spooled/:topic\"\nmode = \"async\"\nspool = true\n",
        spool.display().to_string(),
        script.display().to_string()
    );
    let (mock, a) = forwarding_to(&peer.url, &extra).await;
    wait_peers(&a, &[&peer.url]).await;
    for (path, id) in [("/hooked/h", 1), ("/spooled/h", 2)] {
        let r = a.post_json(path, &format!("{{\"id\":{id}}}")).await;
        assert_eq!(r.status, 202, "{path}: {}", r.body);
    }
    let mut got = written(&mock.bootstrap_servers(), 2).await;
    got.sort();
    assert_eq!(got, [r#"{"id":1}"#, r#"{"id":2}"#]);
    assert_eq!(counter(&status(&a).await, "forwarded_sent"), 0);
    a.stop().await;
}

/// The queue-full drops `gw` counted for `topic`.
async fn queue_full_drops(gw: &Gateway, topic: &str) -> f64 {
    drops(gw, topic, "queue_full").await
}

/// The drops `gw` counted for `topic` with `reason`.
async fn drops(gw: &Gateway, topic: &str, reason: &str) -> f64 {
    let text = common::get_text(&format!("{}/metrics", gw.url)).await;
    let label = format!("topic=\"{topic}\"");
    let reason = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("kafboy_records_dropped_total{"))
        .filter(|l| l.contains(&label) && l.contains(&reason))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Not only a full queue: any refusal the forwarding node declines (and serves itself) is its
/// to count, here a producer's fatal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_refusing_a_forwarded_request_leaves_its_drop_to_the_node_that_sent_it() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("f", 1, 1).unwrap();
    let toml = "[topics]\nallow = [\"f\"]\n[cluster]\npeers = [\"http://127.0.0.1:9\"]\n";
    let mut config = kafboy::Config::from_toml(toml).unwrap();
    config.kafka.brokers = vec![mock.bootstrap_servers()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.server.listen = listener.local_addr().unwrap();
    let app = kafboy::App::build(&config).unwrap();
    let producers = app.producers().clone();
    let peer = common::serve_on(app, listener).await;
    peer.wait_ready().await;
    assert_eq!(peer.post_json("/sync/f", "{}").await.status, 200);
    // librdkafka refuses new records at once (503) until the producer is replaced. The
    // supervisor may replace it before the request comes: then the error is raised again, in
    // the replacement, which waits longer each time (at once, then 1 s, 2 s, ...).
    let mode = kafboy::config::Mode::Sync;
    let mut attempts = 0;
    let r = loop {
        attempts += 1;
        let hit = Arc::downgrade(&producers.for_mode(mode, "f"));
        producers.inject_fatal_error(mode);
        let r = client()
            .post(format!("{}/sync/f", peer.url))
            .header("x-kafboy-forwarded-by", "kafboy@elsewhere")
            .body("{}")
            .send()
            .await
            .unwrap();
        let replaced = !std::ptr::eq(Arc::as_ptr(&producers.for_mode(mode, "f")), hit.as_ptr());
        if r.status() == 200 && replaced && attempts < 5 {
            continue;
        }
        break r;
    };
    assert_eq!(r.status(), 503, "after {attempts} fatal errors");
    let counted = drops(&peer, "f", "refused").await + drops(&peer, "f", "fatal").await;
    assert_eq!(counted, 0.0, "left to the sender");
    peer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_peer_leaves_the_drop_of_a_forwarded_request_to_the_node_that_sent_it() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("g", 1, 1).unwrap();
    let toml = "[topics]\nallow = [\"g\"]\n[kafka]\nqueue_max_messages = 2\n\
                [server]\nenqueue_timeout = \"10ms\"\n\
                [cluster]\npeers = [\"http://127.0.0.1:9\"]\n";
    let peer = node("127.0.0.1", &mock.bootstrap_servers(), toml).await;
    // Records now sit in flight, so the tiny queue fills at once.
    mock.broker_round_trip_time(1, Duration::from_secs(2))
        .unwrap();
    let burst = |forwarded: bool| {
        let url = format!("{}/async/g", peer.url);
        let sends = (0..10).map(move |i| {
            let url = url.clone();
            async move {
                let mut r = client().post(&url).body(format!("{i}"));
                if forwarded {
                    r = r.header("x-kafboy-forwarded-by", "kafboy@elsewhere");
                }
                r.send().await.unwrap().status().as_u16()
            }
        });
        futures_join_all(sends)
    };
    let codes = burst(true).await;
    assert!(codes.contains(&503), "the queue never filled: {codes:?}");
    // The sender may yet serve what was refused here: it counts the drop if it does not.
    assert_eq!(queue_full_drops(&peer, "g").await, 0.0);
    let codes = burst(false).await;
    let refused = codes.iter().filter(|c| **c == 503).count();
    assert!(refused > 0, "the queue never filled: {codes:?}");
    assert_eq!(queue_full_drops(&peer, "g").await, refused as f64);
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    peer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refuses_wrote_nothing_and_the_node_serves_the_request() {
    // Full or stopping, over its rate limit, or not knowing the key or the topic yet (a key
    // file or metadata not reloaded there yet).
    for refusal in [
        "503 Service Unavailable",
        "429 Too Many Requests",
        "401 Unauthorized",
        "404 Not Found",
        // The headers forwarding adds took the request past the peer's limit.
        "431 Request Header Fields Too Large",
        // Something in front of the peer sent the request elsewhere: no kafboy node redirects.
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ] {
        let peer = FakePeer::start(Produce::Refuse(refusal)).await;
        let (mock, a) = forwarding_to(&peer.url, "").await;
        wait_peers(&a, &[&peer.url]).await;
        let r = a.post_json("/async/h", "{\"id\":1}").await;
        assert_eq!(r.status, 202, "{refusal}: {}", r.body);
        assert_eq!(written(&mock.bootstrap_servers(), 1).await, ["{\"id\":1}"]);
        let s = status(&a).await;
        assert_eq!(counter(&s, "forwarded_sent"), 0, "{refusal}: {s}");
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_503_before_reading_the_request_wrote_nothing() {
    // Whether the answer overtakes the request is a race: ten peers, one request to each.
    refused_unread(10, DRAIN, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_closes_at_once_while_the_body_is_sent_wrote_nothing() {
    // Past its lingering slots a peer at its cap closes at once: the body still being sent
    // meets the closed connection. (Five of 900 kB: the mock broker keeps 5 MB a partition.)
    refused_unread(5, DROP, 900_000).await;
}

/// `peers` peers that answer `503` before reading (then `refusal`), one request of `pad` bytes
/// to each: all served by the node itself, and written once.
async fn refused_unread(peers: usize, refusal: u8, pad: usize) {
    let mut fakes = Vec::new();
    for _ in 0..peers {
        // A forward the peer read would be a 504.
        fakes.push(FakePeer::start(Produce::HangUp).await);
    }
    let urls: Vec<&str> = fakes.iter().map(|p| p.url.as_str()).collect();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("h", 1, 1).unwrap();
    // One check, at the start: after it only a forward can change a peer's state.
    let toml =
        format!("[cluster]\npeers = {urls:?}\nhigh_water = 0.0\nhealth_interval = \"60s\"\n");
    let a = node("127.0.0.1", &mock.bootstrap_servers(), &toml).await;
    wait_peers(&a, &urls).await;
    for fake in &fakes {
        fake.refuse_unread.store(refusal, Ordering::SeqCst);
    }
    let pad = "x".repeat(pad);
    let mut want = Vec::new();
    for id in 0..peers {
        let body = format!("{{\"id\":{id},\"pad\":\"{pad}\"}}");
        let r = a.post_json("/async/h", &body).await;
        assert_eq!(r.status, 202, "{}", r.body);
        want.push(body);
    }
    let s = status(&a).await;
    let tried = s["peers"].as_array().unwrap();
    assert!(
        tried.iter().all(|p| p["ready"] == false),
        "each peer was tried once: {s}"
    );
    assert_eq!(counter(&s, "forwarded_sent"), 0, "{s}");
    assert!(
        written(&mock.bootstrap_servers(), peers).await == want,
        "not all written once"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_url_that_leads_back_to_the_node_itself_is_never_forwarded_to() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("h", 1, 1).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // The same node under another name, as a peer list shared by every node would hold it.
    let toml = format!(
        "[cluster]\npeers = [\"http://localhost:{port}\"]\nhigh_water = 0.0\n\
         health_interval = \"100ms\"\n"
    );
    let a = node_on(listener, &mock.bootstrap_servers(), &toml).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(&a).await["peers"][0]["self"] != true {
        assert!(Instant::now() < deadline, "{}", status(&a).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in 0..3 {
        let r = a.post_json("/async/h", &format!("{{\"id\":{id}}}")).await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let s = status(&a).await;
    assert_eq!(counter(&s, "forwarded_received"), 0, "{s}");
    assert_eq!(s["peers"][0]["ready"], false, "{s}");
    assert_eq!(s["peers"][0]["headroom"], 0.0, "no room to offer: {s}");
    assert_eq!(
        written(&mock.bootstrap_servers(), 3).await,
        [r#"{"id":0}"#, r#"{"id":1}"#, r#"{"id":2}"#]
    );
    a.stop().await;
}
