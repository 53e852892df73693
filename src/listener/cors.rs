//! `[server.cors]` for browser clients, on the produce routes only. Preflight requests are
//! answered by tower-http's layer, so they never reach a handler or Kafka; kafboy decides which
//! request headers a page may send, because tower-http can list names but not a prefix, and a
//! record header is any `X-Kafka-Header-<name>`.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::header::ACCESS_CONTROL_REQUEST_HEADERS;
use axum::http::{HeaderName, HeaderValue, Method};
use tower::util::MapRequestLayer;
use tower_http::cors::{AllowCredentials, AllowHeaders, AllowOrigin, CorsLayer};

use crate::config::CorsConfig;
use crate::state::AppState;

/// The CORS settings, checked.
#[derive(Clone)]
pub struct Cors {
    layer: CorsLayer,
    headers: Arc<AllowedHeaders>,
}

/// Request headers a page may send: names, and prefixes (an entry ending in `*`).
#[derive(Debug, Default)]
struct AllowedHeaders {
    names: Vec<HeaderName>,
    prefixes: Vec<String>,
}

impl Cors {
    /// Checks `c`: origins a browser can send, valid methods and header names.
    pub fn new(c: &CorsConfig) -> Result<Cors, String> {
        if c.allowed_origins.is_empty() {
            return Err("server.cors.allowed_origins is empty: no page could call kafboy".into());
        }
        let any = c.allowed_origins.iter().any(|o| o == "*");
        if any && c.allowed_origins.len() > 1 {
            return Err(
                "server.cors.allowed_origins: \"*\" allows every origin; list it alone".into(),
            );
        }
        // Browsers refuse credentials with `*`, and tower-http panics on the pair.
        if any && c.allow_credentials {
            return Err(
                "server.cors.allow_credentials needs allowed_origins to list origins, not \"*\""
                    .into(),
            );
        }
        let (origins, listed) = if any {
            (AllowOrigin::any(), Vec::new())
        } else {
            let listed = c
                .allowed_origins
                .iter()
                .map(|o| origin(o))
                .collect::<Result<Vec<_>, _>>()?;
            (AllowOrigin::list(listed.clone()), listed)
        };
        // For a listed origin only: tower-http's plain `true` would say it to any request,
        // with no Origin or another one.
        let credentials = if c.allow_credentials {
            AllowCredentials::predicate(move |origin, _| listed.contains(origin))
        } else {
            AllowCredentials::from(false)
        };
        let methods = c
            .allowed_methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("server.cors.allowed_methods: bad method {m:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !methods.contains(&Method::POST) {
            return Err(
                "server.cors.allowed_methods must hold POST: every produce call is one".into(),
            );
        }
        let mut headers = AllowedHeaders::default();
        for h in &c.allowed_headers {
            let bad = || format!("server.cors.allowed_headers: bad header {h:?}");
            match h.strip_suffix('*') {
                Some("") => headers.prefixes.push(String::new()),
                Some(prefix) => {
                    HeaderName::from_bytes(prefix.as_bytes()).map_err(|_| bad())?;
                    headers.prefixes.push(prefix.to_ascii_lowercase());
                }
                None => headers
                    .names
                    .push(HeaderName::from_bytes(h.as_bytes()).map_err(|_| bad())?),
            }
        }
        let layer = CorsLayer::new()
            .allow_origin(origins)
            .allow_methods(methods)
            // The list a preflight asks for, once `AllowedHeaders::filter` has cut it down.
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                axum::http::header::RETRY_AFTER,
            ])
            .max_age(c.max_age)
            .allow_credentials(credentials);
        Ok(Cors {
            layer,
            headers: Arc::new(headers),
        })
    }

    /// `router` with CORS on every route it has.
    pub fn wrap(&self, router: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
        let headers = self.headers.clone();
        router
            .layer(PreflightsOnly(self.layer.clone()))
            .layer(MapRequestLayer::new(move |r| headers.filter(r)))
    }
}

/// tower-http's layer takes every `OPTIONS` for a preflight and answers it `200`. One without
/// `Origin` and `Access-Control-Request-Method` is none: it gets the route's own answer (`405`
/// with `Allow: POST`), as with CORS off. Every other request goes through the layer.
#[derive(Clone)]
struct PreflightsOnly(CorsLayer);

impl<S: Clone> tower::Layer<S> for PreflightsOnly {
    type Service = PreflightDispatch<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PreflightDispatch {
            cors: self.0.layer(inner.clone()),
            inner,
        }
    }
}

