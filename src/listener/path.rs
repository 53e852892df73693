//! Paths as routes see them: percent-escapes of unreserved characters decoded before routing
//! (RFC 3986, 6.2.2.2), so `/x/%73pecial` is `/x/special`. Routing matches the raw path and a
//! `:topic` is decoded after, so without this an escaped letter would take a path past the
//! route that names it (a fixed topic, kafboy's own paths) to a pattern's topic of that name.

use axum::http::Uri;
use axum::http::uri::PathAndQuery;

/// `uri` with every `%XX` that stands for a letter, digit, `-`, `.`, `_` or `~` in its path
/// decoded; other escapes (`%2F`, `%00`, UTF-8) stay as they are.
pub(super) fn normalize(uri: &mut Uri) {
    if !uri.path().contains('%') {
        return;
    }
    let Some(path) = decoded(uri.path()) else {
        return;
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    // Decoding only removes escapes: what was a valid path still is one.
    let Ok(path_and_query) = PathAndQuery::try_from(path_and_query) else {
        return;
    };
    parts.path_and_query = Some(path_and_query);
    if let Ok(normalized) = Uri::from_parts(parts) {
        *uri = normalized;
    }
}

/// The path with its unreserved escapes decoded, or `None` when it has none, or has a `%` that
/// starts no escape: decoding around that one could make a new escape (`%%36%38` would become
/// `%68`), which the topic's own decoding would then take for `h`, and the path would reach a
/// pattern's topic past the route that names it. Left as it is, its topic holds a `%`, which
/// no topic name may. Routes' own paths from the config go through it too, so they match what
/// requests become.
pub(crate) fn decoded(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut changed = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let escape = |at: usize| b.get(at).copied().and_then(hex);
        let c = escape(i + 1)? << 4 | escape(i + 2)?;
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c);
            changed = true;
        } else {
            out.extend_from_slice(&b[i..i + 3]);
        }
        i += 3;
    }
    // Escapes of ASCII replaced by ASCII: what was UTF-8 (a path may hold raw UTF-8) still is.
    changed.then(|| String::from_utf8(out).ok()).flatten()
}

fn hex(c: u8) -> Option<u8> {
    char::from(c).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(uri: &str) -> String {
        let mut uri: Uri = uri.parse().unwrap();
        normalize(&mut uri);
        uri.to_string()
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_the_rest_kept() {
        assert_eq!(normalized("/x/%73pecial"), "/x/special");
        assert_eq!(normalized("/%68ealth"), "/health");
        assert_eq!(normalized("/a/%41%7a%30%2D%2e%5F%7E"), "/a/Az0-._~");
        assert_eq!(normalized("/a/%2F%00%C3%A9%25"), "/a/%2F%00%C3%A9%25");
        assert_eq!(normalized("/a/%7"), "/a/%7");
        assert_eq!(normalized("/a/%zz%"), "/a/%zz%");
        assert_eq!(
            normalized("/%%36%38ealth"),
            "/%%36%38ealth",
            "no new escape made around a stray %"
        );
        assert_eq!(normalized("/%73ync/%zz%6"), "/%73ync/%zz%6");
        assert_eq!(
            normalized("/a/%2561"),
            "/a/%2561",
            "decoded once, not twice"
        );
        assert_eq!(
            normalized("/async/%74?key=%74&partition=1"),
            "/async/t?key=%74&partition=1",
            "the query is the handler's to decode"
        );
        assert_eq!(normalized("/async/t?key=%74"), "/async/t?key=%74");
        assert_eq!(decoded("/async/év%65nt").as_deref(), Some("/async/évent"));
    }

    #[test]
    fn a_path_without_escapes_is_left_alone() {
        assert_eq!(decoded("/async/events"), None);
        assert_eq!(decoded("/a/%2F"), None);
    }
}
