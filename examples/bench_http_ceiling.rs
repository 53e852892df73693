//! Benchmark HTTP ceiling: a bare hyper 1 server on the same hyper and tokio as kafboy that reads
//! the whole request body and answers `202 {"ok":1}`, nothing else. What kafboy's `/async` is
//! measured against.
//!
//! ```text
//! bench_http_ceiling [--listen ADDR] [--workers N] [--validate] [--hyper-like-kafboy]
//!                    [--work-ns N]
//! ```
//!
//! - `--workers N`: tokio worker threads; by default tokio's own default (one per CPU the process
//!   may run on, as kafboy's runtime), so `taskset -c 0` gives one worker to both.
//! - `--validate`: also checks the body with kafboy's JSON check (`kafboy::json::validate`,
//!   default depth limit 64); invalid JSON gets 400.
//! - `--hyper-like-kafboy`: the connection settings kafboy's listener uses (hyper timer with a
//!   header read timeout, header limits), to tell their cost from the rest of kafboy's.
//! - `--work-ns N`: spins for N ns of user-space CPU per request before answering: how the
//!   throughput of a bare server falls with the work it does per request (docs/BENCHMARKS.md,
//!   "User space and the kernel").
//!
//! Prints `listening=ADDR workers=N` on stdout, then serves until killed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

#[derive(Clone, Copy)]
struct Options {
    validate: bool,
    like_kafboy: bool,
    work: Duration,
}

fn main() {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut workers: Option<usize> = None;
    let mut options = Options {
        validate: false,
        like_kafboy: false,
        work: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--listen" => match it.next().map(|v| v.parse()) {
                Some(Ok(a)) => listen = a,
                _ => fail("--listen needs HOST:PORT"),
            },
            "--workers" => match it.next().map(|v| v.parse()) {
                Some(Ok(n)) if n > 0 => workers = Some(n),
                _ => fail("--workers needs a positive number"),
            },
            "--validate" => options.validate = true,
            "--hyper-like-kafboy" => options.like_kafboy = true,
            "--work-ns" => match it.next().map(|v| v.parse()) {
                Some(Ok(n)) => options.work = Duration::from_nanos(n),
                _ => fail("--work-ns needs a number of nanoseconds"),
            },
            other => fail(&format!(
                "unknown argument {other}; usage: bench_http_ceiling [--listen ADDR] \
                 [--workers N] [--validate] [--hyper-like-kafboy] [--work-ns N]"
            )),
        }
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => fail(&format!("runtime: {e}")),
    };
    let workers = runtime.metrics().num_workers();
    runtime.block_on(serve(listen, workers, options));
}

fn fail(message: &str) -> ! {
    eprintln!("bench_http_ceiling: {message}");
    std::process::exit(2);
}

async fn serve(listen: SocketAddr, workers: usize, options: Options) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => fail(&format!("cannot listen on {listen}: {e}")),
    };
    let addr = listener.local_addr().unwrap_or(listen);
    println!("listening={addr} workers={workers}");
    let mut http = http1::Builder::new();
    if options.like_kafboy {
        // The same settings as src/listener.rs with kafboy's defaults.
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .max_headers(100)
            .max_header_size(65536);
    }
    loop {
        let Ok((tcp, _peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let connection = http.serve_connection(
            TokioIo::new(tcp),
            service_fn(move |req| handle(req, options)),
        );
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    options: Options,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, r#"{"error":"body"}"#)),
    };
    if options.validate && !valid_json(&body) {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid json"}"#,
        ));
    }
    if !options.work.is_zero() {
        spin(options.work);
    }
    Ok(reply(StatusCode::ACCEPTED, r#"{"ok":1}"#))
}

/// Burns `work` of CPU on this thread, as a stand-in for what a real server does per request.
fn spin(work: Duration) {
    let start = Instant::now();
    while start.elapsed() < work {
        std::hint::spin_loop();
    }
}

fn valid_json(body: &[u8]) -> bool {
    kafboy::json::validate(body, 64).is_ok()
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
