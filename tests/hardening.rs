//! HTTP abuse: each test sends the abuse, checks the answer, and checks that a good client is
//! still served while it goes on.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{Gateway, MARKER, before_markers, broker, gateway, raw_http, values};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn good_request(gw: &Gateway, topic: &str) {
    let r = gw
        .post_json(&format!("/sync/{topic}"), "{\"good\":true}")
        .await;
    assert_eq!(r.status, 200, "a good client is served: {}", r.body);
}

/// Whether the server has closed `stream` (EOF or reset) by now; never waits.
fn closed_now(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Waits until the server closes `stream` (EOF or reset), for at most `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_while_good_clients_are_served() {
    let b = broker();
    let topic = b.topic("slowloris", 1);
    // Long enough that the good requests below are surely served inside it.
    let header_read_timeout = Duration::from_secs(20);
    let gw = gateway(&b.addr, "[server]\nheader_read_timeout = \"20s\"").await;
    let mut slow = Vec::new();
    let opened = Instant::now();
    for _ in 0..200 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"POST /async/x HTTP/1.1\r\nhost: a\r\nx-slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    for _ in 0..20 {
        good_request(&gw, &topic).await;
    }
    // The good clients were served while every slow one still held its connection.
    let open = slow.iter().filter(|s| !closed_now(s)).count();
    assert_eq!(
        open,
        slow.len(),
        "slow connections were cut before the good clients were served ({:?})",
        opened.elapsed()
    );
    // And then the slow ones are cut off: none is left open for good.
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(30)).await,
            "slow connection left open"
        );
    }
    assert!(
        opened.elapsed() >= header_read_timeout,
        "cut off before header_read_timeout: {:?}",
        opened.elapsed()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408() {
    let b = broker();
    let topic = b.topic("slowbody", 1);
    let body_read_timeout = Duration::from_millis(500);
    let gw = gateway(&b.addr, "[server]\nbody_read_timeout = \"500ms\"").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /async/{topic} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"a\":"
    );
    // Before the write: the server's wait starts once it has the head, which may be before
    // the write returns here.
    let start = Instant::now();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // Without the timeout the server would wait for the body for ever.
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");
    assert!(
        start.elapsed() >= body_read_timeout,
        "408 before body_read_timeout: {:?}",
        start.elapsed()
    );
    good_request(&gw, &topic).await;
    // Last, through the producer the stalled request would have used.
    only_the_good_record_landed(&gw, &b.addr, &topic).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_floods_get_431() {
    let b = broker();
    let topic = b.topic("headers", 1);
    let gw = gateway(
        &b.addr,
        "[server]\nmax_headers = 100\nmax_header_bytes = 8192",
    )
    .await;
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let request =
        format!("POST /async/{topic} HTTP/1.1\r\nhost: a\r\n{many}content-length: 2\r\n\r\n{{}}");
    let answer = raw_http(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let big = format!("x-big: {}\r\n", "v".repeat(9000));
    let request =
        format!("POST /async/{topic} HTTP/1.1\r\nhost: a\r\n{big}content-length: 2\r\n\r\n{{}}");
    let answer = raw_http(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    good_request(&gw, &topic).await;
    gw.stop().await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_inflated_and_limited_after_inflating() {
    let b = broker();
    let topic = b.topic("inflate", 1);
    let gw = gateway(&b.addr, "[server]\nmax_body_bytes = 100000").await;
    let send = |body: Vec<u8>, encoding: &'static str| {
        common::client()
            .post(format!("{}/sync/{topic}", gw.url))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body)
            .send()
    };
    let r = send(gzip(br#"{"z":"gzip"}"#), "gzip").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = send(
        zstd::encode_all(&br#"{"z":"zstd"}"#[..], 3).unwrap(),
        "zstd",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let bomb = gzip(format!("[\"{}\"]", "a".repeat(5_000_000)).as_bytes());
    assert!(bomb.len() < 100_000);
    let r = common::Reply::read(send(bomb, "gzip").await.unwrap()).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let r = common::Reply::read(send(b"{}".to_vec(), "br").await.unwrap()).await;
    assert_eq!(r.status, 415, "{}", r.body);
    let r = send(MARKER.as_bytes().to_vec(), "identity").await.unwrap();
    assert_eq!(r.status(), 200);
    // Neither the bomb nor the refused encoding wrote anything.
    let got = before_markers(&b.addr, &topic, 1);
    assert_eq!(common_values(&got), [r#"{"z":"gzip"}"#, r#"{"z":"zstd"}"#]);
    gw.stop().await;
}

fn common_values(records: &[common::Consumed]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_and_too_many_records_are_refused() {
    let b = broker();
    let topic = b.topic("deep", 1);
    let gw = gateway(
        &b.addr,
        "[server]\nmax_records = 100\nmax_body_bytes = 1000000",
    )
    .await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = gw.post_json(&format!("/async/{topic}"), &deep).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("deeper than 64"), "{}", r.body);
    let lines: String = (0..101).map(|i| format!("{i}\n")).collect();
    let r = gw
        .post(
            &format!("/async/{topic}"),
            Some("application/x-ndjson"),
            lines,
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.body);
    good_request(&gw, &topic).await;
    only_the_good_record_landed(&gw, &b.addr, &topic).await;
    gw.stop().await;
}

/// Writes a marker through `/async` and checks that the one record before it is the good one.
async fn only_the_good_record_landed(gw: &Gateway, brokers: &str, topic: &str) {
    let r = gw.post_json(&format!("/async/{topic}"), MARKER).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        values(&before_markers(brokers, topic, 1)),
        ["{\"good\":true}"],
        "only the good record landed"
    );
}

/// A connection that sends pipelined requests and never reads an answer past the first bytes
/// (a small receive buffer, so the server's writes back up at once); `None` if the server
/// turned it away.
async fn hog(addr: std::net::SocketAddr) -> Option<tokio::net::tcp::OwnedReadHalf> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let (mut read, mut write) = socket.connect(addr).await.unwrap().into_split();
    tokio::spawn(async move {
        let requests = "GET /openapi.json HTTP/1.1\r\nhost: a\r\n\r\n".repeat(100);
        while write.write_all(requests.as_bytes()).await.is_ok() {}
    });
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), read.read_exact(&mut first))
        .await
        .expect("an answer or a close within 5 s")
        .ok()?;
    (&first == b"HTTP/1.1 200").then_some(read)
}

/// Whether a fresh connection is turned away (the connection cap is reached).
async fn refused(gw: &Gateway) -> bool {
    let r = common::client()
        .get(format!("{}/health", gw.url))
        .send()
        .await;
    !r.is_ok_and(|r| r.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_answers_lose_their_connection() {
    let b = broker();
    let gw = gateway(
        &b.addr,
        "[server]\nmax_connections = 2\nwrite_timeout = \"2s\"",
    )
    .await;
    let mut hogs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hogs.len() < 2 {
        assert!(Instant::now() < deadline, "{} of 2 slots taken", hogs.len());
        hogs.extend(hog(gw.addr).await);
    }
    assert!(refused(&gw).await, "every place is taken");
    // By clients that read nothing: the server gives up on them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused(&gw).await {
        assert!(
            Instant::now() < deadline,
            "clients that never read kept every connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(hogs);
    gw.stop().await;
}

/// Sends a request head and all of a `len`-byte body on a fresh connection, and only then reads
/// the answer, as a client that writes its whole request before reading does.
async fn whole_request_then_answer(addr: std::net::SocketAddr, head: &str, len: usize) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let body = vec![b' '; len];
    let sent = s.write_all(&body).await;
    let mut answer = Vec::new();
    let read = s.read_to_end(&mut answer).await;
    format!(
        "sent: {sent:?}; read: {read:?}; {}",
        String::from_utf8_lossy(&answer)
    )
}

/// A body refused before it is read (by its declared length, its type, or at the connection
/// cap) gets its answer even when the client sends all of it before reading: closing a socket
/// with input unread sends a reset, which would lose the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_refused_before_it_is_read_still_gets_its_answer() {
    let b = broker();
    let topic = b.topic("linger", 1);
    let gw = gateway(&b.addr, "[server]\nmax_body_bytes = 1000").await;
    let len = 4 << 20;
    let too_large = format!(
        "POST /async/{topic} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    );
    let answer = whole_request_then_answer(gw.addr, &too_large, len).await;
    assert!(answer.starts_with("sent: Ok(()); read: Ok("), "{answer}");
    assert!(answer.contains("HTTP/1.1 413"), "{answer}");
    let wrong_type = too_large.replace("application/json", "image/png");
    let answer = whole_request_then_answer(gw.addr, &wrong_type, len).await;
    assert!(answer.starts_with("sent: Ok(()); read: Ok("), "{answer}");
    assert!(answer.contains("HTTP/1.1 415"), "{answer}");
    good_request(&gw, &topic).await;
    gw.stop().await;
}

/// Sends `head`, reads the whole answer (by its Content-Length), and returns its head (lower
/// case).
async fn answer_head(s: &mut TcpStream, head: &str) -> String {
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
            if body.len() >= length {
                return head.to_string();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before an answer");
        answer.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_is_read_says_connection_close() {
    let b = broker();
    let topic = b.topic("unread", 1);
    let gw = gateway(&b.addr, &format!("[topics]\nallow = [\"{topic}\"]")).await;
    let post = |path: &str, length: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n\
             content-length: {length}\r\n\r\n"
        )
    };
    let good = format!("{}{{\"a\":1}}", post(&format!("/async/{topic}"), 7));
    // Refused on its head alone (a topic outside the allowlist, a bad name, no such path), the
    // body not there yet: the client must not send another request on this connection.
    for path in ["/async/elsewhere", "/async/a%20b", "/no/such/path"] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let head = answer_head(&mut s, &post(path, 7)).await;
        assert!(head.contains("connection: close"), "{path}: {head}");
        s.write_all(b"{\"a\":1}").await.unwrap();
    }
    // An HTTP/1.0 client that asked to keep the connection is told `close` alone (hyper adds
    // `keep-alive` to an HTTP/1.1 answer for it).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = answer_head(
        &mut s,
        &post("/async/elsewhere", 7)
            .replace("HTTP/1.1", "HTTP/1.0")
            .replace("host: a\r\n", "host: a\r\nconnection: keep-alive\r\n"),
    )
    .await;
    assert!(head.starts_with("http/1.0 404"), "{head}");
    assert!(
        head.contains("connection: close") && !head.contains("keep-alive"),
        "{head}"
    );
    // A client waiting for `100 Continue` is not asked for a body that is refused: the answer
    // comes at once, says close, and the connection ends (a body nobody reads or drops would
    // keep hyper from reading the connection, which would then never end).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = answer_head(
        &mut s,
        &post("/async/elsewhere", 7).replace("host: a\r\n", "host: a\r\nexpect: 100-continue\r\n"),
    )
    .await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the connection did not end")
        .unwrap();
    // A large body left unread: the same, at once.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = answer_head(&mut s, &post("/async/elsewhere", 100_000)).await;
    assert!(head.contains("connection: close"), "{head}");
    // A body whose framing breaks (a chunk longer than it said): hyper ends the connection,
    // and the answer says so.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let broken = format!(
        "POST /async/{topic} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n8\r\n{{\"c\":\"1\"}}\r\n0\r\n\r\n"
    );
    let head = answer_head(&mut s, &broken).await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    // A small body that came with its head is read and dropped: the connection stays, and
    // takes the next request; so does one read to its end.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let refused = format!("{}{{\"a\":1}}", post("/async/elsewhere", 7));
    for (request, status) in [
        (&refused, "404"),
        (&good, "202"),
        (&refused, "404"),
        (&good, "202"),
    ] {
        let head = answer_head(&mut s, request).await;
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_closed_by_its_timeout_does_not_linger() {
    let b = broker();
    let gw = gateway(&b.addr, "[server]\nheader_read_timeout = \"200ms\"").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let eof = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert_eq!(eof.unwrap().unwrap(), 0, "closed at its timeout");
    // A socket closed for good answers what comes next with a reset; a lingering one would
    // read and drop it (and hold one of the slots kept for clients still sending a body).
    // (A read sees only the end of stream it already had: the reset shows on a write.)
    let deadline = Instant::now() + Duration::from_secs(1);
    while s.write_all(b"GET /health HTTP/1.1\r\n\r\n").await.is_ok() {
        assert!(Instant::now() < deadline, "no reset within 1 s: lingering");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.stop().await;
}
