//! Request bodies to record values. JSON is validated without building a tree and forwarded as
//! the original bytes; NDJSON lines are slices of the body; only forms are re-encoded.

use bytes::Bytes;

use crate::config::Payload;

mod form;

pub use form::{MAX_FORM_FIELDS, form_to_json};

/// How a body is read, from the route's payload setting and the Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// One JSON document.
    Json,
    /// `application/x-www-form-urlencoded`, produced as a JSON object.
    Form,
    /// One JSON document per non-empty line.
    Ndjson,
    /// Bytes as they are.
    Raw,
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Nothing to produce.
    #[error("empty body")]
    Empty,
    /// Not JSON.
    #[error("invalid json: {0}")]
    Json(String),
    /// One NDJSON line is not JSON (1-based line number).
    #[error("line {0}: invalid json: {1}")]
    Line(usize, String),
    /// A form that does not decode.
    #[error("invalid form: {0}")]
    Form(String),
    /// A Content-Type this route does not read.
    #[error(
        "unsupported content type {0:?}; use application/json, application/x-www-form-urlencoded or application/x-ndjson"
    )]
    UnsupportedType(String),
    /// A Content-Type that cannot be read as one media type in UTF-8.
    #[error("{0}")]
    BadContentType(String),
    /// More NDJSON records than `max_records`.
    #[error("more than {0} records in one request")]
    TooManyRecords(usize),
    /// An NDJSON or raw body, asked for as one JSON document (by a hook).
    #[error("the body is not one JSON document")]
    NotOneDocument,
    /// More form fields than [`MAX_FORM_FIELDS`].
    #[error("more than {0} fields in one form")]
    TooManyFields(usize),
    /// A form body that is a JSON object or array: as a form it would be one field's name.
    /// curl's `-d` sends a form unless told otherwise, the commonest mistake there is.
    #[error(
        "the body is JSON sent as a form (curl -d sends application/x-www-form-urlencoded unless told otherwise); send Content-Type: application/json"
    )]
    JsonAsForm,
}

/// The request's Content-Type: `None` when there is none; 415 when it is not text or comes on
/// more than one line (which one would decide how the body is read?).
pub fn content_type(headers: &axum::http::HeaderMap) -> Result<Option<&str>, DecodeError> {
    let mut values = headers.get_all(axum::http::header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(DecodeError::BadContentType(
            "more than one Content-Type".into(),
        ));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| DecodeError::BadContentType("a Content-Type that is not text".into()))
}

