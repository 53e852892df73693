//! Routes compiled from config: path patterns in axum's syntax, each with its own mode, payload
//! handling and partition strategy; plus the topic rules (Kafka's name grammar and the allowlist).

use std::collections::HashMap;

use crate::config::{Config, Mode, Partitioner, Payload, RouteConfig};

/// Where a route's topic comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicSource {
    /// The `{topic}` path segment.
    Path,
    /// A topic fixed by config.
    Fixed(String),
}

/// A route ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Pattern in axum syntax (`/1/foo/{topic}`).
    pub pattern: String,
    /// The path as configured, for messages and metrics.
    pub path: String,
    /// Topic source.
    pub topic: TopicSource,
    /// What the route waits for.
    pub mode: Mode,
    /// Body handling.
    pub payload: Payload,
    /// Strategy set on the route, if any.
    pub partitioner: Option<Partitioner>,
    /// Lua hook script of this route, if any.
    pub hook: Option<std::path::PathBuf>,
    /// Whether records go through the disk spool.
    pub spool: bool,
}

/// Paths kafboy serves itself; a configured route may not take them. The status page and
/// `/metrics` are reserved even when they move to the admin listener, so a route's meaning does
/// not change with where they are served.
pub const RESERVED_PATHS: &[&str] = &[
    "/health",
    "/ready",
    "/disco",
    "/openapi.json",
    "/metrics",
    "/",
    "/status.json",
];

/// Compiles the built-in and configured routes, refusing clashes and bad patterns.
pub fn compile(config: &Config) -> Result<Vec<Route>, String> {
    let mut routes = Vec::new();
    if config.server.default_routes {
        for (path, mode) in [
            ("/async/:topic", Mode::Async),
            ("/sync/:topic", Mode::Sync),
            ("/batch/async/:topic", Mode::BatchAsync),
            ("/batch/sync/:topic", Mode::BatchSync),
        ] {
            let rc = RouteConfig {
                path: path.into(),
                topic: None,
                mode,
                payload: Payload::Auto,
                partitioner: None,
                hook: None,
                spool: config.spool.default_routes
                    && matches!(mode, Mode::Async | Mode::BatchAsync),
            };
            routes.push(compile_one(&rc).map_err(|e| format!("default route {path}: {e}"))?);
        }
    }
    for (i, rc) in config.routes.iter().enumerate() {
        routes.push(compile_one(rc).map_err(|e| format!("routes[{i}] ({}): {e}", rc.path))?);
    }
    // A route whose one topic the allowlist refuses could only ever answer 404; an override
    // of such a topic (a typo, most likely) would never apply.
    let allow = Allowlist::new(&config.topics.allow).map_err(|e| format!("topics.allow{e}"))?;
    if let Some(name) = config.topics.overrides.keys().find(|t| !allow.allows(t)) {
        return Err(format!(
            "topics.overrides.{name}: the topic is not in topics.allow"
        ));
    }
    for route in &routes {
        if let TopicSource::Fixed(topic) = &route.topic
            && !allow.allows(topic)
        {
            return Err(format!(
                "route {}: topic {topic:?} is not in topics.allow",
                route.path
            ));
        }
    }
    let mut seen: HashMap<String, &str> = RESERVED_PATHS
        .iter()
        .map(|p| (shape(p), "a built-in endpoint"))
        .collect();
    for route in &routes {
        if let Some(other) = seen.insert(shape(&route.pattern), &route.path) {
            return Err(format!("route {} clashes with {other}", route.path));
        }
    }
    // A fixed segment wins over a `:topic` that also matches it (`/sync/orders` over
    // `/sync/:topic`, `/sync/async` under `/:topic/async` over `/sync/:topic`): in another
    // mode, the URL would promise what it does not do.
    for (a, b) in routes
        .iter()
        .flat_map(|a| routes.iter().map(move |b| (a, b)))
    {
        // In one mode, a path both match goes to the one with the fixed segment first, which
        // need not be what either route's author meant (`/clicks/events` under
        // `/:topic/events` and `/clicks/:topic`): only one fixed path beside a `:topic` may
        // share paths.
        // (A route of its own for the paths both match settles them: its fixed segments win.)
        if a.mode == b.mode
            && overlaps(&a.pattern, &b.pattern)
            && !narrower(&a.pattern, &b.pattern)
            && !narrower(&b.pattern, &a.pattern)
        {
            let shared = shared_path(&a.pattern, &b.pattern);
            if !routes.iter().any(|r| shape(&r.pattern) == shape(&shared)) {
                return Err(format!(
                    "routes {} and {} both match {shared}, and neither only paths the other \
                     matches: give one a path of its own, or {shared} a route",
                    a.path, b.path
                ));
            }
        }
        if a.mode != b.mode && overlaps(&a.pattern, &b.pattern) {
            return Err(format!(
                "route {} ({}) takes requests route {} ({}) would serve: give it a path of its own",
                a.path,
                a.mode.as_str(),
                b.path,
                b.mode.as_str()
            ));
        }
    }
    Ok(routes)
}