#[derive(Clone)]
struct PreflightDispatch<S> {
    cors: CorsService<S>,
    inner: S,
}

type CorsService<S> = tower_http::cors::Cors<S>;

type Answer<R, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<R, E>> + Send>>;

impl<S, ResBody> tower::Service<Request> for PreflightDispatch<S>
where
    S: tower::Service<Request, Response = axum::http::Response<ResBody>> + Clone,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    // Boxed: the two paths' futures differ, and only routes with CORS pay for it.
    type Future = Answer<S::Response, S::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::ready!(self.cors.poll_ready(cx))?;
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let h = request.headers();
        let bare_options = request.method() == Method::OPTIONS
            && !(h.contains_key(axum::http::header::ORIGIN)
                && h.contains_key(axum::http::header::ACCESS_CONTROL_REQUEST_METHOD));
        match bare_options {
            true => Box::pin(self.inner.call(request)),
            false => Box::pin(self.cors.call(request)),
        }
    }
}

/// An origin as browsers send it, `scheme://host[:port]` in lower case. Anything else (a
/// trailing slash, a path, capitals, the scheme's default port) would never match, and every
/// call would fail. `null` is what sandboxed frames and `data:` pages send, from any site: it
/// would let every such page read the answers.
fn origin(o: &str) -> Result<HeaderValue, String> {
    let bad = |why: &str| format!("server.cors.allowed_origins: {o:?} {why}");
    if o == "null" {
        return Err(bad(
            "is what any sandboxed frame or data: page sends; list real origins",
        ));
    }
    let (scheme, host) = o
        .split_once("://")
        .ok_or_else(|| bad("is not scheme://host[:port]"))?;
    if scheme.is_empty() || host.is_empty() || host.contains('/') {
        return Err(bad("is not scheme://host[:port], without a path"));
    }
    if o.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("has capitals; browsers send origins in lower case"));
    }
    if (scheme == "https" && host.ends_with(":443")) || (scheme == "http" && host.ends_with(":80"))
    {
        return Err(bad(
            "names the scheme's default port, which browsers leave out",
        ));
    }
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    // Pages of these schemes send the origin `null`.
    if !scheme_ok || ["javascript", "data", "file", "blob", "about"].contains(&scheme) {
        return Err(bad("has no scheme a browser sends in an origin"));
    }
    check_host(host).map_err(&bad)?;
    HeaderValue::from_str(o).map_err(|_| bad("is not a header value"))
}

/// An origin's `host[:port]` as browsers send it: a DNS name (punycode for others), an IPv4
/// address or a bracketed IPv6 one, and a port of 1 to 65535. Not a pattern: `*.example.com`
/// is no origin any browser sends.
fn check_host(host: &str) -> Result<(), &'static str> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port))
            if !name.ends_with(':') && (!name.starts_with('[') || name.ends_with(']')) =>
        {
            (name, Some(port))
        }
        _ => (host, None),
    };
    if let Some(port) = port
        && !crate::config::valid_port(port)
    {
        return Err("has a port that is not 1 to 65535");
    }
    if port.is_some_and(|p| p.starts_with('0')) {
        return Err("writes its port with a leading zero, which browsers leave out");
    }
    // Browsers send an address in one form: IPv4 as four decimal numbers (`127.1` and
    // `0x7f.0.0.1` become `127.0.0.1`), IPv6 compressed, in hexadecimal only.
    let canonical_v4 = |n: &str| {
        n.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.to_string() == n)
    };
    // WHATWG's "ends in a number": the last label (one trailing dot dropped) all digits, or
    // `0x` and hexadecimal digits.
    let numeric = |n: &str| {
        let last = n
            .strip_suffix('.')
            .unwrap_or(n)
            .rsplit('.')
            .next()
            .unwrap_or("");
        !last.is_empty()
            && (last.bytes().all(|b| b.is_ascii_digit())
                || last
                    .strip_prefix("0x")
                    .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())))
    };
    // WHATWG writes every IPv6 address in hexadecimal groups, an IPv4-mapped one too
    // (`::ffff:7f00:1`), where Rust writes that one with a dotted tail.
    let whatwg = |a: std::net::Ipv6Addr| match a.to_ipv4_mapped() {
        Some(_) => format!("::ffff:{:x}:{:x}", a.segments()[6], a.segments()[7]),
        None => a.to_string(),
    };
    let ok = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => {
            !v6.contains('.')
                && v6
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|a| whatwg(a) == v6)
        }
        None if numeric(name) => canonical_v4(name),
        None => {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        }
    };
    if !ok {
        return Err(
            "names no host a browser sends (a pattern, user info, a query, or a name not in punycode)",
        );
    }
    Ok(())
}