/// A media type's `;`-separated parts; a `;` inside a quoted value (`a="x;y"`) is part of it.
/// (Every request reads its Content-Type: nothing is allocated, and the scan is memchr's.)
fn split_params(ct: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(ct);
    std::iter::from_fn(move || {
        let s = rest?;
        match next_separator(s.as_bytes()) {
            // An ASCII byte: `i` is a char boundary.
            Some(i) => {
                rest = Some(&s[i + 1..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

/// The first `;` of `b` outside a quoted value (none after a quote that is never closed).
fn next_separator(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        i += memchr::memchr2(b';', b'"', &b[i..])?;
        if b[i] == b';' {
            return Some(i);
        }
        // A quoted value: to its closing quote, past escaped characters.
        i += 1;
        loop {
            match b.get(i)? {
                b'\\' => i += 2,
                b'"' => {
                    i += 1;
                    break;
                }
                _ => i += 1,
            }
        }
    }
}

impl BodyKind {
    /// Picks the reader for a body. A missing Content-Type means JSON. A `charset` other than
    /// UTF-8 (or its subset US-ASCII) is refused: the body would be read as something else.
    pub fn of(payload: Payload, content_type: Option<&str>) -> Result<BodyKind, DecodeError> {
        if payload == Payload::Raw {
            return Ok(BodyKind::Raw);
        }
        let Some(ct) = content_type else {
            return Ok(BodyKind::Json);
        };
        let mut parts = split_params(ct);
        let media = parts.next().unwrap_or_default().trim();
        for param in parts {
            let Some((name, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            if name.trim().eq_ignore_ascii_case("charset")
                && !["utf-8", "utf8", "us-ascii"]
                    .iter()
                    .any(|c| value.eq_ignore_ascii_case(c))
            {
                return Err(DecodeError::BadContentType(format!(
                    "unsupported charset {value:?}; send UTF-8"
                )));
            }
        }
        let is = |name: &str| media.eq_ignore_ascii_case(name);
        let json_suffix = media.len() > 17
            && media
                .get(..12)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/"))
            && media
                .get(media.len() - 5..)
                .is_some_and(|s| s.eq_ignore_ascii_case("+json"));
        // `text/plain` is what a browser's `navigator.sendBeacon(url, string)`, and any
        // `fetch` of a string body, sends: read as no Content-Type is, as JSON.
        if is("application/json") || is("text/json") || json_suffix || is("text/plain") {
            Ok(BodyKind::Json)
        } else if is("application/x-www-form-urlencoded") {
            Ok(BodyKind::Form)
        } else if [
            "application/x-ndjson",
            "application/ndjson",
            "application/jsonl",
            "application/x-jsonlines",
            "application/jsonlines",
        ]
        .iter()
        .any(|n| is(n))
        {
            Ok(BodyKind::Ndjson)
        } else {
            Err(DecodeError::UnsupportedType(ct.to_string()))
        }
    }
}

/// Limits on what one body may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most NDJSON records.
    pub max_records: usize,
    /// Deepest nesting of arrays and objects in a JSON document.
    pub max_depth: usize,
}

/// Turns a body into record values, all or nothing.
pub fn decode(kind: BodyKind, body: Bytes, limits: &Limits) -> Result<Vec<Bytes>, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Empty);
    }
    match kind {
        BodyKind::Raw => Ok(vec![body]),
        BodyKind::Json => {
            check_json(&body, limits.max_depth).map_err(|e| DecodeError::Json(several(e)))?;
            Ok(vec![body])
        }
        BodyKind::Form => Ok(vec![form_to_json(&body)?]),
        BodyKind::Ndjson => ndjson(body, limits),
    }
}

/// A JSON body with more after its document is most often several records, one per line
/// (a log shipper's, a string beacon's): say how to send those.
fn several(error: String) -> String {
    if error.starts_with("trailing characters") {
        format!(
            "{error} (one JSON document per body; for one record per line, send Content-Type: application/x-ndjson)"
        )
    } else {
        error
    }
}

/// Strict JSON check ([`crate::json::validate`]): one UTF-8 JSON document with nothing but
/// whitespace around it, nested at most `max_depth` deep. No tree is built.
pub fn check_json(bytes: &[u8], max_depth: usize) -> Result<(), String> {
    crate::json::validate(bytes, max_depth)
}

/// A line of JSON whitespace only (space, tab, carriage return), skipped in NDJSON. Not
/// `is_ascii_whitespace`, which also takes a form feed: JSON does not, so such a line is an
/// error, not a line to drop while answering 2xx.
fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'))
}

fn ndjson(body: Bytes, limits: &Limits) -> Result<Vec<Bytes>, DecodeError> {
    let mut records = Vec::new();
    let mut start = 0;
    for (index, line) in body.split(|&b| b == b'\n').enumerate() {
        let end = start + line.len();
        let line_start = start;
        start = end + 1;
        let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
        if is_blank(trimmed) {
            continue;
        }
        // The check sees one line: its "line 1" is this one, whose number comes first.
        check_json(trimmed, limits.max_depth).map_err(|e| {
            DecodeError::Line(
                index + 1,
                e.replacen(" at line 1 column ", " at column ", 1),
            )
        })?;
        if records.len() == limits.max_records {
            return Err(DecodeError::TooManyRecords(limits.max_records));
        }
        records.push(body.slice(line_start..line_start + trimmed.len()));
    }
    if records.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim(max_records: usize) -> Limits {
        Limits {
            max_records,
            max_depth: 128,
        }
    }

    #[test]
    fn depth_is_limited_outside_strings_only() {
        let nested = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        assert!(check_json(nested(100).as_bytes(), 100).is_ok());
        assert!(
            check_json(nested(101).as_bytes(), 100)
                .unwrap_err()
                .contains("deeper than 100")
        );
        assert!(check_json(nested(100_000).as_bytes(), 128).is_err());
        let in_string = format!("[\"{}\\\"{}\"]", "[".repeat(500), "{".repeat(500));
        assert!(check_json(in_string.as_bytes(), 4).is_ok(), "{in_string}");
        assert!(check_json(br#"{"a":[{"b":[1]}],"c":{}}"#, 4).is_ok());
        assert!(check_json(br#"{"a":[{"b":[[1]]}]}"#, 4).is_err());
    }

    #[test]
    fn a_byte_order_mark_is_named() {
        let bom = "\u{feff}{\"a\":1}";
        let json = decode(BodyKind::Json, Bytes::from(bom), &lim(10)).unwrap_err();
        let line = decode(BodyKind::Ndjson, Bytes::from(format!("{bom}\n")), &lim(10));
        for error in [json, line.unwrap_err()] {
            assert!(error.to_string().contains("byte order mark"), "{error}");
        }
        // Anywhere else, the same bytes are a string's; a body that is not UTF-8 says that.
        assert!(check_json("[\"\u{feff}\"]".as_bytes(), 4).is_ok());
        let broken = check_json(b"\xEF\xBB\xBF{\"a\":\"\xFF\"}", 4).unwrap_err();
        assert!(!broken.contains("byte order mark"), "{broken}");
        // The hooked path reads the body through the same check.
        let indexed = crate::json::validate_indexed(bom.as_bytes(), 4).unwrap_err();
        assert!(indexed.contains("byte order mark"), "{indexed}");
    }

    #[test]
    fn content_types() {
        let of = |ct| BodyKind::of(Payload::Auto, ct);
        assert_eq!(of(None), Ok(BodyKind::Json));
        assert_eq!(
            of(Some("application/json; charset=utf-8")),
            Ok(BodyKind::Json)
        );
        assert_eq!(of(Some("Application/Vnd.API+JSON")), Ok(BodyKind::Json));
        assert_eq!(
            of(Some("application/x-www-form-urlencoded")),
            Ok(BodyKind::Form)
        );
        assert_eq!(of(Some("application/x-ndjson")), Ok(BodyKind::Ndjson));
        assert_eq!(of(Some("text/plain;charset=UTF-8")), Ok(BodyKind::Json));
        assert!(matches!(
            of(Some("text/csv")),
            Err(DecodeError::UnsupportedType(_))
        ));
        assert_eq!(
            of(Some("application/json; charset=\"UTF-8\"")),
            Ok(BodyKind::Json)
        );
        assert_eq!(
            of(Some("application/x-ndjson;charset=us-ascii")),
            Ok(BodyKind::Ndjson)
        );
        // A `;` inside a quoted value does not start a parameter.
        assert_eq!(
            of(Some(
                r#"application/json; foo="x;charset=latin1"; charset=utf-8"#
            )),
            Ok(BodyKind::Json)
        );
        assert_eq!(
            of(Some(r#"application/json; foo="a\";charset=latin1""#)),
            Ok(BodyKind::Json)
        );
        for ct in [
            "application/json; charset=utf-16",
            "application/x-www-form-urlencoded; charset=iso-8859-1",
        ] {
            assert!(
                matches!(of(Some(ct)), Err(DecodeError::BadContentType(_))),
                "{ct}"
            );
        }
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(content_type(&headers), Ok(None));
        headers.insert(
            "content-type",
            axum::http::HeaderValue::from_bytes(b"text/plain; x=\xe9").unwrap(),
        );
        assert!(matches!(
            content_type(&headers),
            Err(DecodeError::BadContentType(_))
        ));
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.append("content-type", "application/x-ndjson".parse().unwrap());
        assert!(matches!(
            content_type(&headers),
            Err(DecodeError::BadContentType(_))
        ));
        assert_eq!(
            BodyKind::of(Payload::Raw, Some("image/png")),
            Ok(BodyKind::Raw)
        );
    }

    #[test]
    fn json_gate_is_strict() {
        for bad in [
            &b"{\"a\":1,}"[..],
            b"[1,2",
            b"tru",
            b"\"\xff\"",
            b"\"a\x01\"",
            b"\"\\q\"",
            b"{} x",
            b"01",
            b"\"\\u12G4\"",
            b"1 2",
            b"   ",
            // What serde_json::Value refuses, so consumers parsing with it never choke.
            b"\"\\ud800\"",
            b"\"\\ud83d:ude00\"",
            b"1e400",
            b"[-2e999]",
        ] {
            assert!(
                check_json(bad, 128).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [
            &b"{\"a\":[1,2.5,null,true]}"[..],
            b" 1 ",
            b"\"\\ud83d\\ude00\"",
            b"{}\n",
        ] {
            assert!(check_json(good, 128).is_ok());
        }
    }

    #[test]
    fn json_is_forwarded_byte_for_byte() {
        let body = Bytes::from_static(b" {\"b\": 1,\n \"a\":2} ");
        assert_eq!(
            decode(BodyKind::Json, body.clone(), &lim(10)).unwrap(),
            vec![body]
        );
        assert_eq!(
            decode(BodyKind::Json, Bytes::new(), &lim(10)),
            Err(DecodeError::Empty)
        );
        // Several documents, one per line: the error says how to send those.
        let lines = Bytes::from_static(b"{\"a\":1}\n{\"a\":2}\n");
        let err = decode(BodyKind::Json, lines, &lim(10)).unwrap_err();
        assert!(err.to_string().contains("application/x-ndjson"), "{err}");
    }

    #[test]
    fn json_sent_as_a_form_is_refused_not_written_as_a_field_name() {
        let form = |body: &'static [u8]| decode(BodyKind::Form, Bytes::from_static(body), &lim(10));
        for json in [&b"{\"a\":1}"[..], b" [1,2]\n", b"{}"] {
            assert_eq!(form(json), Err(DecodeError::JsonAsForm), "{json:?}");
        }
        // NDJSON, or JSON with a stray `&`: no field in it. With an `=` in a string, NDJSON or
        // JSON with a mistake is not a form either: a browser escapes its quotes.
        for json in [
            &b"{\"n\":1}\n{\"n\":2}\n"[..],
            b"{\"a\":1}&",
            b"{\"url\":\"/a?b=c\"}\n{\"n\":2}\n",
            b"{\"q\":\"a=b\",}",
        ] {
            assert_eq!(form(json), Err(DecodeError::JsonAsForm), "{json:?}");
        }
        // Forms that only look like it stay forms, quotes in their values too.
        for not_json in [
            &b"{a=1"[..],
            b"[x]=1&y=2",
            b"a={\"b\":1}",
            b"[x]=1&y=\"q\"",
            b"{a}=\"b\"",
        ] {
            assert!(form(not_json).is_ok(), "{not_json:?}");
        }
        // A hook reads the body through the same conversion.
        assert_eq!(
            crate::hook::parse_body(BodyKind::Form, &Bytes::from_static(b"{\"a\":1}"), 64),
            Err(DecodeError::JsonAsForm)
        );
        let status = crate::error::IngestError::from(DecodeError::JsonAsForm).status();
        assert_eq!(status, axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn forms_become_objects() {
        let json = form_to_json(b"b=x+y&a=%22q%22&b=2&flag").unwrap();
        assert_eq!(&json[..], br#"{"b":["x y","2"],"a":"\"q\"","flag":""}"#);
        assert_eq!(&form_to_json(b"test=a").unwrap()[..], br#"{"test":"a"}"#);
        let json = form_to_json(b"&x=100%25&&y=%zz%4&z=%C3%A9=").unwrap();
        assert_eq!(&json[..], r#"{"x":"100%","y":"%zz%4","z":"é="}"#.as_bytes());
        // Fields are counted before any is decoded; empty ones (`&&`) are not fields.
        let most = "a&".repeat(MAX_FORM_FIELDS) + "&&";
        assert!(form_to_json(most.as_bytes()).is_ok());
        let more = most + "b";
        assert!(matches!(
            form_to_json(more.as_bytes()),
            Err(DecodeError::TooManyFields(MAX_FORM_FIELDS))
        ));
    }

    #[test]
    fn forms_that_are_not_utf8_are_refused() {
        for body in [&b"a=%FF%FE"[..], b"%C3=1", b"a=\xff", b"a=%E2%82"] {
            assert!(
                matches!(form_to_json(body), Err(DecodeError::Form(_))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // The error quotes the start of the field, not a megabyte of it.
        let long = [b"a=".as_slice(), &[1u8; 100_000], b"%FF"].concat();
        let err = form_to_json(&long).unwrap_err().to_string();
        assert!(err.len() < 500 && err.contains("..."), "{}", err.len());
        assert_eq!(
            form_to_json(b"&&"),
            Err(DecodeError::Form("no fields".into()))
        );
    }

    #[test]
    fn many_form_fields_are_refused_before_they_cost_anything() {
        // 150k distinct keys in 1 MiB: quadratic key matching took half a minute here, and
        // the fields' decoded copies some 50 times the body. Now a 413, at once.
        let body: Vec<String> = (0..150_000).map(|i| format!("k{i:05}")).collect();
        let start = std::time::Instant::now();
        let refused = form_to_json(body.join("&").as_bytes());
        assert!(matches!(refused, Err(DecodeError::TooManyFields(_))));
        // Generous for a debug build on a busy machine; the quadratic path took 30 s.
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // As many distinct keys as a form may have, in linear time.
        let body = body[..MAX_FORM_FIELDS].join("&");
        let json = form_to_json(body.as_bytes()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value.as_object().unwrap().len(), MAX_FORM_FIELDS);
    }

    #[test]
    fn ndjson_is_all_or_nothing() {
        let body = Bytes::from_static(b"{\"a\":1}\r\n\n  \n[2]\n");
        let recs = decode(BodyKind::Ndjson, body, &lim(10)).unwrap();
        assert_eq!(
            recs,
            vec![Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"[2]")]
        );
        let err = decode(
            BodyKind::Ndjson,
            Bytes::from_static(b"1\n2\n{x\n"),
            &lim(10),
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Line(3, _)), "{err}");
        // One line number: the body's, not the line's own "line 1".
        let err = decode(BodyKind::Ndjson, Bytes::from_static(b"1\n2\n{x"), &lim(10)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("line 3: ") && text.ends_with(" at column 2"),
            "{text}"
        );
        let err = decode(BodyKind::Ndjson, Bytes::from_static(b"1\n2\n3"), &lim(2)).unwrap_err();
        assert_eq!(err, DecodeError::TooManyRecords(2));
        assert_eq!(
            decode(BodyKind::Ndjson, Bytes::from_static(b"\n\n"), &lim(2)),
            Err(DecodeError::Empty)
        );
        // A form feed is not JSON whitespace: its line is an error, not a blank line.
        let err = decode(
            BodyKind::Ndjson,
            Bytes::from_static(b"{}\n\x0c\n{}"),
            &lim(10),
        );
        assert!(matches!(err, Err(DecodeError::Line(2, _))), "{err:?}");
    }

    proptest! {
        #[test]
        fn form_output_is_valid_json_with_every_key(pairs in proptest::collection::vec(("[a-z%+=& ]{0,6}", ".{0,6}"), 1..8)) {
            let body = serde_urlencoded::to_string(&pairs).unwrap();
            let json = form_to_json(body.as_bytes()).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
            for (k, v) in &pairs {
                prop_assert!(value.get(k).is_some());
                let last = pairs.iter().rev().find(|(k2, _)| k2 == k).map(|(_, v)| v);
                let got = match &value[k] {
                    serde_json::Value::Array(all) => all.last().and_then(|x| x.as_str()),
                    one => one.as_str(),
                };
                prop_assert_eq!(got, last.map(String::as_str), "{} {}", k, v);
            }
        }

        #[test]
        fn ndjson_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(BodyKind::Ndjson, Bytes::from(body), &lim(5));
        }
    }
}