/// Whether every path `a` matches, `b` matches too (`/a/x` and `/a/{topic}`).
fn narrower(a: &str, b: &str) -> bool {
    segment_pairs(a, b).is_some_and(|mut p| p.all(|(x, y)| x == y || y == "{}"))
}

/// Whether some path matches both patterns (same shape is a clash, found before).
fn overlaps(a: &str, b: &str) -> bool {
    shape(a) != shape(b)
        && segment_pairs(a, b).is_some_and(|mut p| p.all(|(x, y)| x == y || x == "{}" || y == "{}"))
}

/// The path two overlapping patterns both match, each `{topic}` taken from the other (one
/// `{topic}` per route: where both have it, the rest is equal and the patterns clash).
fn shared_path(a: &str, b: &str) -> String {
    let segments: Vec<String> = segment_pairs(a, b)
        .into_iter()
        .flatten()
        .map(|(x, y)| if x == "{}" { y } else { x })
        .collect();
    format!("/{}", segments.join("/"))
}

/// The segments of two patterns' shapes side by side, when they have as many.
fn segment_pairs(a: &str, b: &str) -> Option<impl Iterator<Item = (String, String)>> {
    let split = |p: &str| -> Vec<String> { shape(p).split('/').map(String::from).collect() };
    let (a, b) = (split(a), split(b));
    (a.len() == b.len()).then(|| a.into_iter().zip(b))
}

fn compile_one(rc: &RouteConfig) -> Result<Route, String> {
    if !rc.path.starts_with('/') {
        return Err("path must start with '/'".into());
    }
    let mut segments = Vec::new();
    let mut has_topic = false;
    // As requests' paths are before routing: `/a%2Db` is `/a-b`.
    let path = crate::listener::path::decoded(&rc.path).unwrap_or_else(|| rc.path.clone());
    // Routed as `/a/b`, where a request for `/a//b` as written finds no route.
    if path.contains("//") {
        return Err("an empty segment (`//`); write the path as clients send it".into());
    }
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let name = seg
            .strip_prefix(':')
            .or_else(|| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')));
        match name {
            Some("topic") if has_topic => return Err("`:topic` appears twice".into()),
            Some("topic") => {
                has_topic = true;
                segments.push("{topic}".to_string());
            }
            Some(other) => return Err(format!("unknown path parameter `{other}`; only `:topic`")),
            None if seg.contains(['{', '}', '*', ':']) => {
                return Err(format!("segment `{seg}` has a reserved character"));
            }
            // Clients and proxies fold `.` and `..` away: such a route could never be reached as
            // written, and could pass for another path in the clash checks.
            None if seg == "." || seg == ".." => {
                return Err(format!(
                    "segment `{seg}` is a dot segment, which clients fold away; write the path as they send it"
                ));
            }
            // Requests are matched on the raw path, so anything a client must percent-encode
            // (spaces, non-ASCII, `?`, `#`) would make a route no request can reach.
            None if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()+,;=@%".contains(&b)) =>
            {
                return Err(format!(
                    "segment `{seg}` has characters a URL path cannot hold as they are"
                ));
            }
            None => segments.push(seg.to_string()),
        }
    }
    let topic = match (&rc.topic, has_topic) {
        (Some(_), true) => {
            return Err("set either `:topic` in the path or `topic`, not both".into());
        }
        (None, false) => return Err("needs `:topic` in the path or a fixed `topic`".into()),
        (None, true) => TopicSource::Path,
        (Some(t), false) => {
            validate_topic(t).map_err(|e| format!("topic: {e}"))?;
            TopicSource::Fixed(t.clone())
        }
    };
    Ok(Route {
        pattern: format!("/{}", segments.join("/")),
        path: rc.path.clone(),
        topic,
        mode: rc.mode,
        payload: rc.payload,
        partitioner: rc.partitioner,
        hook: rc.hook.clone(),
        spool: rc.spool,
    })
}