impl AllowedHeaders {
    fn allows(&self, name: &str) -> bool {
        self.names
            .iter()
            .any(|n| n.as_str().eq_ignore_ascii_case(name))
            || self.prefixes.iter().any(|p| {
                name.len() > p.len()
                    && name.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            })
    }

    /// Leaves in a preflight's `Access-Control-Request-Headers` only the headers allowed. The
    /// answer lists what is left, so a browser refuses to send a request with any other, as it
    /// would against a fixed list.
    fn filter(&self, mut request: Request) -> Request {
        if request.method() != Method::OPTIONS {
            return request;
        }
        let headers = request.headers_mut();
        let asked: Vec<String> = headers
            .get_all(ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| !name.is_empty() && self.allows(name))
            .map(str::to_ascii_lowercase)
            .collect();
        headers.remove(ACCESS_CONTROL_REQUEST_HEADERS);
        if let Ok(kept) = HeaderValue::from_str(&asked.join(","))
            && !asked.is_empty()
        {
            headers.insert(ACCESS_CONTROL_REQUEST_HEADERS, kept);
        }
        request
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(origins: &[&str], headers: &[&str]) -> CorsConfig {
        CorsConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allowed_headers: headers.iter().map(|s| s.to_string()).collect(),
            ..CorsConfig::default()
        }
    }

    #[test]
    fn origins_that_could_never_match_are_config_errors() {
        for ok in [
            "https://app.example",
            "http://10.0.0.1:8080",
            "*",
            "https://a.example:8443",
            "http://[::1]:8080",
            "http://[::ffff:7f00:1]",
            "http://0xproxy:8080",
            "http://web_app:3000",
            "https://xn--bcher-kva.example",
            "chrome-extension://abcdefghijklmnop",
        ] {
            assert!(Cors::new(&config(&[ok], &[])).is_ok(), "{ok}");
        }
        for bad in [
            "https://app.example/",
            "https://app.example/page",
            "https://App.example",
            "app.example",
            "https://",
            "null",
            "https://app.example:443",
            "http://app.example:80",
            "https://*.example.com",
            "https://bücher.example",
            "https://app.example?x",
            "https://user@app.example",
            "https://app.example:99999",
            "https://app.example:0",
            "https://app.example:",
            "javascript://x",
            "1http://x",
            "http://[::1",
            "https://app.example:08443",
            "https://app.example:0443",
            "http://127.1",
            "http://0x7f.0.0.1",
            "http://2130706433",
            "http://[0:0:0:0:0:0:0:1]",
            "http://[::ffff:127.0.0.1]",
        ] {
            let err = Cors::new(&config(&[bad], &[])).err().unwrap();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(Cors::new(&config(&[], &[])).is_err());
        assert!(Cors::new(&config(&["*", "https://app.example"], &[])).is_err());
        let mut no_post = config(&["*"], &[]);
        no_post.allowed_methods = vec!["GET".into()];
        assert!(Cors::new(&no_post).err().unwrap().contains("POST"));
    }

    #[test]
    fn a_preflight_keeps_only_the_headers_allowed() {
        let cors = Cors::new(&config(
            &["*"],
            &["content-type", "X-Api-Key", "x-kafka-header-*"],
        ))
        .unwrap();
        let preflight = |asked: &[&str]| {
            let mut r = Request::builder().method(Method::OPTIONS);
            for a in asked {
                r = r.header(ACCESS_CONTROL_REQUEST_HEADERS, *a);
            }
            let r = cors
                .headers
                .filter(r.body(axum::body::Body::empty()).unwrap());
            r.headers()
                .get(ACCESS_CONTROL_REQUEST_HEADERS)
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            preflight(&["Content-Type, X-Kafka-Header-Trace-Id", "x-api-key"]).as_deref(),
            Some("content-type,x-kafka-header-trace-id,x-api-key")
        );
        assert_eq!(
            preflight(&["x-evil, x-kafka-header-"]).as_deref(),
            None,
            "an unknown header, and the bare prefix"
        );
        assert_eq!(preflight(&[]), None);
    }
}
