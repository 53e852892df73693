//! Speed of the JSON check every JSON record passes (`kafboy::json::validate`), on the bodies
//! the benchmark harness sends (bench/run: events with nested objects, short strings, ints and
//! floats), against serde_json skipping the same bytes (`IgnoredAny`, which checks less).
//! Run: `cargo bench --bench json`. Prints the median of 9 rounds, in ns per body and per byte.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;

/// The 1 KiB body of bench/run.
const BODY_1K: &str = r#"{"user":{"id":2171029,"name":"eli"},"event":"logout","ts":1764000037888,"score":0.8428,"page":"/","geo":{"lat":44.52697,"lon":136.74943},"items":[{"sku":"E-1711","qty":1,"price":309.17,"tags":["purchase","signup"]},{"sku":"B-4957","qty":5,"price":218.15,"tags":["search","share"]},{"sku":"D-7075","qty":6,"price":348.96,"tags":["search","click"]},{"sku":"F-8221","qty":7,"price":231.93,"tags":["logout","view"]},{"sku":"D-7784","qty":8,"price":100.02,"tags":["logout","click"]},{"sku":"D-5972","qty":8,"price":37.06,"tags":["view","signup"]},{"sku":"G-9829","qty":3,"price":289.82,"tags":["search","signup"]},{"sku":"H-4251","qty":8,"price":295.38,"tags":["signup","click"]},{"sku":"A-3927","qty":2,"price":482.59,"tags":["view","share"]},{"sku":"E-9425","qty":6,"price":136.25,"tags":["share","scroll"]},{"sku":"B-4903","qty":4,"price":179.64,"tags":["share","scroll"]},{"sku":"H-1972","qty":1,"price":408.52,"tags":["view","signup"]},{"sku":"C-4629","qty":8,"price":139.12,"tags":["search","click"]}],"ref":"a1ppmdudcba4"}"#;

/// The same event with `items` repeated until the body is about `size` bytes.
fn body(size: usize) -> Vec<u8> {
    let start = BODY_1K.find("[{").expect("items") + 1;
    let end = BODY_1K.rfind("}]").expect("items") + 1;
    let items = &BODY_1K[start..end];
    let mut all = String::from(items);
    while BODY_1K.len() - items.len() + all.len() + items.len() < size {
        all.push(',');
        all.push_str(items);
    }
    format!("{}{}{}", &BODY_1K[..start], all, &BODY_1K[end..]).into_bytes()
}

fn median(rounds: usize, calls: u32, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                f();
            }
            start.elapsed() / calls
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

fn main() {
    println!("JSON check, median of 9 rounds");
    for (name, doc) in [
        ("1 KiB", BODY_1K.as_bytes().to_vec()),
        ("4 KiB", body(4096)),
        ("64 KiB", body(65536)),
    ] {
        assert!(kafboy::json::validate(&doc, 64).is_ok());
        let calls = (4_000_000 / doc.len()) as u32;
        let ours = median(9, calls, || {
            black_box(kafboy::json::validate(black_box(&doc), 64)).expect("valid");
        });
        let serde = median(9, calls, || {
            black_box(serde_json::from_slice::<IgnoredAny>(black_box(&doc))).expect("valid");
        });
        let per_byte = |d: Duration| d.as_secs_f64() * 1e9 / doc.len() as f64;
        println!(
            "  {name:>6} ({} B): validate {:>8.0} ns ({:.2} ns/B), serde IgnoredAny {:>8.0} ns ({:.2} ns/B)",
            doc.len(),
            ours.as_secs_f64() * 1e9,
            per_byte(ours),
            serde.as_secs_f64() * 1e9,
            per_byte(serde),
        );
    }
}
