//! Test fixtures: a tansu broker per test binary, kafboy on port 0 from a TOML string, unique
//! topics, and a consumer that reads records back with a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kafboy::{App, Config, ShutdownReport};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How tansu is found: `KAFBOY_TANSU`, then `.tools/bin/tansu` (what `scripts/install-tansu`
/// puts there), then `PATH`.
pub fn tansu_path() -> PathBuf {
    if let Ok(p) = std::env::var("KAFBOY_TANSU") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/tansu");
    if local.is_file() {
        return local;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the tansu broker is needed by this test and was not found.\n\
             Install it with `scripts/install-tansu` (or run everything with `scripts/test`),\n\
             or point KAFBOY_TANSU at a tansu binary."
        )
    })
}

/// A tansu broker on a free loopback port, shared by the tests of one test binary. It stops when
/// the test process exits (a watchdog shell kills it).
pub struct Broker {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The watchdog shell; it outlives the tests on purpose and ends with this process.
    _watchdog: std::process::Child,
}

static BROKER: OnceLock<Broker> = OnceLock::new();

/// The shared broker, started on first use.
pub fn broker() -> &'static Broker {
    BROKER.get_or_init(start_broker)
}

fn start_broker() -> Broker {
    Broker::advertising(None)
}

impl Broker {
    /// A broker of its own (not the shared one), telling clients to reach it at `advertised`
    /// (a proxy in front of it) instead of its own address. `addr` is its own address: tansu's
    /// topic commands use it directly.
    pub fn advertising(advertised: Option<&str>) -> Broker {
        let tansu = tansu_path();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let url = format!("tcp://{addr}");
        let advertised = advertised.map_or(url.clone(), |a| format!("tcp://{a}"));
        // tansu reads .env from its working directory, hence the empty temp dir. The watchdog polls
        // this process and stops the broker when it is gone.
        let script = format!(
            "\"$0\" broker --listener-url {url} --advertised-listener-url {advertised} \
         --storage-engine memory://tansu/ >broker.log 2>&1 & b=$!; \
         while kill -0 {pid} 2>/dev/null && kill -0 $b 2>/dev/null; do sleep 1; done; kill $b",
            pid = std::process::id()
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&tansu)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {addr}; see {}/broker.log",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker {
            addr,
            _watchdog: watchdog,
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A name no other test of any test process uses: `prefix`, the process id and a counter.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Broker {
    /// Creates a topic with a name unique to this process and returns the name.
    pub fn topic(&self, prefix: &str, partitions: u32) -> String {
        let name = unique_name(prefix);
        self.create_topic(&name, partitions);
        name
    }

    /// Deletes `name`.
    pub fn delete_topic(&self, name: &str) {
        self.topic_command("delete", &[name]);
    }

    /// Creates `name` with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.topic_command("create", &["--partitions", &partitions.to_string(), name]);
    }

    /// Runs `tansu topic <verb> --broker ... <args>`, which must succeed.
    fn topic_command(&self, verb: &str, args: &[&str]) {
        let broker = format!("tcp://{}", self.addr);
        let out = Command::new(tansu_path())
            .args(["topic", verb, "--broker", &broker])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run tansu topic {verb}: {e}"));
        assert!(
            out.status.success(),
            "topic {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A record read back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// Name and value; a null value is `None`, apart from an empty one.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record's time, ms since the epoch.
    pub timestamp: Option<i64>,
}

/// The headers of a consumed message, null values kept apart from empty ones.
pub fn headers_of(msg: &impl Message) -> Vec<(String, Option<Vec<u8>>)> {
    msg.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// A message as [`Consumed`].
pub fn consumed(msg: &impl Message) -> Consumed {
    Consumed {
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(<[u8]>::to_vec),
        value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: headers_of(msg),
        timestamp: msg.timestamp().to_millis(),
    }
}

/// Reads `topic` from the beginning until `want` records arrived or 15 s passed.
pub fn consume(brokers: &str, topic: &str, want: usize) -> Vec<Consumed> {
    consume_for(brokers, topic, want, Duration::from_secs(15))
}

/// A consumer assigned to every partition of `topic` from its first record.
pub fn consumer_from_start(brokers: &str, topic: &str) -> BaseConsumer {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", brokers);
    consumer_from_start_with(base, topic)
}

/// The same, with `base`'s settings (brokers, TLS).
pub fn consumer_from_start_with(mut base: ClientConfig, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = base
        .set("group.id", format!("check-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("offset");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// A librdkafka mock cluster of `brokers` brokers with one fresh topic (unique per process and
/// call) of `partitions` partitions, replicated on every broker.
pub fn mock_topic(
    brokers: i32,
    prefix: &str,
    partitions: i32,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let cluster = rdkafka::mocking::MockCluster::new(brokers).expect("mock cluster");
    let topic = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    cluster
        .create_topic(&topic, partitions, brokers)
        .expect("create topic");
    (cluster, topic)
}

/// Reads `topic` until `want` records arrived or `wait` passed, whichever is first.
pub fn consume_for(brokers: &str, topic: &str, want: usize, wait: Duration) -> Vec<Consumed> {
    consume_from(&consumer_from_start(brokers, topic), want, wait)
}

/// Reads with `consumer` until `want` records arrived or `wait` passed.
pub fn consume_from(consumer: &BaseConsumer, want: usize, wait: Duration) -> Vec<Consumed> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = msg.expect("consume");
        out.push(consumed(&msg));
    }
    out.sort_by_key(|c| (c.partition, c.offset));
    out
}

/// How long [`consume_all`] waits for the records a test expects: a fresh consumer's first
/// fetch and the first delivery can take seconds on a busy machine.
pub const EXPECTED_WAIT: Duration = Duration::from_secs(30);

/// How long [`consume_all`] goes on reading once the expected records are in, for any beyond
/// them. The consumer is fetching by then, so a record already written shows at once.
pub const EXTRA_GRACE: Duration = Duration::from_secs(2);

/// Reads with `consumer` until `want` records arrived (or `wait` passed), then for `grace` more
/// to catch records beyond them: a result longer than `want` holds one that should not be there.
pub fn consume_with_grace(
    consumer: &BaseConsumer,
    want: usize,
    wait: Duration,
    grace: Duration,
) -> Vec<Consumed> {
    let mut out = consume_from(consumer, want, wait);
    if out.len() == want {
        out.extend(consume_from(consumer, 1, grace));
        out.sort_by_key(|c| (c.partition, c.offset));
    }
    out
}

/// Reads `topic` from the start: `want` records (up to [`EXPECTED_WAIT`] for them), and any
/// that come within [`EXTRA_GRACE`] after them.
pub fn consume_all(brokers: &str, topic: &str, want: usize) -> Vec<Consumed> {
    let consumer = consumer_from_start(brokers, topic);
    consume_with_grace(&consumer, want, EXPECTED_WAIT, EXTRA_GRACE)
}

/// [`consume_all`] on a blocking thread, for async tests.
pub async fn read_all(brokers: &str, topic: &str, want: usize) -> Vec<Consumed> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || consume_all(&brokers, &topic, want))
        .await
        .expect("consumer task")
}

/// Reads with `consumer` until `done` holds for what was read, failing after `wait`.
pub fn consume_until(
    consumer: &BaseConsumer,
    wait: Duration,
    done: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    while !done(&out) {
        assert!(
            Instant::now() < deadline,
            "not found within {wait:?}; read: {:?}",
            values(&out)
        );
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        out.push(consumed(&msg.expect("consume")));
    }
    out.sort_by_key(|c| (c.partition, c.offset));
    out
}

/// A record written after the requests a test checks, through a route that surely works (for
/// async routes, the same producer as theirs), so that what they wrote, if anything, comes
/// before it in its partition.
pub const MARKER: &str = r#"{"marker":true}"#;

/// Reads `topic` from the start until `markers` records with the value [`MARKER`] arrived
/// (failing after 15 s), and returns every other record read, by partition and offset. With
/// one marker per producer and partition the requests used, nothing they wrote can come later.
pub fn before_markers(brokers: &str, topic: &str, markers: usize) -> Vec<Consumed> {
    let consumer = consumer_from_start(brokers, topic);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut seen, mut out) = (0, Vec::new());
    while seen < markers {
        assert!(
            Instant::now() < deadline,
            "{seen} of {markers} markers read from {topic} within 15 s; before them: {out:?}"
        );
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let record = consumed(&msg.expect("consume"));
        if record.value == MARKER.as_bytes() {
            seen += 1;
        } else {
            out.push(record);
        }
    }
    out.sort_by_key(|c| (c.partition, c.offset));
    out
}

/// The values of `records`, as text (lossy), for comparisons that print well.
pub fn values(records: &[Consumed]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect()
}

/// Writes [`MARKER`] to `topic` with a producer of the test's own, and waits for its ack: for
/// topics kafboy may not write to.
pub fn produce_marker(brokers: &str, topic: &str) {
    use rdkafka::producer::{BaseRecord, Producer};
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("producer");
    producer
        .send(BaseRecord::<(), _>::to(topic).payload(MARKER))
        .map_err(|(e, _)| e)
        .expect("queue the marker");
    producer
        .flush(Duration::from_secs(15))
        .expect("marker delivered");
}

/// kafboy serving on `127.0.0.1:<free port>`.
pub struct Gateway {
    pub addr: SocketAddr,
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<ShutdownReport>,
}

/// Starts kafboy from `toml` (merged over the defaults) with `brokers`, and waits until `/ready`.
pub async fn gateway(brokers: &str, toml: &str) -> Gateway {
    let gw = gateway_unready(brokers, toml).await;
    gw.wait_ready().await;
    gw
}

/// Starts kafboy without waiting for readiness.
pub async fn gateway_unready(brokers: &str, toml: &str) -> Gateway {
    let mut config = Config::from_toml(toml).expect("test config");
    config.kafka.brokers = vec![brokers.to_string()];
    serve_unready(App::build(&config).expect("build app")).await
}

/// Serves an already built app on a free port and waits until `/ready`.
pub async fn serve(app: App) -> Gateway {
    let gw = serve_unready(app).await;
    gw.wait_ready().await;
    gw
}

/// Serves an already built app on a listener bound by the caller, and waits until `/ready`.
pub async fn serve_on(app: App, listener: tokio::net::TcpListener) -> Gateway {
    let gw = serve_listener(app, listener);
    gw.wait_ready().await;
    gw
}

async fn serve_unready(app: App) -> Gateway {
    serve_listener(
        app,
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    )
}

fn serve_listener(app: App, listener: tokio::net::TcpListener) -> Gateway {
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(listener, async {
        let _ = stopped.await;
    }));
    Gateway {
        addr,
        url: format!("http://{addr}"),
        stop: Some(stop),
        task,
    }
}

impl Gateway {
    /// Polls `/ready` for up to 20 s.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = client().get(format!("{}/ready", self.url)).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "kafboy not ready within 20 s");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM's equivalent and waits for the shutdown report.
    pub async fn stop(mut self) -> ShutdownReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("server task")
    }

