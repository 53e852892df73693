//! Replays every saved input through the fuzz targets' checks, on stable Rust without libFuzzer:
//! `regressions/<target>/` holds inputs that once failed, `seeds/<target>/` the starting corpus.
//! `scripts/test` runs them (`cargo test` in `fuzz/`).

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["regressions", "seeds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                let data = std::fs::read(&path).expect("read input");
                eprintln!("{}", path.display());
                check(&data);
                n += 1;
            }
        }
    }
    n
}

#[test]
fn decode_inputs() {
    assert!(replay("decode", kafboy_fuzz::decode) > 0);
}

#[test]
fn routes_inputs() {
    assert!(replay("routes", kafboy_fuzz::routes) > 0);
}

#[test]
fn record_inputs() {
    assert!(replay("record", kafboy_fuzz::record) > 0);
}

// Findings the fuzz targets made (see README.md), fixed in src/: each test states the behaviour
// wanted.

#[test]
fn json_gate_refuses_what_serde_json_refuses() {
    for body in [
        &b"1e400"[..],
        b"[-2e999]",
        b"\"\\ud800\"",
        b"\"\\udc00\"",
        b"\"\\ud83d:ude00\"",
        b"{\"\\ud800\":1}",
    ] {
        assert!(serde_json::from_slice::<serde_json::Value>(body).is_err());
        assert!(
            kafboy::decode::check_json(body, 64).is_err(),
            "accepted {}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn compile_refuses_paths_no_request_can_match() {
    for path in [
        "/?.",
        "/a?b/:topic",
        "/a#b",
        "/a b/:topic",
        "/é/:topic",
        "/a\"b",
    ] {
        let mut config = kafboy::Config::default();
        let topic = (!path.contains(":topic")).then(|| "t".to_string());
        config.routes.push(kafboy_fuzz::route_config(
            path.into(),
            topic,
            "sync",
            "auto",
        ));
        assert!(
            kafboy::routes::compile(&config).is_err(),
            "compiled {path:?}"
        );
    }
}

#[test]
fn query_key_is_bytes_or_refused() {
    let request = axum::http::Request::builder()
        .uri("/t?key=%FF%00a")
        .body(())
        .unwrap();
    let (parts, ()) = request.into_parts();
    let meta = kafboy::record::RecordMeta::from_parts(&parts).unwrap();
    assert_eq!(meta.key.as_deref(), Some(&b"\xff\x00a"[..]));
}
