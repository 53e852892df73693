//! The running server: state built once from config, the router, and `run`, which serves a bound
//! listener until a shutdown future resolves, then drains requests and flushes the producers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::config::{Config, Partitioner, ServerConfig};
use crate::error::IngestError;
use crate::hook::{Failure, Hook};
use crate::ingest::{self, RouteHook};
use crate::kafka::Producers;
use crate::routes::{self, Allowlist, Route};

/// Everything a request needs, built once from config.
pub struct AppState {
    /// Limits and deadlines.
    pub server: ServerConfig,
    /// Topics that may be written.
    pub allow: Allowlist,
    /// The producers and the topic cache.
    pub producers: Arc<Producers>,
    routes: Vec<(Arc<Route>, RouteHook)>,
    default_partitioner: Partitioner,
    topic_partitioner: HashMap<String, Partitioner>,
    metadata_refresh: std::time::Duration,
    /// Time budget of one hook call.
    pub hook_timeout: std::time::Duration,
    /// Record count and nesting limits of bodies.
    pub decode_limits: crate::decode::Limits,
    shutting_down: AtomicBool,
}

/// A server ready to run: config turned into runtime types.
pub struct App {
    state: Arc<AppState>,
}

/// What shutdown left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Records accepted but neither delivered nor failed when the flush deadline passed.
    pub undelivered: usize,
}

/// Builds an [`App`], optionally with a Rust hook for every produce route.
pub struct AppBuilder {
    config: Config,
    hook: Option<Arc<dyn Hook>>,
}

impl AppBuilder {
    /// Runs `hook` on every produce route that has no Lua script of its own.
    pub fn hook(mut self, hook: impl Hook) -> AppBuilder {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Checks the config and builds routes, hooks and producers. Errors name the key at fault.
    pub fn build(self) -> Result<App, String> {
        App::assemble(&self.config, self.hook)
    }
}

impl App {
    /// A builder, for running kafboy with a Rust hook from your own `main`.
    pub fn builder(config: Config) -> AppBuilder {
        AppBuilder { config, hook: None }
    }

    /// Checks the config and builds routes and producers. The message names the key at fault.
    pub fn build(config: &Config) -> Result<App, String> {
        App::assemble(config, None)
    }

    fn assemble(config: &Config, rust_hook: Option<Arc<dyn Hook>>) -> Result<App, String> {
        if config.server.max_body_bytes > config.kafka.message_max_bytes {
            return Err(format!(
                "server.max_body_bytes ({}) exceeds kafka.message_max_bytes ({})",
                config.server.max_body_bytes, config.kafka.message_max_bytes
            ));
        }
        let routes = crate::hook::attach(config, routes::compile(config)?, rust_hook)?;
        let allow = Allowlist::new(&config.topics.allow)?;
        let mut topic_partitioner = HashMap::new();
        for (topic, o) in &config.topics.overrides {
            routes::validate_topic(topic).map_err(|e| format!("topics.overrides.{topic}: {e}"))?;
            if let Some(p) = o.partitioner {
                topic_partitioner.insert(topic.clone(), p);
            }
        }
        let producers = Arc::new(Producers::build(config)?);
        let state = AppState {
            server: config.server.clone(),
            allow,
            producers,
            routes,
            default_partitioner: config.topics.partitioner,
            topic_partitioner,
            metadata_refresh: config.kafka.metadata_refresh,
            hook_timeout: config.hook.timeout,
            decode_limits: crate::decode::Limits {
                max_records: config.server.max_records,
                max_depth: config.server.max_json_depth,
            },
            shutting_down: AtomicBool::new(false),
        };
        Ok(App {
            state: Arc::new(state),
        })
    }

    /// The HTTP router, without a socket (tests drive it with `oneshot`).
    pub fn router(&self) -> Router {
        let mut router = Router::new();
        for (route, hook) in &self.state.routes {
            let handler = {
                let (route, hook) = (route.clone(), hook.clone());
                move |State(app): State<Arc<AppState>>, request: Request| {
                    ingest::handle(app, route.clone(), hook.clone(), request)
                }
            };
            let refused = {
                let hook = hook.clone();
                move || method_not_allowed(hook.clone())
            };
            let method = post(handler).fallback(refused);
            router = router.route(&route.pattern, method.clone());
            if route.pattern != "/" {
                router = router.route(&format!("{}/", route.pattern), method);
            }
        }
        router
            .route("/health", get(health))
            .route("/ready", get(ready))
            .fallback(|| async { IngestError::NoRoute })
            .with_state(self.state.clone())
    }

    /// The producers, for inspection.
    pub fn producers(&self) -> &Arc<Producers> {
        &self.state.producers
    }

    /// Serves `listener` until `shutdown` resolves; then stops accepting, lets in-flight requests
    /// finish (at most `server.shutdown_timeout`), and flushes the producers (again at most that
    /// long). The listener is bound by the caller, so tests can use port 0.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> ShutdownReport {
        let state = self.state.clone();
        state
            .producers
            .topics
            .spawn_refresher(state.metadata_refresh);
        // Fatal producer errors are rare; a tenth of a second to notice one is plenty.
        state
            .producers
            .spawn_supervisor(std::time::Duration::from_millis(100));
        let grace = state.server.shutdown_timeout;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        {
            let state = state.clone();
            tokio::spawn(async move {
                shutdown.await;
                state.shutting_down.store(true, Ordering::SeqCst);
                tracing::info!("shutting down: no new connections, finishing requests");
                let _ = stop_tx.send(true);
            });
        }
        let limits = crate::listener::Limits {
            header_read_timeout: state.server.header_read_timeout,
            max_headers: state.server.max_headers,
            max_header_bytes: state.server.max_header_bytes,
            max_connections: state.server.max_connections,
        };
        if !crate::listener::serve(listener, self.router(), limits, stop_rx, grace).await {
            tracing::warn!(?grace, "requests still open at the shutdown deadline");
        }
        let undelivered = state.producers.flush(grace).await;
        if undelivered > 0 {
            tracing::error!(
                undelivered,
                "records still undelivered at the flush deadline"
            );
        } else {
            tracing::info!("all accepted records delivered or reported");
        }
        ShutdownReport { undelivered }
    }
}

impl AppState {
    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// The partition strategy for `topic` on `route`: the route's, else the topic's, else the
    /// default.
    pub fn partitioner_for(&self, route: &Route, topic: &str) -> Partitioner {
        route
            .partitioner
            .or_else(|| self.topic_partitioner.get(topic).copied())
            .unwrap_or(self.default_partitioner)
    }
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    // Serializing these plain structs cannot fail; an empty object is the fallback anyway.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn method_not_allowed(hook: RouteHook) -> Response {
    let message = "method not allowed; use POST";
    if let Some(hook) = hook {
        hook.on_error(&Failure {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message,
            topic: None,
        });
    }
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &serde_json::json!({ "error": message }),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

async fn health() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "ok": "alive" }))
}

async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let why = if app.shutting_down() {
        Some("shutting down")
    } else {
        app.producers.not_ready()
    };
    match why {
        None => json(StatusCode::OK, &serde_json::json!({ "ok": "ready" })),
        Some(why) => IngestError::Unavailable(format!("not ready: {why}")).into_response(),
    }
}
