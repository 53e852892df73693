//! The `kafboy` binary: config errors exit 64 before binding, env and flags override the file,
//! and SIGTERM drains and flushes (exit 0), or reports what it could not deliver (exit 1).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{broker, consume};
use rdkafka::mocking::MockCluster;

fn kafboy() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kafboy"));
    c.env_remove("KAFBOY_CONFIG")
        .env("KAFBOY_LOG", "info")
        .stdin(Stdio::null());
    c
}

fn run_to_end(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kafboy");
    wait_exit(&mut child, Duration::from_secs(20));
    child.wait_with_output().expect("output")
}

fn wait_exit(child: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kafboy did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
    f
}

#[test]
fn config_errors_exit_64_and_name_the_key() {
    // The port kafboy is told to listen on is taken: a kafboy that bound before it validated
    // its config would fail to listen (another exit, another message), not exit 64 naming the
    // key.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    type Case = (Vec<(&'static str, &'static str)>, String, &'static str);
    let cases: Vec<Case> = vec![
        (vec![], "[kafka]\nbroker = \"x:1\"".into(), "broker"),
        (
            vec![],
            "[server]\nmax_body_bytes = \"big\"".into(),
            "max_body_bytes",
        ),
        (
            vec![],
            "[[routes]]\npath = \"/sync/:topic\"\nmode = \"async\"".into(),
            "clashes",
        ),
        (
            vec![],
            "[server]\nmax_body_bytes = 5000000".into(),
            "kafka.message_max_bytes",
        ),
        (
            vec![],
            "[kafka.options]\n\"linger.ms\" = \"5\"".into(),
            "kafka.options.\"linger.ms\"",
        ),
        (
            vec![],
            "[kafka.options]\n\"no.such.property\" = \"1\"".into(),
            "no.such.property",
        ),
        (vec![], "[kafka]\nacks = \"leader\"".into(), "kafka.acks"),
        (
            vec![("KAFBOY_SERVER__MAX_RECORDS", "many")],
            String::new(),
            "max_records",
        ),
        (vec![("KAFBOY_LOG", "debgu")], String::new(), "kafboy_log"),
        // Set but empty (a template's `KAFBOY_LOG=${KAFBOY_LOG}`): every line would be dropped.
        (vec![("KAFBOY_LOG", " ")], String::new(), "kafboy_log"),
    ];
    for (env, toml, want) in cases {
        let file = config_file(&toml);
        let mut cmd = kafboy();
        cmd.arg("--config")
            .arg(file.path())
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        cmd.envs(env);
        let out = run_to_end(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {stderr}");
        assert!(
            stderr.to_lowercase().contains(want),
            "want {want:?} in: {stderr}"
        );
        assert!(
            !stderr.contains("cannot listen"),
            "bound before validating: {stderr}"
        );
    }
    drop(held);
    // What check-config passes, starting must pass too: both refuse these, with 64.
    let not_a_dir = config_file("");
    let refused = [
        ("[[routes]]\npath = \"/metrics\"\ntopic = \"t\"\nmode = \"async\"".to_string(), "built-in"),
        ("[[routes]]\npath = \"/\"\ntopic = \"t\"\nmode = \"async\"".into(), "built-in"),
        ("[kafka]\nmetadata_timeout = \"0s\"".into(), "kafka.metadata_timeout"),
        ("[kafka]\nmetadata_refresh = \"0s\"".into(), "kafka.metadata_refresh"),
        ("[kafka]\nmessage_timeout = \"500us\"".into(), "kafka.message_timeout"),
        ("[kafka]\nqueue_max_messages = 0".into(), "queue_max_messages"),
        ("[kafka]\nbrokers = [\" \"]".into(), "broker"),
        ("[log]\nlevel = \"inf\"".into(), "log.level"),
        ("[server]\nbody_deadline = \"0s\"".into(), "server.body_deadline"),
        (
            "[server]\nmax_body_bytes = 1000\nmax_body_buffer_bytes = 1999".into(),
            "at least twice server.max_body_bytes",
        ),
        ("[spool]\nmax_bytes = 16383".into(), "spool.max_bytes"),
        ("[spool]\nretry_backoff = \"5ms\"".into(), "spool.retry_backoff"),
        (
            format!(
                "[spool]\ndir = \"{}\"\n[kafka]\nqueue_max_bytes = 500000\n\
                 [[routes]]\npath = \"/d/:topic\"\nmode = \"async\"\nspool = true",
                std::env::temp_dir().join("kafboy-cli-queue-check").display()
            ),
            "kafka.queue_max_bytes",
        ),
        (
            "[kafka]\nacks = \"none\"\nidempotence = false".into(),
            "cannot back a sync route",
        ),
        (
            "[kafka]\nacks = \"none\"\nidempotence = false\n[server]\ndefault_routes = false\n\
             [spool]\ndir = \"/tmp\"\n[[routes]]\npath = \"/d/:topic\"\nmode = \"async\"\nspool = true"
                .into(),
            "cannot go with spool.dir",
        ),
        // Records an earlier run left are sent by the spool with no spooled route.
        (
            "[kafka]\nacks = \"none\"\nidempotence = false\n[server]\ndefault_routes = false\n\
             [spool]\ndir = \"/tmp\"\n[[routes]]\npath = \"/d/:topic\"\nmode = \"async\""
                .into(),
            "cannot go with spool.dir",
        ),
        (
            "[topics]\nallow = [\"events\"]\n[[routes]]\npath = \"/clicks\"\ntopic = \"t1\"\nmode = \"async\"".into(),
            "topics.allow",
        ),
        ("[cluster]\npeers = [\"http://a:1\"]\nhigh_water = 5.0".into(), "cluster.high_water"),
        (format!("[spool]\ndir = \"{}/x\"", not_a_dir.path().display()), "directory"),
        ("[server]\nadmin_listen = \"127.0.0.1:9\"\nlisten = \"127.0.0.1:9\"".into(), "admin_listen"),
        ("[server]\nadmin_listen = \"127.0.0.1:9\"\nlisten = \"0.0.0.0:9\"".into(), "admin_listen"),
        ("[server]\nadmin_listen = \"[::]:9\"\nlisten = \"127.0.0.1:9\"".into(), "admin_listen"),
        ("[cluster]\npeers = [\"http://a:1\"]\nname = \"a\\u0001b\"".into(), "cluster.name"),
        // Below the default linger, and librdkafka's own checks, run when a producer is created.
        ("[kafka]\nmessage_timeout = \"3ms\"".into(), "kafka.message_timeout"),
        ("[kafka.options]\n\"retries\" = \"0\"".into(), "retries"),
        ("[server]\nsync_timeout = \"0s\"".into(), "server.sync_timeout"),
        (
            "[kafka]\nsync_linger = \"30s\"\n[server]\nsync_timeout = \"30s\"".into(),
            "kafka.sync_linger",
        ),
        ("[kafka]\nunknown_topic_ttl = \"0s\"".into(), "kafka.unknown_topic_ttl"),
        ("[kafka]\nauto_create_topics = true".into(), "exact topic names"),
        ("[kafka]\nmessage_timeout = \"50days\"".into(), "kafka.message_timeout"),
        ("[kafka]\nmessage_max_bytes = 4294968296".into(), "kafka.message_max_bytes"),
        ("[kafka]\nstatistics_interval = \"2days\"".into(), "kafka.statistics_interval"),
        ("[batch]\nbatch_size = 2000000".into(), "batch.batch_size"),
        (
            "[topics.overrides.t]\nbatch_size = 2000000".into(),
            "topics.overrides.t.batch_size",
        ),
        ("[hook]\nmax_memory_bytes = 0".into(), "hook.max_memory_bytes"),
        (
            "[topics]\nallow = [\"a\", \"logs.*\"]\n[kafka]\nauto_create_topics = true".into(),
            "exact topic names",
        ),
        ("[kafka]\nunknown_topic_ttl = \"2d\"".into(), "kafka.unknown_topic_ttl"),
        ("[kafka.options]\n\"topic.acks\" = \"0\"".into(), "typed"),
        ("[server]\nmax_headers = 100000".into(), "server.max_headers"),
        ("[server]\nmax_headers = 2".into(), "server.max_headers"),
        ("[server]\nmax_body_bytes = 0".into(), "server.max_body_bytes"),
        ("[[routes]]\npath = \"/a/../:topic\"\nmode = \"async\"".into(), "dot segment"),
        ("[[routes]]\npath = \"/a//:topic\"\nmode = \"async\"".into(), "empty segment"),
        ("[server]\nlisten = \"224.0.0.1:8000\"".into(), "server.listen"),
        ("[server]\nlisten = \"[::ffff:224.0.0.1]:8000\"".into(), "server.listen"),
        (
            "[server]\nlisten = \"127.0.0.1:8000\"\nadmin_listen = \"[::ffff:127.0.0.1]:8000\"".into(),
            "server.admin_listen",
        ),
        ("[kafka]\nbrokers = [\"h;1:9092\"]".into(), "kafka.brokers"),
        ("[spool]\ndir = \"/tmp\"\ncommit_interval = \"10m\"".into(), "spool.commit_interval"),
        (
            "[server.cors]\nallowed_origins = [\"*\"]\nallow_credentials = true".into(),
            "server.cors.allow_credentials",
        ),
        // librdkafka's own refusals name its properties, not kafboy's settings.
        (
            "[batch]\nflush_timeout = \"3m\"\n[server]\nsync_timeout = \"10m\"".into(),
            "batch.flush_timeout must be below kafka.message_timeout",
        ),
        ("[batch]\nbatch_size = 0".into(), "batch.batch_size"),
        ("[kafka]\nlinger = \"20m\"".into(), "kafka.linger"),
        // Blank or empty values that would otherwise mean something wider, or break later.
        ("[topics]\nallow = [\"\"]".into(), "allows every topic"),
        ("[spool]\ndir = \"\"".into(), "spool.dir"),
        ("[kafka]\nstatistics_interval = \"500us\"".into(), "kafka.statistics_interval"),
        ("[kafka]\nmetadata_refresh = \"400days\"".into(), "kafka.metadata_refresh"),
        ("[spool]\ndir = \"/tmp\"\ncheckpoint_interval = \"1ns\"".into(), "spool.checkpoint_interval"),
        (
            "[kafka.options]\n\"internal.termination.signal\" = \"15\"".into(),
            "not allowed",
        ),
        (
            "[server]\nsync_timeout = \"10m\"\n[topics.overrides.t]\nflush_timeout = \"2m\"".into(),
            "topics.overrides.t.flush_timeout must be below kafka.message_timeout",
        ),
    ];
    for (toml, want) in &refused {
        let file = config_file(toml);
        let checked = run_to_end({
            let mut c = kafboy();
            c.arg("check-config").arg(file.path());
            c
        });
        let started = run_to_end({
            let mut c = kafboy();
            c.arg("--config").arg(file.path());
            c
        });
        for (what, out) in [("check-config", checked), ("start", started)] {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{what} of {toml}: {stderr}");
            assert!(
                stderr.contains(want),
                "{what} of {toml}: want {want:?} in {stderr}"
            );
        }
    }
    let out = run_to_end({
        let mut c = kafboy();
        c.args(["--config", "/no/such/file.toml"]);
        c
    });
    assert_eq!(out.status.code(), Some(64));
    // A bad flag is a configuration error too; --help is not an error.
    for (args, code) in [
        (&["--listen", "nonsense"][..], 64),
        (&["--no-such-flag"][..], 64),
        (&["--help"][..], 0),
        // The demo and hash-key read no configuration: flags that name one are refused, not
        // ignored.
        (&["demo", "--config", "x.toml"][..], 64),
        (&["--brokers", "127.0.0.1:1", "demo"][..], 64),
        (&["hash-key", "--config", "x.toml"][..], 64),
        (&["-c", "x.toml", "hash-key"][..], 64),
    ] {
        let out = run_to_end({
            let mut c = kafboy();
            c.args(args);
            c
        });
        assert_eq!(out.status.code(), Some(code), "{args:?}");
    }
}

#[test]
fn a_closed_output_gives_its_exit_code_not_a_panic() {
    // `kafboy check-config 2>&1 | head -1`: the reader gone before kafboy writes its error.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let bad = config_file("[server]\nlisten = \"nowhere\"\n");
    let status = kafboy()
        .arg("check-config")
        .arg(bad.path())
        .stdout(Stdio::null())
        .stderr(writer)
        .status()
        .expect("run kafboy");
    assert_eq!(status.code(), Some(64), "a config error, not a panic");
    // A key whose output did not get out exists nowhere: a failure, not a success.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let status = kafboy()
        .arg("hash-key")
        .stdout(writer)
        .stderr(Stdio::null())
        .status()
        .expect("run kafboy");
    assert_eq!(status.code(), Some(1), "a key that was not written");
}

#[test]
fn check_config_says_what_a_start_would_warn_of() {
    let file = config_file(
        "[server]\nlisten = \"0.0.0.0:8000\"\nmax_connections = 1000000000\n\
         [batch]\nflush_timeout = \"60s\"\n\
         [kafka.sasl]\nmechanism = \"plain\"\nusername = \"u\"\npassword_env = \"KAFBOY_TEST_PW\"",
    );
    let out = run_to_end({
        let mut c = kafboy();
        c.arg("check-config")
            .arg(file.path())
            .env("KAFBOY_TEST_PW", "pw");
        c
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("in clear"), "{stderr}");
    assert!(stderr.contains("auth is off"), "{stderr}");
    assert!(stderr.contains("not below server.sync_timeout"), "{stderr}");
    // Unless this machine sets no limit at all, a billion connections are past it.
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let unlimited = limits
        .lines()
        .any(|l| l.starts_with("Max open files") && l.contains("unlimited"));
    if !limits.is_empty() && !unlimited {
        assert!(stderr.contains("open-file limit"), "{stderr}");
    }
}

#[test]
fn check_config_without_a_file_checks_the_one_config_names() {
    let bad = config_file("[server]\nmax_body_bytes = 0");
    let good = config_file("");
    for how in ["flag", "env", "flag over env"] {
        let out = run_to_end({
            let mut c = kafboy();
            match how {
                "flag" => c.arg("--config").arg(bad.path()).arg("check-config"),
                "env" => c.arg("check-config").env("KAFBOY_CONFIG", bad.path()),
                _ => c
                    .arg("--config")
                    .arg(bad.path())
                    .arg("check-config")
                    .env("KAFBOY_CONFIG", good.path()),
            };
            c
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{how}: {stderr}");
        assert!(stderr.contains("server.max_body_bytes"), "{how}: {stderr}");
    }
    // No file at all: the defaults and the environment.
    let out = run_to_end({
        let mut c = kafboy();
        c.arg("check-config");
        c
    });
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("# no file: valid"));
}

#[test]
fn a_bad_value_from_the_environment_names_its_key_and_variable() {
    for (var, value, key) in [
        ("KAFBOY_BATCH__BATCH_SIZE", "abc", "\"batch.batch_size\""),
        (
            "KAFBOY_KAFKA__OPTIONS",
            "{\"socket.timeout.ms\"=1}",
            "\"kafka.options.socket.timeout.ms\"",
        ),
    ] {
        let out = run_to_end({
            let mut c = kafboy();
            c.arg("check-config").env(var, value);
            c
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        let named = format!("for key {key} in environment variable {var}");
        assert!(stderr.contains(&named), "{stderr}");
    }
}

#[test]
fn environment_values_are_read_as_the_readme_says() {
    let file = config_file("");
    let out = run_to_end({
        let mut c = kafboy();
        c.arg("check-config")
            .arg(file.path())
            .env("KAFBOY_TOPICS__ALLOW", "a, b")
            .env(
                "KAFBOY_CLUSTER__PEERS",
                "http://10.0.0.2:8000,http://10.0.0.3:8000",
            )
            .env("KAFBOY_KAFKA__CLIENT_ID", "\"123\"");
        c
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Value =
        toml::from_str(stdout.split_once('\n').map_or("", |(_, rest)| rest))
            .expect("the effective configuration is TOML");
    assert_eq!(
        effective["topics"]["allow"],
        toml::Value::try_from(["a", "b"]).unwrap()
    );
    assert_eq!(
        effective["cluster"]["peers"],
        toml::Value::try_from(["http://10.0.0.2:8000", "http://10.0.0.3:8000"]).unwrap()
    );
    assert_eq!(effective["kafka"]["client_id"].as_str(), Some("123"));
}

/// Starts the binary on port 0 and waits for `/ready`.
async fn start(mut cmd: Command) -> (Child, String) {
    cmd.args(["--listen", "127.0.0.1:0"]);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let port = common::listening_port(&mut child);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = common::client().get(format!("{url}/ready")).send().await
            && r.status() == 200
        {
            return (child, url);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("kafboy exited early: {status}");
        }
        assert!(Instant::now() < deadline, "kafboy not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

fn output_of(mut child: Child) -> (Option<i32>, String) {
    wait_exit(&mut child, Duration::from_secs(30));
    let mut text = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    (child.wait().unwrap().code(), text)
}

/// A failure at start that `check-config` cannot see is not a configuration error: a spool
/// directory still held by another process (the one a rolling restart is stopping) exits 1, so
/// that a supervisor tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_in_use_at_start_exits_1_not_64() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&format!(
        "[spool]\ndir = {:?}\n",
        dir.path().display().to_string()
    ));
    let mut first = kafboy();
    first
        .args(["--brokers", &b.addr])
        .arg("--config")
        .arg(file.path());
    let (child, _) = start(first).await;
    let second = run_to_end({
        let mut c = kafboy();
        c.args(["--brokers", &b.addr, "--listen", "127.0.0.1:0"])
            .arg("--config")
            .arg(file.path());
        c
    });
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");
    sigterm(&child);
    assert_eq!(output_of(child).0, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_every_accepted_record_and_exits_0() {
    let b = broker();
    let topic = b.topic("term", 2);
    let mut cmd = kafboy();
    // Settings from the environment: a flush timeout far longer than the test.
    cmd.args(["--brokers", &b.addr])
        .env("KAFBOY_BATCH__FLUSH_TIMEOUT", "60s")
        .env("KAFBOY_BATCH__BATCH_SIZE", "100000")
        .env("KAFBOY_SERVER_MAX_RECORDS", "5")
        .env("KAFBOY_SERVER__MAX_RECORDS__", "5");
    let (mut child, url) = start(cmd).await;
    let lines: String = (0..100).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    for _ in 0..3 {
        let r = common::client()
            .post(format!("{url}/batch/async/{topic}"))
            .header("content-type", "application/x-ndjson")
            .body(lines.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // SIGHUP reloads; it must never end the process (no keys or TLS configured here).
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        assert!(child.try_wait().unwrap().is_none(), "SIGHUP ended kafboy");
        if common::client()
            .get(format!("{url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
    }
    sigterm(&child);
    let (code, log) = output_of(child);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("all accepted records delivered"), "{log}");
    // One underscore where two belong: said, not silently dropped (and not applied: the
    // batches of 100 records went through).
    assert!(
        log.contains("KAFBOY_SERVER_MAX_RECORDS") && log.contains("not a setting"),
        "{log}"
    );
    // An empty segment, which figment drops without a word: said too.
    assert!(log.contains("KAFBOY_SERVER__MAX_RECORDS__"), "{log}");
    // Three copies of the 100 lines (over two partitions: compared sorted).
    let mut got = common::values(&consume(&b.addr, &topic, 300));
    got.sort();
    let mut want: Vec<String> = (0..300).map(|i| format!("{{\"i\":{}}}", i % 100)).collect();
    want.sort();
    assert_eq!(got, want);
}

/// The binary against a one-broker mock cluster with `topic`, a shutdown timeout of 1 s and
/// records that expire after `message_timeout`.
async fn start_on_mock(
    topic: &str,
    message_timeout: &str,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    Child,
    String,
) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(topic, 1, 1).unwrap();
    let mut cmd = kafboy();
    cmd.args(["--brokers", &cluster.bootstrap_servers()])
        .env("KAFBOY_SERVER__SHUTDOWN_TIMEOUT", "1s")
        .env("KAFBOY_KAFKA__MESSAGE_TIMEOUT", message_timeout);
    let (child, url) = start(cmd).await;
    (cluster, child, url)
}

/// Posts `n` records to `/async/{topic}`, each answered 202.
async fn post_accepted(url: &str, topic: &str, n: u64) {
    for i in 0..n {
        let r = common::client()
            .post(format!("{url}/async/{topic}"))
            .body(format!("{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_brokers_down_reports_undelivered_and_exits_1() {
    let (cluster, child, url) = start_on_mock("down", "5m").await;
    // A fresh process shows the counters it knows the labels of at 0, before any event.
    let metrics = common::get_text(&format!("{url}/metrics")).await;
    assert!(
        metrics.contains("\nkafboy_connections_refused_total 0\n"),
        "{metrics}"
    );
    cluster.broker_down(1).unwrap();
    post_accepted(&url, "down", 5).await;
    let start = Instant::now();
    sigterm(&child);
    let (code, log) = output_of(child);
    assert_eq!(code, Some(1), "{log}");
    // Never sent: none may have been written.
    assert!(log.contains("undelivered=5 maybe_written=0"), "{log}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "bounded by the shutdown timeout"
    );
}

/// A burst of failed records writes one line, and the count of the rest on a line of its own
/// once the throttle's second has passed: not on some later, unrelated failure, nor never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_left_out_of_the_log_are_told_within_seconds() {
    let (cluster, mut child, url) = start_on_mock("burst", "1s").await;
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn({
        let log = log.clone();
        move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    cluster.broker_down(1).unwrap();
    const BURST: u64 = 5;
    post_accepted(&url, "burst", BURST).await;
    // Every record is on a line of its own or in a count: suppressed= on a later line of the
    // same kind, left_out= on the line that tells them.
    let told = |log: &str| -> u64 {
        let field = |line: &str, name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name)?.parse().ok())
                .unwrap_or(0)
        };
        log.lines()
            .map(|line| {
                if line.contains("accepted record not delivered producer") {
                    1 + field(line, "suppressed=")
                } else if line.contains("lines left out what=\"accepted record not delivered\"") {
                    field(line, "left_out=")
                } else {
                    0
                }
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = log.lock().unwrap().clone();
        if text.contains("lines left out what=") && told(&text) == BURST {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "told {} of {BURST}:\n{text}",
            told(&text)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(&child);
    wait_exit(&mut child, Duration::from_secs(30));
    reader.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_quick_start_works_as_printed() {
    let mut child = kafboy()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn demo");
    // The demo prints where it listens, the port it was given for port 0.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let banner = tokio::task::spawn_blocking(move || {
        let mut banner = String::new();
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
            assert!(n > 0, "no address printed: {banner}");
            banner.push_str(&line);
            if let Some(at) = line
                .trim()
                .strip_prefix("kafboy demo: listening on http://")
            {
                return (at.trim_end_matches("; try").to_string(), stdout);
            }
        }
    });
    let Ok(banner) = tokio::time::timeout(Duration::from_secs(20), banner).await else {
        let _ = child.kill();
        panic!("the demo printed no address within 20 s");
    };
    let (listen, mut stdout) = banner.unwrap();
    assert!(!listen.ends_with(":0"), "{listen}");
    let url = format!("http://{listen}/batch/async/ekaf");
    let deadline = Instant::now() + Duration::from_secs(20);
    // curl -d sends a form; a bare -XPOST sends nothing and no Content-Type.
    let curl = |body: Option<&'static str>| {
        let req = common::client().post(&url);
        match body {
            Some(b) => req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(b),
            None => req,
        }
        .send()
    };
    let first = loop {
        if let Ok(r) = curl(Some("test=a")).await {
            break r;
        }
        assert!(Instant::now() < deadline, "demo never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first.text().await.unwrap(), r#"{"ok":"fast reply"}"#);
    assert_eq!(
        curl(Some("hello=a")).await.unwrap().text().await.unwrap(),
        r#"{"ok":1}"#
    );
    // An empty "hello" would be an empty record: refused, saying why.
    let r = curl(Some("hello=")).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"error":"the hook set an empty body"}"#
    );
    // JSON with curl -d and no -H: refused with a hint, though the demo hook reads fields.
    let r = curl(Some(r#"{"test":"a"}"#)).await.unwrap();
    assert_eq!(r.status(), 415);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("Content-Type: application/json")
    );
    let r = curl(None).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"ekaf.insufficient"}"#);
    // NDJSON: the demo hook lets the records through as they are (its type matched as kafboy
    // matches it, case aside).
    let r = common::client()
        .post(&url)
        .header("content-type", "Application/X-NDJSON")
        .body("{\"n\":1}\n{\"n\":2}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.text().await.unwrap(), r#"{"ok":2}"#);
    // Any other JSON goes the fast-reply way too: an array, a "hello" that is not a string.
    for body in ["[1,2]", r#"{"hello":5}"#, "7"] {
        let r = common::client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{body}");
        assert_eq!(r.text().await.unwrap(), r#"{"ok":"fast reply"}"#, "{body}");
    }
    // Both records are printed as they land; read stdout until they are.
    let seen = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let n = stdout.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.contains("value=a\n")
                && text.contains(r#"value={"test":"a","extra":"true"}"#)
                && text.contains(r#"value={"n":2}"#)
            {
                break;
            }
        }
        text
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !seen.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&child);
    let text = seen.await.unwrap();
    assert!(
        text.contains("delivered topic=ekaf partition=0 offset="),
        "{text}"
    );
    assert!(
        text.contains(r#"value={"test":"a","extra":"true"}"#),
        "{text}"
    );
    assert!(text.contains("key=- value=a\n"), "{text}");
    assert!(
        text.contains(r#"value={"n":1}"#) && text.contains(r#"value={"n":2}"#),
        "{text}"
    );
    wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A disk that hangs (here a FIFO where the spool writes its next checkpoint: opening it blocks)
/// holds a spool file operation for good. The shutdown has its grace, and then the process
/// exits: the runtime does not wait for the blocked operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_operation_hung_on_the_disk_does_not_hold_the_exit() {
    let b = broker();
    let topic = b.topic("hung", 1);
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&format!(
        "[spool]\ndir = {:?}\ndefault_routes = true\ncheckpoint_interval = \"20ms\"\n\
         [server]\nshutdown_timeout = \"1s\"\n",
        dir.path().display().to_string()
    ));
    let mut cmd = kafboy();
    cmd.args(["--brokers", &b.addr])
        .arg("--config")
        .arg(file.path());
    let (mut child, url) = start(cmd).await;
    let fifo = dir.path().join("checkpoint.tmp");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let r = common::client()
        .post(format!("{url}/async/{topic}"))
        .header("content-type", "application/json")
        .body("{\"hung\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Delivered, so the next checkpoint is written, and blocks on the FIFO.
    let addr = b.addr.clone();
    let got = tokio::task::spawn_blocking(move || consume(&addr, &topic, 1))
        .await
        .unwrap();
    assert_eq!(common::values(&got), ["{\"hung\":1}"]);
    sigterm(&child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Whatever happened, let the blocked open go (a reader on the FIFO, opened without
    // waiting for a writer) and the child end.
    {
        use std::os::unix::fs::OpenOptionsExt;
        const O_NONBLOCK: i32 = 0o4000;
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(&fifo);
    }
    let _ = child.kill();
    let status = exited.expect("kafboy did not exit within 30 s of SIGTERM");
    assert!(status.code().is_some(), "{status}");
}