/// The part of a pattern that decides what it matches: parameters are interchangeable and the
/// trailing slash is optional, so `/a/{topic}` and `/a/:x/` have the same shape.
fn shape(pattern: &str) -> String {
    pattern
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| if s.starts_with([':', '{']) { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// Kafka's rules for a topic name: 1–249 of `[A-Za-z0-9._-]`, not `.` or `..`. Internal topics
/// (`__consumer_offsets` and friends) are refused as well.
pub fn validate_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() || topic.len() > 249 {
        return Err("topic name must be 1 to 249 characters");
    }
    if topic == "." || topic == ".." {
        return Err("topic name may not be '.' or '..'");
    }
    if topic.starts_with("__") {
        return Err("topic names starting with '__' are internal");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("topic name may only hold letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// The topics that may be written: exact names and prefixes (from `prefix*`).
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    exact: std::collections::HashSet<String>,
    prefixes: Vec<String>,
}

impl Allowlist {
    /// Builds the list; an empty list allows every topic. Errors name an entry by its index
    /// (`[i]: ...`); the caller says which list.
    pub fn new(entries: &[String]) -> Result<Allowlist, String> {
        let mut list = Allowlist::default();
        for (i, entry) in entries.iter().enumerate() {
            match entry.strip_suffix('*') {
                Some(prefix) if prefix.contains('*') => {
                    return Err(format!("[{i}]: only a trailing '*' is allowed"));
                }
                // A prefix with a byte no topic name has would never match.
                Some(prefix)
                    if !prefix
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
                {
                    return Err(format!(
                        "[{i}]: {entry:?} could match no topic (names hold letters, digits, '.', '_' and '-')"
                    ));
                }
                Some(prefix) => list.prefixes.push(prefix.to_string()),
                None => {
                    validate_topic(entry).map_err(|e| format!("[{i}]: {e}"))?;
                    list.exact.insert(entry.clone());
                }
            }
        }
        Ok(list)
    }

    /// Whether the list names nothing (for the global list: everything is allowed).
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// Whether `topic` may be written.
    pub fn allows(&self, topic: &str) -> bool {
        (self.exact.is_empty() && self.prefixes.is_empty())
            || self.exact.contains(topic)
            || self.prefixes.iter().any(|p| topic.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(routes: &str) -> Config {
        Config::from_toml(routes).unwrap()
    }

    #[test]
    fn patterns_are_translated_and_modes_kept() {
        let c = config(
            "[[routes]]\npath = \"/1/foo/:topic\"\nmode = \"batch_async\"\n\
             [[routes]]\npath = \"/events\"\ntopic = \"clicks\"\nmode = \"sync\"\npayload = \"raw\"",
        );
        let routes = compile(&c).unwrap();
        assert_eq!(routes.len(), 6);
        assert_eq!(routes[4].pattern, "/1/foo/{topic}");
        assert_eq!(routes[4].mode, Mode::BatchAsync);
        assert_eq!(routes[5].topic, TopicSource::Fixed("clicks".into()));
        assert_eq!(routes[5].payload, Payload::Raw);
    }

    #[test]
    fn a_route_path_with_escapes_is_matched_as_requests_are_decoded() {
        let c = config("[[routes]]\npath = \"/a%2Db/%3A/:topic\"\nmode = \"async\"");
        assert_eq!(
            compile(&c).unwrap().last().unwrap().pattern,
            "/a-b/%3A/{topic}"
        );
        let c = config("[[routes]]\npath = \"/%61sync/:topic\"\nmode = \"sync\"");
        assert!(
            compile(&c)
                .unwrap_err()
                .contains("clashes with /async/:topic")
        );
    }

    #[test]
    fn clashes_are_config_errors() {
        let c = config("[[routes]]\npath = \"/async/{topic}/\"\nmode = \"sync\"");
        let err = compile(&c).unwrap_err();
        assert!(err.contains("clashes with /async/:topic"), "{err}");
        for path in RESERVED_PATHS.iter().chain(&["/metrics/", "/disco"]) {
            let c = config(&format!(
                "[[routes]]\npath = \"{path}\"\ntopic = \"t\"\nmode = \"sync\""
            ));
            assert!(compile(&c).unwrap_err().contains("built-in"), "{path}");
        }
        // A fixed path under a `:topic` route of another mode would take its requests.
        let c = config("[[routes]]\npath = \"/sync/orders\"\ntopic = \"audit\"\nmode = \"async\"");
        let err = compile(&c).unwrap_err();
        assert!(
            err.contains("/sync/orders (async)") && err.contains("/sync/:topic"),
            "{err}"
        );
        let c = config("[[routes]]\npath = \"/:topic/async\"\nmode = \"async\"");
        let err = compile(&c).unwrap_err();
        assert!(err.contains("/:topic/async"), "{err}");
        // In the same mode it is a special case of that route: allowed.
        let c = config("[[routes]]\npath = \"/sync/orders\"\ntopic = \"audit\"\nmode = \"sync\"");
        assert!(compile(&c).is_ok());
        // Two routes of one mode, each fixed where the other takes the topic: `/clicks/events`
        // would go to one of them by a rule neither states.
        let c = config(
            "[server]\ndefault_routes = false\n\
             [[routes]]\npath = \"/:topic/events\"\nmode = \"async\"\n\
             [[routes]]\npath = \"/clicks/:topic\"\nmode = \"async\"\npayload = \"raw\"",
        );
        let err = compile(&c).unwrap_err();
        assert!(err.contains("both match /clicks/events"), "{err}");
        // A route of its own for that path settles it.
        let settled = "[[routes]]\npath = \"/clicks/events\"\ntopic = \"ce\"\nmode = \"async\"";
        let c = config(&format!(
            "[server]\ndefault_routes = false\n\
             [[routes]]\npath = \"/:topic/events\"\nmode = \"async\"\n\
             [[routes]]\npath = \"/clicks/:topic\"\nmode = \"async\"\n{settled}"
        ));
        assert!(compile(&c).is_ok());
    }

    #[test]
    fn a_fixed_topic_outside_the_allowlist_is_a_config_error() {
        let route = "[[routes]]\npath = \"/clicks\"\ntopic = \"t1\"\nmode = \"async\"";
        let err = compile(&config(&format!("[topics]\nallow = [\"events\"]\n{route}")));
        assert!(err.unwrap_err().contains("not in topics.allow"));
        assert!(compile(&config(&format!("[topics]\nallow = [\"t*\"]\n{route}"))).is_ok());
        let overrides = |name: &str| {
            config(&format!(
                "[topics]\nallow = [\"clicks\", \"logs.*\"]\n[topics.overrides.{name}]\nbatch_size = 5"
            ))
        };
        let err = compile(&overrides("clcks")).unwrap_err();
        assert!(err.contains("topics.overrides.clcks"), "{err}");
        assert!(compile(&overrides("clicks")).is_ok());
        assert!(compile(&overrides("\"logs.web\"")).is_ok());
    }

    #[test]
    fn bad_routes_are_named() {
        for (toml, want) in [
            ("path = \"/x\"\nmode = \"sync\"", "needs `:topic`"),
            (
                "path = \"/x/:topic\"\ntopic = \"t\"\nmode = \"sync\"",
                "not both",
            ),
            (
                "path = \"/x/:id\"\nmode = \"sync\"",
                "unknown path parameter",
            ),
            ("path = \"x/:topic\"\nmode = \"sync\"", "start with"),
            ("path = \"/x\"\ntopic = \"a b\"\nmode = \"sync\"", "topic:"),
            ("path = \"/?.\"\ntopic = \"t\"\nmode = \"sync\"", "URL path"),
            ("path = \"/é/:topic\"\nmode = \"sync\"", "URL path"),
        ] {
            let err = compile(&config(&format!("[[routes]]\n{toml}"))).unwrap_err();
            assert!(err.contains("routes[0]") && err.contains(want), "{err}");
        }
    }

    #[test]
    fn topic_rules() {
        for ok in ["a", "A.b_c-9", &"x".repeat(249), "_one"] {
            assert!(validate_topic(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "__consumer_offsets",
            "a b",
            "a/b",
            "é",
            &"x".repeat(250),
        ] {
            assert!(validate_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowlist_exact_and_prefix() {
        let list = Allowlist::new(&["clicks".into(), "logs.*".into()]).unwrap();
        assert!(list.allows("clicks") && list.allows("logs.app") && list.allows("logs."));
        assert!(!list.allows("click") && !list.allows("logs") && !list.allows("other"));
        assert!(Allowlist::new(&[]).unwrap().allows("anything"));
        assert!(Allowlist::new(&["a*b*".into()]).is_err());
        assert!(Allowlist::new(&["web/*".into()]).is_err());
        assert!(Allowlist::new(&["*".into(), "a-b_c.*".into()]).is_ok());
    }

    proptest! {
        #[test]
        fn validator_accepts_exactly_the_legal_set(s in "[ -~]{0,260}") {
            let legal = (1..=249).contains(&s.len())
                && s != "." && s != ".."
                && !s.starts_with("__")
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            prop_assert_eq!(validate_topic(&s).is_ok(), legal);
        }
    }
}
