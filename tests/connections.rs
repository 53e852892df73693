//! The connection cap, in a test binary of its own: the count of refused connections is
//! process-wide, and other tests that fill their caps would add to it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{broker, gateway, raw_http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_get_503() {
    let b = broker();
    let gw = gateway(&b.addr, "[server]\nmax_connections = 4").await;
    // The readiness probe's connection may still be closing; wait until all 4 slots hold ours.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < 4 {
        assert!(Instant::now() < deadline, "{} of 4 slots taken", held.len());
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200") {
            held.push(s);
        }
    }
    let answer = raw_http(gw.addr, b"GET /health HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("retry-after: 1")
            && answer.contains("too many connections")
            && answer.contains("x-request-id: "),
        "{answer}"
    );
    held.pop();
    // Once a slot is free the next client is served (the close takes a moment to be noticed).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = raw_http(
            gw.addr,
            b"GET /health HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {answer}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    // The refusal is counted (a slot may take a moment to come free again).
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let answer = raw_http(
            gw.addr,
            b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            break answer;
        }
        assert!(Instant::now() < deadline, "no slot for /metrics: {answer}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kafboy_connections_refused_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(refused.is_some_and(|n| n >= 1.0), "{metrics}");
    gw.stop().await;
}