    /// POSTs `body` with `content_type` to `path`.
    pub async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut req = client().post(format!("{}{path}", self.url)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        Reply::read(req.send().await.expect("request")).await
    }

    /// POSTs a JSON body.
    pub async fn post_json(&self, path: &str, body: &str) -> Reply {
        self.post(path, Some("application/json"), body.to_string())
            .await
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub async fn read(r: reqwest::Response) -> Reply {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().await.expect("body");
        Reply {
            status,
            headers,
            body,
        }
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `error` message of an error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", self.body))
            .to_string()
    }
}

/// GETs `url` and parses its body as JSON.
pub async fn get_json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(url).await).expect("JSON")
}

/// The body of `GET url`, as text.
pub async fn get_text(url: &str) -> String {
    let response = client().get(url).send().await.expect("GET");
    response.text().await.expect("body")
}

/// A plain HTTP client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Sends raw bytes on a fresh connection and returns everything read until the server closes
/// it or 5 s pass.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && response_complete(&out) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn response_complete(out: &[u8]) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok());
    length.is_some_and(|n| body.len() >= n)
}

/// The port process `pid` listens on over IPv4 loopback, once it does: for a child started
/// with `--listen 127.0.0.1:0`. Read from `/proc` (its sockets, then the kernel's TCP table),
/// so nothing has to be parsed from its logs. Fails after 20 s, or if the child exits.
pub fn listening_port(child: &mut std::process::Child) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(port) = loopback_listener(child.id()) {
            return port;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("exited before it listened: {status}");
        }
        assert!(Instant::now() < deadline, "not listening after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loopback_listener(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local address, state (0A: LISTEN), inode; 0100007F is 127.0.0.1.
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        let (ip, port) = local.split_once(':')?;
        let ours = ip == "0100007F" && *state == "0A" && inodes.iter().any(|i| i == inode);
        ours.then(|| u16::from_str_radix(port, 16).ok())?
    })
}
